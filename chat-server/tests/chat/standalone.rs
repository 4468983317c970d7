//! The exact laptop command, on the in-process bus and on RabbitMQ.

use crate::support::*;

async fn chat_translates(server: &Server) {
    let chat = unique_chat();
    let mut subscriber = WsClient::connect(&server.ws(), Wire::TransportWs).await;
    subscriber.subscribe_messages("1", &server.http(), &chat, Some(&["es", "ca"])).await;
    let id = send(&server.http(), &chat, "Good morning, how are you?").await;
    let messages = subscriber.collect_message(&id, 3, DELIVERY).await;
    assert_translated_good_morning(&messages, &id);
}

/// `chat-server standalone` translating into Spanish and Catalan with `apertium`, plus `extra` arguments.
async fn standalone(apertium: &Apertium, extra: &[&str]) -> Server {
    let args = ["standalone", "--languages", "es,ca", "--translator", "apertium", "--translator-url", &apertium.url];
    Server::start(&[&args[..], extra].concat()).await
}

#[tokio::test]
async fn standalone_on_the_in_process_bus_gives_a_translated_chat() {
    let apertium = Apertium::start().await;
    chat_translates(&standalone(&apertium, &[]).await).await;
}

#[tokio::test]
async fn standalone_on_rabbitmq_gives_a_translated_chat() {
    let apertium = Apertium::start().await;
    let prefix = unique_prefix("standalone");
    let url = amqp_url();
    let server = standalone(&apertium, &["--amqp-url", &url, "--topology-prefix", &prefix]).await;
    chat_translates(&server).await;
}
