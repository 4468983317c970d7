//! The gateway: its Deployment, the Service clients connect to, and a PodDisruptionBudget.

use k8s_openapi::{
    api::{
        apps::v1::{Deployment, DeploymentSpec},
        core::v1::{Service, ServicePort, ServiceSpec},
        policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec},
    },
    apimachinery::pkg::{apis::meta::v1::LabelSelector, util::intstr::IntOrString},
};

use super::{metadata, pod, Inputs};
use crate::{
    names::{Role, SERVICE_PORT},
    validate::ValidatedChat,
};

pub fn deployment(chat: &ValidatedChat, inputs: &Inputs, config_hash: &str) -> Deployment {
    let names = &chat.names;
    Deployment {
        metadata: metadata(names, names.gateway(), Role::Gateway, None, inputs),
        spec: Some(DeploymentSpec {
            replicas: Some(chat.gateway.replicas),
            selector: LabelSelector { match_labels: Some(names.selector(Role::Gateway, None)), ..Default::default() },
            template: pod::template(
                chat,
                Role::Gateway,
                None,
                vec!["gateway".into()],
                &chat.gateway.overrides,
                config_hash,
            ),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub fn service(chat: &ValidatedChat, inputs: &Inputs) -> Service {
    let names = &chat.names;
    Service {
        metadata: metadata(names, names.gateway(), Role::Gateway, None, inputs),
        spec: Some(ServiceSpec {
            selector: Some(names.selector(Role::Gateway, None)),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: SERVICE_PORT,
                target_port: Some(IntOrString::String("http".into())),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// At most one gateway pod down at a time in voluntary disruptions, so a drain never drops every socket.
pub fn disruption_budget(chat: &ValidatedChat, inputs: &Inputs) -> PodDisruptionBudget {
    let names = &chat.names;
    PodDisruptionBudget {
        metadata: metadata(names, names.gateway(), Role::Gateway, None, inputs),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(names.selector(Role::Gateway, None)),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}
