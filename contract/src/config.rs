//! The chat server's configuration: one set of settings that is at once its flags, its `PARLEY_*`
//! environment variables (with the `cli` feature) and the keys of its TOML file, which the operator
//! renders into every ChatDeployment's ConfigMap.
//!
//! Every setting is optional here so the three sources can be layered; the chat server resolves
//! defaults. Secrets (the broker URL, API keys) never go into the file: the operator passes them as
//! environment variables from Secrets.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::provider::Provider;

/// The name of the configuration file in the operator's ConfigMap.
pub const FILE_NAME: &str = "chat-server.toml";

/// How the chat server writes its logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// How the gateway signs clients in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// Anyone who reaches the gateway may read and post, under any `sender` name.
    None,
    /// Bearer JWTs signed with a shared HS256 secret (`--jwt-secret`).
    Jwt,
    /// Bearer JWTs from an OpenID Connect issuer, verified with the keys its discovery document names.
    Oidc,
}

/// Every setting of the chat server. Field names are the file's kebab-case keys and, upper-cased
/// with `PARLEY_`, the environment variables.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ChatServerConfig {
    /// Address to serve GraphQL (gateway) or health endpoints (other roles) on. [default: 0.0.0.0:8080]
    #[cfg_attr(feature = "cli", arg(long, env = "PARLEY_LISTEN", global = true))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// RabbitMQ URL, e.g. amqp://guest:guest@127.0.0.1:5672/%2f. Required except in standalone mode.
    #[cfg_attr(feature = "cli", arg(long, env = "PARLEY_AMQP_URL", global = true, hide_env_values = true))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amqp_url: Option<String>,
    /// Prefix of every exchange and queue. [default: parley.local]
    #[cfg_attr(feature = "cli", arg(long, env = "PARLEY_TOPOLOGY_PREFIX", global = true))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology_prefix: Option<String>,
    /// Language of messages sent without one (ISO 639-1), or "auto". [default: en]
    #[cfg_attr(feature = "cli", arg(long, env = "PARLEY_SOURCE_LANGUAGE", global = true))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_language: Option<String>,
    /// Comma-separated target languages, e.g. "es,ca"; "" for none.
    #[cfg_attr(feature = "cli", arg(long, env = "PARLEY_LANGUAGES", global = true))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub languages: Option<String>,
    /// Translation provider.
    #[cfg_attr(feature = "cli", arg(long, env = "PARLEY_TRANSLATOR", global = true))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub translator: Option<Provider>,
    /// Base URL of the translation provider, e.g. http://127.0.0.1:2737.
    #[cfg_attr(feature = "cli", arg(long, env = "PARLEY_TRANSLATOR_URL", global = true))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub translator_url: Option<String>,
    /// API key of the translation provider, if it needs one.
    #[cfg_attr(feature = "cli", arg(long, env = "PARLEY_TRANSLATOR_API_KEY", global = true, hide_env_values = true))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub translator_api_key: Option<String>,
    /// Seconds one provider call may take. [default: 30]
    #[cfg_attr(feature = "cli", arg(long, env = "PARLEY_TRANSLATOR_TIMEOUT_SECS", global = true))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub translator_timeout_secs: Option<u64>,
    /// Provider calls a translator keeps in flight at once. [default: 16]
    #[cfg_attr(feature = "cli", arg(long, env = "PARLEY_TRANSLATE_CONCURRENCY", global = true))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub translate_concurrency: Option<usize>,
    /// Recent translations a translator remembers (0 for none). [default: 10000]
    #[cfg_attr(feature = "cli", arg(long, env = "PARLEY_TRANSLATION_CACHE_ENTRIES", global = true))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub translation_cache_entries: Option<usize>,
    /// Longest message text accepted, in bytes. [default: 4096]
    #[cfg_attr(feature = "cli", arg(long, env = "PARLEY_MAX_TEXT_BYTES", global = true))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_text_bytes: Option<usize>,
    /// Deepest GraphQL selection accepted. [default: 10]
    #[cfg_attr(feature = "cli", arg(long, env = "PARLEY_MAX_QUERY_DEPTH", global = true))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_query_depth: Option<usize>,
    /// Highest GraphQL complexity accepted. [default: 200]
    #[cfg_attr(feature = "cli", arg(long, env = "PARLEY_MAX_QUERY_COMPLEXITY", global = true))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_query_complexity: Option<usize>,
    /// Subscriptions one WebSocket connection may hold at once. [default: 100]
    #[cfg_attr(feature = "cli", arg(long, env = "PARLEY_MAX_SUBSCRIPTIONS_PER_CONNECTION", global = true))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_subscriptions_per_connection: Option<usize>,
    /// Seconds a WebSocket client has to send connection_init. [default: 10]
    #[cfg_attr(feature = "cli", arg(long, env = "PARLEY_CONNECTION_INIT_TIMEOUT_SECS", global = true))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_init_timeout_secs: Option<u64>,
    /// Frames that may wait for one WebSocket connection before it is closed as a slow consumer (1008). [default: 1024]
    #[cfg_attr(feature = "cli", arg(long, env = "PARLEY_SUBSCRIBER_BUFFER", global = true))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subscriber_buffer: Option<usize>,
    /// Chat history store: postgres://user:pass@host/db, or memory: (in this process, bounded, lost on
    /// exit). The fanout writes it; gateways read it. [default: memory: for standalone and the fanout, none for gateways]
    #[cfg_attr(feature = "cli", arg(long, env = "PARLEY_HISTORY_URL", global = true, hide_env_values = true))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history_url: Option<String>,
    /// How long deliveries stay in the history, e.g. 30d or 12h; kept forever when unset.
    #[cfg_attr(feature = "cli", arg(long, env = "PARLEY_HISTORY_RETENTION", global = true))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history_retention: Option<String>,
    /// Seconds a role may make no progress while it has work (messages waiting in its queue, or a
    /// publish, ack or connection in progress) before `/healthz` fails and Kubernetes restarts it. [default: 60]
    #[cfg_attr(feature = "cli", arg(long, env = "PARLEY_STALL_TIMEOUT_SECS", global = true))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stall_timeout_secs: Option<u64>,
    /// Seconds a SIGTERM gets to finish the work in hand before the process exits anyway (what it
    /// abandons is delivered again). Keep it under the pod's termination grace period. [default: 25]
    #[cfg_attr(feature = "cli", arg(long, env = "PARLEY_SHUTDOWN_TIMEOUT_SECS", global = true))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shutdown_timeout_secs: Option<u64>,
    /// OpenTelemetry collector to export spans to over OTLP/HTTP (protobuf), e.g.
    /// http://otel-collector:4318; `/v1/traces` is added when the URL has no path. Spans are kept
    /// in-process only when unset; the W3C trace context still travels with every message.
    #[cfg_attr(feature = "cli", arg(long, env = "PARLEY_OTLP_ENDPOINT", global = true))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub otlp_endpoint: Option<String>,
    /// Fraction (0 to 1) of the traces started here whose spans are exported; a message sent inside a
    /// caller's trace follows the caller's decision. Unsampled messages still carry trace ids in the
    /// logs. [default: 1]
    #[cfg_attr(feature = "cli", arg(long, env = "PARLEY_TRACE_SAMPLE_RATIO", global = true))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_sample_ratio: Option<f64>,
    /// How clients sign in: none, jwt (HS256 with --jwt-secret) or oidc (--auth-issuer). Required for
    /// the gateway; standalone defaults to none.
    #[cfg_attr(feature = "cli", arg(long, env = "PARLEY_AUTH", global = true))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<AuthMode>,
    /// The HS256 secret of `--auth jwt` (at least 32 bytes). Pass it from a Secret, never in the file.
    #[cfg_attr(feature = "cli", arg(long, env = "PARLEY_JWT_SECRET", global = true, hide_env_values = true))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt_secret: Option<String>,
    /// The token issuer (`iss`): with oidc, the URL whose /.well-known/openid-configuration names the
    /// keys; with jwt, checked when set.
    #[cfg_attr(feature = "cli", arg(long, env = "PARLEY_AUTH_ISSUER", global = true))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_issuer: Option<String>,
    /// The audience (`aud`) a token must name. Required with oidc; checked with jwt when set.
    #[cfg_attr(feature = "cli", arg(long, env = "PARLEY_AUTH_AUDIENCE", global = true))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_audience: Option<String>,
    /// The public OAuth client the chat page signs participants in with (authorization code with
    /// PKCE, `--auth oidc`); without it the page asks for a token instead.
    #[cfg_attr(feature = "cli", arg(long, env = "PARLEY_OIDC_CLIENT_ID", global = true))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oidc_client_id: Option<String>,
    /// Seconds of clock skew allowed on `exp` and `nbf`. [default: 30]
    #[cfg_attr(feature = "cli", arg(long, env = "PARLEY_AUTH_CLOCK_SKEW_SECS", global = true))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_clock_skew_secs: Option<u64>,
    /// The claim holding the user's groups, e.g. cognito:groups; a dotted path reaches into objects
    /// (realm_access.roles). [default: groups]
    #[cfg_attr(feature = "cli", arg(long, env = "PARLEY_GROUPS_CLAIM", global = true))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub groups_claim: Option<String>,
    /// The claim holding the display name messages are sent under (falling back to
    /// preferred_username, then sub). [default: name]
    #[cfg_attr(feature = "cli", arg(long, env = "PARLEY_NAME_CLAIM", global = true))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name_claim: Option<String>,
    /// Comma-separated groups whose members may read (subscribe, query); empty lets any signed-in user.
    #[cfg_attr(feature = "cli", arg(long, env = "PARLEY_READ_GROUPS", global = true))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_groups: Option<String>,
    /// Comma-separated groups whose members may send; empty lets any user who may read.
    #[cfg_attr(feature = "cli", arg(long, env = "PARLEY_SEND_GROUPS", global = true))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub send_groups: Option<String>,
    /// Messages one signed-in user may send per second, sustained (without sign-in there is no one to
    /// limit). [default: 5]
    #[cfg_attr(feature = "cli", arg(long, env = "PARLEY_SEND_RATE", global = true))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub send_rate: Option<u32>,
    /// Messages one user may send in a burst above the sustained rate. [default: 20]
    #[cfg_attr(feature = "cli", arg(long, env = "PARLEY_SEND_BURST", global = true))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub send_burst: Option<u32>,
    /// Subscriptions one WebSocket connection may start per second (bursts of 5× pass). [default: 10]
    #[cfg_attr(feature = "cli", arg(long, env = "PARLEY_SUBSCRIBE_RATE", global = true))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subscribe_rate: Option<u32>,
    /// WebSocket connections one client address may hold at once; 0 for no limit. Behind a proxy
    /// every client shares the proxy's address. [default: 0]
    #[cfg_attr(feature = "cli", arg(long, env = "PARLEY_MAX_CONNECTIONS_PER_IP", global = true))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections_per_ip: Option<usize>,
    /// PEM file of certificate authorities an amqps:// broker's certificate may chain to, besides the
    /// system's roots (a private CA).
    #[cfg_attr(feature = "cli", arg(long, env = "PARLEY_AMQP_CA_FILE", global = true))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amqp_ca_file: Option<String>,
    /// Log format. [default: text]
    #[cfg_attr(feature = "cli", arg(long, env = "PARLEY_LOG_FORMAT", global = true))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_format: Option<LogFormat>,
}

