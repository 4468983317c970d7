//! Shared subscriptions: a gateway executes each distinct subscription operation once.
//!
//! Subscribers that send the same subscription (same query, operation name and variables) join one
//! group. The group runs the operation once, encodes each result once, and hands every member a
//! frame that differs from the others only in the member's operation id (in plain frames, not even
//! that: members share the bytes). Frames wait in each connection's [`Outbox`], which is bounded: a
//! connection that lets it overflow is closed as a slow consumer instead of growing memory.
//!
//! Sharing is sound because a result depends only on the operation and the schema's data: the
//! connection's own limits (its subscription budget) are checked by the transport before joining. Anything per-connection
//! that could change a result, such as authorization, must become part of the key or be checked at join.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use async_graphql::{
    parser::types::{DocumentOperations, OperationType},
    Request, Response,
};
use axum::extract::ws::Utf8Bytes;
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use super::{
    framing::{Framing, OperationId},
    outbox::{Outbox, Outgoing},
    schema::ChatSchema,
};

/// What makes two subscriptions the same operation.
#[derive(Debug, PartialEq, Eq, Hash)]
struct Key {
    query: String,
    operation_name: Option<String>,
    variables: String,
}

struct Member {
    id: OperationId,
    framing: Framing,
    outbox: Arc<Outbox>,
}

/// Members in slots, so a member leaves in constant time.
#[derive(Default)]
struct Members {
    slots: Vec<Option<Member>>,
    free: Vec<usize>,
    live: usize,
}

impl Members {
    fn insert(&mut self, member: Member) -> usize {
        self.live += 1;
        match self.free.pop() {
            Some(slot) => {
                self.slots[slot] = Some(member);
                slot
            }
            None => {
                self.slots.push(Some(member));
                self.slots.len() - 1
            }
        }
    }

    fn remove(&mut self, slot: usize) {
        if self.slots.get_mut(slot).and_then(Option::take).is_some() {
            self.live -= 1;
            self.free.push(slot);
        }
    }

    fn iter(&self) -> impl Iterator<Item = &Member> {
        self.slots.iter().flatten()
    }
}

/// Distinct (framing, operation id) frames one result keeps for reuse across members.
const DISTINCT_FRAMES: usize = 8;

/// One running execution and the subscribers it serves.
#[derive(Default)]
struct Group {
    members: Mutex<Members>,
    cancel: CancellationToken,
}

impl Group {
    /// Hands one encoded result to every member.
    fn deliver(&self, payload: &Utf8Bytes) {
        let members = self.members.lock().expect("members lock");
        // Clients number their operations alike (most first subscriptions are "1"), so members mostly
        // share one frame outright; only the first few distinct ids are remembered.
        let mut made: Vec<(Framing, &str, Utf8Bytes)> = Vec::new();
        for member in members.iter() {
            let id = &*member.id.json;
            let frame = match made.iter().find(|(framing, made_for, _)| *framing == member.framing && *made_for == id) {
                Some((_, _, frame)) => frame.clone(),
                None => {
                    let frame = member.framing.result(&member.id, payload);
                    if made.len() < DISTINCT_FRAMES {
                        made.push((member.framing, id, frame.clone()));
                    }
                    frame
                }
            };
            // A full outbox closes its connection, which then leaves the group.
            member.outbox.push(Outgoing::frame(frame));
        }
    }

    /// Ends the operation for every member.
    fn finish(&self) {
        let members = std::mem::take(&mut *self.members.lock().expect("members lock"));
        for member in members.slots.into_iter().flatten() {
            member.outbox.push_control(Outgoing {
                frame: member.framing.complete(&member.id),
                ended: Some(member.id.raw.clone()),
            });
        }
    }
}

/// Whether a request runs in a shared group or on its own.
pub enum Sharing {
    Shared(Shareable),
    /// Executed for this client alone: anything but a plain subscription (a query, a mutation, a
    /// subscription with extensions, a request that does not parse).
    Alone {
        request: Request,
        subscription: bool,
    },
}

/// A subscription that can be shared, checked and keyed, not yet joined.
pub struct Shareable {
    key: Arc<Key>,
    request: Request,
}

/// Running groups by operation.
pub struct SharedSubscriptions {
    schema: ChatSchema,
    groups: Mutex<HashMap<Arc<Key>, Arc<Group>>>,
}

