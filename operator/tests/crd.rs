//! The checked-in CRD is the one the Rust types generate.

#[test]
fn checked_in_crd_matches_the_rust_types() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../crds/chat.parley.dev_chatdeployments.yaml");
    let checked_in = std::fs::read_to_string(path).expect("crds/chat.parley.dev_chatdeployments.yaml exists");
    assert!(
        checked_in == parley_operator::crd_yaml(),
        "crds/ is stale: run `cargo run -p parley-operator -- crd > crds/chat.parley.dev_chatdeployments.yaml`"
    );
}

#[test]
fn checked_in_rbac_rules_match_the_operator() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../charts/parley-operator/files/rbac-rules.yaml");
    let checked_in = std::fs::read_to_string(path).expect("the chart's rbac-rules.yaml exists");
    assert!(
        checked_in == parley_operator::rbac::rules_yaml(),
        "the chart's RBAC rules are stale: run `cargo run -p parley-operator -- rbac > charts/parley-operator/files/rbac-rules.yaml`"
    );
}

#[test]
fn the_chart_ships_the_same_crd() {
    let top = concat!(env!("CARGO_MANIFEST_DIR"), "/../crds/chat.parley.dev_chatdeployments.yaml");
    let chart =
        concat!(env!("CARGO_MANIFEST_DIR"), "/../charts/parley-operator/crds/chat.parley.dev_chatdeployments.yaml");
    assert!(
        std::fs::read_to_string(top).unwrap() == std::fs::read_to_string(chart).unwrap(),
        "copy crds/ into the chart"
    );
}

#[test]
fn kubectl_knows_chat_deployments_as_chat_with_their_languages_phase_and_readiness() {
    use kube::CustomResourceExt;
    let crd = parley_operator::crd::ChatDeployment::crd();
    assert!(crd.spec.names.short_names.unwrap_or_default().contains(&"chat".to_owned()), "`kubectl get chat`");
    let version = &crd.spec.versions[0];
    let columns: Vec<(String, String)> = version
        .additional_printer_columns
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|c| (c.name, c.json_path))
        .collect();
    // A real API server prints a list JSONPath's first element only: columns read scalars.
    for (name, path) in [
        ("Languages", ".status.languages"),
        ("Phase", ".status.phase"),
        ("Ready", ".status.conditions[?(@.type==\"Ready\")].status"),
        ("Backlog", ".status.backlog"),
        ("Gateway", ".status.gateway.endpoint"),
    ] {
        assert!(columns.contains(&(name.into(), path.into())), "{name} column: {columns:?}");
    }
    let wide: Vec<String> = version
        .additional_printer_columns
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter(|c| c.priority == Some(1))
        .map(|c| c.name)
        .collect();
    assert_eq!(wide, ["Backlog", "Gateway"], "-o wide adds the backlog and the gateway's endpoint");
    assert!(version.subresources.as_ref().and_then(|s| s.status.as_ref()).is_some(), "status is a subresource");
}
