//! Observe: read, once per reconcile, what the later steps need from the cluster: the referenced
//! Secrets, the replicas of the owned translator Deployments, and whether KEDA and the Prometheus
//! Operator are installed.

use std::collections::BTreeMap;

use k8s_openapi::api::{apps::v1::Deployment, core::v1::Secret};
use kube::{api::ListParams, Api, Client, ResourceExt};

use super::validate::ValidatedChat;
use crate::{crd::SecretKeyRef, keda::ScaledObject, monitoring::PodMonitor, names::LANGUAGE_LABEL};

/// A referenced Secret key that is not there.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("Secret {0} not found")]
    NotFound(String),
    #[error("Secret {secret} has no key {key}")]
    KeyMissing { secret: String, key: String },
}

/// What the cluster holds for one ChatDeployment.
#[derive(Debug, Clone)]
pub struct Observed {
    /// The broker URI's Secret value, as stored.
    pub broker_secret: Result<Vec<u8>, SecretError>,
    /// The provider's API key from its Secret, when the spec references one.
    pub api_key: Option<Result<Vec<u8>, SecretError>>,
    /// The history database's URI from its Secret, when the spec keeps a history.
    pub history_secret: Option<Result<Vec<u8>, SecretError>>,
    /// The gateway's HS256 secret, in auth mode jwt.
    pub jwt_secret: Option<Result<Vec<u8>, SecretError>>,
    /// The broker's CA bundle (PEM), when the spec names one.
    pub broker_ca: Option<Result<Vec<u8>, SecretError>>,
    /// The replicas each owned translator Deployment has now, by language.
    pub translator_replicas: BTreeMap<String, i32>,
    /// Whether the KEDA CRDs are installed (asked once per operator process).
    pub keda_installed: bool,
    /// Whether PodMonitors can be made: the Prometheus Operator's CRD installed and the operator
    /// allowed to (asked every reconcile, so one installed later is found without a restart).
    pub pod_monitors: Served,
}

/// Whether the API server serves an optional custom resource to the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Served {
    Yes,
    /// Its CRD is not installed.
    NotInstalled,
    /// Installed, maybe, but the operator's RBAC does not cover it (the API server says 403 before it
    /// looks): an operator upgraded ahead of its ClusterRole, or RBAC managed by hand.
    Forbidden(String),
}

impl Served {
    pub fn yes(&self) -> bool {
        *self == Self::Yes
    }
}

impl Observed {
    /// The history database's URI, trimmed, when the spec keeps a history.
    pub fn history_url(&self) -> Option<Result<String, SecretError>> {
        self.history_secret.clone().map(|secret| secret.map(|bytes| String::from_utf8_lossy(&bytes).trim().to_owned()))
    }

    /// The broker URI, trimmed.
    pub fn broker_url(&self) -> Result<String, SecretError> {
        self.broker_secret.clone().map(|bytes| String::from_utf8_lossy(&bytes).trim().to_owned())
    }

    /// The broker's CA bundle (PEM), when the spec names one.
    pub fn broker_ca(&self) -> Option<Result<String, SecretError>> {
        self.broker_ca.clone().map(|secret| secret.map(|bytes| String::from_utf8_lossy(&bytes).into_owned()))
    }

    /// A digest of the referenced Secrets' data (or of what is missing), so pods roll when a credential
    /// changes. Keyed (HMAC-SHA256 with `key`, which the operator keeps in its own Secret): anyone who can
    /// read the Deployments sees the digest, and an unkeyed hash of a password would let them test
    /// guesses offline.
    pub fn secrets_digest(&self, key: &[u8]) -> String {
        let mut hasher = ring::hmac::Context::with_key(&ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key));
        let broker = self.broker_secret.as_ref().map(Vec::as_slice);
        let api_key = self.api_key.as_ref().map(|key| key.as_ref().map(Vec::as_slice));
        let history = self.history_secret.as_ref().map(|url| url.as_ref().map(Vec::as_slice));
        // Absent parts add nothing: a chat that references neither keeps the digest it had.
        let jwt = self.jwt_secret.as_ref().map(|secret| secret.as_ref().map(Vec::as_slice));
        let ca = self.broker_ca.as_ref().map(|ca| ca.as_ref().map(Vec::as_slice));
        for part in std::iter::once(broker).chain(api_key).chain(history).chain(jwt).chain(ca) {
            match part {
                Ok(bytes) => hasher.update(bytes),
                Err(err) => hasher.update(err.to_string().as_bytes()),
            }
            hasher.update(&[0]);
        }
        hasher.sign().as_ref().iter().take(8).map(|b| format!("{b:02x}")).collect()
    }
}

