"""deploy/kubernetes, checked statically (no cluster): every overlay is built with `kubectl kustomize`, every object
is validated against the Kubernetes API schemas (kubernetes-validate, strict: unknown fields fail) or, for the
custom resources, against our own schemas in tests/unit/data/, and what ties the objects together is checked:
probes on declared ports, a grace period that covers the drain, selectors that pick the gateway pods alone,
autoscalers and the InferencePool aimed at the Deployment, and only real settings in the environment."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml

from gateway import loadmetrics
from lifecycle.settings import VARIABLES

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "kubernetes"
DATA = Path(__file__).parent / "data"
OVERLAYS = sorted(path for path in (DEPLOY / "overlays").iterdir() if (path / "kustomization.yaml").is_file())
COMPONENTS = sorted(path for path in (DEPLOY / "components").iterdir() if (path / "kustomization.yaml").is_file())
# The oldest Kubernetes the manifests claim (kubectl 1.32 here) and the newest kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.32", kubernetes_validate.latest_version())
KUSTOMIZE_TIMEOUT = 20
# Custom resources: kubernetes-validate knows only built-in kinds.
CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): DATA / "keda_scaledobject.schema.json",
    ("inference.networking.k8s.io/v1", "InferencePool"): DATA / "inferencepool_v1.schema.json",
}
# The gauges the autoscalers and the endpoint picker read from the gateway's /metrics (label `model`).
GATEWAY_METRICS = loadmetrics.SERIES
SETTINGS = frozenset(var.name for var in VARIABLES)
NAME = "llama-gguf-inference"
POD_LABELS = {"app.kubernetes.io/name": NAME}


class ManifestError(AssertionError):
    """An object the validation rejects."""


def kubectl() -> str:
    found = shutil.which("kubectl")
    if found is None:
        pytest.fail("kubectl is not on PATH: `make test` installs it (tests/tools/ensure.sh); kubectl 1.27+ is "
                    "needed, for kustomize components")
    return found


def kustomize(directory: Path) -> list[dict[str, Any]]:
    try:
        done = subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True, text=True,
                              timeout=KUSTOMIZE_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"kubectl kustomize {directory} took over {KUSTOMIZE_TIMEOUT}s")
    assert done.returncode == 0, f"kubectl kustomize {directory} failed:\n{done.stderr}"
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc is not None]


def _crd_validator(path: Path) -> jsonschema.protocols.Validator:
    schema = json.loads(path.read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


CRD_VALIDATORS = {key: _crd_validator(path) for key, path in CRD_SCHEMAS.items()}


def validate(obj: dict[str, Any]) -> None:
    """Raise ManifestError unless `obj` is valid for every KUBERNETES_VERSIONS (or its CRD schema)."""
    key = (obj.get("apiVersion"), obj.get("kind"))
    where = f"{key[1]} {obj.get('metadata', {}).get('name')!r} ({key[0]})"
    validator = CRD_VALIDATORS.get(key)  # type: ignore[arg-type]
    if validator is not None:
        errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
        if errors:
            raise ManifestError(f"{where}: " + "; ".join(
                f"{'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}" for e in errors))
        return
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError as exc:
            raise ManifestError(f"{where}: unknown kind, no schema for Kubernetes {version} ({exc.message}); a "
                                "custom resource needs its schema in CRD_SCHEMAS") from None
        except kubernetes_validate.ValidationError as exc:
            path = "/".join(map(str, exc.absolute_path)) or "(top)"
            raise ManifestError(f"{where}, Kubernetes {version}: {path}: {exc.message}") from None


@pytest.fixture(scope="module", params=OVERLAYS, ids=[path.name for path in OVERLAYS])
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param.name, kustomize(request.param)


def find(objs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = find(objs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name!r}, found {len(found)}"
    return found[0]


def gateway_container(objs: list[dict[str, Any]]) -> dict[str, Any]:
    containers = one(objs, "Deployment", NAME)["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["gateway"]
    return containers[0]


def settings_in(objs: list[dict[str, Any]]) -> dict[str, str]:
    """The gateway's effective settings: the table's defaults, then its ConfigMap, then literal env values."""
    values = {var.name: str(var.default) for var in VARIABLES if var.default is not None}
    values.update(one(objs, "ConfigMap", NAME).get("data", {}))
    values.update({e["name"]: e["value"] for e in gateway_container(objs).get("env", []) if "value" in e})
    return values


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def pod_templates(objs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, str]]]:
    for obj in find(objs, "Deployment"):
        yield obj["metadata"]["name"], obj["spec"]["template"]["metadata"].get("labels", {})


def assert_selects_gateway_only(objs: list[dict[str, Any]], selector: dict[str, str], what: str) -> None:
    picked = [name for name, labels in pod_templates(objs) if selects(selector, labels)]
    assert picked == [NAME], f"{what} selector {selector} picks the pods of {picked}, not the gateway's alone"


def port_number(container: dict[str, Any], port: int | str) -> int:
    """A probe's or Service's port (a number or a name) as one of the container's declared ports."""
    declared = {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}
    if isinstance(port, str):
        assert port in declared, f"port {port!r} is not a declared container port ({sorted(declared)})"
        return declared[port]
    assert port in declared.values(), f"port {port} is not a declared container port ({declared})"
    return port


