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
