//! Leader election on a Lease: one holder at a time, and a released lease is taken at once. And the
//! rest of what the operator does in its own namespace: keeping the checksum key.

use kube::Client;
use parley_operator::{leader::LeaderElector, rbac};

mod recorder;

async fn client() -> Client {
    kube_fake_client::ClientBuilder::new().build().await.unwrap()
}

#[tokio::test]
async fn the_operators_own_namespace_needs_exactly_its_rbac_rules() {
    let recorder = recorder::Recorder::default();
    let client = recorder.wrap(client().await);
    let a = LeaderElector::new(client.clone(), "parley-system", "parley-operator", "a");
    let b = LeaderElector::new(client.clone(), "parley-system", "parley-operator", "b");
    assert!(a.try_acquire().await.unwrap());
    assert!(!b.try_acquire().await.unwrap());
    assert!(a.try_acquire().await.unwrap());
    a.release().await;
    // Two replicas starting: the first creates the checksum key, the second reads it.
    let created = parley_operator::run::checksum_key(&client, "parley-system").await.unwrap();
    assert_eq!(parley_operator::run::checksum_key(&client, "parley-system").await.unwrap(), created);
    let used = recorder.accesses();
    for access in &used {
        assert!(rbac::allows(rbac::LEADER_ELECTION, &access.group, &access.resource, &access.verb), "{access:?}");
    }
    for rule in rbac::LEADER_ELECTION {
        for verb in rule.verbs {
            assert!(
                used.iter().any(|a| a.resource == rule.resource && a.verb == *verb),
                "{verb} on {} unused",
                rule.resource
            );
        }
    }
}

#[tokio::test]
async fn only_one_replica_holds_the_lease_and_a_release_hands_it_over() {
    let client = client().await;
    let a = LeaderElector::new(client.clone(), "parley-system", "parley-operator", "a");
    let b = LeaderElector::new(client.clone(), "parley-system", "parley-operator", "b");

    assert!(a.try_acquire().await.unwrap(), "the first candidate takes the lease");
    assert!(!b.try_acquire().await.unwrap(), "a live lease is not taken");
    assert!(a.try_acquire().await.unwrap(), "the holder renews");

    a.release().await;
    assert!(b.try_acquire().await.unwrap(), "a released lease is taken at once");
    assert!(!a.try_acquire().await.unwrap());
}

mod expiry {
    use std::{sync::Arc, time::Duration};

    use k8s_openapi::{
        api::coordination::v1::{Lease, LeaseSpec},
        apimachinery::pkg::apis::meta::v1::MicroTime,
        jiff::{SignedDuration, Timestamp},
    };
    use kube::api::{Api, ObjectMeta, PostParams};
    use parley_operator::fixtures::TestClock;

    use super::*;

    /// A Lease held by "a", renewed at `renewed` by a's clock.
    async fn held_by_a(client: &Client, renewed: Timestamp) -> Api<Lease> {
        let lease = Lease {
            metadata: ObjectMeta { name: Some("parley-operator".into()), ..Default::default() },
            spec: Some(LeaseSpec {
                holder_identity: Some("a".into()),
                lease_duration_seconds: Some(15),
                renew_time: Some(MicroTime(renewed)),
                lease_transitions: Some(0),
                ..Default::default()
            }),
        };
        let leases: Api<Lease> = Api::namespaced(client.clone(), "parley-system");
        leases.create(&PostParams::default(), &lease).await.unwrap();
        leases
    }

    fn candidate(client: &Client, identity: &str, clock: &Arc<TestClock>) -> LeaderElector {
        LeaderElector::new(client.clone(), "parley-system", "parley-operator", identity).with_clock(clock.clone())
    }

