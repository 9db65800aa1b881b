"""`credits export`: the ledger, with allocations, as CSV or JSON Lines, written batch by batch
as the database hands it over (never the whole ledger in memory)."""

from __future__ import annotations

import csv
import json
from collections.abc import AsyncIterator
from typing import Any, TextIO

from server.credit.models import Transaction

FORMATS = ("csv", "jsonl")
COLUMNS = (
    "transaction_id",
    "user_id",
    "kind",
    "amount",
    "balance_after",
    "create_time",
    "idempotency_key",
    "description",
    "metadata",
    "scope",
    "refunded_transaction_id",
    "hold_id",
    "allocations",
)


def record(entry: Transaction) -> dict[str, Any]:
    """One entry as an export row: times in RFC 3339 (UTC), ids as text, allocations as a list
    of {grant_id, amount} in the order drawn."""
    return {
        "transaction_id": str(entry.transaction_id),
        "user_id": str(entry.user_id),
        "kind": entry.kind.value,
        "amount": entry.amount,
        "balance_after": entry.balance_after,
        "create_time": entry.create_time.isoformat(),
        "idempotency_key": entry.idempotency_key,
        "description": entry.description,
        "metadata": dict(entry.metadata),
        "scope": entry.scope,
        "refunded_transaction_id": str(entry.refunded_transaction_id or ""),
        "hold_id": str(entry.hold_id or ""),
        "allocations": [
            {"grant_id": str(part.grant_id), "amount": part.amount} for part in entry.allocations
        ],
    }


async def write(batches: AsyncIterator[list[Transaction]], out: TextIO, fmt: str) -> int:
    """Writes every entry of `batches` to `out` in `fmt` (CSV with a header row, metadata and
    allocations as JSON in their cells; or one JSON object per line); returns how many."""
    written = 0
    writer = csv.DictWriter(out, fieldnames=COLUMNS) if fmt == "csv" else None
    if writer is not None:
        writer.writeheader()
    async for batch in batches:
        for entry in batch:
            row = record(entry)
            if writer is not None:
                row["metadata"] = json.dumps(row["metadata"], sort_keys=True)
                row["allocations"] = json.dumps(row["allocations"])
                writer.writerow(row)
            else:
                out.write(json.dumps(row) + "\n")
        written += len(batch)
        out.flush()
    return written
