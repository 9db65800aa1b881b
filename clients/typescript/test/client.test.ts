/**
 * What needs no server: the reasons agree with the contract's error table, and the retry of
 * UNAVAILABLE keeps the idempotency key, over an in-memory fake of CreditService (a database
 * outage at a chosen call cannot be made on demand in the real server).
 */
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { describe, it } from "node:test";
import { create } from "@bufbuild/protobuf";
import { durationFromMs } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, createRouterTransport } from "@connectrpc/connect";
import type { ConnectRouter } from "@connectrpc/connect";
import {
  CreditService,
  DebitCreditsResponseSchema,
  ErrorInfoSchema,
  REASON_CODES,
  ReleaseCreditsResponseSchema,
  RetryInfoSchema,
  createCreditsClient,
  isCreditsError,
} from "credits-client";
import type { CreditsClientOptions } from "credits-client";
import { repoRoot } from "./server.js";

/** (code, reason) of every row of the contract's "## Errors" table, codes as gRPC spells them. */
function contractErrors(): [string, string][] {
  const text = readFileSync(join(repoRoot(), "docs", "api-contract.md"), "utf8");
  const section = text.split("## Errors")[1]?.split("\n## ")[0] ?? "";
  const pairs: [string, string][] = [];
  for (const line of section.split("\n")) {
    const cells = line.trim().replace(/^\||\|$/g, "").split("|").map((c) => c.trim());
    const [, code, reasons] = cells;
    if (code === undefined || reasons === undefined || code === "code" || /^-*$/.test(code)) {
      continue;
    }
    for (const reason of reasons.replace(/\(.*?\)/g, "").match(/[A-Z][A-Z_]+/g) ?? []) {
      pairs.push([code, reason]);
    }
  }
  return pairs;
}

/** Connect's name of a code (FailedPrecondition) as gRPC spells it (FAILED_PRECONDITION). */
function grpcName(code: Code): string {
  return Code[code].replace(/([a-z])([A-Z])/g, "$1_$2").toUpperCase();
}

describe("reasons", () => {
  it("are exactly the contract's, each with its code", () => {
    const ours = Object.entries(REASON_CODES).map(([reason, code]) => [grpcName(code), reason]);
    const theirs = contractErrors();
    assert.ok(theirs.length >= 20, "the contract's error table parses");
    assert.deepEqual(ours.sort(), theirs.sort());
  });
});

/** A fake CreditService whose DebitCredits is UNAVAILABLE (with RetryInfo) `outages` times. */
function flakyService(outages: number) {
  const seen = { keys: [] as string[], tokens: [] as string[], releases: 0 };
  const unavailable = () =>
    new ConnectError("database unreachable", Code.Unavailable, undefined, [
      { desc: ErrorInfoSchema, value: { reason: "BACKEND_UNAVAILABLE", domain: "credits.v1" } },
      { desc: RetryInfoSchema, value: { retryDelay: durationFromMs(10) } },
    ]);
  const routes = (router: ConnectRouter) =>
    router.service(CreditService, {
      debitCredits(req, context) {
        seen.keys.push(req.idempotencyKey);
        seen.tokens.push(context.requestHeader.get("authorization") ?? "");
        if (seen.keys.length <= outages) {
          throw unavailable();
        }
        return create(DebitCreditsResponseSchema, { balance: 1n });
      },
      releaseCredits() {
        seen.releases++;
        if (seen.releases <= outages) {
          throw unavailable();
        }
        return create(ReleaseCreditsResponseSchema, {});
      },
    });
  return { seen, routes };
}

function fakeClient(routes: (router: ConnectRouter) => void, options: Partial<CreditsClientOptions>) {
  let calls = 0;
  const client = createCreditsClient({
    baseUrl: "https://in-memory",
    getToken: () => `token-${++calls}`,
    transport: (settings) => ({
      transport: createRouterTransport(routes, {
        transport: { interceptors: settings.interceptors },
      }),
      close: () => {},
    }),
    ...options,
  } as CreditsClientOptions);
  return client;
}

describe("retries", () => {
  it("send UNAVAILABLE again with the same made-up key and a fresh token", async () => {
    const { seen, routes } = flakyService(2);
    const client = fakeClient(routes, {});
    const response = await client.credits.debitCredits({ userId: "u", amount: 1n });
    assert.equal(response.balance, 1n);
    assert.equal(seen.keys.length, 3);
    assert.match(seen.keys[0] ?? "", /^[0-9a-f-]{36}$/);
    assert.deepEqual(new Set(seen.keys).size, 1, "one key across the attempts");
    assert.deepEqual(seen.tokens, ["Bearer token-1", "Bearer token-2", "Bearer token-3"]);
  });

  it("give up after maxAttempts with the last error, decoded", async () => {
    const { seen, routes } = flakyService(5);
    const client = fakeClient(routes, { retry: { maxAttempts: 2 } });
    let error: unknown;
    await client.credits.debitCredits({ amount: 1n, idempotencyKey: "mine" }).catch((e) => {
      error = e;
    });
    assert.ok(isCreditsError(error, "BACKEND_UNAVAILABLE"), String(error));
    assert.equal(error.retryDelayMs, 10);
    assert.deepEqual(seen.keys, ["mine", "mine"]);
  });

  it("never repeat ReleaseCredits, which has no key", async () => {
    const { seen, routes } = flakyService(1);
    const client = fakeClient(routes, {});
    let error: unknown;
    await client.credits.releaseCredits({ holdId: "h" }).catch((e) => {
      error = e;
    });
    assert.ok(isCreditsError(error, "BACKEND_UNAVAILABLE"), String(error));
    assert.equal(seen.releases, 1);
  });
});

describe("createCreditsClient", () => {
  it("refuses options without a token", () => {
    assert.throws(
      () => createCreditsClient({ baseUrl: "http://localhost" } as CreditsClientOptions),
      TypeError,
    );
  });
});
