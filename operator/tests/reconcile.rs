//! The reconcile pipeline against an in-memory API server (kube-fake-client) and the real RabbitMQ.

use std::{
    sync::atomic::{AtomicU32, Ordering},
    sync::Arc,
    time::Duration,
};

use k8s_openapi::{
    api::{
        apps::v1::{Deployment, DeploymentStatus},
        core::v1::{ConfigMap, EnvVar, Pod, Secret, Service},
        events::v1::Event,
        networking::v1::NetworkPolicy,
        policy::v1::PodDisruptionBudget,
    },
    apimachinery::pkg::{apis::meta::v1::Time, util::intstr::IntOrString},
    ByteString,
};
use kube::{
    api::{ListParams, ObjectMeta, Patch, PatchParams},
    runtime::{controller::Action, events::Reporter},
    Api, Client, Resource, ResourceExt,
};
use lapin::{Connection, ConnectionProperties};
use parley_contract::topology::Topology;
use parley_operator::{
    controller::{error_policy, reconcile},
    crd::{
        AuthMode, AuthSpec, AutoscalingMode, AutoscalingSpec, BrokerTlsSpec, ChatDeployment, DatabaseSpec, HistorySpec,
        LanguageSpec, Phase, SecretKeyRef,
    },
    fixtures::{self, NAME},
    keda::{ScaledObject, TriggerAuthentication},
    metrics::Metrics,
    monitoring::PodMonitor,
    names::FINALIZER,
    reconcile::{
        apply::{applies_replicas, REPLICAS_HANDOFF_MANAGER},
        Context, Error, Settings,
    },
};

fn amqp_url() -> String {
    std::env::var("PARLEY_TEST_AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// A namespace no other test (or earlier run) uses, so broker topologies never collide.
fn unique_namespace() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    format!("t{nanos:x}{}", COUNTER.fetch_add(1, Ordering::Relaxed))
}

fn chat(namespace: &str, languages: &[(&str, i32)]) -> ChatDeployment {
    let languages: Vec<(&str, Option<i32>)> =
        languages.iter().map(|(code, replicas)| (*code, Some(*replicas))).collect();
    let mut chat = fixtures::chat(&languages);
    chat.metadata.namespace = Some(namespace.into());
    // kube-fake-client 0.3 rejects a JSON-patch `test` of an absent /metadata/finalizers, which a real
    // API server treats as null; a second finalizer keeps the path present so the real code path runs.
    chat.metadata.finalizers = Some(vec![HOLD.into()]);
    chat
}

const HOLD: &str = "test.parley.dev/hold";

fn ours(chat: &ChatDeployment) -> bool {
    chat.finalizers().iter().any(|f| f == FINALIZER)
}

fn secret(namespace: &str, uri: &str) -> Secret {
    secret_named(namespace, "rabbitmq", uri)
}

/// A Secret whose key `uri` holds `uri`.
fn secret_named(namespace: &str, name: &str, uri: &str) -> Secret {
    Secret {
        metadata: ObjectMeta { name: Some(name.into()), namespace: Some(namespace.into()), ..Default::default() },
        data: Some([("uri".to_owned(), ByteString(uri.as_bytes().to_vec()))].into()),
        ..Default::default()
    }
}

mod recorder;

struct Harness {
    client: Client,
    recorder: recorder::Recorder,
    ctx: Arc<Context>,
    namespace: String,
    /// The reconciles' clock, moved by hand where a test needs time to pass.
    clock: Arc<fixtures::TestClock>,
}

/// Every language a test here uses.
const TEST_LANGUAGES: [&str; 5] = ["de", "fr", "it", "es", "ca"];

impl Drop for Harness {
    /// Deletes whatever topology the test's reconciles declared, so a run does not pile up quorum
    /// queues on the broker (each holds file handles) until `scripts/test` drops the vhost.
    fn drop(&mut self) {
        let namespace = std::mem::take(&mut self.namespace);
        // Drop runs inside the test's runtime, which cannot block on its own futures.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async {
                let Ok(topology) = Topology::for_chat_deployment(&namespace, NAME) else { return };
                if let Ok(connection) = Connection::connect(&amqp_url(), ConnectionProperties::default()).await {
                    if let Ok(channel) = connection.create_channel().await {
                        let _ = parley_contract::topology::delete_all(&channel, &topology, &TEST_LANGUAGES).await;
                    }
                }
            })
        })
        .join();
    }
}

impl Harness {
    async fn new(chat: ChatDeployment, broker_uri: &str) -> Self {
        Self::build(chat, broker_uri, |builder| builder).await
    }

    /// An API server that also serves KEDA's ScaledObject and TriggerAuthentication.
    async fn with_keda(chat: ChatDeployment, broker_uri: &str) -> Self {
        Self::build(chat, broker_uri, |b| b.with_resource::<ScaledObject>().with_resource::<TriggerAuthentication>())
            .await
    }

    /// An API server that serves every optional CRD the operator uses: KEDA's and the Prometheus Operator's.
    async fn with_optional_crds(chat: ChatDeployment, broker_uri: &str) -> Self {
        Self::build(chat, broker_uri, |b| {
            b.with_resource::<ScaledObject>().with_resource::<TriggerAuthentication>().with_resource::<PodMonitor>()
        })
        .await
    }

    /// An API server that also serves the Prometheus Operator's PodMonitor.
    async fn with_prometheus_operator(chat: ChatDeployment, broker_uri: &str) -> Self {
        Self::build(chat, broker_uri, |b| b.with_resource::<PodMonitor>()).await
    }

    /// A harness whose API server serves what `crds` adds to the built-in kinds and ChatDeployment.
    async fn build(
        chat: ChatDeployment,
        broker_uri: &str,
        crds: impl FnOnce(kube_fake_client::ClientBuilder) -> kube_fake_client::ClientBuilder,
    ) -> Self {
        let namespace = chat.namespace().unwrap();
        let builder = crds(kube_fake_client::ClientBuilder::new());
        let client = builder
            .with_resource::<ChatDeployment>()
            .with_status_subresource::<ChatDeployment>()
            .with_status_subresource::<Deployment>()
            .with_object(secret(&namespace, broker_uri))
            .with_object(chat)
            .build()
            .await
            .unwrap();
        // Only the operator's own requests are recorded; the harness reads and writes around it.
        let recorder = recorder::Recorder::default();
        let operator_client = recorder.wrap(client.clone());
        let reporter = Reporter { controller: "parley-operator".into(), instance: Some("test".into()) };
        let settings = Settings::new("ghcr.io/parley/chat-server:test");
        let clock = Arc::new(fixtures::TestClock::default());
        let ctx = Context::new(operator_client, reporter, Arc::new(Metrics::default()), settings);
        let ctx = Arc::new(ctx.with_clock(clock.clone()));
        Self { client, recorder, ctx, namespace, clock }
    }

    fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    async fn chat(&self) -> ChatDeployment {
        self.api::<ChatDeployment>().get(NAME).await.unwrap()
    }

    /// Reconciles the stored object until the finalizer is in place and the steps ran once.
    async fn reconcile(&self) -> Result<Action, Error> {
        let first = reconcile(Arc::new(self.chat().await), self.ctx.clone()).await;
        let chat = self.api::<ChatDeployment>().get_opt(NAME).await.unwrap();
        match chat {
            Some(chat)
                if first.is_ok()
                    && chat.meta().deletion_timestamp.is_none()
                    && chat.status.is_none()
                    && ours(&chat) =>
            {
                reconcile(Arc::new(chat), self.ctx.clone()).await
            }
            _ => first,
        }
    }

    async fn deployments(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .api::<Deployment>()
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .iter()
            .map(ResourceExt::name_any)
            .collect();
        names.sort();
        names
    }

    async fn edit(&self, change: impl FnOnce(&mut ChatDeployment)) {
        let mut chat = self.chat().await;
        change(&mut chat);
        self.api::<ChatDeployment>().replace(NAME, &Default::default(), &chat).await.unwrap();
    }

    /// Every Event as (type, reason, note).
    async fn events(&self) -> Vec<(String, String, String)> {
        self.api::<Event>()
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .map(|e| (e.type_.unwrap_or_default(), e.reason.unwrap_or_default(), e.note.unwrap_or_default()))
            .collect()
    }

    async fn event_reasons(&self) -> Vec<String> {
        self.events().await.into_iter().map(|(_, reason, _)| reason).filter(|r| !r.is_empty()).collect()
    }

    fn topology(&self) -> Topology {
        Topology::for_chat_deployment(&self.namespace, NAME).unwrap()
    }

    async fn mark_ready(&self, name: &str) {
        let deployment = self.api::<Deployment>().get(name).await.unwrap();
        let desired = deployment.spec.as_ref().unwrap().replicas.unwrap();
        let status = DeploymentStatus {
            // The fake bumps generation on every apply, even one that changes nothing (a real API server
            // does not), so the simulated Deployment controller reports itself well ahead.
            observed_generation: deployment.metadata.generation.map(|g| g + 1000),
            replicas: Some(desired),
            ready_replicas: Some(desired),
            updated_replicas: Some(desired),
            ..Default::default()
        };
        let patch = serde_json::json!({"status": status});
        self.api::<Deployment>().patch_status(name, &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    }
}

/// Messages ready in `queue`, `None` when it does not exist.
async fn depth(queue: &str) -> Option<u32> {
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default()).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    parley_contract::topology::queue_depth(&channel, queue).await.unwrap().map(|d| d.messages)
}

async fn queue_exists(queue: &str) -> bool {
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default()).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    parley_contract::topology::queue_depth(&channel, queue).await.unwrap().is_some()
}

fn postgres_url() -> String {
    std::env::var("PARLEY_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres:postgres@127.0.0.1:5432/postgres".into())
}

/// `chat` keeping its history in the database the Secret `chat-db-app` names, for 30 days.
fn with_history(mut chat: ChatDeployment) -> ChatDeployment {
    chat.spec.history = Some(HistorySpec {
        database: DatabaseSpec { secret_ref: SecretKeyRef { name: "chat-db-app".into(), key: "uri".into() } },
        retention: Some("30d".into()),
    });
    chat
}

fn env_names(deployment: &Deployment) -> Vec<String> {
    let container = &deployment.spec.as_ref().unwrap().template.spec.as_ref().unwrap().containers[0];
    container.env.iter().flatten().map(|e| e.name.clone()).collect()
}

fn condition(chat: &ChatDeployment, kind: &str) -> (String, String) {
    let c = chat.status.as_ref().unwrap().conditions.iter().find(|c| c.type_ == kind).unwrap();
    (c.status.clone(), c.reason.clone())
}

#[tokio::test]
async fn create_applies_owned_labelled_objects_declares_the_topology_and_adds_the_finalizer() {
    let h = Harness::new(chat(&unique_namespace(), &[("de", 1), ("fr", 2)]), &amqp_url()).await;

    h.reconcile().await.unwrap();

    assert_eq!(
        h.deployments().await,
        vec!["town-hall-fanout", "town-hall-gateway", "town-hall-translator-de", "town-hall-translator-fr"]
    );
    let chat = h.chat().await;
    assert!(ours(&chat));
    for deployment in h.api::<Deployment>().list(&ListParams::default()).await.unwrap() {
        let owner = &deployment.owner_references()[0];
        assert_eq!((owner.kind.as_str(), owner.uid.as_str()), ("ChatDeployment", chat.uid().unwrap().as_str()));
        assert_eq!(deployment.labels()["chat.parley.dev/deployment"], NAME);
    }
    assert!(h.api::<Service>().get_opt("town-hall-gateway").await.unwrap().is_some());
    assert!(h.api::<PodDisruptionBudget>().get_opt("town-hall-gateway").await.unwrap().is_some());
    assert!(h.api::<ConfigMap>().get_opt("town-hall-config").await.unwrap().is_some());
    assert_eq!(condition(&chat, "BrokerReady").0, "True");
    assert_eq!(chat.status.as_ref().unwrap().phase, Some(Phase::Progressing));
    assert!(queue_exists(&h.topology().translate_queue("fr")).await);
    assert!(queue_exists(&h.topology().fanout_queue()).await);
}

