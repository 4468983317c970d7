#!/usr/bin/env python3
"""Checks the Helm chart with Helm's own engine (helm-python-sdk): lint, render every values variant,
schema rejections, CRD and RBAC in sync with what the operator generates, the chart README's values table in sync,
and the monitoring it ships: the alerting rules (`promtool check rules`, `promtool test rules`), the Grafana
dashboard, both rendered unchanged, and the metric names they use.

Usage: check_chart.py OUT_DIR  — rendered manifests go to OUT_DIR/<variant>/, for the typed-parsing test.
With PARLEY_REFERENCED_METRICS=FILE it also writes the metric names the dashboard and alerts use to FILE.
"""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import helm_python as helm
import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "parley-operator"
DASHBOARD = CHART / "dashboards" / "parley.json"
ALERTS = CHART / "files" / "alerts.yaml"
ALERT_TESTS = CHART / "tests" / "alerts.test.yaml"
FAILURES = []

# The metric families Parley exposes (OpenMetrics names as scraped), by type. The authoritative check against
# real scrapes is the Rust side's; this one catches a misspelt name early.
METRIC_FAMILIES = {
    "gauge": [
        "parley_connections", "parley_subscriptions", "parley_shared_groups", "parley_ready",
        "parley_operator_translator_backlog", "parley_operator_translator_desired_replicas",
        "parley_operator_gateway_ready_replicas",
    ],
    "counter": [
        "parley_messages_posted", "parley_deliveries", "parley_gap_filled_deliveries", "parley_slow_consumer_closes",
        "parley_translations", "parley_provider_errors", "parley_dead_lettered",
        "parley_operator_reconciles", "parley_operator_reconcile_errors",
    ],
    "histogram": [
        "parley_delivered_latency_seconds", "parley_provider_call_seconds", "parley_translated_latency_seconds",
        "parley_fanout_batch_size", "parley_history_store_seconds", "parley_operator_reconcile_duration_seconds",
    ],
}
SUFFIXES = {"gauge": [""], "counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
KNOWN_METRICS = {f + s for kind, families in METRIC_FAMILIES.items() for f in families for s in SUFFIXES[kind]}
# Metric names in expressions are literal (no recording rules, no templated names), so this finds them all.
METRIC_NAME = re.compile(r"\b(parley_[a-z0-9_]+)")


def check(ok, message):
    if not ok:
        FAILURES.append(message)
    print(("ok    " if ok else "FAIL  ") + message)


def variants():
    yield "default", {}
    for path in sorted((CHART / "ci").glob("*-values.yaml")):
        yield path.name.removesuffix("-values.yaml"), yaml.safe_load(path.read_text()) or {}


def lint_and_render(out):
    chart = helm.Chart.load(str(CHART))
    for name, values in variants():
        report = helm.lint(str(CHART), values, strict=True, namespace="parley-system")
        problems = [m for m in report.get("messages", []) if m.get("severity", 0) >= 2] + report.get("errors", [])
        check(not problems, f"lint ({name} values): {problems or 'clean'}")
        rendered = chart.render(values, name="parley", namespace="parley-system", is_install=True)
        manifests = {t: text for t, text in rendered.items() if text.strip() and t.endswith((".yaml", ".yml"))}
        check(any(t.endswith("NOTES.txt") and "kubectl get chat" in text for t, text in rendered.items()),
              f"render ({name} values): NOTES.txt tells the next step")
        target = out / name
        target.mkdir(parents=True, exist_ok=True)
        for template, text in manifests.items():
            (target / pathlib.Path(template).name).write_text(text)
        docs = [d for text in manifests.values() for d in yaml.safe_load_all(text) if d]
        kinds = sorted(d["kind"] for d in docs)
        check("Deployment" in kinds and "ServiceAccount" in kinds, f"render ({name} values): {', '.join(kinds)}")
        yield name, docs


def schema_rejects():
    chart = helm.Chart.load(str(CHART))
    chart.validate_schema({})
    bad = {
        "a string where a number belongs": {"replicaCount": "two"},
        "an unknown top-level key": {"replicas": 2},
        "an unknown nested key": {"image": {"repository": "x", "tga": "1"}},
        "a bad pull policy": {"image": {"repository": "x", "pullPolicy": "Sometimes"}},
        "a namespace that is not a DNS label": {"watchNamespaces": ["Not_A_Namespace"]},
        "a port out of range": {"metrics": {"service": {"port": 70000}}},
        "a non-boolean switch": {"metrics": {"serviceMonitor": {"enabled": "yes"}}},
        "a disruption budget of no pods": {"podDisruptionBudget": {"maxUnavailable": 0}},
        "a non-boolean dashboards switch": {"dashboards": {"enabled": "true"}},
        "an unknown key under prometheusRule": {"prometheusRule": {"enable": True}},
        "a dashboards namespace that is not a DNS label": {"dashboards": {"namespace": "Monitoring"}},
        "a non-boolean honorLabels": {"metrics": {"serviceMonitor": {"honorLabels": "yes"}}},
    }
    for what, values in bad.items():
        try:
            chart.validate_schema(values)
            check(False, f"values.schema.json rejects {what}")
        except helm.HelmError:
            check(True, f"values.schema.json rejects {what}")


def generated(subcommand):
    return subprocess.run(
        ["cargo", "run", "-q", "-p", "parley-operator", "--", subcommand],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout


def in_sync(rendered):
    crd = (ROOT / "crds" / "chat.parley.dev_chatdeployments.yaml").read_text()
    check((CHART / "crds" / "chat.parley.dev_chatdeployments.yaml").read_text() == crd,
          "chart crds/ is identical to the top-level crds/")
    shipped = sorted(p.name for p in (CHART / "crds").iterdir())
    check(shipped == ["chat.parley.dev_chatdeployments.yaml"], f"chart crds/ holds the one CRD and nothing else: {shipped}")
    rules_file = (CHART / "files" / "rbac-rules.yaml").read_text()
    check(rules_file == generated("rbac"), "charts/parley-operator/files/rbac-rules.yaml matches `operator rbac`")
    rules = yaml.safe_load(rules_file)
    for name, docs in rendered:
        roles = [d for d in docs if d["kind"] in ("ClusterRole", "Role") and not d["metadata"]["name"].endswith("leader-election")]
        watching = name == "full"
        expected = rules["controller"] + (rules["secretWatch"] if watching else [])
        check(roles and all(r["rules"] == expected for r in roles),
              f"RBAC ({name} values): every controller (Cluster)Role grants exactly the operator's rules"
              + (" and the Secret watch" if watching else ""))
        env = {e["name"]: e.get("value") for d in docs if d["kind"] == "Deployment"
               for c in d["spec"]["template"]["spec"]["containers"] for e in c.get("env", [])}
        check(env.get("PARLEY_WATCH_SECRETS") == ("true" if watching else "false"),
              f"RBAC ({name} values): the operator watches Secrets exactly when its role allows it")
        lease = [d for d in docs if d["kind"] == "Role" and d["metadata"]["name"].endswith("leader-election")]
        check(len(lease) == 1 and lease[0]["rules"] == rules["leaderElection"], f"RBAC ({name} values): the Lease Role")
        wildcard = [d["metadata"]["name"] for d in docs if d["kind"] in ("ClusterRole", "Role")
                    for r in d["rules"] for f in ("verbs", "resources", "apiGroups") if "*" in r.get(f, [])]
        check(not wildcard, f"RBAC ({name} values): no wildcards")
        secrets = [r for d in roles for r in d["rules"] if "secrets" in r["resources"]]
        check(all(set(r["verbs"]) <= {"get", "list", "watch"} for r in secrets), f"RBAC ({name} values): Secrets read-only")
        if not watching:
            check(secrets and all(r["verbs"] == ["get"] for r in secrets),
                  f"RBAC ({name} values): without secretWatch, Secrets are only read by name (no list, no watch)")
        # In its own namespace the operator creates one Secret (the checksum key) and reads only that one.
        own = [r for d in lease for r in d["rules"] if "secrets" in r["resources"]]
        check(all(r["verbs"] == ["create"] or (set(r["verbs"]) <= {"get"} and r.get("resourceNames") == ["parley-operator-checksum-key"])
                  for r in own) and own,
              f"RBAC ({name} values): in its own namespace, only the checksum key Secret, created then read by name")
    default = dict(rendered)["default"]
    operator = [d for d in default if d["kind"] == "Deployment"]
    check(len(operator) == 1 and operator[0]["spec"]["replicas"] == 2
          and any(e["name"] == "POD_NAME" for c in operator[0]["spec"]["template"]["spec"]["containers"] for e in c.get("env", [])),
          "the default install runs two operator replicas, each with its own identity (POD_NAME) for the Lease")
    budgets = [d for d in default if d["kind"] == "PodDisruptionBudget"]
    check(len(budgets) == 1 and budgets[0]["spec"]["maxUnavailable"] == 1
          and budgets[0]["spec"]["selector"]["matchLabels"] == operator[0]["spec"]["selector"]["matchLabels"],
          "the default install's operator replicas have a PodDisruptionBudget (one down at a time)")
    anti = operator[0]["spec"]["template"]["spec"].get("affinity", {}).get("podAntiAffinity", {})
    check(anti.get("preferredDuringSchedulingIgnoredDuringExecution", [{}])[0].get("podAffinityTerm", {}).get("topologyKey") == "kubernetes.io/hostname",
          "the default install's operator replicas prefer different nodes")
    namespaced = dict(rendered)["namespaced"]
    check(not any(d["kind"] == "ClusterRole" for d in namespaced)
          and {d["metadata"]["namespace"] for d in namespaced if d["kind"] == "Role"} >= {"events", "support"},
          "watchNamespaces renders Roles in the listed namespaces and no ClusterRole")


def dashboard_exprs(dashboard):
    """Every query expression of the dashboard's panels (rows' nested panels too) and template variables."""
    def panels(items):
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))
    exprs = [target["expr"] for panel in panels(dashboard["panels"]) for target in panel.get("targets", [])]
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        if variable.get("type") == "query":
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def alert_exprs(rules):
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def referenced_metrics():
    """The metric names the dashboard and the alerts use: {"dashboard": {...}, "alerts": {...}}."""
    dashboard = json.loads(DASHBOARD.read_text())
    rules = yaml.safe_load(ALERTS.read_text())
    return {
        "dashboard": {m for e in dashboard_exprs(dashboard) for m in METRIC_NAME.findall(e)},
        "alerts": {m for e in alert_exprs(rules) for m in METRIC_NAME.findall(e)},
    }


