//! Validate (pure): a `ChatDeployment` spec → a [`ValidatedChat`] with every default resolved, or typed errors.
//!
//! The CRD schema rejects most bad specs at admission; this step checks again (objects may predate
//! the schema) and checks what a schema cannot: name lengths, duplicates, URLs.

use std::time::Duration;

use parley_contract::topology::{self, Topology};

use crate::{
    crd::{AuthMode, AuthSpec, AutoscalingMode, ChatDeployment, Provider, RoleOverrides, SecretKeyRef},
    names::Names,
};

pub const DEFAULT_GATEWAY_REPLICAS: i32 = 2;
pub const DEFAULT_FANOUT_REPLICAS: i32 = 2;

/// A spec that cannot be reconciled; shown in the Ready condition and an `InvalidSpec` Event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("the ChatDeployment has no {0}")]
    MissingMetadata(&'static str),
    #[error("language code {0:?} is not an ISO 639 code like \"de\" or \"pt-BR\"")]
    InvalidLanguage(String),
    #[error("language {0:?} is listed more than once")]
    DuplicateLanguage(String),
    #[error("language {0:?} is the source language; it needs no translator")]
    SourceLanguageListed(String),
    #[error("sourceLanguage {0:?} is neither an ISO 639 code nor \"auto\"")]
    InvalidSourceLanguage(String),
    #[error("{field} is {value}; replicas cannot be negative")]
    NegativeReplicas { field: String, value: i32 },
    #[error("translation.url {0:?} is not an http(s) URL")]
    InvalidProviderUrl(String),
    #[error("the Apertium provider cannot detect languages; set sourceLanguage to a language code")]
    AutoSourceUnsupported,
    #[error("drainTimeoutSeconds is {0}; it cannot be negative")]
    NegativeDrainTimeout(i64),
    #[error("object name {name:?} would be longer than 63 characters; shorten the ChatDeployment name")]
    NameTooLong { name: String },
    #[error(
        "the name {0:?} cannot name the chat's Service: use lowercase letters, digits and '-', starting with a letter"
    )]
    InvalidName(String),
    #[error("invalid topology: {0}")]
    Topology(String),
    #[error("languages[{0}] sets both replicas and autoscaling; choose one")]
    ReplicasAndAutoscaling(String),
    #[error("languages[{code}].autoscaling: {reason}")]
    InvalidAutoscaling { code: String, reason: String },
    #[error("history.retention {0:?} is not a duration like 30d, 12h, 90m or 3600s")]
    InvalidRetention(String),
    #[error("broker.managementUrl {0:?} is not an http(s) URL without credentials (they come from the broker URI)")]
    InvalidManagementUrl(String),
    #[error("monitoring.otlpEndpoint {0:?} is not an http(s) URL")]
    InvalidOtlpEndpoint(String),
    #[error("auth.mode oidc needs auth.issuer, the OpenID Connect issuer's URL")]
    OidcWithoutIssuer,
    #[error("auth.issuer {0:?} must be an https URL (plain http only to the issuer's in-cluster Service name)")]
    InvalidIssuer(String),
    #[error("auth.mode oidc needs auth.audience, the audience (aud) its tokens must name")]
    OidcWithoutAudience,
    #[error("auth.mode jwt needs auth.jwtSecretRef, the Secret key holding the HS256 secret")]
    JwtWithoutSecret,
    #[error("auth.{field} holds {group:?}, which is no group name (empty, a comma, or space around it)")]
    InvalidGroup { field: &'static str, group: String },
    #[error("auth.readGroups and auth.sendGroups need auth.mode jwt or oidc: with mode none anyone may read and send")]
    GroupsWithoutSignIn,
    #[error("auth.clockSkewSeconds is {0}; it cannot be negative")]
    NegativeClockSkew(i64),
    #[error("auth.rateLimits.{field} is {value}; it must be at least {min}")]
    InvalidRateLimit { field: &'static str, value: i32, min: i32 },
    #[error(
        "languages[{0}].autoscaling.mode keda cannot be used with broker.tls: KEDA's RabbitMQ scaler would not trust \
         the private CA; use mode builtin"
    )]
    KedaWithBrokerCa(String),
}