#[tokio::test]
async fn a_removed_language_has_its_deployment_pruned_and_its_empty_queue_deleted() {
    let h = Harness::new(chat(&unique_namespace(), &[("de", 1), ("fr", 1)]), &amqp_url()).await;
    h.reconcile().await.unwrap();

    h.edit(|c| c.spec.languages.retain(|l| l.code == "de")).await;
    h.reconcile().await.unwrap();
    assert!(queue_exists(&h.topology().translate_queue("fr")).await, "its translators are stopped first");
    h.reconcile().await.unwrap();

    assert!(!h.deployments().await.contains(&"town-hall-translator-fr".to_owned()));
    assert!(!queue_exists(&h.topology().translate_queue("fr")).await, "an empty queue is deleted once they are");
    assert!(queue_exists(&h.topology().translate_queue("de")).await);
    assert!(h.event_reasons().await.contains(&"Pruned".to_owned()));
    let deleted: Vec<(String, String, String)> =
        h.events().await.into_iter().filter(|(_, reason, _)| reason == "LanguageQueueDeleted").collect();
    assert_eq!(deleted.len(), 1, "{deleted:?}");
    assert_eq!(deleted[0].0, "Normal", "nothing was lost");
    assert!(deleted[0].2.contains("deleted the drained queue of removed language fr"), "{deleted:?}");
}

#[tokio::test]
async fn a_removed_languages_translators_go_to_zero_before_its_queue_so_no_message_they_hold_is_lost() {
    let h = Harness::new(chat(&unique_namespace(), &[("de", 1), ("fr", 1)]), &amqp_url()).await;
    h.reconcile().await.unwrap();
    // A translator of fr holds one message, unacknowledged: the queue shows none ready.
    publish_posted(&h.topology(), 1).await;
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default()).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    let queue = h.topology().translate_queue("fr");
    let mut consumer =
        channel.basic_consume(queue.as_str().into(), "".into(), Default::default(), Default::default()).await.unwrap();
    let held = futures_util::StreamExt::next(&mut consumer).await.unwrap().unwrap();
    assert_eq!(depth(&queue).await, Some(0));

    h.edit(|c| c.spec.languages.retain(|l| l.code == "de")).await;
    h.reconcile().await.unwrap();
    assert!(queue_exists(&queue).await, "not deleted while a translator may hold messages");
    let translator = h.api::<Deployment>().get("town-hall-translator-fr").await.unwrap();
    assert_eq!(translator.spec.unwrap().replicas, Some(0), "its translators are stopped first");

    // Stopping hands the message back; the language then translates it before its queue goes.
    drop(held);
    connection.close(200, "stopped".into()).await.unwrap();
    while depth(&queue).await != Some(1) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    h.reconcile().await.unwrap();
    assert_eq!(depth(&queue).await, Some(1), "the message handed back is still there");
    let translator = h.api::<Deployment>().get("town-hall-translator-fr").await.unwrap();
    assert_eq!(translator.spec.unwrap().replicas, Some(1), "and a translator comes back for it");

    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default()).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    let got = channel.basic_get(queue.as_str().into(), Default::default()).await.unwrap().unwrap();
    got.ack(Default::default()).await.unwrap();
    connection.close(200, "translated".into()).await.unwrap();
    h.reconcile().await.unwrap();
    let translator = h.api::<Deployment>().get("town-hall-translator-fr").await.unwrap();
    assert_eq!(translator.spec.unwrap().replicas, Some(0), "stopped again once nothing is ready");
    assert!(queue_exists(&queue).await);
    h.reconcile().await.unwrap();
    assert!(!queue_exists(&queue).await, "drained, with no translator left: the queue is deleted");
    assert!(!h.deployments().await.contains(&"town-hall-translator-fr".to_owned()));
    let deleted: Vec<_> = h.events().await.into_iter().filter(|(_, r, _)| r == "LanguageQueueDeleted").collect();
    assert_eq!(deleted[0].0, "Normal", "nothing was lost: {deleted:?}");
}

#[tokio::test]
async fn a_language_declared_before_a_lost_status_write_is_still_drained_when_removed() {
    let h = Harness::new(chat(&unique_namespace(), &[("de", 1), ("fr", 1)]), &amqp_url()).await;
    h.reconcile().await.unwrap();
    assert!(queue_exists(&h.topology().translate_queue("fr")).await);
    // The status that listed fr was never written (the API server refused it, say).
    let lost = serde_json::json!({"status": {"translators": []}});
    h.api::<ChatDeployment>().patch_status(NAME, &PatchParams::default(), &Patch::Merge(&lost)).await.unwrap();

    h.edit(|c| c.spec.languages.retain(|l| l.code == "de")).await;
    h.reconcile().await.unwrap();
    h.reconcile().await.unwrap();

    assert!(!queue_exists(&h.topology().translate_queue("fr")).await, "its queue is found and deleted");
    let chat = h.chat().await;
    assert_eq!(chat.annotations()["chat.parley.dev/declared-languages"], "de", "and no longer recorded");
}

#[tokio::test]
async fn a_reconcile_that_finds_nothing_changed_writes_nothing() {
    let h = Harness::new(chat(&unique_namespace(), &[("de", 1), ("fr", 2)]), &amqp_url()).await;
    h.reconcile().await.unwrap();
    for name in h.deployments().await {
        h.mark_ready(&name).await;
    }
    // Converges: the status takes in the ready replicas.
    h.reconcile().await.unwrap();
    let gateway = format!("parley_operator_gateway_ready_replicas{{namespace=\"{}\",chat=\"{NAME}\"}} 2", h.namespace);
    assert!(h.ctx.metrics.encode().contains(&gateway), "{}", h.ctx.metrics.encode());
    let before = h.recorder.requests().len();

    h.reconcile().await.unwrap();

    let writes: Vec<String> =
        h.recorder.requests()[before..].iter().filter(|r| !r.starts_with("GET")).cloned().collect();
    assert!(writes.is_empty(), "an idle chat's reconcile writes nothing: {writes:?}");
    // A change is still applied.
    h.edit(|c| c.spec.languages[0].replicas = Some(3)).await;
    h.reconcile().await.unwrap();
    let deployment = h.api::<Deployment>().get("town-hall-translator-de").await.unwrap();
    assert_eq!(deployment.spec.unwrap().replicas, Some(3));
}

#[tokio::test]
async fn pods_are_selected_by_the_chat_not_by_a_helm_release_of_the_same_name() {
    let h = Harness::new(chat(&unique_namespace(), &[("de", 1)]), &amqp_url()).await;
    h.reconcile().await.unwrap();
    let service = h.api::<Service>().get("town-hall-gateway").await.unwrap();
    let selector = service.spec.unwrap().selector.unwrap();
    assert_eq!(selector["chat.parley.dev/deployment"], NAME, "a release's pods lack Parley's label: {selector:?}");
    let gateway = h.api::<Deployment>().get("town-hall-gateway").await.unwrap();
    let labels = gateway.spec.unwrap().selector.match_labels.unwrap();
    assert_eq!(labels["chat.parley.dev/deployment"], NAME);
}

#[tokio::test]
async fn a_deployment_made_before_the_selector_changed_keeps_its_immutable_selector() {
    let h = Harness::new(chat(&unique_namespace(), &[("de", 1)]), &amqp_url()).await;
    h.reconcile().await.unwrap();
    // As an earlier operator made it: selected by instance and component only.
    let old = serde_json::json!({"app.kubernetes.io/instance": NAME, "app.kubernetes.io/component": "gateway"});
    let mut gateway = h.api::<Deployment>().get("town-hall-gateway").await.unwrap();
    gateway.spec.as_mut().unwrap().selector.match_labels = Some(serde_json::from_value(old.clone()).unwrap());
    h.api::<Deployment>().replace("town-hall-gateway", &Default::default(), &gateway).await.unwrap();

    h.edit(|c| c.spec.gateway.replicas = Some(3)).await;
    h.reconcile().await.unwrap();

    let gateway = h.api::<Deployment>().get("town-hall-gateway").await.unwrap();
    let spec = gateway.spec.unwrap();
    assert_eq!(spec.replicas, Some(3), "the change is applied");
    assert_eq!(serde_json::to_value(spec.selector.match_labels).unwrap(), old, "with the selector it has");
}

#[tokio::test]
async fn reconciles_share_one_connection_per_broker() {
    let h = Harness::new(chat(&unique_namespace(), &[("de", 1)]), &amqp_url()).await;
    h.reconcile().await.unwrap();
    h.reconcile().await.unwrap();
    h.reconcile().await.unwrap();
    assert_eq!(h.ctx.brokers.open().await, 1, "not a connection (and handshake) per reconcile");
}

#[tokio::test]
async fn a_language_added_to_a_running_chat_gets_its_queue_and_translator() {
    let h = Harness::new(chat(&unique_namespace(), &[("de", 1)]), &amqp_url()).await;
    h.reconcile().await.unwrap();
    assert!(!queue_exists(&h.topology().translate_queue("fr")).await);

    h.edit(|c| c.spec.languages.push(LanguageSpec { code: "fr".into(), replicas: Some(2), autoscaling: None })).await;
    h.reconcile().await.unwrap();

    assert!(queue_exists(&h.topology().translate_queue("fr")).await, "its queue is declared");
    let deployment = h.api::<Deployment>().get("town-hall-translator-fr").await.unwrap();
    assert_eq!(deployment.spec.unwrap().replicas, Some(2));
    let languages = h.chat().await.status.unwrap().translators.into_iter().map(|t| t.language).collect::<Vec<_>>();
    assert_eq!(languages, ["de", "fr"]);
    // New messages reach it.
    publish_posted(&h.topology(), 1).await;
    assert_eq!(depth(&h.topology().translate_queue("fr")).await, Some(1));
}