    #[tokio::test]
    async fn a_lease_its_holder_stopped_renewing_is_taken_over_once_seen_unchanged_for_its_duration() {
        let client = client().await;
        // "a" renewed 20 s ago a lease of 15 s, and then went away without releasing it.
        let leases = held_by_a(&client, Timestamp::now() - SignedDuration::from_secs(20)).await;
        let clock = Arc::new(TestClock::default());
        let b = candidate(&client, "b", &clock);

        assert!(!b.try_acquire().await.unwrap(), "b has only just seen it: its expiry is timed from then");
        clock.advance(Duration::from_secs(10));
        assert!(!b.try_acquire().await.unwrap());
        clock.advance(Duration::from_secs(6));
        assert!(b.try_acquire().await.unwrap(), "unchanged for longer than its duration: taken");
        let spec = leases.get("parley-operator").await.unwrap().spec.unwrap();
        assert_eq!(spec.holder_identity.as_deref(), Some("b"));
        assert_eq!(spec.lease_transitions, Some(1), "a change of holder is counted");

        // One that b itself renews is not taken by c.
        let c = candidate(&client, "c", &clock);
        assert!(!c.try_acquire().await.unwrap());
    }

    #[tokio::test]
    async fn a_holder_whose_clock_runs_behind_keeps_its_lease_while_it_renews() {
        let client = client().await;
        // a's clock is an hour behind: every renewTime it writes looks long expired.
        let behind = Timestamp::now() - SignedDuration::from_secs(3600);
        let leases = held_by_a(&client, behind).await;
        let clock = Arc::new(TestClock::default());
        let b = candidate(&client, "b", &clock);

        for renewal in 1..=4 {
            assert!(!b.try_acquire().await.unwrap(), "a renews, so b never takes it (renewal {renewal})");
            clock.advance(Duration::from_secs(10));
            let mut lease = leases.get("parley-operator").await.unwrap();
            lease.spec.as_mut().unwrap().renew_time = Some(MicroTime(behind + SignedDuration::from_secs(10 * renewal)));
            leases.replace("parley-operator", &PostParams::default(), &lease).await.unwrap();
        }
        assert!(!b.try_acquire().await.unwrap());
    }

    #[tokio::test]
    async fn a_lease_stamped_by_a_clock_running_ahead_still_expires_when_its_holder_stops() {
        let client = client().await;
        held_by_a(&client, Timestamp::now() + SignedDuration::from_secs(3600)).await;
        let clock = Arc::new(TestClock::default());
        let b = candidate(&client, "b", &clock);
        assert!(!b.try_acquire().await.unwrap());
        clock.advance(Duration::from_secs(16));
        assert!(b.try_acquire().await.unwrap(), "a renewTime in the future does not keep a dead holder's lease");
    }
}

#[test]
fn replicas_without_pod_name_get_distinct_identities_named_for_their_host() {
    let (a, b) = (parley_operator::leader::default_identity(), parley_operator::leader::default_identity());
    assert_ne!(a, b, "two containers of one image must not share an identity");
    let host =
        std::env::var("HOSTNAME").ok().or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok()).unwrap();
    assert!(a.starts_with(&format!("{}-", host.trim())), "{a}");
}

mod leading {
    use std::{
        sync::{
            atomic::{AtomicBool, Ordering},
            Arc, Mutex,
        },
        time::Duration,
    };

    use parley_operator::leader::LEASE_DURATION;
    use tokio::time::Instant;

    use k8s_openapi::api::coordination::v1::Lease as LeaseObject;
    use kube::Api;
    use parley_operator::run::{lead, Lease};
    use tokio_util::sync::CancellationToken;

    use super::*;

    const LEASE: Lease<'static> = Lease { namespace: "parley-system", name: "parley-operator", identity: "a" };

    async fn holder(client: &Client) -> Option<String> {
        let leases: Api<LeaseObject> = Api::namespaced(client.clone(), "parley-system");
        leases.get_opt("parley-operator").await.unwrap()?.spec?.holder_identity
    }

    /// Runs `lead` for "a" with work that lasts until its token ends; returns once "a" leads.
    async fn leading(
        client: &Client,
        stop: &CancellationToken,
    ) -> (tokio::task::JoinHandle<anyhow::Result<()>>, tokio::sync::oneshot::Receiver<()>) {
        let (started, started_rx) = tokio::sync::oneshot::channel();
        let (ended, ended_rx) = tokio::sync::oneshot::channel();
        let (client, stop) = (client.clone(), stop.clone());
        let task = tokio::spawn(async move {
            lead(client, LEASE, &stop, |controllers| async move {
                let _ = started.send(());
                controllers.cancelled().await;
                let _ = ended.send(());
            })
            .await
        });
        tokio::time::timeout(Duration::from_secs(10), started_rx).await.expect("a leads").unwrap();
        (task, ended_rx)
    }

