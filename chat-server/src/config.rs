//! Configuration: flags, each with a `PARLEY_*` environment variable, over an optional TOML file, over defaults.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Parser, Subcommand};
pub use parley_contract::config::{AuthMode, ChatServerConfig, LogFormat};
use parley_contract::{provider::Provider, topology};

#[derive(Debug, Parser)]
#[command(name = "chat-server", version, about = "Parley chat server: GraphQL gateway, translators and fanout")]
pub struct Cli {
    /// TOML file with any of the settings (kebab-case keys); flags and environment win over it.
    #[arg(long, env = "PARLEY_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub options: ChatServerConfig,
    #[command(subcommand)]
    pub role: Role,
}

#[derive(Debug, Clone, Subcommand)]
pub enum Role {
    /// Serve GraphQL over HTTP and WebSocket and deliver messages to subscribers.
    Gateway,
    /// Translate the messages of one language's queue.
    Translator {
        /// ISO 639-1 code of the target language.
        #[arg(long, env = "PARLEY_LANGUAGE")]
        language: String,
    },
    /// Sequence, de-duplicate and route originals and translations to the gateways.
    Fanout,
    /// Every role in one process, on RabbitMQ when --amqp-url is given, else on an in-process bus.
    Standalone,
}

/// Errors in the configuration, reported before anything starts.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("failed to read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("invalid config file {path}: {source}")]
    Parse { path: PathBuf, source: parley_contract::config::FileError },
    #[error("invalid {setting}: {reason}")]
    Invalid { setting: &'static str, reason: String },
}

/// Resolved settings with defaults applied.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    pub amqp_url: Option<String>,
    pub topology_prefix: String,
    pub source_language: String,
    pub languages: Vec<String>,
    pub translator: Option<Provider>,
    pub translator_url: Option<String>,
    pub translator_api_key: Option<String>,
    pub translator_timeout: Duration,
    pub translate_concurrency: usize,
    pub translation_cache_entries: usize,
    pub max_text_bytes: usize,
    pub max_query_depth: usize,
    pub max_query_complexity: usize,
    pub max_subscriptions_per_connection: usize,
    pub connection_init_timeout: Duration,
    pub subscriber_buffer: usize,
    /// Where the history is kept; `None` means the role's default (memory for standalone and the fanout).
    pub history_url: Option<String>,
    /// How long deliveries stay in the history; `None` keeps them.
    pub history_retention: Option<Duration>,
    /// How long a role may make no progress while it has work before `/healthz` fails.
    pub stall_timeout: Duration,
    /// How long a SIGTERM waits for the work in hand before the process exits anyway.
    pub shutdown_timeout: Duration,
    /// Where spans are exported over OTLP/HTTP, if anywhere.
    pub otlp_endpoint: Option<String>,
    /// Fraction of the traces started here whose spans are exported.
    pub trace_sample_ratio: f64,
    pub auth: AuthSettings,
    pub limits: crate::auth::limits::LimitSettings,
    /// Certificate authorities (PEM) an amqps:// broker is checked against, instead of the system's.
    pub amqp_ca_file: Option<PathBuf>,
    pub log_format: LogFormat,
}

/// How the gateway signs clients in, resolved.
#[derive(Clone)]
pub struct AuthSettings {
    /// `None` when not configured: the gateway refuses to start, standalone runs without sign-in.
    pub mode: Option<AuthMode>,
    pub jwt_secret: Option<String>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    /// The chat page's public OAuth client, for `oidc`.
    pub client_id: Option<String>,
    pub clock_skew: Duration,
    pub policy: crate::auth::Policy,
}

impl std::fmt::Debug for AuthSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthSettings")
            .field("mode", &self.mode)
            .field("jwt_secret", &self.jwt_secret.as_ref().map(|_| "<redacted>"))
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("client_id", &self.client_id)
            .field("clock_skew", &self.clock_skew)
            .field("policy", &self.policy)
            .finish()
    }
}

/// Shortest HS256 secret accepted (RFC 7518 §3.2: at least the hash's size).
const MIN_JWT_SECRET_BYTES: usize = 32;

fn groups(list: Option<String>) -> Vec<String> {
    list.iter().flat_map(|l| l.split(',')).map(str::trim).filter(|g| !g.is_empty()).map(str::to_owned).collect()
}

