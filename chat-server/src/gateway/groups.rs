//! Shared subscriptions: a gateway executes each distinct subscription operation once.
//!
//! Subscribers that send the same subscription (same query, operation name and variables, leaving
//! out a resume point `after` given as a variable) join one group. The group runs the operation once
//! and writes each encoded result once to its [`Ring`]; every member's connection reads the ring from
//! its own cursor and frames each result with its operation id (members of the same variant share
//! even the frame). A member that falls a whole ring behind is a slow consumer; the ring is what
//! bounds the memory of a broadcast, not the number of subscribers.
//!
//! A member that resumes (`after: N`) first gets history replayed by its own execution (see
//! [`Shareable::replay`]), then the ring's results from the seam on, so that nothing is missed or
//! repeated: it joins the group before the history is read, and skips the ring's results that the
//! replay already covered.
//!
//! Sharing is sound because a result depends only on the operation and the schema's data: the
//! connection's own limits (its subscription budget) are checked by the transport before joining.
//! Anything per-connection that could change a result, such as authorization, must become part of
//! the key or be checked at join.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
};

use async_graphql::{
    parser::types::{DocumentOperations, OperationType, Selection},
    Name, Request, Response, Value,
};
use axum::extract::ws::Utf8Bytes;
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use super::{
    framing::{Framing, OperationId},
    outbox::Signal,
    ring::{Ring, VARIANTS},
    schema::{ChatSchema, GroupFeed},
};

/// What makes two subscriptions the same operation.
#[derive(Debug, PartialEq, Eq, Hash)]
struct Key {
    query: String,
    operation_name: Option<String>,
    variables: String,
}

/// How a group wakes one member's connection and knows how far it has read.
struct Member {
    signal: Arc<Signal>,
    cursor: Arc<AtomicU64>,
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
}

/// One running execution, its results, and the connections it serves.
struct Group {
    ring: Ring,
    members: Mutex<Members>,
    /// The (framing, operation id) of each shared frame variant.
    variants: Mutex<Vec<(Framing, Box<str>)>>,
    feed: Arc<GroupFeed>,
    /// The execution ended: after the last result in the ring, members complete.
    ended: AtomicBool,
    cancel: CancellationToken,
    /// Counts the group in `parley_shared_groups` while it exists.
    _counted: crate::metrics::Counted,
}

impl Group {
    fn new(capacity: usize) -> Self {
        Self {
            ring: Ring::new(capacity),
            members: Mutex::default(),
            variants: Mutex::default(),
            feed: Arc::default(),
            ended: AtomicBool::new(false),
            cancel: CancellationToken::new(),
            _counted: crate::metrics::Counted::new(&crate::metrics::metrics().shared_groups),
        }
    }

    /// Writes one encoded result and wakes every member (closing those a whole ring behind).
    fn deliver(&self, payload: Utf8Bytes, seq: u64) {
        let position = self.ring.push(payload, seq);
        let capacity = self.ring.capacity();
        let members = self.members.lock().expect("members lock");
        for member in members.slots.iter().flatten() {
            if position - member.cursor.load(Ordering::Acquire).min(position) >= capacity {
                member.signal.overflow();
            } else {
                member.signal.raise();
            }
        }
    }

    /// Ends the operation: members complete once they have read every result.
    fn finish(&self) {
        self.ended.store(true, Ordering::Release);
        self.feed.end();
        for member in self.members.lock().expect("members lock").slots.iter().flatten() {
            member.signal.raise();
        }
    }

    /// The shared frame variant of (`framing`, `id`), if there is room for one more.
    fn variant(&self, framing: Framing, id: &OperationId) -> Option<usize> {
        if framing == Framing::Plain {
            return None;
        }
        let mut variants = self.variants.lock().expect("variants lock");
        match variants.iter().position(|(f, made_for)| *f == framing && **made_for == *id.json) {
            Some(v) => Some(v),
            None if variants.len() < VARIANTS => {
                variants.push((framing, id.json.clone()));
                Some(variants.len() - 1)
            }
            None => None,
        }
    }
}

