"""Results of the durable benchmark: durable.json, durable.md, the README section.

Ratios are *same-run*: for each repetition, felix's figure divided by the peer's
figure from the same repetition (they ran back to back), then the median and
min..max of those per-repetition ratios.
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from perf.harness import report as base
from perf.harness.stats import FIGURES, summarize

FELIX = ("felix commit", "felix interval", "felix none", "felix memory")
#: Which ratios the Markdown shows: felix system -> the systems it is compared with.
SHOWN_RATIOS = {
    "felix commit": ("rabbitmq", "jetstream sync", "jetstream", "felix memory"),
    "felix interval": ("jetstream", "felix memory"),
    "felix none": ("jetstream", "felix memory"),
    "felix memory": ("rabbitmq", "jetstream"),
}
RATIO_FIGURES = ("p50", "p99", "p99.9", "throughput")
# (label, workload id, figure, felix system, peer, goal, op): the targets.
TARGETS = [
    (
        f"commit-ack {size} at 64 in flight: acks/s >= 2x RabbitMQ",
        f"durable.publish.{size}.if64", "throughput", "felix commit", "rabbitmq", 2.0, ">=",
    )
    for size in ("64B", "1KiB")
] + [
    (
        f"commit-ack {size} at 64 in flight: acks/s >= JetStream",
        f"durable.publish.{size}.if64", "throughput", "felix commit", "jetstream", 1.0, ">=",
    )
    for size in ("64B", "1KiB")
] + [
    (
        f"commit-ack {size} at 1 in flight: p99 <= RabbitMQ",
        f"durable.publish.{size}.if1", "p99", "felix commit", "rabbitmq", 1.0, "<=",
    )
    for size in ("64B", "1KiB")
]  # fmt: skip


def metadata(
    args: Any,
    mode: dict[str, Any],
    systems: dict[str, Any],
    versions: dict[str, str],
    notes: dict[str, str],
    elapsed: float,
) -> dict[str, Any]:
    args.rate, args.window = None, None  # the base metadata reads these (pub/sub only)
    meta = base.metadata(args, mode, systems, versions, notes, elapsed)
    meta["settings"].update(
        replay_bytes=args.replay_bytes,
        replay_record_bytes=args.replay_record_bytes,
        topology=args.topology,
    )
    for k in ("rate", "window"):
        meta["settings"].pop(k, None)
    meta["promises"] = {n: s.promise for n, s in systems.items() if hasattr(s, "promise")}
    return meta


def _per_rep_ratios(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for fig in FIGURES:
        vals = [
            x[fig] / y[fig]
            for x, y in zip(a, b, strict=False)
            if x.get(fig) is not None and y.get(fig)
        ]
        out[fig] = (
            {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
            if vals
            else None
        )
    return out


def build(
    workloads: list[Any],
    meta: dict[str, Any],
    problems: dict[str, list[str]],
    filesystem: dict[str, str],
    targets_spec: list[tuple[str, str, str, str, str, float, str]] = TARGETS,
) -> dict[str, Any]:
    """Summaries, same-run ratios of each felix system to every other system of a
    workload, and ``targets_spec`` judged (label, workload id, figure, felix system,
    peer, goal, op): the issue's targets (the queue benchmark passes its own)."""
    meta = {**meta, "felix_log_problems": problems, "filesystem": filesystem}
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
        ratios: dict[str, dict[str, Any]] = {}
        for f in FELIX:
            if f not in systems:
                continue
            for other in wl.systems:
                if other != f and systems[other]["runs"] and systems[f]["runs"]:
                    ratios.setdefault(f, {})[other] = _per_rep_ratios(
                        systems[f]["runs"], systems[other]["runs"]
                    )
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
    for label, wid, fig, felix, peer, goal, op in targets_spec:
        r = ((by_id.get(wid, {}).get("ratios", {}).get(felix) or {}).get(peer) or {}).get(fig)
        ratio = r["median"] if r else None
        met = None if ratio is None else (ratio <= goal if op == "<=" else ratio >= goal)
        note = None
        if ratio is None:
            missing = [s for s in (felix, peer) if s in meta["unavailable"]]
            note = "; ".join(f"{s}: {meta['unavailable'][s]}" for s in missing) or "not measured"
        targets.append(
            {"target": label, "workload": wid, "figure": fig, "felix": felix, "peer": peer,
             "goal": f"{op} {goal}", "ratio": r, "met": met, "note": note}
        )  # fmt: skip
    return {"meta": meta, "workloads": wls, "targets": targets}


