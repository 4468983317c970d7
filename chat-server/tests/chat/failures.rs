//! Failure paths over RabbitMQ: nothing is dropped silently.

use std::time::Duration;

use crate::support::*;
use lapin::{Connection, ConnectionProperties};

async fn dead_letters(prefix: &str) -> Option<u32> {
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default()).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    let topology = parley_contract::topology::Topology::new(prefix).unwrap();
    parley_contract::topology::queue_depth(&channel, &topology.dead_letters()).await.unwrap().map(|d| d.messages)
}

#[tokio::test]
async fn a_message_the_provider_cannot_translate_is_dead_lettered_not_dropped() {
    let apertium = Apertium::start().await;
    let prefix = unique_prefix("dead-letter");
    let url = amqp_url();
    // The harness's Apertium has no English→German pair.
    let broker = broker_args(&prefix, &url, "de");
    let gateway = Server::start(&[&["gateway"], broker.as_slice()].concat()).await;
    let _fanout = Server::start(&[&["fanout"], broker.as_slice()].concat()).await;
    let german = Deployment::spawn_translator(&prefix, "de", &apertium.url).ready().await;
    let chat = unique_chat();
    let mut subscriber = WsClient::connect(&gateway.ws(), Wire::TransportWs).await;
    subscriber.subscribe_messages("1", &gateway.http(), &chat, None).await;
    let before = dead_letters(&prefix).await.unwrap();

    let id = send(&gateway.http(), &chat, "Good morning").await;

    assert_eq!(subscriber.collect_message(&id, 1, DELIVERY).await.len(), 1, "the original is delivered");
    let deadline = std::time::Instant::now() + DELIVERY;
    while dead_letters(&prefix).await.unwrap() == before {
        assert!(std::time::Instant::now() < deadline, "the untranslatable message never reached {prefix}.dead");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(german.log_text().contains("dead-lettering"), "the translator says why");
}

#[tokio::test]
async fn a_translator_retries_a_provider_that_is_down_and_translates_once_it_is_up() {
    let provider_port = free_port();
    let provider_url = format!("http://127.0.0.1:{provider_port}");
    let prefix = unique_prefix("provider-down");
    let url = amqp_url();
    let broker = broker_args(&prefix, &url, "es");
    let gateway = Server::start(&[&["gateway"], broker.as_slice()].concat()).await;
    let _fanout = Server::start(&[&["fanout"], broker.as_slice()].concat()).await;
    let _spanish = Deployment::spawn_translator(&prefix, "es", &provider_url).ready().await;
    let chat = unique_chat();
    let mut subscriber = WsClient::connect(&gateway.ws(), Wire::TransportWs).await;
    subscriber.subscribe_messages("1", &gateway.http(), &chat, None).await;

    let id = send(&gateway.http(), &chat, "Good morning, how are you?").await;
    let early = subscriber.collect_message(&id, 2, Duration::from_secs(2)).await;
    assert_eq!(early.len(), 1, "only the original while the provider is down");

    let _apertium = Apertium::start_on(provider_port).await;
    let late = subscriber.collect_message(&id, 1, Duration::from_secs(60)).await;
    assert_eq!(late.len(), 1, "the translation arrives once the provider is back");
    assert!(late[0]["text"].as_str().unwrap().contains("Buenos días"), "{}", late[0]);
    assert_eq!(dead_letters(&prefix).await, Some(0), "nothing was dead-lettered");
}