def pre_stop_seconds(container: dict[str, Any]) -> int:
    pre_stop = container.get("lifecycle", {}).get("preStop")
    assert pre_stop, "the gateway needs a preStop wait: endpoints drop a terminating pod after it got SIGTERM"
    if "sleep" in pre_stop:
        return int(pre_stop["sleep"]["seconds"])
    command = pre_stop["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2, f"preStop {command}: expected ['sleep', N]"
    return int(command[1])


# --- schemas -------------------------------------------------------------------------------------------------


def test_every_object_is_valid(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, objs = rendered
    assert objs
    for obj in objs:
        validate(obj)


def test_the_example_secret_is_valid_and_not_applied() -> None:
    example = yaml.safe_load((DEPLOY / "base" / "secret.example.yaml").read_text())
    validate(example)
    assert example["metadata"]["name"] == f"{NAME}-keys" and "api_keys.txt" in example["stringData"]
    base = yaml.safe_load((DEPLOY / "base" / "kustomization.yaml").read_text())
    assert "secret.example.yaml" not in base["resources"]  # `apply -k` must never put the placeholder back


def test_every_component_is_in_an_overlay() -> None:
    """So that every shipped manifest is built and validated here."""
    used: set[Path] = set()

    def walk(directory: Path) -> None:
        spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
        for ref in [*spec.get("resources", []), *spec.get("components", [])]:
            path = (directory / ref).resolve()
            if (path / "kustomization.yaml").is_file() and path not in used:
                used.add(path)
                walk(path)

    for overlay in OVERLAYS:
        walk(overlay)
    assert {path.resolve() for path in COMPONENTS} <= used, "components no overlay uses: " + ", ".join(
        sorted(str(p.relative_to(DEPLOY)) for p in COMPONENTS if p.resolve() not in used))


@pytest.mark.parametrize(("obj", "problem"), [
    ({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"},
      "spec": {"replicas": "two", "selector": {"matchLabels": {"a": "b"}},
               "template": {"metadata": {"labels": {"a": "b"}}, "spec": {"containers": [{"name": "c"}]}}}},
     "replicas"),
    ({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"},
      "spec": {"ports": [{"port": 80}], "selectr": {"a": "b"}}}, "selectr"),
    ({"apiVersion": "v1", "kind": "Servce", "metadata": {"name": "x"}}, "unknown kind"),
    ({"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "metadata": {"name": "x"},
      "spec": {"scaleTargetRef": {"name": "x"},
               "triggers": [{"type": "prometheus", "metadata": {"serverAddress": "http://p:9090", "query": "q",
                                                                 "threshold": "1", "metricName": "old"}}]}},
     "metricName"),
    ({"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "metadata": {"name": "x"},
      "spec": {"scaleTargetRef": {"name": "x"}, "maxReplicaCount": "4",
               "triggers": [{"type": "prometheus", "metadata": {"serverAddress": "http://p:9090", "query": "q",
                                                                 "threshold": "1"}}]}},
     "maxReplicaCount"),
    ({"apiVersion": "inference.networking.k8s.io/v1", "kind": "InferencePool", "metadata": {"name": "x"},
      "spec": {"selector": {"matchLabels": {"a": "b"}}, "targetPortNumber": 8000,
               "endpointPickerRef": {"name": "epp", "port": {"number": 9002}}}},
     "targetPortNumber"),
    ({"apiVersion": "inference.networking.k8s.io/v1", "kind": "InferencePool", "metadata": {"name": "x"},
      "spec": {"selector": {"matchLabels": {"a": "b"}}, "targetPorts": [{"number": 8000}],
               "endpointPickerRef": {"name": "epp"}}},
     "port"),
])
def test_broken_manifests_are_rejected(obj: dict[str, Any], problem: str) -> None:
    with pytest.raises(ManifestError, match=problem):
        validate(obj)


# --- the gateway Deployment ----------------------------------------------------------------------------------


def test_probes_use_the_right_ports_and_paths(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, objs = rendered
    container = gateway_container(objs)
    settings = settings_in(objs)
    health, http = int(settings["PORT_HEALTH"]), int(settings["PORT"])
    assert port_number(container, "http") == http and port_number(container, "health") == health
    # liveness (and the startup probe before it): the health port, 200 while the model is fetched and loaded
    for probe in ("startupProbe", "livenessProbe"):
        assert port_number(container, container[probe]["httpGet"]["port"]) == health, probe
    # readiness: GET /health on PORT, 200 only once the model is loaded
    ready = container["readinessProbe"]["httpGet"]
    assert port_number(container, ready["port"]) == http and ready["path"] == "/health"


def test_the_grace_period_covers_the_drain(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, objs = rendered
    settings = settings_in(objs)
    spec = one(objs, "Deployment", NAME)["spec"]["template"]["spec"]
    needed = (pre_stop_seconds(gateway_container(objs)) + float(settings["DRAIN_TIMEOUT"])
              + float(settings["BACKEND_STOP_TIMEOUT"]))
    assert spec["terminationGracePeriodSeconds"] >= needed


def test_selectors_pick_the_gateway_pods(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, objs = rendered
    deployment = one(objs, "Deployment", NAME)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selects(POD_LABELS, labels)
    assert selects(deployment["spec"]["selector"]["matchLabels"], labels)
    assert_selects_gateway_only(objs, one(objs, "Service", NAME)["spec"]["selector"], "Service")
    pdb = one(objs, "PodDisruptionBudget", NAME)["spec"]
    assert_selects_gateway_only(objs, pdb["selector"]["matchLabels"], "PodDisruptionBudget")
    assert pdb.get("maxUnavailable", 0) >= 1 or pdb.get("minAvailable") is not None
    container = gateway_container(objs)
    for port in one(objs, "Service", NAME)["spec"]["ports"]:
        port_number(container, port["targetPort"])


def test_the_environment_holds_only_real_settings(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, objs = rendered
    container = gateway_container(objs)
    config = one(objs, "ConfigMap", NAME)
    unknown = sorted(set(config.get("data", {})) - SETTINGS)
    assert not unknown, f"ConfigMap keys that are no setting of lifecycle/settings.py: {unknown}"
    unknown = sorted({e["name"] for e in container.get("env", [])} - SETTINGS)
    assert not unknown, f"env names that are no setting of lifecycle/settings.py: {unknown}"
    for source in container.get("envFrom", []):
        one(objs, "ConfigMap", source["configMapRef"]["name"])


def test_volumes_keys_and_user(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, objs = rendered
    spec = one(objs, "Deployment", NAME)["spec"]["template"]["spec"]
    container = gateway_container(objs)
    settings = settings_in(objs)
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    data = [name for name, m in mounts.items() if m["mountPath"] == settings["DATA_DIR"]]
    assert len(data) == 1, f"DATA_DIR {settings['DATA_DIR']} is not a mounted volume"
    claim = volumes[data[0]]["persistentVolumeClaim"]["claimName"]
    assert claim == f"{NAME}-models"
    one(objs, "PersistentVolumeClaim", claim)
    # the keys Secret, mounted as a folder (a subPath mount never sees the Secret change) where AUTH_KEYS_FILE points
    keys = [name for name, v in volumes.items() if v.get("secret", {}).get("secretName") == f"{NAME}-keys"]
    assert len(keys) == 1
    assert mounts[keys[0]].get("readOnly") is True and "subPath" not in mounts[keys[0]]
    assert Path(settings["AUTH_KEYS_FILE"]) == Path(mounts[keys[0]]["mountPath"]) / "api_keys.txt"
    # the image's user (Dockerfile: useradd --uid 10001), and a group kubelet gives the volumes to
    uid = re.search(r"useradd .*--uid (\d+)", (ROOT / "Dockerfile").read_text())
    assert uid is not None
    security = spec["securityContext"]
    assert security["runAsUser"] == int(uid.group(1)) and security["fsGroup"] == security["runAsGroup"]
    assert security["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_redis_url_names_the_redis_service(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, objs = rendered
    url = one(objs, "ConfigMap", NAME).get("data", {}).get("REDIS_URL")
    if url is None:
        return
    parts = urlsplit(url)
    service = one(objs, "Service", parts.hostname or "")
    assert parts.port in {p["port"] for p in service["spec"]["ports"]}
    assert_selects_gateway_only(objs, {"app.kubernetes.io/name": NAME},  # redis pods must not look like gateways
                                "app.kubernetes.io/name")


# --- autoscaling and the InferencePool ------------------------------------------------------------------------


def autoscalers(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return find(objs, "ScaledObject") + find(objs, "HorizontalPodAutoscaler")


def test_autoscalers_target_the_deployment(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, objs = rendered
    scalers = autoscalers(objs)
    deployment = one(objs, "Deployment", NAME)
    assert len(scalers) <= 1, "KEDA and an HPA on one Deployment fight over its replicas"
    if not scalers:
        assert deployment["spec"]["replicas"] >= 1
        return
    scaler = scalers[0]
    ref = scaler["spec"]["scaleTargetRef"]
    assert (ref.get("apiVersion"), ref.get("kind"), ref["name"]) == ("apps/v1", "Deployment", NAME)
    assert "replicas" not in deployment["spec"], "kubectl apply would reset the count the autoscaler chose"
    modes = one(objs, "PersistentVolumeClaim", f"{NAME}-models")["spec"]["accessModes"]
    assert modes == ["ReadWriteMany"], "replicas on several nodes need a ReadWriteMany data volume"
    names = {e["name"] for e in gateway_container(objs).get("env", [])}
    assert {"LOG_NAME", "USAGE_DB"} <= names
    if scaler["kind"] == "ScaledObject":
        spec = scaler["spec"]
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
        for trigger in spec["triggers"]:
            assert trigger["type"] == "prometheus"
            assert set(re.findall(r"\bgateway_\w+", trigger["metadata"]["query"])) <= GATEWAY_METRICS
            assert re.search(r"\bgateway_\w+", trigger["metadata"]["query"])
    else:
        for metric in scaler["spec"]["metrics"]:
            assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] in GATEWAY_METRICS


def epp_args(container: dict[str, Any]) -> dict[str, str]:
    args: dict[str, str] = {}
    for arg in container["args"]:
        assert arg.startswith("--") and "=" in arg, f"EPP arg {arg!r}: write flags as --name=value"
        name, value = arg[2:].split("=", 1)
        args[name] = value
    return args


def test_inference_pool_points_at_the_gateway(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, objs = rendered
    pools = find(objs, "InferencePool")
    if not pools:
        return
    pool = one(objs, "InferencePool", NAME)["spec"]
    assert_selects_gateway_only(objs, pool["selector"]["matchLabels"], "InferencePool")
    http = port_number(gateway_container(objs), "http")
    assert [p["number"] for p in pool["targetPorts"]] == [http]
    ref = pool["endpointPickerRef"]
    epp_service = one(objs, "Service", ref["name"])
    port = [p for p in epp_service["spec"]["ports"] if p["port"] == ref["port"]["number"]]
    assert len(port) == 1
    picked = [name for name, labels in pod_templates(objs) if selects(epp_service["spec"]["selector"], labels)]
    assert len(picked) == 1
    epp = one(objs, "Deployment", picked[0])
    container = epp["spec"]["template"]["spec"]["containers"][0]
    port_number(container, port[0]["targetPort"])
    assert re.fullmatch(r"registry\.k8s\.io/gateway-api-inference-extension/epp:v\d+\.\d+\.\d+", container["image"])
    args = epp_args(container)
    assert args["pool-name"] == NAME
    assert args["pool-namespace"] == "$(NAMESPACE)" and {"name": "NAMESPACE", "valueFrom": {
        "fieldRef": {"fieldPath": "metadata.namespace"}}} in container["env"]
    assert args["total-queued-requests-metric"] in GATEWAY_METRICS
    assert args["kv-cache-usage-percentage-metric"] in GATEWAY_METRICS
    assert args["model-server-metrics-path"] == "/metrics?format=prometheus"  # else the gateway answers JSON
    assert args["lora-info-metric"] == ""
    # the EPP's ServiceAccount may read the pool and the pods
    account = epp["spec"]["template"]["spec"]["serviceAccountName"]
    one(objs, "ServiceAccount", account)
    granted: set[tuple[str, str]] = set()
    for binding in find(objs, "RoleBinding"):
        if any(s["kind"] == "ServiceAccount" and s["name"] == account for s in binding["subjects"]):
            role = one(objs, binding["roleRef"]["kind"], binding["roleRef"]["name"])
            for rule in role["rules"]:
                if {"get", "list", "watch"} <= set(rule["verbs"]):
                    granted |= {(group, res) for group in rule["apiGroups"] for res in rule["resources"]}
    assert {("", "pods"), ("inference.networking.k8s.io", "inferencepools")} <= granted