impl AuthSettings {
    fn resolve(o: &mut ChatServerConfig) -> Result<Self, ConfigError> {
        let mode = o.auth;
        let jwt_secret = o.jwt_secret.take().filter(|s| !s.is_empty());
        let issuer = o.auth_issuer.take().filter(|s| !s.is_empty());
        let audience = o.auth_audience.take().filter(|s| !s.is_empty());
        match mode {
            Some(AuthMode::Jwt) => match &jwt_secret {
                None => return Err(invalid("jwt-secret", "--auth jwt needs --jwt-secret (PARLEY_JWT_SECRET)")),
                Some(secret) if secret.len() < MIN_JWT_SECRET_BYTES => {
                    return Err(invalid("jwt-secret", format!("must be at least {MIN_JWT_SECRET_BYTES} bytes")))
                }
                Some(_) => {}
            },
            Some(AuthMode::Oidc) => {
                match &issuer {
                    None => return Err(invalid("auth-issuer", "--auth oidc needs --auth-issuer (PARLEY_AUTH_ISSUER)")),
                    Some(url) => {
                        if let Some(reason) = parley_contract::config::untrusted_issuer(url) {
                            return Err(invalid("auth-issuer", reason));
                        }
                    }
                }
                if audience.is_none() {
                    return Err(invalid("auth-audience", "--auth oidc needs --auth-audience (PARLEY_AUTH_AUDIENCE)"));
                }
            }
            Some(AuthMode::None) | None => {}
        }
        let claim = |value: Option<String>, default: &str| value.filter(|c| !c.is_empty()).unwrap_or(default.into());
        Ok(Self {
            mode,
            jwt_secret,
            issuer,
            audience,
            client_id: o.oidc_client_id.take().filter(|c| !c.is_empty()),
            clock_skew: Duration::from_secs(o.auth_clock_skew_secs.unwrap_or(30)),
            policy: crate::auth::Policy {
                groups_claim: claim(o.groups_claim.take(), "groups"),
                name_claim: claim(o.name_claim.take(), "name"),
                read_groups: groups(o.read_groups.take()),
                send_groups: groups(o.send_groups.take()),
            },
        })
    }

    /// The gateway's sign-in; `default` applies when no mode was configured (standalone's none), and
    /// without one a gateway does not start: an open gateway must be asked for.
    pub fn build(&self, default: Option<AuthMode>) -> anyhow::Result<crate::auth::Auth> {
        use crate::auth::{Auth, Verifier};
        let mode = self.mode.or(default).ok_or_else(|| {
            anyhow::anyhow!(
                "the gateway needs --auth (PARLEY_AUTH): oidc or jwt to sign clients in, or none to let anyone \
                 read and post under any name"
            )
        })?;
        Ok(match mode {
            AuthMode::None => Auth::off(),
            AuthMode::Jwt => Auth::new(
                Verifier::hs256(
                    self.jwt_secret.as_deref().unwrap_or_default().as_bytes(),
                    self.issuer.as_deref(),
                    self.audience.as_deref(),
                    self.clock_skew,
                ),
                self.policy.clone(),
            ),
            AuthMode::Oidc => Auth::new(
                Verifier::issuer(
                    self.issuer.as_deref().unwrap_or_default(),
                    self.audience.as_deref().unwrap_or_default(),
                    self.clock_skew,
                )?,
                self.policy.clone(),
            ),
        })
    }
}

/// The settings in `options` over those of the config file `path` names, if any.
fn with_file(options: ChatServerConfig, path: Option<&PathBuf>) -> Result<ChatServerConfig, ConfigError> {
    let Some(path) = path else {
        return Ok(options);
    };
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.clone(), source })?;
    let file =
        ChatServerConfig::from_toml(&text).map_err(|source| ConfigError::Parse { path: path.clone(), source })?;
    if file.jwt_secret.is_some() {
        return Err(invalid(
            "jwt-secret",
            format!("is a secret: pass it in PARLEY_JWT_SECRET, not in {}", path.display()),
        ));
    }
    Ok(options.over(file))
}

fn invalid(setting: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { setting, reason: reason.into() }
}

