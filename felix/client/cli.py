"""Client commands of the ``felix`` CLI: ``pub``, ``sub``, ``consume``, ``dlq ls|peek|replay``,
``cache get|set|del``.

``felix.cli`` calls :func:`add_commands` with its subparsers; each command sets
``func``: a callable taking the parsed namespace and returning the exit status.

Where to connect, first found wins: ``--url``; ``$FELIX_URL``; the ``quic``
address in ``--node-json FILE`` (or ``--data-dir DIR``/node.json); the context
(``--context``, ``$FELIX_CONTEXT``, ``felix ctx use``); else a local node's
node.json (``$FELIX_DATA_DIR``, else ``./data``); else
``felix://127.0.0.1:5000``. Which CA to trust: ``--ca``; the ``ca`` path in
that node.json; ``$FELIX_CA_FILE`` (with the system store); the context's or
local node's CA; else the system store. The token: ``--token``, else
``$FELIX_TOKEN``, else the context's token file, else none (dev mode). The
tenant and namespace: the flags, else the context's, else ``default``.
``felix -v`` says which of these it used.
End-to-end encryption (pub, sub, consume, cache get|set): ``--e2e-keys FILE``, else
``$FELIX_E2E_KEYS``, else none (records and values pass as stored); dlq commands
never decrypt, so a replay moves the ciphertext unchanged.

Exit status: 0 done; 3 nothing to do (cache miss, conditional set not stored,
delete of a missing key); 1 a felix error; 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import math
import os
import sys
from collections.abc import Callable, Coroutine, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from felix.client._client import Client
from felix.client._connect import Connect, connect
from felix.client._consumer import QueueMessage
from felix.client._convert import StartSpec, time_start
from felix.client._e2e import E2EKeys
from felix.client._events import ClientEvent, SlowConsumer
from felix.client._flow import Message
from felix.context import Defaults, pick, report, resolve, url_from_address
from felix.errors import ConfigError, FelixTimeoutError
from felix.names import dead_letter_name
from felix.progress import Progress, progress

__all__ = ["DEFAULT_URL", "EXIT_NOTHING", "add_commands"]

DEFAULT_URL = "felix://127.0.0.1:5000"
#: Exit status when the command succeeded but found or changed nothing.
EXIT_NOTHING = 3

Subparsers = argparse._SubParsersAction  # argparse has no public name for it
_RAW = argparse.RawDescriptionHelpFormatter
#: The module doc minus its first paragraph: precedence rules and exit statuses.
_EPILOG = (__doc__ or "").split("\n\n", 2)[2].replace("``", "")


def add_commands(subparsers: Subparsers[argparse.ArgumentParser]) -> None:
    """Add ``pub``, ``sub`` and ``cache`` to the ``felix`` command's ``subparsers``."""
    common = _common_options()

    pub = _command(subparsers, "pub", "publish one record to a stream", common)
    pub.add_argument("stream", metavar="STREAM", help="stream name (ns/name for another namespace)")
    pub.add_argument("data", metavar="DATA", help="the payload (UTF-8); - reads it from stdin")
    pub.add_argument(
        "--header", action="append", default=[], metavar="NAME=VALUE", help="a record header"
    )
    pub.add_argument(
        "--no-ack", action="store_true", help="do not wait for the stored offset (still drained)"
    )
    _e2e_option(pub)
    pub.set_defaults(func=_run(_pub))

    sub = _command(subparsers, "sub", "print a stream's records", common)
    sub.add_argument("stream", metavar="STREAM", help="stream name (ns/name for another namespace)")
    sub.add_argument(
        "--start",
        default="latest",
        help="latest (default), earliest, an offset, or a time: ISO 8601 with a zone "
        "(2026-01-01T09:30:00Z; a durable stream's records from then on)",
    )
    sub.add_argument("--count", type=int, metavar="N", help="exit after N records")
    sub.add_argument(
        "--idle", type=float, metavar="SECONDS", help="exit after this long without a record"
    )
    _e2e_option(sub)
    sub.set_defaults(func=_run(_sub))

    consume = _command(subparsers, "consume", "take records from a queue group", common)
    consume.add_argument("stream", metavar="STREAM", help="durable stream (ns/name elsewhere)")
    consume.add_argument("group", metavar="GROUP", help="the queue group")
    consume.add_argument("--count", type=int, metavar="N", help="exit after N records")
    consume.add_argument(
        "--idle", type=float, metavar="SECONDS", help="exit after this long without a record"
    )
    consume.add_argument("--prefetch", type=int, default=16, help="records leased ahead (16)")
    consume.add_argument(
        "--nak",
        action="store_true",
        help="nak every record instead of acking it (it is retried; test dead-lettering)",
    )
    _e2e_option(consume)
    consume.set_defaults(func=_run(_consume))

    dlq = subparsers.add_parser(
        "dlq",
        help="inspect and replay a stream's dead letters",
        epilog=_EPILOG,
        formatter_class=_RAW,
    )
    dlq_commands = dlq.add_subparsers(dest="dlq_command", required=True, metavar="COMMAND")
    for name, help_text in (
        ("ls", "list dead letters: offset, reason, source offset, group, failures"),
        ("peek", "print dead letters with their payloads and headers"),
        ("replay", "publish dead letters back to their source stream (a group on the DLQ)"),
    ):
        cmd = _command(dlq_commands, name, help_text, common)
        cmd.add_argument("stream", metavar="STREAM", help="the source stream")
        cmd.add_argument(
            "--dlq", metavar="NAME", help="the dead-letter stream (default: STREAM.dlq)"
        )
        cmd.add_argument("--count", type=int, metavar="N", help="at most N dead letters")
        cmd.add_argument(
            "--idle", type=float, default=1.0, metavar="SECONDS", help="stop when none for (1)"
        )
        cmd.set_defaults(func=_run(_dlq_replay if name == "replay" else _dlq_list))
        cmd.set_defaults(peek=name == "peek")

    cache = subparsers.add_parser(
        "cache", help="get, set or delete a cache key", epilog=_EPILOG, formatter_class=_RAW
    )
    ops = cache.add_subparsers(dest="cache_command", required=True)
    get = _command(ops, "get", "print a key's value (exit 3: missing)", common)
    _cache_args(get)
    _e2e_option(get)
    get.set_defaults(func=_run(_cache_get))
    set_ = _command(ops, "set", "store a value (exit 3: not stored)", common)
    _cache_args(set_)
    set_.add_argument("value", metavar="VALUE", help="the value (UTF-8); - reads it from stdin")
    set_.add_argument("--ttl", type=float, metavar="SECONDS", help="expire after this long")
    condition = set_.add_mutually_exclusive_group()
    condition.add_argument("--nx", action="store_true", help="only if the key is absent")
    condition.add_argument("--xx", action="store_true", help="only if the key is present")
    _e2e_option(set_)
    set_.set_defaults(func=_run(_cache_set))
    delete = _command(ops, "del", "delete a key (exit 3: was missing)", common)
    _cache_args(delete)
    delete.set_defaults(func=_run(_cache_del))


