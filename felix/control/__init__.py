"""The control plane: REST API for tenants, namespaces, streams and caches."""
