//! Every name, label and selector the operator gives the objects it owns, in one place.

use std::collections::BTreeMap;

pub const FIELD_MANAGER: &str = "parley-operator";
pub const FINALIZER: &str = "chat.parley.dev/topology";
pub const PAUSED_ANNOTATION: &str = "chat.parley.dev/paused";
pub const CONFIG_HASH_ANNOTATION: &str = "chat.parley.dev/config-hash";
/// On the ChatDeployment: the languages whose queues may exist on the broker, written before they are
/// declared, so that draining and deletion find every one (status may never have been written).
pub const DECLARED_ANNOTATION: &str = "chat.parley.dev/declared-languages";
pub const DEPLOYMENT_LABEL: &str = "chat.parley.dev/deployment";
pub const ROLE_LABEL: &str = "chat.parley.dev/role";
pub const LANGUAGE_LABEL: &str = "chat.parley.dev/language";
pub const MANAGED_BY: &str = "parley-operator";
pub const CONFIG_FILE: &str = parley_contract::config::FILE_NAME;
/// The gateway's configuration file, beside [`CONFIG_FILE`] in the same ConfigMap: the shared settings
/// plus sign-in and the per-client limits, which only the gateway reads (a fanout or translator given
/// `auth = "jwt"` would refuse to start without the secret it has no use for).
pub const GATEWAY_CONFIG_FILE: &str = "gateway.toml";
pub const CONFIG_DIR: &str = "/etc/parley";
/// Where the broker's CA bundle (`spec.broker.tls.caSecretRef`) is mounted, read-only, in every pod.
pub const BROKER_CA_DIR: &str = "/etc/parley-broker-ca";
pub const BROKER_CA_FILE: &str = "ca.pem";
pub const HTTP_PORT: i32 = 8080;
pub const SERVICE_PORT: i32 = 80;

/// The parts of a ChatDeployment, as its objects' `app.kubernetes.io/component` and
/// `chat.parley.dev/role` labels name them: the three roles, the configuration they share, and the
/// monitor that scrapes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    Gateway,
    Fanout,
    Translator,
    Config,
    Monitoring,
}

impl Component {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Gateway => "gateway",
            Self::Fanout => "fanout",
            Self::Translator => "translator",
            Self::Config => "config",
            Self::Monitoring => "monitoring",
        }
    }
}

/// Names of one ChatDeployment's objects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    pub instance: String,
    pub namespace: String,
}

impl Names {
    pub fn new(instance: &str, namespace: &str) -> Self {
        Self { instance: instance.to_owned(), namespace: namespace.to_owned() }
    }

    pub fn config_map(&self) -> String {
        format!("{}-config", self.instance)
    }

    pub fn gateway(&self) -> String {
        format!("{}-gateway", self.instance)
    }

    pub fn fanout(&self) -> String {
        format!("{}-fanout", self.instance)
    }

    pub fn translator(&self, language: &str) -> String {
        format!("{}-translator-{}", self.instance, language.to_ascii_lowercase())
    }

    /// Objects that cover every language's translators (their NetworkPolicy); a language code has at
    /// least two letters, so no translator Deployment is named so.
    pub fn translators(&self) -> String {
        format!("{}-translator", self.instance)
    }

    /// The KEDA TriggerAuthentication that reads the broker URI.
    pub fn broker_auth(&self) -> String {
        format!("{}-broker", self.instance)
    }

    /// `host:port` of the gateway Service inside the cluster.
    pub fn gateway_endpoint(&self) -> String {
        format!("{}.{}.svc:{SERVICE_PORT}", self.gateway(), self.namespace)
    }

    /// Labels that select one component's pods (and one language's, for translators). Parley's own
    /// deployment label among them: a Helm release of the same name labels its pods with the same
    /// `app.kubernetes.io/instance` (and often `component`), and they must not be selected.
    pub fn selector(&self, component: Component, language: Option<&str>) -> BTreeMap<String, String> {
        let mut labels = BTreeMap::from([
            ("app.kubernetes.io/instance".to_owned(), self.instance.clone()),
            ("app.kubernetes.io/component".to_owned(), component.as_str().to_owned()),
            (DEPLOYMENT_LABEL.to_owned(), self.instance.clone()),
        ]);
        if let Some(language) = language {
            labels.insert(LANGUAGE_LABEL.to_owned(), language.to_owned());
        }
        labels
    }

    /// The recommended labels plus Parley's own, on every owned object.
    pub fn labels(&self, component: Component, language: Option<&str>) -> BTreeMap<String, String> {
        let mut labels = self.selector(component, language);
        labels.extend([
            ("app.kubernetes.io/name".to_owned(), "parley".to_owned()),
            ("app.kubernetes.io/part-of".to_owned(), "parley".to_owned()),
            ("app.kubernetes.io/managed-by".to_owned(), MANAGED_BY.to_owned()),
            (DEPLOYMENT_LABEL.to_owned(), self.instance.clone()),
            (ROLE_LABEL.to_owned(), component.as_str().to_owned()),
        ]);
        labels
    }

    /// Label selector of everything this operator owns for this ChatDeployment (for pruning).
    pub fn owned_selector(&self) -> String {
        format!("{DEPLOYMENT_LABEL}={},app.kubernetes.io/managed-by={MANAGED_BY}", self.instance)
    }
}