/// The bounds of one language, resolved from its spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    pub min: i32,
    pub max: i32,
    pub target_backlog: i64,
    pub scale_down_window: Duration,
}

/// Who decides a language's translator replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scaling {
    /// The spec fixes them.
    Fixed(i32),
    /// Nobody in the operator: `kubectl scale` or an HPA may, and are not fought.
    Unmanaged,
    /// The operator's builtin autoscaler, within these bounds.
    Builtin(Bounds),
    /// KEDA, through a ScaledObject with these bounds.
    Keda(Bounds),
}

/// Where the history is kept and for how long.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryPlan {
    pub database: SecretKeyRef,
    /// As the chat server reads it, e.g. `30d`; `None` keeps everything.
    pub retention: Option<String>,
}

/// Per-client limits at the gateway; `None` leaves the chat server's default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Limits {
    pub send_rate: Option<u32>,
    pub send_burst: Option<u32>,
    pub subscribe_rate: Option<u32>,
    pub max_connections_per_ip: Option<u32>,
}

/// How the gateway signs clients in, resolved from `spec.auth` (mode none when it is absent).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AuthPlan {
    pub mode: AuthMode,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub client_id: Option<String>,
    pub clock_skew_seconds: Option<u64>,
    pub groups_claim: Option<String>,
    pub name_claim: Option<String>,
    pub read_groups: Vec<String>,
    pub send_groups: Vec<String>,
    /// The HS256 secret's Secret key: only in mode jwt.
    pub jwt_secret: Option<SecretKeyRef>,
    pub limits: Limits,
}

/// One target language.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Language {
    pub code: String,
    pub scaling: Scaling,
}

/// A role's replicas and pod settings.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RolePlan {
    pub replicas: i32,
    pub overrides: RoleOverrides,
}

/// Everything the build step needs, with defaults resolved; the raw resource is never read for configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidatedChat {
    pub names: Names,
    pub topology: Topology,
    pub source_language: String,
    pub languages: Vec<Language>,
    pub provider: Provider,
    pub provider_url: String,
    pub api_key: Option<SecretKeyRef>,
    pub broker: SecretKeyRef,
    pub image: String,
    pub gateway: RolePlan,
    pub fanout: RolePlan,
    pub translator: RoleOverrides,
    pub drain_timeout_seconds: i64,
    pub history: Option<HistoryPlan>,
    pub monitoring: crate::crd::MonitoringSpec,
    pub auth: AuthPlan,
    /// The Secret key of the broker's CA bundle (`spec.broker.tls.caSecretRef`).
    pub broker_ca: Option<SecretKeyRef>,
    /// The broker's management API (`spec.broker.managementUrl`), without a trailing slash.
    pub management_url: Option<String>,
    /// Whether each role gets a NetworkPolicy.
    pub network_policy: bool,
}

impl ValidatedChat {
    pub fn language_codes(&self) -> Vec<String> {
        self.languages.iter().map(|l| l.code.clone()).collect()
    }
}

fn replicas(field: &str, value: Option<i32>, default: i32) -> Result<i32, SpecError> {
    match value.unwrap_or(default) {
        n if n < 0 => Err(SpecError::NegativeReplicas { field: field.to_owned(), value: n }),
        n => Ok(n),
    }
}

fn autoscaling_bounds(code: &str, a: &crate::crd::AutoscalingSpec) -> Result<Bounds, SpecError> {
    let invalid = |reason: &str| SpecError::InvalidAutoscaling { code: code.to_owned(), reason: reason.into() };
    if a.min_replicas < 0 {
        Err(invalid("minReplicas cannot be negative"))
    } else if a.max_replicas < 1 || a.max_replicas < a.min_replicas {
        Err(invalid("maxReplicas must be at least 1 and at least minReplicas"))
    } else if a.target_backlog < 1 {
        Err(invalid("targetBacklog must be at least 1"))
    } else if a.scale_down_stabilization_seconds < 0 {
        Err(invalid("scaleDownStabilizationSeconds cannot be negative"))
    } else {
        Ok(Bounds {
            min: a.min_replicas,
            max: a.max_replicas,
            target_backlog: a.target_backlog,
            scale_down_window: Duration::from_secs(a.scale_down_stabilization_seconds as u64),
        })
    }
}