def _command(
    subparsers: Subparsers[argparse.ArgumentParser],
    name: str,
    help_text: str,
    common: argparse.ArgumentParser,
) -> argparse.ArgumentParser:
    """A client command: the connection options, and the module doc's rules as epilog."""
    return subparsers.add_parser(
        name, parents=[common], help=help_text, epilog=_EPILOG, formatter_class=_RAW
    )


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("connection")
    group.add_argument(
        "--url",
        help=f"felix://HOST:PORT, or felix+shm:///PATH for a node on this host over shared "
        f"memory (default: $FELIX_URL or {DEFAULT_URL})",
    )
    group.add_argument("--ca", type=Path, help="CA certificate file (PEM) to trust")
    group.add_argument("--node-json", type=Path, metavar="FILE", help="a node's node.json")
    group.add_argument("--data-dir", type=Path, metavar="DIR", help="a node's data directory")
    group.add_argument("--tenant", help="tenant (default: the context's, else default)")
    group.add_argument("--namespace", help="namespace (default: the context's, else default)")
    group.add_argument("--token", help="access token (default: $FELIX_TOKEN)")
    group.add_argument(
        "--timeout", type=float, default=10.0, metavar="SECONDS", help="per request (10)"
    )
    common.add_argument("--json", action="store_true", help="print JSON (one object per line)")
    return common


def _e2e_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--e2e-keys",
        type=Path,
        metavar="FILE",
        help="end-to-end encryption keys (JSON, mode 0600; docs/api.md): encrypt what is "
        "published or set, decrypt what is read (default: $FELIX_E2E_KEYS)",
    )


def _e2e_keys(args: argparse.Namespace) -> E2EKeys | None:
    """The keys of a command that takes ``--e2e-keys`` (None for the others: dlq)."""
    if not hasattr(args, "e2e_keys"):
        return None
    path = args.e2e_keys or os.environ.get("FELIX_E2E_KEYS") or None
    return None if path is None else E2EKeys.from_file(path)


