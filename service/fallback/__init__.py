"""Fallback delivery: every ``unknown`` answer is written to a durable outbox before the response is
sent, and a delivery thread POSTs it to the fallback (a specialist's queue, a bigger model) with retries,
an idempotency key per item and a dead-letter state. See docs/fallback.md."""