/// `<digits><s|m|h|d>`, the pattern the CRD also enforces.
fn valid_retention(text: &str) -> bool {
    let Some(digits) = text.strip_suffix(['s', 'm', 'h', 'd']) else { return false };
    !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
}

/// An http(s) URL with something after the scheme.
fn http_url(url: &str) -> bool {
    (url.starts_with("http://") || url.starts_with("https://")) && url.len() > "https://".len()
}

/// Non-blank text, trimmed; `None` for blank.
fn text(value: &Option<String>) -> Option<String> {
    value.as_deref().map(str::trim).filter(|v| !v.is_empty()).map(str::to_owned)
}

/// `spec.auth` resolved: mode none without one, and every setting the mode needs present.
fn auth_plan(spec: Option<&AuthSpec>, errors: &mut Vec<SpecError>) -> AuthPlan {
    let Some(spec) = spec else { return AuthPlan::default() };
    let issuer = text(&spec.issuer);
    let audience = text(&spec.audience);
    match spec.mode {
        AuthMode::Oidc => {
            match &issuer {
                None => errors.push(SpecError::OidcWithoutIssuer),
                Some(url) if parley_contract::config::untrusted_issuer(url).is_some() => {
                    errors.push(SpecError::InvalidIssuer(url.clone()))
                }
                Some(_) => {}
            }
            if audience.is_none() {
                errors.push(SpecError::OidcWithoutAudience);
            }
        }
        AuthMode::Jwt if spec.jwt_secret_ref.is_none() => errors.push(SpecError::JwtWithoutSecret),
        AuthMode::Jwt => {}
        AuthMode::None if !spec.read_groups.is_empty() || !spec.send_groups.is_empty() => {
            errors.push(SpecError::GroupsWithoutSignIn)
        }
        AuthMode::None => {}
    }
    // The chat server reads the groups comma-separated and trimmed.
    let mut groups = |field: &'static str, list: &[String]| {
        for group in list {
            if group.is_empty() || group.contains(',') || group.trim() != group {
                errors.push(SpecError::InvalidGroup { field, group: group.clone() });
            }
        }
        list.to_vec()
    };
    let read_groups = groups("readGroups", &spec.read_groups);
    let send_groups = groups("sendGroups", &spec.send_groups);
    let clock_skew_seconds = spec.clock_skew_seconds.and_then(|s| match u64::try_from(s) {
        Ok(s) => Some(s),
        Err(_) => {
            errors.push(SpecError::NegativeClockSkew(s));
            None
        }
    });
    let limits = spec.rate_limits.as_ref().map_or_else(Limits::default, |r| {
        let mut at_least = |field: &'static str, value: Option<i32>, min: i32| {
            let value = value?;
            if value < min {
                errors.push(SpecError::InvalidRateLimit { field, value, min });
            }
            u32::try_from(value).ok()
        };
        Limits {
            send_rate: at_least("sendPerSecond", r.send_per_second, 1),
            send_burst: at_least("sendBurst", r.send_burst, 1),
            subscribe_rate: at_least("subscribePerSecond", r.subscribe_per_second, 1),
            max_connections_per_ip: at_least("maxConnectionsPerIp", r.max_connections_per_ip, 0),
        }
    });
    AuthPlan {
        mode: spec.mode,
        issuer,
        audience,
        client_id: text(&spec.client_id).filter(|_| spec.mode == AuthMode::Oidc),
        clock_skew_seconds,
        groups_claim: text(&spec.groups_claim),
        name_claim: text(&spec.name_claim),
        read_groups,
        send_groups,
        jwt_secret: (spec.mode == AuthMode::Jwt).then(|| spec.jwt_secret_ref.clone()).flatten(),
        limits,
    }
}

