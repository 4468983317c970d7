//! The `ChatDeployment` custom resource (group `chat.parley.dev`, version `v1alpha1`), from which the CRD is generated.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::core::v1::{Affinity, ResourceRequirements, Toleration},
    apimachinery::pkg::apis::meta::v1::Condition,
};
use kube::CustomResource;
pub use parley_contract::provider::Provider;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A multilingual real-time chat: a GraphQL gateway, one translator Deployment per language,
/// and fanout workers, wired through RabbitMQ.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "chat.parley.dev",
    version = "v1alpha1",
    kind = "ChatDeployment",
    namespaced,
    status = "ChatDeploymentStatus",
    shortname = "chat",
    derive = "Default",
    derive = "PartialEq",
    category = "parley",
    // The name becomes the Service's and Deployments' (DNS-1035 labels): refuse one they cannot take.
    validation = Rule::new("self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')").message(
        "the name must start with a letter and hold only lowercase letters, digits and '-' (it names the chat's Service)"
    ),
    printcolumn = r#"{"name":"Languages","type":"string","jsonPath":".status.languages"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    printcolumn = r#"{"name":"Backlog","type":"integer","jsonPath":".status.backlog","priority":1}"#,
    printcolumn = r#"{"name":"Gateway","type":"string","jsonPath":".status.gateway.endpoint","priority":1}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ChatDeploymentSpec {
    /// The RabbitMQ broker every role connects to.
    pub broker: BrokerSpec,
    /// ISO 639-1 code of messages sent without a language, or "auto" to let the provider detect it.
    #[serde(default = "default_source_language")]
    #[schemars(regex(pattern = r"^([a-z]{2,3}(-[A-Za-z0-9]+)?|auto)$"))]
    pub source_language: String,
    /// The machine translation service the translators call.
    pub translation: TranslationSpec,
    /// Target languages; each gets its own translator Deployment and queue.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["code"]))]
    pub languages: Vec<LanguageSpec>,
    /// The GraphQL gateway that holds the client connections.
    #[serde(default)]
    pub gateway: RoleSpec,
    /// The fanout workers that sequence and route messages (one active at a time, the rest on standby).
    #[serde(default)]
    pub fanout: RoleSpec,
    /// Pod settings shared by every language's translator Deployment.
    #[serde(default)]
    pub translator: RoleOverrides,
    /// The chat-server image; the operator's default when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Seconds a removed language's queue may keep undelivered messages before it is deleted anyway.
    #[serde(default = "default_drain_timeout")]
    #[schemars(range(min = 0))]
    pub drain_timeout_seconds: i64,
    /// Where the chat history is kept. Without it, history queries answer HISTORY_DISABLED and the
    /// fanout numbers messages in memory (numbering restarts when another fanout takes over).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history: Option<HistorySpec>,
    /// Prometheus scraping of the chat's pods.
    #[serde(default)]
    pub monitoring: MonitoringSpec,
    /// How the gateway signs clients in, and how much one client may do. Without it the gateway is
    /// open (mode none): anyone who reaches it may read and post, under any name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<AuthSpec>,
    /// NetworkPolicies that let each role's pods take and make only the connections they need.
    #[serde(default)]
    pub network_policy: NetworkPolicySpec,
}

/// How the gateway signs clients in.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// No sign-in: anyone who reaches the gateway may read and post, under any name.
    #[default]
    None,
    /// Bearer JWTs signed with a shared HS256 secret (`jwtSecretRef`).
    Jwt,
    /// Bearer JWTs from an OpenID Connect issuer (`issuer`, `audience`), verified with the keys its
    /// discovery document names.
    Oidc,
}

