"""The observability profile's files (compose/prometheus/, compose/grafana/): the dashboard and the
alert rules are well-formed, their PromQL parses (Prometheus' own `promtool`, from Debian's
`prometheus` package, which scripts/install.sh --tests installs), the alerts fire on the series
they are about (`promtool test rules`), Prometheus scrapes every replica compose runs, and the
compose services are wired to these files. Whether every metric named here is exported is checked
against the running services in tests/integration/test_observability.py."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.unit.test_deploy_files import (
    BASE, COMPOSE_DIR, HA, HEALTH_PORTS, _compose, _compose_env, _env_map, _is_cordum, _load, _secrets,
)

PROMETHEUS_DIR = COMPOSE_DIR / "prometheus"
GRAFANA_DIR = COMPOSE_DIR / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "cordum.json"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
PROMETHEUS_YML = PROMETHEUS_DIR / "prometheus.yml"
PROMTOOL = "/usr/bin/promtool"
# Grafana's range variables, as a fixed range for checking the PromQL outside Grafana
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}

# ---- reading the files (also used by the integration test) -------------------------------------


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels() -> list[dict[str, Any]]:
    """Every panel but the rows (which only group)."""
    found = []
    for panel in dashboard()["panels"]:
        found += panel.get("panels", []) if panel["type"] == "row" else [panel]
    return found


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL with Grafana's variables filled in)."""
    queries = []
    for panel in panels():
        for target in panel.get("targets", []):
            expr = target.get("expr", "")
            for name, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(name, value)
            queries.append((panel["title"], expr))
    return queries


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in _load(ALERTS)["groups"] for rule in group["rules"]]


_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
             "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers that are not functions (followed
    by `(`), keywords, label names (in `{...}`, `by (...)`, `on (...)`) or inside strings and ranges."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings (label values)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        name, rest = match.group(0), text[match.end():].lstrip()
        if rest.startswith("(") or name.lower() in _KEYWORDS:
            continue
        if match.start() > 0 and (text[match.start() - 1].isdigit() or text[match.start() - 1] == "."):
            continue  # part of a number such as 1e3
        names.add(name)
    return names


def test_metric_names_are_read_from_promql() -> None:
    expr = ('histogram_quantile(0.95, sum by (le, pod) (rate(cordum_x_bucket{status=~"5..", a="b c"}[1m]))) '
            '/ on (pod) group_left max without (instance) (cordum_y offset 5m) > bool 1e3 or vector(0) unless up')
    assert metric_names(expr) == {"cordum_x_bucket", "cordum_y", "up"}


# ---- the dashboard ------------------------------------------------------------------------------


