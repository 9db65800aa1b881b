// A Node backend using credits-client over gRPC: a payment webhook grants credits (service
// token), then a user's request pays for a generation and watches it finish (user token).
//
//   CREDITS_URL=http://127.0.0.1:50051 \
//   CREDITS_SERVICE_TOKEN=$(credits token --service) \
//   CREDITS_USER_TOKEN=$(credits token --user "$USER_ID") USER_ID=... \
//   node node_client.js          # compiled with tsc, in a project that installed credits-client
import { randomUUID } from "node:crypto";
import { GenerationState, createCreditsClient, isCreditsError } from "credits-client";

function required(name: string): string {
  const value = process.env[name];
  if (!value) {
    throw new Error(`set ${name}`);
  }
  return value;
}

const baseUrl = process.env["CREDITS_URL"] ?? "http://127.0.0.1:50051";
const userId = required("USER_ID");

// A trusted backend: the service token may act on any user, and must name the user_id.
const service = createCreditsClient({
  baseUrl,
  transport: "grpc",
  token: required("CREDITS_SERVICE_TOKEN"),
});
// On the user's behalf: their own Supabase access token (getToken is asked before each call,
// so a refreshed token is picked up).
const userToken = required("CREDITS_USER_TOKEN");
const user = createCreditsClient({ baseUrl, transport: "grpc", getToken: async () => userToken });

try {
  // The user's first call makes their profile (a service may only grant to known users).
  const before = await user.credits.getBalance({});
  console.log(`balance before: ${before.balance}`);

  // The payment's id as the key: a webhook delivered twice grants once.
  const paymentId = `payment-${randomUUID()}`;
  const grant = await service.credits.grantCredits({
    userId,
    amount: 50n,
    idempotencyKey: paymentId,
    description: "top-up",
  });
  console.log(`granted 50, balance ${grant.balance} (replayed: ${grant.replayed})`);

  // A paid generation: its cost is held now and charged only if it succeeds.
  const { generation } = await user.generations.createGeneration({
    model: "demo-image",
    prompt: "a lighthouse at dusk",
  });
  if (generation === undefined) {
    throw new Error("no generation in the response");
  }
  for await (const { generation: now } of user.generations.watchGeneration({
    generationId: generation.generationId,
  })) {
    console.log(`generation ${now?.generationId}: ${GenerationState[now?.state ?? 0]}`);
    if (now?.state === GenerationState.SUCCEEDED) {
      console.log(`output: ${now.output.length} bytes of ${now.outputMimeType}`);
    }
  }

  // More than the user has: a typed error, with the figures in its metadata.
  await user.credits.debitCredits({ amount: 1_000_000n });
} catch (err) {
  if (isCreditsError(err, "INSUFFICIENT_CREDITS")) {
    console.log(`refused: needs ${err.metadata["required"]}, has ${err.metadata["available"]}`);
  } else {
    throw err;
  }
} finally {
  service.close();
  user.close();
}