def _cache_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME", help="cache name (ns/name for another namespace)")
    parser.add_argument("key", metavar="KEY", help="the key")


# -- connecting ------------------------------------------------------------------------


def _node_json(args: argparse.Namespace) -> dict[str, Any] | None:
    path: Path | None = args.node_json
    if path is None and args.data_dir is not None:
        path = args.data_dir / "node.json"
    if path is None:
        return None
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    if not isinstance(info, dict):
        raise ConfigError(f"{path} does not hold a JSON object")
    return info


def connection_settings(args: argparse.Namespace) -> tuple[str, str | None]:
    """``(url, ca)`` for the parsed ``args``, by the precedence in the module doc."""
    settings = _settings(args)
    return settings["url"][0] or DEFAULT_URL, settings["ca"][0]


#: Where a URL came from when the user pointed at it: $FELIX_TOKEN may go there.
_POINTED = frozenset({"--url", "$FELIX_URL", "explicit", "the default"})


def _settings(args: argparse.Namespace) -> dict[str, tuple[str | None, str]]:
    """Every connection setting with where it came from (module doc's precedence)."""
    info = _node_json(args)
    where = str(args.node_json or (args.data_dir and args.data_dir / "node.json"))
    explicit = Defaults()
    if info is not None:
        quic, ca = info.get("quic"), info.get("ca")
        explicit = Defaults(
            url=url_from_address(quic) if isinstance(quic, str) else None,
            ca=ca if isinstance(ca, str) else None,
        )
    found = resolve(getattr(args, "context", None))
    url = pick(
        (args.url, "--url"),
        (os.environ.get("FELIX_URL"), "$FELIX_URL"),
        (explicit.url, where),
        (found.url, found.source),
        (DEFAULT_URL, "the default"),
    )
    url_source = "explicit" if url[1] == where and explicit.url else url[1]
    settings = {
        "url": url,
        "ca": pick(
            (str(args.ca) if args.ca is not None else None, "--ca"),
            (explicit.ca, where),
            # None here: connect() reads $FELIX_CA_FILE with the system store.
            (None if os.environ.get("FELIX_CA_FILE") else found.ca, found.source),
        ),
        "token": pick(
            (args.token, "--token"),
            # Sent only where the user pointed (a flag, the environment, an explicit
            # node.json, the default loopback URL), never to a node a ./data/node.json
            # or a context names: that one gets its own credentials.
            (os.environ.get("FELIX_TOKEN") if url_source in _POINTED else None, "$FELIX_TOKEN"),
            (found.token, found.source),
        ),
        "tenant": pick(
            (args.tenant, "--tenant"), (found.tenant, found.source), ("default", "the default")
        ),
        "namespace": pick(
            (args.namespace, "--namespace"),
            (found.namespace, found.source),
            ("default", "the default"),
        ),
    }
    report(found, getattr(args, "verbose", False), settings)
    return settings


def _connect(args: argparse.Namespace, **options: Any) -> Connect:
    settings = _settings(args)
    # The commands read args.tenant / args.namespace too (names, DLQ paths).
    args.tenant, args.namespace = settings["tenant"][0], settings["namespace"][0]
    return connect(
        settings["url"][0] or DEFAULT_URL,
        tenant=args.tenant,
        namespace=args.namespace,
        token=settings["token"][0],
        ca=settings["ca"][0],
        request_timeout=args.timeout,
        connect_timeout=args.timeout,
        e2e=_e2e_keys(args),
        **options,
    )


def _run(
    command: Callable[[argparse.Namespace], Coroutine[Any, Any, int]],
) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            import uvloop
        except ImportError:  # the base install: uvloop comes with felix[server]
            return asyncio.run(command(args))
        return uvloop.run(command(args))

    return run


# -- output ------------------------------------------------------------------------------


def _data_json(data: bytes) -> dict[str, str]:
    try:
        return {"data": data.decode("utf-8"), "encoding": "utf-8"}
    except UnicodeDecodeError:
        return {"data": base64.b64encode(data).decode("ascii"), "encoding": "base64"}


def _print_json(obj: Mapping[str, Any]) -> None:
    print(json.dumps(obj, ensure_ascii=False), flush=True)


def _print_bytes(data: bytes) -> None:
    sys.stdout.buffer.write(data + b"\n")
    sys.stdout.buffer.flush()


def _payload(text: str) -> bytes:
    return sys.stdin.buffer.read() if text == "-" else text.encode("utf-8")


