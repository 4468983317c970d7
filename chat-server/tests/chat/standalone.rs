//! The README's standalone command (with a free port and the test's own APY in place of 8080 and
//! 2737), on the in-process bus and on RabbitMQ.

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
    let server = standalone(&apertium, &[]).await;
    chat_translates(&server).await;
    // What the quickstart shows it printing.
    let log = server.log_text();
    for line in [
        "no --amqp-url: running on the in-process bus",
        "fanout consuming",
        "translator consuming language=es provider=\"apertium\"",
        "translator consuming language=ca provider=\"apertium\"",
        "gateway serving GraphQL on /graphql",
    ] {
        assert!(log.contains(line), "the log says {line:?}:\n{log}");
    }
}

#[tokio::test]
async fn standalone_on_rabbitmq_gives_a_translated_chat() {
    let apertium = Apertium::start().await;
    let prefix = unique_prefix("standalone");
    let url = amqp_url();
    let server = standalone(&apertium, &["--amqp-url", &url, "--topology-prefix", &prefix]).await;
    chat_translates(&server).await;
}
