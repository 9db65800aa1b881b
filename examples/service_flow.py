"""A backend service charging a user in two phases with the credits client.

The service grants welcome credits, reserves the price of a job before starting it, captures
what the job really cost (the rest of the hold is released in the same step), and releases a
second reservation whole when that job is abandoned. Not having enough credits is handled by
catching a class, not by parsing messages.

From the repository root, with `make run` going (`make` installed the client into .venv):

    .venv/bin/python examples/service_flow.py --user <uuid> \
        --service-token "$(.venv/bin/credits token --service)"

The user must have called the service once (their first call creates their profile).
"""

from __future__ import annotations

import argparse
import sys
import uuid

try:
    from credits_client import CreditsClient, InsufficientCredits, ProfileNotFound
except ImportError:
    sys.exit(
        f"the credits client is not installed for {sys.executable}: run this with "
        "`.venv/bin/python` from the repository root (`make run` installs it there), or "
        "`pip install ./clients/python` into this Python"
    )


def run(client: CreditsClient, user_id: str) -> int:
    """The flow, printing what happens; returns the user's balance at the end."""
    # A fixed key per user: running the example twice grants the welcome credits once.
    granted = client.grant_credits(
        user_id=user_id, amount=100, idempotency_key=f"welcome-{user_id}", description="welcome"
    )
    print(f"granted 100 (replayed: {granted.replayed}); balance after it {granted.balance}")

    job = client.reserve_credits(user_id=user_id, amount=30, ttl=600, description="render job")
    print(f"reserved 30 in hold {job.hold.hold_id}; available {job.available}")
    charged = client.capture_credits(hold_id=job.hold.hold_id, amount=12)
    print(f"the job cost 12: charged {charged.transaction.amount}, balance {charged.balance}")

    abandoned = client.reserve_credits(user_id=user_id, amount=20, description="abandoned job")
    released = client.release_credits(hold_id=abandoned.hold.hold_id)
    print(f"released hold {released.hold.hold_id}; available {released.available}")

    try:
        client.reserve_credits(user_id=user_id, amount=1_000_000, description="too big")
    except InsufficientCredits as error:
        print(f"refused: {error.required} required, {error.available} available")

    return client.get_balance(user_id=user_id).balance


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--target", default="127.0.0.1:50051")
    parser.add_argument("--user", required=True, type=uuid.UUID, help="the user's id")
    parser.add_argument("--service-token", required=True, help="a service_role token or key")
    args = parser.parse_args()
    with CreditsClient(args.target, credentials=args.service_token) as client:
        try:
            balance = run(client, str(args.user))
        except ProfileNotFound:
            raise SystemExit("no such user yet: they must call the service once first") from None
    print(f"final balance {balance}")


if __name__ == "__main__":
    main()
