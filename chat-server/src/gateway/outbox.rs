//! A connection's outbox: the frames waiting to be written to one socket, bounded so that a client
//! that reads too slowly is closed as a slow consumer instead of growing the gateway's memory.

use std::{collections::VecDeque, sync::Mutex};

use axum::extract::ws::Utf8Bytes;
use tokio::sync::Notify;

/// One item of a connection's outbox.
pub struct Outgoing {
    /// The frame to send, if any.
    pub frame: Option<Utf8Bytes>,
    /// A shared operation that ended with this item: the connection forgets it.
    pub ended: Option<Box<str>>,
}

impl Outgoing {
    pub fn frame(frame: Utf8Bytes) -> Self {
        Self { frame: Some(frame), ended: None }
    }
}

/// The frames waiting for one connection; bounded, and closed for good once it overflows.
pub struct Outbox {
    state: Mutex<OutboxState>,
    ready: Notify,
    overflow: Notify,
    capacity: usize,
}

#[derive(Default)]
struct OutboxState {
    items: VecDeque<Outgoing>,
    overflowed: bool,
}

impl Outbox {
    pub fn new(capacity: usize) -> Self {
        Self { state: Mutex::default(), ready: Notify::new(), overflow: Notify::new(), capacity }
    }

    /// Queues a result frame; false when the outbox is full (it is then overflowed for good) or already was.
    pub fn push(&self, item: Outgoing) -> bool {
        let mut state = self.state.lock().expect("outbox lock");
        if state.overflowed {
            return false;
        }
        let queued = state.items.len() < self.capacity;
        if queued {
            state.items.push_back(item);
        } else {
            state.overflowed = true;
            state.items.clear();
            self.overflow.notify_one();
        }
        drop(state);
        self.ready.notify_one();
        queued
    }

    /// Queues a control frame (errors, completion), which the bound does not refuse.
    pub fn push_control(&self, item: Outgoing) {
        let mut state = self.state.lock().expect("outbox lock");
        if !state.overflowed {
            state.items.push_back(item);
            drop(state);
            self.ready.notify_one();
        }
    }

    /// Waits until something was queued since the last [`Outbox::take`].
    pub async fn ready(&self) {
        self.ready.notified().await
    }

    /// Waits until the outbox overflows, which may happen while the connection is stuck writing.
    pub async fn overflowed(&self) {
        self.overflow.notified().await
    }

    /// Everything queued, or `None` when the outbox overflowed and the connection must close. The
    /// queue's memory goes with it, so an idle connection keeps none.
    pub fn take(&self) -> Option<VecDeque<Outgoing>> {
        let mut state = self.state.lock().expect("outbox lock");
        (!state.overflowed).then(|| std::mem::take(&mut state.items))
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }
}
