"""The latency harness: felix beside Redis, NATS and RabbitMQ on this machine.

Run it with ``python -m perf`` (see perf/README.md). Modules:

- ``stats``: exact percentiles of raw samples (numpy), spread over repetitions;
- ``cpu``: CPU time of processes from /proc (felix node, peers' servers, this client);
- ``floor``: UDP/TCP/QUIC echo servers and clients, what this machine allows;
- ``node``: a `felix up` process tree on ephemeral ports;
- ``systems``: one adapter per system (felix, redis, nats, rabbitmq) behind a common
  async interface;
- ``workloads``: the closed-loop, open-loop and max-rate drivers, shared by all systems;
- ``report``: JSON, Markdown and PNG plots;
- ``cli``: the command line, modes and the interleaved schedule.
"""
