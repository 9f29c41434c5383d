"""Which node a ``felix`` command talks to when its flags do not say.

Every client and control-plane command resolves each setting, first found wins:

1. its flag (``--url``, ``--ca``, ``--token``, ...);
2. its environment variable (``$FELIX_URL``, ``$FELIX_CONTROL_URL``, ...);
3. the selected context: ``--context NAME``, else ``$FELIX_CONTEXT``, else the one
   ``felix ctx use`` made current;
4. without a context, a local node's ``node.json``: in ``$FELIX_DATA_DIR``, else in
   ``./data`` (where ``felix up`` and ``make up`` put it);
5. the built-in default (``felix://127.0.0.1:5000``, ``http://127.0.0.1:8443``).

A node's ``node.json`` gives the QUIC address, the control plane's URL and the
node's CA; its data dir's ``admin-token`` (written by a node with ``--auth``) is
the control-plane credential. ``felix -v ...`` prints on stderr which source it
used.

Contexts (like the nats CLI's) live in ``$FELIX_CONFIG_DIR``, else
``$XDG_CONFIG_HOME/felix``, else ``~/.config/felix``: one JSON file per context in
``contexts/`` (mode 0600, the directory 0700) and the current one's name in
``context``. A context refers to secrets by file (``token_file``) and never holds
them.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from felix.errors import ConfigError
from felix.names import validate_name

__all__ = [
    "Context",
    "Defaults",
    "config_dir",
    "current_name",
    "list_contexts",
    "load_context",
    "node_defaults",
    "pick",
    "remove_context",
    "report",
    "resolve",
    "save_context",
    "url_from_address",
    "use_context",
]

#: Where ``felix up`` puts its data dir by default (relative to the working directory).
LOCAL_DATA_DIR = Path("data")
#: A context file larger than this is not one of ours.
_MAX_FILE_BYTES = 64 * 1024


@dataclass(frozen=True)
class Context:
    """A named set of defaults for the ``felix`` commands (``felix ctx add``)."""

    name: str
    #: The data plane: ``felix://HOST:PORT`` or ``felix+shm:///PATH``.
    url: str | None = None
    #: The control plane's REST API.
    control_url: str | None = None
    #: CA (PEM) for the data plane and an https control plane.
    ca: str | None = None
    #: File holding the data-plane token.
    token_file: str | None = None
    #: File holding the control-plane token (a Felix token or a node's admin token).
    control_token_file: str | None = None
    tenant: str | None = None
    namespace: str | None = None
    #: A local node's data dir: its node.json and admin-token fill what is not set.
    data_dir: str | None = None
    #: The node's health port (``felix status``, ``felix check``): ``http://HOST:PORT``.
    http: str | None = None


@dataclass(frozen=True)
class Defaults:
    """What the selected context or the discovered node.json says (None: nothing)."""

    url: str | None = None
    control_url: str | None = None
    ca: str | None = None
    token: str | None = None
    control_token: str | None = None
    tenant: str | None = None
    namespace: str | None = None
    http: str | None = None
    #: The admin token of the node whose health port ``http`` is (its per-tenant routes
    #: need it on a node with auth); set only when both come from that node's data dir.
    http_token: str | None = None
    #: Where these came from, for ``-v``: ``context prod``, ``data/node.json``, ...
    source: str = "built-in defaults"
    #: A warning worth printing (a node.json whose node is not running).
    warning: str | None = None


def config_dir() -> Path:
    """``$FELIX_CONFIG_DIR``, else ``$XDG_CONFIG_HOME/felix``, else ``~/.config/felix``."""
    explicit = os.environ.get("FELIX_CONFIG_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CONFIG_HOME")
    return (Path(xdg) if xdg else Path.home() / ".config") / "felix"


def _context_path(name: str) -> Path:
    validate_name("context", name)
    return config_dir() / "contexts" / f"{name}.json"


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, readable by its owner only (a fresh
    temporary name, created exclusively and never through a symlink)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    fd = os.open(tmp, flags, 0o600)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)


def _read_small(path: Path, what: str) -> str:
    try:
        with path.open("rb") as f:
            data = f.read(_MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if len(data) > _MAX_FILE_BYTES:
        raise ConfigError(f"{what} {path} is over {_MAX_FILE_BYTES} bytes")
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {path} is not UTF-8 text") from None


def save_context(context: Context) -> Path:
    """Write ``context`` (replacing one of the same name); its file paths made absolute."""
    validate_name("context", context.name)
    data = {k: v for k, v in asdict(context).items() if v is not None and k != "name"}
    for key in ("ca", "token_file", "control_token_file", "data_dir"):
        if key in data:
            data[key] = str(Path(data[key]).expanduser().absolute())
    path = _context_path(context.name)
    _write_private(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path


def load_context(name: str) -> Context:
    """The context ``name``; ConfigError when there is none or its file is bad."""
    path = _context_path(name)
    if not path.exists():
        known = ", ".join(list_contexts()) or "none"
        raise ConfigError(f"no context {name!r} (known: {known}; felix ctx add {name} ...)")
    try:
        data = json.loads(_read_small(path, "context file"))
    except ValueError as exc:
        raise ConfigError(f"context file {path} is not JSON: {exc}") from None
    allowed = {f.name for f in fields(Context)} - {"name"}
    if not isinstance(data, dict) or not set(data) <= allowed:
        raise ConfigError(f"context file {path}: expected an object with keys {sorted(allowed)}")
    if not all(isinstance(v, str) for v in data.values()):
        raise ConfigError(f"context file {path}: every value must be a string")
    return Context(name=name, **data)


def list_contexts() -> list[str]:
    """The names of the saved contexts, sorted."""
    directory = config_dir() / "contexts"
    try:
        names = [p.stem for p in directory.iterdir() if p.suffix == ".json"]
    except FileNotFoundError:
        return []
    return sorted(n for n in names if not n.startswith("."))


def remove_context(name: str) -> None:
    """Delete context ``name`` (and unselect it if it was current)."""
    path = _context_path(name)
    if not path.exists():
        raise ConfigError(f"no context {name!r}")
    path.unlink()
    if current_name() == name:
        (config_dir() / "context").unlink(missing_ok=True)


def use_context(name: str | None) -> None:
    """Make ``name`` the current context (None: no current context)."""
    marker = config_dir() / "context"
    if name is None:
        marker.unlink(missing_ok=True)
        return
    load_context(name)  # refuse an unknown name
    _write_private(marker, name + "\n")


def current_name() -> str | None:
    """The context ``felix ctx use`` selected, if any."""
    try:
        name = (config_dir() / "context").read_text().strip()
    except FileNotFoundError:
        return None
    return name or None


def _secret_file(path: str, what: str) -> str:
    text = _read_small(Path(path), what).strip()
    if not text:
        raise ConfigError(f"{what} {path} is empty")
    return text


def _pid_alive(pid: object) -> bool:
    if not isinstance(pid, int) or isinstance(pid, bool) or not 0 < pid < 2**31:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: it exists
    return True


def url_from_address(address: str, scheme: str = "felix") -> str:
    """``scheme://HOST:PORT`` reaching a node's ``HOST:PORT`` from this host."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if host in ("", "0.0.0.0"):  # a node listening on all addresses is reachable locally
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def node_defaults(data_dir: Path, *, node_json: Path | None = None) -> Defaults:
    """What a local node's ``node.json`` (in ``data_dir`` unless given) and admin token say."""
    path = node_json if node_json is not None else data_dir / "node.json"
    try:
        info = json.loads(_read_small(path, "node.json"))
    except ValueError as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    if not isinstance(info, dict):
        raise ConfigError(f"{path} does not hold a JSON object")
    quic = info.get("quic")
    control = info.get("control")
    http = info.get("http")
    ca = info.get("ca")
    admin = path.parent / "admin-token"
    token = _secret_file(str(admin), "admin token") if admin.is_file() else None
    warning = None
    if "pid" in info and not _pid_alive(info["pid"]):
        warning = f"{path} names pid {info['pid']}, which is not running: is the node up?"
    return Defaults(
        url=url_from_address(quic) if isinstance(quic, str) else None,
        control_url=control if isinstance(control, str) else None,
        ca=ca if isinstance(ca, str) else None,
        http=url_from_address(http, "http") if isinstance(http, str) else None,
        control_token=token,
        http_token=token if isinstance(http, str) else None,
        source=str(path),
        warning=warning,
    )


