//! The Prometheus Operator resource the operator emits for each ChatDeployment where its CRDs are
//! installed, typed with only the fields it sets.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A PodMonitor: Prometheus scrapes `/metrics` of every pod of one chat.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(group = "monitoring.coreos.com", version = "v1", kind = "PodMonitor", namespaced, derive = "Default")]
#[serde(rename_all = "camelCase")]
pub struct PodMonitorSpec {
    pub selector: Selector,
    pub pod_metrics_endpoints: Vec<PodMetricsEndpoint>,
    /// Pod labels copied onto every series scraped from the pod.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pod_target_labels: Vec<String>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Selector {
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodMetricsEndpoint {
    pub port: String,
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
}
