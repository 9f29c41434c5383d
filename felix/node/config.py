"""A node's configuration: what `felix up` was asked to run, in one frozen value.

Defaults as docs/operations.md, "Running a node" states them (ports, one gateway and one
shard per core). The same value, serialised as JSON, tells each child process
what to do (see felix/node/worker.py).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from felix.errors import ConfigError, FelixError
from felix.gateway.gateway import GatewayLimits
from felix.names import validate_name
from felix.regions import DEV_REGION
from felix.shard.cache import CacheSettings
from felix.shard.stream_log import StreamSettings
from felix.shard.tenants import TenantQuota

if TYPE_CHECKING:
    from felix.control.quotas import NodeQuotas

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "m": 1000**2,
    "g": 1000**3,
    "t": 1000**4,
    "ki": 1024,
    "mi": 1024**2,
    "gi": 1024**3,
    "ti": 1024**4,
}


def parse_size(text: str) -> int:
    """``"512MiB"``, ``"2G"``, ``"1048576"`` -> bytes."""
    m = _SIZE.match(text)
    if not m:
        raise ConfigError(f"not a size: {text!r} (examples: 512MiB, 2GiB, 1000000)")
    unit = (m.group(2) or "").lower().removesuffix("b")
    if unit not in _UNITS:
        raise ConfigError(f"unknown size unit in {text!r}")
    return int(float(m.group(1)) * _UNITS[unit])


#: Longest Unix socket path (sockaddr_un's sun_path, less its terminating NUL).
MAX_UNIX_PATH = 107

#: Smallest --segment-bytes (a segment holds at least a few records of the largest size).
MIN_SEGMENT_BYTES = 64 * 1024

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$", re.IGNORECASE)
_SECONDS = {"ms": 0.001, "": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: str | float) -> float:
    """``"30s"``, ``"5m"``, ``"24h"``, ``"1d"``, ``"0.5"``, ``300`` -> seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        if value < 0 or value != value:
            raise ConfigError(f"not a duration: {value!r}")
        return float(value)
    m = _DURATION.match(str(value))
    if not m:
        raise ConfigError(f"not a duration: {value!r} (examples: 30s, 5m, 24h, 300)")
    return float(m.group(1)) * _SECONDS[(m.group(2) or "").lower()]


