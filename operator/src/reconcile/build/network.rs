//! The NetworkPolicies of the chat's pods: one per role, selecting the pods its Deployments select.
//! Each lets in only the pods' HTTP port (GraphQL on the gateway; `/metrics` and the health endpoints
//! everywhere) and lets out only DNS and the TCP ports of what the role talks to. Peers are left open
//! (any address): the broker, database and provider may be anywhere, in the cluster or out of it.

use std::collections::BTreeSet;

use k8s_openapi::{
    api::networking::v1::{
        NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPort, NetworkPolicySpec,
    },
    apimachinery::pkg::{apis::meta::v1::LabelSelector, util::intstr::IntOrString},
};

use super::{metadata, Inputs};
use crate::{
    crd::AuthMode,
    names::{Component, HTTP_PORT},
    reconcile::validate::ValidatedChat,
};

/// The broker's AMQP ports: 5672, and 5671 for amqps://.
pub const BROKER_PORTS: [u16; 2] = [5671, 5672];
/// PostgreSQL's port, for the history database.
pub const POSTGRES_PORT: u16 = 5432;
/// Both web ports, for a provider URL whose port cannot be read.
const WEB_PORTS: [u16; 2] = [80, 443];

fn port(protocol: &str, number: u16) -> NetworkPolicyPort {
    NetworkPolicyPort { protocol: Some(protocol.into()), port: Some(IntOrString::Int(number.into())), end_port: None }
}

/// Out to any address on these TCP ports (sorted, once each).
fn tcp_out(ports: impl IntoIterator<Item = u16>) -> NetworkPolicyEgressRule {
    let ports: BTreeSet<u16> = ports.into_iter().collect();
    NetworkPolicyEgressRule { ports: Some(ports.into_iter().map(|p| port("TCP", p)).collect()), to: None }
}

/// The port an http(s) URL reaches: its own, or its scheme's (80, 443).
pub fn http_port(url: &str) -> Option<u16> {
    url::Url::parse(url.trim()).ok()?.port_or_known_default()
}

/// One NetworkPolicy per role, unless `spec.networkPolicy.enabled` is false.
pub fn network_policies(chat: &ValidatedChat, inputs: &Inputs) -> Vec<NetworkPolicy> {
    if !chat.network_policy {
        return Vec::new();
    }
    [Component::Gateway, Component::Fanout, Component::Translator]
        .into_iter()
        .map(|role| network_policy(chat, inputs, role))
        .collect()
}

fn network_policy(chat: &ValidatedChat, inputs: &Inputs, role: Component) -> NetworkPolicy {
    let names = &chat.names;
    let name = match role {
        Component::Gateway => names.gateway(),
        Component::Fanout => names.fanout(),
        _ => names.translators(),
    };
    let mut egress = vec![
        // DNS, over UDP and TCP (answers too large for UDP). Policies match the pod's port after the
        // Service's translation: OpenShift's DNS pods listen on 5353 behind port 53.
        NetworkPolicyEgressRule {
            ports: Some(vec![port("UDP", 53), port("TCP", 53), port("UDP", 5353), port("TCP", 5353)]),
            to: None,
        },
        // The broker, on the port its URI names too when that is another.
        tcp_out(BROKER_PORTS.into_iter().chain(inputs.broker_port)),
    ];
    // The fanout writes the history and the gateways read it; translators never touch it.
    if chat.history.is_some() && role != Component::Translator {
        egress.push(tcp_out(std::iter::once(POSTGRES_PORT).chain(inputs.history_port)));
    }
    if role == Component::Translator {
        egress.push(match http_port(&chat.provider_url) {
            Some(provider) => tcp_out([provider]),
            None => tcp_out(WEB_PORTS),
        });
    }
    // The OIDC issuer's discovery document and signing keys.
    if role == Component::Gateway && chat.auth.mode == AuthMode::Oidc {
        if let Some(issuer) = chat.auth.issuer.as_deref().and_then(http_port) {
            egress.push(tcp_out([issuer]));
        }
    }
    if let Some(collector) = chat.monitoring.otlp_endpoint.as_deref().and_then(http_port) {
        egress.push(tcp_out([collector]));
    }
    let http = u16::try_from(HTTP_PORT).expect("the HTTP port is a port");
    NetworkPolicy {
        metadata: metadata(names, name, role, None, inputs),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector { match_labels: Some(names.selector(role, None)), ..Default::default() }),
            policy_types: Some(vec!["Ingress".into(), "Egress".into()]),
            ingress: Some(vec![NetworkPolicyIngressRule { ports: Some(vec![port("TCP", http)]), from: None }]),
            egress: Some(egress),
        }),
    }
}
