"""Results: JSON, a Markdown table with felix/peer ratios and targets, PNG plots."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np

from perf.harness.stats import FIGURES, percentile_curve, summarize

PEERS = ("redis", "nats", "rabbitmq", "jetstream")
#: More (system, peer) pairs with a ratio row: felix over shared memory beside Redis over
#: its Unix socket (and beside NATS for pub/sub). Keyed "system/peer" in ``ratios``.
PAIRS = (
    ("felix-shm", "redis-unix"),
    ("felix-shm", "redis"),
    ("felix-shm", "nats"),
    ("felix-shm 1x1e", "redis-unix"),
    ("felix-shm 1x1e", "nats"),
)
_FIG_HEAD = {
    "p50": "p50 us",
    "p90": "p90 us",
    "p99": "p99 us",
    "p99.9": "p99.9 us",
    "max": "max us",
    "throughput": "ops/s",
    "cpu_client_us": "client CPU us/op",
    "cpu_server_us": "server CPU us/op",
}

# (label, workload id, figure, peer, goal ratio, "<=" or ">=")
TARGETS = [
    ("cache get 1 in flight p50 <= Redis", "cache.get.64B.if1", "p50", "redis", 1.0, "<="),
    ("cache get 1 in flight p99 <= Redis", "cache.get.64B.if1", "p99", "redis", 1.0, "<="),
    (
        "cache get 32 in flight throughput >= 2x redis-py",
        "cache.get.64B.if32",
        "throughput",
        "redis",
        2.0,
        ">=",
    ),
    ("pub/sub fanout 1 p50 <= NATS", "pubsub.closed.f1.64B", "p50", "nats", 1.0, "<="),
    ("pub/sub fanout 1 p99 <= NATS", "pubsub.closed.f1.64B", "p99", "nats", 1.0, "<="),
    ("pub/sub fanout 16 p50 <= NATS", "pubsub.closed.f16.64B", "p50", "nats", 1.0, "<="),
    ("pub/sub fanout 16 p99 <= NATS", "pubsub.closed.f16.64B", "p99", "nats", 1.0, "<="),
    ("deliveries/s fanout 1 >= NATS", "pubsub.max.f1.64B", "throughput", "nats", 1.0, ">="),
    ("deliveries/s fanout 16 >= NATS", "pubsub.max.f16.64B", "throughput", "nats", 1.0, ">="),
    (
        "shm: cache get 1 in flight p50 <= Redis over its Unix socket",
        "cache.get.64B.if1",
        "p50",
        "felix-shm/redis-unix",
        1.0,
        "<=",
    ),
    (
        "shm: cache get 32 in flight throughput >= 2x Redis over its Unix socket",
        "cache.get.64B.if32",
        "throughput",
        "felix-shm/redis-unix",
        2.0,
        ">=",
    ),
]


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _git_commit() -> str:
    # Read-only: which commit the numbers belong to (HEAD file, no git command). In a
    # worktree .git is a file naming the worktree's git dir, whose refs live in the
    # common dir; a ref may be packed.
    root = Path(__file__).resolve().parents[2] / ".git"
    try:
        if root.is_file():
            root = (root.parent / root.read_text().split("gitdir:", 1)[1].strip()).resolve()
        common = root
        if (root / "commondir").exists():
            common = (root / (root / "commondir").read_text().strip()).resolve()
        head = (root / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head[:12]
        name = head[5:]
        for base in (root, common):
            if (base / name).exists():
                return (base / name).read_text().strip()[:12]
        packed = common / "packed-refs"
        if packed.exists():
            for line in packed.read_text().splitlines():
                if line.endswith(" " + name):
                    return line.split()[0][:12]
        return name
    except (OSError, IndexError):
        return "?"


def metadata(
    args: Any,
    mode: dict[str, Any],
    systems: dict[str, Any],
    versions: dict[str, str],
    notes: dict[str, str],
    elapsed: float,
) -> dict[str, Any]:
    load = os.getloadavg()
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": _git_commit(),
        "mode": args.mode,
        "settings": {
            **{k: (list(v) if isinstance(v, tuple) else v) for k, v in mode.items()},
            "scale": args.scale,
            "only": args.only,
            "rate": args.rate,
            "window": args.window,
        },
        "elapsed_s": round(elapsed, 1),
        "machine": {
            "cpus": os.cpu_count(),
            "cpu": _cpu_model(),
            "kernel": platform.release(),
            "python": platform.python_version(),
            "loadavg_at_end": [round(x, 2) for x in load],
        },
        "versions": {
            **versions,
            **{p: _version(p) for p in ("uvloop", "qh3", "redis", "hiredis", "nats-py")},
            "aio-pika": _version("aio-pika"),
            "numpy": _version("numpy"),
        },
        "servers": {name: getattr(s, "server", "?") for name, s in systems.items()},
        "unavailable": notes,
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def build(workloads: list[Any], meta: dict[str, Any]) -> dict[str, Any]:
    wls = []
    for wl in workloads:
        systems: dict[str, Any] = {}
        for name in wl.systems:
            runs = wl.runs.get(name, [])
            summary = summarize(runs) if runs else {}
            systems[name] = {
                "reps": len(runs),
                "summary": {k: (v.to_json() if v else None) for k, v in summary.items()},
                "runs": [{**r.figures(), "ops": r.ops, **r.extra} for r in runs],
                "errors": wl.errors.get(name, []),
            }
        ratios: dict[str, Any] = {}
        felix = systems.get("felix", {}).get("summary") or {}
        for peer in PEERS:
            other = systems.get(peer, {}).get("summary") or {}
            if felix and other:
                ratios[peer] = {
                    f: _ratio(
                        (felix.get(f) or {}).get("median"), (other.get(f) or {}).get("median")
                    )
                    for f in FIGURES
                }
        for name, peer in PAIRS:
            mine = systems.get(name, {}).get("summary") or {}
            other = systems.get(peer, {}).get("summary") or {}
            if mine and other:
                ratios[f"{name}/{peer}"] = {
                    f: _ratio((mine.get(f) or {}).get("median"), (other.get(f) or {}).get("median"))
                    for f in FIGURES
                }
        wls.append(
            {
                "id": wl.id,
                "family": wl.family,
                "title": wl.title,
                "params": wl.params,
                "systems": systems,
                "ratios": ratios,
            }
        )
    by_id = {w["id"]: w for w in wls}
    targets = []
    for label, wid, fig, peer, goal, op in TARGETS:
        ratio = (by_id.get(wid, {}).get("ratios", {}).get(peer) or {}).get(fig)
        met = None if ratio is None else (ratio <= goal if op == "<=" else ratio >= goal)
        targets.append(
            {"target": label, "workload": wid, "figure": fig, "peer": peer, "goal": f"{op} {goal}",
             "ratio": ratio, "met": met}
        )  # fmt: skip
    queue = by_id.get("queue.ack.64B.if32", {}).get("systems", {})
    refs = [
        f"{label} reference {thr['median']:.0f} msg/s at 32 in flight"
        for name, label in (("rabbitmq", "RabbitMQ"), ("jetstream", "JetStream"))
        if (thr := (queue.get(name, {}).get("summary") or {}).get("throughput"))
    ]
    targets.append(
        {
            "target": "queue throughput >= 2x RabbitMQ",
            "workload": "queue.ack.64B.if32",
            "figure": "throughput",
            "peer": "rabbitmq",
            "goal": ">= 2.0",
            "ratio": None,
            "met": None,
            "note": "; ".join([f"measured by {QUEUE_BENCH}", *(f"transient {r}" for r in refs)]),
        }
    )
    return {"meta": meta, "workloads": wls, "targets": targets}


# --- Markdown -----------------------------------------------------------------------------


def _num(v: float) -> str:
    if v >= 1000:
        return f"{v:,.0f}".replace(",", " ") if v >= 100000 else f"{v:.0f}"
    if v >= 10:
        return f"{v:.0f}"
    return f"{v:.1f}"


def _cell(s: dict[str, float] | None) -> str:
    if not s:
        return "-"
    if s["min"] == s["max"]:
        return _num(s["median"])
    return f"{_num(s['median'])} ({_num(s['min'])}-{_num(s['max'])})"


def _rcell(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}"


QUEUE_BENCH = "`python -m perf queue` (durable queues, issue #13)"
FAMILY_TITLES = {
    "floor": "Floor: echo between two processes (what this machine allows)",
    "cache": "Cache: felix vs Redis (redis-py + hiredis); felix-shm: felix+shm:// on the "
    "same node, redis-unix: Redis over its Unix socket",
    "pubsub": "Pub/sub: felix vs NATS (nats-py); latency per delivery",
    "queue": "Queue: transient references only, not durable: RabbitMQ (aio-pika, a transient "
    "classic queue, publisher confirms, manual acks), NATS JetStream (nats-py, memory "
    "storage, push consumer, explicit acks)",
    "knobs": "felix knobs: topology (gateways x shards, e = --embedded-shards), publish batch "
    "(felix = the main node above; each other node runs the same workloads in the same "
    "repetition)",
}


def markdown(data: dict[str, Any]) -> str:
    meta = data["meta"]
    m = meta["machine"]
    v = meta["versions"]
    lines = [
        f"Run {meta['date']} (commit {meta['commit']}), mode **{meta['mode']}**, "
        f"{meta['settings']['reps']} repetitions, {meta['elapsed_s']:.0f} s. Machine: "
        f"{m['cpus']} vCPU {m['cpu']}, Linux {m['kernel']}, Python {m['python']}, "
        f"load at end {m['loadavg_at_end']}.",
        "",
        "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".",
        "",
        f"felix node: `felix up {' '.join(meta.get('felix_node', {}).get('args', []))}` "
        f"({meta.get('felix_node', {}).get('label', '?')}).",
        "",
        "Each cell: median of the repetitions (min-max). Latency in microseconds; "
        "throughput = operations (pub/sub: deliveries) per second; CPU = CPU time per "
        "operation of the client (this process) and of the server processes. "
        "`felix/peer` rows: ratio of the medians (latency and CPU: lower is better for "
        "felix; throughput: higher).",
    ]
    for name, note in meta["unavailable"].items():
        lines += ["", f"**{name}**: {note}"]
    for label, problems in meta.get("felix_log_problems", {}).items():
        lines += ["", f"**felix node {label} logged**: " + "; ".join(f"`{p}`" for p in problems)]
    lines += ["", "### Targets", "", "| target | felix/peer | goal | result |", "|---|---|---|---|"]
    for t in data["targets"]:
        result = "n/a" if t["met"] is None else ("met" if t["met"] else "**not met**")
        if t.get("note"):
            result = t["note"]
        lines.append(f"| {t['target']} | {_rcell(t['ratio'])} | {t['goal']} | {result} |")
    head = "| workload | system | " + " | ".join(_FIG_HEAD[f] for f in FIGURES) + " |"
    sep = "|---|---|" + "---|" * len(FIGURES)
    for family in ("floor", "cache", "pubsub", "queue", "knobs"):
        wls = [w for w in data["workloads"] if w["family"] == family]
        if family == "queue":
            lines += ["", f"### {FAMILY_TITLES[family]}", ""]
            lines.append(
                f"felix: measured by {QUEUE_BENCH}, beside a RabbitMQ quorum queue and a "
                'JetStream work-queue stream with file storage (perf/README.md, "Queues").'
            )
            if not wls:
                continue
            lines.append("")
        elif not wls:
            continue
        else:
            lines += ["", f"### {FAMILY_TITLES[family]}", ""]
        lines += [head, sep]
        for w in wls:
            for name, s in w["systems"].items():
                if s["errors"] and not s["reps"]:
                    lines.append(f"| {w['title']} | {name} | failed: {s['errors'][0]} |")
                    continue
                cells = " | ".join(_cell(s["summary"].get(f)) for f in FIGURES)
                lines.append(f"| {w['title']} | {name} | {cells} |")
            for peer, ratios in w["ratios"].items():
                cells = " | ".join(_rcell(ratios[f]) for f in FIGURES)
                pair = peer if "/" in peer else f"felix/{peer}"
                lines.append(f"| {w['title']} | *{pair}* | {cells} |")
    open_rows = [
        (w["title"], name, run.get("send_lag_p50_us"), run.get("send_lag_p99_us"), run.get("lost"))
        for w in data["workloads"]
        if w["id"].startswith("pubsub.open")
        for name, s in w["systems"].items()
        for run in s["runs"][:1]
    ]
    if open_rows:
        lines += [
            "",
            "Open loop: the publisher's own lateness against the schedule (first repetition; "
            "included in the latencies above; negative: the loop's millisecond timer fired "
            "early, and such records carry their real send time) and records lost:",
            "",
            "| workload | system | send lag p50 us | send lag p99 us | lost |",
            "|---|---|---|---|---|",
        ]
        for title, name, lag50, lag99, lost in open_rows:
            lines.append(f"| {title} | {name} | {lag50:.0f} | {lag99:.0f} | {lost} |")
    return "\n".join(lines) + "\n"


# --- files and plots ----------------------------------------------------------------------


def write_all(data: dict[str, Any], workloads: list[Any], out: Path, plots: bool = True) -> None:
    (out / "results.json").write_text(json.dumps(data, indent=1) + "\n")
    (out / "results.md").write_text(markdown(data))
    raw = {
        f"{wl.id}|{name}|{i}": r.samples
        for wl in workloads
        for name, runs in wl.runs.items()
        for i, r in enumerate(runs)
    }
    np.savez_compressed(out / "raw.npz", **raw)
    if plots:
        write_plots(data, workloads, out)


def _pooled(runs: list[Any]) -> Any:
    return np.concatenate([r.samples for r in runs]) if runs else np.empty(0, dtype=np.int64)


_COLORS = {
    "jetstream": "tab:olive",
    "felix": "tab:blue",
    "felix-shm": "tab:cyan",
    "felix-shm 1x1e": "tab:brown",
    "redis": "tab:red",
    "redis-unix": "tab:pink",
    "nats": "tab:green",
    "rabbitmq": "tab:orange",
    "udp-echo": "tab:gray",
    "tcp-echo": "black",
    "quic-echo": "tab:purple",
}


def write_plots(data: dict[str, Any], workloads: list[Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    for family in ("floor", "cache", "pubsub", "queue"):
        wls = [w for w in workloads if w.family == family and w.runs]
        if not wls:
            continue
        cols = 2 if len(wls) > 1 else 1
        rows = (len(wls) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 2.8 * rows), squeeze=False)
        for ax, wl in zip(axes.flat, wls, strict=False):
            for name in wl.systems:
                pct, lat = percentile_curve(_pooled(wl.runs.get(name, [])))
                if not pct:
                    continue
                nines = [-np.log10(max(1e-9, 1 - p / 100)) for p in pct]
                ax.plot(nines, lat, label=name, color=_COLORS.get(name))
            ax.set_title(wl.title, fontsize=9)
            ax.set_yscale("log")
            ax.set_xticks([0, 1, 2, 3, 4])
            ax.set_xticklabels(["p0", "p90", "p99", "p99.9", "p99.99"], fontsize=8)
            ax.set_ylabel("latency us", fontsize=8)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(wls) :]:
            ax.set_visible(False)
        fig.tight_layout()
        path = out / f"latency_{family}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)
    tput = _throughput_plot(data, out, plt)
    if tput is not None:
        written.append(tput)
    return written


def _throughput_plot(data: dict[str, Any], out: Path, plt: Any) -> Path | None:
    series: dict[str, list[tuple[int, dict[str, float]]]] = {}
    for w in data["workloads"]:
        if w["id"].startswith(("cache.get.64B.", "floor.echo.64B.")):
            inf = w["params"]["in_flight"]
            for name, s in w["systems"].items():
                thr = s["summary"].get("throughput") if s["summary"] else None
                if thr:
                    label = name if w["family"] == "cache" else f"{name} (floor)"
                    series.setdefault(label, []).append((inf, thr))
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for label, pts in sorted(series.items()):
        pts.sort()
        xs = [p[0] for p in pts]
        ys = [p[1]["median"] for p in pts]
        lo = [p[1]["median"] - p[1]["min"] for p in pts]
        hi = [p[1]["max"] - p[1]["median"] for p in pts]
        style = "--" if "(floor)" in label else "-"
        ax.errorbar(
            xs, ys, yerr=[lo, hi], label=label, linestyle=style, marker="o", capsize=3,
            color=_COLORS.get(label.removesuffix(" (floor)")),
        )  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xlabel("requests in flight")
    ax.set_ylabel("ops/s (cache get 64 B; echo 64 B)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "throughput_vs_inflight.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def update_readme(readme: Path, out: Path) -> None:
    """Replace the text between the results markers of ``readme`` with the latest table."""
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{readme}: no {BEGIN} ... {END} markers")
    rel = os.path.relpath(out, readme.parent)
    pngs = sorted(p.name for p in out.glob("*.png"))
    images = "\n".join(f"![{p[:-4]}]({rel}/{p})" for p in pngs)
    body = (out / "results.md").read_text()
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    readme.write_text(f"{head}{BEGIN}\n{body}\n{images}\n{END}{tail}")