/// Sign-in at the gateway: who may read and who may send, and the per-client limits.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!has(self.mode) || self.mode != 'oidc' || (has(self.issuer) && (self.issuer.startsWith('https://') || self.issuer.startsWith('http://')))",
        "message": "mode oidc needs issuer, the OpenID Connect issuer's http(s) URL"
    },
    {
        "rule": "!has(self.mode) || self.mode != 'oidc' || (has(self.audience) && size(self.audience) > 0)",
        "message": "mode oidc needs audience, the audience (aud) its tokens must name"
    },
    {
        "rule": "!has(self.mode) || self.mode != 'jwt' || has(self.jwtSecretRef)",
        "message": "mode jwt needs jwtSecretRef, the Secret key holding the HS256 secret"
    },
    {
        "rule": "(has(self.mode) && self.mode != 'none') || ((!has(self.readGroups) || size(self.readGroups) == 0) && (!has(self.sendGroups) || size(self.sendGroups) == 0))",
        "message": "readGroups and sendGroups need mode jwt or oidc: with mode none anyone may read and send"
    }
]))]
pub struct AuthSpec {
    /// none (default), jwt or oidc.
    #[serde(default)]
    pub mode: AuthMode,
    /// The token issuer (`iss`). With oidc, the http(s) URL whose /.well-known/openid-configuration
    /// names the signing keys, e.g. https://keycloak.example.com/realms/events; with jwt, checked when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    /// The audience (`aud`) a token must name. Required with oidc; checked with jwt when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audience: Option<String>,
    /// With oidc: the public OAuth client (authorization code with PKCE) the chat page signs
    /// participants in with; its redirect URI is the page's URL. Without it the page asks for a token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// Seconds of clock skew allowed on a token's `exp` and `nbf`; 30 when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub clock_skew_seconds: Option<i64>,
    /// The claim holding the user's groups, e.g. cognito:groups; a dotted path reaches into objects
    /// (realm_access.roles). `groups` when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub groups_claim: Option<String>,
    /// The claim holding the name messages are sent under (falling back to preferred_username, then
    /// sub). `name` when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name_claim: Option<String>,
    /// Groups whose members may read (subscribe, query history); any signed-in user when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(regex(pattern = r"^[^,\s]([^,]*[^,\s])?$")))]
    pub read_groups: Vec<String>,
    /// Groups whose members may send; any user who may read when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(regex(pattern = r"^[^,\s]([^,]*[^,\s])?$")))]
    pub send_groups: Vec<String>,
    /// With mode jwt: the Secret key holding the HS256 secret (at least 32 bytes). It reaches the
    /// gateway as an environment variable, never the ConfigMap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt_secret_ref: Option<SecretKeyRef>,
    /// What one client may do; the chat server's defaults when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limits: Option<RateLimitsSpec>,
}

/// Per-client limits at the gateway.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitsSpec {
    /// Messages one user (one client address without sign-in) may send per second, sustained; 5 when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub send_per_second: Option<i32>,
    /// Messages one user may send in a burst above the sustained rate; 20 when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub send_burst: Option<i32>,
    /// Subscriptions one WebSocket connection may start per second (bursts of 5x pass); 10 when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub subscribe_per_second: Option<i32>,
    /// WebSocket connections one client address may hold at once; 0 (the default) for no limit. Behind
    /// a proxy every client shares the proxy's address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub max_connections_per_ip: Option<i32>,
}

/// The NetworkPolicies of the chat's pods.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetworkPolicySpec {
    /// Create one NetworkPolicy per role (default true): ingress only on the pods' HTTP port, egress
    /// only to DNS, the broker, the history database, the translation provider, the OIDC issuer and
    /// the OTLP collector. false creates none (and deletes those made before).
    #[serde(default = "default_true")]
    pub enabled: bool,
}

impl Default for NetworkPolicySpec {
    fn default() -> Self {
        Self { enabled: true }
    }
}

