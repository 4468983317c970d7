//! The ConfigMap with the chat-server configuration file every role mounts.

use k8s_openapi::api::core::v1::ConfigMap;
use parley_contract::config::{AuthMode, ChatServerConfig, LogFormat};
use sha2::{Digest, Sha256};

use super::{metadata, Inputs};
use crate::{
    names::{Component, CONFIG_FILE},
    reconcile::validate::ValidatedChat,
};

/// The chat-server's configuration; secrets stay out of it and arrive as environment variables.
pub fn config_file(chat: &ValidatedChat) -> ChatServerConfig {
    ChatServerConfig {
        topology_prefix: Some(chat.topology.prefix().to_owned()),
        source_language: Some(chat.source_language.clone()),
        languages: Some(chat.language_codes().join(",")),
        translator: Some(chat.provider),
        translator_url: Some(chat.provider_url.clone()),
        history_retention: chat.history.as_ref().and_then(|h| h.retention.clone()),
        otlp_endpoint: chat.monitoring.otlp_endpoint.as_ref().map(|e| e.trim().to_owned()),
        trace_sample_ratio: chat.monitoring.trace_sample_ratio,
        // A gateway starts only with sign-in configured; a ChatDeployment has no spec.auth yet, so
        // its gateway runs open, as before.
        auth: Some(AuthMode::None),
        log_format: Some(LogFormat::Json),
        ..Default::default()
    }
}

pub fn config_map(chat: &ValidatedChat, inputs: &Inputs) -> ConfigMap {
    ConfigMap {
        metadata: metadata(&chat.names, chat.names.config_map(), Component::Config, None, inputs),
        data: Some([(CONFIG_FILE.to_owned(), config_file(chat).to_toml())].into()),
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
