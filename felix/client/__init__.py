"""The Python client: pooled QUIC connections to a felix node."""