def test_the_dashboard_has_a_query_for_every_panel_on_the_provisioned_data_source() -> None:
    board = dashboard()
    assert board["uid"] and board["title"] and board["schemaVersion"] >= 36
    (source,) = _load(GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml")["datasources"]
    found = panels()
    assert len(found) >= 12
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in found:
        title = panel.get("title")
        assert title, panel
        assert panel["datasource"] == {"type": "prometheus", "uid": source["uid"]}, title
        targets = panel.get("targets") or []
        assert targets, f"{title}: no query"
        for target in targets:
            assert target.get("expr", "").strip(), f"{title}: an empty query"
            assert target.get("datasource", panel["datasource"]) == panel["datasource"], title
            assert metric_names(target["expr"]), f"{title}: {target['expr']} reads no metric"
        refs = [t["refId"] for t in targets]
        assert len(refs) == len(set(refs)), f"{title}: refIds repeat"
    # The layout: inside the 24-column grid, and no two panels on the same cells.
    cells: dict[tuple[int, int], str] = {}
    for panel in board["panels"]:
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24 and pos["h"] > 0, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_the_dashboard_shows_what_operators_asked_for() -> None:
    exprs = " ".join(expr for _, expr in dashboard_queries())
    for needed in (
        "sum by (outcome) (rate(cordum_jobs_total",  # jobs/s by outcome, summed
        "sum by (pod, outcome) (rate(cordum_jobs_total",  # ... and per replica
        "cordum_rate_limit_hits_total",
        "histogram_quantile(0.99, sum by (le) (rate(cordum_scheduler_dispatch_latency_seconds_bucket",
        "cordum_scheduler_submit_to_dispatch_seconds_bucket",
        "cordum_scheduler_dispatch_to_terminal_seconds_bucket",
        "max(cordum_dlq_entries)",
        "cordum_leader_is_leader",
        "cordum_leader_elections_total",
        "cordum_bus_consumer_pending",
        "cordum_redis_pool_connections",
        "cordum_safety_breaker_open",
    ):
        assert needed in exprs, needed


def test_the_dashboard_queries_parse(tmp_path: Path) -> None:
    """Each query as a recording rule: promtool parses the PromQL as Prometheus would."""
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": expr} for i, (_, expr) in enumerate(dashboard_queries())]}]}
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    _promtool_ok("check", "rules", str(path))


# ---- Grafana provisioning -------------------------------------------------------------------------


def test_grafana_is_provisioned_with_prometheus_and_the_dashboard() -> None:
    services = _load(BASE)["services"]
    grafana, prometheus = services["grafana"], services["prometheus"]
    (source,) = _load(GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml")["datasources"]
    assert (source["type"], source["access"], source["isDefault"]) == ("prometheus", "proxy", True)
    assert source["url"] == "http://prometheus:9090"
    assert any(p.endswith(":9090") for p in prometheus["ports"])
    (provider,) = _load(GRAFANA_DIR / "provisioning" / "dashboards" / "cordum.yml")["providers"]
    mounts = _mounts(grafana)
    assert mounts["/etc/grafana/provisioning"] == GRAFANA_DIR / "provisioning"
    assert mounts[provider["options"]["path"]] == DASHBOARD.parent
    home = _env_map(grafana)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/{DASHBOARD.name}"
    assert grafana["depends_on"] == {"prometheus": {"condition": "service_healthy"}}


def test_grafana_has_no_default_password() -> None:
    grafana = _load(BASE)["services"]["grafana"]
    env = _env_map(grafana)
    assert env["GF_SECURITY_ADMIN_PASSWORD"] == "${GRAFANA_ADMIN_PASSWORD:-}"
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "${GRAFANA_ANONYMOUS:-false}"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer" and env["GF_USERS_ALLOW_SIGN_UP"] == "false"
    assert all(p.startswith("127.0.0.1:") for p in grafana["ports"])
    # The entrypoint's guard, run by a real shell ($$ is compose's escape for $; /run.sh is Grafana's
    # own entrypoint, stood in for by `echo started`).
    shell, flag, script = grafana["entrypoint"]
    assert (shell, flag) == ("sh", "-c") and script.rstrip().endswith("exec /run.sh")
    script = script.replace("$$", "$").replace("exec /run.sh", "echo started")
    for password, started in (("", False), ("admin", False), ("x" * 11, False), ("0123456789abcdef", True)):
        run = subprocess.run(["sh", "-c", script], env={"GF_SECURITY_ADMIN_PASSWORD": password, "PATH": "/usr/bin:/bin"},
                             capture_output=True, text=True, timeout=10)
        assert (run.returncode == 0 and run.stdout.strip() == "started") is started, (password, run)
        if not started:
            assert "set GRAFANA_ADMIN_PASSWORD" in run.stderr


# ---- Prometheus -----------------------------------------------------------------------------------


def test_prometheus_loads_the_rules_and_the_targets_compose_mounts() -> None:
    prometheus = _load(BASE)["services"]["prometheus"]
    config = _load(PROMETHEUS_YML)
    mounts = _mounts(prometheus)
    assert mounts["/etc/prometheus/prometheus.yml"] == PROMETHEUS_YML
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"] and mounts["/etc/prometheus/alerts.yml"] == ALERTS
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "cordum"]
    (discovery,) = job["file_sd_configs"]
    (pattern,) = discovery["files"]
    targets_mount = next(t for t in mounts if t.startswith("/etc/prometheus/targets/"))
    assert Path(targets_mount).match(pattern)
    assert job["honor_labels"] is True  # the exported `pod` stays as it is
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    assert prometheus["profiles"] == ["observability"]


@pytest.mark.parametrize("topology", ["single", "ha"])
def test_prometheus_scrapes_every_replica_compose_runs(topology: str) -> None:
    services = dict(_load(BASE)["services"])
    if topology == "ha":
        services.update(_load(HA)["services"])
    expected = {}
    for name, service in services.items():
        if _is_cordum(service) and service["command"][0] in HEALTH_PORTS:  # the worker serves no HTTP
            program = service["command"][0]
            expected[f"{name}:{HEALTH_PORTS[program]}"] = {"service": program,
                                                          "pod": _env_map(service)["CORDUM_INSTANCE_ID"]}
    groups = yaml.safe_load((PROMETHEUS_DIR / "targets" / f"{topology}.yml").read_text())
    found = {}
    for group in groups:
        for target in group["targets"]:
            assert target not in found, f"{target} listed twice"
            found[target] = group["labels"]
    assert found == expected


def test_prometheus_config_and_rules_pass_promtool(tmp_path: Path) -> None:
    # promtool reads the files where the container has them: lay them out the same way.
    root = tmp_path / "etc-prometheus"
    (root / "targets").mkdir(parents=True)
    shutil.copy(ALERTS, root / "alerts.yml")
    shutil.copy(PROMETHEUS_DIR / "targets" / "ha.yml", root / "targets" / "cordum.yml")
    (root / "prometheus.yml").write_text(PROMETHEUS_YML.read_text().replace("/etc/prometheus", str(root)))
    out = _promtool_ok("check", "config", str(root / "prometheus.yml"))
    assert "1 rule files found" in out and f"{len(alert_rules())} rules found" in out


# ---- the alert rules ------------------------------------------------------------------------------


def test_every_alert_rule_is_complete() -> None:
    rules = alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names))
    for rule in rules:
        assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert rule["expr"].strip() and re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"].strip() and rule["annotations"]["description"].strip(), rule["alert"]


