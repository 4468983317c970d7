//! The broker step: declare this ChatDeployment's topology, measure its queues, drain removed languages.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    future::Future,
    sync::Arc,
    time::Duration,
};

use lapin::{Connection, ConnectionProperties};
use parley_contract::topology::Topology;

use super::{
    autoscale::Load,
    observe::{Observed, SecretError},
    status::{BrokerReport, Draining},
    validate::ValidatedChat,
};
use crate::events::{Note, Reason};

/// How long connecting to a broker may take before it counts as unreachable.
pub const BROKER_TIMEOUT: Duration = Duration::from_secs(10);

/// How long one whole broker step (declare, look at every queue, drain) may take: a broker that
/// accepted the connection and then went quiet must not hold a reconcile up.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// How long one question to the broker's management API may take.
pub const MANAGEMENT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the broker step failed; [`BrokerError::reason`] is the BrokerReady condition reason.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    #[error("broker {0}")]
    Secret(#[from] SecretError),
    /// The CA bundle of `spec.broker.tls` cannot be read.
    #[error("broker CA bundle (broker.tls.caSecretRef): {0}")]
    Ca(SecretError),
    #[error("broker unreachable: {0}")]
    Unreachable(String),
    #[error("failed to declare the topology: {0}")]
    Topology(#[from] parley_contract::topology::TopologyError),
    #[error("failed to open a channel: {0}")]
    Channel(lapin::Error),
}

impl BrokerError {
    /// The reason for conditions and Events, also the metric label.
    pub fn reason(&self) -> Reason {
        match self {
            Self::Secret(SecretError::NotFound(_)) => Reason::BrokerSecretNotFound,
            Self::Secret(SecretError::KeyMissing { .. }) => Reason::BrokerSecretKeyMissing,
            Self::Ca(SecretError::NotFound(_)) => Reason::BrokerCaSecretNotFound,
            Self::Ca(SecretError::KeyMissing { .. }) => Reason::BrokerCaSecretKeyMissing,
            Self::Unreachable(_) | Self::Channel(_) => Reason::BrokerUnreachable,
            Self::Topology(_) => Reason::TopologyFailed,
        }
    }

    pub fn report(&self) -> BrokerReport {
        BrokerReport::Failed { reason: self.reason().as_str().into(), message: self.to_string() }
    }
}

/// Where a broker is and how its certificate is checked: its URI, and the CA bundle (PEM) of
/// `spec.broker.tls`, if any (the system's roots otherwise).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BrokerAddress {
    pub url: String,
    pub ca: Option<String>,
}

impl BrokerAddress {
    pub fn new(url: impl Into<String>, ca: Option<String>) -> Self {
        Self { url: url.into(), ca }
    }
}

async fn connect(address: &BrokerAddress) -> Result<Connection, BrokerError> {
    let url = address.url.as_str();
    let props = ConnectionProperties::default().with_connection_name("parley-operator".into());
    // An amqps:// URI is checked against the CA bundle when there is one, as the chat server does.
    let tls = lapin::tcp::OwnedTLSConfig { identity: None, cert_chain: address.ca.clone() };
    let runtime = lapin::runtime::default_runtime()
        .map_err(|err| BrokerError::Unreachable(super::observe::scrub(&err.to_string(), url)))?;
    match tokio::time::timeout(BROKER_TIMEOUT, Connection::connect_with_config(url, props, tls, runtime)).await {
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(err)) => Err(BrokerError::Unreachable(super::observe::scrub(&err.to_string(), url))),
        Err(_) => Err(BrokerError::Unreachable(format!("no answer within {BROKER_TIMEOUT:?}"))),
    }
}

/// One open connection per broker (and CA bundle), shared by every reconcile of the chats that use
/// it, instead of a new connection (and its handshake) per reconcile.
#[derive(Default)]
pub struct Brokers {
    connections: tokio::sync::Mutex<HashMap<BrokerAddress, Arc<Connection>>>,
    /// HTTP clients for management APIs, by the CA bundle they trust besides the system's roots.
    http: std::sync::Mutex<HashMap<Option<String>, reqwest::Client>>,
}

