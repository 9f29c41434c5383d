"""``python -m perf queue``: durable work queues end to end, felix beside RabbitMQ and JetStream.

See perf/README.md ("Queues") and ``python -m perf queue --help``.
"""