/// A subscriber's place in a group; leaving happens on drop.
pub struct Membership {
    shared: Arc<SharedSubscriptions>,
    key: Arc<Key>,
    group: Arc<Group>,
    slot: usize,
}

impl Drop for Membership {
    fn drop(&mut self) {
        let mut groups = self.shared.groups.lock().expect("groups lock");
        let mut members = self.group.members.lock().expect("members lock");
        members.remove(self.slot);
        if members.live == 0 {
            if groups.get(&self.key).is_some_and(|g| Arc::ptr_eq(g, &self.group)) {
                groups.remove(&self.key);
            }
            self.group.cancel.cancel();
        }
    }
}

/// True when `request` selects a subscription operation that parses.
fn is_subscription(request: &Request) -> bool {
    let Ok(document) = async_graphql::parser::parse_query(&request.query) else {
        return false;
    };
    let operation = match (&document.operations, request.operation_name.as_deref()) {
        (DocumentOperations::Single(operation), None) => operation,
        (DocumentOperations::Multiple(operations), Some(name)) => match operations.get(name) {
            Some(operation) => operation,
            None => return false,
        },
        // Anything ambiguous is left to async-graphql, which answers it with the right error.
        _ => return false,
    };
    operation.node.ty == OperationType::Subscription
}

impl SharedSubscriptions {
    pub fn new(schema: ChatSchema) -> Arc<Self> {
        Arc::new(Self { schema, groups: Mutex::default() })
    }

    /// How many distinct operations are running.
    pub fn groups(&self) -> usize {
        self.groups.lock().expect("groups lock").len()
    }

    /// Checks that `request` can be shared: a subscription carrying nothing beyond query, operation
    /// name and variables. Anything else is executed on its own.
    pub fn check(&self, request: Request) -> Sharing {
        let key = (request.extensions.is_empty() && request.uploads.is_empty())
            .then(|| serde_json::to_string(&request.variables).ok())
            .flatten()
            .map(|variables| Key {
                query: request.query.clone(),
                operation_name: request.operation_name.clone(),
                variables,
            });
        // A running group proves the operation is a subscription; only a new one is parsed here.
        if let Some(key) = &key {
            let running = self.groups.lock().expect("groups lock").get_key_value(key).map(|(k, _)| k.clone());
            if let Some(key) = running {
                return Sharing::Shared(Shareable { key, request });
            }
        }
        let subscription = is_subscription(&request);
        match key {
            Some(key) if subscription => Sharing::Shared(Shareable { key: Arc::new(key), request }),
            _ => Sharing::Alone { request, subscription },
        }
    }

    /// Joins the group running `operation`, starting it if there is none; results go to `outbox`.
    pub fn join(
        self: &Arc<Self>,
        operation: Shareable,
        id: OperationId,
        framing: Framing,
        outbox: Arc<Outbox>,
    ) -> Membership {
        let Shareable { key, request } = operation;
        let member = Member { id, framing, outbox };
        let mut groups = self.groups.lock().expect("groups lock");
        let (group, start) = match groups.get(&key) {
            Some(group) => (group.clone(), None),
            None => {
                let group = Arc::new(Group::default());
                groups.insert(key.clone(), group.clone());
                (group.clone(), Some(request))
            }
        };
        let slot = group.members.lock().expect("members lock").insert(member);
        drop(groups);
        if let Some(request) = start {
            tokio::spawn(self.clone().run(key.clone(), group.clone(), request));
        }
        Membership { shared: self.clone(), key, group, slot }
    }

    /// Executes one group's operation until it ends or its last member leaves.
    async fn run(self: Arc<Self>, key: Arc<Key>, group: Arc<Group>, request: Request) {
        let stream = self.schema.execute_stream(request);
        futures_util::pin_mut!(stream);
        loop {
            let response = tokio::select! {
                _ = group.cancel.cancelled() => return,
                response = stream.next() => response,
            };
            let Some(response) = response else { break };
            if response.is_err() {
                // Members see the error; anyone subscribing from now on gets a fresh execution.
                self.retire(&key, &group);
            }
            match serde_json::to_string(&response) {
                Ok(payload) => group.deliver(&payload.into()),
                Err(err) => tracing::error!(error = %err, "dropping a subscription result that does not encode"),
            }
        }
        self.retire(&key, &group);
        group.finish();
    }