impl Brokers {
    /// The open connection to `address`, connecting (again) when there is none or it failed. The lock
    /// is not held while connecting: a broker that does not answer must not hold up the reconciles of
    /// chats on other brokers.
    async fn connection(&self, address: &BrokerAddress) -> Result<Arc<Connection>, BrokerError> {
        if let Some(open) = self.connections.lock().await.get(address).filter(|c| c.status().connected()) {
            return Ok(open.clone());
        }
        let connection = Arc::new(connect(address).await?);
        let mut connections = self.connections.lock().await;
        // Another reconcile may have connected meanwhile: keep one, close the other.
        if let Some(open) = connections.get(address).filter(|c| c.status().connected()).cloned() {
            drop(connections);
            let _ = tokio::time::timeout(Duration::from_secs(2), connection.close(200, "duplicate".into())).await;
            return Ok(open);
        }
        connections.insert(address.clone(), connection.clone());
        Ok(connection)
    }

    /// Runs `work` on the connection to `address`, bounded by [`STEP_TIMEOUT`]; a connection whose
    /// work timed out or failed is dropped, and the next step connects afresh.
    async fn with<T, F, Fut>(&self, address: &BrokerAddress, work: F) -> Result<T, BrokerError>
    where
        F: FnOnce(Arc<Connection>) -> Fut,
        Fut: Future<Output = Result<T, BrokerError>>,
    {
        let connection = self.connection(address).await?;
        let result = match tokio::time::timeout(STEP_TIMEOUT, work(connection.clone())).await {
            Ok(result) => result,
            Err(_) => Err(BrokerError::Unreachable(format!("the broker did not answer within {STEP_TIMEOUT:?}"))),
        };
        if result.is_err() {
            self.forget(address, &connection).await;
        }
        result
    }

    async fn forget(&self, address: &BrokerAddress, connection: &Arc<Connection>) {
        let mut connections = self.connections.lock().await;
        if connections.get(address).is_some_and(|c| Arc::ptr_eq(c, connection)) {
            connections.remove(address);
        }
        drop(connections);
        let _ = tokio::time::timeout(Duration::from_secs(2), connection.close(200, "failed".into())).await;
    }

    /// The HTTP client for a management API, trusting `ca` (the broker's CA bundle) besides the
    /// system's roots.
    fn http(&self, ca: Option<&String>) -> Result<reqwest::Client, String> {
        let mut clients = self.http.lock().expect("http clients lock");
        if let Some(client) = clients.get(&ca.cloned()) {
            return Ok(client.clone());
        }
        // reqwest takes the process's rustls provider; the binary installs ring at start, and this
        // does the same for a library user (a test) that did not.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder = reqwest::Client::builder().timeout(MANAGEMENT_TIMEOUT).connect_timeout(BROKER_TIMEOUT);
        if let Some(pem) = ca {
            let certificates = reqwest::Certificate::from_pem_bundle(pem.as_bytes())
                .map_err(|err| format!("the broker CA bundle is no PEM: {err}"))?;
            for certificate in certificates {
                builder = builder.add_root_certificate(certificate);
            }
        }
        let client = builder.build().map_err(|err| format!("no HTTP client for the management API: {err}"))?;
        clients.insert(ca.cloned(), client.clone());
        Ok(client)
    }

