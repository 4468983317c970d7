//! `/metrics` on every role: traffic through a RabbitMQ deployment moves each role's counters and
//! histograms by what happened.

use std::collections::{BTreeSet, HashMap};

use parley_contract::chart_check;

use crate::support::*;

/// The samples of an OpenMetrics text: `name{labels}` → value.
async fn scrape(server: &Server) -> HashMap<String, f64> {
    let response = reqwest::get(format!("http://127.0.0.1:{}/metrics", server.port)).await.unwrap();
    assert!(
        response.headers()["content-type"].to_str().unwrap().starts_with("application/openmetrics-text"),
        "{:?}",
        response.headers()
    );
    let text = response.text().await.unwrap();
    assert!(text.trim_end().ends_with("# EOF"), "{text}");
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .filter_map(|line| line.rsplit_once(' ').map(|(name, value)| (name.to_owned(), value.parse().unwrap())))
        .collect()
}

fn moved(before: &HashMap<String, f64>, after: &HashMap<String, f64>, sample: &str) -> f64 {
    after.get(sample).copied().unwrap_or(0.0) - before.get(sample).copied().unwrap_or(0.0)
}

#[tokio::test]
async fn each_roles_metrics_move_by_the_traffic_that_went_through_it() {
    let d = Deployment::start("metrics", &["es"], 1).await;
    let chat = unique_chat();
    let mut client = WsClient::connect(&d.gateway().ws(), Wire::TransportWs).await;
    client.subscribe_messages("1", &d.gateway().http(), &chat, None).await;
    // The warm-up's translation may still be on its way: wait for it before the first scrape.
    let warmup = send(&d.gateway().http(), &chat, "Good night").await;
    client.collect_message(&warmup, 2, DELIVERY).await;

    let roles = [d.gateway(), &d.fanouts[0], &d.translators[0]];
    let mut before = Vec::new();
    for role in roles {
        before.push(scrape(role).await);
    }
    let texts = ["Good morning", "How are you?", "See you tomorrow"];
    let mut ids = Vec::new();
    for text in texts {
        ids.push(send(&d.gateway().http(), &chat, text).await);
    }
    let mut received = Vec::new();
    while received.iter().filter(|m: &&serde_json::Value| ids.iter().any(|id| m["id"] == id.as_str())).count() < 6 {
        let next = client.collect(1, DELIVERY).await;
        assert!(!next.is_empty(), "not every message arrived in en and es: {received:?}");
        received.extend(next);
    }
    let mut after = Vec::new();
    for role in roles {
        after.push(scrape(role).await);
    }
    let (gateway, fanout, translator) = ((&before[0], &after[0]), (&before[1], &after[1]), (&before[2], &after[2]));

    let m = |(b, a): (&HashMap<String, f64>, &HashMap<String, f64>), sample: &str| moved(b, a, sample);
    assert_eq!(m(gateway, "parley_messages_posted_total{result=\"accepted\"}"), 3.0);
    assert_eq!(m(gateway, "parley_deliveries_total"), 6.0, "3 originals and 3 translations, once each");
    assert_eq!(m(gateway, "parley_delivered_latency_seconds_count{language=\"en\"}"), 3.0);
    assert_eq!(m(gateway, "parley_delivered_latency_seconds_count{language=\"es\"}"), 3.0);
    assert_eq!(gateway.1["parley_connections{protocol=\"graphql-transport-ws\"}"], 1.0);
    assert_eq!(gateway.1["parley_subscriptions"], 1.0);
    assert_eq!(gateway.1["parley_shared_groups"], 1.0);
    for role in [gateway, fanout, translator] {
        assert_eq!(role.1["parley_ready"], 1.0, "every role is connected and says so");
    }

    assert_eq!(m(fanout, "parley_fanout_batch_size_sum"), 6.0, "every original and translation stored once");
    assert!(m(fanout, "parley_history_store_seconds_count") >= 1.0);
    assert!(m(fanout, "parley_fanout_batch_size_count") == m(fanout, "parley_history_store_seconds_count"));

    let translated = "parley_translations_total{language=\"es\",provider=\"apertium\",result=\"translated\"}";
    assert_eq!(m(translator, translated), 3.0);
    assert!(m(translator, "parley_provider_call_seconds_count{language=\"es\",provider=\"apertium\"}") >= 1.0);
    assert_eq!(m(translator, "parley_translated_latency_seconds_count{language=\"es\"}"), 3.0);
    assert_eq!(
        translator.1.get("parley_provider_errors_total{language=\"es\",provider=\"apertium\",kind=\"transient\"}"),
        None,
        "no provider error"
    );
}

/// The chart's Grafana dashboard and alert rules query only what the roles really export.
#[tokio::test]
async fn the_charts_dashboard_and_alerts_use_only_metrics_the_roles_export() {
    let d = Deployment::start("metric-names", &["es"], 1).await;
    let mut exported = BTreeSet::new();
    for role in [d.gateway(), &d.fanouts[0], &d.translators[0]] {
        let url = format!("http://127.0.0.1:{}/metrics", role.port);
        exported.extend(chart_check::declared(&reqwest::get(url).await.unwrap().text().await.unwrap()));
    }
    // The operator's own are checked against its registry by its tests.
    let unknown = chart_check::unknown(&exported, "parley_", Some("parley_operator_"));
    assert!(unknown.is_empty(), "the chart queries metrics no role exports: {unknown:?}; exported: {exported:?}");
}