def resolve(context: str | None = None) -> Defaults:
    """The defaults of the selected context, else of a local node, else none.

    ``context``: the ``--context`` flag; else ``$FELIX_CONTEXT``; else the current
    context; else ``$FELIX_DATA_DIR`` or ``./data``, if it holds a node.json.
    """
    name = context or os.environ.get("FELIX_CONTEXT") or current_name()
    if name:
        ctx = load_context(name)
        base = Defaults()
        if ctx.data_dir is not None:
            base = node_defaults(Path(ctx.data_dir))
        return Defaults(
            url=ctx.url or base.url,
            control_url=ctx.control_url or base.control_url,
            ca=ctx.ca or base.ca,
            token=_secret_file(ctx.token_file, "token file") if ctx.token_file else None,
            control_token=(
                _secret_file(ctx.control_token_file, "control token file")
                if ctx.control_token_file
                # The data dir's admin token goes only to that node's own control plane.
                else base.control_token
                if ctx.control_url is None
                else None
            ),
            tenant=ctx.tenant,
            namespace=ctx.namespace,
            http=ctx.http or base.http,
            # Likewise its health port's: never to a health address of the context's own.
            http_token=base.http_token if ctx.http is None else None,
            source=f"context {name}",
            warning=base.warning,
        )
    data_dir = os.environ.get("FELIX_DATA_DIR")
    if data_dir:
        return node_defaults(Path(data_dir))
    if (LOCAL_DATA_DIR / "node.json").is_file():
        return node_defaults(LOCAL_DATA_DIR)
    return Defaults()


def pick(*candidates: tuple[str | None, str]) -> tuple[str | None, str]:
    """The first ``(value, source)`` whose value is set, else ``(None, "unset")``."""
    for value, source in candidates:
        if value:
            return value, source
    return None, "unset"


def report(defaults: Defaults, verbose: bool, settings: dict[str, tuple[str | None, str]]) -> None:
    """With ``-v``, say on stderr what each setting is and where it came from (never a
    secret's value); always print the defaults' warning if they were used."""
    if verbose:
        shown = ", ".join(
            f"{name} {'(set)' if 'token' in name else value} from {source}"
            for name, (value, source) in settings.items()
            if value is not None
        )
        print(f"felix: {shown}", file=sys.stderr)
    if defaults.warning and any(src == defaults.source for _, src in settings.values()):
        print(f"felix: warning: {defaults.warning}", file=sys.stderr)
