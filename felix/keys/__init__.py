"""Encryption at rest: the region key-encryption key and per-tenant data keys.

felix/keys/kek.py is the KMS interface (:class:`KeyEncryptionKey`) and its file
provider; felix/keys/store.py keeps each tenant's data keys wrapped by the region key
beside the data (``DATA_DIR/keys``). What is encrypted with them, and how, is part of
the formats in docs/log-format.md (records: felix/shard/log_format.py; group state
files: felix/shard/queue/group_log.py). docs/operations.md, "Encryption at rest", is
how to run it.
"""

from felix.keys.kek import (
    REGION_KEY_ENV,
    FileKeyEncryptionKey,
    KeyEncryptionKey,
    generate_key_file,
)
from felix.keys.store import KeyStore, resolve_region_key

__all__ = [
    "REGION_KEY_ENV",
    "FileKeyEncryptionKey",
    "KeyEncryptionKey",
    "KeyStore",
    "generate_key_file",
    "resolve_region_key",
]
