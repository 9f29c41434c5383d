"""Results of the queue benchmark: queue.json, queue.md, queue_latency.png, the README section.

Built on perf/durable's report: the same JSON shape (summaries over repetitions,
*same-run* ratios: per repetition felix's figure over the peer's from the same
repetition, then median and min..max), header, plot and group-commit table.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from perf.durable import report as durable

FELIX = ("felix commit", "felix interval")
SIZES = ("64B", "1KiB")
#: felix system -> the systems its same-run ratios are shown against.
SHOWN_RATIOS = {
    "felix commit": ("rabbitmq", "jetstream", "jetstream sync", "felix interval"),
    "felix interval": ("rabbitmq", "jetstream"),
}
# The targets (felix/peer), judged for each felix policy: (label, workload id,
# figure, peer, goal, op). The label names the size; the policy is a column.
_GOALS = [
    ("throughput at 32 in flight >= 2x RabbitMQ", "if32", "throughput", "rabbitmq", 2.0, ">="),
    ("throughput at 32 in flight >= JetStream", "if32", "throughput", "jetstream", 1.0, ">="),
    ("p99 at 32 in flight <= RabbitMQ", "if32", "p99", "rabbitmq", 1.0, "<="),
    ("p99 at 32 in flight <= JetStream", "if32", "p99", "jetstream", 1.0, "<="),
    ("p99 at 1 in flight <= RabbitMQ", "if1", "p99", "rabbitmq", 1.0, "<="),
    ("p99 at 1 in flight <= JetStream", "if1", "p99", "jetstream", 1.0, "<="),
]
TARGETS = [
    (f"{size}: {label}", f"queue.e2e.{size}.{inf}", fig, felix, peer, goal, op)
    for size in SIZES
    for label, inf, fig, peer, goal, op in _GOALS
    for felix in FELIX
]


def metadata(args: Any, *rest: Any) -> dict[str, Any]:
    """durable's metadata (same arguments), without its replay settings."""
    args.replay_bytes, args.replay_record_bytes = None, None
    meta = durable.metadata(args, *rest)
    for k in ("replay_bytes", "replay_record_bytes"):
        meta["settings"].pop(k, None)
    return meta


def build(
    workloads: list[Any], meta: dict[str, Any], problems: dict[str, list[str]]
) -> dict[str, Any]:
    return durable.build(workloads, meta, problems, {}, TARGETS)


# --- Markdown -----------------------------------------------------------------------------


def _sum_extra(runs: list[dict[str, Any]], key: str) -> int:
    return sum(int(r.get(key) or 0) for r in runs)


def markdown(data: dict[str, Any]) -> str:
    lines = durable.header(data)
    lines += [
        "",
        "Each cell: median of the repetitions (min-max). Latency in microseconds from the "
        "start of the publish call to the consumer having the record (end to end); "
        "throughput = records consumed per second; CPU per record of the client (this "
        "process: publisher and consumer) and of the server processes. Every record is "
        "published with the broker's ack and acked by the consumer.",
        "",
        "### Targets (issue #13; felix/peer, same-run ratios: median (min-max))",
        "",
        "| target | felix commit | felix interval | goal |",
        "|---|---|---|---|",
    ]
    rows: dict[str, dict[str, dict[str, Any]]] = {}
    for t in data["targets"]:
        rows.setdefault(t["target"], {})[t["felix"]] = t
    for label, by_felix in rows.items():
        judged: list[str] = []
        for felix in FELIX:
            t = by_felix.get(felix)
            if t is None or t["met"] is None:
                judged.append(f"- ({t['note']})" if t else "-")
            else:
                judged.append(
                    f"{durable._rcell(t['ratio'])} " + ("met" if t["met"] else "**not met**")
                )
        goal = next(iter(by_felix.values()))["goal"]
        lines.append(f"| {label} | {' | '.join(judged)} | {goal} |")
    wls = [w for w in data["workloads"] if w["family"] == "queue"]
    lines += durable.tables(
        wls, "Queue end to end: publish with ack, consume, ack", "msg/s", SHOWN_RATIOS
    )
    if wls:
        facts = []
        for name in dict.fromkeys(n for w in wls for n in w["systems"]):
            runs = [r for w in wls for r in w["systems"].get(name, {}).get("runs", [])]
            facts.append(
                f"{name}: {_sum_extra(runs, 'consumed')} consumed, "
                f"{_sum_extra(runs, 'redelivered')} redelivered, "
                f"{_sum_extra(runs, 'ack_errors')} failed acks"
            )
        lines += ["", "Consumers, over every run (warmups included): " + "; ".join(facts) + "."]
    lines += durable._where_time_goes(data, family="queue")
    return "\n".join(lines) + "\n"


# --- files --------------------------------------------------------------------------------


def write_all(data: dict[str, Any], workloads: list[Any], out: Path, plots: bool = True) -> None:
    (out / "queue.json").write_text(json.dumps(data, indent=1) + "\n")
    (out / "queue.md").write_text(markdown(data))
    if plots:
        durable.write_plot(
            workloads, out, family="queue", filename="queue_latency.png",
            ylabel="end-to-end latency us",
        )  # fmt: skip
    durable.write_raw(workloads, out / "queue_raw.npz")


BEGIN, END = "<!-- queue:begin -->", "<!-- queue:end -->"


def update_readme(readme: Path, out: Path) -> None:
    """Replace the text between the queue markers of ``readme`` with the latest tables."""
    durable.update_readme(readme, out, (BEGIN, END), "queue.md", "queue_latency.png")