/// Runs the process's controllers (`run::control_namespaces`) for `watched` (every namespace when
/// empty) over an API holding the chat `town-hall` in each of `namespaces`, until those in
/// `wait_for` are reconciled, watching Secrets when `watch_secrets`. Returns every request they made
/// and, per namespace, whether its chat was reconciled.
async fn run_controllers(
    namespaces: &[&str],
    watched: &[&str],
    wait_for: &[&str],
    watch_secrets: bool,
) -> (Vec<String>, Vec<bool>) {
    let mut builder = kube_fake_client::ClientBuilder::new()
        .with_resource::<ChatDeployment>()
        .with_status_subresource::<ChatDeployment>()
        .with_status_subresource::<Deployment>();
    for namespace in namespaces {
        // With the finalizer in place, so that the first pass runs every step (this in-memory API's
        // watch does not bring the finalizer's own patch back).
        let mut chat = chat(namespace, &[("de", 1)]);
        chat.metadata.finalizers = Some(vec![FINALIZER.to_owned()]);
        builder = builder.with_object(secret(namespace, &amqp_url())).with_object(chat);
    }
    let client = builder.build().await.unwrap();
    let recorder = recorder::Recorder::default();
    let reporter = Reporter { controller: "parley-operator".into(), instance: Some("test".into()) };
    let settings = Settings { watch_secrets, ..Settings::new("img") };
    let ctx = Context::new(recorder.wrap(client.clone()), reporter, Arc::new(Metrics::default()), settings);
    let stop = tokio_util::sync::CancellationToken::new();
    let watched: Vec<String> = watched.iter().map(|n| n.to_string()).collect();
    let (operator, token) = (recorder.wrap(client.clone()), stop.clone());
    let run = tokio::spawn(async move {
        parley_operator::run::control_namespaces(operator, &watched, Arc::new(ctx), token).await
    });
    let reconciled = |namespace: String| {
        let api: Api<ChatDeployment> = Api::namespaced(client.clone(), &namespace);
        // A status: a whole pass, Secrets read.
        async move { api.get(NAME).await.unwrap().status.is_some() }
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    for namespace in wait_for {
        while !reconciled(namespace.to_string()).await {
            assert!(tokio::time::Instant::now() < deadline, "the chat in {namespace} is never reconciled");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    stop.cancel();
    run.await.unwrap();
    let mut each = Vec::new();
    for namespace in namespaces {
        each.push(reconciled(namespace.to_string()).await);
    }
    delete_topologies(namespaces).await;
    (recorder.requests(), each)
}

#[tokio::test]
async fn with_namespaces_given_the_controllers_watch_and_touch_only_those() {
    let (events, elsewhere) = (unique_namespace(), unique_namespace());
    let (requests, reconciled) = run_controllers(&[&events, &elsewhere], &[&events], &[&events], true).await;

    assert_eq!(reconciled, [true, false], "a chat outside --namespaces is left alone");
    for kind in ["chatdeployments", "deployments", "services", "configmaps", "secrets"] {
        let watch = format!("/namespaces/{events}/{kind}?");
        assert!(requests.iter().any(|r| r.starts_with("GET") && r.contains(&watch)), "{kind} watched in {events}");
    }
    for request in &requests {
        assert!(request.contains(&format!("/namespaces/{events}/")), "outside the watched namespace: {request}");
    }
}

#[tokio::test]
async fn without_namespaces_the_controllers_watch_the_whole_cluster() {
    let (one, two) = (unique_namespace(), unique_namespace());
    let (requests, reconciled) = run_controllers(&[&one, &two], &[], &[&one, &two], false).await;

    assert_eq!(reconciled, [true, true]);
    let watch = "/apis/chat.parley.dev/v1alpha1/chatdeployments?";
    assert!(requests.iter().any(|r| r.starts_with("GET") && r.contains(watch)), "one cluster-wide watch: {requests:?}");
}

#[tokio::test]
async fn by_default_the_controllers_read_secrets_by_name_and_never_list_or_watch_them() {
    let namespace = unique_namespace();
    let (requests, reconciled) = run_controllers(&[&namespace], &[], &[&namespace], false).await;

    assert_eq!(reconciled, [true]);
    let secrets: Vec<&String> = requests.iter().filter(|r| r.contains("/secrets")).collect();
    assert!(
        secrets.iter().any(|r| r.contains(&format!("/namespaces/{namespace}/secrets/rabbitmq"))),
        "the broker Secret is read by name: {secrets:?}"
    );
    for request in &secrets {
        assert!(!request.contains("/secrets?"), "a Secret list or watch without --watch-secrets: {request}");
    }
}

#[tokio::test]
async fn with_the_secret_watch_on_the_controllers_watch_secrets_by_metadata() {
    let namespace = unique_namespace();
    let (requests, _) = run_controllers(&[&namespace], &[], &[&namespace], true).await;

    assert!(
        requests.iter().any(|r| r.starts_with("GET") && r.contains("/api/v1/secrets?")),
        "a cluster-wide Secret watch: {requests:?}"
    );
}

/// Removes the topologies of the chat `town-hall` in `namespaces`, which a test's controllers declared.
async fn delete_topologies(namespaces: &[&str]) {
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default()).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    for namespace in namespaces {
        let topology = Topology::for_chat_deployment(namespace, NAME).unwrap();
        parley_contract::topology::delete_all(&channel, &topology, &["de"]).await.unwrap();
    }
}

#[tokio::test]
async fn changed_replicas_are_applied_in_one_reconcile() {
    let h = Harness::new(chat(&unique_namespace(), &[("de", 1)]), &amqp_url()).await;
    h.reconcile().await.unwrap();

    h.edit(|c| {
        c.spec.languages[0].replicas = Some(4);
        c.spec.gateway.replicas = Some(3);
    })
    .await;
    h.reconcile().await.unwrap();

    let deployments = h.api::<Deployment>();
    let replicas = |d: Deployment| d.spec.unwrap().replicas;
    assert_eq!(replicas(deployments.get("town-hall-translator-de").await.unwrap()), Some(4));
    assert_eq!(replicas(deployments.get("town-hall-gateway").await.unwrap()), Some(3));
}

#[tokio::test]
async fn conditions_follow_deployment_readiness() {
    let h = Harness::new(chat(&unique_namespace(), &[("de", 1)]), &amqp_url()).await;
    h.reconcile().await.unwrap();
    assert_eq!(condition(&h.chat().await, "Ready").0, "False");

    for name in ["town-hall-gateway", "town-hall-fanout", "town-hall-translator-de"] {
        h.mark_ready(name).await;
    }
    h.reconcile().await.unwrap();

    let chat = h.chat().await;
    assert_eq!(condition(&chat, "Ready"), ("True".into(), "AllComponentsReady".into()));
    assert_eq!(chat.status.as_ref().unwrap().phase, Some(Phase::Ready));
    assert_eq!(chat.status.as_ref().unwrap().translators[0].backlog, Some(0));
}

#[tokio::test]
async fn an_object_the_api_server_refuses_turns_ready_false_with_its_error() {
    let h = Harness::new(chat(&unique_namespace(), &[("de", 1)]), &amqp_url()).await;
    h.reconcile().await.unwrap();
    for name in ["town-hall-gateway", "town-hall-fanout", "town-hall-translator-de"] {
        h.mark_ready(name).await;
    }
    h.reconcile().await.unwrap();
    assert_eq!(condition(&h.chat().await, "Ready").0, "True");

    // An API server that refuses the gateway's Service, as a real one refuses an invalid name.
    let inner = h.client.clone();
    let refusing = tower::service_fn(move |request: http::Request<kube::client::Body>| {
        let inner = inner.clone();
        async move {
            if request.method() == http::Method::PATCH && request.uri().path().contains("/services/") {
                let body = serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                    "message": "Service \"town-hall-gateway\" is invalid", "reason": "Invalid", "code": 422});
                let response =
                    http::Response::builder().status(422).body(kube::client::Body::from(body.to_string().into_bytes()));
                return Ok::<_, tower::BoxError>(response.unwrap());
            }
            Ok(inner.send(request).await?)
        }
    });
    let reporter = Reporter { controller: "parley-operator".into(), instance: Some("test".into()) };
    let ctx = Context::new(
        kube::Client::new(refusing, "default"),
        reporter,
        Arc::new(Metrics::default()),
        Settings::new("img"),
    );

    assert!(reconcile(Arc::new(h.chat().await), Arc::new(ctx)).await.is_err(), "retried with backoff");

    let (status, reason) = condition(&h.chat().await, "Ready");
    assert_eq!((status.as_str(), reason.as_str()), ("False", "ApplyFailed"), "an old Ready=True must not stand");
    let ready = h.chat().await.status.unwrap().conditions.into_iter().find(|c| c.type_ == "Ready").unwrap();
    assert!(ready.message.contains("is invalid"), "{}", ready.message);
    assert!(h.event_reasons().await.contains(&"ApplyFailed".to_owned()));
}

#[tokio::test]
async fn delete_removes_the_topology_and_then_the_finalizer() {
    let namespace = unique_namespace();
    let h = Harness::new(chat(&namespace, &[("de", 1)]), &amqp_url()).await;
    h.reconcile().await.unwrap();
    assert!(queue_exists(&h.topology().translate_queue("de")).await);

    // kube-fake-client 0.3 removes objects on delete even with finalizers, so the object in deletion
    // (deletionTimestamp set, finalizers still present) is seeded into a fresh API server.
    let mut deleting = h.chat().await;
    deleting.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::now()));
    deleting.metadata.resource_version = None;
    let h = Harness::new(deleting, &amqp_url()).await;
    reconcile(Arc::new(h.chat().await), h.ctx.clone()).await.unwrap();

    assert!(!queue_exists(&h.topology().translate_queue("de")).await);
    assert!(!queue_exists(&h.topology().fanout_queue()).await);
    let remaining = h.api::<ChatDeployment>().get_opt(NAME).await.unwrap();
    assert!(remaining.is_none_or(|chat| !ours(&chat)), "our finalizer is removed once the topology is gone");
    assert!(h.event_reasons().await.contains(&"TopologyRemoved".to_owned()));
}

#[tokio::test]
async fn deletion_removes_the_topology_only_once_no_pod_of_the_chat_is_left() {
    let h = Harness::new(chat(&unique_namespace(), &[("de", 1)]), &amqp_url()).await;
    h.reconcile().await.unwrap();
    let h = in_deletion(&h, |_| {}, &amqp_url()).await;
    // A translator pod still terminating after its Deployment went: it would declare its queue again.
    let labels = parley_operator::names::Names::new(NAME, &h.namespace)
        .labels(parley_operator::names::Component::Translator, Some("de"));
    let pod = Pod {
        metadata: ObjectMeta {
            name: Some("town-hall-translator-de-7c9f-x2x4q".into()),
            namespace: Some(h.namespace.clone()),
            labels: Some(labels),
            ..Default::default()
        },
        ..Default::default()
    };
    h.api::<Pod>().create(&Default::default(), &pod).await.unwrap();

    let waiting = reconcile(Arc::new(h.chat().await), h.ctx.clone()).await;
    assert!(matches!(&waiting, Err(Error::Waiting(why)) if why.contains("1 pods")), "{waiting:?}");
    assert!(queue_exists(&h.topology().translate_queue("de")).await, "the topology stays while a pod is left");
    assert!(ours(&h.chat().await), "and so does the finalizer");

    h.api::<Pod>().delete("town-hall-translator-de-7c9f-x2x4q", &Default::default()).await.unwrap();
    reconcile(Arc::new(h.chat().await), h.ctx.clone()).await.unwrap();
    assert!(!queue_exists(&h.topology().translate_queue("de")).await, "removed once the last pod is gone");
}

#[tokio::test]
async fn a_deleted_chat_leaves_no_metric_series_behind() {
    let namespace = unique_namespace();
    let h = Harness::new(chat(&namespace, &[("de", 1)]), &amqp_url()).await;
    h.reconcile().await.unwrap();
    let mut deleting = h.chat().await;
    deleting.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::now()));
    deleting.metadata.resource_version = None;
    let h = Harness::new(deleting, &amqp_url()).await;
    // What the autoscaler reported for the chat while it ran.
    let labels = parley_operator::metrics::LanguageLabels {
        namespace: namespace.clone(),
        chat: NAME.into(),
        language: "de".into(),
    };
    h.ctx.metrics.backlog.get_or_create(&labels).set(3);
    h.ctx.metrics.desired_replicas.get_or_create(&labels).set(2);
    let chat_labels = parley_operator::metrics::ChatLabels { namespace: namespace.clone(), chat: NAME.into() };
    h.ctx.metrics.gateway_ready.get_or_create(&chat_labels).set(2);
    assert!(h.ctx.metrics.encode().contains(&namespace));

    reconcile(Arc::new(h.chat().await), h.ctx.clone()).await.unwrap();

    let metrics = h.ctx.metrics.encode();
    assert!(!metrics.contains(&namespace), "series of a chat that is gone: {metrics}");
}

#[tokio::test]
async fn a_warning_repeated_by_retries_is_one_event_with_a_count() {
    let h = Harness::new(chat(&unique_namespace(), &[("de", 1)]), "amqp://guest:guest@127.0.0.1:1/%2f").await;
    for _ in 0..3 {
        assert!(h.reconcile().await.is_err());
    }
    let api = h.api::<k8s_openapi::api::events::v1::Event>();
    let unreachable: Vec<_> = api
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("BrokerUnreachable"))
        .collect();
    assert_eq!(unreachable.len(), 1, "one Event, not one per retry: {unreachable:?}");
    let count = unreachable[0].series.as_ref().map(|s| s.count);
    assert_eq!(count, Some(3), "{:?}", unreachable[0]);
}