def promtool(*args, cwd):
    return subprocess.run(["promtool", *args], cwd=cwd, capture_output=True, text=True)


def alerts():
    rules = yaml.safe_load(ALERTS.read_text())
    if shutil.which("promtool") is None:
        check(False, "promtool is installed (source scripts/deps.sh && ensure_promtool)")
    else:
        checked = promtool("check", "rules", ALERTS.name, cwd=ALERTS.parent)
        check(checked.returncode == 0, f"promtool check rules {ALERTS.relative_to(CHART)}: "
              + (checked.stdout + checked.stderr).strip().splitlines()[-1].strip())
        # Run from the test file's folder, so that its relative rule_files path holds.
        tested = promtool("test", "rules", ALERT_TESTS.name, cwd=ALERT_TESTS.parent)
        check(tested.returncode == 0, f"promtool test rules {ALERT_TESTS.relative_to(CHART)}"
              + ("" if tested.returncode == 0 else ":\n" + tested.stdout + tested.stderr))
    names = [r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r]
    tested_names = {t["alertname"] for test in yaml.safe_load(ALERT_TESTS.read_text())["tests"]
                    for t in test.get("alert_rule_test", [])}
    firing = {t["alertname"] for test in yaml.safe_load(ALERT_TESTS.read_text())["tests"]
              for t in test.get("alert_rule_test", []) if t.get("exp_alerts")}
    silent = {t["alertname"] for test in yaml.safe_load(ALERT_TESTS.read_text())["tests"]
              for t in test.get("alert_rule_test", []) if not t.get("exp_alerts")}
    check(set(names) <= firing and set(names) <= silent and tested_names <= set(names),
          f"every alert has a unit test where it fires and one where it does not ({len(names)} alerts)")
    incomplete = [r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r and not (
        r.get("for") and r.get("labels", {}).get("severity") in ("info", "warning", "critical")
        and r.get("annotations", {}).get("summary") and "Runbook:" in r.get("annotations", {}).get("description", ""))]
    check(not incomplete, f"every alert has a for:, a severity and a summary and description with a runbook: {incomplete or 'yes'}")