def _headers(pairs: list[str]) -> dict[str, str]:
    headers = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise ConfigError(f"--header wants NAME=VALUE, got {pair!r}")
        headers[name] = value
    return headers


# -- commands ------------------------------------------------------------------------------


async def _pub(args: argparse.Namespace) -> int:
    data = _payload(args.data)
    headers = _headers(args.header)
    client: Client = await _connect(args)
    try:
        ack = await client.publish(args.stream, data, headers=headers, ack=not args.no_ack)
        await client.drain()
    finally:
        await client.close()
    if args.json:
        _print_json(
            {
                "stream": args.stream,
                "offset": ack.offset if ack else None,
                # What the ack promises (memory, written, synced); null without an ack.
                "durability": ack.durability.value if ack else None,
            }
        )
    elif ack is not None:
        print(ack.offset)
    return 0


def _start(text: str) -> StartSpec:
    if text == "latest":
        return "latest"
    if text == "earliest":
        return "earliest"
    try:
        return int(text)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(
            f"--start must be latest, earliest, an offset or an ISO 8601 time, not {text!r}"
        ) from None
    if when.tzinfo is None:
        raise ConfigError(
            f"--start {text}: give the time zone (2026-01-01T09:30:00Z or +02:00), "
            "a time without one would be a guess"
        )
    time_start(when)  # refuses times the wire cannot carry, before connecting
    return {"time": when}


def _print_message(message: Message | QueueMessage, as_json: bool) -> bool:
    """Print a record; False (and the reason on stderr, or as JSON) for one whose
    end-to-end encryption failed: its payload is never printed as plaintext."""
    error = message.e2e_error
    if error is not None:
        if as_json:
            _print_json(
                {
                    "stream": message.stream,
                    "offset": message.offset,
                    "e2e": "failed",
                    "reason": error.reason,
                    "error": str(error),
                    "headers": dict(message.headers),
                }
            )
        else:
            print(f"felix: {error}", file=sys.stderr, flush=True)
        return False
    if as_json:
        out: dict[str, Any] = {"stream": message.stream, "offset": message.offset}
        out.update(_data_json(message.data))
        out["headers"] = dict(message.headers)
        _print_json(out)
    else:
        _print_bytes(message.data)
    return True


def _on_event(event: ClientEvent) -> None:
    if isinstance(event, SlowConsumer):
        print(
            f"felix: {event.dropped} records of {event.stream} dropped "
            f"from offset {event.first_dropped} (subscriber too slow)",
            file=sys.stderr,
        )
    else:
        print(f"felix: {event.kind}", file=sys.stderr)


async def _sub(args: argparse.Namespace) -> int:
    start = _start(args.start)
    if args.count is not None and args.count < 1:
        raise ConfigError("--count must be at least 1")
    idle = math.inf if args.idle is None else args.idle
    async with _connect(args, on_event=_on_event) as client:
        received = 0
        async with client.subscribe(args.stream, start=start) as sub:
            while args.count is None or received < args.count:
                try:
                    message = await sub.next(timeout=None if idle == math.inf else idle)
                except FelixTimeoutError:
                    break
                _print_message(message, args.json)
                received += 1
    return 0


async def _consume(args: argparse.Namespace) -> int:
    if args.count is not None and args.count < 1:
        raise ConfigError("--count must be at least 1")
    idle = None if args.idle is None else args.idle
    async with _connect(args, on_event=_on_event) as client:
        received = 0
        async with client.consume(args.stream, args.group, prefetch=args.prefetch) as jobs:
            while args.count is None or received < args.count:
                batch = await jobs.fetch(1, timeout=idle)
                if not batch:
                    break
                job = batch[0]
                if job.e2e_error is not None:
                    # Not opened (unknown key, tampered): retried, dead-lettered in the end.
                    _print_message(job, args.json)
                    await job.nak(detail=f"e2e: {job.e2e_error}")
                elif args.json:
                    out: dict[str, Any] = {
                        "stream": args.stream,
                        "offset": job.offset,
                        "attempts": job.attempts,
                        "failures": job.failures,
                    }
                    out.update(_data_json(job.data))
                    out["headers"] = dict(job.headers)
                    _print_json(out)
                else:
                    _print_bytes(job.data)
                if not job.settled:
                    if args.nak:
                        await job.nak(detail="nak'ed by felix consume --nak")
                    else:
                        await job.ack()
                received += 1
    return 0


def _dlq_name(args: argparse.Namespace) -> str:
    if args.dlq:
        return str(args.dlq)
    ns, _, name = args.stream.rpartition("/")
    return f"{ns}/{dead_letter_name(name)}" if ns else dead_letter_name(name)