#[tokio::test]
async fn an_unreachable_broker_sets_broker_ready_false_while_every_other_object_is_applied() {
    let h = Harness::new(chat(&unique_namespace(), &[("de", 1)]), "amqp://guest:guest@127.0.0.1:1/%2f").await;

    let result = h.reconcile().await;

    assert!(matches!(result, Err(Error::Broker(_))), "requeued with backoff: {result:?}");
    assert_eq!(h.deployments().await.len(), 3);
    let chat = h.chat().await;
    assert_eq!(condition(&chat, "BrokerReady"), ("False".into(), "BrokerUnreachable".into()));
    assert_eq!(chat.status.as_ref().unwrap().phase, Some(Phase::Degraded));
    assert!(h.event_reasons().await.contains(&"BrokerUnreachable".to_owned()));
    // The controller hands the error to the error policy, which counts it by its reason.
    error_policy(Arc::new(chat), &result.unwrap_err(), h.ctx.clone());
    let metrics = h.ctx.metrics.encode();
    assert!(metrics.contains("parley_operator_reconcile_errors_total{error=\"BrokerUnreachable\"} 1"), "{metrics}");
    assert!(metrics.contains("parley_operator_reconciles_total{result=\"error\"}"), "{metrics}");
}

#[tokio::test]
async fn a_history_database_that_answers_is_handed_to_the_gateway_and_fanout_and_reported_ready() {
    let namespace = unique_namespace();
    let h = Harness::new(with_history(chat(&namespace, &[("de", 1)])), &amqp_url()).await;
    h.api::<Secret>()
        .create(&Default::default(), &secret_named(&namespace, "chat-db-app", &postgres_url()))
        .await
        .unwrap();

    h.reconcile().await.unwrap();

    let chat = h.chat().await;
    assert_eq!(condition(&chat, "HistoryReady"), ("True".into(), "DatabaseReachable".into()));
    let deployments = h.api::<Deployment>();
    for role in ["gateway", "fanout"] {
        let env = env_names(&deployments.get(&format!("town-hall-{role}")).await.unwrap());
        assert!(env.contains(&"PARLEY_HISTORY_URL".to_owned()), "{role}: {env:?}");
    }
    let translator = env_names(&deployments.get("town-hall-translator-de").await.unwrap());
    assert!(!translator.contains(&"PARLEY_HISTORY_URL".to_owned()));
    let config = h.api::<ConfigMap>().get("town-hall-config").await.unwrap();
    assert!(config.data.unwrap()["chat-server.toml"].contains("history-retention = \"30d\""));
}

#[tokio::test]
async fn an_unreachable_history_database_degrades_the_chat_and_says_so_once() {
    let namespace = unique_namespace();
    let h = Harness::new(with_history(chat(&namespace, &[("de", 1)])), &amqp_url()).await;
    let unreachable = "postgres://app:s3cret@127.0.0.1:1/app";
    h.api::<Secret>().create(&Default::default(), &secret_named(&namespace, "chat-db-app", unreachable)).await.unwrap();

    h.reconcile().await.unwrap();
    h.reconcile().await.unwrap();

    let chat = h.chat().await;
    assert_eq!(condition(&chat, "HistoryReady"), ("False".into(), "DatabaseUnreachable".into()));
    assert_eq!(condition(&chat, "Ready").0, "False");
    assert_eq!(chat.status.as_ref().unwrap().phase, Some(Phase::Degraded));
    let message = &chat.status.as_ref().unwrap().conditions.iter().find(|c| c.type_ == "HistoryReady").unwrap().message;
    assert!(message.contains("127.0.0.1:1/app") && !message.contains("s3cret"), "{message}");
    let events = h.event_reasons().await;
    assert_eq!(events.iter().filter(|r| *r == "DatabaseUnreachable").count(), 1, "{events:?}");
}

#[tokio::test]
async fn a_missing_history_secret_is_reported() {
    let h = Harness::new(with_history(chat(&unique_namespace(), &[("de", 1)])), &amqp_url()).await;

    h.reconcile().await.unwrap();

    assert_eq!(condition(&h.chat().await, "HistoryReady"), ("False".into(), "HistorySecretNotFound".into()));
}

#[tokio::test]
async fn a_paused_chat_deployment_is_left_unchanged() {
    let mut paused = chat(&unique_namespace(), &[("de", 1)]);
    paused.metadata.annotations = Some([("chat.parley.dev/paused".to_owned(), "true".to_owned())].into());
    let h = Harness::new(paused, &amqp_url()).await;

    let action = h.reconcile().await.unwrap();

    assert_eq!(action, Action::await_change());
    assert!(h.deployments().await.is_empty());
    let chat = h.chat().await;
    assert!(!ours(&chat) && chat.status.is_none());
}

/// A ChatDeployment already in deletion, seeded into a fresh API server (kube-fake-client 0.3 removes
/// objects on delete even with finalizers), after one reconcile declared its topology.
async fn in_deletion(h: &Harness, change: impl FnOnce(&mut ChatDeployment), broker_uri: &str) -> Harness {
    let mut deleting = h.chat().await;
    deleting.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::now()));
    deleting.metadata.resource_version = None;
    change(&mut deleting);
    Harness::new(deleting, broker_uri).await
}

#[tokio::test]
async fn pause_never_blocks_deletion() {
    let h = Harness::new(chat(&unique_namespace(), &[("de", 1)]), &amqp_url()).await;
    h.reconcile().await.unwrap();
    let paused = |c: &mut ChatDeployment| {
        c.metadata.annotations = Some([("chat.parley.dev/paused".to_owned(), "true".to_owned())].into());
    };
    let h = in_deletion(&h, paused, &amqp_url()).await;

    reconcile(Arc::new(h.chat().await), h.ctx.clone()).await.unwrap();

    assert!(!queue_exists(&h.topology().translate_queue("de")).await, "the topology is removed");
    let remaining = h.api::<ChatDeployment>().get_opt(NAME).await.unwrap();
    assert!(remaining.is_none_or(|chat| !ours(&chat)), "and the finalizer with it");
    assert!(h.event_reasons().await.contains(&"TopologyRemoved".to_owned()));
}

#[tokio::test]
async fn deleting_a_chats_namespace_still_removes_its_topology_though_the_broker_secret_goes_first() {
    let h = Harness::new(chat(&unique_namespace(), &[("de", 1)]), &amqp_url()).await;
    h.reconcile().await.unwrap();
    assert!(queue_exists(&h.topology().translate_queue("de")).await);
    // The namespace is being deleted: the Secret is gone already, the chat waits on its finalizer.
    h.api::<Secret>().delete("rabbitmq", &Default::default()).await.unwrap();
    // The same operator sees the chat in deletion (kube-fake-client cannot hold an object in deletion,
    // so the deletion is the object's as the watch would bring it).
    let deleting = || async {
        let mut chat = h.chat().await;
        chat.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::now()));
        Arc::new(chat)
    };
    let waiting = reconcile(deleting().await, h.ctx.clone()).await;
    assert!(matches!(waiting, Err(Error::Waiting(_))), "the Deployments go first: {waiting:?}");
    reconcile(deleting().await, h.ctx.clone()).await.unwrap();

    assert!(!queue_exists(&h.topology().translate_queue("de")).await, "removed with the URI it last used");
    assert!(h.event_reasons().await.contains(&"TopologyRemoved".to_owned()));
}

#[tokio::test]
async fn deletion_with_the_broker_secret_gone_lets_go_and_says_what_was_left_behind() {
    let h = Harness::new(chat(&unique_namespace(), &[("de", 1)]), &amqp_url()).await;
    h.reconcile().await.unwrap();
    let h = in_deletion(&h, |_| {}, &amqp_url()).await;
    h.api::<Secret>().delete("rabbitmq", &Default::default()).await.unwrap();

    reconcile(Arc::new(h.chat().await), h.ctx.clone()).await.unwrap();

    let remaining = h.api::<ChatDeployment>().get_opt(NAME).await.unwrap();
    assert!(remaining.is_none_or(|chat| !ours(&chat)), "deletion is never held forever");
    let left: Vec<_> = h.events().await.into_iter().filter(|(_, reason, _)| reason == "TopologyLeftBehind").collect();
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0].0, "Warning");
    assert!(left[0].2.contains(&format!("left {}.* on the broker", h.topology().prefix())), "{left:?}");
    // Tidy up what the test itself left.
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default()).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    parley_contract::topology::delete_all(&channel, &h.topology(), &["de"]).await.unwrap();
}

#[tokio::test]
async fn deletion_waits_out_an_unreachable_broker_for_5_minutes_then_says_what_was_left_behind() {
    let h = Harness::new(chat(&unique_namespace(), &[("de", 1)]), &amqp_url()).await;
    h.reconcile().await.unwrap();
    let unreachable = "amqp://guest:guest@127.0.0.1:1/%2f";
    let h = in_deletion(&h, |_| {}, unreachable).await;

    assert!(reconcile(Arc::new(h.chat().await), h.ctx.clone()).await.is_err(), "retried while the broker is away");
    h.clock.advance(Duration::from_secs(290));
    assert!(reconcile(Arc::new(h.chat().await), h.ctx.clone()).await.is_err(), "still within the 5 minutes");
    assert!(ours(&h.chat().await), "the finalizer holds the chat meanwhile");
    assert!(!h.event_reasons().await.contains(&"TopologyLeftBehind".to_owned()));

    h.clock.advance(Duration::from_secs(11));
    reconcile(Arc::new(h.chat().await), h.ctx.clone()).await.unwrap();
    let remaining = h.api::<ChatDeployment>().get_opt(NAME).await.unwrap();
    assert!(remaining.is_none_or(|chat| !ours(&chat)), "after 5 minutes deletion goes on");
    let left: Vec<_> = h.events().await.into_iter().filter(|(_, reason, _)| reason == "TopologyLeftBehind").collect();
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(left[0].2.contains(&format!("left {}.* on the broker", h.topology().prefix())), "{left:?}");
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default()).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    parley_contract::topology::delete_all(&channel, &h.topology(), &["de"]).await.unwrap();
}

#[tokio::test]
async fn a_missing_broker_secret_or_key_is_the_reason_broker_ready_is_false() {
    let h = Harness::new(chat(&unique_namespace(), &[("de", 1)]), &amqp_url()).await;
    h.api::<Secret>().delete("rabbitmq", &Default::default()).await.unwrap();
    assert!(h.reconcile().await.is_err(), "retried with backoff");
    assert_eq!(condition(&h.chat().await, "BrokerReady"), ("False".into(), "BrokerSecretNotFound".into()));
    assert!(h.event_reasons().await.contains(&"BrokerSecretNotFound".to_owned()));

    h.api::<Secret>().create(&Default::default(), &secret(&h.namespace, &amqp_url())).await.unwrap();
    h.edit(|c| c.spec.broker.secret_ref.key = "url".into()).await;
    assert!(h.reconcile().await.is_err());
    assert_eq!(condition(&h.chat().await, "BrokerReady"), ("False".into(), "BrokerSecretKeyMissing".into()));
    assert!(h.event_reasons().await.contains(&"BrokerSecretKeyMissing".to_owned()));
}

