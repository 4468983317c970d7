//! Leader election on a Lease: one holder at a time, and a released lease is taken at once.

use kube::Client;
use parley_operator::{leader::LeaderElector, rbac};

mod recorder;

async fn client() -> Client {
    kube_fake_client::ClientBuilder::new().build().await.unwrap()
}

#[tokio::test]
async fn leader_election_needs_exactly_its_rbac_rules() {
    let recorder = recorder::Recorder::default();
    let client = recorder.wrap(client().await);
    let a = LeaderElector::new(client.clone(), "parley-system", "parley-operator", "a");
    let b = LeaderElector::new(client, "parley-system", "parley-operator", "b");
    assert!(a.try_acquire().await.unwrap());
    assert!(!b.try_acquire().await.unwrap());
    assert!(a.try_acquire().await.unwrap());
    a.release().await;
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

#[tokio::test]
async fn a_lease_its_holder_stopped_renewing_is_taken_over_after_it_expires() {
    use k8s_openapi::{
        api::coordination::v1::{Lease, LeaseSpec},
        apimachinery::pkg::apis::meta::v1::MicroTime,
        jiff::{SignedDuration, Timestamp},
    };
    use kube::api::{Api, ObjectMeta, PostParams};

    let client = client().await;
    // "a" renewed 20 s ago a lease of 15 s, and then went away without releasing it.
    let stale = Lease {
        metadata: ObjectMeta { name: Some("parley-operator".into()), ..Default::default() },
        spec: Some(LeaseSpec {
            holder_identity: Some("a".into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(Timestamp::now() - SignedDuration::from_secs(20))),
            lease_transitions: Some(0),
            ..Default::default()
        }),
    };
    let leases: Api<Lease> = Api::namespaced(client.clone(), "parley-system");
    leases.create(&PostParams::default(), &stale).await.unwrap();

    let b = LeaderElector::new(client.clone(), "parley-system", "parley-operator", "b");
    assert!(b.try_acquire().await.unwrap(), "an expired lease is taken");
    let spec = leases.get("parley-operator").await.unwrap().spec.unwrap();
    assert_eq!(spec.holder_identity.as_deref(), Some("b"));
    assert_eq!(spec.lease_transitions, Some(1), "a change of holder is counted");

    // One that is still fresh is not.
    let c = LeaderElector::new(client, "parley-system", "parley-operator", "c");
    assert!(!c.try_acquire().await.unwrap());
}