/// Why an OpenID issuer URL cannot be trusted, if it cannot: its keys decide who anyone is, so they
/// must come over https. Plain http is accepted only to a host no one else can be on the path to:
/// loopback, or a Kubernetes Service name (`keycloak`, `dex.auth.svc`, `…svc.cluster.local`).
pub fn untrusted_issuer(issuer: &str) -> Option<String> {
    if let Some(rest) = issuer.strip_prefix("https://") {
        return (rest.is_empty()).then(|| format!("{issuer:?} names no host"));
    }
    let Some(rest) = issuer.strip_prefix("http://") else {
        return Some(format!("{issuer:?} is not an https URL"));
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => authority.rsplit_once(':').map_or(authority, |(host, _)| host),
    }
    .trim_end_matches('.')
    .to_ascii_lowercase();
    let loopback = host == "localhost" || host == "::1" || host.starts_with("127.");
    let in_cluster =
        !host.is_empty() && (!host.contains('.') || host.ends_with(".svc") || host.ends_with(".svc.cluster.local"));
    (!loopback && !in_cluster).then(|| {
        format!("{issuer:?} is plain http to a host outside the cluster: use https, or the issuer's in-cluster Service name")
    })
}

/// A configuration file that could not be read.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct FileError(#[from] toml::de::Error);