#[tokio::test]
async fn a_topology_the_broker_refuses_is_the_reason_broker_ready_is_false() {
    let h = Harness::new(chat(&unique_namespace(), &[("de", 1)]), &amqp_url()).await;
    // Someone declared the language's queue by hand as a classic queue: the broker refuses to
    // declare it again as a quorum queue.
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default()).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    let queue = h.topology().translate_queue("de");
    channel
        .queue_declare(
            queue.as_str().into(),
            lapin::options::QueueDeclareOptions { durable: true, ..Default::default() },
            Default::default(),
        )
        .await
        .unwrap();

    assert!(h.reconcile().await.is_err());

    assert_eq!(condition(&h.chat().await, "BrokerReady"), ("False".into(), "TopologyFailed".into()));
    assert!(h.event_reasons().await.contains(&"TopologyFailed".to_owned()));
    let tidy = connection.create_channel().await.unwrap();
    tidy.queue_delete(queue.as_str().into(), Default::default()).await.unwrap();
    parley_contract::topology::delete_all(&tidy, &h.topology(), &["de"]).await.unwrap();
}

#[tokio::test]
async fn an_invalid_spec_gets_a_condition_and_an_event_and_is_not_retried() {
    let mut bad = chat(&unique_namespace(), &[("de", 1)]);
    bad.spec.translation.url = "apertium:2737".into();
    let h = Harness::new(bad, &amqp_url()).await;

    let action = h.reconcile().await.unwrap();

    assert_eq!(action, Action::await_change());
    assert!(h.deployments().await.is_empty());
    assert_eq!(condition(&h.chat().await, "Ready"), ("False".into(), "InvalidSpec".into()));
    assert!(h.event_reasons().await.contains(&"InvalidSpec".to_owned()));
}

#[tokio::test]
async fn a_changed_broker_secret_rolls_the_pods() {
    let h = Harness::new(chat(&unique_namespace(), &[]), &amqp_url()).await;
    h.reconcile().await.unwrap();
    let hash = || async {
        let d = h.api::<Deployment>().get("town-hall-gateway").await.unwrap();
        d.spec.unwrap().template.metadata.unwrap().annotations.unwrap()["chat.parley.dev/config-hash"].clone()
    };
    let before = hash().await;

    let mut changed = secret(&h.namespace, &amqp_url());
    changed.data.as_mut().unwrap().insert("uri".into(), ByteString(format!("{} ", amqp_url()).into_bytes()));
    h.api::<Secret>().replace("rabbitmq", &Default::default(), &changed).await.unwrap();
    h.reconcile().await.unwrap();

    assert_ne!(hash().await, before);
}

#[tokio::test]
async fn a_removed_language_with_a_backlog_keeps_its_queue_until_the_drain_timeout() {
    let h = Harness::new(chat(&unique_namespace(), &[("de", 1), ("fr", 1)]), &amqp_url()).await;
    h.reconcile().await.unwrap();
    // One accepted message waits for the French translator.
    publish_posted(&h.topology(), 1).await;

    h.edit(|c| c.spec.languages.retain(|l| l.code == "de")).await;
    h.reconcile().await.unwrap();

    assert!(queue_exists(&h.topology().translate_queue("fr")).await, "accepted messages are not thrown away");
    assert!(
        h.deployments().await.contains(&"town-hall-translator-fr".to_owned()),
        "the Deployment stays to translate them"
    );
    let status = h.chat().await.status.unwrap();
    let fr = status.translators.iter().find(|t| t.language == "fr").expect("the draining language is reported");
    assert!(fr.draining_since.is_some());
    assert_eq!(fr.backlog, Some(1));
    // Messages sent after the removal no longer reach the removed language's queue.
    publish_posted(&h.topology(), 2).await;
    assert_eq!(depth(&h.topology().translate_queue("fr")).await, Some(1), "unbound from new messages");
    assert_eq!(depth(&h.topology().translate_queue("de")).await, Some(3), "the kept language takes them");

    h.edit(|c| c.spec.drain_timeout_seconds = 0).await;
    h.reconcile().await.unwrap();

    assert!(!queue_exists(&h.topology().translate_queue("fr")).await, "deleted once the drain timeout passed");
    assert!(!h.deployments().await.contains(&"town-hall-translator-fr".to_owned()), "and its Deployment with it");
    assert!(h.chat().await.status.unwrap().translators.iter().all(|t| t.language != "fr"));
    let deleted: Vec<(String, String, String)> =
        h.events().await.into_iter().filter(|(_, reason, _)| reason == "LanguageQueueDeleted").collect();
    assert_eq!(deleted.len(), 1, "{deleted:?}");
    let (kind, _, note) = &deleted[0];
    assert_eq!(kind, "Warning", "messages were lost: {note}");
    assert!(note.contains("after the drain timeout with 1 messages untranslated"), "{note}");
}

#[tokio::test]
async fn the_error_backoff_doubles_from_2_seconds_up_to_5_minutes_and_starts_over_after_a_success() {
    let h = Harness::new(chat(&unique_namespace(), &[("de", 1)]), &amqp_url()).await;
    let chat = Arc::new(h.chat().await);
    let error = Error::Waiting("a test".into());
    let delays: Vec<Action> = (0..11).map(|_| error_policy(chat.clone(), &error, h.ctx.clone())).collect();
    let expected: Vec<Action> = [2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]
        .into_iter()
        .map(|s| Action::requeue(std::time::Duration::from_secs(s)))
        .collect();
    assert_eq!(delays, expected);

    // A reconcile that succeeds clears the count.
    let h = Harness::new(self::chat(&unique_namespace(), &[("de", 1)]), &amqp_url()).await;
    let chat = Arc::new(h.chat().await);
    for _ in 0..3 {
        error_policy(chat.clone(), &error, h.ctx.clone());
    }
    h.reconcile().await.unwrap();
    assert_eq!(error_policy(chat, &error, h.ctx.clone()), Action::requeue(std::time::Duration::from_secs(2)));
}

fn autoscaled(namespace: &str, mode: AutoscalingMode, window: i64) -> ChatDeployment {
    let mut chat = chat(namespace, &[]);
    let autoscaling = AutoscalingSpec {
        target_backlog: 5,
        scale_down_stabilization_seconds: window,
        ..fixtures::autoscaling(mode, 1, 10)
    };
    chat.spec.languages = vec![fixtures::autoscaled("fr", autoscaling)];
    chat
}

async fn publish_posted(topology: &Topology, count: usize) {
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default()).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    for _ in 0..count {
        channel
            .basic_publish(
                topology.posted_exchange().as_str().into(),
                "".into(),
                Default::default(),
                b"{}",
                Default::default(),
            )
            .await
            .unwrap();
    }
    // A passive declare waits for the publishes ahead of it on this channel.
    parley_contract::topology::queue_depth(&channel, &topology.fanout_queue()).await.unwrap();
}

async fn translator_replicas(h: &Harness) -> Option<i32> {
    h.api::<Deployment>().get("town-hall-translator-fr").await.unwrap().spec.unwrap().replicas
}

#[tokio::test]
async fn a_language_switched_to_kubectl_scale_has_its_replicas_handed_over_not_reset() {
    let h =
        Harness::build(chat(&unique_namespace(), &[("fr", 3)]), &amqp_url(), |b| b.with_return_managed_fields()).await;
    h.reconcile().await.unwrap();
    let live = h.api::<Deployment>().get("town-hall-translator-fr").await.unwrap();
    assert!(applies_replicas(&live), "the operator's apply owns replicas while it sets them");

    h.edit(|c| c.spec.languages[0].replicas = None).await;
    h.reconcile().await.unwrap();

    // On a real API server, an apply that omits a field only its manager owned removes it (and the
    // default of 1 applies): another manager takes it over first, at its value. (This in-memory API
    // never removes an omitted field, so the handover request itself is what is checked here; the
    // real-API-server tier, `apiserver.rs`, shows the field kept.)
    let handover = h.recorder.requests().into_iter().find(|r| {
        r.starts_with("PATCH")
            && r.contains("/deployments/town-hall-translator-fr")
            && r.contains(&format!("fieldManager={REPLICAS_HANDOFF_MANAGER}"))
    });
    assert!(handover.is_some(), "replicas are handed over: {:?}", h.recorder.requests());
    let live = h.api::<Deployment>().get("town-hall-translator-fr").await.unwrap();
    assert_eq!(live.spec.as_ref().unwrap().replicas, Some(3), "kept at 3");
    assert!(!applies_replicas(&live), "and no longer set by the operator's apply");

    // Once handed over, it is not done again.
    let before = h.recorder.requests().len();
    h.reconcile().await.unwrap();
    let again = h.recorder.requests()[before..]
        .iter()
        .filter(|r| r.contains(&format!("fieldManager={REPLICAS_HANDOFF_MANAGER}")))
        .count();
    assert_eq!(again, 0);
}

#[tokio::test]
async fn builtin_autoscaling_follows_the_backlog_and_returns_to_the_minimum_after_the_window() {
    let h = Harness::new(autoscaled(&unique_namespace(), AutoscalingMode::Builtin, 3), &amqp_url()).await;
    h.reconcile().await.unwrap();
    assert_eq!(translator_replicas(&h).await, Some(1), "the minimum while the queue is empty");

    publish_posted(&h.topology(), 23).await;
    let action = h.reconcile().await.unwrap();

    assert_eq!(translator_replicas(&h).await, Some(5), "ceil(23 / 5), at once");
    // Still converging (no pod is ready here), so back within about 10 s; its backlog is polled apart.
    let within = (9_000..=11_000).any(|ms| action == Action::requeue(std::time::Duration::from_millis(ms)));
    assert!(within, "converging: {action:?}");
    assert_eq!(h.ctx.polling.len(), 1, "its backlog is polled apart from reconciles");
    let status = h.chat().await.status.unwrap();
    assert_eq!(status.translators[0].desired_replicas, Some(5));
    assert_eq!(status.translators[0].backlog, Some(23));
    assert!(status.translators[0].last_scale_time.is_some());
    assert!(h.event_reasons().await.contains(&"TranslatorScaled".to_owned()));
    // The readings and decisions are metrics too, under the names the docs give.
    let metrics = h.ctx.metrics.encode();
    let labels = format!("namespace=\"{}\",chat=\"town-hall\",language=\"fr\"", h.namespace);
    for line in [
        format!("parley_operator_translator_backlog{{{labels}}} 23"),
        format!("parley_operator_translator_desired_replicas{{{labels}}} 5"),
        "parley_operator_reconciles_total{result=\"ok\"}".to_owned(),
        "parley_operator_reconcile_duration_seconds_bucket{".to_owned(),
    ] {
        assert!(metrics.contains(&line), "{line} missing from:\n{metrics}");
    }

    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default()).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel.queue_purge(h.topology().translate_queue("fr").as_str().into(), Default::default()).await.unwrap();
    h.reconcile().await.unwrap();
    assert_eq!(translator_replicas(&h).await, Some(5), "no scale-down inside the stabilization window");

    h.clock.advance(std::time::Duration::from_secs(4));
    h.reconcile().await.unwrap();
    assert_eq!(translator_replicas(&h).await, Some(1), "back to the minimum after the window");
}

/// The chats one poll finds due, as `namespace/name`.
async fn due(h: &Harness) -> Vec<String> {
    let due = parley_operator::reconcile::poll::poll(&h.ctx, Some(&h.namespace)).await;
    due.iter().map(|chat| format!("{}/{}", chat.namespace.clone().unwrap_or_default(), chat.name)).collect()
}

