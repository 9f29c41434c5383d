"""Which hosts a client may follow a cluster to (sans-IO): :class:`HostPolicy`.

A REDIRECT or a SHARD_MAP names node addresses, and the client connects there and
presents its token. What a node says is not enough to trust a host with that token
(a compromised node, or anyone who can write the cluster's node table, could name
their own), so every address is checked against the client's ``cluster_hosts``
option before it is connected to or put in the map:

- the host the client was given (the bootstrap host) is always allowed, any port;
- ``cluster_hosts`` None (the default): when the bootstrap host is a DNS name of at
  least three labels, any name under its parent domain (``felix.prod.example.com``
  allows ``*.prod.example.com``); when it is an IP literal, any IP literal if the
  client pins its CA (``ca`` set), else that IP only; over shared memory, the
  loopback addresses and ``localhost``;
- ``cluster_hosts`` a list: the bootstrap host and what the patterns allow:
  ``"*.example.com"`` (any name under example.com), ``"10.0.0.0/8"`` (IP literals in
  that network), an exact name or IP, or ``"*"`` (anything: a test cluster only).

Hosts compare case-insensitively, without a trailing dot; a pattern names hosts
only (no ports).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from felix.client._convert import Endpoint, ShmEndpoint
from felix.errors import ConfigError

__all__ = ["HostPattern", "HostPolicy", "parse_host_patterns"]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: At most this many patterns in ``cluster_hosts``.
MAX_PATTERNS = 256


def _ip(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _name(host: str) -> str:
    return host.lower().rstrip(".")


@dataclass(frozen=True, slots=True)
class HostPattern:
    """One parsed ``cluster_hosts`` entry (exactly one field is set, or ``anything``)."""

    text: str
    anything: bool = False
    #: An exact DNS name.
    name: str | None = None
    #: ``*.suffix``: names under ``suffix`` (not ``suffix`` itself).
    suffix: str | None = None
    network: IPNetwork | None = None

    def allows(self, name: str, ip: IPAddress | None) -> bool:
        if self.anything:
            return True
        if ip is not None:
            return (
                self.network is not None
                and ip.version == self.network.version
                and (ip in self.network)
            )
        if self.name is not None:
            return name == self.name
        return self.suffix is not None and name.endswith("." + self.suffix)


def _parse_pattern(text: object) -> HostPattern:
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"cluster_hosts: each entry must be a non-empty str, got {text!r}")
    raw = text.strip()
    if raw == "*":
        return HostPattern(raw, anything=True)
    if raw.startswith("*."):
        suffix = _name(raw[2:])
        if not suffix or "*" in suffix or "/" in suffix or ":" in suffix:
            raise ConfigError(f"cluster_hosts: {text!r} is not a host pattern ('*.example.com')")
        if "." not in suffix:
            raise ConfigError(
                f"cluster_hosts: {text!r} allows a whole top-level domain; name at least "
                "two labels ('*.felix.example.com')"
            )
        return HostPattern(raw, suffix=suffix)
    if "/" in raw:
        try:
            return HostPattern(raw, network=ipaddress.ip_network(raw.strip("[]"), strict=False))
        except ValueError:
            raise ConfigError(f"cluster_hosts: {text!r} is not a network ('10.0.0.0/8')") from None
    ip = _ip(raw.strip("[]"))
    if ip is not None:
        return HostPattern(raw, network=ipaddress.ip_network(ip))
    name = _name(raw)
    if not name or "*" in name or ":" in name or any(c.isspace() for c in name):
        raise ConfigError(
            f"cluster_hosts: {text!r} is not a host, '*.domain', an IP or a network "
            "(no ports: every port of an allowed host is allowed)"
        )
    return HostPattern(raw, name=name)


def parse_host_patterns(patterns: Iterable[str]) -> tuple[HostPattern, ...]:
    """``cluster_hosts`` parsed; ConfigError names a pattern it cannot use."""
    if isinstance(patterns, str | bytes):
        raise ConfigError("cluster_hosts must be a list of host patterns, not one string")
    parsed = tuple(_parse_pattern(p) for p in patterns)
    if len(parsed) > MAX_PATTERNS:
        raise ConfigError(f"cluster_hosts: at most {MAX_PATTERNS} patterns, got {len(parsed)}")
    return parsed


_LOOPBACK = (
    HostPattern("localhost", name="localhost"),
    HostPattern("127.0.0.0/8", network=ipaddress.ip_network("127.0.0.0/8")),
    HostPattern("::1", network=ipaddress.ip_network("::1/128")),
)


class HostPolicy:
    """Whether the client may connect (and send its token) to a node's host."""

    def __init__(
        self,
        bootstrap: Endpoint | ShmEndpoint,
        cluster_hosts: Iterable[str] | None,
        *,
        pinned_ca: bool,
    ) -> None:
        self._bootstrap_name: str | None = None
        self._bootstrap_ip: IPAddress | None = None
        patterns: tuple[HostPattern, ...]
        if isinstance(bootstrap, Endpoint):
            self._bootstrap_ip = _ip(bootstrap.host)
            if self._bootstrap_ip is None:
                self._bootstrap_name = _name(bootstrap.host)
        if cluster_hosts is not None:
            patterns = parse_host_patterns(cluster_hosts)
            #: How the rules read in an error message.
            self.described = "cluster_hosts " + repr([p.text for p in patterns])
        elif isinstance(bootstrap, ShmEndpoint):
            patterns = _LOOPBACK
            self.described = "the default cluster_hosts (shared memory: loopback hosts only)"
        elif self._bootstrap_ip is not None:
            if pinned_ca:
                anything_ip = (
                    HostPattern("0.0.0.0/0", network=ipaddress.ip_network("0.0.0.0/0")),
                    HostPattern("::/0", network=ipaddress.ip_network("::/0")),
                )
                patterns = anything_ip
                self.described = "the default cluster_hosts (IP literals, as ca is pinned)"
            else:
                patterns = ()
                self.described = (
                    f"the default cluster_hosts (only {bootstrap.host}: without a pinned "
                    "ca, other IP literals are not followed)"
                )
        else:
            labels = (self._bootstrap_name or "").split(".")
            if len(labels) >= 3:
                parent = ".".join(labels[1:])
                patterns = (HostPattern("*." + parent, suffix=parent),)
                self.described = f"the default cluster_hosts ('*.{parent}')"
            else:
                patterns = ()
                self.described = f"the default cluster_hosts (only {self._bootstrap_name})"
        self.patterns = patterns

    def allows(self, host: str) -> bool:
        """True when ``host`` (a name or an IP literal, no brackets) may be connected to."""
        ip = _ip(host)
        name = _name(host)
        if ip is not None:
            if ip == self._bootstrap_ip:
                return True
        elif name == self._bootstrap_name:
            return True
        return any(pattern.allows(name, ip) for pattern in self.patterns)

    def refusal(self, address: str) -> str:
        """Why the client does not follow a node to ``address`` (for an error or a log)."""
        return (
            f"a node of the cluster named {address} as a node, but its host is not allowed "
            f"by {self.described}; the client does not connect there (nor send its token). "
            "If it is a node of your cluster, add its host to the client option cluster_hosts"
        )
