"""The review page: people label the inputs the gate rejected, stored with their outbox items, and
export them to Label Studio. See docs/fallback.md."""
