/**
 * The transports the server scenario runs over, each with the server port it speaks to.
 *
 * gRPC talks to CREDITS_LISTEN; Connect talks to the server's Connect edge on
 * CREDITS_HTTP_LISTEN, which the harness sets to a free port. The whole scenario runs over both.
 */
import type { ServeProcess } from "./server.js";

export interface TransportUnderTest {
  readonly transport: "connect" | "grpc";
  readonly baseUrl: (server: ServeProcess) => string;
}

export const GRPC: TransportUnderTest = { transport: "grpc", baseUrl: (s) => s.grpcUrl };

export const CONNECT: TransportUnderTest = { transport: "connect", baseUrl: (s) => s.httpUrl };

export const TRANSPORTS: readonly TransportUnderTest[] = [GRPC, CONNECT];
