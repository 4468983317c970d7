//! What wakes a connection, and the frames that wait for it outside the groups' rings.
//!
//! A connection's [`Signal`] is raised by every group it is a member of (a new result in the ring)
//! and by its [`Outbox`]; however often it is raised, the connection wakes once and then reads
//! everything that is waiting. The outbox holds the frames that are the connection's own: the
//! handshake, refusals and completions, the results of operations executed for it alone, and
//! history replayed to it. It is bounded: results that overflow it close the connection as a slow
//! consumer, while a replay waits for room instead.

use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Mutex,
    },
    task::{Context, Poll},
};

use axum::extract::ws::Utf8Bytes;
use futures_util::task::AtomicWaker;
use tokio::sync::Notify;

/// Wakes a connection's task, at most once until the task runs.
#[derive(Default)]
pub struct Signal {
    raised: AtomicBool,
    waker: AtomicWaker,
    overflowed: AtomicBool,
    overflow: Notify,
}

impl Signal {
    /// Something is waiting for the connection.
    pub fn raise(&self) {
        if !self.raised.swap(true, Ordering::AcqRel) {
            self.waker.wake();
        }
    }

    /// Ready once raised since the last time it was ready.
    pub fn poll(&self, cx: &mut Context<'_>) -> Poll<()> {
        self.waker.register(cx.waker());
        if self.raised.swap(false, Ordering::AcqRel) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// The connection fell too far behind: it must close as a slow consumer, even while its writes
    /// are blocked.
    pub fn overflow(&self) {
        if !self.overflowed.swap(true, Ordering::AcqRel) {
            self.overflow.notify_one();
            self.raise();
        }
    }

    pub fn has_overflowed(&self) -> bool {
        self.overflowed.load(Ordering::Acquire)
    }

    /// Waits until [`Signal::overflow`] is called.
    pub async fn overflowed(&self) {
        if !self.has_overflowed() {
            self.overflow.notified().await;
        }
    }
}

/// One item of a connection's outbox.
#[derive(Debug, Clone, PartialEq)]
pub enum Outgoing {
    /// A frame of the connection as a whole (an acknowledgement, a pong, an error about no operation).
    Frame(Utf8Bytes),
    /// A frame of operation `op`, sent only while the operation still runs.
    OpFrame { op: u64, frame: Utf8Bytes },
    /// Operation `op` has replayed history up to `seq` and goes on with its group's live results.
    Live { op: u64, seq: u64 },
    /// Operation `op` ended by itself (the frames that say so are queued before this).
    Ended { op: u64 },
}

#[derive(Default)]
struct State {
    items: VecDeque<Outgoing>,
    overflowed: bool,
}

/// The frames waiting for one connection besides its groups' results.
pub struct Outbox {
    state: Mutex<State>,
    /// How many items are queued, readable without the lock (most wake-ups find none).
    queued: AtomicUsize,
    room: Notify,
    capacity: usize,
}

impl Outbox {
    pub fn new(capacity: usize) -> Self {
        Self { state: Mutex::default(), queued: AtomicUsize::new(0), room: Notify::new(), capacity }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Queues a result; when the outbox is full it overflows for good (and the connection closes).
    pub fn push(&self, item: Outgoing, signal: &Signal) -> bool {
        let mut state = self.state.lock().expect("outbox lock");
        if state.overflowed {
            return false;
        }
        if state.items.len() >= self.capacity {
            state.overflowed = true;
            state.items.clear();
            self.queued.store(0, Ordering::Release);
            drop(state);
            signal.overflow();
            return false;
        }
        state.items.push_back(item);
        self.queued.store(state.items.len(), Ordering::Release);
        drop(state);
        signal.raise();
        true
    }

    /// Queues an item the bound does not refuse: control frames, few and small.
    pub fn push_control(&self, item: Outgoing, signal: &Signal) {
        let mut state = self.state.lock().expect("outbox lock");
        if !state.overflowed {
            state.items.push_back(item);
            self.queued.store(state.items.len(), Ordering::Release);
            drop(state);
            signal.raise();
        }
    }

    /// Queues an item once there is room for it; false when the connection is closing.
    pub async fn push_when_room(&self, item: Outgoing, signal: &Signal) -> bool {
        loop {
            let room = self.room.notified();
            {
                let mut state = self.state.lock().expect("outbox lock");
                if state.overflowed {
                    return false;
                }
                if state.items.len() < self.capacity {
                    state.items.push_back(item);
                    self.queued.store(state.items.len(), Ordering::Release);
                    drop(state);
                    signal.raise();
                    return true;
                }
            }
            room.await;
        }
    }

    /// Everything queued. The queue's memory goes with it, so an idle connection keeps none.
    pub fn take(&self) -> VecDeque<Outgoing> {
        if self.queued.load(Ordering::Acquire) == 0 {
            return VecDeque::new();
        }
        let taken = {
            let mut state = self.state.lock().expect("outbox lock");
            self.queued.store(0, Ordering::Release);
            std::mem::take(&mut state.items)
        };
        self.room.notify_waiters();
        taken
    }

    /// Ends every wait for room: the connection is closing.
    pub fn close(&self) {
        self.state.lock().expect("outbox lock").overflowed = true;
        self.room.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outbox_that_overflows_stays_closed_and_overflows_its_connection() {
        let (outbox, signal) = (Outbox::new(2), Signal::default());
        let frame = || Outgoing::Frame("f".into());
        assert!(outbox.push(frame(), &signal) && outbox.push(frame(), &signal));
        assert!(!outbox.push(frame(), &signal));
        assert!(signal.has_overflowed());
        outbox.push_control(frame(), &signal);
        assert!(outbox.take().is_empty(), "an overflowed outbox drops what it held");
        assert!(!outbox.push(frame(), &signal));
    }

    #[tokio::test]
    async fn a_replay_waits_for_room_instead_of_overflowing() {
        let (outbox, signal) = (std::sync::Arc::new(Outbox::new(1)), std::sync::Arc::new(Signal::default()));
        assert!(outbox.push_when_room(Outgoing::Frame("a".into()), &signal).await);
        let waiting = tokio::spawn({
            let (outbox, signal) = (outbox.clone(), signal.clone());
            async move { outbox.push_when_room(Outgoing::Frame("b".into()), &signal).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        assert_eq!(outbox.take().len(), 1);
        assert!(waiting.await.unwrap());
        assert!(!signal.has_overflowed());
        assert_eq!(outbox.take(), [Outgoing::Frame("b".into())]);
    }
}
