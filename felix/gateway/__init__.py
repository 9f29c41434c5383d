"""QUIC gateways: terminate QUIC/TLS, decode frames, route requests to shards."""
