//! Configuration: flags, each with a `PARLEY_*` environment variable, over an optional TOML file, over defaults.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Deserialize;

use crate::translator::provider::ProviderKind;

#[derive(Debug, Parser)]
#[command(name = "chat-server", version, about = "Parley chat server: GraphQL gateway, translators and fanout")]
pub struct Cli {
    #[command(flatten)]
    pub options: Options,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// Every setting, optional so flags, environment and file can be layered; see [`Settings`] for defaults.
#[derive(Debug, Default, Clone, Args, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Options {
    /// TOML file with any of these settings (kebab-case keys); flags and environment win over it.
    #[arg(long, env = "PARLEY_CONFIG", global = true)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Address to serve GraphQL (gateway) or health endpoints (other roles) on. [default: 0.0.0.0:8080]
    #[arg(long, env = "PARLEY_LISTEN", global = true)]
    pub listen: Option<SocketAddr>,
    /// RabbitMQ URL, e.g. amqp://guest:guest@127.0.0.1:5672/%2f. Required except in standalone mode.
    #[arg(long, env = "PARLEY_AMQP_URL", global = true)]
    pub amqp_url: Option<String>,
    /// Prefix of every exchange and queue. [default: parley.local]
    #[arg(long, env = "PARLEY_TOPOLOGY_PREFIX", global = true)]
    pub topology_prefix: Option<String>,
    /// Language of messages sent without one (ISO 639-1), or "auto". [default: en]
    #[arg(long, env = "PARLEY_SOURCE_LANGUAGE", global = true)]
    pub source_language: Option<String>,
    /// Comma-separated target languages, e.g. "es,ca"; "" for none.
    #[arg(long, env = "PARLEY_LANGUAGES", global = true)]
    pub languages: Option<String>,
    /// Translation provider.
    #[arg(long, env = "PARLEY_TRANSLATOR", global = true)]
    pub translator: Option<ProviderKind>,
    /// Base URL of the translation provider, e.g. http://127.0.0.1:2737.
    #[arg(long, env = "PARLEY_TRANSLATOR_URL", global = true)]
    pub translator_url: Option<String>,
    /// API key of the translation provider, if it needs one.
    #[arg(long, env = "PARLEY_TRANSLATOR_API_KEY", global = true, hide_env_values = true)]
    pub translator_api_key: Option<String>,
    /// Seconds one provider call may take. [default: 30]
    #[arg(long, env = "PARLEY_TRANSLATOR_TIMEOUT_SECS", global = true)]
    pub translator_timeout_secs: Option<u64>,
    /// Longest message text accepted, in bytes. [default: 4096]
    #[arg(long, env = "PARLEY_MAX_TEXT_BYTES", global = true)]
    pub max_text_bytes: Option<usize>,
    /// Deepest GraphQL selection accepted. [default: 10]
    #[arg(long, env = "PARLEY_MAX_QUERY_DEPTH", global = true)]
    pub max_query_depth: Option<usize>,
    /// Highest GraphQL complexity accepted. [default: 200]
    #[arg(long, env = "PARLEY_MAX_QUERY_COMPLEXITY", global = true)]
    pub max_query_complexity: Option<usize>,
    /// Subscriptions one WebSocket connection may hold at once. [default: 100]
    #[arg(long, env = "PARLEY_MAX_SUBSCRIPTIONS_PER_CONNECTION", global = true)]
    pub max_subscriptions_per_connection: Option<usize>,
    /// Seconds a WebSocket client has to send connection_init. [default: 10]
    #[arg(long, env = "PARLEY_CONNECTION_INIT_TIMEOUT_SECS", global = true)]
    pub connection_init_timeout_secs: Option<u64>,
    /// Frames that may wait for one WebSocket connection before it is closed as a slow consumer (1008). [default: 1024]
    #[arg(long, env = "PARLEY_SUBSCRIBER_BUFFER", global = true)]
    pub subscriber_buffer: Option<usize>,
    /// Log format. [default: text]
    #[arg(long, env = "PARLEY_LOG_FORMAT", global = true)]
    pub log_format: Option<LogFormat>,
}

