//! The RBAC rules the operator needs: the one list the Helm chart's ClusterRole (or Roles) and Lease Role are
//! rendered from (`operator rbac` → `charts/parley-operator/files/rbac-rules.yaml`), checked against the
//! requests the reconcile tests actually make.

use k8s_openapi::api::rbac::v1::PolicyRule;
use serde::Serialize;

/// One API resource and the verbs used on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    pub group: &'static str,
    pub resource: &'static str,
    pub verbs: &'static [&'static str],
    /// The only objects the rule reaches, by name; every one of the resource when empty.
    pub names: &'static [&'static str],
}

/// What the controller does in each namespace it watches.
pub const CONTROLLER: &[Rule] = &[
    Rule { group: "chat.parley.dev", resource: "chatdeployments", verbs: &["list", "watch", "patch"], names: &[] },
    Rule { group: "chat.parley.dev", resource: "chatdeployments/status", verbs: &["patch"], names: &[] },
    Rule { group: "apps", resource: "deployments", verbs: &["list", "watch", "patch", "delete"], names: &[] },
    Rule { group: "", resource: "services", verbs: &["list", "watch", "patch", "delete"], names: &[] },
    Rule { group: "", resource: "configmaps", verbs: &["list", "watch", "patch", "delete"], names: &[] },
    // Read-only: deletion waits until no pod of the chat is left before it removes the topology.
    Rule { group: "", resource: "pods", verbs: &["list"], names: &[] },
    Rule { group: "policy", resource: "poddisruptionbudgets", verbs: &["list", "patch", "delete"], names: &[] },
    Rule { group: "networking.k8s.io", resource: "networkpolicies", verbs: &["list", "patch", "delete"], names: &[] },
    // Read-only, one by name: the broker URI, its CA, the provider key, the database URI and the
    // JWT secret a chat references. Watching them is opt-in (`SECRET_WATCH`).
    Rule { group: "", resource: "secrets", verbs: &["get"], names: &[] },
    Rule { group: "events.k8s.io", resource: "events", verbs: &["create", "patch"], names: &[] },
    Rule { group: "keda.sh", resource: "scaledobjects", verbs: &["list", "patch", "delete"], names: &[] },
    Rule { group: "keda.sh", resource: "triggerauthentications", verbs: &["list", "patch", "delete"], names: &[] },
    Rule { group: "monitoring.coreos.com", resource: "podmonitors", verbs: &["list", "patch", "delete"], names: &[] },
];

/// What `--watch-secrets` (the chart's `secretWatch`) adds: a metadata-only watch of Secrets, so a
/// changed credential rolls the pods that use it at once instead of at the next resync. It lets the
/// operator list every Secret's name and labels (never their data) wherever it watches.
pub const SECRET_WATCH: &[Rule] = &[Rule { group: "", resource: "secrets", verbs: &["list", "watch"], names: &[] }];

/// What the operator does in its own namespace: leader election, and keeping the key of the
/// checksum of referenced Secrets (`run::checksum_key`).
pub const LEADER_ELECTION: &[Rule] = &[
    Rule { group: "coordination.k8s.io", resource: "leases", verbs: &["get", "create", "update"], names: &[] },
    // The checksum key: created once (RBAC cannot name an object not created yet), then read by name.
    Rule { group: "", resource: "secrets", verbs: &["create"], names: &[] },
    Rule { group: "", resource: "secrets", verbs: &["get"], names: &[crate::run::CHECKSUM_KEY_SECRET] },
];

/// Verbs used outside a reconcile, so no reconcile test sees them: the watches of `run.rs`, and the
/// patch that folds a repeated Event into a series.
pub const RUNTIME_ONLY: &[(&str, &str, &str)] = &[
    ("events.k8s.io", "events", "patch"),
    ("chat.parley.dev", "chatdeployments", "list"),
    ("chat.parley.dev", "chatdeployments", "watch"),
    ("apps", "deployments", "watch"),
    ("", "services", "list"),
    ("", "services", "watch"),
    ("", "configmaps", "list"),
    ("", "configmaps", "watch"),
];

/// Whether `rules` allow `verb` on `group`/`resource`.
pub fn allows(rules: &[Rule], group: &str, resource: &str, verb: &str) -> bool {
    rules.iter().any(|r| r.group == group && r.resource == resource && r.verbs.contains(&verb))
}

fn policy_rules(rules: &[Rule]) -> Vec<PolicyRule> {
    rules
        .iter()
        .map(|r| PolicyRule {
            api_groups: Some(vec![r.group.to_owned()]),
            resources: Some(vec![r.resource.to_owned()]),
            verbs: r.verbs.iter().map(|v| (*v).to_owned()).collect(),
            resource_names: (!r.names.is_empty()).then(|| r.names.iter().map(|n| (*n).to_owned()).collect()),
            ..Default::default()
        })
        .collect()
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RulesFile {
    controller: Vec<PolicyRule>,
    secret_watch: Vec<PolicyRule>,
    leader_election: Vec<PolicyRule>,
}

/// The rules as the YAML file the Helm chart renders its RBAC from.
pub fn rules_yaml() -> String {
    let file = RulesFile {
        controller: policy_rules(CONTROLLER),
        secret_watch: policy_rules(SECRET_WATCH),
        leader_election: policy_rules(LEADER_ELECTION),
    };
    format!(
        "# Generated by `operator rbac` from operator/src/rbac.rs; a test fails when this file is stale.\n{}",
        serde_yaml::to_string(&file).expect("rules always serialize")
    )
}
