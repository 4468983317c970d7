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
