//! `operator-scale`: the operator at scale. Seeds the in-memory API (kube-fake-client) with
//! `--chats` ChatDeployments of `--languages` languages each and reconciles every one of them
//! `--passes` times in turn, as the controller would, timing each reconcile and counting the API
//! requests it makes (writes apart).
//!
//! Pass 1 adds the finalizers; pass 2 creates every object and records the languages it declares (an
//! annotation, which kube-fake-client, unlike a real API server, counts as a new generation: pass 3
//! writes the status again for it); pass 4 finds nothing changed. The
//! broker Secret names a port nothing listens on, so the broker step fails at once (its cost is not
//! the operator's, and a real broker could not hold the queues of a thousand chats on this machine):
//! each reconcile of a later pass then writes exactly one thing, the Event series of the broker
//! failure. "operator" columns leave out the time spent waiting for the in-memory API. Each chat has
//! a namespace of its own by default: the in-memory API copies every object of a namespace on each
//! list, so with `--one-namespace` its lists grow with the number of chats (a real API server reads
//! a namespace's objects under their own key prefix).
//! Memory is the process's resident set after the last pass: the operator and the in-memory API
//! with every object.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use clap::Parser;
use k8s_openapi::{api::apps::v1::Deployment, api::core::v1::Secret, ByteString};
use kube::{api::ObjectMeta, client::Body, runtime::events::Reporter, Api, Client};
use parley_operator::{
    controller::reconcile,
    crd::ChatDeployment,
    fixtures,
    metrics::Metrics,
    reconcile::{Context, Settings},
};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 1000)]
    chats: usize,
    #[arg(long, default_value_t = 5)]
    languages: usize,
    #[arg(long, default_value_t = 4)]
    passes: usize,
    /// Put every chat in one namespace (`events`) instead of one namespace per chat. The in-memory
    /// API keeps objects by namespace and copies every object of a namespace on each list, so one
    /// crowded namespace makes its lists grow with the number of chats.
    #[arg(long)]
    one_namespace: bool,
}

const LANGUAGES: [&str; 8] = ["de", "fr", "it", "es", "ca", "pt", "nl", "pl"];
const NAMESPACE: &str = "events";

/// Requests, and of them writes, made through the wrapped client.
#[derive(Default)]
struct Counts {
    requests: AtomicU64,
    writes: AtomicU64,
    /// Nanoseconds spent waiting for the in-memory API, whose lists scan every object it holds: it,
    /// not the operator, is what grows with the number of chats here.
    api_nanos: AtomicU64,
}

fn counted(inner: Client, counts: Arc<Counts>) -> Client {
    let service = tower::service_fn(move |request: http::Request<Body>| {
        let (inner, counts) = (inner.clone(), counts.clone());
        async move {
            counts.requests.fetch_add(1, Ordering::Relaxed);
            if request.method() != http::Method::GET {
                counts.writes.fetch_add(1, Ordering::Relaxed);
                if std::env::var_os("OPERATOR_SCALE_SHOW_WRITES").is_some() {
                    eprintln!("{} {}", request.method(), request.uri());
                }
            }
            let start = Instant::now();
            let response = inner.send(request).await;
            counts
                .api_nanos
                .fetch_add(u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX), Ordering::Relaxed);
            response
        }
    });
    Client::new(service, "default")
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

fn resident_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.trim().strip_suffix("kB")?.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let languages: Vec<(&str, Option<i32>)> =
        LANGUAGES.iter().take(args.languages).map(|code| (*code, Some(1))).collect();
    let names: Vec<(String, String)> = (0..args.chats)
        .map(|i| {
            let namespace = if args.one_namespace { NAMESPACE.to_owned() } else { format!("events-{i:04}") };
            (namespace, format!("chat-{i:04}"))
        })
        .collect();
    let mut builder = kube_fake_client::ClientBuilder::new()
        .with_resource::<ChatDeployment>()
        .with_status_subresource::<ChatDeployment>()
        .with_status_subresource::<Deployment>();
    let mut namespaces: Vec<&String> = names.iter().map(|(ns, _)| ns).collect();
    namespaces.dedup();
    for namespace in namespaces {
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some("rabbitmq".into()),
                namespace: Some(namespace.clone()),
                ..Default::default()
            },
            data: Some([("uri".to_owned(), ByteString(b"amqp://guest:guest@127.0.0.1:1/%2f".to_vec()))].into()),
            ..Default::default()
        };
        builder = builder.with_object(secret);
    }
    for (namespace, name) in &names {
        let mut chat = fixtures::chat(&languages);
        chat.metadata.name = Some(name.clone());
        chat.metadata.namespace = Some(namespace.clone());
        // kube-fake-client 0.3 refuses a JSON-patch `test` of absent finalizers, as the tests note.
        chat.metadata.finalizers = Some(vec!["bench.parley.dev/hold".into()]);
        builder = builder.with_object(chat);
    }
    let client = builder.build().await.map_err(|e| anyhow::anyhow!("{e}"))?;
    let counts = Arc::new(Counts::default());
    let reporter = Reporter { controller: "parley-operator".into(), instance: Some("bench".into()) };
    let ctx = Arc::new(Context::new(
        counted(client.clone(), counts.clone()),
        reporter,
        Arc::new(Metrics::default()),
        Settings::new("ghcr.io/parley/chat-server:bench"),
    ));
    let spread = if args.one_namespace { "in one namespace" } else { "one namespace each" };
    println!(
        "{} ChatDeployments x {} languages, {spread}, in-memory API, reconciled one at a time",
        args.chats, args.languages
    );
    println!("pass  p50 ms  p99 ms  max ms  operator p50 ms  operator p99 ms  requests/reconcile  writes/reconcile");
    for pass in 1..=args.passes {
        let mut took = Vec::with_capacity(names.len());
        let mut own = Vec::with_capacity(names.len());
        let (requests, writes) = (counts.requests.load(Ordering::Relaxed), counts.writes.load(Ordering::Relaxed));
        for (namespace, name) in &names {
            let chat = Api::<ChatDeployment>::namespaced(client.clone(), namespace).get(name).await?;
            let (start, waited) = (Instant::now(), counts.api_nanos.load(Ordering::Relaxed));
            // The broker step fails by design (see the module doc); everything else is the operator's.
            let _ = reconcile(Arc::new(chat), ctx.clone()).await;
            let elapsed = start.elapsed();
            took.push(elapsed);
            let api = Duration::from_nanos(counts.api_nanos.load(Ordering::Relaxed) - waited);
            own.push(elapsed.saturating_sub(api));
        }
        took.sort();
        own.sort();

        let n = names.len() as f64;
        println!(
            "{pass:>4}  {:>6.2}  {:>6.2}  {:>6.2}  {:>15.2}  {:>15.2}  {:>18.1}  {:>16.1}",
            percentile(&took, 0.5).as_secs_f64() * 1e3,
            percentile(&took, 0.99).as_secs_f64() * 1e3,
            took.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
            percentile(&own, 0.5).as_secs_f64() * 1e3,
            percentile(&own, 0.99).as_secs_f64() * 1e3,
            (counts.requests.load(Ordering::Relaxed) - requests) as f64 / n,
            (counts.writes.load(Ordering::Relaxed) - writes) as f64 / n,
        );
    }
    println!(
        "resident memory: {} MiB now, {} MiB at most",
        resident_kib("VmRSS:") / 1024,
        resident_kib("VmHWM:") / 1024
    );
    Ok(())
}
