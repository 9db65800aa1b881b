/**
 * The two ways to reach the service: Connect over fetch (browsers, Deno, Supabase Edge
 * Functions, any runtime with fetch) and gRPC over HTTP/2 (Node). The gRPC transport's module
 * is imported on the first call, so a bundle that never asks for it never loads node:http2.
 */
import type { DescMessage, DescMethodStreaming, DescMethodUnary } from "@bufbuild/protobuf";
import type { MessageInitShape } from "@bufbuild/protobuf";
import type {
  ContextValues,
  Interceptor,
  StreamResponse,
  Transport,
  UnaryResponse,
} from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-web";

/** What a transport is built from. */
export interface TransportSettings {
  baseUrl: string;
  /** The client's interceptors; a transport of your own must apply them. */
  interceptors: Interceptor[];
}

/** A transport and how to let go of its connections. */
export interface ClosableTransport {
  transport: Transport;
  close(): void;
}

/** Connect protocol (JSON bodies) over the runtime's fetch. */
export function connectTransport(settings: TransportSettings): ClosableTransport {
  return {
    transport: createConnectTransport({
      baseUrl: settings.baseUrl,
      interceptors: settings.interceptors,
    }),
    close: () => {},
  };
}

/** gRPC over one HTTP/2 connection of node:http2, loaded lazily from @connectrpc/connect-node. */
export function grpcTransport(settings: TransportSettings): ClosableTransport {
  let closed = false;
  let abort: (() => void) | undefined;
  let loading: Promise<Transport> | undefined;
  const load = (): Promise<Transport> =>
    (loading ??= import("@connectrpc/connect-node").then((node) => {
      const sessionManager = new node.Http2SessionManager(settings.baseUrl);
      abort = () => sessionManager.abort();
      if (closed) {
        abort();
      }
      return node.createGrpcTransport({
        baseUrl: settings.baseUrl,
        interceptors: settings.interceptors,
        sessionManager,
      });
    }));
  const transport: Transport = {
    async unary<I extends DescMessage, O extends DescMessage>(
      method: DescMethodUnary<I, O>,
      signal: AbortSignal | undefined,
      timeoutMs: number | undefined,
      header: HeadersInit | undefined,
      input: MessageInitShape<I>,
      contextValues?: ContextValues,
    ): Promise<UnaryResponse<I, O>> {
      const inner = await load();
      return inner.unary(method, signal, timeoutMs, header, input, contextValues);
    },
    async stream<I extends DescMessage, O extends DescMessage>(
      method: DescMethodStreaming<I, O>,
      signal: AbortSignal | undefined,
      timeoutMs: number | undefined,
      header: HeadersInit | undefined,
      input: AsyncIterable<MessageInitShape<I>>,
      contextValues?: ContextValues,
    ): Promise<StreamResponse<I, O>> {
      const inner = await load();
      return inner.stream(method, signal, timeoutMs, header, input, contextValues);
    },
  };
  return {
    transport,
    close: () => {
      closed = true;
      abort?.();
    },
  };
}
