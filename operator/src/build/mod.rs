//! Build (pure): a [`ValidatedChat`] → every object the ChatDeployment should own, ready to server-side apply.

mod config;
mod fanout;
mod gateway;
mod pod;
mod translator;

use k8s_openapi::{
    api::{
        apps::v1::Deployment,
        core::v1::{ConfigMap, Service},
        policy::v1::PodDisruptionBudget,
    },
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
};

use crate::{
    names::{Names, Role},
    validate::ValidatedChat,
};

/// What the build step needs besides the validated model: facts read from the cluster beforehand.
#[derive(Debug, Clone, PartialEq)]
pub struct Inputs {
    /// Owner reference to the ChatDeployment, set on every object.
    pub owner: OwnerReference,
    /// Digest of the referenced Secrets' data, so pods roll when a credential changes.
    pub secrets_digest: String,
}

/// Every object of one ChatDeployment.
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    pub config_map: ConfigMap,
    pub deployments: Vec<Deployment>,
    pub services: Vec<Service>,
    pub disruption_budgets: Vec<PodDisruptionBudget>,
}

impl Desired {
    /// Names of the Deployments, to prune the rest.
    pub fn deployment_names(&self) -> Vec<String> {
        self.deployments
            .iter()
            .filter_map(|d| d.metadata.name.clone())
            .collect()
    }
}

pub fn build(chat: &ValidatedChat, inputs: &Inputs) -> Desired {
    let config_map = config::config_map(chat, inputs);
    let config_hash = config::config_hash(&config_map, &inputs.secrets_digest);
    let mut deployments = vec![
        gateway::deployment(chat, inputs, &config_hash),
        fanout::deployment(chat, inputs, &config_hash),
    ];
    deployments.extend(
        chat.languages
            .iter()
            .map(|l| translator::deployment(chat, l, inputs, &config_hash)),
    );
    Desired {
        config_map,
        deployments,
        services: vec![gateway::service(chat, inputs)],
        disruption_budgets: vec![gateway::disruption_budget(chat, inputs)],
    }
}

/// Metadata of an owned object.
fn metadata(
    names: &Names,
    name: String,
    role: Role,
    language: Option<&str>,
    inputs: &Inputs,
) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: Some(names.namespace.clone()),
        labels: Some(names.labels(role, language)),
        owner_references: Some(vec![inputs.owner.clone()]),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::{tests::chat, validate};

    pub fn inputs() -> Inputs {
        Inputs {
            owner: OwnerReference {
                api_version: "chat.parley.dev/v1alpha1".into(),
                kind: "ChatDeployment".into(),
                name: "town-hall".into(),
                uid: "4b1c9d2e-0000-4000-8000-000000000001".into(),
                controller: Some(true),
                block_owner_deletion: Some(true),
            },
            secrets_digest: "secrets-v1".into(),
        }
    }

    fn desired() -> Desired {
        let valid = validate(
            &chat(&[("de", Some(2)), ("fr", None)]),
            "ghcr.io/parley/chat-server:0.1.0",
        )
        .unwrap();
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
    fn one_translator_deployment_per_language_named_after_it() {
        assert_eq!(
            desired().deployment_names(),
            vec![
                "town-hall-gateway",
                "town-hall-fanout",
                "town-hall-translator-de",
                "town-hall-translator-fr"
            ]
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
            assert_eq!(
                meta.owner_references.as_ref().unwrap()[0].uid,
                inputs().owner.uid
            );
        }
    }

    #[test]
    fn pods_roll_when_a_referenced_secret_changes() {
        let valid = validate(&chat(&[]), "img").unwrap();
        let hash = |digest: &str| {
            let d = build(
                &valid,
                &Inputs {
                    secrets_digest: digest.into(),
                    ..inputs()
                },
            );
            d.deployments[0]
                .spec
                .as_ref()
                .unwrap()
                .template
                .metadata
                .as_ref()
                .unwrap()
                .annotations
                .as_ref()
                .unwrap()["chat.parley.dev/config-hash"]
                .clone()
        };
        assert_ne!(hash("a"), hash("b"));
        assert_eq!(hash("a"), hash("a"));
    }

    #[test]
    fn pods_roll_when_the_config_changes() {
        let hash = |languages: &[(&str, Option<i32>)]| {
            let d = build(&validate(&chat(languages), "img").unwrap(), &inputs());
            d.deployments[0]
                .spec
                .as_ref()
                .unwrap()
                .template
                .metadata
                .as_ref()
                .unwrap()
                .annotations
                .as_ref()
                .unwrap()["chat.parley.dev/config-hash"]
                .clone()
        };
        assert_ne!(hash(&[("de", None)]), hash(&[("de", None), ("fr", None)]));
        assert_eq!(
            hash(&[("de", None)]),
            hash(&[("de", Some(5))]),
            "replicas are not configuration"
        );
    }

    #[test]
    fn role_overrides_reach_the_pods() {
        let mut c = chat(&[]);
        c.spec.gateway.overrides.node_selector =
            Some([("pool".to_owned(), "edge".to_owned())].into());
        c.spec.gateway.overrides.labels = Some([("team".to_owned(), "chat".to_owned())].into());
        let d = build(&validate(&c, "img").unwrap(), &inputs());
        let template = &d.deployments[0].spec.as_ref().unwrap().template;
        assert_eq!(
            template
                .spec
                .as_ref()
                .unwrap()
                .node_selector
                .as_ref()
                .unwrap()["pool"],
            "edge"
        );
        assert_eq!(
            template.metadata.as_ref().unwrap().labels.as_ref().unwrap()["team"],
            "chat"
        );
        let fanout = &d.deployments[1].spec.as_ref().unwrap().template;
        assert!(
            fanout.spec.as_ref().unwrap().node_selector.is_none(),
            "overrides are per role"
        );
    }
}
