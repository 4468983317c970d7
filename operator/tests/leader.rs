//! Leader election on a Lease: one holder at a time, and a released lease is taken at once.

use kube::Client;
use parley_operator::leader::LeaderElector;

async fn client() -> Client {
    kube_fake_client::ClientBuilder::new().build().await.unwrap()
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
