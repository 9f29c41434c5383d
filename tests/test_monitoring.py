"""The Grafana dashboard and Prometheus alerting rules in docker/monitoring/: every
expression parses as PromQL and names only metrics and labels a real node exports."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml

from tests.nodeproc import NodeProcess

pytestmark = pytest.mark.timeout(120)

MONITORING = Path(__file__).resolve().parent.parent / "docker" / "monitoring"
#: Labels Prometheus adds to every scraped series.
SCRAPE_LABELS = {"instance", "job"}
#: Series Prometheus makes itself.
SCRAPE_SERIES = {"up"}
#: Grafana's variables, replaced by values of the same type before parsing.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$instance": ".*"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[set[str], set[str]]:
    """(metric names, label names) on the /metrics of a real node with two gateways."""
    node = NodeProcess(tmp_path_factory.mktemp("monitoring") / "node", "--durable-streams")
    try:
        # Children report their counters every second: scrape until two scrapes
        # 1.5 s apart name the same series.
        deadline = time.monotonic() + 30
        previous = ""
        while True:
            status, text = node.http("/metrics")
            series = "".join(sorted({line.split(" ")[0] for line in text.splitlines()}))
            if series == previous or time.monotonic() > deadline:
                break
            previous = series
            time.sleep(1.5)
    finally:
        node.stop()
    assert status == 200
    names: set[str] = set()
    labels: set[str] = set()
    for line in text.splitlines():
        if line.startswith("#") or not line:
            continue
        match = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([^}]*)\})?", line)
        assert match, line
        names.add(match.group(1))
        labels.update(re.findall(r'([a-zA-Z_]\w*)="', match.group(3) or ""))
    return names, labels


def _walk(node: Any) -> Iterator[Any]:
    yield node
    for attr in ("lhs", "rhs", "expr", "param", "vector_selector"):
        child = getattr(node, attr, None)
        if child is not None:
            yield from _walk(child)
    for arg in getattr(node, "args", None) or ():
        yield from _walk(arg)


def _names_and_labels(expr: str) -> tuple[set[str], set[str]]:
    """Parse ``expr`` (raises ValueError if it is not PromQL); the metric names its
    selectors name and the labels it matches on or aggregates by."""
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    names: set[str] = set()
    labels: set[str] = set()
    for node in _walk(promql_parser.parse(expr)):
        if isinstance(node, promql_parser.VectorSelector):
            if node.name:
                names.add(node.name)
            labels.update(m.name for m in node.matchers.matchers if m.name != "__name__")
        modifier = getattr(node, "modifier", None)
        labels.update(getattr(modifier, "labels", None) or ())
    return names, labels


def _check(expr: str, exported: tuple[set[str], set[str]], where: str) -> None:
    names, labels = _names_and_labels(expr)
    assert names, f"{where}: {expr} names no metric"
    unknown = names - exported[0] - SCRAPE_SERIES
    assert not unknown, f"{where}: {sorted(unknown)} is not exported by a node"
    stray = labels - exported[1] - SCRAPE_LABELS
    assert not stray, f"{where}: label(s) {sorted(stray)} are on no felix series"


def test_the_expression_checker_catches_typos_and_unknown_names() -> None:
    with pytest.raises(ValueError):
        _names_and_labels("rate(felix_requests_total[5m]")
    names, labels = _names_and_labels(
        'sum by (role) (rate(felix_requests_total{instance=~"$instance"}[$__rate_interval]))'
        " / on (role) sum by (role) (felix_connections)"
    )
    assert names == {"felix_requests_total", "felix_connections"}
    assert labels == {"role", "instance"}
    with pytest.raises(AssertionError, match="felix_requets_total"):
        _check("rate(felix_requets_total[5m])", ({"felix_requests_total"}, set()), "typo")


def test_alerting_rules_are_well_formed_and_name_real_metrics(
    exported: tuple[set[str], set[str]],
) -> None:
    rules = yaml.safe_load((MONITORING / "felix-alerts.yaml").read_text())
    seen: set[str] = set()
    for group in rules["groups"]:
        assert group["name"] and group["rules"]
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
            name = rule["alert"]
            assert re.fullmatch(r"Felix[A-Z]\w+", name) and name not in seen, name
            seen.add(name)
            assert rule["labels"]["severity"] in {"critical", "warning", "info"}
            assert rule["annotations"]["summary"] and rule["annotations"]["description"]
            if "for" in rule:
                assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["for"]
            _check(rule["expr"], exported, name)
    # What the alerts must cover (issue #17): restarts, slow consumers, full rings,
    # budget trims, auth failures, stalled queues, disk.
    covered = " ".join(rule["expr"] for g in rules["groups"] for rule in g["rules"])
    for metric in (
        "felix_process_restarts_total",
        "felix_slow_consumer_events_total",
        "felix_ring_full_events_total",
        "felix_budget_trims_total",
        "felix_auth_failures_total",
        "felix_queue_stalled_groups",
        "felix_disk_refused_total",
    ):
        assert metric in covered, metric


def test_dashboard_is_well_formed_and_its_queries_name_real_metrics(
    exported: tuple[set[str], set[str]],
) -> None:
    dash = json.loads((MONITORING / "felix-dashboard.json").read_text())
    assert dash["uid"] and dash["title"] and isinstance(dash["schemaVersion"], int)
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    _check(
        variables["instance"]["definition"].replace("label_values(", "").split(",")[0],
        exported,
        "instance variable",
    )
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: set[tuple[int, int]] = set()
    queries = 0
    for panel in dash["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        area = {(pos["x"] + dx, pos["y"] + dy) for dx in range(pos["w"]) for dy in range(pos["h"])}
        assert not area & cells, f"panel {panel['title']!r} overlaps another"
        cells |= area
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}"
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            _check(target["expr"], exported, f"panel {panel['title']!r}")
            queries += 1
    assert queries >= 20
