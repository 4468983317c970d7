//! The topology declared on the real RabbitMQ: idempotent, isolated per prefix, removable.

use lapin::{
    options::{BasicPublishOptions, ConfirmSelectOptions},
    BasicProperties, Channel, Connection, ConnectionProperties,
};
use parley_contract::topology::{declare, delete_all, delete_language, queue_depth, Topology};

fn amqp_url() -> String {
    std::env::var("PARLEY_TEST_AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

fn unique_topology(test: &str) -> Topology {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    Topology::new(format!("parley.test.{test}.{nanos}")).unwrap()
}

async fn connect() -> (Connection, Channel) {
    let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .unwrap_or_else(|e| panic!("RabbitMQ must run at {} for these tests: {e}", amqp_url()));
    let channel = conn.create_channel().await.unwrap();
    (conn, channel)
}

async fn depth(conn: &Connection, queue: &str) -> Option<u32> {
    let channel = conn.create_channel().await.unwrap();
    queue_depth(&channel, queue).await.unwrap().map(|d| d.messages)
}

async fn publish_posted(channel: &Channel, topology: &Topology) {
    channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let confirm = channel
        .basic_publish(
            topology.posted_exchange().as_str().into(),
            "".into(),
            BasicPublishOptions::default(),
            b"{}",
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_ack());
}

#[tokio::test]
async fn declaring_twice_is_idempotent_and_posted_reaches_every_language_and_the_fanout() {
    let (conn, channel) = connect().await;
    let t = unique_topology("idempotent");
    declare(&channel, &t, &["es", "ca"]).await.unwrap();
    declare(&channel, &t, &["es", "ca"]).await.unwrap();
    publish_posted(&channel, &t).await;
    for queue in [t.translate_queue("es"), t.translate_queue("ca"), t.fanout_queue()] {
        assert_eq!(depth(&conn, &queue).await, Some(1), "{queue}");
    }
    delete_all(&channel, &t, &["es", "ca"]).await.unwrap();
}

#[tokio::test]
async fn removed_language_queue_survives_until_drained() {
    let (conn, channel) = connect().await;
    let t = unique_topology("drain");
    declare(&channel, &t, &["es"]).await.unwrap();
    publish_posted(&channel, &t).await;
    let removed = delete_language(&conn.create_channel().await.unwrap(), &t, "es", true).await.unwrap();
    assert!(!removed, "a queue with a backlog must be kept");
    assert_eq!(depth(&conn, &t.translate_queue("es")).await, Some(1));
    let removed = delete_language(&conn.create_channel().await.unwrap(), &t, "es", false).await.unwrap();
    assert!(removed);
    assert_eq!(depth(&conn, &t.translate_queue("es")).await, None);
    delete_all(&conn.create_channel().await.unwrap(), &t, &[] as &[&str]).await.unwrap();
}

#[tokio::test]
async fn deleting_one_deployment_leaves_another_on_the_same_broker_untouched() {
    let (conn, channel) = connect().await;
    let a = unique_topology("a");
    let b = unique_topology("b");
    declare(&channel, &a, &["es"]).await.unwrap();
    declare(&channel, &b, &["es"]).await.unwrap();
    publish_posted(&channel, &b).await;
    delete_all(&channel, &a, &["es"]).await.unwrap();
    assert_eq!(depth(&conn, &a.fanout_queue()).await, None);
    assert_eq!(depth(&conn, &a.translate_queue("es")).await, None);
    assert_eq!(depth(&conn, &b.fanout_queue()).await, Some(1));
    assert_eq!(depth(&conn, &b.translate_queue("es")).await, Some(1));
    delete_all(&conn.create_channel().await.unwrap(), &b, &["es"]).await.unwrap();
}
