/**
 * What the client adds to every call, as Connect interceptors (outermost first): mutations get an
 * idempotency key, UNAVAILABLE is retried with that same key, and each attempt carries
 * `authorization: Bearer <token>`.
 */
import { clone } from "@bufbuild/protobuf";
import type { DescField } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import type { Interceptor } from "@connectrpc/connect";
import { CreditsError } from "./errors.js";

/** Where a caller's bearer token comes from: fixed, or asked for on every call. */
export type TokenSource = { token: string } | { getToken: () => string | Promise<string> };

/** How UNAVAILABLE unary calls are retried. */
export interface RetryOptions {
  /** Attempts per call, the first included (1: no retry). Default 4. */
  maxAttempts?: number;
  /** The wait before the first retry when the error carries no RetryInfo. Default 100 ms. */
  initialBackoffMs?: number;
  /** The longest wait between attempts, RetryInfo's included. Default 2000 ms. */
  maxBackoffMs?: number;
}

/** The key field of each mutation that takes one (CreateGeneration calls it request_id). */
const KEY_FIELDS = new Map<string, string>([
  ["credits.v1.CreditService.DebitCredits", "idempotencyKey"],
  ["credits.v1.CreditService.GrantCredits", "idempotencyKey"],
  ["credits.v1.CreditService.RefundCredits", "idempotencyKey"],
  ["credits.v1.CreditService.ReserveCredits", "idempotencyKey"],
  ["credits.v1.CreditService.CaptureCredits", "idempotencyKey"],
  ["credits.v1.GenerationService.CreateGeneration", "requestId"],
]);

/**
 * Mutations without a key, which the client never retries: each moves a hold or generation to a
 * final state, so a second attempt after a lost reply answers HOLD_NOT_PENDING or
 * GENERATION_NOT_CANCELLABLE instead of the outcome.
 */
const NOT_RETRIED = new Set([
  "credits.v1.CreditService.ReleaseCredits",
  "credits.v1.GenerationService.CancelGeneration",
]);

/** A new UUID key for a mutation sent without one; the retries below reuse the request. */
export function idempotencyInterceptor(): Interceptor {
  return (next) => async (req) => {
    const name = KEY_FIELDS.get(`${req.service.typeName}.${req.method.name}`);
    if (req.stream || name === undefined) {
      return next(req);
    }
    const field: DescField | undefined = req.method.input.field[name];
    const message = req.message as unknown as Record<string, unknown>;
    if (field === undefined || message[name] !== "") {
      return next(req);
    }
    const keyed = clone(req.method.input, req.message);
    (keyed as unknown as Record<string, unknown>)[name] = crypto.randomUUID();
    return next({ ...req, message: keyed });
  };
}

/**
 * Retries a unary call that failed UNAVAILABLE (the database or a key server briefly away, the
 * server restarting), waiting what its RetryInfo asks or backing off exponentially; the request
 * is sent again as it is, idempotency key included, so a mutation takes effect once.
 */
export function retryInterceptor(options: RetryOptions = {}): Interceptor {
  const maxAttempts = Math.max(1, Math.floor(options.maxAttempts ?? 4));
  const initial = options.initialBackoffMs ?? 100;
  const ceiling = options.maxBackoffMs ?? 2000;
  return (next) => async (req) => {
    if (req.stream || NOT_RETRIED.has(`${req.service.typeName}.${req.method.name}`)) {
      return next(req);
    }
    for (let attempt = 1; ; attempt++) {
      try {
        return await next(req);
      } catch (err) {
        const error = ConnectError.from(err);
        if (error.code !== Code.Unavailable || attempt >= maxAttempts || req.signal.aborted) {
          throw error;
        }
        const asked = new CreditsError(error).retryDelayMs;
        await sleep(Math.min(asked ?? initial * 2 ** (attempt - 1), ceiling), req.signal);
      }
    }
  };
}

function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const timer = setTimeout(done, ms);
    signal.addEventListener("abort", done, { once: true });
    function done(): void {
      clearTimeout(timer);
      signal.removeEventListener("abort", done);
      resolve();
    }
  });
}

/** `authorization: Bearer <token>` on every attempt; `getToken` is asked each time. */
export function authInterceptor(source: TokenSource): Interceptor {
  return (next) => async (req) => {
    const token = "token" in source ? source.token : await source.getToken();
    req.header.set("authorization", `Bearer ${token}`);
    return next(req);
  };
}