def monitoring(rendered):
    dashboard_text = DASHBOARD.read_text()
    try:
        dashboard = json.loads(dashboard_text)
    except json.JSONDecodeError as err:
        check(False, f"{DASHBOARD.relative_to(CHART)} is valid JSON: {err}")
        return
    panels = [p for p in dashboard["panels"]] + [n for p in dashboard["panels"] for n in p.get("panels", [])]
    ids = [p["id"] for p in panels]
    cells = [(x, y) for p in panels for g in [p["gridPos"]]
             for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])]
    check(len(ids) == len(set(ids)) and len(cells) == len(set(cells)) and all(x < 24 for x, _ in cells),
          f"{DASHBOARD.relative_to(CHART)}: {len(panels)} panels with unique ids and non-overlapping gridPos")
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    check(variables.get("datasource", {}).get("type") == "datasource" and variables["datasource"].get("query") == "prometheus"
          and {"namespace", "chat"} <= set(variables)
          and all(t.get("datasource", {}).get("uid") == "${datasource}" for p in panels for t in p.get("targets", [])),
          "the dashboard queries the ${datasource} variable (Prometheus) and has the namespace and chat variables")

    used = referenced_metrics()
    for source, names in used.items():
        unknown = sorted(names - KNOWN_METRICS)
        check(names and not unknown, f"the {source}: only metrics Parley exposes ({len(names)} names; unknown: {unknown or 'none'})")
    if os.environ.get("PARLEY_REFERENCED_METRICS"):
        pathlib.Path(os.environ["PARLEY_REFERENCED_METRICS"]).write_text("".join(f"{m}\n" for m in sorted(set().union(*used.values()))))

    rules = yaml.safe_load(ALERTS.read_text())
    for name, docs in rendered:
        config_maps = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboards")]
        prometheus_rules = [d for d in docs if d["kind"] == "PrometheusRule"]
        values = dict(variants())[name]
        if not values.get("dashboards", {}).get("enabled"):
            check(not config_maps, f"dashboards ({name} values): no dashboard ConfigMap when dashboards.enabled is false")
        else:
            data = config_maps[0]["data"] if len(config_maps) == 1 else {}
            check(data.get("parley.json") == dashboard_text and json.loads(data["parley.json"]) == dashboard,
                  f"dashboards ({name} values): the ConfigMap holds {DASHBOARD.relative_to(CHART)} unchanged, as valid JSON")
            labels = config_maps[0]["metadata"]["labels"] if config_maps else {}
            check(labels.get("grafana_dashboard") == "1",
                  f"dashboards ({name} values): the ConfigMap has the Grafana sidecar's label grafana_dashboard: \"1\"")
        if not values.get("prometheusRule", {}).get("enabled"):
            check(not prometheus_rules, f"alerts ({name} values): no PrometheusRule when prometheusRule.enabled is false")
        else:
            check(len(prometheus_rules) == 1 and prometheus_rules[0]["apiVersion"] == "monitoring.coreos.com/v1"
                  and prometheus_rules[0]["spec"]["groups"] == rules["groups"],
                  f"alerts ({name} values): the PrometheusRule's groups are exactly those of {ALERTS.relative_to(CHART)}")


def flatten(values, prefix=""):
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from flatten(value, path + ".")
        else:
            yield path


def readme_table():
    readme = (CHART / "README.md").read_text()
    section = readme.split("## Values", 1)[1].split("\n#", 1)[0]
    documented = set(re.findall(r"^\| `([^`]+)` \|", section, re.M))
    actual = set(flatten(yaml.safe_load((CHART / "values.yaml").read_text())))
    check(documented == actual,
          f"the chart README's values table matches values.yaml (missing: {sorted(actual - documented)}, stale: {sorted(documented - actual)})")


def main():
    out = pathlib.Path(sys.argv[1])
    rendered = list(lint_and_render(out))
    schema_rejects()
    alerts()
    monitoring(rendered)
    in_sync(rendered)
    readme_table()
    print(f"\n{len(FAILURES)} chart check(s) failed" if FAILURES else "\nall chart checks passed")
    sys.exit(1 if FAILURES else 0)


if __name__ == "__main__":
    main()
