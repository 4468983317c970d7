//! One translator Deployment per language, named after the language.

use k8s_openapi::{
    api::apps::v1::{Deployment, DeploymentSpec},
    apimachinery::pkg::apis::meta::v1::LabelSelector,
};

use super::{metadata, pod, Inputs};
use crate::{
    names::Role,
    validate::{Language, ValidatedChat},
};

pub fn deployment(
    chat: &ValidatedChat,
    language: &Language,
    inputs: &Inputs,
    config_hash: &str,
) -> Deployment {
    let names = &chat.names;
    let code = Some(language.code.as_str());
    let args = vec![
        "translator".into(),
        "--language".into(),
        language.code.clone(),
    ];
    Deployment {
        metadata: metadata(
            names,
            names.translator(&language.code),
            Role::Translator,
            code,
            inputs,
        ),
        spec: Some(DeploymentSpec {
            replicas: Some(language.replicas),
            selector: LabelSelector {
                match_labels: Some(names.selector(Role::Translator, code)),
                ..Default::default()
            },
            template: pod::template(
                chat,
                Role::Translator,
                code,
                args,
                &chat.translator,
                config_hash,
            ),
            ..Default::default()
        }),
        ..Default::default()
    }
}