    /// The load of each of `queues` (language → queue name) from the management API at
    /// `management`, asked as the user of the broker URI, in its vhost. A language whose queue does
    /// not exist is left out.
    pub async fn management_loads(
        &self,
        address: &BrokerAddress,
        management: &str,
        queues: &BTreeMap<String, String>,
    ) -> Result<BTreeMap<String, Load>, String> {
        let url = address.url.as_str();
        let uri: lapin::uri::AMQPUri =
            url.parse().map_err(|err: String| format!("the broker URI: {}", super::observe::scrub(&err, url)))?;
        let user = &uri.authority.userinfo;
        let http = self.http(address.ca.as_ref())?;
        let base = url::Url::parse(management).map_err(|err| format!("{management}: {err}"))?;
        let mut loads = BTreeMap::new();
        for (language, queue) in queues {
            let mut at = base.clone();
            at.path_segments_mut().map_err(|()| format!("{management} cannot have a path"))?.pop_if_empty().extend([
                "api",
                "queues",
                uri.vhost.as_str(),
                queue.as_str(),
            ]);
            let answer = http
                .get(at.clone())
                .basic_auth(&user.username, Some(&user.password))
                .send()
                .await
                .map_err(|err| format!("{management}: {}", super::observe::scrub(&err.to_string(), url)))?;
            match answer.status() {
                reqwest::StatusCode::NOT_FOUND => continue,
                status if !status.is_success() => {
                    return Err(format!("{management} answered {status} for queue {queue}"));
                }
                _ => {}
            }
            let body = answer.bytes().await.map_err(|err| format!("{management}: {err}"))?;
            let info: QueueInfo = serde_json::from_slice(&body)
                .map_err(|err| format!("{management} sent no queue for {queue}: {err}"))?;
            loads.insert(language.clone(), info.load());
        }
        Ok(loads)
    }

    /// The load of each of `queues` (language → queue name) as AMQP's passive declare shows it, over
    /// the shared connection; a language whose queue does not exist is left out.
    pub async fn amqp_loads(
        &self,
        address: &BrokerAddress,
        queues: &BTreeMap<String, String>,
    ) -> Result<BTreeMap<String, Load>, BrokerError> {
        self.with(address, |connection| async move {
            let mut loads = BTreeMap::new();
            for (language, queue) in queues {
                // A missing queue closes the channel, so each look gets its own.
                let look = connection.create_channel().await.map_err(BrokerError::Channel)?;
                if let Some(depth) = parley_contract::topology::queue_depth(&look, queue).await? {
                    loads.insert(language.clone(), Load::ready(depth.messages.into(), depth.consumers.into()));
                }
            }
            Ok(loads)
        })
        .await
    }

    /// How many broker connections are open.
    pub async fn open(&self) -> usize {
        self.connections.lock().await.values().filter(|c| c.status().connected()).count()
    }
}

/// A queue as RabbitMQ's management API shows it (`GET /api/queues/VHOST/NAME`).
#[derive(Debug, serde::Deserialize)]
struct QueueInfo {
    #[serde(default)]
    messages_ready: i64,
    #[serde(default)]
    messages_unacknowledged: i64,
    #[serde(default)]
    consumers: i64,
    #[serde(default)]
    message_stats: Option<MessageStats>,
}

#[derive(Debug, serde::Deserialize)]
struct MessageStats {
    #[serde(default)]
    publish_details: Option<Rate>,
}

#[derive(Debug, serde::Deserialize)]
struct Rate {
    #[serde(default)]
    rate: f64,
}

impl QueueInfo {
    fn load(&self) -> Load {
        let publishing =
            self.message_stats.as_ref().and_then(|s| s.publish_details.as_ref()).is_some_and(|d| d.rate > 0.0);
        Load {
            ready: self.messages_ready,
            consumers: self.consumers,
            unacknowledged: Some(self.messages_unacknowledged),
            publishing,
        }
    }
}

/// What one sync did besides reporting.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct SyncOutcome {
    pub backlogs: BTreeMap<String, i64>,
    /// Each listed language queue's load, as AMQP shows it (ready messages and consumers).
    pub loads: BTreeMap<String, Load>,
    /// Removed languages whose queue was deleted this time, with the messages it still held (lost after a timeout).
    pub deleted: Vec<(String, i64)>,
    /// Removed languages still draining.
    pub draining: Vec<Draining>,
    /// Of those, the ones with no message ready whose translators are still connected: they may hold
    /// messages unacknowledged, so they are scaled to zero (handing those back) before the queue goes.
    pub idle: BTreeSet<String>,
}

