#!/usr/bin/env python3
"""Checks the Helm chart with Helm's own engine (helm-python-sdk): lint, render every values variant,
schema rejections, CRD and RBAC in sync with what the operator generates, the chart README's values table in sync.

Usage: check_chart.py OUT_DIR  — rendered manifests go to OUT_DIR/<variant>/, for the typed-parsing test.
"""

import json
import pathlib
import re
import subprocess
import sys

import helm_python as helm
import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "parley-operator"
FAILURES = []


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
    rules_file = (CHART / "files" / "rbac-rules.yaml").read_text()
    check(rules_file == generated("rbac"), "charts/parley-operator/files/rbac-rules.yaml matches `operator rbac`")
    rules = yaml.safe_load(rules_file)
    for name, docs in rendered:
        roles = [d for d in docs if d["kind"] in ("ClusterRole", "Role") and not d["metadata"]["name"].endswith("leader-election")]
        check(roles and all(r["rules"] == rules["controller"] for r in roles),
              f"RBAC ({name} values): every controller (Cluster)Role grants exactly the operator's rules")
        lease = [d for d in docs if d["kind"] == "Role" and d["metadata"]["name"].endswith("leader-election")]
        check(len(lease) == 1 and lease[0]["rules"] == rules["leaderElection"], f"RBAC ({name} values): the Lease Role")
        wildcard = [d["metadata"]["name"] for d in docs if d["kind"] in ("ClusterRole", "Role")
                    for r in d["rules"] for f in ("verbs", "resources", "apiGroups") if "*" in r.get(f, [])]
        check(not wildcard, f"RBAC ({name} values): no wildcards")
        secrets = [r for d in docs if d["kind"] in ("ClusterRole", "Role") for r in d["rules"] if "secrets" in r["resources"]]
        check(all(set(r["verbs"]) <= {"get", "list", "watch"} for r in secrets), f"RBAC ({name} values): Secrets read-only")
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
    in_sync(rendered)
    readme_table()
    print(f"\n{len(FAILURES)} chart check(s) failed" if FAILURES else "\nall chart checks passed")
    sys.exit(1 if FAILURES else 0)


if __name__ == "__main__":
    main()