def parse_address(text: str, default_port: int) -> tuple[str, int]:
    """``"host:port"``, ``"[::1]:5000"``, ``"host"`` -> (host, port)."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":")
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, ""
    try:
        number = int(port) if port else default_port
    except ValueError:
        raise ConfigError(f"bad port in address {text!r}") from None
    if not 0 <= number <= 65535:
        raise ConfigError(f"port out of range in {text!r}")
    return host or "127.0.0.1", number


def is_wildcard(host: str) -> bool:
    """Whether ``host`` listens on every address (so it names no one host to reach)."""
    return host in ("", "0.0.0.0", "::", "[::]")


#: What the children's copy of the config holds instead of the cluster's DSN.
CLUSTER_REDACTED = "(set: the supervisor's)"
#: ... and instead of the control plane's store (the control process is given it
#: through a pipe of its own: felix/node/worker.py ``ChildSpec.secret_fd``).
CONTROL_STORE_REDACTED = "(set: the control process's)"
#: The longest --control-store (it reaches the control process through one pipe buffer).
MAX_DSN_BYTES = 4096
#: Environment variables no child process inherits (they hold the cluster's DSN).
CHILD_ENV_DROPPED = ("FELIX_CLUSTER", "FELIX_CONTROL_STORE")

_NODE_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


def default_node_id() -> str:
    """``--node-id``'s default: $HOSTNAME (the pod name on Kubernetes), else the host name."""
    import socket

    return os.environ.get("HOSTNAME") or socket.gethostname()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def usable_cpus() -> int:
    """CPUs this process may really use: its affinity mask, capped by a cgroup v2 quota.

    ``os.cpu_count()`` counts the host's CPUs; in a container limited to 2 CPUs on a
    64-CPU host it would start 64 gateways. The quota (``cpu.max``, "QUOTA PERIOD" or
    "max PERIOD") is rounded up: 1.5 CPUs run 2 processes.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max" and int(period) > 0:
            cpus = min(cpus, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


#: Up to this many usable CPUs, ``--topology auto`` hosts the shards in the gateway.
EMBEDDED_MAX_CPUS = 2

TOPOLOGIES = ("auto", "split", "embedded")


def resolve_topology(
    topology: str, gateways: int | None, shards: int | None, cpus: int
) -> tuple[int, int, bool]:
    """``felix up``'s process layout: (gateways, shards, shards embedded in the gateway?).

    ``split``: G gateway and S shard processes joined by rings (default one of each
    per CPU). ``embedded``: one gateway process hosting the S shard cores (no ring
    hop, no cross-process wake-up per request). ``auto``: embedded on machines with
    at most EMBEDDED_MAX_CPUS usable CPUs, where it measured better in latency and
    throughput (perf/README.md, "Issue #14, Part 1"), else split; a number of
    gateway processes asked for (``--gateways``, even 1) means split.
    """
    if topology not in TOPOLOGIES:
        raise ConfigError(f"--topology must be one of {', '.join(TOPOLOGIES)}, not {topology!r}")
    if topology == "auto":
        topology = "split" if gateways is not None or cpus > EMBEDDED_MAX_CPUS else "embedded"
    if topology == "embedded":
        if gateways is not None and gateways != 1:
            raise ConfigError("--topology embedded needs --gateways 1 (shards live in the gateway)")
        return 1, shards or cpus, True
    return gateways or cpus, shards or cpus, False


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """Everything `felix up` runs with."""

    listen: tuple[str, int] = ("127.0.0.1", 5000)
    http: tuple[str, int] = ("127.0.0.1", 8080)
    control: tuple[str, int] = ("127.0.0.1", 8443)
    gateways: int = field(default_factory=usable_cpus)
    shards: int = field(default_factory=usable_cpus)
    data_dir: Path = Path("data")
    memory_budget: int = 1024**3
    #: A tenant's memory quota on this node when the control plane sets none
    #: (None: the whole memory budget); split evenly over the shards.
    tenant_memory_quota: int | None = None
    #: Streams, caches and watches a tenant may hold per shard unless the control plane says.
    tenant_max_resources: int = 10_000
    #: Most streams one shard holds (and entries in its offset reservation file).
    max_streams_per_shard: int = 65_536
    #: Durable streams (docs/operations.md, "Durable streams"): auto-created streams
    #: are durable, with this fsync policy and interval.
    durable_streams: bool = False
    fsync: str = "commit"
    fsync_interval_ms: int = 100
    #: Segment files of durable streams roll at this size.
    segment_bytes: int = 256 * 1024**2
    #: Disk for every durable stream of the node (None: no budget); split over the shards.
    disk_budget: int | None = None
    #: ``--tenant-disk-quota``: durable bytes a tenant may keep on the node unless its
    #: control-plane ``disk_quota_bytes`` says (None: no per-tenant bound).
    tenant_disk_quota: int | None = None
    #: New durable data is refused while the data disk has less free space than this.
    disk_reserve: int = 256 * 1024**2
    max_durable_streams_per_shard: int = 1024
    #: Encryption at rest (docs/operations.md, "Encryption at rest"): durable records
    #: and queue group state are encrypted with per-tenant data keys wrapped by the
    #: region key in this file (None: ``DATA_DIR/keys/region.key``, generated in dev
    #: mode). Off: new data is written in plaintext; encrypted data stays readable.
    region_key: Path | None = None
    encryption: bool = True
    insecure: bool = False
    auto_create: bool = True
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: mTLS on the QUIC port: clients must present a certificate chained to this CA
    #: (PEM). Needs an engine that can require client certificates (aioquic).
    tls_client_ca: Path | None = None
    #: mTLS on the embedded control plane: it serves HTTPS and requires a client
    #: certificate chained to this CA (PEM).
    control_client_ca: Path | None = None
    ring_bytes: int = 4 * 1024**2
    #: Unix socket same-host clients connect to for shared-memory connections
    #: (felix/shm; None: off), its file mode, and how many such connections the node
    #: serves at once (split over the gateways, rounded up).
    shm_socket: Path | None = None
    shm_socket_mode: int = 0o600
    shm_max_connections: int = 64
    drain_grace: float = 10.0
    #: Seconds a child may leave the supervisor's heartbeat unanswered before it is
    #: killed and restarted (reported unresponsive after min(3 s, this)).
    heartbeat_timeout: float = 10.0
    engine: str = "qh3"
    #: Store of the embedded control plane (None: SQLite at DATA_DIR/control.db). A
    #: DSN with a password: never in a child's copy of the config (:meth:`to_json`).
    control_store: str | None = field(default=None, repr=False)
    #: Follow this remote control plane instead of embedding one (``felix control``).
    control_url: str | None = None
    #: The region this node (and its embedded control plane) belongs to: shown in
    #: node.json, /v1/system/info and /metrics; tokens, resources and the control
    #: plane's feed must be of this region (felix/regions.py). The default, "local",
    #: is for loopback dev mode only.
    region: str = DEV_REGION
    #: Host the shard cores inside the (single) gateway process: no ring hop.
    embedded_shards: bool = False
    #: Microseconds a gateway keeps polling its UDP socket after a datagram, and a
    #: shard its request rings after a record, before sleeping (0: off): trades CPU
    #: for the wake-up of a sleeping process (felix/quic/spin.py).
    spin_us: int = 0
    #: Run every active bridge of this node's control plane in a child process,
    #: ``bridges-0`` (docs/operations.md, "Bridges"), restarted like the others.
    bridges: bool = False
    #: HOST:PORT where that child serves /metrics and /bridges (None: nowhere).
    bridges_http: str | None = None
    #: Require Felix tokens (keys in DATA_DIR/auth, see `felix token`), on the QUIC port
    #: and the embedded control plane's API (or the bootstrap admin token in
    #: DATA_DIR/admin-token); with it both may listen beyond loopback without --insecure.
    auth: bool = False
    #: Bearer token for the remote control plane (``--control-url``); never sent to the
    #: child processes.
    control_token: str | None = field(default=None, repr=False)
    #: Verifying ``control_url``'s https certificate (None: system store, or
    #: $FELIX_CONTROL_CA), and the client certificate + key presented to it (mTLS).
    control_ca: Path | None = None
    control_client_cert: Path | None = None
    control_client_key: Path | None = None
    #: With --auth and an embedded control plane: seconds between scheduled key
    #: rotations of every tenant's ring in DATA_DIR/auth (0: none).
    key_rotation_interval: float = 24 * 3600.0
    #: Seconds a scheduled key is published before it signs.
    key_publish_lead: float = 300.0
    #: With --auth and --control-url: seconds between refreshes of each tenant's JWK set.
    jwks_refresh: float = 30.0
    #: Join the cluster of nodes that agree through this PostgreSQL database (issue #16,
    #: docs/architecture.md "Cluster"; None: standalone). Never sent to the children.
    cluster: str | None = field(default=None, repr=False)
    #: This node's id in the cluster (stable across restarts: the StatefulSet pod name).
    node_id: str = ""
    #: The QUIC ``host:port`` clients are redirected to (None: the listen address with the
    #: port it bound; required when listening on a wildcard address).
    advertise: tuple[str, int] | None = None
    #: Logical shards of the cluster (fixed when it is created).
    logical_shards: int = 256
    #: Seconds of the node's lease (renewed every third of it).
    cluster_lease: float = 10.0
    #: Seconds a fresh cluster's first placement waits for the live nodes to stop changing
    #: (at most five times as long; 0: none).
    cluster_settle: float = 2.0
    #: Seconds after its lease ended that a node holding no pinned shard is removed from
    #: the cluster (0: never).
    cluster_node_expiry: float = 24 * 3600.0
    limits: GatewayLimits = field(default_factory=GatewayLimits)
    stream_defaults: StreamSettings = field(default_factory=StreamSettings)
    cache_defaults: CacheSettings = field(default_factory=CacheSettings)

    def __post_init__(self) -> None:
        if self.cluster is not None:
            self._check_cluster()
        if self.control_store is not None and len(self.control_store.encode()) > MAX_DSN_BYTES:
            raise ConfigError(f"--control-store is over {MAX_DSN_BYTES} bytes")
        if self.gateways < 1 or self.shards < 1:
            raise ConfigError("--gateways and --shards must be at least 1")
        if self.embedded_shards and self.gateways != 1:
            raise ConfigError("--embedded-shards needs --gateways 1 (shards live in the gateway)")
        try:
            validate_name("region", self.region)
        except FelixError as exc:
            raise ConfigError(f"--region: {exc}") from None
        if not 0 <= self.spin_us <= 10_000:
            raise ConfigError("--spin-us must be between 0 and 10000")
        if self.gateways * self.shards > 256:
            raise ConfigError("gateways x shards is limited to 256 (one ring pair each)")
        for name in ("listen", "http", "control"):
            host, _ = getattr(self, name)
            if name in ("listen", "control") and self.auth:
                continue  # every QUIC session and every API request is authenticated
            if name == "listen" and self.tls_client_ca is not None:
                continue  # every QUIC client proves a certificate from the client CA
            if name == "control" and self.control_client_ca is not None:
                continue  # every API client proves a certificate from the client CA
            if not is_loopback(host) and not self.insecure:
                raise ConfigError(
                    f"--{name} {host} is not a loopback address: "
                    + (
                        "the health/metrics port is not authenticated"
                        if name == "http"
                        else "with --auth none felix serves unauthenticated"
                    )
                    + ", so it refuses to listen elsewhere without --insecure"
                )
        if self.region == DEV_REGION:
            beyond = [
                f"--{name} {getattr(self, name)[0]}"
                for name in ("listen", "control")
                # Following a remote control plane: this node serves no control API.
                if not (name == "control" and self.control_url)
                and not is_loopback(getattr(self, name)[0])
            ]
            if beyond:
                raise ConfigError(
                    f"--region is required beyond loopback dev mode ({', '.join(beyond)} "
                    f"is not a loopback address): name the region this node belongs to "
                    f"with --region ID (or $FELIX_REGION); {DEV_REGION!r} is the loopback "
                    "default only"
                )
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("--tls-cert and --tls-key go together")
        if self.tls_client_ca is not None:
            from felix.quic.engine import MTLS_ENGINES

            if self.engine not in MTLS_ENGINES:
                raise ConfigError(
                    f"--tls-client-ca needs --engine {' or '.join(MTLS_ENGINES)}: the "
                    f"{self.engine} engine cannot require client certificates"
                )
        if (self.control_client_cert is None) != (self.control_client_key is None):
            raise ConfigError("--control-client-cert and --control-client-key go together")
        if self.shm_max_connections < 1:
            raise ConfigError("--shm-max-connections must be at least 1")
        if not 0 <= self.shm_socket_mode <= 0o777:
            raise ConfigError(f"--shm-socket-mode {self.shm_socket_mode:o} is not a file mode")
        if self.shm_socket is not None:
            if not self.shm_socket.is_absolute():
                raise ConfigError(f"--shm-socket {self.shm_socket} must be an absolute path")
            if len(os.fsencode(self.shm_socket)) > MAX_UNIX_PATH:
                raise ConfigError(
                    f"--shm-socket {self.shm_socket} is longer than a Unix socket path may be "
                    f"({MAX_UNIX_PATH} bytes): choose a shorter one"
                )
        if not 0 < self.heartbeat_timeout < float("inf"):
            raise ConfigError("--heartbeat-timeout must be a positive number of seconds")
        if not 0 < self.jwks_refresh < float("inf"):
            raise ConfigError("--jwks-refresh must be a positive number of seconds")
        if not 0 < self.key_publish_lead < float("inf"):
            raise ConfigError("--key-publish-lead must be a positive number of seconds")
        if self.key_rotation_interval != 0 and not (
            self.key_publish_lead <= self.key_rotation_interval < float("inf")
        ):
            raise ConfigError(
                "--key-rotation-interval must be 0 (no scheduled rotation) or at least "
                f"--key-publish-lead ({self.key_publish_lead:g} s)"
            )
        if self.tenant_memory_quota is not None and not (
            0 < self.tenant_memory_quota <= self.memory_budget
        ):
            raise ConfigError("--tenant-memory-quota must be in (0, --memory-budget]")
        if self.tenant_disk_quota is not None and not (
            2 * self.shards * self.segment_bytes
            <= self.tenant_disk_quota
            <= (self.disk_budget or self.tenant_disk_quota)
        ):
            raise ConfigError(
                f"--tenant-disk-quota must be at least two segments ({self.segment_bytes} "
                "bytes each, --segment-bytes) per shard, since retention deletes whole "
                "segments, and at most --disk-budget"
            )
        if self.fsync not in ("none", "interval", "commit"):
            raise ConfigError("--fsync must be none, interval or commit")
        if not 1 <= self.fsync_interval_ms <= 60_000:
            raise ConfigError("--fsync-interval-ms must be in 1..60000")
        if self.segment_bytes < MIN_SEGMENT_BYTES:
            raise ConfigError(f"--segment-bytes must be at least {MIN_SEGMENT_BYTES}")
        if self.disk_budget is not None and self.disk_budget < self.shards * self.segment_bytes:
            raise ConfigError(
                f"--disk-budget {self.disk_budget} is less than one segment "
                f"({self.segment_bytes} bytes, --segment-bytes) per shard"
            )
        if self.disk_reserve < 0 or self.max_durable_streams_per_shard < 1:
            raise ConfigError(
                "--disk-reserve must be >= 0 and --max-durable-streams-per-shard >= 1"
            )
        if self.tenant_max_resources < 1 or self.max_streams_per_shard < 1:
            raise ConfigError("--tenant-max-resources and --max-streams-per-shard must be >= 1")
        # The replay rings and caches of all shards share the memory budget.
        per_shard = self.memory_budget // self.shards
        if per_shard < self.stream_defaults.replay_max_bytes:
            raise ConfigError(
                f"--memory-budget {self.memory_budget} leaves {per_shard} bytes per shard, "
                f"less than one stream's replay ring ({self.stream_defaults.replay_max_bytes})"
            )

    def _check_cluster(self) -> None:
        from felix.cluster.ownership import MAX_LOGICAL_SHARDS

        if not _NODE_ID.match(self.node_id):
            raise ConfigError(
                f"--node-id {self.node_id!r} must be 1-128 letters, digits, '.', '_' or '-'"
            )
        if not 1 <= self.logical_shards <= MAX_LOGICAL_SHARDS:
            raise ConfigError(f"--logical-shards must be in 1..{MAX_LOGICAL_SHARDS}")
        if not 1.0 <= self.cluster_lease <= 3600.0:
            raise ConfigError("--cluster-lease must be between 1 and 3600 seconds")
        if not 0.0 <= self.cluster_settle <= 60.0:
            raise ConfigError("--cluster-settle must be between 0 and 60 seconds")
        if self.cluster_node_expiry != 0 and not (
            60.0 <= self.cluster_node_expiry <= 3650 * 24 * 3600.0
        ):
            raise ConfigError(
                "--cluster-node-expiry must be 0 (never) or between 1 minute and 3650 days"
            )
        if self.advertise is None:
            if is_wildcard(self.listen[0]):
                raise ConfigError(
                    f"--advertise HOST:PORT is required with --cluster when --listen is the "
                    f"wildcard address {self.listen[0] or '(empty)'}: other nodes redirect "
                    "clients to it"
                )
        elif is_wildcard(self.advertise[0]) or self.advertise[1] == 0:
            raise ConfigError(
                f"--advertise {self.advertise[0]}:{self.advertise[1]} must name a host clients "
                "can reach and a port"
            )
        elif is_loopback(self.advertise[0]) and not is_loopback(self.listen[0]):
            raise ConfigError(
                f"--advertise {self.advertise[0]}:{self.advertise[1]} is a loopback address "
                f"but --listen {self.listen[0] or '(empty)'} is not: clients redirected to "
                "this node from other hosts would reach their own host. Advertise a name or "
                "address they can reach (loopback only for nodes that all listen on this "
                "host's loopback)"
            )

    @property
    def clustered(self) -> bool:
        """Whether the node is part of a cluster (the DSN itself stays in the supervisor)."""
        return self.cluster is not None

    @property
    def tenant_defaults(self) -> TenantQuota:
        """The node-wide quota of a tenant the control plane sets none for."""
        return TenantQuota(
            self.tenant_memory_quota or self.memory_budget,
            self.tenant_max_resources,
            self.tenant_disk_quota,
        )

    @property
    def quotas(self) -> NodeQuotas:
        """What the embedded control plane checks budgets against."""
        from felix.control.quotas import NodeQuotas  # the control plane's (pydantic) side

        return NodeQuotas(
            self.memory_budget,
            self.shards,
            self.tenant_memory_quota,
            max_streams_per_shard=self.max_streams_per_shard,
        )

    def to_json(self) -> str:
        """The config for the child processes: without the control token (they need
        none) and without any DSN (``cluster``, ``control_store``: placeholders; the
        control process gets its store separately)."""
        cluster = None if self.cluster is None else CLUSTER_REDACTED
        store = None if self.control_store is None else CONTROL_STORE_REDACTED
        return json.dumps(
            {**_plain(self), "control_token": None, "cluster": cluster, "control_store": store}
        )

    @classmethod
    def from_json(cls, text: str) -> NodeConfig:
        raw: dict[str, Any] = json.loads(text)
        raw["listen"] = tuple(raw["listen"])
        raw["http"] = tuple(raw["http"])
        raw["control"] = tuple(raw["control"])
        raw["data_dir"] = Path(raw["data_dir"])
        if raw.get("advertise") is not None:
            raw["advertise"] = tuple(raw["advertise"])
        for key in (
            "shm_socket",
            "tls_cert",
            "tls_key",
            "tls_client_ca",
            "control_client_ca",
            "control_ca",
            "control_client_cert",
            "control_client_key",
            "region_key",
        ):
            raw[key] = Path(raw[key]) if raw.get(key) else None
        raw["limits"] = GatewayLimits(**raw["limits"])
        raw["stream_defaults"] = StreamSettings(**raw["stream_defaults"])
        raw["cache_defaults"] = CacheSettings(**raw["cache_defaults"])
        return cls(**raw)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value
