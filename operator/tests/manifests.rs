//! Every example and every rendered chart manifest parses into its typed Kubernetes object with no field
//! lost: a misspelt field fails here instead of being dropped by the API server.
//!
//! Rendered manifests come from `scripts/check_chart.py OUT` via `PARLEY_RENDERED_DIR` (scripts/test sets it).

use std::path::{Path, PathBuf};

use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{ConfigMap, Namespace, Secret, Service, ServiceAccount},
    policy::v1::PodDisruptionBudget,
    rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding},
};
use kube::CustomResource;
use parley_operator::crd::ChatDeployment;
use schemars::JsonSchema;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use serde_json::Value;

/// The Prometheus Operator's ServiceMonitor, with the fields the chart sets.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, JsonSchema)]
#[kube(group = "monitoring.coreos.com", version = "v1", kind = "ServiceMonitor", namespaced)]
#[serde(deny_unknown_fields)]
struct ServiceMonitorSpec {
    selector: k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
    endpoints: Vec<Endpoint>,
}

#[derive(Serialize, Deserialize, Clone, Debug, JsonSchema)]
#[serde(deny_unknown_fields)]
struct Endpoint {
    port: String,
    path: String,
    interval: String,
    #[serde(rename = "honorLabels")]
    honor_labels: bool,
}

/// The Prometheus Operator's PrometheusRule, with the fields the chart sets.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, JsonSchema)]
#[kube(group = "monitoring.coreos.com", version = "v1", kind = "PrometheusRule", namespaced)]
#[serde(deny_unknown_fields)]
struct PrometheusRuleSpec {
    groups: Vec<RuleGroup>,
}

#[derive(Serialize, Deserialize, Clone, Debug, JsonSchema)]
#[serde(deny_unknown_fields)]
struct RuleGroup {
    name: String,
    rules: Vec<AlertRule>,
}

#[derive(Serialize, Deserialize, Clone, Debug, JsonSchema)]
#[serde(deny_unknown_fields)]
struct AlertRule {
    alert: String,
    expr: String,
    #[serde(rename = "for")]
    for_: String,
    labels: std::collections::BTreeMap<String, String>,
    annotations: std::collections::BTreeMap<String, String>,
}

/// The RabbitMQ Cluster Operator's RabbitmqCluster, with the fields the example sets.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, JsonSchema)]
#[kube(group = "rabbitmq.com", version = "v1beta1", kind = "RabbitmqCluster", namespaced)]
#[serde(deny_unknown_fields)]
struct RabbitmqClusterSpec {
    replicas: i32,
}

/// CloudNativePG's Cluster, with the fields the example sets.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, JsonSchema)]
#[kube(group = "postgresql.cnpg.io", version = "v1", kind = "Cluster", namespaced)]
#[serde(deny_unknown_fields)]
struct ClusterSpec {
    instances: i32,
    storage: ClusterStorage,
}

#[derive(Serialize, Deserialize, Clone, Debug, JsonSchema)]
#[serde(deny_unknown_fields)]
struct ClusterStorage {
    size: String,
}

