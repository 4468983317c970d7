//! One translator Deployment per language, named after the language.

use k8s_openapi::{
    api::apps::v1::{Deployment, DeploymentSpec},
    apimachinery::pkg::apis::meta::v1::LabelSelector,
};

use super::{metadata, pod, Inputs};
use crate::{names::Role, validate::ValidatedChat};

/// `replicas: None` leaves the field to whoever else scales the Deployment.
pub fn deployment(
    chat: &ValidatedChat,
    language: &str,
    replicas: Option<i32>,
    inputs: &Inputs,
    config_hash: &str,
) -> Deployment {
    let names = &chat.names;
    let code = Some(language);
    let args = vec!["translator".into(), "--language".into(), language.to_owned()];
    Deployment {
        metadata: metadata(names, names.translator(language), Role::Translator, code, inputs),
        spec: Some(DeploymentSpec {
            replicas,
            selector: LabelSelector {
                match_labels: Some(names.selector(Role::Translator, code)),
                ..Default::default()
            },
            template: pod::template(chat, Role::Translator, code, args, &chat.translator, config_hash),
            ..Default::default()
        }),
        ..Default::default()
    }
}
