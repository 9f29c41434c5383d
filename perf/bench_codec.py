"""Codec benchmark: felix's compiled codec beside a plain-Python struct/json implementation.

Prints ns per encode+decode round trip for each frame, felix beside the baseline
from the same run (perf/baseline_codec.py), over several repeats (min / median /
max) because this machine is shared and noisy. Target: >= 5x for binary frames.

    .venv/bin/python perf/bench_codec.py [--repeats 7] [--number 20000]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import timeit
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from felix import wire
from perf import baseline_codec as ref

PAYLOAD = bytes(range(64))
SCOPE = ("acme", "prod", "orders")


def cases() -> list[tuple[str, Callable[[], object], Callable[[], object]]]:
    batch16 = [PAYLOAD] * 16

    def felix_publish_1() -> object:
        return wire.decode_publish_batch(
            wire.decode_frame(
                wire.encode_publish_batch(*SCOPE, [PAYLOAD], request_id=7, ack="per_batch")
            )
        )

    def base_publish_1() -> object:
        return ref.decode_publish_batch(
            ref.encode_publish_batch(*SCOPE, [PAYLOAD], request_id=7, ack="per_batch")
        )

    def felix_publish_16() -> object:
        return wire.decode_publish_batch(
            wire.decode_frame(wire.encode_publish_batch(*SCOPE, batch16))
        )

    def base_publish_16() -> object:
        return ref.decode_publish_batch(ref.encode_publish_batch(*SCOPE, batch16))

    def felix_cache_get() -> object:
        return wire.decode_ext(
            wire.decode_frame(
                wire.encode_cache_get(9, "acme", "prod", "sessions", "user:12345"), extensions=True
            )
        )

    def base_cache_get() -> object:
        return ref.decode_cache_request(
            ref.encode_cache_get(9, "acme", "prod", "sessions", "user:12345")
        )

    def felix_cache_value() -> object:
        return wire.decode_ext(
            wire.decode_frame(wire.encode_cache_value(9, PAYLOAD), extensions=True)
        )

    def base_cache_value() -> object:
        return ref.decode_cache_value(ref.encode_cache_value(9, PAYLOAD))

    deliveries16 = [(1000 + i, 1_767_225_600_000_000 + i, 1, 0, None, PAYLOAD) for i in range(16)]
    traced16 = [
        (o, t, a, f, {"trace": f"t-{o}", "type": "order"}, p) for o, t, a, f, _, p in deliveries16
    ]

    def felix_deliveries() -> object:
        return wire.decode_ext(
            wire.decode_frame(wire.encode_deliveries(7, deliveries16), extensions=True)
        )

    def base_deliveries() -> object:
        return ref.decode_deliveries(ref.encode_deliveries(7, deliveries16))

    def felix_deliveries_headers() -> object:
        return wire.decode_ext(
            wire.decode_frame(wire.encode_deliveries(7, traced16), extensions=True)
        )

    def base_deliveries_headers() -> object:
        return ref.decode_deliveries(ref.encode_deliveries(7, traced16))

    publish_msg = {
        "type": "publish",
        "tenant_id": "acme",
        "namespace": "prod",
        "stream": "orders",
        "payload": PAYLOAD,
        "request_id": 7,
        "ack": "per_message",
    }
    import base64

    def felix_json() -> object:
        return wire.decode_message(wire.decode_frame(wire.encode_message(publish_msg)))

    def base_json() -> object:
        m = dict(publish_msg, payload=base64.b64encode(PAYLOAD).decode())
        out = ref.decode_json(ref.encode_json(m))
        out["payload"] = base64.b64decode(str(out["payload"]))
        return out

    return [
        ("publish batch, 1 x 64 B, acked (0x0009)", felix_publish_1, base_publish_1),
        ("publish batch, 16 x 64 B (0x0001)", felix_publish_16, base_publish_16),
        ("cache get request (ext 0x01)", felix_cache_get, base_cache_get),
        ("cache value reply, 64 B (ext 0x81)", felix_cache_value, base_cache_value),
        ("deliveries, 16 x 64 B (ext 0xA1)", felix_deliveries, base_deliveries),
        (
            "deliveries, 16 x 64 B, 2 headers (ext 0xA1)",
            felix_deliveries_headers,
            base_deliveries_headers,
        ),
        ("JSON publish message (flags 0, validated)", felix_json, base_json),
    ]


def measure(fn: Callable[[], object], number: int, repeats: int) -> list[float]:
    return [t / number * 1e9 for t in timeit.repeat(fn, number=number, repeat=repeats)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--number", type=int, default=20000)
    args = ap.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Linux {platform.release()}")
    print(
        f"python {platform.python_version()}; ns per encode+decode; min / median / max of "
        f"{args.repeats} x {args.number}"
    )
    print()
    head = f"{'frame':44} {'felix ns':>22} {'baseline ns':>22} {'speedup (median)':>17}"
    print(head)
    print("-" * len(head))
    for name, felix_fn, base_fn in cases():
        f = measure(felix_fn, args.number, args.repeats)
        b = measure(base_fn, args.number, args.repeats)
        fs = f"{min(f):6.0f} / {statistics.median(f):6.0f} / {max(f):6.0f}"
        bs = f"{min(b):6.0f} / {statistics.median(b):6.0f} / {max(b):6.0f}"
        ratio = statistics.median(b) / statistics.median(f)
        print(f"{name:44} {fs:>22} {bs:>22} {ratio:16.1f}x")


if __name__ == "__main__":
    main()