def test_the_alerts_operators_asked_for_exist() -> None:
    by_name = {r["alert"]: r for r in alert_rules()}
    leader = by_name["CordumNoReconcilerLeader"]
    assert 'cordum_leader_is_leader{lease="cordum:reconciler:default"}' in leader["expr"] and leader["for"] == "1m"
    assert "cordum_dlq_entries" in by_name["CordumDlqGrowing"]["expr"]
    assert "cordum_safety_breaker_open" in by_name["CordumSafetyBreakerOpen"]["expr"]
    assert re.fullmatch(r'up\{job="cordum"\} == 0', by_name["CordumReplicaDown"]["expr"].strip())


# Series over time (`promtool test rules`, one sample a minute) and the alerts they must raise.
ALERT_CASES = {
    "CordumNoReconcilerLeader": [
        # scheduler-1 leads, crashes at 2m; nobody takes over
        ({'cordum_leader_is_leader{lease="cordum:reconciler:default", pod="scheduler-1"}': "1 1 0 0 0 0",
          'cordum_leader_is_leader{lease="cordum:reconciler:default", pod="scheduler-2"}': "0 0 0 0 0 0"},
         {"1m": [], "3m": [{}]}),
        # a failover within the minute: no alert
        ({'cordum_leader_is_leader{lease="cordum:reconciler:default", pod="scheduler-1"}': "1 1 0 _ _ _",
          'cordum_leader_is_leader{lease="cordum:reconciler:default", pod="scheduler-2"}': "0 0 0 1 1 1"},
         {"5m": []}),
        # every scheduler gone: no series at all is no leader either
        ({'cordum_leader_is_leader{lease="cordum:scheduler:snapshot:writer", pod="scheduler-1"}': "1 1 1 1"},
         {"3m": [{}]}),
    ],
    "CordumDlqGrowing": [
        ({'cordum_dlq_entries{pod="api-gateway-1"}': "0+2x40", 'cordum_dlq_entries{pod="api-gateway-2"}': "0+2x40"},
         {"10m": [], "30m": [{}]}),
        ({'cordum_dlq_entries{pod="api-gateway-1"}': "50x40"}, {"30m": []}),  # large but not growing
    ],
    "CordumSafetyBreakerOpen": [
        ({'cordum_safety_breaker_open{pod="scheduler-1"}': "0 0 1 0 1 1 1",
          'cordum_safety_breaker_open{pod="api-gateway-1"}': "0 0 0 0 0 0 0"}, {"1m": [], "5m": [{}]}),
        ({'cordum_safety_breaker_open{pod="scheduler-1"}': "0x10"}, {"8m": []}),
    ],
    "CordumReplicaDown": [
        ({'up{job="cordum", service="cordum-scheduler", pod="scheduler-2", instance="scheduler-2:9090"}': "1 1 0 0 0",
          'up{job="cordum", service="cordum-scheduler", pod="scheduler-1", instance="scheduler:9090"}': "1 1 1 1 1"},
         {"1m": [], "4m": [{"job": "cordum", "service": "cordum-scheduler", "pod": "scheduler-2",
                            "instance": "scheduler-2:9090"}]}),
    ],
    "CordumConsumerBacklog": [
        ({'cordum_bus_consumer_pending{queue="cordum-scheduler", subject="sys.job.submit", pod="scheduler-1"}':
          "0+500x10"}, {"2m": [], "9m": [{"queue": "cordum-scheduler", "subject": "sys.job.submit"}]}),
    ],
}