/// The OTLP/HTTP traces URL for `endpoint`: a collector's base URL gets the signal's path,
/// `/v1/traces`; a URL with a path of its own is used as it is.
fn otlp_traces_url(endpoint: String) -> Result<String, ConfigError> {
    let url = reqwest::Url::parse(&endpoint).map_err(|e| invalid("otlp-endpoint", format!("{endpoint:?}: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid("otlp-endpoint", format!("{endpoint:?}: OTLP/HTTP needs an http or https URL")));
    }
    Ok(if url.path() == "/" { url.join("v1/traces").expect("a relative path joins").to_string() } else { endpoint })
}

/// Parses "es, ca" into validated codes; "" is no languages.
pub fn parse_languages(list: &str) -> Result<Vec<String>, ConfigError> {
    let mut languages: Vec<String> = Vec::new();
    for code in list.split(',').map(str::trim).filter(|c| !c.is_empty()) {
        topology::validate_language(code).map_err(|e| invalid("languages", e.to_string()))?;
        if !languages.iter().any(|l| l == code) {
            languages.push(code.to_owned());
        }
    }
    Ok(languages)
}

impl Settings {
    /// Resolves `options` over the file `config` names (if any) over the defaults.
    pub fn resolve(options: ChatServerConfig, config: Option<&PathBuf>) -> Result<Self, ConfigError> {
        let mut o = with_file(options, config)?;
        let auth = AuthSettings::resolve(&mut o)?;
        let rate = |setting, value: Option<u32>, default: u32| {
            std::num::NonZeroU32::new(value.unwrap_or(default)).ok_or_else(|| invalid(setting, "must be at least 1"))
        };
        let limits = crate::auth::limits::LimitSettings {
            send_rate: rate("send-rate", o.send_rate, 5)?,
            send_burst: rate("send-burst", o.send_burst, 20)?,
            subscribe_rate: rate("subscribe-rate", o.subscribe_rate, 10)?,
            max_connections_per_ip: o.max_connections_per_ip.unwrap_or(0),
        };
        let source_language = o.source_language.unwrap_or_else(|| "en".into());
        if source_language != "auto" {
            topology::validate_language(&source_language).map_err(|e| invalid("source-language", e.to_string()))?;
        }
        let topology_prefix = o.topology_prefix.unwrap_or_else(|| topology::STANDALONE_PREFIX.into());
        topology::Topology::new(topology_prefix.as_str()).map_err(|e| invalid("topology-prefix", e.to_string()))?;
        let seconds = |setting, value: Option<u64>, default| match value.unwrap_or(default) {
            0 => Err(invalid(setting, "must be at least 1")),
            n => Ok(n),
        };
        let positive = |setting, value: Option<usize>, default| match value.unwrap_or(default) {
            0 => Err(invalid(setting, "must be at least 1")),
            n => Ok(n),
        };
        Ok(Self {
            listen: o.listen.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 8080))),
            amqp_url: o.amqp_url.filter(|u| !u.is_empty()),
            topology_prefix,
            source_language,
            languages: parse_languages(o.languages.as_deref().unwrap_or(""))?,
            translator: o.translator,
            translator_url: o.translator_url.filter(|u| !u.is_empty()),
            translator_api_key: o.translator_api_key.filter(|k| !k.is_empty()),
            translator_timeout: Duration::from_secs(o.translator_timeout_secs.unwrap_or(30)),
            translate_concurrency: positive("translate-concurrency", o.translate_concurrency, 16)?,
            translation_cache_entries: o.translation_cache_entries.unwrap_or(10_000),
            max_text_bytes: positive("max-text-bytes", o.max_text_bytes, 4096)?,
            max_query_depth: positive("max-query-depth", o.max_query_depth, 10)?,
            max_query_complexity: positive("max-query-complexity", o.max_query_complexity, 200)?,
            max_subscriptions_per_connection: positive(
                "max-subscriptions-per-connection",
                o.max_subscriptions_per_connection,
                100,
            )?,
            connection_init_timeout: Duration::from_secs(o.connection_init_timeout_secs.unwrap_or(10)),
            subscriber_buffer: positive("subscriber-buffer", o.subscriber_buffer, 1024)?,
            history_url: o.history_url.filter(|u| !u.is_empty()),
            history_retention: match o.history_retention.filter(|r| !r.is_empty()) {
                None => None,
                Some(text) => {
                    Some(humantime::parse_duration(&text).map_err(|e| {
                        invalid("history-retention", format!("{text:?} is not a duration like 30d: {e}"))
                    })?)
                }
            },
            stall_timeout: Duration::from_secs(seconds("stall-timeout-secs", o.stall_timeout_secs, 60)?),
            shutdown_timeout: Duration::from_secs(seconds("shutdown-timeout-secs", o.shutdown_timeout_secs, 25)?),
            otlp_endpoint: o.otlp_endpoint.map(otlp_traces_url).transpose()?,
            trace_sample_ratio: match o.trace_sample_ratio.unwrap_or(1.0) {
                ratio if (0.0..=1.0).contains(&ratio) => ratio,
                ratio => return Err(invalid("trace-sample-ratio", format!("{ratio} is not between 0 and 1"))),
            },
            auth,
            limits,
            amqp_ca_file: o.amqp_ca_file.filter(|f| !f.is_empty()).map(PathBuf::from),
            log_format: o.log_format.unwrap_or(LogFormat::Text),
        })
    }

    /// The provider settings, or the error a translator must fail with when there are none.
    pub fn provider(&self) -> Result<(Provider, &str), ConfigError> {
        let kind = self.translator.ok_or_else(|| {
            invalid(
                "translator",
                "translating needs a provider: pass --translator apertium|libretranslate (PARLEY_TRANSLATOR)",
            )
        })?;
        let url = self.translator_url.as_deref().ok_or_else(|| {
            invalid(
                "translator-url",
                "translating needs the provider's URL: pass --translator-url (PARLEY_TRANSLATOR_URL)",
            )
        })?;
        Ok((kind, url))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn languages_are_trimmed_deduplicated_and_validated() {
        assert_eq!(parse_languages(" es, ca,es ,").unwrap(), vec!["es", "ca"]);
        assert!(parse_languages("").unwrap().is_empty());
        assert!(parse_languages("es,Spanish").is_err());
    }

    #[test]
    fn flags_win_over_the_file_which_wins_over_defaults() {
        let dir = std::env::temp_dir().join(format!("parley-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("chat.toml");
        std::fs::write(&path, "languages = \"de,fr\"\nmax-text-bytes = 100\ntranslator = \"apertium\"\n").unwrap();
        let options = ChatServerConfig { max_text_bytes: Some(200), ..Default::default() };
        let settings = Settings::resolve(options, Some(&path)).unwrap();
        assert_eq!(settings.languages, vec!["de", "fr"]);
        assert_eq!(settings.max_text_bytes, 200);
        assert_eq!(settings.translator, Some(Provider::Apertium));
        assert_eq!(settings.source_language, "en");
    }

    #[test]
    fn unknown_keys_in_the_file_are_an_error() {
        let dir = std::env::temp_dir().join(format!("parley-config-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("chat.toml");
        std::fs::write(&path, "langauges = \"de\"\n").unwrap();
        let err = Settings::resolve(ChatServerConfig::default(), Some(&path)).unwrap_err();
        assert!(err.to_string().contains("langauges"), "{err}");
    }

    #[test]
    fn sign_in_settings_are_checked_and_the_jwt_secret_never_comes_from_the_file() {
        let dir = std::env::temp_dir().join(format!("parley-config-jwt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("chat.toml");
        std::fs::write(&path, "jwt-secret = \"0123456789abcdef0123456789abcdef\"\n").unwrap();
        let err = Settings::resolve(ChatServerConfig::default(), Some(&path)).unwrap_err().to_string();
        assert!(err.contains("PARLEY_JWT_SECRET"), "{err}");
        let oidc = |issuer: &str| ChatServerConfig {
            auth: Some(AuthMode::Oidc),
            auth_issuer: Some(issuer.into()),
            auth_audience: Some("parley".into()),
            ..Default::default()
        };
        assert!(Settings::resolve(oidc("https://idp.example/realms/e"), None).is_ok());
        let err = Settings::resolve(oidc("http://idp.example/realms/e"), None).unwrap_err().to_string();
        assert!(err.contains("auth-issuer") && err.contains("https"), "{err}");
        let short =
            ChatServerConfig { auth: Some(AuthMode::Jwt), jwt_secret: Some("short".into()), ..Default::default() };
        assert!(Settings::resolve(short, None).unwrap_err().to_string().contains("32 bytes"));
    }

    #[test]
    fn a_translator_without_a_provider_says_so() {
        let settings = Settings::resolve(ChatServerConfig::default(), None).unwrap();
        let err = settings.provider().unwrap_err().to_string();
        assert!(err.contains("--translator"), "{err}");
    }

    #[test]
    fn an_otlp_collector_url_gets_the_traces_path_unless_it_has_one() {
        let resolve = |url: &str| {
            let options = ChatServerConfig { otlp_endpoint: Some(url.into()), ..Default::default() };
            Settings::resolve(options, None).map(|s| s.otlp_endpoint.unwrap())
        };
        assert_eq!(resolve("http://collector:4318").unwrap(), "http://collector:4318/v1/traces");
        assert_eq!(resolve("https://otel.example/custom/traces").unwrap(), "https://otel.example/custom/traces");
        assert!(resolve("collector:4318").unwrap_err().to_string().contains("otlp-endpoint"));
        assert!(resolve("grpc://collector:4317").is_err());
    }

    #[test]
    fn the_trace_sample_ratio_is_a_fraction() {
        let ratio =
            |r: f64| Settings::resolve(ChatServerConfig { trace_sample_ratio: Some(r), ..Default::default() }, None);
        assert_eq!(ratio(0.25).unwrap().trace_sample_ratio, 0.25);
        assert_eq!(Settings::resolve(ChatServerConfig::default(), None).unwrap().trace_sample_ratio, 1.0);
        assert!(ratio(1.5).unwrap_err().to_string().contains("trace-sample-ratio"));
    }
}
