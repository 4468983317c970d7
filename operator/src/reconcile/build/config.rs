//! The ConfigMap with the chat-server configuration files the roles mount: one for the fanout and
//! translators, and the gateway's, which adds sign-in and the per-client limits.

use k8s_openapi::api::core::v1::ConfigMap;
use parley_contract::config::{AuthMode, ChatServerConfig, LogFormat};
use sha2::{Digest, Sha256};

use super::{metadata, Inputs};
use crate::{
    crd,
    names::{Component, BROKER_CA_DIR, BROKER_CA_FILE, CONFIG_FILE, GATEWAY_CONFIG_FILE},
    reconcile::validate::ValidatedChat,
};

/// The configuration every role shares; secrets stay out of it and arrive as environment variables
/// (the broker's CA bundle, no secret, as a mounted file).
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
        amqp_ca_file: chat.broker_ca.as_ref().map(|_| format!("{BROKER_CA_DIR}/{BROKER_CA_FILE}")),
        log_format: Some(LogFormat::Json),
        ..Default::default()
    }
}

/// The gateway's configuration: the shared one, sign-in and the per-client limits. `auth` is always
/// set (a gateway starts only with sign-in configured, `none` included); the JWT secret never is.
pub fn gateway_config_file(chat: &ValidatedChat) -> ChatServerConfig {
    let auth = &chat.auth;
    let groups = |list: &[String]| (!list.is_empty()).then(|| list.join(","));
    ChatServerConfig {
        auth: Some(match auth.mode {
            crd::AuthMode::None => AuthMode::None,
            crd::AuthMode::Jwt => AuthMode::Jwt,
            crd::AuthMode::Oidc => AuthMode::Oidc,
        }),
        auth_issuer: auth.issuer.clone(),
        auth_audience: auth.audience.clone(),
        oidc_client_id: auth.client_id.clone(),
        auth_clock_skew_secs: auth.clock_skew_seconds,
        groups_claim: auth.groups_claim.clone(),
        name_claim: auth.name_claim.clone(),
        read_groups: groups(&auth.read_groups),
        send_groups: groups(&auth.send_groups),
        send_rate: auth.limits.send_rate,
        send_burst: auth.limits.send_burst,
        subscribe_rate: auth.limits.subscribe_rate,
        max_connections_per_ip: auth.limits.max_connections_per_ip.map(|n| n as usize),
        ..config_file(chat)
    }
}

pub fn config_map(chat: &ValidatedChat, inputs: &Inputs) -> ConfigMap {
    ConfigMap {
        metadata: metadata(&chat.names, chat.names.config_map(), Component::Config, None, inputs),
        data: Some(
            [
                (CONFIG_FILE.to_owned(), config_file(chat).to_toml()),
                (GATEWAY_CONFIG_FILE.to_owned(), gateway_config_file(chat).to_toml()),
            ]
            .into(),
        ),
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
