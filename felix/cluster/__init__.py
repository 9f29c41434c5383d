"""Several nodes that agree through PostgreSQL (issue #16; docs/architecture.md, "Cluster").

- :mod:`felix.cluster.ownership`: the shard map a node's gateways check every request
  against (sans-IO, shared by the agent, the gateways and ``felix cluster status``).
- :mod:`felix.cluster.placement`: logical shards, rendezvous hashing and the placer's plan
  (pure functions).
- :mod:`felix.cluster.lease`: when to renew and until when the node may serve (sans-IO).
- :mod:`felix.cluster.store`: the tables in PostgreSQL (asyncpg).
- :mod:`felix.cluster.agent`: the supervisor's loop that ties them together.
"""