/// Reports each field of `original` that the typed round trip dropped or changed.
fn lost_fields(original: &Value, typed: &Value, path: &str, lost: &mut Vec<String>) {
    match (original, typed) {
        (Value::Object(a), Value::Object(b)) => {
            for (key, value) in a {
                match b.get(key) {
                    Some(other) => lost_fields(value, other, &format!("{path}.{key}"), lost),
                    None if value.is_null() => {}
                    None => lost.push(format!("{path}.{key}")),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                lost_fields(x, y, &format!("{path}[{i}]"), lost);
            }
        }
        (a, b) if a == b => {}
        // Quantities and ports may change representation (100 vs "100"), not meaning.
        (Value::Number(n), Value::String(s)) | (Value::String(s), Value::Number(n)) if n.to_string() == *s => {}
        _ => lost.push(format!("{path} ({original} became {typed})")),
    }
}

fn round_trip<K: DeserializeOwned + Serialize>(document: &Value) -> Result<Vec<String>, String> {
    let typed: K = serde_json::from_value(document.clone()).map_err(|e| e.to_string())?;
    let back = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
    let mut lost = Vec::new();
    lost_fields(document, &back, "", &mut lost);
    Ok(lost)
}

fn check_document(document: &Value) -> Result<Vec<String>, String> {
    let kind = document["kind"].as_str().unwrap_or_default();
    match (document["apiVersion"].as_str().unwrap_or_default(), kind) {
        ("v1", "Secret") => round_trip::<Secret>(document),
        ("v1", "ConfigMap") => round_trip::<ConfigMap>(document),
        ("v1", "Service") => round_trip::<Service>(document),
        ("v1", "ServiceAccount") => round_trip::<ServiceAccount>(document),
        ("v1", "Namespace") => round_trip::<Namespace>(document),
        ("apps/v1", "Deployment") => round_trip::<Deployment>(document),
        ("policy/v1", "PodDisruptionBudget") => round_trip::<PodDisruptionBudget>(document),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => round_trip::<ClusterRole>(document),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => round_trip::<ClusterRoleBinding>(document),
        ("rbac.authorization.k8s.io/v1", "Role") => round_trip::<Role>(document),
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => round_trip::<RoleBinding>(document),
        ("chat.parley.dev/v1alpha1", "ChatDeployment") => round_trip::<ChatDeployment>(document),
        ("monitoring.coreos.com/v1", "ServiceMonitor") => round_trip::<ServiceMonitor>(document),
        ("monitoring.coreos.com/v1", "PrometheusRule") => round_trip::<PrometheusRule>(document),
        ("rabbitmq.com/v1beta1", "RabbitmqCluster") => round_trip::<RabbitmqCluster>(document),
        ("postgresql.cnpg.io/v1", "Cluster") => round_trip::<Cluster>(document),
        (api, kind) => Err(format!("no typed model for {api} {kind}: add one to this test")),
    }
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(yaml_files(&path));
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            files.push(path);
        }
    }
    files.sort();
    files
}

fn check_files(files: &[PathBuf]) -> usize {
    let mut problems = Vec::new();
    let mut count = 0;
    for file in files {
        let text = std::fs::read_to_string(file).unwrap();
        for document in serde_yaml::Deserializer::from_str(&text) {
            let value =
                Value::deserialize(document).unwrap_or_else(|e| panic!("{}: invalid YAML: {e}", file.display()));
            if value.is_null() {
                continue;
            }
            count += 1;
            let name = format!("{} {}", value["kind"].as_str().unwrap_or("?"), value["metadata"]["name"]);
            match check_document(&value) {
                Ok(lost) if lost.is_empty() => {}
                Ok(lost) => problems.push(format!("{}: {name}: unknown or mistyped fields {lost:?}", file.display())),
                Err(err) => problems.push(format!("{}: {name}: {err}", file.display())),
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    count
}

#[test]
fn every_example_parses_into_typed_objects_without_unknown_fields() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let count = check_files(&yaml_files(&examples));
    assert!(count >= 8, "expected the examples' objects, found {count}");
}

/// Needs the chart rendered by Helm's engine: `scripts/test` renders it and runs this (ignored) test,
/// so a plain `cargo test` shows it as ignored instead of passing without having parsed anything.
#[test]
#[ignore = "needs the rendered chart in PARLEY_RENDERED_DIR: scripts/test renders it and runs this"]
fn every_rendered_chart_manifest_parses_into_typed_objects_without_unknown_fields() {
    let dir = std::env::var_os("PARLEY_RENDERED_DIR")
        .expect("PARLEY_RENDERED_DIR names the rendered chart: run scripts/test, which renders it");
    let count = check_files(&yaml_files(Path::new(&dir)));
    assert!(count >= 10, "expected the rendered chart's objects, found {count}");
}

#[test]
fn a_misspelt_field_is_caught() {
    let document = serde_json::json!({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"},
        "spec": {"replicas": 1, "selector": {}, "template": {"spec": {"containers": [{"name": "c", "imagePullPolice": "Always"}]}}}
    });
    let lost = check_document(&document).unwrap();
    assert_eq!(lost, vec![".spec.template.spec.containers[0].imagePullPolice"]);
}
