//! Build (pure): a [`ValidatedChat`] → every object the ChatDeployment should own, ready to server-side apply.

mod autoscaling;
mod config;
mod gateway;
mod monitoring;
mod workload;

use k8s_openapi::{
    api::{
        apps::v1::Deployment,
        core::v1::{ConfigMap, Service},
        policy::v1::PodDisruptionBudget,
    },
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
};

use std::collections::BTreeMap;

use super::validate::{Scaling, ValidatedChat};
use crate::{
    keda::{ScaledObject, TriggerAuthentication},
    monitoring::PodMonitor,
    names::{Component, Names},
};
use workload::Workload;

/// What the build step needs besides the validated model: facts read from the cluster beforehand.
#[derive(Debug, Clone, PartialEq)]
pub struct Inputs {
    /// Owner reference to the ChatDeployment, set on every object.
    pub owner: OwnerReference,
    /// Digest of the referenced Secrets' data, so pods roll when a credential changes.
    pub secrets_digest: String,
    /// Replicas the builtin autoscaler chose, by language.
    pub scaled: BTreeMap<String, i32>,
    /// Removed languages whose queue still drains, with the replicas their Deployment keeps meanwhile.
    pub draining: BTreeMap<String, i32>,
    /// Whether the KEDA CRDs are installed (ScaledObjects are emitted only then).
    pub keda_installed: bool,
    /// Whether the Prometheus Operator's PodMonitor CRD is installed (a PodMonitor is emitted only then).
    pub pod_monitor_installed: bool,
}

impl Inputs {
    pub fn new(owner: OwnerReference, secrets_digest: String) -> Self {
        Self {
            owner,
            secrets_digest,
            scaled: BTreeMap::new(),
            draining: BTreeMap::new(),
            keda_installed: false,
            pod_monitor_installed: false,
        }
    }
}

/// Every object of one ChatDeployment.
#[derive(Debug, Clone)]
pub struct Desired {
    pub config_map: ConfigMap,
    pub deployments: Vec<Deployment>,
    pub services: Vec<Service>,
    pub disruption_budgets: Vec<PodDisruptionBudget>,
    pub scaled_objects: Vec<ScaledObject>,
    pub trigger_authentications: Vec<TriggerAuthentication>,
    pub pod_monitors: Vec<PodMonitor>,
}

impl Desired {
    /// Names of the Deployments, to prune the rest.
    pub fn deployment_names(&self) -> Vec<String> {
        self.deployments.iter().filter_map(|d| d.metadata.name.clone()).collect()
    }
}

pub fn build(chat: &ValidatedChat, inputs: &Inputs) -> Desired {
    let config_map = config::config_map(chat, inputs);
    let config_hash = config::config_hash(&config_map, &inputs.secrets_digest);
    let names = &chat.names;
    let deployment = |workload: Workload<'_>| workload::deployment(chat, inputs, workload, &config_hash);
    let mut deployments = vec![
        deployment(Workload {
            role: Component::Gateway,
            language: None,
            name: names.gateway(),
            replicas: Some(chat.gateway.replicas),
            args: vec!["gateway".into()],
            overrides: &chat.gateway.overrides,
        }),
        deployment(Workload {
            role: Component::Fanout,
            language: None,
            name: names.fanout(),
            replicas: Some(chat.fanout.replicas),
            args: vec!["fanout".into()],
            overrides: &chat.fanout.overrides,
        }),
    ];
    let translator = |code: &str, replicas| {
        deployment(Workload {
            role: Component::Translator,
            language: Some(code),
            name: names.translator(code),
            replicas,
            args: vec!["translator".into(), "--language".into(), code.to_owned()],
            overrides: &chat.translator,
        })
    };
    for language in &chat.languages {
        let replicas = match language.scaling {
            Scaling::Fixed(n) => Some(n),
            Scaling::Builtin(bounds) => Some(inputs.scaled.get(&language.code).copied().unwrap_or(bounds.min)),
            // Left to KEDA's HPA, to `kubectl scale` or to an HPA: not fought.
            Scaling::Keda(_) | Scaling::Unmanaged => None,
        };
        deployments.push(translator(&language.code, replicas));
    }
    for (code, replicas) in &inputs.draining {
        deployments.push(translator(code, Some(*replicas)));
    }
    let mut scaled_objects = Vec::new();
    if inputs.keda_installed {
        for language in &chat.languages {
            if let Scaling::Keda(bounds) = &language.scaling {
                scaled_objects.push(autoscaling::scaled_object(chat, &language.code, bounds, inputs));
            }
        }
    }
    let trigger_authentications =
        if scaled_objects.is_empty() { Vec::new() } else { vec![autoscaling::trigger_authentication(chat, inputs)] };
    let pod_monitors = if inputs.pod_monitor_installed && chat.monitoring.pod_monitor {
        vec![monitoring::pod_monitor(chat, inputs)]
    } else {
        Vec::new()
    };
    Desired {
        config_map,
        deployments,
        services: vec![gateway::service(chat, inputs)],
        disruption_budgets: vec![gateway::disruption_budget(chat, inputs)],
        scaled_objects,
        trigger_authentications,
        pod_monitors,
    }
}

