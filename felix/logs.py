"""Log output of every felix process: text or JSON lines, a level per component, and
credentials kept out.

``felix up`` and ``felix control`` take ``--log-format text|json``, ``--log-level
LEVEL`` and ``--log-levels COMPONENT=LEVEL,...`` (a component is a logger name such
as ``felix.gateway``, ``felix.shard``, ``felix.control``, ``felix.supervisor``). The
choices travel to child processes in ``$FELIX_LOG_FORMAT``, ``$FELIX_LOG_LEVEL`` and
``$FELIX_LOG_LEVELS``, which also set them when no flag is given.

felix never logs payloads (record bodies, cache values) nor headers; as a second
line of defence every line is formatted by :class:`TextFormatter` or
:class:`JsonFormatter`, which replace anything shaped
like a JWT or a bearer credential by ``[redacted]`` (an exception's text included).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Mapping

from felix.errors import ConfigError

__all__ = ["FORMATS", "JsonFormatter", "TextFormatter", "configure", "parse_levels", "redact"]

FORMATS = ("text", "json")
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR, "critical": logging.CRITICAL}  # fmt: skip
_COMPONENT = re.compile(r"[A-Za-z_][\w.]{0,127}")
#: Three base64url parts (a JWT/JWS), or a credential after "Bearer".
_SECRET = re.compile(
    r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*|(?i:bearer)\s+[A-Za-z0-9._~+/=-]{8,}"
)


def parse_level(text: str, what: str = "--log-level") -> int:
    level = _LEVELS.get(text.strip().lower())
    if level is None:
        raise ConfigError(f"{what}: unknown level {text!r} (one of {', '.join(_LEVELS)})")
    return level


def parse_levels(text: str) -> dict[str, int]:
    """``felix.gateway=debug,felix.shard=warning`` -> {logger name: level}."""
    levels: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, level = item.partition("=")
        if not sep or not _COMPONENT.fullmatch(name.strip()):
            raise ConfigError(f"--log-levels: expected COMPONENT=LEVEL, got {item!r}")
        levels[name.strip()] = parse_level(level, f"--log-levels {name.strip()}")
    return levels


def redact(text: str) -> str:
    """``text`` with anything shaped like a JWT or a bearer credential replaced."""
    return _SECRET.sub("[redacted]", text)


class TextFormatter(logging.Formatter):
    """The text line, credentials redacted (message and exception text alike).

    Redaction happens here, on the formatted line, and never changes the record:
    other handlers (a test's log capture) see it as it was logged."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (UTC, ms), level, logger, process, msg[, exc];
    credentials redacted."""

    def __init__(self, process: str) -> None:
        super().__init__()
        self._process = process

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "process": self._process,
            "msg": redact(record.getMessage()),
        }
        if record.exc_info:
            line["exc"] = redact(self.formatException(record.exc_info))
        elif record.exc_text:
            line["exc"] = redact(record.exc_text)
        return json.dumps(line, ensure_ascii=False)


def configure(
    process: str,
    *,
    log_format: str | None = None,
    level: str | None = None,
    levels: str | None = None,
    verbose: bool = False,
    export: bool = False,
    environ: Mapping[str, str] = os.environ,
) -> None:
    """Set up the root logger of this process (``process``: ``supervisor``,
        ``gateway-0``, ...). Arguments left None come from the environment; the chosen
        values are written to ``os.environ`` with ``export`` (a node: its child
    processes inherit them).

        Raises ConfigError for an unknown format, level or component spec.
    """
    log_format = log_format or environ.get("FELIX_LOG_FORMAT") or "text"
    if log_format not in FORMATS:
        raise ConfigError(f"--log-format: expected one of {', '.join(FORMATS)}, got {log_format!r}")
    level_text = level or environ.get("FELIX_LOG_LEVEL") or ("debug" if verbose else "info")
    root_level = parse_level(level_text)
    levels_text = levels if levels is not None else environ.get("FELIX_LOG_LEVELS", "")
    per_component = parse_levels(levels_text)

    root = logging.getLogger()
    if not export and root.handlers:
        # A command run inside a program that set up logging (a test, an embedding
        # application): leave its handlers alone, as logging.basicConfig would.
        return
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter(process))
    else:
        handler.setFormatter(
            TextFormatter(f"%(asctime)s {process} %(name)s %(levelname)s %(message)s")
        )
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(root_level)
    logging.getLogger("quic").setLevel(logging.ERROR)  # qh3 logs every normal close
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    for name, component_level in per_component.items():
        logging.getLogger(name).setLevel(component_level)
    if export:
        os.environ["FELIX_LOG_FORMAT"] = log_format
        os.environ["FELIX_LOG_LEVEL"] = level_text
        os.environ["FELIX_LOG_LEVELS"] = levels_text