#[tokio::test]
async fn backlogs_are_polled_apart_from_reconciles_and_only_a_chat_whose_replicas_should_change_is_due() {
    let h = Harness::new(autoscaled(&unique_namespace(), AutoscalingMode::Builtin, 3), &amqp_url()).await;
    h.reconcile().await.unwrap();
    let me = vec![format!("{}/{NAME}", h.namespace)];
    let before = h.recorder.requests().len();

    assert_eq!(due(&h).await, Vec::<String>::new(), "an empty queue at the minimum: nothing to do");
    publish_posted(&h.topology(), 23).await;
    assert_eq!(due(&h).await, me, "23 messages want 5 translators");
    assert_eq!(h.recorder.requests().len(), before, "a poll asks the broker only, never the API server");

    h.reconcile().await.unwrap();
    assert_eq!(translator_replicas(&h).await, Some(5));
    assert_eq!(due(&h).await, Vec::<String>::new(), "at the replicas the backlog asks for");

    // Scale-down waits for the stabilization window, which the polls' readings fill.
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default()).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel.queue_purge(h.topology().translate_queue("fr").as_str().into(), Default::default()).await.unwrap();
    assert_eq!(due(&h).await, Vec::<String>::new(), "inside the window");
    h.clock.advance(Duration::from_secs(4));
    assert_eq!(due(&h).await, me, "after the window");

    // A chat with no language in builtin autoscaling is no longer polled.
    h.edit(|c| c.spec.languages = vec![LanguageSpec { code: "fr".into(), replicas: Some(2), autoscaling: None }]).await;
    h.reconcile().await.unwrap();
    assert!(h.ctx.polling.is_empty());
}

fn management_url() -> String {
    std::env::var("PARLEY_TEST_MANAGEMENT_URL").unwrap_or_else(|_| "http://127.0.0.1:15672".into())
}

/// `queue` as the management API shows it: (ready, unacknowledged, publish rate).
async fn management_counts(queue: &str) -> (i64, i64, f64) {
    let uri: lapin::uri::AMQPUri = amqp_url().parse().unwrap();
    let mut url = url::Url::parse(&management_url()).unwrap();
    url.path_segments_mut().unwrap().pop_if_empty().extend(["api", "queues", uri.vhost.as_str(), queue]);
    let _ = rustls::crypto::ring::default_provider().install_default();
    let body = reqwest::Client::new()
        .get(url)
        .basic_auth(&uri.authority.userinfo.username, Some(&uri.authority.userinfo.password))
        .send()
        .await
        .expect("the RabbitMQ management API answers (rabbitmq-plugins enable rabbitmq_management)")
        .error_for_status()
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let count = |field: &str| info[field].as_i64().unwrap_or_default();
    let rate = info["message_stats"]["publish_details"]["rate"].as_f64().unwrap_or_default();
    (count("messages_ready"), count("messages_unacknowledged"), rate)
}

/// Waits until the management API (whose figures lag by its 5-s collection interval) shows `queue`
/// as `wanted` says.
async fn until_management_shows(queue: &str, what: &str, wanted: impl Fn((i64, i64, f64)) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let counts = management_counts(queue).await;
        if wanted(counts) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "the management API never showed {what}: {counts:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A translator stand-in on `queue`: takes up to 10 messages and holds them unacknowledged.
async fn holding_consumer(queue: &str) -> (Connection, lapin::Consumer) {
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default()).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel.basic_qos(10, Default::default()).await.unwrap();
    let consumer =
        channel.basic_consume(queue.into(), "stand-in".into(), Default::default(), Default::default()).await.unwrap();
    (connection, consumer)
}

/// `autoscaled` with a minimum of zero and, when given, the broker's management API.
fn to_zero(namespace: &str, management: Option<String>) -> ChatDeployment {
    let mut chat = autoscaled(namespace, AutoscalingMode::Builtin, 3);
    chat.spec.languages[0].autoscaling.as_mut().unwrap().min_replicas = 0;
    chat.spec.broker.management_url = management;
    chat
}

#[tokio::test]
async fn with_the_management_api_a_translator_holding_messages_is_not_scaled_to_zero_and_an_idle_one_is() {
    use futures_util::StreamExt;
    let h = Harness::new(to_zero(&unique_namespace(), Some(management_url())), &amqp_url()).await;
    h.reconcile().await.unwrap();
    assert_eq!(translator_replicas(&h).await, Some(0), "nothing to translate");
    let queue = h.topology().translate_queue("fr");

    publish_posted(&h.topology(), 3).await;
    until_management_shows(&queue, "3 ready", |(ready, _, _)| ready == 3).await;
    h.reconcile().await.unwrap();
    assert_eq!(translator_replicas(&h).await, Some(1), "woken by what waits");

    // The translator takes all three and is still working on them: none is ready.
    let (_connection, mut consumer) = holding_consumer(&queue).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(consumer.next().await.unwrap().unwrap());
    }
    until_management_shows(&queue, "3 unacknowledged", |(ready, unacked, _)| ready == 0 && unacked == 3).await;
    h.clock.advance(Duration::from_secs(10));
    h.reconcile().await.unwrap();
    assert_eq!(translator_replicas(&h).await, Some(1), "stopping it would hand back what it holds");
    assert_eq!(due(&h).await, Vec::<String>::new(), "and the poller agrees");

    // Done with them, and nothing published since: idle, though it is still connected.
    for delivery in held {
        delivery.ack(Default::default()).await.unwrap();
    }
    until_management_shows(&queue, "an idle queue", |(ready, unacked, rate)| ready == 0 && unacked == 0 && rate == 0.0)
        .await;
    h.clock.advance(Duration::from_secs(10));
    assert_eq!(due(&h).await, vec![format!("{}/{NAME}", h.namespace)], "the poller sees it idle");
    h.reconcile().await.unwrap();
    assert_eq!(translator_replicas(&h).await, Some(0), "idle after the window: zero");
    let (_, reason) = condition(&h.chat().await, "AutoscalingReady");
    assert_eq!(reason, "Scaling");
}

#[tokio::test]
async fn without_the_management_api_a_language_with_translators_connected_is_never_scaled_to_zero() {
    use futures_util::StreamExt;
    let h = Harness::new(to_zero(&unique_namespace(), None), &amqp_url()).await;
    h.reconcile().await.unwrap();
    let queue = h.topology().translate_queue("fr");
    publish_posted(&h.topology(), 3).await;
    h.reconcile().await.unwrap();
    assert_eq!(translator_replicas(&h).await, Some(1));

    // The translator keeps up: nothing ready, which is all AMQP shows.
    let (connection, mut consumer) = holding_consumer(&queue).await;
    for _ in 0..3 {
        consumer.next().await.unwrap().unwrap().ack(Default::default()).await.unwrap();
    }
    h.clock.advance(Duration::from_secs(10));
    h.reconcile().await.unwrap();
    assert_eq!(translator_replicas(&h).await, Some(1), "a busy translator and an idle one look alike");
    let status = h.chat().await.status.unwrap();
    let scaling = status.conditions.iter().find(|c| c.type_ == "AutoscalingReady").unwrap();
    assert!(scaling.message.contains("broker.managementUrl"), "says what would let it reach zero: {}", scaling.message);

    // With no translator connected and nothing waiting, zero.
    connection.close(200, "done".into()).await.unwrap();
    h.clock.advance(Duration::from_secs(10));
    h.reconcile().await.unwrap();
    assert_eq!(translator_replicas(&h).await, Some(0));
}

#[tokio::test]
async fn a_management_api_that_does_not_answer_is_an_event_and_scaling_goes_on_by_amqp() {
    let h = Harness::new(to_zero(&unique_namespace(), Some("http://127.0.0.1:1".into())), &amqp_url()).await;
    h.reconcile().await.unwrap();
    publish_posted(&h.topology(), 3).await;
    h.reconcile().await.unwrap();

    assert_eq!(translator_replicas(&h).await, Some(1), "scaled on the ready messages AMQP shows");
    let events = h.events().await;
    let warning = events.iter().find(|(_, reason, _)| reason == "ManagementApiFailed");
    assert!(warning.is_some_and(|(kind, _, _)| kind == "Warning"), "{events:?}");
}

#[tokio::test]
async fn keda_mode_without_keda_leaves_replicas_alone_and_says_why() {
    let h = Harness::new(autoscaled(&unique_namespace(), AutoscalingMode::Keda, 120), &amqp_url()).await;

    h.reconcile().await.unwrap();

    assert_eq!(translator_replicas(&h).await, None, "the operator does not own replicas in KEDA mode");
    assert_eq!(condition(&h.chat().await, "AutoscalingReady"), ("False".into(), "KedaNotInstalled".into()));
}

#[tokio::test]
async fn keda_mode_emits_a_scaled_object_for_the_language_queue() {
    let h = Harness::with_keda(autoscaled(&unique_namespace(), AutoscalingMode::Keda, 120), &amqp_url()).await;

    h.reconcile().await.unwrap();

    let scaled = h.api::<ScaledObject>().get("town-hall-translator-fr").await.unwrap();
    assert_eq!(scaled.spec.scale_target_ref.name, "town-hall-translator-fr");
    assert_eq!((scaled.spec.min_replica_count, scaled.spec.max_replica_count), (1, 10));
    assert_eq!(scaled.spec.triggers[0].metadata["queueName"], h.topology().translate_queue("fr"));
    assert!(h.api::<TriggerAuthentication>().get("town-hall-broker").await.is_ok());
    assert_eq!(translator_replicas(&h).await, None);
    assert_eq!(condition(&h.chat().await, "AutoscalingReady").0, "True");
}

#[tokio::test]
async fn switching_the_last_language_off_keda_removes_its_scaled_object() {
    let h = Harness::with_keda(autoscaled(&unique_namespace(), AutoscalingMode::Keda, 120), &amqp_url()).await;
    h.reconcile().await.unwrap();
    assert!(h.api::<ScaledObject>().get_opt("town-hall-translator-fr").await.unwrap().is_some());

    h.edit(|c| c.spec.languages = vec![LanguageSpec { code: "fr".into(), replicas: Some(2), autoscaling: None }]).await;
    h.reconcile().await.unwrap();

    let left = h.api::<ScaledObject>().list(&Default::default()).await.unwrap().items;
    assert!(left.is_empty(), "its HPA would fight the operator over replicas: {left:?}");
    let auth = h.api::<TriggerAuthentication>().list(&Default::default()).await.unwrap().items;
    assert!(auth.is_empty(), "{auth:?}");
}

/// An object labelled as this operator's for `town-hall` but never desired: prune must delete it.
fn stray_meta(namespace: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some("town-hall-stray".into()),
        namespace: Some(namespace.into()),
        labels: Some(
            [
                ("chat.parley.dev/deployment".to_owned(), NAME.to_owned()),
                ("app.kubernetes.io/managed-by".to_owned(), "parley-operator".to_owned()),
            ]
            .into(),
        ),
        ..Default::default()
    }
}

