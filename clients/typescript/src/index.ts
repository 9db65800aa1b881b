/**
 * credits-client: the TypeScript client of the credits service (CreditService and
 * GenerationService), over Connect (fetch) or gRPC (Node).
 */
export { createCreditsClient } from "./client.js";
export type { CreditsClient, CreditsClientOptions, TransportChoice } from "./client.js";
export { CreditsError, DOMAIN, REASON_CODES, isCreditsError } from "./errors.js";
export type { FieldViolation, PreconditionViolation, Reason } from "./errors.js";
export type { RetryOptions, TokenSource } from "./interceptors.js";
export type { ClosableTransport, TransportSettings } from "./transports.js";
export { Code } from "@connectrpc/connect";
// The google.rpc error details the service sends, for fakes and tests of your own.
export {
  BadRequestSchema,
  ErrorInfoSchema,
  PreconditionFailureSchema,
  RetryInfoSchema,
} from "./gen/google/rpc/error_details_pb.js";
export type {
  BadRequest,
  ErrorInfo,
  PreconditionFailure,
  RetryInfo,
} from "./gen/google/rpc/error_details_pb.js";
export * from "./gen/credits/v1/credit_service_pb.js";
export * from "./gen/credits/v1/generation_service_pb.js";
export * from "./gen/credits/v1/generation_pb.js";
export * from "./gen/credits/v1/ledger_pb.js";
