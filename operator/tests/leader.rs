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
