//! The CRD and the operator's ChatDeployment-facing behaviour against a real API server: the
//! standalone `apiextensions-apiserver` on etcd that `scripts/apiserver.sh` builds and starts (or a
//! full kube-apiserver, with `KUBEBUILDER_ASSETS`). It serves custom resources only, so what needs
//! Deployments or Secrets stays with the in-memory API of `reconcile.rs`.
//!
//! Ignored by a plain `cargo test`: `scripts/test` starts the server and runs these with
//! `PARLEY_APISERVER_KUBECONFIG` naming its kubeconfig.

use std::{sync::Arc, time::Duration};

use futures_util::StreamExt;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{
    api::{ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{events::Reporter, watcher, WatchStreamExt},
    Api, Client, Config, ResourceExt,
};
use parley_operator::{
    controller::reconcile,
    crd::ChatDeployment,
    metrics::Metrics,
    names::{FIELD_MANAGER, FINALIZER},
    reconcile::{
        apply::{applies_replicas_of, hand_over_replicas},
        Context, Settings,
    },
};
use serde_json::{json, Value};

fn kubeconfig() -> String {
    std::env::var("PARLEY_APISERVER_KUBECONFIG")
        .expect("PARLEY_APISERVER_KUBECONFIG names the kubeconfig of a running `scripts/apiserver.sh start` (scripts/test sets it)")
}

/// A client of the real API server, with the CRD installed and Established.
async fn client() -> Client {
    // kube and sqlx both build rustls with ring; a test build may also bring aws-lc-rs.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let kubeconfig = Kubeconfig::read_from(kubeconfig()).unwrap();
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await.unwrap();
    let client = Client::try_from(config).unwrap();
    let crd: CustomResourceDefinition = serde_yaml::from_str(&parley_operator::crd_yaml()).unwrap();
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.patch(&crd.name_any(), &PatchParams::apply("parley-tests").force(), &Patch::Apply(&crd)).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let status = crds.get(&crd.name_any()).await.unwrap().status.unwrap_or_default();
        let established =
            status.conditions.unwrap_or_default().iter().any(|c| c.type_ == "Established" && c.status == "True");
        if established {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the CRD never became Established");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    client
}

/// A namespace of its own for each test (nothing serves Namespaces here: any name is accepted).
fn namespace(test: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    format!("{test}-{nanos:x}")
}

/// A valid ChatDeployment as JSON, to be changed into invalid ones.
fn valid(name: &str) -> Value {
    json!({
        "apiVersion": "chat.parley.dev/v1alpha1",
        "kind": "ChatDeployment",
        "metadata": {"name": name},
        "spec": {
            "broker": {"secretRef": {"name": "rabbitmq", "key": "uri"}},
            "translation": {"provider": "apertium", "url": "http://apertium:2737"},
            "languages": [{"code": "es", "replicas": 1}, {"code": "ca"}]
        }
    })
}

/// Turns a valid ChatDeployment into an invalid one.
type Change = dyn Fn(&mut Value);

fn dynamic(client: &Client, namespace: &str) -> Api<DynamicObject> {
    Api::namespaced_with(client.clone(), namespace, &ApiResource::erase::<ChatDeployment>(&()))
}

#[tokio::test]
#[ignore = "needs a real API server: scripts/test starts one (PARLEY_APISERVER_KUBECONFIG)"]
async fn every_example_chat_deployment_applies_to_the_installed_crd() {
    let client = client().await;
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut applied = 0;
    for entry in std::fs::read_dir(examples).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        for document in serde_yaml::Deserializer::from_str(&text) {
            let value: Value = serde::Deserialize::deserialize(document).unwrap();
            if value["kind"] != "ChatDeployment" {
                continue;
            }
            let chat: ChatDeployment = serde_json::from_value(value).unwrap();
            let ns = chat.namespace().unwrap_or_else(|| "default".into());
            let api: Api<ChatDeployment> = Api::namespaced(client.clone(), &ns);
            let params = PatchParams::apply("kubectl").force();
            let result = api.patch(&chat.name_any(), &params, &Patch::Apply(&chat)).await;
            assert!(result.is_ok(), "{} does not apply: {result:?}", path.display());
            api.delete(&chat.name_any(), &DeleteParams::default()).await.unwrap();
            applied += 1;
        }
    }
    assert!(applied >= 3, "the examples hold ChatDeployments: {applied}");
}

#[tokio::test]
#[ignore = "needs a real API server: scripts/test starts one (PARLEY_APISERVER_KUBECONFIG)"]
async fn the_crd_refuses_invalid_specs_with_their_reasons() {
    let client = client().await;
    let ns = namespace("invalid");
    let api = dynamic(&client, &ns);
    let cases: Vec<(&str, Box<Change>, &str)> = vec![
        (
            "replicas with autoscaling",
            Box::new(|c| c["spec"]["languages"][0]["autoscaling"] = json!({"maxReplicas": 3})),
            "replicas and autoscaling are mutually exclusive",
        ),
        ("a bad language code", Box::new(|c| c["spec"]["languages"][1]["code"] = json!("Spanish")), "should match"),
        (
            "an unknown provider",
            Box::new(|c| c["spec"]["translation"]["provider"] = json!("google")),
            "Unsupported value",
        ),
        (
            "no broker",
            Box::new(|c| drop(c["spec"].as_object_mut().unwrap().remove("broker"))),
            "spec.broker: Required value",
        ),
        (
            "minReplicas over maxReplicas",
            Box::new(|c| c["spec"]["languages"][1]["autoscaling"] = json!({"minReplicas": 4, "maxReplicas": 2})),
            "minReplicas must not exceed maxReplicas",
        ),
        (
            "negative replicas",
            Box::new(|c| c["spec"]["languages"][0]["replicas"] = json!(-1)),
            "should be greater than or equal to 0",
        ),
        (
            "a name that cannot name a Service",
            Box::new(|c| c["metadata"]["name"] = json!("town.hall")),
            "the name must start with a letter",
        ),
        ("a second es", Box::new(|c| c["spec"]["languages"][1]["code"] = json!("es")), "Duplicate value"),
        (
            "oidc without an audience",
            Box::new(|c| c["spec"]["auth"] = json!({"mode": "oidc", "issuer": "https://idp.example/realms/e"})),
            "mode oidc needs audience",
        ),
        (
            "oidc with an issuer that is no URL",
            Box::new(|c| c["spec"]["auth"] = json!({"mode": "oidc", "issuer": "idp.example", "audience": "parley"})),
            "mode oidc needs issuer",
        ),
        (
            "jwt without its Secret",
            Box::new(|c| c["spec"]["auth"] = json!({"mode": "jwt"})),
            "mode jwt needs jwtSecretRef",
        ),
        (
            "groups without sign-in",
            Box::new(|c| c["spec"]["auth"] = json!({"readGroups": ["attendees"]})),
            "readGroups and sendGroups need mode jwt or oidc",
        ),
        ("an unknown auth mode", Box::new(|c| c["spec"]["auth"] = json!({"mode": "basic"})), "Unsupported value"),
    ];
    for (what, change, expected) in cases {
        let mut chat = valid("town-hall");
        change(&mut chat);
        let object: DynamicObject = serde_json::from_value(chat).unwrap();
        let refused = api.create(&PostParams::default(), &object).await;
        match refused {
            Err(kube::Error::Api(e)) => {
                assert_eq!(e.code, 422, "{what}: {e:?}");
                assert!(e.message.contains(expected), "{what}: expected {expected:?} in {:?}", e.message);
            }
            other => panic!("{what} is accepted: {other:?}"),
        }
    }
    // `replicas: null` beside `autoscaling` is no replicas at all (the field is nullable, and CEL's
    // has() is false for a null): accepted, stored as null, and read by the operator as autoscaling.
    let mut chat = valid("town-hall");
    chat["spec"]["languages"][0]["replicas"] = Value::Null;
    chat["spec"]["languages"][0]["autoscaling"] = json!({"maxReplicas": 3});
    let created = api.create(&PostParams::default(), &serde_json::from_value(chat).unwrap()).await.unwrap();
    let read: ChatDeployment = serde_json::from_value(serde_json::to_value(&created).unwrap()).unwrap();
    assert_eq!(read.spec.languages[0].replicas, None);
    assert_eq!(read.spec.languages[0].autoscaling.as_ref().map(|a| a.max_replicas), Some(3));
}

#[tokio::test]
#[ignore = "needs a real API server: scripts/test starts one (PARLEY_APISERVER_KUBECONFIG)"]
async fn kubectl_get_chat_shows_every_language_and_wide_shows_backlog_and_gateway() {
    let client = client().await;
    let ns = namespace("columns");
    let api: Api<ChatDeployment> = Api::namespaced(client.clone(), &ns);
    let chat: ChatDeployment = serde_json::from_value(valid("town-hall")).unwrap();
    api.create(&PostParams::default(), &chat).await.unwrap();
    let status = json!({"status": {
        "phase": "Ready",
        "languages": "es,ca",
        "backlog": 7,
        "conditions": [{"type": "Ready", "status": "True", "reason": "AllComponentsReady", "message": "serving",
                        "lastTransitionTime": "2026-01-01T00:00:00Z"}],
        "gateway": {"replicas": 2, "readyReplicas": 2, "endpoint": "town-hall-gateway.columns.svc:80"}
    }});
    api.patch_status("town-hall", &PatchParams::default(), &Patch::Merge(&status)).await.unwrap();
    let kubectl = |wide: bool| {
        let mut command = std::process::Command::new("kubectl");
        command.args(["--kubeconfig", &kubeconfig(), "get", "chat", "town-hall", "-n", &ns]);
        if wide {
            command.args(["-o", "wide"]);
        }
        let output = command.output().expect("kubectl runs");
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8(output.stdout).unwrap()
    };
    let table = kubectl(false);
    let (header, row) = table.split_once('\n').unwrap();
    assert_eq!(
        header.split_whitespace().collect::<Vec<_>>(),
        ["NAME", "LANGUAGES", "PHASE", "READY", "AGE"],
        "{table}"
    );
    assert_eq!(row.split_whitespace().take(4).collect::<Vec<_>>(), ["town-hall", "es,ca", "Ready", "True"], "{table}");
    let wide = kubectl(true);
    let (header, row) = wide.split_once('\n').unwrap();
    assert!(header.ends_with("BACKLOG   GATEWAY"), "{wide}");
    assert!(row.trim_end().ends_with("7         town-hall-gateway.columns.svc:80"), "{wide}");
}

#[tokio::test]
#[ignore = "needs a real API server: scripts/test starts one (PARLEY_APISERVER_KUBECONFIG)"]
async fn the_operator_adds_its_finalizer_and_a_real_deletion_waits_for_it() {
    let client = client().await;
    let ns = namespace("finalizer");
    let api: Api<ChatDeployment> = Api::namespaced(client.clone(), &ns);
    let chat: ChatDeployment = serde_json::from_value(valid("town-hall")).unwrap();
    api.patch("town-hall", &PatchParams::apply("kubectl"), &Patch::Apply(&chat)).await.unwrap();
    let reporter = Reporter { controller: "parley-operator".into(), instance: Some("test".into()) };
    let ctx = Arc::new(Context::new(client.clone(), reporter, Arc::new(Metrics::default()), Settings::new("img")));

    // The first pass adds the finalizer (a JSON patch that tests the absent list, which a real
    // server, unlike the in-memory API, accepts) and nothing else.
    reconcile(Arc::new(api.get("town-hall").await.unwrap()), ctx.clone()).await.unwrap();
    let stored = api.get("town-hall").await.unwrap();
    assert_eq!(stored.finalizers(), [FINALIZER]);
    // Server-side apply keeps the spec the user's and the finalizer the operator's.
    let managers: Vec<(String, String)> = stored
        .managed_fields()
        .iter()
        .map(|m| (m.manager.clone().unwrap_or_default(), serde_json::to_string(&m.fields_v1).unwrap()))
        .collect();
    assert!(managers.iter().any(|(m, f)| m == "kubectl" && f.contains("f:spec")), "{managers:?}");
    assert!(!managers.iter().any(|(m, f)| m != "kubectl" && f.contains("f:spec")), "{managers:?}");

    // A real deletion only marks the object while the finalizer holds it.
    api.delete("town-hall", &DeleteParams::default()).await.unwrap();
    let deleting = api.get("town-hall").await.unwrap();
    assert!(deleting.metadata.deletion_timestamp.is_some(), "marked, not removed");
    let release = json!({"metadata": {"finalizers": null}});
    api.patch("town-hall", &PatchParams::default(), &Patch::Merge(&release)).await.unwrap();
    assert!(api.get_opt("town-hall").await.unwrap().is_none(), "gone once the finalizer is");
}

#[tokio::test]
#[ignore = "needs a real API server: scripts/test starts one (PARLEY_APISERVER_KUBECONFIG)"]
async fn status_goes_through_its_subresource_and_the_controllers_watch_sees_spec_changes() {
    let client = client().await;
    let ns = namespace("watch");
    let api: Api<ChatDeployment> = Api::namespaced(client.clone(), &ns);
    let mut changes = watcher(api.clone(), watcher::Config::default()).applied_objects().boxed();
    let chat: ChatDeployment = serde_json::from_value(valid("town-hall")).unwrap();
    api.create(&PostParams::default(), &chat).await.unwrap();
    let seen = tokio::time::timeout(Duration::from_secs(10), changes.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(seen.name_any(), "town-hall");
    let generation = seen.metadata.generation;

    // A status patch changes the status only, and no generation.
    let status = json!({"status": {"phase": "Progressing"}, "spec": {"sourceLanguage": "de"}});
    let patched = api.patch_status("town-hall", &PatchParams::default(), &Patch::Merge(&status)).await.unwrap();
    assert_eq!(patched.status.unwrap().phase, Some(parley_operator::crd::Phase::Progressing));
    assert_eq!(patched.spec.source_language, "en", "the spec does not change through /status");
    assert_eq!(patched.metadata.generation, generation);

    // A spec change is a new generation, and the watch brings it.
    let edit = json!({"spec": {"sourceLanguage": "de"}});
    api.patch("town-hall", &PatchParams::default(), &Patch::Merge(&edit)).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let next = tokio::time::timeout_at(deadline, changes.next()).await.unwrap().unwrap().unwrap();
        if next.spec.source_language == "de" {
            assert!(next.metadata.generation > generation);
            break;
        }
    }
}

#[tokio::test]
#[ignore = "needs a real API server: scripts/test starts one (PARLEY_APISERVER_KUBECONFIG)"]
async fn a_read_that_fails_is_written_to_status_naming_the_read() {
    let client = client().await;
    let ns = namespace("unreadable");
    let api: Api<ChatDeployment> = Api::namespaced(client.clone(), &ns);
    let chat: ChatDeployment = serde_json::from_value(valid("town-hall")).unwrap();
    api.create(&PostParams::default(), &chat).await.unwrap();
    let reporter = Reporter { controller: "parley-operator".into(), instance: Some("test".into()) };
    let ctx = Arc::new(Context::new(client.clone(), reporter, Arc::new(Metrics::default()), Settings::new("img")));

    // This server serves no Deployments: as a cluster whose API refuses a read answers, the reconcile
    // fails, and says so where an admin looks, not only in the operator's log.
    reconcile(Arc::new(api.get("town-hall").await.unwrap()), ctx.clone()).await.unwrap();
    let failed = reconcile(Arc::new(api.get("town-hall").await.unwrap()), ctx.clone()).await;
    assert!(failed.is_err(), "{failed:?}");
    let status = api.get("town-hall").await.unwrap().status.expect("a status is written");
    let ready = status.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
    assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", "ReadFailed"));
    assert!(ready.message.contains(&format!("listing the Deployments of {ns}/town-hall")), "{}", ready.message);
}

/// A stand-in kind with a defaulted `spec.replicas`, as a Deployment's: this server serves no `apps`.
async fn install_scalable(client: &Client) -> ApiResource {
    let crd: CustomResourceDefinition = serde_json::from_value(json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "scalables.test.parley.dev"},
        "spec": {
            "group": "test.parley.dev",
            "names": {"kind": "Scalable", "plural": "scalables", "singular": "scalable"},
            "scope": "Namespaced",
            "versions": [{
                "name": "v1", "served": true, "storage": true,
                "schema": {"openAPIV3Schema": {"type": "object", "properties": {"spec": {
                    "type": "object",
                    "properties": {"replicas": {"type": "integer", "default": 1}, "image": {"type": "string"}}
                }}}}
            }]
        }
    }))
    .unwrap();
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.patch(&crd.name_any(), &PatchParams::apply("parley-tests").force(), &Patch::Apply(&crd)).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !crds
        .get(&crd.name_any())
        .await
        .unwrap()
        .status
        .and_then(|s| s.conditions)
        .unwrap_or_default()
        .iter()
        .any(|c| c.type_ == "Established" && c.status == "True")
    {
        assert!(tokio::time::Instant::now() < deadline, "the stand-in CRD never became Established");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ApiResource {
        group: "test.parley.dev".into(),
        version: "v1".into(),
        api_version: "test.parley.dev/v1".into(),
        kind: "Scalable".into(),
        plural: "scalables".into(),
    }
}

