// A Supabase Edge Function (Deno) that answers the signed-in user's credit balance, calling the
// credits service over Connect (plain fetch: Edge Functions cannot open gRPC connections) with
// the user's own access token.
//
//   supabase functions new balance        # then put this file in supabase/functions/balance/index.ts
//   supabase secrets set CREDITS_URL=https://credits.example.com   # the server's Connect edge
//   supabase functions deploy balance
//
// From the app: `await supabase.functions.invoke("balance")` sends the user's token for you.
import { createCreditsClient, isCreditsError } from "npm:credits-client";

const baseUrl = Deno.env.get("CREDITS_URL") ?? "http://127.0.0.1:8080";

const cors = {
  "access-control-allow-origin": "*",
  "access-control-allow-headers": "authorization, x-client-info, apikey, content-type",
};

function json(body: unknown, status = 200): Response {
  return new Response(JSON.stringify(body), {
    status,
    headers: { ...cors, "content-type": "application/json" },
  });
}

Deno.serve(async (req: Request) => {
  if (req.method === "OPTIONS") {
    return new Response("ok", { headers: cors });
  }
  const token = (req.headers.get("authorization") ?? "").replace(/^Bearer\s+/i, "");
  if (!token) {
    return json({ error: "sign in first" }, 401);
  }
  const client = createCreditsClient({ baseUrl, token, transport: "connect" });
  try {
    const { balance, held, available } = await client.credits.getBalance({});
    // int64 fields are bigints, which JSON.stringify refuses: send them as strings.
    return json({ balance: `${balance}`, held: `${held}`, available: `${available}` });
  } catch (err) {
    if (isCreditsError(err, "TOKEN_EXPIRED") || isCreditsError(err, "TOKEN_INVALID")) {
      return json({ error: err.reason }, 401);
    }
    if (isCreditsError(err) && err.retryDelayMs !== undefined) {
      return json({ error: err.reason, retryAfterMs: err.retryDelayMs }, 503);
    }
    throw err;
  }
});