fn check_name(name: String, errors: &mut Vec<SpecError>) {
    if name.len() > 63 {
        errors.push(SpecError::NameTooLong { name });
    }
}

/// Validates `chat`, collecting every error rather than stopping at the first.
pub fn validate(chat: &ChatDeployment, default_image: &str) -> Result<ValidatedChat, Vec<SpecError>> {
    let mut errors = Vec::new();
    let name = chat.metadata.name.clone().ok_or_else(|| vec![SpecError::MissingMetadata("name")])?;
    let namespace = chat.metadata.namespace.clone().ok_or_else(|| vec![SpecError::MissingMetadata("namespace")])?;
    let names = Names::new(&name, &namespace);
    let spec = &chat.spec;
    // What the CRD's rule on metadata.name says, for objects created before it (a DNS-1035 label).
    let label = name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && !name.ends_with('-');
    if !label {
        errors.push(SpecError::InvalidName(name.clone()));
    }

    let source = spec.source_language.clone();
    if source != "auto" && topology::validate_language(&source).is_err() {
        errors.push(SpecError::InvalidSourceLanguage(source.clone()));
    }
    if source == "auto" && !spec.translation.provider.detects_language() {
        errors.push(SpecError::AutoSourceUnsupported);
    }

    let mut languages: Vec<Language> = Vec::new();
    for language in &spec.languages {
        let code = language.code.clone();
        if topology::validate_language(&code).is_err() {
            errors.push(SpecError::InvalidLanguage(code));
            continue;
        }
        // Case-insensitively: "pt-BR" and "pt-br" would share one Deployment name.
        if languages.iter().any(|l| l.code.eq_ignore_ascii_case(&code)) {
            errors.push(SpecError::DuplicateLanguage(code));
            continue;
        }
        if code == source {
            errors.push(SpecError::SourceLanguageListed(code));
            continue;
        }
        let scaling = match (&language.replicas, &language.autoscaling) {
            (Some(_), Some(_)) => Err(SpecError::ReplicasAndAutoscaling(code.clone())),
            (Some(n), None) => replicas(&format!("languages[{code}].replicas"), Some(*n), 0).map(Scaling::Fixed),
            (None, None) => Ok(Scaling::Unmanaged),
            (None, Some(a)) => autoscaling_bounds(&code, a).map(|bounds| match a.mode {
                AutoscalingMode::Builtin => Scaling::Builtin(bounds),
                AutoscalingMode::Keda => Scaling::Keda(bounds),
            }),
        };
        match scaling {
            Ok(scaling) => {
                check_name(names.translator(&code), &mut errors);
                languages.push(Language { code, scaling });
            }
            Err(err) => errors.push(err),
        }
    }

    let url = spec.translation.url.trim();
    if !http_url(url) {
        errors.push(SpecError::InvalidProviderUrl(url.to_owned()));
    }
    let management_url = spec.broker.management_url.as_deref().map(|u| u.trim().trim_end_matches('/').to_owned());
    if let Some(management) = &management_url {
        let credentials = url::Url::parse(management).is_ok_and(|u| !u.username().is_empty() || u.password().is_some());
        if !http_url(management) || credentials {
            errors.push(SpecError::InvalidManagementUrl(super::observe::scrub(management, management)));
        }
    }
    if let Some(endpoint) = &spec.monitoring.otlp_endpoint {
        if !http_url(endpoint.trim()) {
            errors.push(SpecError::InvalidOtlpEndpoint(endpoint.clone()));
        }
    }
    let auth = auth_plan(spec.auth.as_ref(), &mut errors);
    let network_policy = spec.network_policy.enabled;
    if spec.drain_timeout_seconds < 0 {
        errors.push(SpecError::NegativeDrainTimeout(spec.drain_timeout_seconds));
    }
    let history = spec.history.as_ref().map(|h| HistoryPlan {
        database: h.database.secret_ref.clone(),
        retention: h.retention.clone().filter(|r| !r.is_empty()),
    });
    if let Some(retention) = history.as_ref().and_then(|h| h.retention.as_deref()) {
        if !valid_retention(retention) {
            errors.push(SpecError::InvalidRetention(retention.to_owned()));
        }
    }
    let gateway = replicas("gateway.replicas", spec.gateway.replicas, DEFAULT_GATEWAY_REPLICAS);
    let fanout = replicas("fanout.replicas", spec.fanout.replicas, DEFAULT_FANOUT_REPLICAS);
    check_name(names.gateway(), &mut errors);
    check_name(names.fanout(), &mut errors);
    if network_policy {
        check_name(names.translators(), &mut errors);
    }
    if spec.broker.tls.is_some() {
        for language in languages.iter().filter(|l| matches!(l.scaling, Scaling::Keda(_))) {
            errors.push(SpecError::KedaWithBrokerCa(language.code.clone()));
        }
    }
    let topology = Topology::for_chat_deployment(&namespace, &name);
    if let Err(err) = &topology {
        errors.push(SpecError::Topology(err.to_string()));
    }

    match (gateway, fanout, topology) {
        (Ok(gateway), Ok(fanout), Ok(topology)) if errors.is_empty() => Ok(ValidatedChat {
            names,
            topology,
            source_language: source,
            languages,
            provider: spec.translation.provider,
            provider_url: url.to_owned(),
            api_key: spec.translation.api_key_secret_ref.clone(),
            broker: spec.broker.secret_ref.clone(),
            image: spec.image.clone().unwrap_or_else(|| default_image.to_owned()),
            gateway: RolePlan { replicas: gateway, overrides: spec.gateway.overrides.clone() },
            fanout: RolePlan { replicas: fanout, overrides: spec.fanout.overrides.clone() },
            translator: spec.translator.clone(),
            drain_timeout_seconds: spec.drain_timeout_seconds,
            history,
            monitoring: spec.monitoring.clone(),
            auth,
            broker_ca: spec.broker.tls.as_ref().map(|tls| tls.ca_secret_ref.clone()),
            management_url,
            network_policy,
        }),
        (gateway, fanout, _) => {
            errors.extend(gateway.err());
            errors.extend(fanout.err());
            Err(errors)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{autoscaling, chat};

    fn errors(chat: &ChatDeployment) -> Vec<SpecError> {
        validate(chat, "parley/chat-server:test").unwrap_err()
    }

    #[test]
    fn keda_autoscaling_is_refused_with_a_private_broker_ca() {
        let mut spec = chat(&[("de", None)]);
        spec.spec.languages[0].autoscaling = Some(autoscaling(AutoscalingMode::Keda, 0, 3));
        assert!(validate(&spec, "img").is_ok(), "keda alone is fine");
        spec.spec.broker.tls = Some(crate::crd::BrokerTlsSpec {
            ca_secret_ref: crate::crd::SecretKeyRef { name: "broker-ca".into(), key: "ca.pem".into() },
        });
        assert_eq!(errors(&spec), vec![SpecError::KedaWithBrokerCa("de".into())]);
        spec.spec.languages[0].autoscaling = Some(autoscaling(AutoscalingMode::Builtin, 0, 3));
        assert!(validate(&spec, "img").is_ok(), "builtin autoscaling reads the backlog with the CA");
    }

    #[test]
    fn defaults_are_resolved() {
        let valid = validate(&chat(&[("de", None), ("fr", Some(3))]), "img:1").unwrap();
        assert_eq!(valid.gateway.replicas, 2);
        assert_eq!(valid.fanout.replicas, 2);
        assert_eq!(
            valid.languages,
            vec![
                Language { code: "de".into(), scaling: Scaling::Unmanaged },
                Language { code: "fr".into(), scaling: Scaling::Fixed(3) }
            ]
        );
        assert_eq!(valid.image, "img:1");
        assert_eq!(valid.topology.prefix(), "parley.events.town-hall");
    }

    #[test]
    fn a_bad_language_code_is_rejected() {
        assert_eq!(errors(&chat(&[("German", None)])), vec![SpecError::InvalidLanguage("German".into())]);
    }

    #[test]
    fn a_duplicate_language_is_rejected() {
        assert_eq!(errors(&chat(&[("de", None), ("de", Some(2))])), vec![SpecError::DuplicateLanguage("de".into())]);
    }

    #[test]
    fn language_codes_differing_only_in_case_are_duplicates() {
        assert_eq!(
            errors(&chat(&[("pt-BR", None), ("pt-br", None)])),
            vec![SpecError::DuplicateLanguage("pt-br".into())]
        );
    }

    #[test]
    fn the_source_language_as_a_target_is_rejected() {
        assert_eq!(errors(&chat(&[("en", None)])), vec![SpecError::SourceLanguageListed("en".into())]);
    }

    #[test]
    fn negative_replicas_are_rejected() {
        let mut c = chat(&[("de", Some(-1))]);
        c.spec.gateway.replicas = Some(-2);
        let errs = errors(&c);
        assert!(errs.contains(&SpecError::NegativeReplicas { field: "languages[de].replicas".into(), value: -1 }));
        assert!(errs.contains(&SpecError::NegativeReplicas { field: "gateway.replicas".into(), value: -2 }));
    }

    #[test]
    fn a_provider_url_without_a_scheme_is_rejected() {
        let mut c = chat(&[]);
        c.spec.translation.url = "libretranslate:5000".into();
        assert_eq!(errors(&c), vec![SpecError::InvalidProviderUrl("libretranslate:5000".into())]);
    }

    #[test]
    fn an_otlp_endpoint_that_is_no_http_url_is_rejected() {
        let mut c = chat(&[]);
        c.spec.monitoring.otlp_endpoint = Some("otel-collector:4317".into());
        assert_eq!(errors(&c), vec![SpecError::InvalidOtlpEndpoint("otel-collector:4317".into())]);
    }

    #[test]
    fn a_management_url_must_be_http_and_carry_no_credentials_which_are_never_echoed() {
        let mut c = chat(&[]);
        c.spec.broker.management_url = Some("rabbitmq:15672".into());
        assert_eq!(errors(&c), vec![SpecError::InvalidManagementUrl("rabbitmq:15672".into())]);
        c.spec.broker.management_url = Some("http://admin:s3cret@rabbitmq:15672".into());
        let found = errors(&c);
        assert!(matches!(&found[..], [SpecError::InvalidManagementUrl(_)]), "{found:?}");
        assert!(!found[0].to_string().contains("s3cret"), "{}", found[0]);
        c.spec.broker.management_url = Some("http://rabbitmq.broker:15672/".into());
        assert_eq!(validate(&c, "img").unwrap().management_url.as_deref(), Some("http://rabbitmq.broker:15672"));
    }

    #[test]
    fn auto_detection_with_apertium_is_rejected() {
        let mut c = chat(&[]);
        c.spec.source_language = "auto".into();
        assert_eq!(errors(&c), vec![SpecError::AutoSourceUnsupported]);
        c.spec.translation.provider = Provider::Libretranslate;
        assert!(validate(&c, "img").is_ok());
    }

    #[test]
    fn a_name_that_cannot_name_a_service_is_rejected() {
        for bad in ["town.hall", "1chat", "Town-hall", "town-hall-"] {
            let mut c = chat(&[("de", None)]);
            c.metadata.name = Some(bad.into());
            assert_eq!(errors(&c), vec![SpecError::InvalidName(bad.into())], "{bad}");
        }
        let mut c = chat(&[("de", None)]);
        c.metadata.name = Some("town-hall-2".into());
        assert!(validate(&c, "img").is_ok());
    }

    #[test]
    fn a_name_too_long_for_its_objects_is_rejected() {
        let mut c = chat(&[("de", None)]);
        c.metadata.name = Some("a".repeat(60));
        assert!(errors(&c).iter().any(|e| matches!(e, SpecError::NameTooLong { .. })));
    }

    #[test]
    fn autoscaling_with_fixed_replicas_is_rejected() {
        let mut c = chat(&[("de", Some(2))]);
        c.spec.languages[0].autoscaling = Some(autoscaling(AutoscalingMode::Builtin, 1, 3));
        assert_eq!(errors(&c), vec![SpecError::ReplicasAndAutoscaling("de".into())]);
    }

    #[test]
    fn autoscaling_bounds_must_be_ordered() {
        let mut c = chat(&[("de", None)]);
        c.spec.languages[0].autoscaling = Some(autoscaling(AutoscalingMode::Builtin, 5, 2));
        assert!(matches!(errors(&c)[..], [SpecError::InvalidAutoscaling { .. }]));
        c.spec.languages[0].autoscaling = Some(autoscaling(AutoscalingMode::Builtin, 0, 4));
        let valid = validate(&c, "img").unwrap();
        assert!(matches!(valid.languages[0].scaling, Scaling::Builtin(Bounds { min: 0, max: 4, .. })));
    }

    #[test]
    fn a_history_retention_must_be_a_duration() {
        let mut c = chat(&[]);
        c.spec.history = Some(crate::crd::HistorySpec {
            database: crate::crd::DatabaseSpec { secret_ref: SecretKeyRef { name: "db".into(), key: "uri".into() } },
            retention: Some("a month".into()),
        });
        assert_eq!(errors(&c), vec![SpecError::InvalidRetention("a month".into())]);
        c.spec.history.as_mut().unwrap().retention = Some("30d".into());
        let history = validate(&c, "img").unwrap().history.unwrap();
        assert_eq!((history.database.name.as_str(), history.retention.as_deref()), ("db", Some("30d")));
    }

    fn with_auth(auth: crate::crd::AuthSpec) -> ChatDeployment {
        let mut c = chat(&[]);
        c.spec.auth = Some(auth);
        c
    }

    fn oidc(issuer: Option<&str>, audience: Option<&str>) -> crate::crd::AuthSpec {
        crate::crd::AuthSpec {
            mode: AuthMode::Oidc,
            issuer: issuer.map(Into::into),
            audience: audience.map(Into::into),
            ..Default::default()
        }
    }

    #[test]
    fn without_spec_auth_the_gateway_runs_open_and_network_policies_are_on() {
        let valid = validate(&chat(&[]), "img").unwrap();
        assert_eq!(valid.auth, AuthPlan::default());
        assert_eq!(valid.auth.mode, AuthMode::None);
        assert!(valid.network_policy);
        assert_eq!(valid.broker_ca, None);
    }

    #[test]
    fn an_oidc_spec_needs_an_issuer_url_and_an_audience_and_says_which_is_missing() {
        let issuer = Some("https://keycloak.example.com/realms/events");
        assert_eq!(errors(&with_auth(oidc(issuer, None))), vec![SpecError::OidcWithoutAudience]);
        assert!(SpecError::OidcWithoutAudience.to_string().contains("auth.audience"));
        assert_eq!(errors(&with_auth(oidc(issuer, Some("  ")))), vec![SpecError::OidcWithoutAudience], "blank");
        assert_eq!(errors(&with_auth(oidc(None, Some("parley")))), vec![SpecError::OidcWithoutIssuer]);
        assert_eq!(
            errors(&with_auth(oidc(Some("keycloak.example.com"), Some("parley")))),
            vec![SpecError::InvalidIssuer("keycloak.example.com".into())]
        );
        assert_eq!(
            errors(&with_auth(oidc(Some("http://keycloak.example.com/realms/e"), Some("parley")))),
            vec![SpecError::InvalidIssuer("http://keycloak.example.com/realms/e".into())],
            "keys over plain http from outside the cluster"
        );
        let valid = validate(&with_auth(oidc(Some("http://dex.auth.svc:5556/dex"), Some("parley"))), "img").unwrap();
        assert_eq!(valid.auth.issuer.as_deref(), Some("http://dex.auth.svc:5556/dex"), "http to a Service is accepted");
        assert_eq!(valid.auth.jwt_secret, None);
    }

    #[test]
    fn jwt_mode_needs_a_secret_ref_which_no_other_mode_hands_out() {
        let jwt = crate::crd::AuthSpec { mode: AuthMode::Jwt, ..Default::default() };
        assert_eq!(errors(&with_auth(jwt.clone())), vec![SpecError::JwtWithoutSecret]);
        let reference = SecretKeyRef { name: "parley-jwt".into(), key: "secret".into() };
        let with_secret = crate::crd::AuthSpec { jwt_secret_ref: Some(reference.clone()), ..jwt };
        let valid = validate(&with_auth(with_secret.clone()), "img").unwrap();
        assert_eq!(valid.auth.jwt_secret, Some(reference));
        let oidc = crate::crd::AuthSpec { mode: AuthMode::Oidc, ..oidc(Some("https://idp"), Some("parley")) };
        let oidc = crate::crd::AuthSpec { jwt_secret_ref: with_secret.jwt_secret_ref, ..oidc };
        assert_eq!(validate(&with_auth(oidc), "img").unwrap().auth.jwt_secret, None, "not read in mode oidc");
    }

    #[test]
    fn groups_need_sign_in_and_must_be_names_the_chat_server_can_split() {
        let open = crate::crd::AuthSpec { read_groups: vec!["attendees".into()], ..Default::default() };
        assert_eq!(errors(&with_auth(open)), vec![SpecError::GroupsWithoutSignIn], "mode none would let anyone read");
        let listed = crate::crd::AuthSpec {
            read_groups: vec!["attendees,staff".into()],
            send_groups: vec!["".into(), " speakers".into(), "Event Staff".into()],
            ..oidc(Some("https://idp"), Some("parley"))
        };
        assert_eq!(
            errors(&with_auth(listed)),
            vec![
                SpecError::InvalidGroup { field: "readGroups", group: "attendees,staff".into() },
                SpecError::InvalidGroup { field: "sendGroups", group: "".into() },
                SpecError::InvalidGroup { field: "sendGroups", group: " speakers".into() },
            ]
        );
    }

    #[test]
    fn rate_limits_and_clock_skew_must_be_in_range() {
        let limits = crate::crd::RateLimitsSpec {
            send_per_second: Some(0),
            send_burst: Some(5),
            subscribe_per_second: None,
            max_connections_per_ip: Some(-1),
        };
        let auth =
            crate::crd::AuthSpec { rate_limits: Some(limits), clock_skew_seconds: Some(-5), ..Default::default() };
        assert_eq!(
            errors(&with_auth(auth)),
            vec![
                SpecError::NegativeClockSkew(-5),
                SpecError::InvalidRateLimit { field: "sendPerSecond", value: 0, min: 1 },
                SpecError::InvalidRateLimit { field: "maxConnectionsPerIp", value: -1, min: 0 },
            ]
        );
        let limits =
            crate::crd::RateLimitsSpec { send_burst: Some(5), max_connections_per_ip: Some(0), ..Default::default() };
        let auth = crate::crd::AuthSpec { rate_limits: Some(limits), ..Default::default() };
        let valid = validate(&with_auth(auth), "img").unwrap();
        assert_eq!(
            valid.auth.limits,
            Limits { send_burst: Some(5), max_connections_per_ip: Some(0), ..Default::default() },
            "rate limits apply without sign-in too (per client address)"
        );
    }

    #[test]
    fn a_name_too_long_for_the_translators_network_policy_is_rejected_only_when_it_is_made() {
        let mut c = chat(&[]);
        c.metadata.name = Some("a".repeat(53));
        assert_eq!(errors(&c), vec![SpecError::NameTooLong { name: format!("{}-translator", "a".repeat(53)) }]);
        c.spec.network_policy.enabled = false;
        assert!(validate(&c, "img").is_ok());
    }

    #[test]
    fn a_negative_drain_timeout_is_rejected() {
        let mut c = chat(&[]);
        c.spec.drain_timeout_seconds = -1;
        assert_eq!(errors(&c), vec![SpecError::NegativeDrainTimeout(-1)]);
    }
}