/// How Prometheus finds the chat's pods: a PodMonitor, where the Prometheus Operator is installed.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MonitoringSpec {
    /// Create a PodMonitor for every pod of the chat (port `http`, path `/metrics`) when the
    /// Prometheus Operator's CRDs are installed.
    #[serde(default = "default_true")]
    pub pod_monitor: bool,
    /// Labels on the PodMonitor, for a Prometheus that selects monitors by label (kube-prometheus-stack
    /// picks `release: <its release name>`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Scrape interval, e.g. 15s; the Prometheus's own when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+(ms|s|m|h)$"))]
    pub interval: Option<String>,
    /// An OpenTelemetry collector's OTLP/HTTP URL (e.g. http://otel-collector.observability:4318)
    /// every role exports its spans to; none when omitted (logs still carry trace ids).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^https?://.+"))]
    pub otlp_endpoint: Option<String>,
    /// Fraction (0 to 1) of the traces the chat's pods start whose spans are exported; 1 when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub trace_sample_ratio: Option<f64>,
}

impl Default for MonitoringSpec {
    fn default() -> Self {
        Self {
            pod_monitor: true,
            labels: BTreeMap::new(),
            interval: None,
            otlp_endpoint: None,
            trace_sample_ratio: None,
        }
    }
}

fn default_true() -> bool {
    true
}

/// The chat history: every message and translation, with its per-chat sequence number.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct HistorySpec {
    /// The PostgreSQL database the fanout writes and the gateways read.
    pub database: DatabaseSpec,
    /// How long messages are kept, e.g. 30d or 12h (s, m, h or d); forever when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+(s|m|h|d)$"))]
    pub retention: Option<String>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DatabaseSpec {
    /// The Secret key holding the database URI, e.g. postgres://user:pass@host:5432/db. A CloudNativePG
    /// Cluster's `<cluster>-app` Secret has it under `uri`.
    pub secret_ref: SecretKeyRef,
}

fn default_source_language() -> String {
    "en".into()
}

fn default_drain_timeout() -> i64 {
    300
}

/// A key of a Secret in the ChatDeployment's namespace.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(length(min = 1))]
    pub name: String,
    /// Key in the Secret's data.
    #[schemars(length(min = 1))]
    pub key: String,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BrokerSpec {
    /// The Secret key holding the AMQP URI, e.g. amqp://user:pass@host:5672/vhost (amqps://…:5671 for TLS).
    pub secret_ref: SecretKeyRef,
    /// How an amqps:// broker's certificate is checked; against the system's roots when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<BrokerTlsSpec>,
    /// RabbitMQ's management API (its management plugin), e.g. http://rabbitmq.broker:15672, asked
    /// with the broker URI's user. Builtin autoscaling then counts the messages translators hold
    /// unacknowledged and whether any are being published, and can scale a language to zero once
    /// it is idle; without it a language with translators connected is never scaled to zero, since
    /// the AMQP protocol shows only ready messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub management_url: Option<String>,
}

/// TLS to the broker; an amqps:// URI is what turns it on.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BrokerTlsSpec {
    /// The Secret key holding the PEM bundle of the certificate authorities the broker's certificate
    /// is checked against; mounted read-only into every pod of the chat.
    pub ca_secret_ref: SecretKeyRef,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TranslationSpec {
    /// Which provider to call.
    pub provider: Provider,
    /// Base URL of the provider, e.g. http://libretranslate.translation:5000.
    #[schemars(length(min = 1))]
    pub url: String,
    /// Secret key holding the provider's API key, if it needs one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_secret_ref: Option<SecretKeyRef>,
}

/// One target language. Set `replicas` for a fixed count, `autoscaling` to scale on the queue
/// backlog, or neither to leave replicas to `kubectl scale` or an HPA.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "!has(self.replicas) || !has(self.autoscaling)",
    "message": "replicas and autoscaling are mutually exclusive"
}]))]
pub struct LanguageSpec {
    /// ISO 639-1 code of the target language, e.g. "de" or "pt-BR".
    #[schemars(regex(pattern = r"^[a-z]{2,3}(-[A-Za-z0-9]+)?$"))]
    pub code: String,
    /// Fixed translator replicas for this language.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub replicas: Option<i32>,
    /// Scale this language's translators on its queue backlog.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingSpec>,
}