/// A read of [`observe`] that failed, and which one.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct ReadError {
    pub what: String,
    #[source]
    pub source: kube::Error,
}

/// Names the read an API error came from.
fn reading(what: impl FnOnce() -> String) -> impl FnOnce(kube::Error) -> ReadError {
    move |source| ReadError { what: what(), source }
}

/// Reads everything in one pass. An API error fails the whole step: hashing a transient read failure
/// into the pod template would roll every pod twice.
pub async fn observe(
    client: &Client,
    chat: &ValidatedChat,
    keda: &tokio::sync::OnceCell<bool>,
) -> Result<Observed, ReadError> {
    let namespace = &chat.names.namespace;
    let secret = |reference: &SecretKeyRef| {
        let name = reference.name.clone();
        reading(move || format!("reading the Secret {namespace}/{name}"))
    };
    let broker_secret = secret_value(client, namespace, &chat.broker).await.map_err(secret(&chat.broker))?;
    let api_key = match &chat.api_key {
        Some(reference) => Some(secret_value(client, namespace, reference).await.map_err(secret(reference))?),
        None => None,
    };
    let history_secret = match &chat.history {
        Some(history) => {
            Some(secret_value(client, namespace, &history.database).await.map_err(secret(&history.database))?)
        }
        None => None,
    };
    let jwt_secret = match &chat.auth.jwt_secret {
        Some(reference) => Some(secret_value(client, namespace, reference).await.map_err(secret(reference))?),
        None => None,
    };
    let broker_ca = match &chat.broker_ca {
        Some(reference) => Some(secret_value(client, namespace, reference).await.map_err(secret(reference))?),
        None => None,
    };
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    let translator_replicas = deployments
        .list(&ListParams::default().labels(&chat.names.owned_selector()))
        .await
        .map_err(reading(|| format!("listing the Deployments of {namespace}/{}", chat.names.instance)))?
        .items
        .into_iter()
        .filter_map(|d| {
            let language = d.labels().get(LANGUAGE_LABEL).cloned()?;
            Some((language, d.spec.and_then(|s| s.replicas)?))
        })
        .collect();
    // Asked once per process, whether or not a language uses KEDA now: objects left from a language
    // that did are pruned only where the CRDs exist.
    let keda_installed = *keda
        .get_or_try_init(|| keda_installed(client, namespace))
        .await
        .map_err(reading(|| "asking whether KEDA's ScaledObjects are served".to_owned()))?;
    let pod_monitors = served::<PodMonitor>(client, namespace)
        .await
        .map_err(reading(|| "asking whether PodMonitors are served".to_owned()))?;
    Ok(Observed {
        broker_secret,
        api_key,
        history_secret,
        jwt_secret,
        broker_ca,
        translator_replicas,
        keda_installed,
        pod_monitors,
    })
}

/// A Secret key's value; `Ok(Err(..))` when the Secret or the key does not exist.
pub async fn secret_value(
    client: &Client,
    namespace: &str,
    reference: &SecretKeyRef,
) -> Result<Result<Vec<u8>, SecretError>, kube::Error> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let Some(secret) = secrets.get_opt(&reference.name).await? else {
        return Ok(Err(SecretError::NotFound(reference.name.clone())));
    };
    Ok(secret
        .data
        .and_then(|mut data| data.remove(&reference.key))
        .map(|bytes| bytes.0)
        .ok_or_else(|| SecretError::KeyMissing { secret: reference.name.clone(), key: reference.key.clone() }))
}

