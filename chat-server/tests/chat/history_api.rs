//! The history operations over GraphQL: paging, threads, the room list, retention, bad arguments, and
//! what a gateway without a history answers. Standalone keeps its history in memory.

use std::time::Duration;

use serde_json::{json, Value};

use crate::support::*;

const HISTORY: &str = "query($chatId: ID!, $last: Int, $before: Int, $languages: [String!]) { \
    messages(chatId: $chatId, last: $last, before: $before, languages: $languages) { id seq text language replyTo replyCount } }";

async fn standalone(extra: &[&str]) -> Server {
    Server::start(&[&["standalone", "--languages", ""], extra].concat()).await
}

fn code(response: &Value) -> &str {
    response["errors"][0]["extensions"]["code"].as_str().unwrap_or_else(|| panic!("no error code in {response}"))
}

/// Sends `count` messages and waits until the history has them.
async fn sent_and_stored(server: &Server, chat: &str, count: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..count {
        ids.push(send(&server.http(), chat, &format!("message {i}")).await);
    }
    let deadline = tokio::time::Instant::now() + DELIVERY;
    loop {
        let response = graphql(&server.http(), HISTORY, json!({"chatId": chat, "last": 500})).await;
        if response["data"]["messages"].as_array().is_some_and(|m| m.len() >= count) {
            return ids;
        }
        assert!(tokio::time::Instant::now() < deadline, "the history never held {count} messages: {response}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn texts(response: &Value) -> Vec<String> {
    response["data"]["messages"].as_array().unwrap().iter().map(|m| m["text"].as_str().unwrap().to_owned()).collect()
}

#[tokio::test]
async fn history_pages_backwards_from_the_newest_in_ascending_order() {
    let server = standalone(&[]).await;
    let chat = unique_chat();
    sent_and_stored(&server, &chat, 53).await;
    let newest = graphql(&server.http(), HISTORY, json!({"chatId": chat, "last": 3})).await;
    assert_eq!(texts(&newest), ["message 50", "message 51", "message 52"]);
    let first_seq = newest["data"]["messages"][0]["seq"].as_i64().unwrap();
    let older = graphql(&server.http(), HISTORY, json!({"chatId": chat, "last": 3, "before": first_seq})).await;
    assert_eq!(texts(&older), ["message 47", "message 48", "message 49"]);
    let default = graphql(&server.http(), HISTORY, json!({"chatId": chat})).await;
    let default = texts(&default);
    assert_eq!((default.len(), default[0].as_str()), (50, "message 3"), "last defaults to the newest 50");
    let empty = graphql(&server.http(), HISTORY, json!({"chatId": unique_chat()})).await;
    assert_eq!(empty["data"]["messages"], json!([]));
}

#[tokio::test]
async fn a_reply_joins_the_thread_of_its_message_and_counts_in_it() {
    let server = standalone(&[]).await;
    let chat = unique_chat();
    let root = sent_and_stored(&server, &chat, 1).await.remove(0);
    let reply = "mutation($chatId: ID!, $text: String!, $replyTo: ID) { sendMessage(chatId: $chatId, text: $text, replyTo: $replyTo) { id replyTo } }";
    let answered = graphql(&server.http(), reply, json!({"chatId": chat, "text": "an answer", "replyTo": root})).await;
    assert_eq!(answered["data"]["sendMessage"]["replyTo"], root, "{answered}");
    send(&server.http(), &chat, "not in the thread").await;
    sent_and_stored(&server, &chat, 0).await;
    let deadline = tokio::time::Instant::now() + DELIVERY;
    let thread = loop {
        let q = "query($id: ID!) { thread(messageId: $id) { text replyTo replyCount } }";
        let thread = graphql(&server.http(), q, json!({"id": root})).await;
        if thread["data"]["thread"].as_array().is_some_and(|t| t.len() == 2) {
            break thread;
        }
        assert!(tokio::time::Instant::now() < deadline, "{thread}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let messages = thread["data"]["thread"].as_array().unwrap();
    assert_eq!(messages[0]["text"], "message 0");
    assert_eq!(messages[0]["replyCount"], 1);
    assert_eq!(
        (messages[1]["text"].as_str(), messages[1]["replyTo"].as_str()),
        (Some("an answer"), Some(root.as_str()))
    );
}

#[tokio::test]
async fn the_room_list_shows_each_chat_with_its_last_seq_most_recent_first() {
    let server = standalone(&[]).await;
    let (older, newer) = (unique_chat(), unique_chat());
    sent_and_stored(&server, &older, 2).await;
    sent_and_stored(&server, &newer, 1).await;
    let rooms = graphql(&server.http(), "{ chats { id lastSeq lastMessageAt } }", json!({})).await;
    let rooms = rooms["data"]["chats"].as_array().unwrap().clone();
    let ids: Vec<&str> = rooms.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [newer.as_str(), older.as_str()]);
    assert_eq!((rooms[0]["lastSeq"].as_i64(), rooms[1]["lastSeq"].as_i64()), (Some(1), Some(2)));
    assert!(rooms[0]["lastMessageAt"].as_str().is_some_and(|t| t.ends_with('Z')));
}

#[tokio::test]
async fn arguments_out_of_range_are_bad_user_input() {
    let server = standalone(&[]).await;
    let chat = unique_chat();
    for variables in [
        json!({"chatId": chat, "last": 100000}),
        json!({"chatId": chat, "last": 501}),
        json!({"chatId": chat, "last": 0}),
        json!({"chatId": chat, "before": -1}),
    ] {
        let response = graphql(&server.http(), HISTORY, variables.clone()).await;
        assert_eq!(code(&response), "BAD_USER_INPUT", "{variables}: {response}");
    }
    let most = graphql(&server.http(), HISTORY, json!({"chatId": chat, "last": 500})).await;
    assert_eq!(most["data"]["messages"], json!([]), "500 is the most one page holds: {most}");
    let reply = "mutation($replyTo: ID) { sendMessage(chatId: \"c\", text: \"hi\", replyTo: $replyTo) { id } }";
    for unknown in [uuid::Uuid::now_v7().to_string(), "not-an-id".to_owned()] {
        let response = graphql(&server.http(), reply, json!({"replyTo": unknown})).await;
        assert_eq!(code(&response), "BAD_USER_INPUT", "{response}");
    }
    let mut client = WsClient::connect(&server.ws(), Wire::TransportWs).await;
    client.start("1", RESUME, json!({"chatId": chat, "after": -1})).await;
    let refused = client.result_of("1", DELIVERY).await;
    assert_eq!(code(&refused), "BAD_USER_INPUT", "{refused}");
}

/// Waits until retention has deleted every message of `chat`.
async fn until_expired(server: &Server, chat: &str, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let response = graphql(&server.http(), HISTORY, json!({"chatId": chat})).await;
        if response["data"]["messages"] == json!([]) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "nothing expired: {response}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn retention_deletes_old_messages_and_numbering_goes_on() {
    let server = standalone(&["--history-retention", "1s"]).await;
    let chat = unique_chat();
    sent_and_stored(&server, &chat, 3).await;
    until_expired(&server, &chat, Duration::from_secs(20)).await;
    sent_and_stored(&server, &chat, 1).await;
    let response = graphql(&server.http(), HISTORY, json!({"chatId": chat})).await;
    assert_eq!(response["data"]["messages"][0]["seq"], 4, "{response}");
}

#[tokio::test]
async fn on_postgresql_one_of_two_fanouts_enforces_retention_and_numbering_goes_on() {
    let layout = Layout { fanouts: 2, history: true, extra: &["--history-retention", "1s"], ..Layout::default() };
    let d = Deployment::with("retention", layout).await;
    let (server, chat) = (d.gateway(), unique_chat());
    sent_and_stored(server, &chat, 3).await;
    until_expired(server, &chat, Duration::from_secs(30)).await;
    let enforcing = d.fanouts.iter().filter(|f| f.log_text().contains("enforces the history's retention")).count();
    assert_eq!(enforcing, 1, "one fanout deletes");
    sent_and_stored(server, &chat, 1).await;
    let response = graphql(&server.http(), HISTORY, json!({"chatId": chat})).await;
    assert_eq!(response["data"]["messages"][0]["seq"], 4, "{response}");
}

#[tokio::test]
async fn a_gateway_without_a_history_says_history_disabled() {
    let d = Deployment::start("no-history", &[], 1).await;
    let http = d.gateway().http();
    let chat = unique_chat();
    let id = uuid::Uuid::now_v7().to_string();
    let reply = "mutation($id: ID) { sendMessage(chatId: \"c\", text: \"hi\", replyTo: $id) { id } }";
    for (query, variables) in [
        (HISTORY, json!({"chatId": chat})),
        ("query($id: ID!) { thread(messageId: $id) { id } }", json!({"id": id})),
        ("{ chats { id } }", json!({})),
        (reply, json!({"id": id})),
    ] {
        let response = graphql(&http, query, variables).await;
        assert_eq!(code(&response), "HISTORY_DISABLED", "{query}: {response}");
    }
    let mut client = WsClient::connect(&d.gateway().ws(), Wire::TransportWs).await;
    client.start("1", RESUME, json!({"chatId": chat, "after": 0})).await;
    let refused = client.result_of("1", DELIVERY).await;
    assert_eq!(code(&refused), "HISTORY_DISABLED", "{refused}");
    // Live messages work as ever.
    client.subscribe_messages("2", &http, &chat, None).await;
}

#[tokio::test]
async fn standalone_keeps_its_history_in_memory_only() {
    let chat = unique_chat();
    let mut first = standalone(&[]).await;
    sent_and_stored(&first, &chat, 2).await;
    assert!(first.terminate().success());
    let second = standalone(&[]).await;
    let history = graphql(&second.http(), HISTORY, json!({"chatId": chat})).await;
    assert_eq!(history["data"]["messages"], json!([]), "lost on exit: {history}");
}

#[tokio::test]
async fn a_gateway_needs_no_more_than_read_access_to_the_history() {
    use sqlx::Connection as _;
    let database = TestDatabase::create().await;
    let prefix = unique_prefix("read-only");
    let _cleanup = TopologyCleanup::new(&prefix, &[]);
    let url = amqp_url();
    let broker = broker_args(&prefix, &url, "");
    // The fanout migrates and writes.
    let fanout =
        Server::start(&[&["fanout"], broker.as_slice(), &["--history-url", database.url.as_str()]].concat()).await;

    // A role that may only read what the fanout created.
    let reader = format!("reader_{}", uuid::Uuid::now_v7().simple());
    let mut admin = sqlx::PgConnection::connect(&database.url).await.unwrap();
    for statement in [
        format!("CREATE ROLE {reader} LOGIN PASSWORD 'reader'"),
        format!("GRANT USAGE ON SCHEMA public TO {reader}"),
        format!("GRANT SELECT ON ALL TABLES IN SCHEMA public TO {reader}"),
    ] {
        sqlx::query(&statement).execute(&mut admin).await.unwrap();
    }
    let (_, host_and_database) = database.url.split_once('@').unwrap();
    let read_only = format!("postgres://{reader}:reader@{host_and_database}");
    let gateway =
        Server::start(&[&["gateway"], broker.as_slice(), &["--history-url", read_only.as_str()]].concat()).await;

    let chat = unique_chat();
    let mut client = WsClient::connect(&gateway.ws(), Wire::TransportWs).await;
    client.subscribe_messages("1", &gateway.http(), &chat, None).await;
    let root = send(&gateway.http(), &chat, "read me").await;
    assert_eq!(client.collect_message(&root, 1, DELIVERY).await.len(), 1);
    let reply = "mutation($c: ID!, $r: ID) { sendMessage(chatId: $c, text: \"a reply\", replyTo: $r) { id } }";
    let answered = graphql(&gateway.http(), reply, json!({"c": chat, "r": root})).await;
    assert!(answered["data"]["sendMessage"]["id"].is_string(), "a reply checks its parent by reading: {answered}");
    let history = graphql(&gateway.http(), HISTORY, json!({"chatId": chat})).await;
    assert!(texts(&history).contains(&"read me".to_owned()), "{history}");
    let rooms = graphql(&gateway.http(), "{ chats { id } }", json!({})).await;
    assert!(rooms.to_string().contains(&chat), "{rooms}");
    let thread =
        graphql(&gateway.http(), "query($id: ID!) { thread(messageId: $id) { id } }", json!({"id": root})).await;
    assert!(thread["errors"].is_null(), "{thread}");

    drop((gateway, fanout));
    for statement in [format!("DROP OWNED BY {reader}"), format!("DROP ROLE {reader}")] {
        sqlx::query(&statement).execute(&mut admin).await.unwrap();
    }
}
