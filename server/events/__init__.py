"""Events: the outbox's reading side, low-balance thresholds, the balance watch and webhook
delivery (docs/events.md)."""