/// Whether the KEDA CRDs are installed in the cluster.
async fn keda_installed(client: &Client, namespace: &str) -> Result<bool, kube::Error> {
    served::<ScaledObject>(client, namespace).await.map(|served| served.yes())
}

/// Whether the API server serves the custom resource `K` to the operator.
async fn served<K>(client: &Client, namespace: &str) -> Result<Served, kube::Error>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    match api.list(&ListParams::default().limit(1)).await {
        Ok(_) => Ok(Served::Yes),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(Served::NotInstalled),
        Err(kube::Error::Api(e)) if e.code == 403 => Ok(Served::Forbidden(e.message)),
        Err(err) => Err(err),
    }
}

/// `text` with the password of `uri` (a connection URI read from a Secret) masked, however malformed
/// the URI: error messages from a client library may quote it whole, and they reach status, Events
/// and logs.
pub(crate) fn scrub(text: &str, uri: &str) -> String {
    let password = uri.rfind('@').and_then(|at| uri[..at].rsplit_once(':')).map(|(_, password)| password);
    match password {
        Some(password) if !password.is_empty() && !password.starts_with("//") => text.replace(password, "***"),
        _ => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use sha2::Digest as _;

    use super::*;

    fn observed(broker: &[u8]) -> Observed {
        Observed {
            broker_secret: Ok(broker.to_vec()),
            api_key: None,
            history_secret: None,
            jwt_secret: None,
            broker_ca: None,
            translator_replicas: BTreeMap::new(),
            keda_installed: false,
            pod_monitors: Served::NotInstalled,
        }
    }

    #[test]
    fn the_secrets_digest_is_keyed_and_follows_the_secret() {
        let uri = b"amqp://parley:hunter2@rabbitmq:5672/%2f";
        let digest = observed(uri).secrets_digest(b"key one");
        assert_eq!(digest, observed(uri).secrets_digest(b"key one"), "stable for one key");
        assert_ne!(digest, observed(uri).secrets_digest(b"key two"), "no use without the key");
        assert_ne!(digest, observed(b"amqp://parley:hunter3@rabbitmq:5672/%2f").secrets_digest(b"key one"));
        let unkeyed: String =
            sha2::Sha256::digest([uri.as_slice(), &[0]].concat()).iter().take(8).map(|b| format!("{b:02x}")).collect();
        assert_ne!(digest, unkeyed, "not the plain hash a guess could be checked against");
    }

    #[test]
    fn the_secrets_digest_follows_the_jwt_secret_and_the_broker_ca() {
        let uri = b"amqp://parley:hunter2@rabbitmq:5672/%2f";
        let with = |jwt: Option<&[u8]>, ca: Option<&[u8]>| Observed {
            jwt_secret: jwt.map(|j| Ok(j.to_vec())),
            broker_ca: ca.map(|c| Ok(c.to_vec())),
            ..observed(uri)
        };
        let plain = observed(uri).secrets_digest(b"key");
        assert_eq!(with(None, None).secrets_digest(b"key"), plain, "nothing referenced: the digest is unchanged");
        let jwt = with(Some(b"one secret of at least 32 bytes!"), None).secrets_digest(b"key");
        assert_ne!(jwt, plain);
        assert_ne!(with(Some(b"another secret of 32 bytes or so"), None).secrets_digest(b"key"), jwt);
        let ca = with(None, Some(b"-----BEGIN CERTIFICATE-----")).secrets_digest(b"key");
        assert_ne!(ca, plain);
        assert_ne!(with(None, Some(b"-----BEGIN CERTIFICATE-----\n")).secrets_digest(b"key"), ca);
        let missing = Observed { jwt_secret: Some(Err(SecretError::NotFound("jwt".into()))), ..observed(uri) };
        assert_ne!(missing.secrets_digest(b"key"), plain, "a Secret that goes missing counts too");
    }
}