/// Declares the topology for `languages`, reads every language queue's backlog, and deletes the
/// queues of removed languages once drained or once `drain_timeout` has passed since `since`.
/// Drained means no message ready and no translator connected (so none is held unacknowledged)
/// after its Deployment was scaled to zero, which `stopped` lists: a message a stopping translator
/// handed back has had a reconcile's time to reappear.
pub async fn sync(
    connection: &Connection,
    topology: &Topology,
    languages: &[String],
    (draining, stopped): (Vec<Draining>, &BTreeSet<String>),
    drain_timeout: Duration,
    elapsed: impl Fn(&str) -> Duration,
) -> Result<SyncOutcome, BrokerError> {
    // Every channel opened here is closed when dropped; the connection stays for the next reconcile.
    {
        let channel = connection.create_channel().await.map_err(BrokerError::Channel)?;
        parley_contract::topology::declare(&channel, topology, languages).await?;
        let mut outcome = SyncOutcome::default();
        for language in languages {
            // A missing queue closes the channel, so each look gets its own.
            let look = connection.create_channel().await.map_err(BrokerError::Channel)?;
            let depth = parley_contract::topology::queue_depth(&look, &topology.translate_queue(language)).await?;
            outcome.backlogs.insert(language.clone(), depth.map_or(0, |d| i64::from(d.messages)));
            let load = depth.map_or_else(Load::default, |d| Load::ready(d.messages.into(), d.consumers.into()));
            outcome.loads.insert(language.clone(), load);
        }
        for removed in draining {
            // Stop the removed language's queue from taking new messages, so it can drain.
            let unbind = connection.create_channel().await.map_err(BrokerError::Channel)?;
            parley_contract::topology::unbind_language(&unbind, topology, &removed.language).await?;
            let look = connection.create_channel().await.map_err(BrokerError::Channel)?;
            let depth =
                parley_contract::topology::queue_depth(&look, &topology.translate_queue(&removed.language)).await?;
            let timed_out = elapsed(&removed.since) >= drain_timeout;
            match depth {
                None => {}
                Some(depth)
                    if timed_out
                        || (depth.messages == 0 && depth.consumers == 0 && stopped.contains(&removed.language)) =>
                {
                    let delete = connection.create_channel().await.map_err(BrokerError::Channel)?;
                    parley_contract::topology::delete_language(&delete, topology, &removed.language, false).await?;
                    outcome.deleted.push((removed.language.clone(), i64::from(depth.messages)));
                }
                Some(depth) => {
                    if depth.messages == 0 {
                        outcome.idle.insert(removed.language.clone());
                    }
                    outcome.backlogs.insert(removed.language.clone(), i64::from(depth.messages));
                    outcome.draining.push(removed);
                }
            }
        }
        Ok(outcome)
    }
}

/// What the broker step found and did, for the steps after it.
#[derive(Debug)]
pub struct BrokerStep {
    pub report: BrokerReport,
    /// Removed languages still draining: every one of them when the broker could not be asked,
    /// since nothing is then known to have drained.
    pub draining: Vec<Draining>,
    /// Removed languages whose queue was deleted now, with the messages it still held.
    pub deleted: Vec<(String, i64)>,
    /// Draining languages to scale to zero: nothing is ready, and their translators may still hold
    /// messages (see [`SyncOutcome::idle`]).
    pub idle: BTreeSet<String>,
    /// Why the step failed; the reconcile is retried with backoff once everything else is applied.
    pub failure: Option<BrokerError>,
    /// The load of every listed language's queue, when the broker could be asked: from the management
    /// API for builtin-autoscaled languages when `broker.managementUrl` is set and answered.
    pub loads: Option<BTreeMap<String, Load>>,
    /// Why the management API could not be asked (the loads are then AMQP's).
    pub management_failure: Option<String>,
}

impl BrokerStep {
    /// The Events this step has to say: queues deleted, and the failure.
    pub fn notes(&self) -> Vec<Note> {
        let mut notes: Vec<Note> = self
            .deleted
            .iter()
            .map(|(language, lost)| match lost {
                0 => Note::normal(
                    Reason::LanguageQueueDeleted,
                    format!("deleted the drained queue of removed language {language}"),
                ),
                lost => Note::warning(
                    Reason::LanguageQueueDeleted,
                    format!(
                        "deleted the queue of removed language {language} after the drain timeout with {lost} messages untranslated"
                    ),
                ),
            })
            .collect();
        notes.extend(self.failure.iter().map(|err| Note::warning(err.reason(), err.to_string())));
        notes.extend(self.management_failure.iter().map(|err| {
            Note::warning(
                Reason::ManagementApiFailed,
                format!("{err}; until it answers, no language with translators connected is scaled to zero"),
            )
        }));
        notes
    }
}