#[tokio::test]
async fn every_request_a_reconcile_makes_is_allowed_by_the_rbac_rules_and_every_rule_is_used() {
    use parley_operator::rbac::{allows, CONTROLLER, RUNTIME_ONLY};
    // One ChatDeployment that exercises every kind: builtin and KEDA autoscaling, a fixed and a removed
    // language, and stray owned objects of every kind for prune to delete.
    let namespace = unique_namespace();
    let mut chat = autoscaled(&namespace, AutoscalingMode::Builtin, 120);
    let keda = AutoscalingSpec {
        target_backlog: 10,
        scale_down_stabilization_seconds: 60,
        ..fixtures::autoscaling(AutoscalingMode::Keda, 1, 3)
    };
    chat.spec.languages.push(fixtures::autoscaled("it", keda));
    chat.spec.languages.push(LanguageSpec { code: "de".into(), replicas: Some(1), autoscaling: None });
    let h = Harness::with_optional_crds(chat, &amqp_url()).await;
    let create = kube::api::PostParams::default();
    h.api::<Service>()
        .create(&create, &Service { metadata: stray_meta(&namespace), ..Default::default() })
        .await
        .unwrap();
    h.api::<ConfigMap>()
        .create(&create, &ConfigMap { metadata: stray_meta(&namespace), ..Default::default() })
        .await
        .unwrap();
    let budget = PodDisruptionBudget { metadata: stray_meta(&namespace), ..Default::default() };
    h.api::<PodDisruptionBudget>().create(&create, &budget).await.unwrap();
    let scaled = ScaledObject { metadata: stray_meta(&namespace), ..Default::default() };
    h.api::<ScaledObject>().create(&create, &scaled).await.unwrap();
    let auth = TriggerAuthentication { metadata: stray_meta(&namespace), ..Default::default() };
    h.api::<TriggerAuthentication>().create(&create, &auth).await.unwrap();
    let monitor = PodMonitor { metadata: stray_meta(&namespace), ..Default::default() };
    h.api::<PodMonitor>().create(&create, &monitor).await.unwrap();
    let policy = NetworkPolicy { metadata: stray_meta(&namespace), ..Default::default() };
    h.api::<NetworkPolicy>().create(&create, &policy).await.unwrap();

    h.reconcile().await.unwrap();
    h.edit(|c| c.spec.languages.retain(|l| l.code != "de")).await;
    h.reconcile().await.unwrap();
    h.edit(|c| c.spec.translation.url = "not-a-url".into()).await;
    h.reconcile().await.unwrap();
    let mut deleting = h.chat().await;
    deleting.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::now()));
    deleting.metadata.resource_version = None;
    let gone = Harness::with_optional_crds(deleting, &amqp_url()).await;
    gone.api::<Deployment>()
        .create(&create, &Deployment { metadata: stray_meta(&namespace), ..Default::default() })
        .await
        .unwrap();
    let waiting = reconcile(Arc::new(gone.chat().await), gone.ctx.clone()).await;
    assert!(matches!(waiting, Err(Error::Waiting(_))), "cleanup waits for the Deployments to go: {waiting:?}");
    reconcile(Arc::new(gone.chat().await), gone.ctx.clone()).await.unwrap();

    let mut used = h.recorder.accesses();
    used.extend(gone.recorder.accesses());
    for access in &used {
        assert!(
            allows(CONTROLLER, &access.group, &access.resource, &access.verb),
            "the operator does {access:?}, which its RBAC rules do not allow"
        );
    }
    for rule in CONTROLLER {
        for verb in rule.verbs {
            let seen = used.iter().any(|a| a.group == rule.group && a.resource == rule.resource && a.verb == *verb);
            let runtime = RUNTIME_ONLY.contains(&(rule.group, rule.resource, *verb));
            assert!(seen || runtime, "the rules grant {verb} on {}/{} but nothing uses it", rule.group, rule.resource);
        }
    }
}

#[tokio::test]
async fn a_pod_monitor_has_prometheus_scrape_every_pod_where_the_prometheus_operator_is_installed() {
    let mut spec = chat(&unique_namespace(), &[("fr", 1)]);
    spec.spec.monitoring.labels = [("release".to_owned(), "kube-prometheus-stack".to_owned())].into();
    spec.spec.monitoring.interval = Some("15s".into());
    let h = Harness::with_prometheus_operator(spec, &amqp_url()).await;

    h.reconcile().await.unwrap();

    let monitor = h.api::<PodMonitor>().get(NAME).await.unwrap();
    assert_eq!(monitor.labels()["release"], "kube-prometheus-stack", "what the Prometheus selects monitors by");
    assert_eq!(monitor.spec.selector.match_labels["chat.parley.dev/deployment"], NAME);
    let endpoint = &monitor.spec.pod_metrics_endpoints[0];
    assert_eq!((endpoint.port.as_str(), endpoint.path.as_str()), ("http", "/metrics"));
    assert_eq!(endpoint.interval.as_deref(), Some("15s"));
    assert!(monitor.spec.pod_target_labels.contains(&"app.kubernetes.io/component".to_owned()));
    // Every pod the operator runs for the chat is one the monitor selects.
    for deployment in h.api::<Deployment>().list(&ListParams::default()).await.unwrap().items {
        let pod_labels = deployment.spec.unwrap().template.metadata.unwrap().labels.unwrap();
        for (key, value) in &monitor.spec.selector.match_labels {
            assert_eq!(pod_labels.get(key), Some(value), "{} pods carry {key}", deployment.metadata.name.unwrap());
        }
    }
    assert_eq!(condition(&h.chat().await, "MetricsScraped"), ("True".into(), "PodMonitorApplied".into()));

    // Turned off in the spec: the monitor goes, and so does the condition.
    h.edit(|c| c.spec.monitoring.pod_monitor = false).await;
    h.reconcile().await.unwrap();
    assert!(h.api::<PodMonitor>().get_opt(NAME).await.unwrap().is_none());
    let chat = h.chat().await;
    assert!(chat.status.unwrap().conditions.iter().all(|c| c.type_ != "MetricsScraped"));
}

#[tokio::test]
async fn without_the_prometheus_operator_the_status_says_how_to_scrape_the_pods() {
    let h = Harness::new(chat(&unique_namespace(), &[("fr", 1)]), &amqp_url()).await;

    h.reconcile().await.unwrap();

    let chat = h.chat().await;
    let status = chat.status.unwrap();
    let scraped = status.conditions.iter().find(|c| c.type_ == "MetricsScraped").unwrap();
    assert_eq!((scraped.status.as_str(), scraped.reason.as_str()), ("False", "PrometheusOperatorNotInstalled"));
    assert!(scraped.message.contains("port http, path /metrics"), "{}", scraped.message);
}

/// The ConfigMap's file `name` (`chat-server.toml` or `gateway.toml`), parsed as the chat server reads it.
async fn config_file(h: &Harness, name: &str) -> (String, parley_contract::config::ChatServerConfig) {
    let data = h.api::<ConfigMap>().get("town-hall-config").await.unwrap().data.unwrap();
    let text = data[name].clone();
    let config = parley_contract::config::ChatServerConfig::from_toml(&text).unwrap();
    (text, config)
}

fn env_var(deployment: &Deployment, name: &str) -> Option<EnvVar> {
    let container = &deployment.spec.as_ref().unwrap().template.spec.as_ref().unwrap().containers[0];
    container.env.iter().flatten().find(|e| e.name == name).cloned()
}

fn condition_message(chat: &ChatDeployment, kind: &str) -> String {
    chat.status.as_ref().unwrap().conditions.iter().find(|c| c.type_ == kind).unwrap().message.clone()
}

fn config_hash(deployment: &Deployment) -> String {
    deployment.spec.as_ref().unwrap().template.metadata.as_ref().unwrap().annotations.as_ref().unwrap()
        ["chat.parley.dev/config-hash"]
        .clone()
}

/// Sign-in with the Keycloak realm of examples/oidc-keycloak.yaml.
fn oidc() -> AuthSpec {
    AuthSpec {
        mode: AuthMode::Oidc,
        issuer: Some("https://keycloak.example.com/realms/events".into()),
        audience: Some("parley".into()),
        groups_claim: Some("groups".into()),
        read_groups: vec!["attendees".into()],
        send_groups: vec!["attendees".into(), "speakers".into()],
        ..Default::default()
    }
}

fn jwt(secret: &str) -> AuthSpec {
    AuthSpec {
        mode: AuthMode::Jwt,
        jwt_secret_ref: Some(SecretKeyRef { name: secret.into(), key: "secret".into() }),
        ..Default::default()
    }
}

/// A Secret whose key `key` holds `value`.
fn secret_with(namespace: &str, name: &str, key: &str, value: &[u8]) -> Secret {
    Secret {
        metadata: ObjectMeta { name: Some(name.into()), namespace: Some(namespace.into()), ..Default::default() },
        data: Some([(key.to_owned(), ByteString(value.to_vec()))].into()),
        ..Default::default()
    }
}

#[tokio::test]
async fn the_gateway_config_says_auth_none_by_default_and_the_oidc_settings_when_set() {
    let h = Harness::new(chat(&unique_namespace(), &[("de", 1)]), &amqp_url()).await;
    h.reconcile().await.unwrap();

    let (_, gateway) = config_file(&h, "gateway.toml").await;
    assert_eq!(gateway.auth, Some(parley_contract::config::AuthMode::None), "a gateway starts only with it set");
    let deployments = h.api::<Deployment>();
    let gateway_pods = deployments.get("town-hall-gateway").await.unwrap();
    assert_eq!(env_var(&gateway_pods, "PARLEY_CONFIG").unwrap().value.unwrap(), "/etc/parley/gateway.toml");
    let fanout = deployments.get("town-hall-fanout").await.unwrap();
    assert_eq!(env_var(&fanout, "PARLEY_CONFIG").unwrap().value.unwrap(), "/etc/parley/chat-server.toml");

    h.edit(|c| c.spec.auth = Some(oidc())).await;
    h.reconcile().await.unwrap();

    let (_, gateway) = config_file(&h, "gateway.toml").await;
    assert_eq!(gateway.auth, Some(parley_contract::config::AuthMode::Oidc));
    assert_eq!(gateway.auth_issuer.as_deref(), Some("https://keycloak.example.com/realms/events"));
    assert_eq!(gateway.auth_audience.as_deref(), Some("parley"));
    assert_eq!(gateway.groups_claim.as_deref(), Some("groups"));
    assert_eq!(gateway.read_groups.as_deref(), Some("attendees"));
    assert_eq!(gateway.send_groups.as_deref(), Some("attendees,speakers"), "comma-joined");
    let (shared_text, shared) = config_file(&h, "chat-server.toml").await;
    assert_eq!(shared.auth, None, "the fanout and translators read no sign-in: {shared_text}");
    assert!(!shared_text.contains("auth-issuer"), "{shared_text}");
    assert!(h.chat().await.status.unwrap().conditions.iter().all(|c| c.type_ != "AuthReady"), "nothing to check");
}

#[tokio::test]
async fn jwt_mode_wires_the_gateway_secret_from_its_secret_and_never_into_the_config_map() {
    let namespace = unique_namespace();
    let mut spec = chat(&namespace, &[("de", 1)]);
    spec.spec.auth = Some(jwt("parley-jwt"));
    let h = Harness::new(spec, &amqp_url()).await;

    // The Secret is not there yet: said on the chat, as a missing broker Secret is.
    h.reconcile().await.unwrap();
    let chat = h.chat().await;
    assert_eq!(condition(&chat, "AuthReady"), ("False".into(), "JwtSecretNotFound".into()));
    assert!(condition_message(&chat, "AuthReady").contains("auth.jwtSecretRef"), "names the field");
    assert_eq!(condition(&chat, "Ready").0, "False");
    assert_eq!(chat.status.as_ref().unwrap().phase, Some(Phase::Degraded));
    assert!(h.event_reasons().await.contains(&"JwtSecretNotFound".to_owned()));

    let value = "a signing secret of at least thirty-two bytes";
    let created = secret_with(&namespace, "parley-jwt", "secret", value.as_bytes());
    h.api::<Secret>().create(&Default::default(), &created).await.unwrap();
    h.reconcile().await.unwrap();

    assert_eq!(condition(&h.chat().await, "AuthReady"), ("True".into(), "JwtSecretFound".into()));
    let deployments = h.api::<Deployment>();
    let gateway = deployments.get("town-hall-gateway").await.unwrap();
    let from = env_var(&gateway, "PARLEY_JWT_SECRET").expect("the gateway gets the secret");
    assert_eq!(from.value, None, "by reference, never by value");
    let selector = from.value_from.unwrap().secret_key_ref.unwrap();
    assert_eq!((selector.name.as_str(), selector.key.as_str()), ("parley-jwt", "secret"));
    for other in ["town-hall-fanout", "town-hall-translator-de"] {
        assert!(env_var(&deployments.get(other).await.unwrap(), "PARLEY_JWT_SECRET").is_none(), "{other}");
    }
    let config = h.api::<ConfigMap>().get("town-hall-config").await.unwrap();
    for (file, text) in config.data.unwrap() {
        assert!(!text.contains(value) && !text.contains("jwt-secret"), "{file}: {text}");
    }
    let (_, gateway_config) = config_file(&h, "gateway.toml").await;
    assert_eq!(gateway_config.auth, Some(parley_contract::config::AuthMode::Jwt));

    // A new secret rolls the pods, as a new broker URI does.
    let before = config_hash(&gateway);
    let changed = secret_with(&namespace, "parley-jwt", "secret", b"another signing secret, thirty-two bytes or more");
    h.api::<Secret>().replace("parley-jwt", &Default::default(), &changed).await.unwrap();
    h.reconcile().await.unwrap();
    assert_ne!(config_hash(&deployments.get("town-hall-gateway").await.unwrap()), before);
}