/// Errors in the configuration, reported before anything starts.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("failed to read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("invalid config file {path}: {source}")]
    Parse { path: PathBuf, source: toml::de::Error },
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
    pub translator: Option<ProviderKind>,
    pub translator_url: Option<String>,
    pub translator_api_key: Option<String>,
    pub translator_timeout: Duration,
    pub max_text_bytes: usize,
    pub max_query_depth: usize,
    pub max_query_complexity: usize,
    pub max_subscriptions_per_connection: usize,
    pub connection_init_timeout: Duration,
    pub subscriber_buffer: usize,
    pub log_format: LogFormat,
}

macro_rules! layer {
    ($top:expr, $bottom:expr, $($field:ident),+) => {
        Options { config: $top.config, $($field: $top.$field.or($bottom.$field)),+ }
    };
}

impl Options {
    /// These options over those of the config file they name, if any.
    pub fn with_file(self) -> Result<Options, ConfigError> {
        let Some(path) = self.config.clone() else {
            return Ok(self);
        };
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read { path: path.clone(), source })?;
        let file: Options = toml::from_str(&text).map_err(|source| ConfigError::Parse { path, source })?;
        Ok(layer!(
            self,
            file,
            listen,
            amqp_url,
            topology_prefix,
            source_language,
            languages,
            translator,
            translator_url,
            translator_api_key,
            translator_timeout_secs,
            max_text_bytes,
            max_query_depth,
            max_query_complexity,
            max_subscriptions_per_connection,
            connection_init_timeout_secs,
            subscriber_buffer,
            log_format
        ))
    }
}

fn invalid(setting: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { setting, reason: reason.into() }
}

/// Parses "es, ca" into validated codes; "" is no languages.
pub fn parse_languages(list: &str) -> Result<Vec<String>, ConfigError> {
    let mut languages: Vec<String> = Vec::new();
    for code in list.split(',').map(str::trim).filter(|c| !c.is_empty()) {
        parley_topology::validate_language(code).map_err(|e| invalid("languages", e.to_string()))?;
        if !languages.iter().any(|l| l == code) {
            languages.push(code.to_owned());
        }
    }
    Ok(languages)
}

impl Settings {
    pub fn resolve(options: Options) -> Result<Self, ConfigError> {
        let o = options.with_file()?;
        let source_language = o.source_language.unwrap_or_else(|| "en".into());
        if source_language != "auto" {
            parley_topology::validate_language(&source_language)
                .map_err(|e| invalid("source-language", e.to_string()))?;
        }
        let topology_prefix = o.topology_prefix.unwrap_or_else(|| parley_topology::STANDALONE_PREFIX.into());
        parley_topology::Topology::new(topology_prefix.as_str())
            .map_err(|e| invalid("topology-prefix", e.to_string()))?;
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
            log_format: o.log_format.unwrap_or(LogFormat::Text),
        })
    }

    /// The provider settings, or the error a translator must fail with when there are none.
    pub fn provider(&self) -> Result<(ProviderKind, &str), ConfigError> {
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
        let options = Options { config: Some(path), max_text_bytes: Some(200), ..Default::default() };
        let settings = Settings::resolve(options).unwrap();
        assert_eq!(settings.languages, vec!["de", "fr"]);
        assert_eq!(settings.max_text_bytes, 200);
        assert_eq!(settings.translator, Some(ProviderKind::Apertium));
        assert_eq!(settings.source_language, "en");
    }

    #[test]
    fn unknown_keys_in_the_file_are_an_error() {
        let dir = std::env::temp_dir().join(format!("parley-config-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("chat.toml");
        std::fs::write(&path, "langauges = \"de\"\n").unwrap();
        let err = Settings::resolve(Options { config: Some(path), ..Default::default() }).unwrap_err();
        assert!(err.to_string().contains("langauges"), "{err}");
    }

    #[test]
    fn a_translator_without_a_provider_says_so() {
        let settings = Settings::resolve(Options::default()).unwrap();
        let err = settings.provider().unwrap_err().to_string();
        assert!(err.contains("--translator"), "{err}");
    }
}