/// Whether a request runs in a shared group or on its own.
#[expect(clippy::large_enum_variant, reason = "a request is large either way, and a Sharing lives for a moment")]
pub enum Sharing {
    Shared(Shareable),
    /// Executed for this client alone: anything but a plain subscription (a query, a mutation, a
    /// subscription with extensions or an inline resume point, a request that does not parse).
    Alone {
        request: Request,
        subscription: bool,
    },
}

/// A subscription that can be shared, checked and keyed, not yet joined.
pub struct Shareable {
    key: Arc<Key>,
    /// The request as the group runs it: live results only.
    live: Request,
    /// The request as the client sent it, with its resume point, when it has one.
    resume: Option<Request>,
}

impl Shareable {
    /// Whether this member resumes from a point in history.
    pub fn resumes(&self) -> bool {
        self.resume.is_some()
    }
}

/// Running groups by operation.
pub struct SharedSubscriptions {
    schema: ChatSchema,
    groups: Mutex<HashMap<Arc<Key>, Arc<Group>>>,
    /// Results a group keeps for its members: how far one may fall behind.
    capacity: usize,
    /// Where the groups' executions run (see [`Dispatcher`](super::Dispatcher)).
    runtime: tokio::runtime::Handle,
}

/// Where a member stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// History is being replayed to it; the ring waits.
    Replaying,
    /// Reading the ring, skipping results of deliveries up to this `seq` (the replay had them).
    Live { after: u64 },
}

/// A subscriber's place in a group; leaving happens on drop.
pub struct Membership {
    shared: Arc<SharedSubscriptions>,
    key: Arc<Key>,
    group: Arc<Group>,
    slot: usize,
    pub id: OperationId,
    pub framing: Framing,
    variant: Option<usize>,
    cursor: Arc<AtomicU64>,
    stage: Stage,
}

/// What reading a membership's new results found.
#[derive(Debug, PartialEq, Eq)]
pub enum Read {
    /// Everything new was handed out.
    UpToDate,
    /// Results were overwritten before they were read: the member is a slow consumer.
    Lagged,
    /// The operation ended and every result was handed out: the member completes.
    Ended,
}

impl Membership {
    /// Hands every result this member has not read yet to `frame`, in order.
    pub fn read(&mut self, mut frame: impl FnMut(Utf8Bytes)) -> Read {
        let Stage::Live { after } = self.stage else {
            return Read::UpToDate;
        };
        // Read `ended` before the head: every result written before the end is then seen.
        let ended = self.group.ended.load(Ordering::Acquire);
        let head = self.group.ring.head();
        let mut cursor = self.cursor.load(Ordering::Relaxed);
        while cursor < head {
            let Some(entry) = self.group.ring.get(cursor) else {
                return Read::Lagged;
            };
            if entry.seq == 0 || entry.seq > after {
                frame(entry.frame(self.framing, &self.id, self.variant));
            }
            cursor += 1;
        }
        self.cursor.store(cursor, Ordering::Release);
        if ended {
            Read::Ended
        } else {
            Read::UpToDate
        }
    }

    /// The replay covered deliveries up to `seq`: from now on the member reads the ring.
    pub fn go_live(&mut self, seq: u64) {
        self.stage = Stage::Live { after: seq };
    }

