//! What only the gateway has: the Service clients connect to, and a PodDisruptionBudget.

use k8s_openapi::{
    api::{
        core::v1::{Service, ServicePort, ServiceSpec},
        policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec},
    },
    apimachinery::pkg::{apis::meta::v1::LabelSelector, util::intstr::IntOrString},
};

use super::{metadata, Inputs};
use crate::{
    names::{Component, SERVICE_PORT},
    reconcile::validate::ValidatedChat,
};

pub fn service(chat: &ValidatedChat, inputs: &Inputs) -> Service {
    let names = &chat.names;
    Service {
        metadata: metadata(names, names.gateway(), Component::Gateway, None, inputs),
        spec: Some(ServiceSpec {
            selector: Some(names.selector(Component::Gateway, None)),
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
        metadata: metadata(names, names.gateway(), Component::Gateway, None, inputs),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(names.selector(Component::Gateway, None)),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}
