"""Same-host clients over shared memory: felix's transport seam on two memfd rings.

A client on the node's host connects to the node's Unix socket (``felix up
--shm-socket``), and receives, over SCM_RIGHTS, two rings in sealed memfds and
their eventfd doorbells (felix/shm/handshake.py); from then on every byte goes
through the rings (felix/shm/framing.py, felix/shm/transport.py), with no UDP,
QUIC or TLS. The gateway serves such a connection with the same session,
permission checks and limits as a QUIC one (felix/shm/server.py); the client
opens one with ``felix.connect("felix+shm:///path/to/felix.sock")``
(felix/shm/client.py). Only the client side's modules are imported by the client.
"""
