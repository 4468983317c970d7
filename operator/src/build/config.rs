//! The ConfigMap with the chat-server configuration file every role mounts.

use k8s_openapi::api::core::v1::ConfigMap;
use sha2::{Digest, Sha256};

use super::{metadata, Inputs};
use crate::{
    names::{Role, CONFIG_FILE},
    validate::ValidatedChat,
};

fn toml_string(value: &str) -> String {
    // A JSON string literal is a valid TOML basic string.
    serde_json::to_string(value).expect("strings always encode")
}

/// The chat-server's TOML configuration; secrets stay out of it and arrive as environment variables.
pub fn config_file(chat: &ValidatedChat) -> String {
    let languages = chat.language_codes().join(",");
    [
        format!("topology-prefix = {}", toml_string(&chat.topology_prefix)),
        format!("source-language = {}", toml_string(&chat.source_language)),
        format!("languages = {}", toml_string(&languages)),
        format!("translator = {}", toml_string(chat.provider.as_str())),
        format!("translator-url = {}", toml_string(&chat.provider_url)),
        "log-format = \"json\"".to_owned(),
    ]
    .join("\n")
        + "\n"
}

pub fn config_map(chat: &ValidatedChat, inputs: &Inputs) -> ConfigMap {
    ConfigMap {
        metadata: metadata(&chat.names, chat.names.config_map(), Role::Config, None, inputs),
        data: Some([(CONFIG_FILE.to_owned(), config_file(chat))].into()),
        ..Default::default()
    }
}

/// A short digest of the rendered configuration and the referenced Secrets, put on every pod template.
pub fn config_hash(config_map: &ConfigMap, secrets_digest: &str) -> String {
    let mut hasher = Sha256::new();
    for (key, value) in config_map.data.iter().flatten() {
        hasher.update(key.as_bytes());
        hasher.update([0]);
        hasher.update(value.as_bytes());
        hasher.update([0]);
    }
    hasher.update(secrets_digest.as_bytes());
    hasher.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect()
}
