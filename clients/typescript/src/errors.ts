/**
 * Typed errors of the credits service: every failed call rejects with a {@link CreditsError}
 * that carries the google.rpc.ErrorInfo reason and metadata the service sends (domain
 * `credits.v1`), so programs match on `reason`, never on the message.
 */
import { Code, ConnectError } from "@connectrpc/connect";
import {
  BadRequestSchema,
  ErrorInfoSchema,
  PreconditionFailureSchema,
  RetryInfoSchema,
} from "./gen/google/rpc/error_details_pb.js";

/** The ErrorInfo domain of the credits service's reasons. */
export const DOMAIN = "credits.v1";

/** Every ErrorInfo reason of the contract (docs/api-contract.md, "Errors"), with its code. */
export const REASON_CODES = {
  TOKEN_MISSING: Code.Unauthenticated,
  TOKEN_INVALID: Code.Unauthenticated,
  TOKEN_EXPIRED: Code.Unauthenticated,
  PERMISSION_DENIED: Code.PermissionDenied,
  ACCESS_DENIED_BY_POLICY: Code.PermissionDenied,
  PROFILE_NOT_FOUND: Code.NotFound,
  TRANSACTION_NOT_FOUND: Code.NotFound,
  HOLD_NOT_FOUND: Code.NotFound,
  GENERATION_NOT_FOUND: Code.NotFound,
  GRANT_NOT_FOUND: Code.NotFound,
  INVALID_ARGUMENT: Code.InvalidArgument,
  INSUFFICIENT_CREDITS: Code.FailedPrecondition,
  HOLD_NOT_PENDING: Code.FailedPrecondition,
  GRANT_NOT_ACTIVE: Code.FailedPrecondition,
  REFUND_EXCEEDS_DEBIT: Code.FailedPrecondition,
  GENERATION_NOT_CANCELLABLE: Code.FailedPrecondition,
  BALANCE_LIMIT_EXCEEDED: Code.FailedPrecondition,
  SPEND_LIMIT_EXCEEDED: Code.FailedPrecondition,
  TOO_MANY_ACTIVE_GENERATIONS: Code.ResourceExhausted,
  IDEMPOTENCY_KEY_REUSED: Code.AlreadyExists,
  BACKEND_UNAVAILABLE: Code.Unavailable,
  SERVER_STOPPING: Code.Unavailable,
  SERVICE_CREDENTIALS_REJECTED: Code.Internal,
  INTERNAL: Code.Internal,
} as const satisfies Record<string, Code>;

/** A reason the contract names. */
export type Reason = keyof typeof REASON_CODES;

/** One malformed request field (google.rpc.BadRequest). */
export interface FieldViolation {
  readonly field: string;
  readonly description: string;
}

/** One unmet precondition (google.rpc.PreconditionFailure). */
export interface PreconditionViolation {
  readonly type: string;
  readonly subject: string;
  readonly description: string;
}

/**
 * A failed call. `reason` and `metadata` come from the ErrorInfo (`""` and `{}` when the error
 * carries none, e.g. a deadline or a refused connection); `cause` is the ConnectError itself.
 */
export class CreditsError extends Error {
  override readonly name = "CreditsError";
  /** The status code (Connect's `Code`, the same numbers as gRPC's). */
  readonly code: Code;
  /** The ErrorInfo reason, e.g. `"INSUFFICIENT_CREDITS"`. */
  readonly reason: Reason | (string & {});
  /** The ErrorInfo domain: `credits.v1` for the service's own reasons. */
  readonly domain: string;
  /**
   * The ErrorInfo metadata, all strings: `required`, `available` (and `scope`, for scoped
   * spending) for INSUFFICIENT_CREDITS, `state` for HOLD_NOT_PENDING and GRANT_NOT_ACTIVE,
   * `period`, `limit`, `spent` and `reset_time` for SPEND_LIMIT_EXCEEDED, `limit` and `active`
   * for TOO_MANY_ACTIVE_GENERATIONS.
   */
  readonly metadata: Readonly<Record<string, string>>;
  /** How long the service asks the caller to wait before retrying (RetryInfo), when it says. */
  readonly retryDelayMs: number | undefined;
  readonly fieldViolations: readonly FieldViolation[];
  readonly preconditionViolations: readonly PreconditionViolation[];
  /** The `x-request-id` the server answered with, to find the call in its logs. */
  readonly requestId: string | undefined;
  /** The status message without the code prefix; meant for people. */
  readonly rawMessage: string;
  override readonly cause: ConnectError;

  constructor(error: ConnectError) {
    super(error.message);
    this.cause = error;
    this.code = error.code;
    this.rawMessage = error.rawMessage;
    const info = error.findDetails(ErrorInfoSchema)[0];
    this.reason = info?.reason ?? "";
    this.domain = info?.domain ?? "";
    this.metadata = Object.freeze({ ...(info?.metadata ?? {}) });
    const delay = error.findDetails(RetryInfoSchema)[0]?.retryDelay;
    this.retryDelayMs =
      delay === undefined ? undefined : Number(delay.seconds) * 1000 + delay.nanos / 1e6;
    this.fieldViolations = error
      .findDetails(BadRequestSchema)
      .flatMap((d) => d.fieldViolations)
      .map(({ field, description }) => ({ field, description }));
    this.preconditionViolations = error
      .findDetails(PreconditionFailureSchema)
      .flatMap((d) => d.violations)
      .map(({ type, subject, description }) => ({ type, subject, description }));
    this.requestId = error.metadata.get("x-request-id") ?? undefined;
  }

  /** Any thrown value as a CreditsError (a CreditsError stays as it is). */
  static from(reason: unknown): CreditsError {
    return reason instanceof CreditsError ? reason : new CreditsError(ConnectError.from(reason));
  }
}

/**
 * Whether `err` is a CreditsError, and (with `reason`) one of that ErrorInfo reason:
 * `if (isCreditsError(err, "INSUFFICIENT_CREDITS")) err.metadata.available`.
 */
export function isCreditsError(err: unknown, reason?: Reason | (string & {})): err is CreditsError {
  return err instanceof CreditsError && (reason === undefined || err.reason === reason);
}
