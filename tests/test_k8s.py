"""The Kubernetes manifests in docker/k8s: schema-valid and consistent (no cluster here).

Schemas come from kubernetes-validate, which bundles the Kubernetes OpenAPI schemas
as JSON files: validation runs offline (the tests forbid sockets to make sure).
"""

from __future__ import annotations

import socket
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from felix.cli import _node_config, apply_config_file, build_parser

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "docker" / "k8s"
KUBERNETES_VERSION = "1.30"
CONFIG_MOUNT = "/etc/felix"

Doc = dict[str, Any]


def _load() -> list[tuple[str, Doc]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path.name, doc))
    return docs


DOCS = _load()


def _all(kind: str) -> list[Doc]:
    return [doc for _, doc in DOCS if doc["kind"] == kind]


def _one(kind: str) -> Doc:
    found = _all(kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def _statefulset() -> Doc:
    return _one("StatefulSet")


def _pod_spec() -> Doc:
    spec: Doc = _statefulset()["spec"]["template"]["spec"]
    return spec


def _container() -> Doc:
    containers = _pod_spec()["containers"]
    assert len(containers) == 1
    container: Doc = containers[0]
    return container


def _pod_labels() -> dict[str, str]:
    labels: dict[str, str] = _statefulset()["spec"]["template"]["metadata"]["labels"]
    return labels


def _config_text() -> str:
    config_map = _one("ConfigMap")
    text: str = config_map["data"]["felix.toml"]
    return text


def _config() -> dict[str, Any]:
    return tomllib.loads(_config_text())


def _port(name: str) -> Doc:
    ports = [p for p in _container()["ports"] if p["name"] == name]
    assert len(ports) == 1, name
    port: Doc = ports[0]
    return port


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the manifest tests must not use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_the_expected_objects_exist() -> None:
    kinds = sorted(doc["kind"] for _, doc in DOCS)
    assert kinds == [
        "ConfigMap",
        "PodDisruptionBudget",
        "Secret",
        "Service",
        "Service",
        "ServiceAccount",
        "StatefulSet",
    ]


@pytest.mark.parametrize(
    "doc",
    [doc for _, doc in DOCS],
    ids=[f"{f}:{d['kind']}/{d['metadata']['name']}" for f, d in DOCS],
)
def test_manifest_passes_kubernetes_schema(doc: Doc, no_network: None) -> None:
    # strict: unknown fields (a typo such as `protcol`) are errors too.
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_schema_validation_catches_mistakes(no_network: None) -> None:
    """The validator is real: a misspelt field and a bad protocol are refused."""
    service = _all("Service")[0]
    typo = {**service, "spec": {**service["spec"], "clusterIp": "None"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, KUBERNETES_VERSION, strict=True)
    sts = _statefulset()
    bad = {**sts, "spec": {**sts["spec"], "replicas": "three"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES_VERSION, strict=True)


def test_client_service_exposes_quic_over_udp() -> None:
    client = [s for s in _all("Service") if s["spec"].get("clusterIP") != "None"]
    assert len(client) == 1
    quic = [p for p in client[0]["spec"]["ports"] if p["name"] == "quic"]
    assert len(quic) == 1
    assert quic[0]["protocol"] == "UDP"  # the default, TCP, would carry nothing
    assert quic[0]["targetPort"] in ("quic", _port("quic")["containerPort"])
    assert _port("quic")["protocol"] == "UDP"
    listen_port = int(_config()["listen"].rsplit(":", 1)[1])
    assert _port("quic")["containerPort"] == listen_port


def test_every_service_selects_the_pods() -> None:
    labels = _pod_labels()
    assert _statefulset()["spec"]["selector"]["matchLabels"] == labels
    for service in _all("Service"):
        assert _matches(service["spec"]["selector"], labels), service["metadata"]["name"]
        container_ports = {p["name"]: p for p in _container()["ports"]}
        for port in service["spec"]["ports"]:
            target = container_ports[port["targetPort"]]
            assert port.get("protocol", "TCP") == target["protocol"]


def test_headless_service_is_the_statefulsets_service() -> None:
    headless = [s for s in _all("Service") if s["spec"].get("clusterIP") == "None"]
    assert len(headless) == 1
    assert _statefulset()["spec"]["serviceName"] == headless[0]["metadata"]["name"]


def test_probes_use_livez_startupz_and_readyz_on_the_http_port() -> None:
    container = _container()
    http_port = _port("http")
    assert http_port["protocol"] == "TCP"
    assert http_port["containerPort"] == int(_config()["http"].rsplit(":", 1)[1])
    expected = {"livenessProbe": "/livez", "readinessProbe": "/readyz", "startupProbe": "/startupz"}
    for probe, path in expected.items():
        get = container[probe]["httpGet"]
        assert get["path"] == path, probe
        assert get["port"] in ("http", http_port["containerPort"]), probe


def test_grace_period_covers_prestop_and_drain() -> None:
    command = _container()["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    assert pre_stop > 0
    drain_grace = float(_config()["drain-grace"])
    grace = _pod_spec()["terminationGracePeriodSeconds"]
    assert grace > pre_stop + drain_grace


def test_disruption_budget_is_one_pod_of_the_statefulset() -> None:
    pdb = _one("PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert _matches(pdb["spec"]["selector"]["matchLabels"], _pod_labels())


def test_service_account_mounts_no_token() -> None:
    account = _one("ServiceAccount")
    assert account["automountServiceAccountToken"] is False
    assert _pod_spec()["serviceAccountName"] == account["metadata"]["name"]
    assert _pod_spec()["automountServiceAccountToken"] is False


def test_cluster_database_comes_from_the_secret() -> None:
    container = _container()
    env = {e["name"]: e for e in container["env"]}
    ref = env["FELIX_CLUSTER"]["valueFrom"]["secretKeyRef"]
    secret = _one("Secret")
    assert ref["name"] == secret["metadata"]["name"]
    assert ref["key"] in secret["stringData"]
    assert secret["stringData"][ref["key"]].startswith("postgresql://")
    assert "PLACEHOLDER" in secret["stringData"][ref["key"]]
    # felix up reads $FELIX_CLUSTER: the DSN is never on the command line, nor in the
    # ConfigMap; the embedded control plane's store is the same database.
    args = container["args"]
    assert not any("postgresql" in a or "FELIX_CLUSTER" in a for a in args)
    assert "--control-store" not in args
    assert "cluster" not in _config() and "control-store" not in _config()


def test_replicas_are_one_cluster_of_pods_named_and_advertised_by_the_headless_service() -> None:
    sts = _statefulset()
    assert sts["spec"]["replicas"] > 1
    container = _container()
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    args = container["args"]
    assert args[args.index("--node-id") + 1] == "$(POD_NAME)"
    headless = sts["spec"]["serviceName"]
    port = _port("quic")["containerPort"]
    # Fully qualified: redirected clients resolve it whatever their namespace.
    assert (
        args[args.index("--advertise") + 1]
        == f"$(POD_NAME).{headless}.$(POD_NAMESPACE).svc.cluster.local:{port}"
    )
    # Both are defined before the args that use them ($(VAR) expands only those).
    names = [e["name"] for e in container["env"]]
    assert {"POD_NAME", "POD_NAMESPACE"} <= set(names)
    # Scaling down is not free: durable shards stay pinned to the pod removed.
    text = (K8S / "statefulset.yaml").read_text()
    assert "Scale freely" not in text and "Scaling DOWN strands" in text
    # The headless Service publishes the pods' names before they are ready: a node
    # redirects to a peer that may be starting (it answers Unavailable until it serves).
    peers = next(s for s in _all("Service") if s["metadata"]["name"] == headless)
    assert peers["spec"]["publishNotReadyAddresses"] is True
    assert any(p["name"] == "quic" and p["protocol"] == "UDP" for p in peers["spec"]["ports"])


def test_config_file_is_mounted_from_the_configmap() -> None:
    container = _container()
    args = container["args"]
    config_path = Path(args[args.index("--config") + 1])
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in _pod_spec()["volumes"]}
    mount = mounts["config"]
    assert config_path.parent == Path(mount["mountPath"])
    assert volumes["config"]["configMap"]["name"] == _one("ConfigMap")["metadata"]["name"]
    assert config_path.name in _one("ConfigMap")["data"]


def test_configmap_is_a_valid_felix_up_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    table = _config()
    up = build_parser().parse_args(["up"]).parser
    flags = {a.dest for a in up._actions if a.option_strings} - {"config", "help"}
    for key in table:
        assert key.replace("-", "_") in flags, f"not a felix up flag: {key}"

    config_file = tmp_path / "felix.toml"
    config_file.write_text(_config_text())
    store = "postgresql://felix:secret@postgres:5432/felix"
    # What the StatefulSet passes (the pod's name expanded); the data dir of the
    # manifests is the volume, here a writable stand-in.
    args_of_pod = [
        a.replace("$(POD_NAME)", "felix-1").replace("$(POD_NAMESPACE)", "streaming")
        for a in _container()["args"]
        if a != "--config"
    ]
    args_of_pod.remove("/etc/felix/felix.toml")
    argv = [
        "up",
        "--config",
        str(config_file),
        *args_of_pod,
        "--data-dir",
        str(tmp_path / "data"),
    ]
    monkeypatch.setenv("FELIX_CLUSTER", store)
    args = build_parser().parse_args(argv)
    apply_config_file(args.parser, args, argv)
    config = _node_config(args)
    assert config.listen == ("0.0.0.0", 5000)
    assert config.http == ("0.0.0.0", 8080)
    assert config.auth is True  # QUIC beyond loopback requires tokens
    assert config.insecure is True  # only for the health/metrics port
    assert config.cluster == store and config.control_store == store
    assert config.node_id == "felix-1"
    assert config.advertise == ("felix-1.felix-peers.streaming.svc.cluster.local", 5000)
    assert config.cluster_lease == float(table["cluster-lease"])
    assert config.drain_grace == float(table["drain-grace"])
    assert config.region == table["region"]  # beyond loopback a node names its region
    assert config.data_dir == (tmp_path / "data").resolve()


def test_data_dir_is_a_persistent_volume() -> None:
    assert _config()["data-dir"] == "/var/lib/felix/data"
    claims = _statefulset()["spec"]["volumeClaimTemplates"]
    assert [c["metadata"]["name"] for c in claims] == ["data"]
    mounts = {m["name"]: m["mountPath"] for m in _container()["volumeMounts"]}
    assert mounts["data"] == "/var/lib/felix/data"


def test_runs_locked_down_as_the_images_user() -> None:
    pod = _pod_spec()["securityContext"]
    container = _container()["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] == 10001
    assert container["runAsNonRoot"] is True and container["runAsUser"] == 10001
    assert container["readOnlyRootFilesystem"] is True
    assert container["allowPrivilegeEscalation"] is False
    assert container["capabilities"]["drop"] == ["ALL"]
    # A read-only root: every path felix writes is a volume.
    writable = {m["mountPath"] for m in _container()["volumeMounts"] if not m.get("readOnly")}
    assert {"/var/lib/felix/data", "/tmp", "/dev/shm"} <= writable


def test_image_and_resources() -> None:
    container = _container()
    assert container["image"] == "felix:0.1.0"
    assert "command" not in container  # keep the image's ENTRYPOINT (tini -- felix up)
    resources = container["resources"]
    for key in ("cpu", "memory"):
        assert key in resources["requests"] and key in resources["limits"]
