"""Queue groups over durable streams: docs/queues.md."""