# --- Markdown -----------------------------------------------------------------------------


def _rcell(r: dict[str, float] | None) -> str:
    if not r:
        return "-"
    if r["min"] == r["max"]:
        return f"{r['median']:.2f}"
    return f"{r['median']:.2f} ({r['min']:.2f}-{r['max']:.2f})"


def _median_extra(runs: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def header(data: dict[str, Any]) -> list[str]:
    """The run, machine and versions, what each system's ack promises, what was skipped."""
    meta = data["meta"]
    m, v = meta["machine"], meta["versions"]
    fs = meta.get("filesystem") or {}
    lines = [
        f"Run {meta['date']} (commit {meta['commit']}), mode **{meta['mode']}**, "
        f"{meta['settings']['reps']} repetitions, {meta['elapsed_s']:.0f} s. Machine: "
        f"{m['cpus']} vCPU {m['cpu']}, Linux {m['kernel']}, Python {m['python']}, "
        f"load at end {m['loadavg_at_end']}."
        + (f" Disk: {fs['device']} ({fs['fstype']}, {fs['mount']})." if fs else ""),
        "",
        "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".",
        "",
        "What an ack promises:",
        "",
    ]
    said = _ack_levels(data)
    lines += [
        f"- **{n}**: {p}" + (f" (its acks said: {said[n]})" if n in said else "")
        for n, p in meta.get("promises", {}).items()
    ]
    for name, note in meta["unavailable"].items():
        lines += ["", f"**{name}**: {note}"]
    for name, probs in meta.get("felix_log_problems", {}).items():
        lines += ["", f"**{name} node logged**: " + "; ".join(f"`{p}`" for p in probs)]
    return lines


def markdown(data: dict[str, Any]) -> str:
    lines = header(data)
    lines += [
        "",
        "Each cell: median of the repetitions (min-max). Latency in microseconds from the "
        "publish call to its ack; throughput = acks per second; CPU per ack of the client "
        "(this process) and of the server processes.",
        "",
        "### Targets (issue #12)",
        "",
        "| target | felix/peer (same-run) | goal | result |",
        "|---|---|---|---|",
    ]
    for t in data["targets"]:
        result = t["note"] if t["met"] is None else ("met" if t["met"] else "**not met**")
        lines.append(f"| {t['target']} | {_rcell(t['ratio'])} | {t['goal']} | {result} |")
    pubs = [w for w in data["workloads"] if w["family"] == "publish"]
    lines += tables(pubs, "Durable publish with acks", "acks/s", SHOWN_RATIOS)
    lines += _where_time_goes(data)
    reps = [w for w in data["workloads"] if w["family"] == "replay"]
    for w in reps:
        lines += [
            "",
            f"### Replay: {w['title']}",
            "",
            "| system | records | records/s | MiB/s | fill records/s (first rep) | "
            "client CPU us/record | server CPU us/record | READs served from disk |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, s in w["systems"].items():
            if s["errors"] and not s["reps"]:
                lines.append(f"| {name} | failed: {s['errors'][0]} |")
                continue
            runs = s["runs"]
            mib = [r["mib_per_s"] for r in runs]
            fill = next((r["fill_records_per_s"] for r in runs if "fill_records_per_s" in r), None)
            reads = _spread([r["disk_reads"] for r in runs if "disk_reads" in r])
            lines.append(
                f"| {name} | {runs[0]['records'] if runs else '-'} | "
                f"{base._cell(s['summary'].get('throughput'))} | "
                f"{base._cell(_spread(mib))} | {'-' if fill is None else base._num(fill)} | "
                f"{base._cell(s['summary'].get('cpu_client_us'))} | "
                f"{base._cell(s['summary'].get('cpu_server_us'))} | {base._cell(reads)} |"
            )
    return "\n".join(lines) + "\n"


def tables(
    wls: list[dict[str, Any]], title: str, unit: str, shown: dict[str, tuple[str, ...]]
) -> list[str]:
    """The per-system table of ``wls`` (median (min-max) of every figure) under ``title``,
    then the same-run ratios of each felix system to the systems ``shown`` names."""
    if not wls:
        return []
    head = "| workload | system | " + " | ".join(base._FIG_HEAD[f] for f in FIGURES) + " |"
    sep = "|---|---|" + "---|" * len(FIGURES)
    lines = ["", f"### {title}", "", head.replace("ops/s", unit), sep]
    for w in wls:
        for name, s in w["systems"].items():
            if s["errors"] and not s["reps"]:
                lines.append(f"| {w['title']} | {name} | failed: {s['errors'][0]} |")
                continue
            cells = " | ".join(base._cell(s["summary"].get(f)) for f in FIGURES)
            lines.append(f"| {w['title']} | {name} | {cells} |")
    lines += [
        "",
        "### Same-run ratios (per repetition, then median (min-max); latency: lower is "
        f"better for felix, {unit}: higher)",
        "",
        f"| workload | felix / other | p50 | p99 | p99.9 | {unit} |",
        "|---|---|---|---|---|---|",
    ]
    for w in wls:
        for f, others in shown.items():
            for o in others:
                r = w["ratios"].get(f, {}).get(o)
                if r:
                    cells = " | ".join(_rcell(r[x]) for x in RATIO_FIGURES)
                    lines.append(f"| {w['title']} | {f} / {o} | {cells} |")
    return lines


def _ack_levels(data: dict[str, Any]) -> dict[str, str]:
    """What felix's publish acks said about durability, per system, over every run."""
    seen: dict[str, dict[str, int]] = {}
    for w in data["workloads"]:
        for name, s in w["systems"].items():
            for r in s["runs"]:
                for level, n in (r.get("ack_durability") or {}).items():
                    seen.setdefault(name, {}).setdefault(level, 0)
                    seen[name][level] += n
    return {
        name: ", ".join(f"{level} x{n}" for level, n in sorted(levels.items()))
        for name, levels in seen.items()
    }


def _spread(vals: list[float]) -> dict[str, float] | None:
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}


def _where_time_goes(data: dict[str, Any], family: str = "publish") -> list[str]:
    lines: list[str] = []
    disk = [w for w in data["workloads"] if w["family"] == "disk" and w["id"] != "disk.idle"]
    idle = next((w for w in data["workloads"] if w["id"] == "disk.idle"), None)
    background = None
    if idle is not None:
        runs = idle["systems"].get("fdatasync", {}).get("runs", [])
        background = _spread([r["dev_flushes"] / r["elapsed_s"] for r in runs if "elapsed_s" in r])
    if disk:
        lines += [
            "",
            "### Where the time goes: fdatasync on this disk (append, then fdatasync; "
            "latency of the fdatasync alone)",
            "",
            "| append | fdatasync p50 us | p99 us | p99.9 us | max us | fdatasyncs/s | "
            "write p50 us |",
            "|---|---|---|---|---|---|---|",
        ]
        for w in disk:
            s = w["systems"].get("fdatasync", {})
            summ = s.get("summary") or {}
            wp50 = _median_extra(s.get("runs", []), "write_p50_us")
            cells = " | ".join(
                base._cell(summ.get(f)) for f in ("p50", "p99", "p99.9", "max", "throughput")
            )
            wcell = "-" if wp50 is None else base._num(wp50)
            what = f"{w['params']['size']} B" + (
                " into a preallocated file" if w["params"].get("prealloc") else ""
            )
            lines.append(f"| {what} | {cells} | {wcell} |")
    rows = []
    for w in data["workloads"]:
        if w["family"] != family:
            continue
        for name, s in w["systems"].items():
            runs = s["runs"]
            if not runs:
                continue

            def col(key: str, scale: float = 1.0, runs: list[dict[str, Any]] = runs) -> str:
                vals = [scale * r[key] for r in runs if r.get(key) is not None]
                return base._cell(_spread(vals))

            flush_rate = _spread(
                [r["dev_flushes"] * r["throughput"] / r["ops"] for r in runs if "dev_flushes" in r]
            )
            rows.append(
                f"| {w['title']} | {name} | {col('fsyncs')} | {col('acks_per_fsync')} | "
                f"{col('fsync_mean_us')} | {base._cell(flush_rate)} | "
                f"{col('acks_per_dev_flush')} |"
            )
    if rows:
        lines += [
            "",
            "### Where the time goes: group commit",
            "",
            "felix's own fsyncs from the node's /metrics around each run (it may include the "
            "warmup's): `felix_fsync_seconds` (count, sum) and `felix_fsync_acks` (commit "
            "acks released by fsyncs); device flushes from /proc/diskstats for the disk "
            "under the data dirs (machine-wide: other processes' flushes count too, so "
            "acks per flush is a lower bound)."
            + (
                f" Background while idle: {base._cell(background)} device flushes/s."
                if background
                else ""
            ),
            "",
            "| workload | system | felix fsyncs | acks per fsync | fsync mean us | "
            "device flushes/s | acks per device flush |",
            "|---|---|---|---|---|---|---|",
            *rows,
        ]
    return lines


# --- files --------------------------------------------------------------------------------


def write_all(data: dict[str, Any], workloads: list[Any], out: Path, plots: bool = True) -> None:
    (out / "durable.json").write_text(json.dumps(data, indent=1) + "\n")
    (out / "durable.md").write_text(markdown(data))
    if plots:
        write_plot(workloads, out)
    write_raw(workloads, out / "durable_raw.npz")


def write_raw(workloads: list[Any], path: Path) -> None:
    """Every latency sample (ns), one int64 array per workload, system and repetition."""
    raw = {
        f"{wl.id}|{name}|{i}": r.samples
        for wl in workloads
        for name, runs in wl.runs.items()
        for i, r in enumerate(runs)
        if len(r.samples)
    }
    np.savez_compressed(path, **raw)


_COLORS = {
    "felix commit": "tab:blue",
    "felix interval": "tab:cyan",
    "felix none": "tab:purple",
    "felix memory": "tab:gray",
    "jetstream": "tab:olive",
    "jetstream sync": "tab:green",
    "rabbitmq": "tab:orange",
}


def write_plot(
    workloads: list[Any],
    out: Path,
    family: str = "publish",
    filename: str = "durable_latency.png",
    ylabel: str = "ack latency us",
) -> Path | None:
    """``filename``: latency percentile curves, one panel per workload of ``family``."""
    wls = [w for w in workloads if w.family == family and w.runs]
    if not wls:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from perf.harness.stats import percentile_curve

    cols = 2 if len(wls) > 1 else 1
    rows = (len(wls) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 2.8 * rows), squeeze=False)
    for ax, wl in zip(axes.flat, wls, strict=False):
        for name in wl.systems:
            runs = wl.runs.get(name, [])
            if not runs:
                continue
            pct, lat = percentile_curve(np.concatenate([r.samples for r in runs]))
            nines = [-np.log10(max(1e-9, 1 - p / 100)) for p in pct]
            ax.plot(nines, lat, label=name, color=_COLORS.get(name))
        ax.set_title(wl.title, fontsize=9)
        ax.set_yscale("log")
        ax.set_xticks([0, 1, 2, 3, 4])
        ax.set_xticklabels(["p0", "p90", "p99", "p99.9", "p99.99"], fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(wls) :]:
        ax.set_visible(False)
    fig.tight_layout()
    path = out / filename
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


BEGIN, END = "<!-- durable:begin -->", "<!-- durable:end -->"


def update_readme(
    readme: Path,
    out: Path,
    markers: tuple[str, str] = (BEGIN, END),
    md: str = "durable.md",
    png: str = "durable_latency.png",
) -> None:
    """Replace the text between the ``markers`` of ``readme`` with the latest tables."""
    begin, end = markers
    text = readme.read_text()
    if begin not in text or end not in text:
        raise SystemExit(f"{readme}: no {begin} ... {end} markers")
    body = (out / md).read_text()
    if (out / png).exists():
        rel = os.path.relpath(out / png, readme.parent)
        body += f"\n![{png.removesuffix('.png')}]({rel})\n"
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1]
    readme.write_text(f"{head}{begin}\n{body}{end}{tail}")
