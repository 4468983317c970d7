//! Test fixtures: the ChatDeployment every test starts from, for this crate's unit tests and (with the
//! `fixtures` feature) its integration tests.

use crate::crd::{
    AutoscalingMode, AutoscalingSpec, BrokerSpec, ChatDeployment, ChatDeploymentSpec, LanguageSpec, Provider,
    SecretKeyRef, TranslationSpec,
};

/// The fixture's name.
pub const NAME: &str = "town-hall";

/// `town-hall` in `events`: Apertium, the broker URI in the Secret `rabbitmq` (key `uri`), source
/// language `en`, and `languages` with a fixed count of replicas each, or none.
pub fn chat(languages: &[(&str, Option<i32>)]) -> ChatDeployment {
    let mut chat = ChatDeployment::new(
        NAME,
        ChatDeploymentSpec {
            broker: BrokerSpec {
                secret_ref: SecretKeyRef { name: "rabbitmq".into(), key: "uri".into() },
                tls: None,
                management_url: None,
            },
            source_language: "en".into(),
            translation: TranslationSpec {
                provider: Provider::Apertium,
                url: "http://apertium.translation:2737".into(),
                api_key_secret_ref: None,
            },
            languages: languages
                .iter()
                .map(|(code, replicas)| LanguageSpec { code: (*code).into(), replicas: *replicas, autoscaling: None })
                .collect(),
            drain_timeout_seconds: 300,
            ..Default::default()
        },
    );
    chat.metadata.namespace = Some("events".into());
    chat
}

/// Autoscaling between `min` and `max` replicas, 100 waiting messages per replica, a 120 s window.
pub fn autoscaling(mode: AutoscalingMode, min: i32, max: i32) -> AutoscalingSpec {
    AutoscalingSpec {
        mode,
        min_replicas: min,
        max_replicas: max,
        target_backlog: 100,
        scale_down_stabilization_seconds: 120,
    }
}

/// A language scaled by `autoscaling`.
pub fn autoscaled(code: &str, autoscaling: AutoscalingSpec) -> LanguageSpec {
    LanguageSpec { code: code.into(), replicas: None, autoscaling: Some(autoscaling) }
}

/// A clock a test moves by hand.
#[derive(Default)]
pub struct TestClock {
    ahead: std::sync::Mutex<std::time::Duration>,
}

impl TestClock {
    /// Moves the clock `by` ahead of the wall clock (further each time).
    pub fn advance(&self, by: std::time::Duration) {
        *self.ahead.lock().expect("clock lock") += by;
    }
}

impl crate::reconcile::Clock for TestClock {
    fn now(&self) -> k8s_openapi::jiff::Timestamp {
        let ahead = *self.ahead.lock().expect("clock lock");
        k8s_openapi::jiff::Timestamp::now() + k8s_openapi::jiff::SignedDuration::try_from(ahead).expect("a short test")
    }
}
