//! Against a real cluster (KUBECONFIG), with the CRD installed and an operator running:
//! a ChatDeployment becomes Ready and deleting it removes what it owns.
//!
//! Opt-in, so ignored by default: `PARLEY_E2E=1 PARLEY_E2E_BROKER_URI=amqp://… cargo test -p parley-e2e -- --ignored`.

use std::time::{Duration, Instant};

use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{Namespace, Secret},
};
use kube::{
    api::{DeleteParams, ListParams, PostParams},
    Api, Client,
};
use parley_operator::crd::ChatDeployment;

fn require_opt_in() {
    assert!(
        std::env::var("PARLEY_E2E").is_ok_and(|v| v == "1"),
        "the end-to-end suite changes a real cluster: set PARLEY_E2E=1 and KUBECONFIG to run it"
    );
}

#[tokio::test]
#[ignore = "needs a real cluster: PARLEY_E2E=1 cargo test -p parley-e2e -- --ignored"]
async fn a_chat_deployment_becomes_ready_and_its_deletion_removes_everything_it_owns() {
    require_opt_in();
    let client = Client::try_default().await.expect("KUBECONFIG points at a cluster");
    let namespace = format!("parley-e2e-{}", std::process::id());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({"metadata": {"name": namespace}})).unwrap(),
        )
        .await
        .unwrap();
    let broker =
        std::env::var("PARLEY_E2E_BROKER_URI").expect("PARLEY_E2E_BROKER_URI: an AMQP URI reachable from the cluster");
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
    let secret = serde_json::json!({"metadata": {"name": "rabbitmq"}, "stringData": {"uri": broker}});
    secrets.create(&PostParams::default(), &serde_json::from_value(secret).unwrap()).await.unwrap();
    let provider =
        std::env::var("PARLEY_E2E_APERTIUM_URL").unwrap_or_else(|_| "http://apertium.translation:2737".into());
    let chat = serde_json::json!({
        "apiVersion": "chat.parley.dev/v1alpha1", "kind": "ChatDeployment",
        "metadata": {"name": "e2e"},
        "spec": {
            "broker": {"secretRef": {"name": "rabbitmq", "key": "uri"}},
            "translation": {"provider": "apertium", "url": provider},
            "languages": [{"code": "es"}, {"code": "ca"}],
            "gateway": {"replicas": 1}, "fanout": {"replicas": 1}
        }
    });
    let chats: Api<ChatDeployment> = Api::namespaced(client.clone(), &namespace);
    chats.create(&PostParams::default(), &serde_json::from_value(chat).unwrap()).await.unwrap();

    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let chat = chats.get("e2e").await.unwrap();
        let ready = chat
            .status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
            .is_some_and(|c| c.status == "True");
        if ready {
            break;
        }
        assert!(Instant::now() < deadline, "not Ready within 5 minutes: {:?}", chat.status);
        tokio::time::sleep(Duration::from_secs(5)).await;
    }

    chats.delete("e2e", &DeleteParams::default()).await.unwrap();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &namespace);
    let deadline = Instant::now() + Duration::from_secs(120);
    while chats.get_opt("e2e").await.unwrap().is_some()
        || !deployments
            .list(&ListParams::default().labels("chat.parley.dev/deployment=e2e"))
            .await
            .unwrap()
            .items
            .is_empty()
    {
        assert!(Instant::now() < deadline, "deletion did not complete");
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    namespaces.delete(&namespace, &DeleteParams::default()).await.unwrap();
}