/// The broker step of one reconcile: [`sync`] with the observed broker Secret, `draining` being the
/// removed languages the previous status still listed.
pub async fn step(
    brokers: &Brokers,
    observed: &Observed,
    chat: &ValidatedChat,
    draining: Vec<Draining>,
    elapsed: impl Fn(&str) -> Duration,
) -> BrokerStep {
    let address = observed.broker_url().map_err(BrokerError::from).and_then(|url| match observed.broker_ca() {
        None => Ok(BrokerAddress::new(url, None)),
        Some(Ok(ca)) => Ok(BrokerAddress::new(url, Some(ca))),
        Some(Err(err)) => Err(BrokerError::Ca(err)),
    });
    let address = match address {
        Ok(address) => address,
        Err(err) => return BrokerStep::failed(err, draining),
    };
    let drain_timeout = Duration::from_secs(chat.drain_timeout_seconds.max(0) as u64);
    // Removed languages whose translators are scaled to zero (or gone).
    let stopped: BTreeSet<String> = draining
        .iter()
        .filter(|d| observed.translator_replicas.get(&d.language).is_none_or(|r| *r == 0))
        .map(|d| d.language.clone())
        .collect();
    let removed = (draining.clone(), &stopped);
    let languages = chat.language_codes();
    let synced = brokers
        .with(&address, |connection| async move {
            sync(&connection, &chat.topology, &languages, removed, drain_timeout, elapsed).await
        })
        .await;
    let mut outcome = match synced {
        Ok(outcome) => outcome,
        Err(err) => return BrokerStep::failed(err, draining),
    };
    let mut management_failure = None;
    if let Some(management) = &chat.management_url {
        let queues = autoscaled_queues(chat);
        match brokers.management_loads(&address, management, &queues).await {
            Ok(loads) => outcome.loads.extend(loads),
            Err(err) => management_failure = Some(err),
        }
    }
    BrokerStep {
        report: BrokerReport::Ready { backlogs: outcome.backlogs },
        draining: outcome.draining,
        deleted: outcome.deleted,
        idle: outcome.idle,
        failure: None,
        loads: Some(outcome.loads),
        management_failure,
    }
}

/// The queue of every language in builtin autoscaling, by language.
pub fn autoscaled_queues(chat: &ValidatedChat) -> BTreeMap<String, String> {
    chat.languages
        .iter()
        .filter(|l| matches!(l.scaling, super::validate::Scaling::Builtin(_)))
        .map(|l| (l.code.clone(), chat.topology.translate_queue(&l.code)))
        .collect()
}

impl BrokerStep {
    fn failed(err: BrokerError, draining: Vec<Draining>) -> Self {
        Self {
            report: err.report(),
            draining,
            deleted: Vec::new(),
            idle: BTreeSet::new(),
            failure: Some(err),
            loads: None,
            management_failure: None,
        }
    }
}

/// Deletes every exchange and queue of the topology (the finalizer's work).
pub async fn remove(
    brokers: &Brokers,
    address: &BrokerAddress,
    topology: &Topology,
    languages: &[String],
) -> Result<(), BrokerError> {
    brokers
        .with(address, |connection| async move {
            let channel = connection.create_channel().await.map_err(BrokerError::Channel)?;
            parley_contract::topology::delete_all(&channel, topology, languages).await?;
            Ok(())
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_broken_broker_uri_never_shows_its_password() {
        for uri in
            ["guest:s3cret@127.0.0.1:1/%2f", "amqp//guest:s3cret@127.0.0.1:1", "amqp://guest:s3cret@127.0.0.1:1/%2f"]
        {
            let Err(err) = connect(&BrokerAddress::new(uri, None)).await else { panic!("nothing listens there") };
            let text = err.to_string();
            assert!(!text.contains("s3cret"), "{uri}: {text}");
        }
    }
}