async def _dlq_list(args: argparse.Namespace) -> int:
    idle = args.idle
    async with _connect(args, on_event=_on_event) as client:
        seen = 0
        async with client.subscribe(_dlq_name(args), start="earliest") as sub:
            while args.count is None or seen < args.count:
                try:
                    message = await sub.next(timeout=idle)
                except FelixTimeoutError:
                    break
                seen += 1
                h = message.headers
                if args.json or args.peek:
                    out: dict[str, Any] = {"dlq_offset": message.offset}
                    out.update({k.removeprefix("felix-dlq-"): v for k, v in h.items()})
                    if args.peek:
                        out.update(_data_json(message.data))
                    _print_json(out)
                else:
                    print(
                        f"{message.offset}\t{h.get('felix-dlq-reason', '?')}\t"
                        f"{h.get('felix-dlq-stream', '?')}@{h.get('felix-dlq-offset', '?')}\t"
                        f"group={h.get('felix-dlq-group', '?')}\t"
                        f"failures={h.get('felix-dlq-failures', '?')}\t"
                        f"{h.get('felix-dlq-detail', '')}",
                        flush=True,
                    )
    return 0 if seen else EXIT_NOTHING


#: The queue group ``felix dlq replay`` uses on a dead-letter stream: each dead letter
#: is replayed once, whoever runs it, and a replay that dies midway resumes.
REPLAY_GROUP = "felix-replay"


async def _dlq_replay(args: argparse.Namespace) -> int:
    async with (
        _connect(args, on_event=_on_event) as client,
        client.consume(_dlq_name(args), REPLAY_GROUP, prefetch=16) as letters,
    ):
        with progress("replaying dead letters", args.count) as bar:
            replayed = await _replay_letters(args, client, letters, bar)
    if args.json:
        _print_json({"replayed": replayed})
    return 0 if replayed else EXIT_NOTHING


async def _replay_letters(
    args: argparse.Namespace, client: Client, letters: Any, bar: Progress
) -> int:
    """Republish dead letters to their streams until --count, or --idle without one."""
    replayed = 0
    while args.count is None or replayed < args.count:
        batch = await letters.fetch(1, timeout=args.idle)
        if not batch:
            break
        letter = batch[0]
        source = letter.headers.get("felix-dlq-stream", "")
        parts = source.split("/")
        if len(parts) != 3:
            await letter.term("no felix-dlq-stream header: not a felix dead letter")
            continue
        headers = {k: v for k, v in letter.headers.items() if not k.startswith("felix-dlq-")}
        dlq = _dlq_name(args)
        where = dlq if "/" in dlq else f"{args.namespace}/{dlq}"
        headers["felix-replayed-from"] = f"{parts[0]}/{where}@{letter.offset}"
        # A new message id: the source stream still remembers the original one (its
        # dedup window) and would take the replay for a duplicate and drop it. This one
        # keeps a replay idempotent.
        headers["felix-msg-id"] = f"replay:{parts[0]}/{where}@{letter.offset}"
        await client.publish(f"{parts[1]}/{parts[2]}", letter.data, headers=headers)
        await letter.ack()
        replayed += 1
        if not args.json:
            print(f"{letter.offset} -> {parts[1]}/{parts[2]}", flush=True)
        bar.advance()
    return replayed


async def _cache_get(args: argparse.Namespace) -> int:
    async with _connect(args) as client:
        value = await client.cache(args.name).get(args.key)
    if args.json:
        out: dict[str, Any] = {"cache": args.name, "key": args.key, "found": value is not None}
        if value is not None:
            out.update(_data_json(value))
        _print_json(out)
    elif value is not None:
        _print_bytes(value)
    return 0 if value is not None else EXIT_NOTHING


async def _cache_set(args: argparse.Namespace) -> int:
    value = _payload(args.value)
    async with _connect(args) as client:
        stored = await client.cache(args.name).set(
            args.key, value, ttl=args.ttl, nx=args.nx, xx=args.xx
        )
    if args.json:
        _print_json({"cache": args.name, "key": args.key, "stored": stored})
    elif not stored:
        print("not stored", file=sys.stderr)
    return 0 if stored else EXIT_NOTHING


async def _cache_del(args: argparse.Namespace) -> int:
    async with _connect(args) as client:
        existed = await client.cache(args.name).delete(args.key)
    if args.json:
        _print_json({"cache": args.name, "key": args.key, "deleted": existed})
    return 0 if existed else EXIT_NOTHING