    /// Takes `group` out of the registry, so that nobody else joins it.
    fn retire(&self, key: &Arc<Key>, group: &Arc<Group>) {
        let mut groups = self.groups.lock().expect("groups lock");
        if groups.get(key).is_some_and(|g| Arc::ptr_eq(g, group)) {
            groups.remove(key);
        }
    }
}

/// The frames that answer a subscription refused before it ran: the error, then the end.
pub fn refused(framing: Framing, id: &OperationId, error: async_graphql::Error) -> Vec<Outgoing> {
    let response = Response::from_errors(vec![error.into_server_error(Default::default())]);
    let payload: Utf8Bytes = serde_json::to_string(&response).expect("a response always encodes").into();
    let mut frames = vec![Outgoing::frame(framing.result(id, &payload))];
    frames.extend(framing.complete(id).map(Outgoing::frame));
    frames
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use async_trait::async_trait;

    use super::*;
    use crate::{
        bus::{memory::MemoryBus, BusError, ChatBinder},
        gateway::{
            hub::{tests::delivery, Hub},
            schema::{build_schema, ChatContext, ChatSettings, QueryLimits},
        },
    };

    struct NoBinder;

    #[async_trait]
    impl ChatBinder for NoBinder {
        async fn bind(&self, _: &str) -> Result<(), BusError> {
            Ok(())
        }

        async fn unbind(&self, _: &str) -> Result<(), BusError> {
            Ok(())
        }
    }

    fn setup() -> (Arc<SharedSubscriptions>, Arc<Hub>) {
        let hub = Hub::new(Arc::new(NoBinder), 64);
        let chat = ChatContext {
            bus: Arc::new(MemoryBus::new(&["es"])),
            hub: hub.clone(),
            settings: ChatSettings {
                source_language: "en".into(),
                languages: vec!["es".into()],
                max_text_bytes: 4096,
                max_chat_id_bytes: 200,
                max_sender_bytes: 256,
            },
        };
        let schema = build_schema(Arc::new(chat), QueryLimits { max_depth: 10, max_complexity: 200 });
        (SharedSubscriptions::new(schema), hub)
    }

    const QUERY: &str = "subscription($chat: ID!) { messages(chatId: $chat) { id text language } }";

    fn request(chat: &str) -> Request {
        Request::new(QUERY).variables(async_graphql::Variables::from_json(serde_json::json!({ "chat": chat })))
    }

    fn shareable(shared: &SharedSubscriptions, request: Request) -> Shareable {
        match shared.check(request) {
            Sharing::Shared(operation) => operation,
            Sharing::Alone { request, .. } => panic!("{:?} is not shareable", request.query),
        }
    }

    fn shared(shared: &SharedSubscriptions, request: Request) -> bool {
        matches!(shared.check(request), Sharing::Shared(_))
    }

    /// Dispatches until the hub has bound `chat` (the group's execution subscribes asynchronously).
    async fn until_bound(hub: &Hub, chats: usize) {
        for _ in 0..200 {
            if hub.chats().await == chats {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("the hub never reached {chats} chats");
    }

    async fn frames(outbox: &Outbox, want: usize) -> Vec<String> {
        let mut got = Vec::new();
        for _ in 0..200 {
            let items = outbox.take().expect("outbox overflowed");
            got.extend(items.into_iter().filter_map(|i| i.frame).map(|f| f.as_str().to_owned()));
            if got.len() >= want {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("got {got:?}, wanted {want} frames");
    }

    #[tokio::test]
    async fn identical_subscriptions_share_one_execution_and_differ_only_in_their_ids() {
        let (shared, hub) = setup();
        let (a, b, c) = (Arc::new(Outbox::new(8)), Arc::new(Outbox::new(8)), Arc::new(Outbox::new(8)));
        let join = |outbox: &Arc<Outbox>, id: &str, chat: &str, framing| {
            let operation = shareable(&shared, request(chat));
            shared.join(operation, OperationId::new(id), framing, outbox.clone())
        };
        let first = join(&a, "1", "room", Framing::Next);
        let second = join(&b, "7", "room", Framing::Data);
        let other = join(&c, "1", "elsewhere", Framing::Plain);
        assert_eq!(shared.groups(), 2);
        until_bound(&hub, 2).await;

        hub.dispatch(delivery("room", "hola")).await;
        let (got_a, got_b) = (frames(&a, 1).await, frames(&b, 1).await);
        let payload = got_a[0].strip_prefix(r#"{"type":"next","id":"1","payload":"#).unwrap();
        assert_eq!(got_b[0], format!(r#"{{"type":"data","id":"7","payload":{payload}"#));
        assert!(payload.contains(r#""text":"hola""#), "{payload}");
        hub.dispatch(delivery("elsewhere", "adeu")).await;
        let got_c = frames(&c, 1).await;
        assert!(got_c[0].starts_with(r#"{"data":{"messages":"#) && got_c[0].contains("adeu"), "{got_c:?}");

        drop((first, second));
        assert_eq!(shared.groups(), 1);
        drop(other);
        assert_eq!(shared.groups(), 0);
        until_bound(&hub, 0).await;
    }

    #[test]
    fn only_plain_subscriptions_are_shared() {
        let (subs, _hub) = setup();
        assert!(!shared(&subs, Request::new("mutation { sendMessage(chatId: \"c\", text: \"hi\") { id } }")));
        assert!(!shared(&subs, Request::new("{ languages }")));
        assert!(!shared(&subs, Request::new("subscription { nope")));
        let two = "subscription A { chat(chatId: \"c\") } query B { languages }";
        assert!(shared(&subs, Request::new(two).operation_name("A")));
        assert!(!shared(&subs, Request::new(two).operation_name("B")));
        assert!(!shared(&subs, Request::new(two)));
        let mut with_extensions = request("c");
        with_extensions.extensions.insert("persistedQuery".into(), async_graphql::Value::Null);
        assert!(!shared(&subs, with_extensions));
    }

    #[tokio::test]
    async fn an_operation_that_fails_ends_for_its_members_with_the_error() {
        let (shared, _hub) = setup();
        let outbox = Arc::new(Outbox::new(8));
        let operation = shareable(&shared, request(""));
        let _member = shared.join(operation, OperationId::new("x"), Framing::Next, outbox.clone());
        let got = frames(&outbox, 2).await;
        assert!(got[0].contains("chatId must not be empty"), "{got:?}");
        assert_eq!(got[1], r#"{"type":"complete","id":"x"}"#);
        assert_eq!(shared.groups(), 0);
    }

    #[test]
    fn members_with_the_same_id_and_framing_get_the_same_bytes() {
        let group = Group::default();
        let outboxes: Vec<_> = (0..4).map(|_| Arc::new(Outbox::new(4))).collect();
        for (outbox, (id, framing)) in outboxes.iter().zip([
            ("1", Framing::Next),
            ("1", Framing::Next),
            ("2", Framing::Next),
            ("1", Framing::Data),
        ]) {
            group.members.lock().unwrap().insert(Member { id: OperationId::new(id), framing, outbox: outbox.clone() });
        }
        group.deliver(&r#"{"data":{"chat":"hi"}}"#.into());
        let frames: Vec<Utf8Bytes> =
            outboxes.iter().map(|o| o.take().unwrap().pop_front().unwrap().frame.unwrap()).collect();
        assert_eq!(frames[0].as_str(), r#"{"type":"next","id":"1","payload":{"data":{"chat":"hi"}}}"#);
        assert_eq!(frames[0].as_str().as_ptr(), frames[1].as_str().as_ptr(), "one frame, shared");
        assert_eq!(frames[2].as_str(), r#"{"type":"next","id":"2","payload":{"data":{"chat":"hi"}}}"#);
        assert_eq!(frames[3].as_str(), r#"{"type":"data","id":"1","payload":{"data":{"chat":"hi"}}}"#);
    }

    #[test]
    fn an_outbox_that_overflows_stays_closed() {
        let outbox = Outbox::new(2);
        let frame = || Outgoing::frame("f".into());
        assert!(outbox.push(frame()) && outbox.push(frame()));
        assert!(!outbox.push(frame()));
        outbox.push_control(frame());
        assert!(outbox.take().is_none(), "an overflowed outbox drops what it held");
        assert!(!outbox.push(frame()));
    }
}