impl ChatServerConfig {
    /// These settings over `lower`: each setting this one leaves unset comes from `lower`.
    pub fn over(self, lower: Self) -> Self {
        macro_rules! layered {
            ($($field:ident),+ $(,)?) => { Self { $($field: self.$field.or(lower.$field)),+ } };
        }
        layered!(
            listen,
            amqp_url,
            topology_prefix,
            source_language,
            languages,
            translator,
            translator_url,
            translator_api_key,
            translator_timeout_secs,
            translate_concurrency,
            translation_cache_entries,
            max_text_bytes,
            max_query_depth,
            max_query_complexity,
            max_subscriptions_per_connection,
            connection_init_timeout_secs,
            subscriber_buffer,
            history_url,
            history_retention,
            stall_timeout_secs,
            shutdown_timeout_secs,
            otlp_endpoint,
            trace_sample_ratio,
            auth,
            jwt_secret,
            auth_issuer,
            auth_audience,
            oidc_client_id,
            auth_clock_skew_secs,
            groups_claim,
            name_claim,
            read_groups,
            send_groups,
            send_rate,
            send_burst,
            subscribe_rate,
            max_connections_per_ip,
            amqp_ca_file,
            log_format,
        )
    }

    /// Parses a configuration file; unknown keys are an error.
    pub fn from_toml(text: &str) -> Result<Self, FileError> {
        Ok(toml::from_str(text)?)
    }

