/**
 * The client against a real `credits serve` (embedded PostgreSQL, default model catalogue):
 * grant, debit, replay, overdraft, reserve and capture, a generation watched to SUCCEEDED, and
 * the typed errors, once per transport of TRANSPORTS.
 */
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { randomUUID } from "node:crypto";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { after, before, describe, it } from "node:test";
import {
  Code,
  CreditsError,
  GenerationState,
  HoldState,
  TransactionKind,
  createCreditsClient,
  isCreditsError,
} from "credits-client";
import type { CreditsClient } from "credits-client";
import { startServe, waitReady } from "./server.js";
import type { ServeProcess } from "./server.js";
import { TRANSPORTS } from "./transports.js";

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

let server: ServeProcess;
let serviceToken: string;

before(async () => {
  server = await startServe();
  serviceToken = await server.token("--service");
});

after(async () => {
  await server?.stop();
});

/** The rejection of `call`, which must fail. */
async function failure(call: Promise<unknown>): Promise<unknown> {
  try {
    await call;
  } catch (err) {
    return err;
  }
  assert.fail("the call succeeded");
}

for (const { transport, baseUrl } of TRANSPORTS) {
  describe(`over ${transport}`, () => {
    const clients: CreditsClient[] = [];
    const userId = randomUUID();
    let service: CreditsClient;
    let user: CreditsClient;
    let tokensAsked = 0;

    before(async () => {
      const url = baseUrl(server);
      service = createCreditsClient({ baseUrl: url, token: serviceToken, transport });
      clients.push(service);
      await waitReady(server, () => service.generations.listModels({}));
      const userToken = await server.token("--user", userId);
      user = createCreditsClient({
        baseUrl: url,
        transport,
        getToken: async () => {
          tokensAsked++;
          return userToken;
        },
      });
      clients.push(user);
      // The user's first call makes their profile; a service cannot grant to a stranger.
      assert.equal((await user.credits.getBalance({})).balance, 0n);
    });

    after(() => {
      for (const client of clients) {
        client.close();
      }
    });

    it("grants as a service, debits as the user, and replays a key", async () => {
      const grant = await service.credits.grantCredits({ userId, amount: 100n });
      assert.equal(grant.balance, 100n);
      assert.equal(grant.replayed, false);
      assert.equal(grant.transaction?.kind, TransactionKind.GRANT);
      assert.match(grant.transaction?.idempotencyKey ?? "", UUID, "the client made the key");

      const key = `order-${randomUUID()}`;
      const debit = await user.credits.debitCredits({ amount: 30n, idempotencyKey: key });
      assert.equal(debit.balance, 70n);
      assert.equal(debit.replayed, false);
      assert.equal(debit.transaction?.idempotencyKey, key);

      const again = await user.credits.debitCredits({ amount: 30n, idempotencyKey: key });
      assert.equal(again.replayed, true);
      assert.equal(again.transaction?.transactionId, debit.transaction?.transactionId);
      assert.equal((await user.credits.getBalance({})).balance, 70n);
    });

    it("asks getToken before every call", async () => {
      const asked = tokensAsked;
      await user.credits.getBalance({});
      await user.credits.getBalance({});
      assert.equal(tokensAsked, asked + 2);
    });

    it("refuses an overdraft as INSUFFICIENT_CREDITS with required and available", async () => {
      const err = await failure(user.credits.debitCredits({ amount: 1000n }));
      assert.ok(isCreditsError(err, "INSUFFICIENT_CREDITS"), String(err));
      assert.ok(err instanceof CreditsError);
      assert.equal(err.code, Code.FailedPrecondition);
      assert.equal(err.domain, "credits.v1");
      assert.equal(err.metadata["required"], "1000");
      assert.equal(err.metadata["available"], "70");
      assert.deepEqual(
        err.preconditionViolations.map((v) => v.subject),
        ["available"],
      );
      assert.equal(isCreditsError(err, "HOLD_NOT_PENDING"), false);
      assert.match(err.requestId ?? "", /.+/, "the server's x-request-id");
    });

    it("reserves and captures part of a hold", async () => {
      const reserve = await user.credits.reserveCredits({ amount: 20n });
      assert.equal(reserve.available, 50n);
      assert.equal(reserve.hold?.state, HoldState.PENDING);
      assert.match(reserve.hold?.idempotencyKey ?? "", UUID);

      const capture = await user.credits.captureCredits({
        holdId: reserve.hold?.holdId ?? "",
        amount: 15n,
      });
      assert.equal(capture.transaction?.kind, TransactionKind.CAPTURE);
      assert.equal(capture.transaction?.amount, 15n);
      assert.equal(capture.hold?.state, HoldState.CAPTURED);
      assert.equal(capture.balance, 55n);
      const balance = await user.credits.getBalance({});
      assert.deepEqual([balance.balance, balance.held, balance.available], [55n, 0n, 55n]);
    });

    it("creates a generation and watches it to SUCCEEDED, charged once", async () => {
      const { models } = await user.generations.listModels({});
      const model = models.find((m) => m.model === "demo-image");
      assert.ok(model, "the default catalogue offers demo-image");

      const created = await user.generations.createGeneration({
        model: model.model,
        prompt: "a lighthouse at dusk",
      });
      const generation = created.generation;
      assert.ok(generation);
      assert.match(generation.generationId, UUID);
      assert.equal((await user.credits.getBalance({})).held, model.cost);

      const states: GenerationState[] = [];
      let last = generation;
      for await (const update of user.generations.watchGeneration(
        { generationId: generation.generationId },
        { timeoutMs: 20_000 },
      )) {
        assert.ok(update.generation);
        states.push(update.generation.state);
        last = update.generation;
      }
      assert.equal(last.state, GenerationState.SUCCEEDED, `states seen: ${states.join(", ")}`);
      assert.equal(last.outputMimeType, "image/png");
      assert.ok(last.output.length > 0);
      assert.notEqual(last.transactionId, "");
      const balance = await user.credits.getBalance({});
      assert.deepEqual([balance.balance, balance.held], [55n - model.cost, 0n]);
    });

    it("maps a bad argument and a service-only call to their reasons", async () => {
      const invalid = await failure(user.credits.debitCredits({ amount: 0n }));
      assert.ok(isCreditsError(invalid, "INVALID_ARGUMENT"), String(invalid));
      assert.equal(invalid.code, Code.InvalidArgument);
      assert.ok(invalid.fieldViolations.some((v) => v.field === "amount"));

      const denied = await failure(user.credits.grantCredits({ userId, amount: 5n }));
      assert.ok(isCreditsError(denied, "PERMISSION_DENIED"), String(denied));

      const missing = await failure(
        user.generations.getGeneration({ generationId: randomUUID() }),
      );
      assert.ok(isCreditsError(missing, "GENERATION_NOT_FOUND"), String(missing));
    });

    it("ends a watch of an unknown generation with a CreditsError", async () => {
      const stream = user.generations.watchGeneration({ generationId: randomUUID() });
      const err = await failure(
        (async () => {
          for await (const _ of stream) {
            // no message is expected
          }
        })(),
      );
      assert.ok(isCreditsError(err, "GENERATION_NOT_FOUND"), String(err));
    });
  });
}

describe("examples/node_client.ts", () => {
  it("runs against the server over gRPC", async () => {
    const userId = randomUUID();
    const script = fileURLToPath(new URL("./examples/node_client.js", import.meta.url));
    const { stdout } = await promisify(execFile)(process.execPath, [script], {
      env: {
        ...process.env,
        CREDITS_URL: server.grpcUrl,
        CREDITS_SERVICE_TOKEN: serviceToken,
        CREDITS_USER_TOKEN: await server.token("--user", userId),
        USER_ID: userId,
      },
      timeout: 30_000,
    });
    assert.match(stdout, /granted 50, balance 50 \(replayed: false\)/);
    assert.match(stdout, /: SUCCEEDED\noutput: \d+ bytes of image\/png/);
    assert.match(stdout, /refused: needs 1000000, has 45/);
  });
});