    /// What tells when the group's execution watches its chat (or has ended): from then on,
    /// whatever the history lacks reaches the ring.
    pub fn watching(&self) -> Arc<GroupFeed> {
        self.group.feed.clone()
    }
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

/// What the transport needs to know of a request to share it.
struct Inspected {
    subscription: bool,
    /// Where the `after` argument of the root field comes from.
    after: After,
}

enum After {
    Absent,
    Variable(Name),
    /// Written in the query, or not where it can be found: the request runs alone.
    Unshareable,
}

fn inspect(request: &Request) -> Inspected {
    let unshareable = Inspected { subscription: false, after: After::Absent };
    let Ok(document) = async_graphql::parser::parse_query(&request.query) else {
        return unshareable;
    };
    let operation = match (&document.operations, request.operation_name.as_deref()) {
        (DocumentOperations::Single(operation), None) => operation,
        (DocumentOperations::Multiple(operations), Some(name)) => match operations.get(name) {
            Some(operation) => operation,
            None => return unshareable,
        },
        // Anything ambiguous is left to async-graphql, which answers it with the right error.
        _ => return unshareable,
    };
    let subscription = operation.node.ty == OperationType::Subscription;
    let mut after = After::Absent;
    for selection in &operation.node.selection_set.node.items {
        match &selection.node {
            Selection::Field(field) => match field.node.get_argument("after").map(|v| &v.node) {
                Some(async_graphql_value::Value::Variable(name)) => after = After::Variable(name.clone()),
                Some(_) => after = After::Unshareable,
                None => {}
            },
            _ if request.query.contains("after") => after = After::Unshareable,
            _ => {}
        }
    }
    Inspected { subscription, after }
}

impl SharedSubscriptions {
    /// `capacity`: results a group keeps, so how far a member may fall behind before it is closed.
    /// The groups' executions run on `runtime`.
    pub fn new(schema: ChatSchema, capacity: usize, runtime: tokio::runtime::Handle) -> Arc<Self> {
        Arc::new(Self { schema, groups: Mutex::default(), capacity, runtime })
    }

    /// How many distinct operations are running.
    pub fn groups(&self) -> usize {
        self.groups.lock().expect("groups lock").len()
    }

    /// Checks that `request` can be shared: a subscription carrying nothing beyond query, operation
    /// name and variables. Anything else is executed on its own.
    pub fn check(&self, request: Request) -> Sharing {
        if !request.extensions.is_empty() || !request.uploads.is_empty() {
            let subscription = inspect(&request).subscription;
            return Sharing::Alone { request, subscription };
        }
        let inspected = inspect(&request);
        let live_variables = match &inspected.after {
            After::Variable(name) => {
                let mut variables = request.variables.clone();
                variables.insert(name.clone(), Value::Null);
                variables
            }
            _ => request.variables.clone(),
        };
        let shareable = inspected.subscription && !matches!(inspected.after, After::Unshareable);
        let variables = serde_json::to_string(&live_variables).ok().filter(|_| shareable);
        let Some(variables) = variables else {
            return Sharing::Alone { request, subscription: inspected.subscription };
        };
        let key = Key { query: request.query.clone(), operation_name: request.operation_name.clone(), variables };
        let resumes = match &inspected.after {
            After::Variable(name) => request.variables.get(name).is_some_and(|v| *v != Value::Null),
            _ => false,
        };
        let mut live = Request::new(request.query.clone()).variables(live_variables);
        live.operation_name = request.operation_name.clone();
        let running = self.groups.lock().expect("groups lock").get_key_value(&key).map(|(k, _)| k.clone());
        let key = running.unwrap_or_else(|| Arc::new(key));
        Sharing::Shared(Shareable { key, live, resume: resumes.then_some(request) })
    }

    /// Joins the group running `operation`, starting it if there is none. The member's connection
    /// is woken through `signal`. A member that resumes gets back the request to replay its history
    /// with, and reads the ring only after [`Membership::go_live`].
    pub fn join(
        self: &Arc<Self>,
        operation: Shareable,
        id: OperationId,
        framing: Framing,
        signal: Arc<Signal>,
    ) -> (Membership, Option<Request>) {
        let Shareable { key, live, resume } = operation;
        let mut groups = self.groups.lock().expect("groups lock");
        let (group, start) = match groups.get(&key) {
            Some(group) => (group.clone(), None),
            None => {
                let group = Arc::new(Group::new(self.capacity));
                groups.insert(key.clone(), group.clone());
                (group, Some(live))
            }
        };
        let cursor = Arc::new(AtomicU64::new(group.ring.head()));
        let slot = group.members.lock().expect("members lock").insert(Member { signal, cursor: cursor.clone() });
        drop(groups);
        if let Some(request) = start {
            self.runtime.spawn(self.clone().run(key.clone(), group.clone(), request));
        }
        let variant = group.variant(framing, &id);
        let stage = if resume.is_some() { Stage::Replaying } else { Stage::Live { after: 0 } };
        (Membership { shared: self.clone(), key, group, slot, id, framing, variant, cursor, stage }, resume)
    }