    /// Renders the settings that are set as a configuration file.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("the configuration always renders as TOML")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rendered_by_the_operator() -> ChatServerConfig {
        ChatServerConfig {
            topology_prefix: Some("parley.events.town-hall".into()),
            source_language: Some("en".into()),
            languages: Some("de,fr".into()),
            translator: Some(Provider::Libretranslate),
            translator_url: Some("http://libretranslate.translation:5000".into()),
            log_format: Some(LogFormat::Json),
            ..Default::default()
        }
    }

    #[test]
    fn a_rendered_file_reads_back_as_the_same_settings() {
        let config = ChatServerConfig { listen: Some("0.0.0.0:8080".parse().unwrap()), ..rendered_by_the_operator() };
        assert_eq!(ChatServerConfig::from_toml(&config.to_toml()).unwrap(), config);
    }

    #[test]
    fn the_file_uses_kebab_case_keys_and_leaves_unset_settings_out() {
        assert_eq!(
            rendered_by_the_operator().to_toml(),
            "topology-prefix = \"parley.events.town-hall\"\nsource-language = \"en\"\nlanguages = \"de,fr\"\n\
             translator = \"libretranslate\"\ntranslator-url = \"http://libretranslate.translation:5000\"\n\
             log-format = \"json\"\n"
        );
    }

    #[test]
    fn issuers_need_https_except_on_loopback_and_in_cluster_services() {
        for trusted in [
            "https://idp.example.com/realms/e",
            "http://127.0.0.1:8080",
            "http://localhost",
            "http://[::1]:80",
            "http://keycloak:8080/realms/e",
            "http://dex.auth.svc:5556/dex",
            "http://kc.auth.svc.cluster.local/realms/e",
        ] {
            assert_eq!(untrusted_issuer(trusted), None, "{trusted}");
        }
        for untrusted in
            ["http://idp.example.com/realms/e", "http://10.0.0.5", "idp.example.com", "ftp://idp", "https://"]
        {
            assert!(untrusted_issuer(untrusted).is_some(), "{untrusted}");
        }
    }

    #[test]
    fn unknown_keys_are_an_error() {
        let err = ChatServerConfig::from_toml("langauges = \"de\"\n").unwrap_err();
        assert!(err.to_string().contains("langauges"), "{err}");
    }

    #[test]
    fn the_upper_layer_wins_and_the_lower_fills_the_gaps() {
        let upper = ChatServerConfig { max_text_bytes: Some(200), ..Default::default() };
        let lower = ChatServerConfig { max_text_bytes: Some(100), languages: Some("de".into()), ..Default::default() };
        let merged = upper.over(lower);
        assert_eq!((merged.max_text_bytes, merged.languages.as_deref()), (Some(200), Some("de")));
    }
}
