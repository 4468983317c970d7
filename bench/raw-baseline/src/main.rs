//! raw-baseline: what this machine can broadcast at best. Each `sendMessage` is encoded once into a
//! graphql-transport-ws `next` frame and the same bytes go to every subscriber of the chat: no GraphQL
//! execution, no broker. It speaks just enough of the protocol for chat-bench, which gives every
//! subscription the operation id "1" (so one frame fits every subscriber).

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
};

use axum::{
    extract::{
        ws::{Message, Utf8Bytes, WebSocket, WebSocketUpgrade},
        State,
    },
    routing::get,
    serve::ListenerExt,
    Json, Router,
};
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::broadcast;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:8090")]
    listen: std::net::SocketAddr,
}

#[derive(Default)]
struct Chats {
    rooms: Mutex<HashMap<String, broadcast::Sender<Utf8Bytes>>>,
    next_id: AtomicU64,
}

impl Chats {
    fn room(&self, chat: &str) -> broadcast::Sender<Utf8Bytes> {
        self.rooms.lock().expect("rooms").entry(chat.to_owned()).or_insert_with(|| broadcast::channel(4096).0).clone()
    }
}

async fn send_message(State(chats): State<Arc<Chats>>, Json(request): Json<Value>) -> Json<Value> {
    let variables = &request["variables"];
    let (Some(chat), Some(text)) = (variables["chatId"].as_str(), variables["text"].as_str()) else {
        return Json(json!({"errors": [{"message": "sendMessage needs variables chatId and text"}]}));
    };
    let id = chats.next_id.fetch_add(1, Ordering::Relaxed).to_string();
    let frame = json!({"type": "next", "id": "1", "payload": {"data": {"messages": {"id": id, "text": text}}}});
    let _ = chats.room(chat).send(Utf8Bytes::from(frame.to_string()));
    Json(json!({"data": {"sendMessage": {"id": id}}}))
}

async fn subscriber(socket: WebSocket, chats: Arc<Chats>) {
    let (mut sink, mut source) = socket.split();
    let mut frames: Option<broadcast::Receiver<Utf8Bytes>> = None;
    loop {
        tokio::select! {
            incoming = source.next() => match incoming {
                Some(Ok(Message::Text(text))) => {
                    let message: Value = serde_json::from_str(text.as_str()).unwrap_or_default();
                    match message["type"].as_str() {
                        Some("connection_init") => {
                            let _ = sink.send(Message::Text(r#"{"type":"connection_ack"}"#.into())).await;
                        }
                        Some("subscribe") => {
                            let chat = message["payload"]["variables"]["chatId"].as_str().unwrap_or_default();
                            frames = Some(chats.room(chat).subscribe());
                        }
                        _ => {}
                    }
                }
                Some(Ok(_)) => {}
                _ => break,
            },
            frame = async { frames.as_mut().expect("guarded").recv().await }, if frames.is_some() => match frame {
                Ok(frame) => {
                    // Whatever else is already waiting goes out in the same write, as in Parley's gateway.
                    let mut written = sink.feed(Message::Text(frame)).await;
                    while let (Ok(()), Ok(frame)) = (&written, frames.as_mut().expect("guarded").try_recv()) {
                        written = sink.feed(Message::Text(frame)).await;
                    }
                    if written.is_err() || sink.flush().await.is_err() {
                        break;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => break,
            },
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let chats = Arc::new(Chats::default());
    let app = Router::new()
        .route(
            "/graphql",
            get(|State(chats): State<Arc<Chats>>, ws: WebSocketUpgrade| async move {
                ws.protocols(["graphql-transport-ws"])
                    // The same socket buffers as Parley's gateway, so memory compares like for like.
                    .read_buffer_size(2 * 1024)
                    .write_buffer_size(16 * 1024)
                    .on_upgrade(move |socket| subscriber(socket, chats))
            })
            .post(send_message),
        )
        .route("/readyz", get(|| async { "ready" }))
        .with_state(chats);
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    eprintln!("raw-baseline on http://{}/graphql", listener.local_addr()?);
    // As in Parley's gateway: no Nagle delay on small frames.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app).await?;
    Ok(())
}