def test_the_alerts_fire_on_what_they_are_about(tmp_path: Path) -> None:
    rules = {r["alert"]: r for r in alert_rules()}
    assert set(ALERT_CASES) == set(rules), "every alert has its cases"
    tests = []
    for alert, cases in ALERT_CASES.items():
        for series, expected in cases:
            tests.append({
                "interval": "1m",
                "input_series": [{"series": s, "values": v} for s, v in series.items()],
                "alert_rule_test": [{"eval_time": at, "alertname": alert, "exp_alerts": [
                    {"exp_labels": {**labels, "severity": rules[alert]["labels"]["severity"]}} for labels in fired]}
                    for at, fired in expected.items()],
            })
    # Without annotations: promtool would compare their rendered text too (their templates are
    # checked by `promtool check config` above).
    doc = _load(ALERTS)
    for group in doc["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations")
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(doc, sort_keys=False))
    spec = {"rule_files": ["alerts.yml"], "evaluation_interval": "1m", "tests": tests}
    path = tmp_path / "alerts_test.yml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    _promtool_ok("test", "rules", str(path))


# ---- compose ----------------------------------------------------------------------------------------


def test_the_observability_profile_adds_prometheus_and_grafana_only_when_asked() -> None:
    given = _secrets()
    plain = _compose("config", "--format", "json", env=_compose_env(**given))
    assert plain.returncode == 0, plain.stderr
    assert not {"prometheus", "grafana"} & set(json.loads(plain.stdout)["services"])
    for topology in ("single", "ha"):
        extra = {"CORDUM_PROMETHEUS_TARGETS": topology} if topology == "ha" else {}
        result = _compose("--profile", "observability", "config", "--format", "json",
                          env=_compose_env(**given, **extra))
        assert result.returncode == 0, result.stderr
        services = json.loads(result.stdout)["services"]
        for name in ("prometheus", "grafana"):
            assert [(p["host_ip"], p["target"]) for p in services[name]["ports"]] == \
                [("127.0.0.1", 9090 if name == "prometheus" else 3000)], name
            assert services[name]["healthcheck"]["test"][0] == "CMD", name
        targets = {v["target"]: v["source"] for v in services["prometheus"]["volumes"]}
        assert Path(targets["/etc/prometheus/targets/cordum.yml"]) == PROMETHEUS_DIR / "targets" / f"{topology}.yml"
        assert services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == ""  # no default: the guard refuses


def test_promtool_is_installed() -> None:
    # scripts/install.sh --tests installs Debian's `prometheus` package, which brings it
    assert Path(PROMTOOL).is_file(), "promtool missing: run scripts/install.sh --tests (apt-get install prometheus)"


# ---- helpers ------------------------------------------------------------------------------------------


def _mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path → host path of a service's bind mounts (relative to compose/)."""
    found = {}
    for volume in service.get("volumes", []):
        volume = re.sub(r"\$\{\w+:-(\w+)\}", r"\1", volume)  # a variable's default
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            found[target] = (COMPOSE_DIR / source).resolve()
    return found


def _promtool_ok(*args: str) -> str:
    if not Path(PROMTOOL).is_file():
        pytest.fail("promtool missing: run scripts/install.sh --tests (apt-get install prometheus)")
    run = subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, f"promtool {' '.join(args)}:\n{run.stdout}\n{run.stderr}"
    return run.stdout + run.stderr
