"""Auto top-up: a webhook receiver that tops a user's balance up when it runs low.

`credits` POSTs a `balance.low` event when a user's available credits fall below one of their
thresholds. This receiver verifies the delivery's signature with the `standardwebhooks`
library, and answers `balance.low` by granting a top-up whose idempotency key is the event's
id: a webhook delivered twice (as at-least-once delivery allows) tops up once. A real app
would charge the card on file first.

From the repository root, with `make run` going:

    .venv/bin/credits webhooks add http://127.0.0.1:8090/ --events balance.low
    # note the secret it prints, then:
    .venv/bin/python examples/auto_topup.py --secret whsec_... \\
        --service-token "$(.venv/bin/credits token --service)" --amount 500

and give users thresholds (SetBalanceAlerts, or CREDITS_LOW_BALANCE_THRESHOLDS for all).
"""

from __future__ import annotations

import argparse
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

try:
    from credits_client import CreditsClient
    from standardwebhooks.webhooks import Webhook, WebhookVerificationError
except ImportError:
    sys.exit(
        f"the credits client is not installed for {sys.executable}: run this with "
        "`.venv/bin/python` from the repository root (`make run` installs it there)"
    )


class TopUp:
    """What to do with one verified event."""

    def __init__(self, client: CreditsClient, amount: int) -> None:
        self._client = client
        self._amount = amount

    def handle(self, event: dict[str, Any]) -> None:
        if event["type"] != "balance.low":
            return
        answer = self._client.grant_credits(
            user_id=event["user_id"],
            amount=self._amount,
            # The event's id: a second delivery of the same event is a replay, not a top-up.
            idempotency_key=f"topup-{event['id']}",
            description=f"auto top-up (available fell below {event['data']['threshold']})",
        )
        print(
            f"topped up {event['user_id']} by {self._amount} (replayed: {answer.replayed}); "
            f"balance {answer.balance}",
            flush=True,
        )


def make_server(host: str, port: int, secret: str, top_up: TopUp) -> ThreadingHTTPServer:
    """The receiver on host:port (port 0: any free one)."""
    webhook = Webhook(secret)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            try:
                event = webhook.verify(body, dict(self.headers.items()))
            except WebhookVerificationError:
                self.send_response(401)  # not from credits: never acted on
                self.end_headers()
                return
            try:
                top_up.handle(event)
            except Exception as error:  # the delivery is retried later
                print(f"top-up failed: {error}", file=sys.stderr, flush=True)
                self.send_response(500)
                self.end_headers()
                return
            self.send_response(204)
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return ThreadingHTTPServer((host, port), Handler)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", default="127.0.0.1:8090", help="host:port to receive on")
    parser.add_argument("--secret", required=True, help="the endpoint's whsec_ secret")
    parser.add_argument("--target", default="127.0.0.1:50051", help="the credits server")
    parser.add_argument("--service-token", required=True, help="a service token")
    parser.add_argument("--amount", type=int, default=500, help="credits per top-up")
    args = parser.parse_args()
    host, port = args.listen.rsplit(":", 1)
    with CreditsClient(args.target, credentials=args.service_token) as client:
        server = make_server(host, int(port), args.secret, TopUp(client, args.amount))
        print(f"receiving on {args.listen}", flush=True)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            thread.join()
        except KeyboardInterrupt:
            server.shutdown()


if __name__ == "__main__":
    main()
