//! One message, one trace: the W3C trace context travels in AMQP headers from `sendMessage` through
//! the translator and the fanout to the gateway's delivery. Each role's log lines for the message
//! carry its trace id, and with `--otlp-endpoint` each role exports its spans of that trace over
//! OTLP/HTTP, parented along the way the message went.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{body::Bytes, extract::State, routing::post, Router};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use prost::Message;

use crate::support::*;

/// One span as exported: the service that sent it, its name and its ids (hex).
#[derive(Debug, Clone)]
struct Exported {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
}

/// An OTLP/HTTP receiver: decodes every `ExportTraceServiceRequest` POSTed to `/v1/traces`, as a
/// collector does, and keeps the spans.
struct Receiver {
    url: String,
    spans: Arc<Mutex<Vec<Exported>>>,
    _server: tokio::task::JoinHandle<()>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn receive(State(spans): State<Arc<Mutex<Vec<Exported>>>>, body: Bytes) -> Vec<u8> {
    let request = ExportTraceServiceRequest::decode(body).expect("an OTLP protobuf export request");
    let mut kept = spans.lock().unwrap();
    for resource in request.resource_spans {
        let service = resource
            .resource
            .iter()
            .flat_map(|r| &r.attributes)
            .find(|a| a.key == "service.name")
            .and_then(|a| a.value.as_ref())
            .and_then(|v| match &v.value {
                Some(opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(s)) => Some(s.clone()),
                _ => None,
            })
            .unwrap_or_default();
        for span in resource.scope_spans.into_iter().flat_map(|s| s.spans) {
            kept.push(Exported {
                service: service.clone(),
                name: span.name,
                trace_id: hex(&span.trace_id),
                span_id: hex(&span.span_id),
                parent_span_id: hex(&span.parent_span_id),
            });
        }
    }
    ExportTraceServiceResponse::default().encode_to_vec()
}

impl Receiver {
    async fn start() -> Self {
        let spans = Arc::new(Mutex::new(Vec::new()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let app = Router::new().route("/v1/traces", post(receive)).with_state(spans.clone());
        let server = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { url, spans, _server: server }
    }

    /// The spans of `trace_id`, once at least the given number of each name has arrived.
    async fn trace(&self, trace_id: &str, names: &[(&str, usize)]) -> Vec<Exported> {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let spans: Vec<Exported> =
                self.spans.lock().unwrap().iter().filter(|s| s.trace_id == trace_id).cloned().collect();
            if names.iter().all(|(n, count)| spans.iter().filter(|s| s.name == *n).count() >= *count) {
                return spans;
            }
            assert!(tokio::time::Instant::now() < deadline, "not every span of {trace_id} was exported: {spans:#?}");
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }
}

/// Sends `text` with a W3C `traceparent` header, as a client already inside a trace does.
async fn send_traced(url: &str, chat: &str, text: &str, traceparent: &str) -> String {
    let response: serde_json::Value = reqwest::Client::new()
        .post(url)
        .header("traceparent", traceparent)
        .json(&serde_json::json!({"query": SEND, "variables": {"chatId": chat, "text": text}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    response["data"]["sendMessage"]["id"].as_str().unwrap_or_else(|| panic!("sendMessage failed: {response}")).into()
}

/// The trace id on the log line that says `what` about message `id`.
/// The trace id of the line `what` about `id` in `server`'s log, waiting for it a few seconds: a role
/// logs some lines after the work that let the test go on (a translator logs "translation published"
/// once the broker confirmed it, when the fanout may have delivered it already).
async fn trace_id_logged_by(server: &Server, id: &str, what: &str) -> Option<String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let found = trace_id_logged(&server.log_text(), id, what);
        if found.is_some() || std::time::Instant::now() > deadline {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn trace_id_logged(log: &str, id: &str, what: &str) -> Option<String> {
    let line = log.lines().find(|l| l.contains(what) && l.contains(id))?;
    let start = line.find("trace_id=")? + "trace_id=".len();
    Some(line[start..].chars().take_while(char::is_ascii_hexdigit).collect())
}

#[tokio::test]
async fn a_messages_trace_id_is_in_the_logs_and_spans_of_every_role_it_passes() {
    let receiver = Receiver::start().await;
    let extra = ["--otlp-endpoint", receiver.url.as_str()];
    let d = Deployment::with("traces", Layout { languages: &["es"], extra: &extra, ..Layout::default() }).await;
    let chat = unique_chat();
    let mut client = WsClient::connect(&d.gateway().ws(), Wire::TransportWs).await;
    client.subscribe_messages("1", &d.gateway().http(), &chat, None).await;

    // A message sent without a trace starts one at the gateway.
    let id = send(&d.gateway().http(), &chat, "Good morning").await;
    client.collect_message(&id, 2, DELIVERY).await;
    let gateway_log = d.gateway().log_text();
    let trace_id = trace_id_logged(&gateway_log, &id, "message posted")
        .unwrap_or_else(|| panic!("the gateway logs the message's trace id: {gateway_log}"));
    assert_eq!(trace_id.len(), 32, "{trace_id}");
    for (role, server, what) in [
        ("translator", &d.translators[0], "translation published"),
        ("fanout", &d.fanouts[0], "stored; publishing the delivery"),
        ("gateway", d.gateway(), "delivery received"),
    ] {
        assert_eq!(
            trace_id_logged_by(server, &id, what).await.as_deref(),
            Some(trace_id.as_str()),
            "the {role} logs '{what}' for {id} with the gateway's trace id: {}",
            server.log_text()
        );
    }

    // A client already inside a trace continues it; the translation and both deliveries join it.
    let caller_trace = uuid::Uuid::now_v7().simple().to_string();
    let caller_span = "00f067aa0ba902b7";
    let traced =
        send_traced(&d.gateway().http(), &chat, "Good night", &format!("00-{caller_trace}-{caller_span}-01")).await;
    client.collect_message(&traced, 2, DELIVERY).await;
    assert_eq!(trace_id_logged(&d.gateway().log_text(), &traced, "message posted"), Some(caller_trace.clone()));
    assert_eq!(
        trace_id_logged_by(&d.translators[0], &traced, "translation published").await,
        Some(caller_trace.clone())
    );

    // The spans, as a collector receives them: one trace, each hop a child of the one before.
    // The original and its translation each go through the fanout and reach the gateway.
    let expected = [("send_message", 1), ("translate", 1), ("fan_out", 2), ("deliver", 2)];
    let spans = receiver.trace(&caller_trace, &expected).await;
    let by_name: HashMap<&str, Vec<&Exported>> =
        expected.iter().map(|(n, _)| (*n, spans.iter().filter(|s| s.name == *n).collect())).collect();
    let send_span = by_name["send_message"][0];
    assert_eq!(send_span.service, "parley-gateway");
    assert_eq!(send_span.parent_span_id, caller_span, "the send is a child of the caller's span");
    let translate = by_name["translate"][0];
    assert_eq!(translate.service, "parley-translator");
    assert_eq!(translate.parent_span_id, send_span.span_id, "the translation follows the send");
    // The fanout handles the original (after the send) and the translation (after the translator).
    let fanned: Vec<&str> = by_name["fan_out"].iter().map(|s| s.parent_span_id.as_str()).collect();
    assert!(by_name["fan_out"].iter().all(|s| s.service == "parley-fanout"), "{spans:#?}");
    assert!(fanned.contains(&send_span.span_id.as_str()), "{spans:#?}");
    assert!(fanned.contains(&translate.span_id.as_str()), "{spans:#?}");
    // Each delivery reaching the gateway follows a fanout span.
    let fan_out_ids: Vec<&str> = by_name["fan_out"].iter().map(|s| s.span_id.as_str()).collect();
    let delivers = &by_name["deliver"];
    assert!(delivers.iter().all(|s| s.service == "parley-gateway"), "{spans:#?}");
    let parents: std::collections::HashSet<&str> = delivers.iter().map(|s| s.parent_span_id.as_str()).collect();
    assert_eq!(parents, fan_out_ids.into_iter().collect(), "each delivery follows its own fanout span: {spans:#?}");
}
