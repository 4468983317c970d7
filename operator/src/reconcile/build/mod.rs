//! Build (pure): a [`ValidatedChat`] → every object the ChatDeployment should own, ready to server-side apply.

mod autoscaling;
mod config;
mod gateway;
mod monitoring;
mod network;
mod workload;

pub use network::{BROKER_PORTS, POSTGRES_PORT};

use k8s_openapi::{
    api::{
        apps::v1::Deployment,
        core::v1::{ConfigMap, Service},
        networking::v1::NetworkPolicy,
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
    /// The port the broker URI names, for the NetworkPolicies (5671 and 5672 are always let out).
    pub broker_port: Option<u16>,
    /// The port the history database's URI names, for the NetworkPolicies (5432 is always let out).
    pub history_port: Option<u16>,
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
            broker_port: None,
            history_port: None,
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
    pub network_policies: Vec<NetworkPolicy>,
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
        network_policies: network::network_policies(chat, inputs),
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
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    use parley_contract::config::ChatServerConfig;

    use super::*;
    use crate::{
        fixtures::chat,
        names::{CONFIG_FILE, GATEWAY_CONFIG_FILE},
        reconcile::validate::validate,
    };

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
            .chain(d.disruption_budgets.iter().map(|o| &o.metadata))
            .chain(d.network_policies.iter().map(|o| &o.metadata));
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

    fn container(d: &Deployment) -> &k8s_openapi::api::core::v1::Container {
        &d.spec.as_ref().unwrap().template.spec.as_ref().unwrap().containers[0]
    }

    fn env_value(d: &Deployment, name: &str) -> Option<String> {
        container(d).env.iter().flatten().find(|e| e.name == name).and_then(|e| e.value.clone())
    }

    fn file<'a>(d: &'a Desired, name: &str) -> &'a str {
        &d.config_map.data.as_ref().unwrap()[name]
    }

    fn oidc() -> crate::crd::AuthSpec {
        crate::crd::AuthSpec {
            mode: crate::crd::AuthMode::Oidc,
            issuer: Some("https://keycloak.example.com/realms/events".into()),
            audience: Some("parley".into()),
            client_id: None,
            clock_skew_seconds: Some(10),
            groups_claim: Some("realm_access.roles".into()),
            name_claim: Some("preferred_username".into()),
            read_groups: vec!["attendees".into(), "speakers".into()],
            send_groups: vec!["speakers".into()],
            jwt_secret_ref: None,
            rate_limits: Some(crate::crd::RateLimitsSpec {
                send_per_second: Some(2),
                send_burst: Some(10),
                subscribe_per_second: Some(4),
                max_connections_per_ip: Some(50),
            }),
        }
    }

    #[test]
    fn only_the_gateway_reads_sign_in_and_without_spec_auth_its_file_says_auth_none() {
        let d = desired();
        let gateway = ChatServerConfig::from_toml(file(&d, GATEWAY_CONFIG_FILE)).unwrap();
        assert_eq!(gateway.auth, Some(parley_contract::config::AuthMode::None), "explicit: a gateway needs it");
        let shared = ChatServerConfig::from_toml(file(&d, CONFIG_FILE)).unwrap();
        assert_eq!(shared.auth, None, "the fanout and translators never sign anyone in");
        assert_eq!(ChatServerConfig { auth: None, ..gateway }, shared, "otherwise the same settings");
        let read = |i: usize| env_value(&d.deployments[i], "PARLEY_CONFIG").unwrap();
        assert_eq!(read(0), "/etc/parley/gateway.toml");
        assert_eq!(
            (read(1).as_str(), read(2).as_str()),
            ("/etc/parley/chat-server.toml", "/etc/parley/chat-server.toml")
        );
    }

    #[test]
    fn gateway_config_with_oidc_snapshot() {
        let mut c = chat(&[("de", Some(1))]);
        c.spec.auth = Some(crate::crd::AuthSpec { client_id: Some("parley-page".into()), ..oidc() });
        let d = build(&validate(&c, "img").unwrap(), &inputs());
        let gateway = ChatServerConfig::from_toml(file(&d, GATEWAY_CONFIG_FILE)).unwrap();
        assert_eq!(gateway.oidc_client_id.as_deref(), Some("parley-page"), "the chat page's OAuth client");
        assert_eq!(gateway.auth, Some(parley_contract::config::AuthMode::Oidc));
        assert_eq!(gateway.auth_issuer.as_deref(), Some("https://keycloak.example.com/realms/events"));
        assert_eq!(gateway.read_groups.as_deref(), Some("attendees,speakers"), "comma-joined");
        assert_eq!((gateway.send_rate, gateway.max_connections_per_ip), (Some(2), Some(50)));
        assert!(!file(&d, CONFIG_FILE).contains("auth"), "{}", file(&d, CONFIG_FILE));
        insta::assert_snapshot!(file(&d, GATEWAY_CONFIG_FILE));
    }

    #[test]
    fn jwt_mode_hands_only_the_gateway_its_secret_from_the_secret_and_never_the_config_map() {
        let mut c = chat(&[("de", Some(1))]);
        let reference = crate::crd::SecretKeyRef { name: "parley-jwt".into(), key: "secret".into() };
        c.spec.auth = Some(crate::crd::AuthSpec {
            mode: crate::crd::AuthMode::Jwt,
            jwt_secret_ref: Some(reference),
            ..Default::default()
        });
        let d = build(&validate(&c, "img").unwrap(), &inputs());
        let jwt = container(&d.deployments[0]).env.iter().flatten().find(|e| e.name == "PARLEY_JWT_SECRET").unwrap();
        assert_eq!(jwt.value, None, "never the value itself");
        let selector = jwt.value_from.as_ref().unwrap().secret_key_ref.as_ref().unwrap();
        assert_eq!((selector.name.as_str(), selector.key.as_str()), ("parley-jwt", "secret"));
        for other in &d.deployments[1..] {
            assert!(env_value(other, "PARLEY_JWT_SECRET").is_none(), "{:?}", other.metadata.name);
            assert!(container(other).env.iter().flatten().all(|e| e.name != "PARLEY_JWT_SECRET"));
        }
        let gateway = ChatServerConfig::from_toml(file(&d, GATEWAY_CONFIG_FILE)).unwrap();
        assert_eq!((gateway.auth, gateway.jwt_secret), (Some(parley_contract::config::AuthMode::Jwt), None));
        for text in d.config_map.data.as_ref().unwrap().values() {
            assert!(!text.contains("jwt-secret"), "{text}");
        }
    }

    #[test]
    fn a_broker_ca_is_mounted_read_only_in_every_pod_and_named_by_amqp_ca_file() {
        let mut c = chat(&[("de", Some(1))]);
        c.spec.broker.tls = Some(crate::crd::BrokerTlsSpec {
            ca_secret_ref: crate::crd::SecretKeyRef { name: "rabbitmq-ca".into(), key: "ca.crt".into() },
        });
        let d = build(&validate(&c, "img").unwrap(), &inputs());
        for name in [CONFIG_FILE, GATEWAY_CONFIG_FILE] {
            let config = ChatServerConfig::from_toml(file(&d, name)).unwrap();
            assert_eq!(config.amqp_ca_file.as_deref(), Some("/etc/parley-broker-ca/ca.pem"), "{name}");
        }
        assert_eq!(d.deployments.len(), 3);
        for deployment in &d.deployments {
            let pod = deployment.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
            let mount = container(deployment).volume_mounts.iter().flatten().find(|m| m.name == "broker-ca").unwrap();
            assert_eq!((mount.mount_path.as_str(), mount.read_only), ("/etc/parley-broker-ca", Some(true)));
            let volume = pod.volumes.iter().flatten().find(|v| v.name == "broker-ca").unwrap();
            let secret = volume.secret.as_ref().unwrap();
            assert_eq!(secret.secret_name.as_deref(), Some("rabbitmq-ca"));
            let item = &secret.items.as_ref().unwrap()[0];
            assert_eq!((item.key.as_str(), item.path.as_str()), ("ca.crt", "ca.pem"));
        }
        let plain = desired();
        assert!(!file(&plain, CONFIG_FILE).contains("amqp-ca-file"), "the system's roots without one");
        let pod = plain.deployments[0].spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        assert!(pod.volumes.iter().flatten().all(|v| v.name != "broker-ca"));
    }

    #[test]
    fn network_policies_snapshot() {
        insta::assert_yaml_snapshot!(desired().network_policies);
    }

    /// TCP ports each egress rule of the role's NetworkPolicy lets out, in order.
    fn egress(d: &Desired, role: &str) -> Vec<Vec<i32>> {
        let policy = d.network_policies.iter().find(|p| p.metadata.name.as_deref() == Some(role)).unwrap();
        let spec = policy.spec.as_ref().unwrap();
        spec.egress
            .iter()
            .flatten()
            .map(|rule| {
                rule.ports
                    .iter()
                    .flatten()
                    .filter(|p| p.protocol.as_deref() == Some("TCP"))
                    .map(|p| match p.port {
                        Some(IntOrString::Int(n)) => n,
                        _ => panic!("a numbered port"),
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn each_role_may_reach_only_what_it_talks_to() {
        let d = desired();
        assert_eq!(d.network_policies.len(), 3);
        let (dns, broker) = (vec![53, 5353], vec![5671, 5672]);
        assert_eq!(egress(&d, "town-hall-gateway"), [dns.clone(), broker.clone()]);
        assert_eq!(egress(&d, "town-hall-fanout"), [dns.clone(), broker.clone()]);
        assert_eq!(
            egress(&d, "town-hall-translator"),
            [dns.clone(), broker.clone(), vec![2737]],
            "the provider's port"
        );
        for policy in &d.network_policies {
            let spec = policy.spec.as_ref().unwrap();
            let ingress = &spec.ingress.as_ref().unwrap()[0];
            assert!(ingress.from.is_none(), "from anywhere");
            assert_eq!(ingress.ports.as_ref().unwrap()[0].port, Some(IntOrString::Int(8080)));
            let role = policy.metadata.labels.as_ref().unwrap()["app.kubernetes.io/component"].clone();
            let selected = spec.pod_selector.as_ref().unwrap().match_labels.as_ref().unwrap();
            for deployment in d
                .deployments
                .iter()
                .filter(|d| d.metadata.labels.as_ref().unwrap()["app.kubernetes.io/component"] == role)
            {
                let pods =
                    deployment.spec.as_ref().unwrap().template.metadata.as_ref().unwrap().labels.as_ref().unwrap();
                assert!(selected.iter().all(|(k, v)| pods.get(k) == Some(v)), "{role} selects its pods");
            }
        }

        // A history, an OIDC issuer, a collector, an https provider and a broker on its own port.
        let mut c = chat(&[("de", Some(1))]);
        c.spec.auth = Some(oidc());
        c.spec.translation.url = "https://translate.example.com".into();
        c.spec.monitoring.otlp_endpoint = Some("http://otel-collector.observability:4318".into());
        c.spec.history = Some(crate::crd::HistorySpec {
            database: crate::crd::DatabaseSpec {
                secret_ref: crate::crd::SecretKeyRef { name: "chat-db-app".into(), key: "uri".into() },
            },
            retention: None,
        });
        let inputs = Inputs { broker_port: Some(5673), history_port: Some(6432), ..inputs() };
        let d = build(&validate(&c, "img").unwrap(), &inputs);
        let (broker, history, otlp) = (vec![5671, 5672, 5673], vec![5432, 6432], vec![4318]);
        assert_eq!(
            egress(&d, "town-hall-gateway"),
            [dns.clone(), broker.clone(), history.clone(), vec![443], otlp.clone()],
            "the history and the issuer"
        );
        assert_eq!(egress(&d, "town-hall-fanout"), [dns.clone(), broker.clone(), history, otlp.clone()]);
        assert_eq!(egress(&d, "town-hall-translator"), [dns, broker, vec![443], otlp], "no history for translators");
    }

    #[test]
    fn no_network_policies_when_turned_off() {
        let mut c = chat(&[("de", Some(1))]);
        c.spec.network_policy.enabled = false;
        assert!(build(&validate(&c, "img").unwrap(), &inputs()).network_policies.is_empty());
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
