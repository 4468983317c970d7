//! The fanout Deployment: replicas beyond the first wait as standby consumers.

use k8s_openapi::{
    api::apps::v1::{Deployment, DeploymentSpec},
    apimachinery::pkg::apis::meta::v1::LabelSelector,
};

use super::{metadata, pod, Inputs};
use crate::{names::Role, validate::ValidatedChat};

pub fn deployment(chat: &ValidatedChat, inputs: &Inputs, config_hash: &str) -> Deployment {
    let names = &chat.names;
    Deployment {
        metadata: metadata(names, names.fanout(), Role::Fanout, None, inputs),
        spec: Some(DeploymentSpec {
            replicas: Some(chat.fanout.replicas),
            selector: LabelSelector { match_labels: Some(names.selector(Role::Fanout, None)), ..Default::default() },
            template: pod::template(
                chat,
                Role::Fanout,
                None,
                vec!["fanout".into()],
                &chat.fanout.overrides,
                config_hash,
            ),
            ..Default::default()
        }),
        ..Default::default()
    }
}
