"""``python -m perf durable``: durable publish and replay, felix beside JetStream and RabbitMQ.

Modules:

- ``base``: the interface every durable system implements (a publisher that waits
  for the broker's ack, a replay source that is filled once and read from earliest);
- ``felix``: felix nodes, one per fsync policy (``commit``, ``interval``, ``none``)
  plus an in-memory node as the baseline, and the node's fsync metrics;
- ``peers``: NATS JetStream file storage (the running server, and a private server
  asked for ``sync_interval: always``) and a RabbitMQ durable quorum queue;
- ``disk``: what one ``fdatasync`` costs on this disk;
- ``report``: JSON, Markdown, the README section;
- ``cli``: the command line, modes and the interleaved schedule.
"""