#[tokio::test]
async fn an_oidc_spec_without_an_audience_is_refused_with_a_condition_naming_the_field() {
    let mut bad = chat(&unique_namespace(), &[("de", 1)]);
    bad.spec.auth = Some(AuthSpec { audience: None, ..oidc() });
    let h = Harness::new(bad, &amqp_url()).await;

    let action = h.reconcile().await.unwrap();

    assert_eq!(action, Action::await_change(), "a bad spec waits for the next edit");
    assert!(h.deployments().await.is_empty());
    let chat = h.chat().await;
    assert_eq!(condition(&chat, "Ready"), ("False".into(), "InvalidSpec".into()));
    let message = condition_message(&chat, "Ready");
    assert!(message.contains("auth.audience"), "{message}");
    let invalid: Vec<_> = h.events().await.into_iter().filter(|(_, reason, _)| reason == "InvalidSpec").collect();
    assert!(invalid.iter().any(|(kind, _, note)| kind == "Warning" && note.contains("auth.audience")), "{invalid:?}");
}

fn with_broker_ca(mut chat: ChatDeployment) -> ChatDeployment {
    chat.spec.broker.tls =
        Some(BrokerTlsSpec { ca_secret_ref: SecretKeyRef { name: "rabbitmq-ca".into(), key: "ca.crt".into() } });
    chat
}

#[tokio::test]
async fn the_broker_ca_is_mounted_read_only_in_every_pod_and_amqp_ca_file_names_it() {
    let namespace = unique_namespace();
    let h = Harness::new(with_broker_ca(chat(&namespace, &[("de", 1)])), &amqp_url()).await;

    // Without its Secret: BrokerReady says so, as it does of the broker Secret.
    assert!(h.reconcile().await.is_err(), "retried with backoff");
    assert_eq!(condition(&h.chat().await, "BrokerReady"), ("False".into(), "BrokerCaSecretNotFound".into()));
    assert!(h.event_reasons().await.contains(&"BrokerCaSecretNotFound".to_owned()));

    let pem = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
    h.api::<Secret>()
        .create(&Default::default(), &secret_with(&namespace, "rabbitmq-ca", "ca.crt", pem))
        .await
        .unwrap();
    h.reconcile().await.unwrap();
    assert_eq!(condition(&h.chat().await, "BrokerReady").0, "True", "an amqp:// broker needs no CA");

    for file in ["chat-server.toml", "gateway.toml"] {
        let (_, config) = config_file(&h, file).await;
        assert_eq!(config.amqp_ca_file.as_deref(), Some("/etc/parley-broker-ca/ca.pem"), "{file}");
    }
    let deployments = h.api::<Deployment>().list(&ListParams::default()).await.unwrap().items;
    assert_eq!(deployments.len(), 3);
    for deployment in deployments {
        let pod = deployment.spec.unwrap().template.spec.unwrap();
        let mount = pod.containers[0].volume_mounts.iter().flatten().find(|m| m.name == "broker-ca").cloned();
        let mount = mount.unwrap_or_else(|| panic!("{:?} mounts the CA", deployment.metadata.name));
        assert_eq!((mount.mount_path.as_str(), mount.read_only), ("/etc/parley-broker-ca", Some(true)));
        let volume = pod.volumes.iter().flatten().find(|v| v.name == "broker-ca").unwrap().secret.clone().unwrap();
        assert_eq!(volume.secret_name.as_deref(), Some("rabbitmq-ca"));
        let item = &volume.items.unwrap()[0];
        assert_eq!((item.key.as_str(), item.path.as_str()), ("ca.crt", "ca.pem"));
    }
}

/// A TLS front for the test broker (socat, as a managed broker's TLS listener) with a certificate for
/// 127.0.0.1 signed by a CA of its own, which nothing trusts. Stopped when dropped.
struct TlsFront {
    child: std::process::Child,
    port: u16,
    ca: Vec<u8>,
    dir: std::path::PathBuf,
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl TlsFront {
    async fn start() -> Self {
        let dir = std::env::temp_dir().join(format!("parley-operator-tls-{}", unique_namespace()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = |name: &str| dir.join(name).to_str().unwrap().to_owned();
        std::fs::write(
            path("ext"),
            "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        let openssl = |args: &[&str]| {
            let made = std::process::Command::new("openssl")
                .args(args)
                .stderr(std::process::Stdio::null())
                .status()
                .expect("openssl makes the test broker's certificates");
            assert!(made.success(), "openssl {args:?}");
        };
        let (ca, ca_key, cert, key, csr) =
            (path("ca.pem"), path("ca.key"), path("broker.pem"), path("broker.key"), path("broker.csr"));
        openssl(
            &["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=Parley test CA"]
                .into_iter()
                .chain(["-keyout", &ca_key, "-out", &ca])
                .collect::<Vec<_>>(),
        );
        openssl(&["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", &key, "-out", &csr]);
        openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            &path("ext"),
            "-out",
            &cert,
        ]);
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let listen = format!("OPENSSL-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,verify=0,cert={cert},key={key}");
        let child = std::process::Command::new("socat")
            .args([listen.as_str(), "TCP:127.0.0.1:5672"])
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("socat fronts the broker with TLS");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            assert!(tokio::time::Instant::now() < deadline, "socat never listened on {port}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let ca = std::fs::read(&ca).unwrap();
        Self { child, port, ca, dir }
    }

    /// The test broker's URI over this front, with amqps://.
    fn url(&self) -> String {
        let plain = amqp_url();
        let vhost = plain.rsplit_once('/').map(|(_, v)| v).unwrap_or("%2f");
        format!("amqps://guest:guest@127.0.0.1:{}/{vhost}", self.port)
    }
}

#[tokio::test]
async fn an_amqps_broker_with_a_private_ca_is_reached_with_the_ca_bundle_of_broker_tls() {
    let front = TlsFront::start().await;
    let namespace = unique_namespace();
    // Without the CA the broker's certificate is trusted by nobody: the operator cannot declare.
    let untrusting = Harness::new(chat(&namespace, &[("de", 1)]), &front.url()).await;
    assert!(untrusting.reconcile().await.is_err());
    assert_eq!(condition(&untrusting.chat().await, "BrokerReady"), ("False".into(), "BrokerUnreachable".into()));

    let h = Harness::new(with_broker_ca(chat(&unique_namespace(), &[("de", 1)])), &front.url()).await;
    let ca = secret_with(&h.namespace, "rabbitmq-ca", "ca.crt", &front.ca);
    h.api::<Secret>().create(&Default::default(), &ca).await.unwrap();

    h.reconcile().await.unwrap();

    assert_eq!(condition(&h.chat().await, "BrokerReady"), ("True".into(), "TopologyDeclared".into()));
    assert!(queue_exists(&h.topology().translate_queue("de")).await, "declared through the TLS front");
    // The NetworkPolicies let the pods out to the port the URI names, beside 5671 and 5672.
    let policy = h.api::<NetworkPolicy>().get("town-hall-fanout").await.unwrap();
    let broker = &policy.spec.unwrap().egress.unwrap()[1];
    let ports: Vec<_> = broker.ports.iter().flatten().map(|p| p.port.clone().unwrap()).collect();
    assert!(ports.contains(&IntOrString::Int(front.port.into())), "{ports:?}");
}

/// The TCP (or `protocol`) ports of one rule.
fn ports_of(ports: &Option<Vec<k8s_openapi::api::networking::v1::NetworkPolicyPort>>, protocol: &str) -> Vec<i32> {
    ports
        .iter()
        .flatten()
        .filter(|p| p.protocol.as_deref() == Some(protocol))
        .map(|p| match p.port {
            Some(IntOrString::Int(n)) => n,
            ref other => panic!("a numbered port: {other:?}"),
        })
        .collect()
}

#[tokio::test]
async fn every_role_gets_a_network_policy_with_the_ports_it_needs_and_they_are_pruned_when_turned_off() {
    let h = Harness::new(with_history(chat(&unique_namespace(), &[("de", 1), ("fr", 1)])), &amqp_url()).await;
    h.api::<Secret>()
        .create(&Default::default(), &secret_named(&h.namespace, "chat-db-app", &postgres_url()))
        .await
        .unwrap();
    h.reconcile().await.unwrap();

    let policies = h.api::<NetworkPolicy>();
    let mut names: Vec<String> =
        policies.list(&ListParams::default()).await.unwrap().items.iter().map(ResourceExt::name_any).collect();
    names.sort();
    assert_eq!(names, ["town-hall-fanout", "town-hall-gateway", "town-hall-translator"], "one per role");
    let database = url::Url::parse(&postgres_url()).unwrap().port().map_or(5432, i32::from);
    let history: Vec<i32> = std::collections::BTreeSet::from([5432, database]).into_iter().collect();
    for (role, component, extra) in [
        ("town-hall-gateway", "gateway", history.clone()),
        ("town-hall-fanout", "fanout", history.clone()),
        ("town-hall-translator", "translator", vec![2737]),
    ] {
        let policy = policies.get(role).await.unwrap();
        assert_eq!(policy.owner_references()[0].kind, "ChatDeployment");
        let spec = policy.spec.unwrap();
        assert_eq!(spec.policy_types.as_deref(), Some(&["Ingress".to_owned(), "Egress".to_owned()][..]));
        let selector = spec.pod_selector.unwrap().match_labels.unwrap();
        assert_eq!(selector["app.kubernetes.io/component"], component);
        assert_eq!(selector["chat.parley.dev/deployment"], NAME);
        // Every pod of the role's Deployments is one it selects.
        for deployment in h.api::<Deployment>().list(&ListParams::default()).await.unwrap().items {
            let pods = deployment.spec.unwrap().template.metadata.unwrap().labels.unwrap();
            if pods["app.kubernetes.io/component"] == component {
                assert!(selector.iter().all(|(k, v)| pods.get(k) == Some(v)), "{role}: {pods:?}");
            }
        }
        let ingress = spec.ingress.unwrap();
        assert_eq!(ingress.len(), 1);
        assert_eq!(ports_of(&ingress[0].ports, "TCP"), [8080], "{role}: the HTTP, metrics and health port only");
        let egress = spec.egress.unwrap();
        assert_eq!(
            (ports_of(&egress[0].ports, "UDP"), ports_of(&egress[0].ports, "TCP")),
            (vec![53, 5353], vec![53, 5353])
        );
        assert_eq!(ports_of(&egress[1].ports, "TCP"), [5671, 5672], "{role}: the broker");
        assert_eq!(ports_of(&egress[2].ports, "TCP"), extra, "{role}: the history or the provider");
        assert_eq!(egress.len(), 3, "{role}: nothing else");
        assert!(egress.iter().all(|rule| rule.to.is_none()), "to any address");
    }

    h.edit(|c| c.spec.network_policy.enabled = false).await;
    h.reconcile().await.unwrap();

    assert!(policies.list(&ListParams::default()).await.unwrap().items.is_empty(), "pruned once turned off");
    let pruned: Vec<String> = h
        .events()
        .await
        .into_iter()
        .filter(|(_, reason, note)| reason == "Pruned" && note.contains("NetworkPolicy/"))
        .map(|(_, _, note)| note)
        .collect();
    // (One Event: the recorder folds the three deletions, one reason, into a series.)
    assert!(!pruned.is_empty(), "the deletion is said: {:?}", h.events().await);
}