/// Who scales a language's translators.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AutoscalingMode {
    /// The operator polls the queue and sets replicas itself.
    #[default]
    Builtin,
    /// The operator emits a KEDA ScaledObject (rabbitmq trigger) and KEDA scales.
    Keda,
}

/// Scaling bounds of one language.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "self.minReplicas <= self.maxReplicas",
    "message": "minReplicas must not exceed maxReplicas"
}]))]
pub struct AutoscalingSpec {
    /// builtin (default) or keda.
    #[serde(default)]
    pub mode: AutoscalingMode,
    /// Fewest replicas; 0 lets an idle language sleep until a message waits.
    #[serde(default = "default_min_replicas")]
    #[schemars(range(min = 0))]
    pub min_replicas: i32,
    /// Most replicas.
    #[schemars(range(min = 1))]
    pub max_replicas: i32,
    /// Waiting messages one replica is expected to handle.
    #[serde(default = "default_target_backlog")]
    #[schemars(range(min = 1))]
    pub target_backlog: i64,
    /// Seconds the backlog must stay low before replicas go down.
    #[serde(default = "default_stabilization")]
    #[schemars(range(min = 0))]
    pub scale_down_stabilization_seconds: i64,
}

fn default_min_replicas() -> i32 {
    1
}

fn default_target_backlog() -> i64 {
    100
}

fn default_stabilization() -> i64 {
    120
}

/// Replicas and pod settings of one role.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct RoleSpec {
    /// Replicas of this role (default 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub replicas: Option<i32>,
    #[serde(flatten)]
    pub overrides: RoleOverrides,
}

/// Pod settings a role may override.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RoleOverrides {
    /// Compute resources of the chat-server container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Node labels the pods must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
    /// Taints the pods tolerate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,
    /// Scheduling constraints of the pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// Extra labels on the pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    /// Extra annotations on the pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

/// Observed state, written by the operator.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ChatDeploymentStatus {
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Pending, Progressing, Ready or Degraded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// Ready, BrokerReady, GatewayReady, TranslatorsReady, FanoutReady.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// The gateway's replicas and in-cluster endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<GatewayStatus>,
    /// The fanout's replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fanout: Option<RoleStatus>,
    /// One entry per language, including removed languages whose queue is still draining.
    #[serde(default)]
    pub translators: Vec<TranslatorStatus>,
    /// The target languages, joined (`es,ca`), for `kubectl get chat`: a printer column's JSONPath
    /// over a list shows its first element only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub languages: Option<String>,
    /// Messages waiting over every language's queue, when the broker could be asked
    /// (`kubectl get chat -o wide`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backlog: Option<i64>,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Phase {
    Pending,
    Progressing,
    Ready,
    Degraded,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RoleStatus {
    /// Pods of the role's Deployment.
    pub replicas: i32,
    /// Pods passing their readiness probe.
    pub ready_replicas: i32,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GatewayStatus {
    /// Pods of the gateway Deployment.
    pub replicas: i32,
    /// Pods passing their readiness probe.
    pub ready_replicas: i32,
    /// host:port of the gateway Service inside the cluster.
    pub endpoint: String,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TranslatorStatus {
    /// The target language.
    pub language: String,
    /// Pods of the language's translator Deployment.
    pub replicas: i32,
    /// Pods passing their readiness probe.
    pub ready_replicas: i32,
    /// Messages waiting in the language's queue, when the broker could be asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backlog: Option<i64>,
    /// Set while a removed language's queue drains: when the removal was first seen (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub draining_since: Option<String>,
    /// Replicas the builtin autoscaler wants now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_replicas: Option<i32>,
    /// When the builtin autoscaler last changed the replicas (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_time: Option<String>,
}