#[tokio::test]
#[ignore = "needs a real API server: scripts/test starts one (PARLEY_APISERVER_KUBECONFIG)"]
async fn replicas_handed_over_before_an_apply_omits_them_keep_their_value_where_the_api_server_would_reset_them() {
    let client = client().await;
    let resource = install_scalable(&client).await;
    let api: Api<DynamicObject> = Api::namespaced_with(client, &namespace("handover"), &resource);
    let object = |name: &str, replicas: Option<i32>| {
        let mut spec = json!({"image": "chat-server"});
        if let Some(replicas) = replicas {
            spec["replicas"] = json!(replicas);
        }
        json!({"apiVersion": "test.parley.dev/v1", "kind": "Scalable", "metadata": {"name": name}, "spec": spec})
    };
    let apply = PatchParams::apply(FIELD_MANAGER).force();
    let mut kept = Vec::new();
    for (name, hand_over) in [("reset", false), ("handed-over", true)] {
        api.patch(name, &apply, &Patch::Apply(object(name, Some(3)))).await.unwrap();
        let live = api.get(name).await.unwrap();
        assert!(applies_replicas_of(&live.metadata), "the operator's apply owns replicas: {:?}", live.metadata);
        if hand_over {
            hand_over_replicas(&api, &resource, &live.metadata, Some(3)).await.unwrap();
        }
        // The next apply no longer sets replicas (a language switched to KEDA or to kubectl scale).
        api.patch(name, &apply, &Patch::Apply(object(name, None))).await.unwrap();
        let live = api.get(name).await.unwrap();
        kept.push(live.data["spec"]["replicas"].as_i64());
        if hand_over {
            assert!(!applies_replicas_of(&live.metadata), "no longer the operator's: {:?}", live.metadata);
        }
    }
    assert_eq!(kept, [Some(1), Some(3)], "omitted, the field goes and its default applies; handed over, it stays");
}