    #[tokio::test]
    async fn a_leader_stopped_by_sigterm_ends_its_work_and_releases_the_lease() {
        let client = client().await;
        let stop = CancellationToken::new();
        let (task, ended) = leading(&client, &stop).await;
        assert_eq!(holder(&client).await.as_deref(), Some("a"));

        stop.cancel();
        task.await.unwrap().expect("a clean stop is not an error");
        ended.await.expect("the work was stopped, not dropped");
        assert_eq!(holder(&client).await, None, "the lease is released on the way out");
        let b = LeaderElector::new(client, "parley-system", "parley-operator", "b");
        assert!(b.try_acquire().await.unwrap(), "a standby takes it at once, without waiting for expiry");
    }

    #[tokio::test]
    async fn a_leader_that_finds_another_holder_stops_leading() {
        let client = client().await;
        let stop = CancellationToken::new();
        let (task, ended) = leading(&client, &stop).await;

        // The lease is written under "a" by another replica (as after an expiry "a" did not notice).
        let leases: Api<LeaseObject> = Api::namespaced(client.clone(), "parley-system");
        let mut lease = leases.get("parley-operator").await.unwrap();
        lease.spec.as_mut().unwrap().holder_identity = Some("b".into());
        leases.replace("parley-operator", &Default::default(), &lease).await.unwrap();

        let result = tokio::time::timeout(Duration::from_secs(20), task).await.expect("a stops within one renewal");
        assert!(result.unwrap().is_err(), "losing the lease is an error, so the process exits non-zero");
        ended.await.expect("its work was stopped");
        assert!(stop.is_cancelled(), "the whole process is told to stop");
        assert_eq!(holder(&client).await.as_deref(), Some("b"), "a does not release a lease it does not hold");
    }

    /// An API server that stops answering: once `broken`, the first request fails at once and every
    /// later one hangs. Records when the last request that succeeded was answered.
    #[derive(Clone, Default)]
    struct Unanswering {
        broken: Arc<AtomicBool>,
        failed_once: Arc<AtomicBool>,
        last_answered: Arc<Mutex<Option<Instant>>>,
    }

    impl Unanswering {
        fn wrap(&self, inner: Client) -> Client {
            let this = self.clone();
            let service = tower::service_fn(move |request: http::Request<kube::client::Body>| {
                let (inner, this) = (inner.clone(), this.clone());
                async move {
                    if this.broken.load(Ordering::SeqCst) {
                        if !this.failed_once.swap(true, Ordering::SeqCst) {
                            return Err::<http::Response<kube::client::Body>, tower::BoxError>(
                                "connection reset".into(),
                            );
                        }
                        std::future::pending::<()>().await;
                    }
                    let response = inner.send(request).await?;
                    *this.last_answered.lock().unwrap() = Some(Instant::now());
                    Ok(response)
                }
            });
            Client::new(service, "default")
        }
    }

    #[tokio::test]
    async fn a_leader_whose_api_server_stops_answering_stops_before_its_lease_can_expire() {
        let api = Unanswering::default();
        let client = api.wrap(client().await);
        let stop = CancellationToken::new();
        let (task, ended) = leading(&client, &stop).await;

        api.broken.store(true, Ordering::SeqCst);
        let result = tokio::time::timeout(Duration::from_secs(30), task).await.expect("the leader stops");
        let stopped = Instant::now();
        assert!(result.unwrap().is_err(), "not renewing in time is an error");
        ended.await.expect("its work was stopped");
        let held = stopped - api.last_answered.lock().unwrap().expect("a renewal was answered");
        // A standby may take the Lease LEASE_DURATION after the last renewal; the leader must have
        // stopped well before (its deadline is RENEW_DEADLINE, whatever the calls in flight).
        assert!(held < LEASE_DURATION - Duration::from_secs(1), "still leading {held:?} after the last renewal");
    }
}
