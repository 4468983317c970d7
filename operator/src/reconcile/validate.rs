//! Validate (pure): a `ChatDeployment` spec → a [`ValidatedChat`] with every default resolved, or typed errors.
//!
//! The CRD schema rejects most bad specs at admission; this step checks again (objects may predate
//! the schema) and checks what a schema cannot: name lengths, duplicates, URLs.

use std::time::Duration;

use parley_contract::topology::{self, Topology};

use crate::{
    crd::{AutoscalingMode, ChatDeployment, Provider, RoleOverrides, SecretKeyRef},
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
    #[error("monitoring.otlpEndpoint {0:?} is not an http(s) URL")]
    InvalidOtlpEndpoint(String),
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
    if !(url.starts_with("http://") || url.starts_with("https://")) || url.len() <= "https://".len() {
        errors.push(SpecError::InvalidProviderUrl(url.to_owned()));
    }
    if let Some(endpoint) = &spec.monitoring.otlp_endpoint {
        let url = endpoint.trim();
        if !(url.starts_with("http://") || url.starts_with("https://")) || url.len() <= "https://".len() {
            errors.push(SpecError::InvalidOtlpEndpoint(endpoint.clone()));
        }
    }
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

    #[test]
    fn a_negative_drain_timeout_is_rejected() {
        let mut c = chat(&[]);
        c.spec.drain_timeout_seconds = -1;
        assert_eq!(errors(&c), vec![SpecError::NegativeDrainTimeout(-1)]);
    }
}
