//! The PodMonitor that has Prometheus scrape every pod of the chat, where the Prometheus Operator is installed.

use std::collections::BTreeMap;

use super::{metadata, Inputs};
use crate::{
    monitoring::{PodMetricsEndpoint, PodMonitor, PodMonitorSpec, Selector},
    names::{Component, DEPLOYMENT_LABEL, LANGUAGE_LABEL, MANAGED_BY},
    reconcile::validate::ValidatedChat,
};

/// Pod labels every scraped series carries, so a dashboard can tell the chat, the role and the
/// language apart (Prometheus spells them `app_kubernetes_io_instance` and so on).
pub const TARGET_LABELS: [&str; 3] = ["app.kubernetes.io/instance", "app.kubernetes.io/component", LANGUAGE_LABEL];

pub fn pod_monitor(chat: &ValidatedChat, inputs: &Inputs) -> PodMonitor {
    let names = &chat.names;
    let mut meta = metadata(names, names.instance.clone(), Component::Monitoring, None, inputs);
    let labels = meta.labels.get_or_insert_with(BTreeMap::new);
    for (key, value) in &chat.monitoring.labels {
        // The spec's labels never replace the ones pruning relies on.
        labels.entry(key.clone()).or_insert_with(|| value.clone());
    }
    PodMonitor {
        metadata: meta,
        spec: PodMonitorSpec {
            selector: Selector {
                match_labels: BTreeMap::from([
                    (DEPLOYMENT_LABEL.to_owned(), names.instance.clone()),
                    ("app.kubernetes.io/managed-by".to_owned(), MANAGED_BY.to_owned()),
                ]),
            },
            pod_metrics_endpoints: vec![PodMetricsEndpoint {
                port: "http".into(),
                path: "/metrics".into(),
                interval: chat.monitoring.interval.clone(),
            }],
            pod_target_labels: TARGET_LABELS.iter().map(|l| (*l).to_owned()).collect(),
        },
    }
}