    /// Executes one group's operation until it ends or its last member leaves.
    async fn run(self: Arc<Self>, key: Arc<Key>, group: Arc<Group>, request: Request) {
        let stream = self.schema.execute_stream(request.data(group.feed.clone()));
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
                Ok(payload) => group.deliver(payload.into(), group.feed.seq()),
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

/// The encoded response that refuses an operation before it ran.
pub fn refusal(error: async_graphql::Error) -> Utf8Bytes {
    let response = Response::from_errors(vec![error.into_server_error(Default::default())]);
    serde_json::to_string(&response).expect("a response always encodes").into()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use async_graphql::Variables;
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
        setup_with_backlog(64)
    }

    /// `backlog`: how far a subscriber may fall behind the hub.
    fn setup_with_backlog(backlog: usize) -> (Arc<SharedSubscriptions>, Arc<Hub>) {
        let hub = Hub::new(Arc::new(NoBinder), backlog);
        let chat = ChatContext {
            auth: Arc::new(crate::auth::Auth::off()),
            limits: crate::auth::limits::Limits::new(Default::default()),
            bus: Arc::new(MemoryBus::new(&["es"])),
            hub: hub.clone(),
            history: None,
            keys: Arc::new(crate::history::keys::MemoryKeys::default()),
            settings: ChatSettings {
                source_language: "en".into(),
                languages: vec!["es".into()],
                max_text_bytes: 4096,
                max_chat_id_bytes: 200,
                max_sender_bytes: 256,
            },
        };
        let schema = build_schema(Arc::new(chat), QueryLimits { max_depth: 10, max_complexity: 200 });
        (SharedSubscriptions::new(schema, 8, tokio::runtime::Handle::current()), hub)
    }

    const QUERY: &str = "subscription($chat: ID!) { messages(chatId: $chat) { id text language } }";

    fn request(chat: &str) -> Request {
        Request::new(QUERY).variables(Variables::from_json(serde_json::json!({ "chat": chat })))
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

    /// Waits until the hub has bound `chats` chats (the group's execution subscribes asynchronously).
    async fn until_bound(hub: &Hub, chats: usize) {
        for _ in 0..200 {
            if hub.chats().await == chats {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("the hub never reached {chats} chats");
    }

    /// Reads `membership` until `want` frames arrived.
    async fn frames(membership: &mut Membership, want: usize) -> Vec<String> {
        let mut got = Vec::new();
        for _ in 0..200 {
            membership.read(|frame| got.push(frame.as_str().to_owned()));
            if got.len() >= want {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("got {got:?}, wanted {want} frames");
    }

    fn signal() -> Arc<Signal> {
        Arc::new(Signal::default())
    }

    #[tokio::test]
    async fn identical_subscriptions_share_one_execution_and_differ_only_in_their_ids() {
        let (shared, hub) = setup();
        let join = |id: &str, chat: &str, framing| {
            shared.join(shareable(&shared, request(chat)), OperationId::new(id), framing, signal()).0
        };
        let mut first = join("1", "room", Framing::Next);
        let mut second = join("7", "room", Framing::Data);
        let mut other = join("1", "elsewhere", Framing::Plain);
        assert_eq!(shared.groups(), 2);
        until_bound(&hub, 2).await;

        hub.dispatch(delivery("room", "hola")).await;
        let (got_a, got_b) = (frames(&mut first, 1).await, frames(&mut second, 1).await);
        let payload = got_a[0].strip_prefix(r#"{"type":"next","id":"1","payload":"#).unwrap();
        assert_eq!(got_b[0], format!(r#"{{"type":"data","id":"7","payload":{payload}"#));
        assert!(payload.contains(r#""text":"hola""#), "{payload}");
        hub.dispatch(delivery("elsewhere", "adeu")).await;
        let got_c = frames(&mut other, 1).await;
        assert!(got_c[0].starts_with(r#"{"data":{"messages":"#) && got_c[0].contains("adeu"), "{got_c:?}");

        drop((first, second));
        assert_eq!(shared.groups(), 1);
        drop(other);
        assert_eq!(shared.groups(), 0);
        until_bound(&hub, 0).await;
    }

    #[tokio::test]
    async fn only_plain_subscriptions_are_shared() {
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
        assert!(!shared(&subs, Request::new("subscription { messages(chatId: \"c\", after: 3) { id } }")));
    }

    #[tokio::test]
    async fn a_resume_point_given_as_a_variable_joins_the_group_of_live_results() {
        let (subs, _hub) = setup();
        let resuming = "subscription($chat: ID!, $after: Int) { messages(chatId: $chat, after: $after) { id } }";
        let variables =
            |after: serde_json::Value| Variables::from_json(serde_json::json!({"chat": "c", "after": after}));
        let a = shareable(&subs, Request::new(resuming).variables(variables(serde_json::json!(3))));
        let b = shareable(&subs, Request::new(resuming).variables(variables(serde_json::json!(9))));
        let live = shareable(&subs, Request::new(resuming).variables(variables(serde_json::Value::Null)));
        assert_eq!(a.key, b.key);
        assert_eq!(a.key, live.key);
        assert!(a.resumes() && !live.resumes());
    }

    #[tokio::test]
    async fn an_operation_that_fails_ends_for_its_members_with_the_error() {
        let (shared, _hub) = setup();
        let operation = shareable(&shared, request(""));
        let (mut member, _) = shared.join(operation, OperationId::new("x"), Framing::Next, signal());
        let got = frames(&mut member, 1).await;
        assert!(got[0].contains("chatId must not be empty"), "{got:?}");
        for _ in 0..200 {
            if member.read(|_| {}) == Read::Ended {
                assert_eq!(shared.groups(), 0);
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("the member never ended");
    }

    #[tokio::test]
    async fn a_member_a_whole_ring_behind_is_told_so() {
        let (shared, hub) = setup();
        let connection = signal();
        let operation = shareable(&shared, request("c"));
        let (mut member, _) = shared.join(operation, OperationId::new("1"), Framing::Next, connection.clone());
        until_bound(&hub, 1).await;
        for i in 0..9 {
            hub.dispatch(delivery("c", &format!("m{i}"))).await;
        }
        for _ in 0..200 {
            if connection.has_overflowed() {
                assert_eq!(member.read(|_| {}), Read::Lagged);
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("the connection was never told it overflowed");
    }

    #[tokio::test]
    async fn a_subscription_that_falls_behind_the_hub_ends_with_slow_consumer() {
        use futures_util::StreamExt;
        let (shared, hub) = setup_with_backlog(2);
        let mut stream = shared.schema.execute_stream(request("c"));
        // The first poll runs the resolver up to its first wait, which watches the chat.
        assert!(tokio::time::timeout(Duration::from_millis(50), stream.next()).await.is_err());
        until_bound(&hub, 1).await;
        for i in 0..5 {
            hub.dispatch(delivery("c", &format!("m{i}"))).await;
        }
        let response = stream.next().await.expect("an answer");
        let error = &response.errors[0];
        assert!(error.message.contains("fell 3 messages behind"), "{error:?}");
        let code = error.extensions.as_ref().and_then(|e| e.get("code")).cloned();
        assert_eq!(code, Some(async_graphql::Value::from("SLOW_CONSUMER")), "{error:?}");
        assert!(stream.next().await.is_none(), "and then it ends");
    }
}
