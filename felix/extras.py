"""The optional parts of the felix distribution, and a clear error when one is missing.

``pip install felix`` is the client; running a node or a control plane needs
``felix[server]``, the PostgreSQL store ``felix[postgres]``, the latency harness
``felix[perf]`` (pyproject.toml lists each extra's distributions; a test keeps
:data:`EXTRAS` in step with it). Commands that need an extra check for it
before doing anything, so a client-only install answers with what to install
instead of an ImportError from deep inside.
"""

from __future__ import annotations

import importlib.util

from felix.errors import ConfigError

__all__ = ["EXTRAS", "missing_modules", "require_extra"]

#: The top-level modules each extra installs (import names, not distribution names).
EXTRAS: dict[str, tuple[str, ...]] = {
    "server": (
        "aioquic",
        "aiosqlite",
        "fastapi",
        "posix_ipc",
        "prometheus_client",
        "setproctitle",
        "uvicorn",
        "uvloop",
    ),
    "postgres": ("asyncpg",),
    "perf": ("matplotlib", "numpy", "nats", "aio_pika"),
}


def missing_modules(extra: str) -> list[str]:
    """The modules of ``extra`` that cannot be imported here (empty: it is installed)."""
    return [name for name in EXTRAS[extra] if importlib.util.find_spec(name) is None]


def require_extra(extra: str, what: str) -> None:
    """Raise ConfigError naming ``pip install 'felix[extra]'`` if ``extra`` is not installed.

    ``what`` says what needs it (``"felix up"``), for the message.
    """
    missing = missing_modules(extra)
    if missing:
        raise ConfigError(
            f"{what} needs the felix[{extra}] extra, which is not installed (missing: "
            f"{', '.join(missing)}): pip install 'felix[{extra}]'"
        )