/// Metadata of an owned object.
fn metadata(names: &Names, name: String, component: Component, language: Option<&str>, inputs: &Inputs) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: Some(names.namespace.clone()),
        labels: Some(names.labels(component, language)),
        owner_references: Some(vec![inputs.owner.clone()]),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{fixtures::chat, reconcile::validate::validate};

    pub fn inputs() -> Inputs {
        // The owner reference the reconcile really sets (kube's `controller_owner_ref`).
        use kube::Resource as _;
        let mut owner = chat(&[]);
        owner.metadata.uid = Some("4b1c9d2e-0000-4000-8000-000000000001".into());
        Inputs::new(owner.controller_owner_ref(&()).expect("a uid"), "secrets-v1".into())
    }

    fn desired() -> Desired {
        let valid = validate(&chat(&[("de", Some(2)), ("fr", None)]), "ghcr.io/parley/chat-server:0.1.0").unwrap();
        build(&valid, &inputs())
    }

    #[test]
    fn config_map_snapshot() {
        insta::assert_yaml_snapshot!(desired().config_map);
    }

    #[test]
    fn gateway_deployment_snapshot() {
        insta::assert_yaml_snapshot!(desired().deployments[0]);
    }

    #[test]
    fn gateway_service_and_disruption_budget_snapshot() {
        let d = desired();
        insta::assert_yaml_snapshot!((&d.services, &d.disruption_budgets));
    }

    #[test]
    fn fanout_deployment_snapshot() {
        insta::assert_yaml_snapshot!(desired().deployments[1]);
    }

    #[test]
    fn translator_deployment_snapshot() {
        insta::assert_yaml_snapshot!(desired().deployments[2]);
    }

    #[test]
    fn fanout_deployment_with_history_snapshot() {
        let mut c = chat(&[("de", Some(2))]);
        c.spec.history = Some(crate::crd::HistorySpec {
            database: crate::crd::DatabaseSpec {
                secret_ref: crate::crd::SecretKeyRef { name: "chat-db-app".into(), key: "uri".into() },
            },
            retention: Some("30d".into()),
        });
        let d = build(&validate(&c, "ghcr.io/parley/chat-server:0.1.0").unwrap(), &inputs());
        insta::assert_yaml_snapshot!((&d.config_map.data, &d.deployments[1]));
        let translator_env =
            d.deployments[2].spec.as_ref().unwrap().template.spec.as_ref().unwrap().containers[0].env.as_ref().unwrap();
        assert!(translator_env.iter().all(|e| e.name != "PARLEY_HISTORY_URL"), "translators never read the history");
    }

    #[test]
    fn one_translator_deployment_per_language_named_after_it() {
        assert_eq!(
            desired().deployment_names(),
            vec!["town-hall-gateway", "town-hall-fanout", "town-hall-translator-de", "town-hall-translator-fr"]
        );
    }

    #[test]
    fn every_object_is_owned_and_labelled() {
        let d = desired();
        let metas = std::iter::once(&d.config_map.metadata)
            .chain(d.deployments.iter().map(|o| &o.metadata))
            .chain(d.services.iter().map(|o| &o.metadata))
            .chain(d.disruption_budgets.iter().map(|o| &o.metadata));
        for meta in metas {
            let labels = meta.labels.as_ref().unwrap();
            assert_eq!(labels["chat.parley.dev/deployment"], "town-hall");
            assert_eq!(labels["app.kubernetes.io/managed-by"], "parley-operator");
            assert!(labels.contains_key("chat.parley.dev/role"));
            assert_eq!(meta.owner_references.as_ref().unwrap()[0].uid, inputs().owner.uid);
        }
    }

    #[test]
    fn pods_roll_when_a_referenced_secret_changes() {
        let valid = validate(&chat(&[]), "img").unwrap();
        let hash = |digest: &str| {
            let d = build(&valid, &Inputs { secrets_digest: digest.into(), ..inputs() });
            d.deployments[0].spec.as_ref().unwrap().template.metadata.as_ref().unwrap().annotations.as_ref().unwrap()
                ["chat.parley.dev/config-hash"]
                .clone()
        };
        assert_ne!(hash("a"), hash("b"));
        assert_eq!(hash("a"), hash("a"));
    }

    #[test]
    fn pods_roll_when_the_config_changes() {
        let hash = |languages: &[(&str, Option<i32>)]| {
            let d = build(&validate(&chat(languages), "img").unwrap(), &inputs());
            d.deployments[0].spec.as_ref().unwrap().template.metadata.as_ref().unwrap().annotations.as_ref().unwrap()
                ["chat.parley.dev/config-hash"]
                .clone()
        };
        assert_ne!(hash(&[("de", None)]), hash(&[("de", None), ("fr", None)]));
        assert_eq!(hash(&[("de", None)]), hash(&[("de", Some(5))]), "replicas are not configuration");
    }

    fn autoscaled(mode: crate::crd::AutoscalingMode) -> ValidatedChat {
        let mut c = chat(&[]);
        c.spec.languages = vec![crate::fixtures::autoscaled("de", crate::fixtures::autoscaling(mode, 0, 10))];
        validate(&c, "img").unwrap()
    }

    fn translator_replicas(d: &Desired) -> Option<i32> {
        d.deployments[2].spec.as_ref().unwrap().replicas
    }

    #[test]
    fn keda_scaled_object_snapshot() {
        let d = build(&autoscaled(crate::crd::AutoscalingMode::Keda), &Inputs { keda_installed: true, ..inputs() });
        insta::assert_yaml_snapshot!((&d.scaled_objects, &d.trigger_authentications));
    }

    #[test]
    fn pod_monitor_snapshot() {
        let mut spec = chat(&[("de", Some(1))]);
        spec.spec.monitoring.labels = [("release".to_owned(), "kube-prometheus-stack".to_owned())].into();
        let valid = validate(&spec, "img").unwrap();
        assert!(build(&valid, &inputs()).pod_monitors.is_empty(), "none without the Prometheus Operator");
        let d = build(&valid, &Inputs { pod_monitor_installed: true, ..inputs() });
        insta::assert_yaml_snapshot!(&d.pod_monitors);
    }

    #[test]
    fn replicas_are_written_only_by_builtin_autoscaling_or_a_fixed_count() {
        let builtin = autoscaled(crate::crd::AutoscalingMode::Builtin);
        let scaled = Inputs { scaled: [("de".to_owned(), 4)].into(), ..inputs() };
        assert_eq!(translator_replicas(&build(&builtin, &scaled)), Some(4));
        let keda = build(&autoscaled(crate::crd::AutoscalingMode::Keda), &Inputs { keda_installed: true, ..inputs() });
        assert_eq!(translator_replicas(&keda), None, "KEDA's HPA owns replicas");
        let unmanaged = build(&validate(&chat(&[("de", None)]), "img").unwrap(), &inputs());
        assert_eq!(translator_replicas(&unmanaged), None, "kubectl scale is not fought");
        assert_eq!(
            translator_replicas(&build(&validate(&chat(&[("de", Some(3))]), "img").unwrap(), &inputs())),
            Some(3)
        );
    }

    #[test]
    fn keda_mode_without_keda_installed_emits_no_scaled_object() {
        let d = build(&autoscaled(crate::crd::AutoscalingMode::Keda), &inputs());
        assert!(d.scaled_objects.is_empty() && d.trigger_authentications.is_empty());
    }

    #[test]
    fn a_draining_language_keeps_its_deployment() {
        let valid = validate(&chat(&[("de", None)]), "img").unwrap();
        let d = build(&valid, &Inputs { draining: [("fr".to_owned(), 2)].into(), ..inputs() });
        assert_eq!(d.deployment_names().last().map(String::as_str), Some("town-hall-translator-fr"));
        assert_eq!(d.deployments.last().unwrap().spec.as_ref().unwrap().replicas, Some(2));
    }

    #[test]
    fn role_overrides_reach_the_pods() {
        let mut c = chat(&[]);
        c.spec.gateway.overrides.node_selector = Some([("pool".to_owned(), "edge".to_owned())].into());
        c.spec.gateway.overrides.labels = Some([("team".to_owned(), "chat".to_owned())].into());
        let d = build(&validate(&c, "img").unwrap(), &inputs());
        let template = &d.deployments[0].spec.as_ref().unwrap().template;
        assert_eq!(template.spec.as_ref().unwrap().node_selector.as_ref().unwrap()["pool"], "edge");
        assert_eq!(template.metadata.as_ref().unwrap().labels.as_ref().unwrap()["team"], "chat");
        let fanout = &d.deployments[1].spec.as_ref().unwrap().template;
        assert!(fanout.spec.as_ref().unwrap().node_selector.is_none(), "overrides are per role");
    }
}
