/**
 * `createCreditsClient`: typed CreditService and GenerationService clients over one transport,
 * with the caller's token on every call, idempotency keys for mutations sent without one,
 * retries of UNAVAILABLE and every failure as a CreditsError.
 */
import type { DescService } from "@bufbuild/protobuf";
import { createClient } from "@connectrpc/connect";
import type { Client, Interceptor, Transport } from "@connectrpc/connect";
import { CreditsError } from "./errors.js";
import { CreditService } from "./gen/credits/v1/credit_service_pb.js";
import { GenerationService } from "./gen/credits/v1/generation_service_pb.js";
import {
  authInterceptor,
  idempotencyInterceptor,
  retryInterceptor,
} from "./interceptors.js";
import type { RetryOptions } from "./interceptors.js";
import { connectTransport, grpcTransport } from "./transports.js";
import type { ClosableTransport, TransportSettings } from "./transports.js";

/**
 * Which protocol to speak: `"connect"` (HTTP/1.1 or 2 over fetch; the server's Connect edge)
 * or `"grpc"` (HTTP/2, Node only; the server's gRPC port), or a function that builds a
 * transport of your own from the client's settings (it must apply `settings.interceptors`).
 */
export type TransportChoice =
  | "connect"
  | "grpc"
  | ((settings: TransportSettings) => ClosableTransport);

interface BaseOptions {
  /** Where the service answers, e.g. `https://credits.example.com` or `http://127.0.0.1:50051`. */
  baseUrl: string;
  /** Default `"connect"`. */
  transport?: TransportChoice;
  /** How UNAVAILABLE unary calls are retried; `{ maxAttempts: 1 }` turns retries off. */
  retry?: RetryOptions;
  /** Interceptors of your own, run inside the client's (after the key, per attempt). */
  interceptors?: Interceptor[];
}

/** The caller's bearer token: a fixed `token`, or `getToken`, asked before every call. */
export type CreditsClientOptions = BaseOptions &
  (
    | { token: string; getToken?: never }
    | { getToken: () => string | Promise<string>; token?: never }
  );

export interface CreditsClient {
  /** Balances, holds and the ledger. */
  readonly credits: Client<typeof CreditService>;
  /** Paid generations. */
  readonly generations: Client<typeof GenerationService>;
  /** Closes the gRPC transport's HTTP/2 connection (nothing to do for Connect). */
  close(): void;
}

/** A client of both services over one transport. */
export function createCreditsClient(options: CreditsClientOptions): CreditsClient {
  const source =
    options.getToken !== undefined
      ? { getToken: options.getToken }
      : typeof options.token === "string"
        ? { token: options.token }
        : undefined;
  if (source === undefined) {
    throw new TypeError("createCreditsClient needs a token or a getToken function");
  }
  const interceptors = [
    idempotencyInterceptor(),
    retryInterceptor(options.retry),
    authInterceptor(source),
    ...(options.interceptors ?? []),
  ];
  const choice = options.transport ?? "connect";
  const build =
    choice === "connect" ? connectTransport : choice === "grpc" ? grpcTransport : choice;
  const { transport, close } = build({ baseUrl: options.baseUrl, interceptors });
  return {
    credits: typedErrors(CreditService, transport),
    generations: typedErrors(GenerationService, transport),
    close,
  };
}

/**
 * A client of `service` whose calls reject (and whose streams end) with CreditsError. Done
 * here, around the calls, because Connect turns whatever an interceptor throws back into a
 * plain ConnectError.
 */
function typedErrors<T extends DescService>(service: T, transport: Transport): Client<T> {
  const client = createClient(service, transport) as Record<string, (...args: never[]) => unknown>;
  const wrapped: Record<string, unknown> = {};
  for (const method of service.methods) {
    const call = client[method.localName];
    if (call === undefined) {
      continue;
    }
    if (method.methodKind === "unary") {
      wrapped[method.localName] = (...args: never[]) =>
        (call(...args) as Promise<unknown>).catch((err: unknown) => {
          throw CreditsError.from(err);
        });
    } else if (method.methodKind === "server_streaming") {
      wrapped[method.localName] = (...args: never[]) =>
        streamErrors(call(...args) as AsyncIterable<unknown>);
    } else {
      wrapped[method.localName] = call;
    }
  }
  return wrapped as Client<T>;
}

async function* streamErrors<T>(messages: AsyncIterable<T>): AsyncIterable<T> {
  try {
    yield* messages;
  } catch (err) {
    throw CreditsError.from(err);
  }
}
