//! A group's broadcast ring: each encoded result is written once, and every member's connection
//! reads it from its own cursor. Readers never block the writer; a reader the writer laps has lost
//! results and is a slow consumer.

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc, Mutex, OnceLock,
};

use axum::extract::ws::Utf8Bytes;

use super::framing::{Framing, OperationId};

/// Distinct (framing, operation id) frames a result keeps for members to share. Most clients number
/// their first subscription alike ("1"), so members mostly share one frame outright.
pub const VARIANTS: usize = 4;

/// One result of a group's execution.
pub struct Entry {
    /// The encoded GraphQL response.
    pub payload: Utf8Bytes,
    /// The per-chat `seq` of the delivery this result came from (0 when it came from none).
    pub seq: u64,
    frames: [OnceLock<Utf8Bytes>; VARIANTS],
}

impl Entry {
    /// The frame of this result for a member, shared with every member of the same variant.
    pub fn frame(&self, framing: Framing, id: &OperationId, variant: Option<usize>) -> Utf8Bytes {
        if framing == Framing::Plain {
            return self.payload.clone();
        }
        match variant {
            Some(v) => self.frames[v].get_or_init(|| framing.result(id, &self.payload)).clone(),
            None => framing.result(id, &self.payload),
        }
    }
}

/// One place of the ring: the position it holds and its entry.
type Slot = Mutex<Option<(u64, Arc<Entry>)>>;

/// A fixed number of slots, written in turn; position `n` lives in slot `n % capacity`.
pub struct Ring {
    slots: Box<[Slot]>,
    /// The position the next entry takes.
    head: AtomicU64,
}

impl Ring {
    pub fn new(capacity: usize) -> Self {
        Self { slots: (0..capacity.max(1)).map(|_| Mutex::new(None)).collect(), head: AtomicU64::new(0) }
    }

    pub fn capacity(&self) -> u64 {
        self.slots.len() as u64
    }

    /// The position the next entry will take: every position below it has been written.
    pub fn head(&self) -> u64 {
        self.head.load(Ordering::Acquire)
    }

    /// Appends a result. One writer at a time (the group's execution).
    pub fn push(&self, payload: Utf8Bytes, seq: u64) -> u64 {
        let position = self.head.load(Ordering::Relaxed);
        let entry = Arc::new(Entry { payload, seq, frames: Default::default() });
        *self.slot(position).lock().expect("ring slot") = Some((position, entry));
        self.head.store(position + 1, Ordering::Release);
        position
    }

    /// The entry at `position`, or `None` when it has already been overwritten (or not written yet).
    pub fn get(&self, position: u64) -> Option<Arc<Entry>> {
        match &*self.slot(position).lock().expect("ring slot") {
            Some((at, entry)) if *at == position => Some(entry.clone()),
            _ => None,
        }
    }

    fn slot(&self, position: u64) -> &Slot {
        &self.slots[(position % self.capacity()) as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readers_find_each_entry_at_its_position_until_it_is_overwritten() {
        let ring = Ring::new(2);
        assert_eq!(ring.push("a".into(), 1), 0);
        assert_eq!(ring.push("b".into(), 2), 1);
        assert_eq!(ring.head(), 2);
        assert_eq!(ring.get(0).unwrap().payload.as_str(), "a");
        ring.push("c".into(), 3);
        assert!(ring.get(0).is_none(), "lapped");
        assert_eq!(ring.get(2).unwrap().seq, 3);
        assert!(ring.get(3).is_none(), "not written yet");
    }

    #[test]
    fn members_of_one_variant_share_one_frame() {
        let ring = Ring::new(4);
        ring.push(r#"{"data":{"chat":"hi"}}"#.into(), 1);
        let entry = ring.get(0).unwrap();
        let id = OperationId::new("1");
        let (a, b) = (entry.frame(Framing::Next, &id, Some(0)), entry.frame(Framing::Next, &id, Some(0)));
        assert_eq!(a.as_str(), r#"{"type":"next","id":"1","payload":{"data":{"chat":"hi"}}}"#);
        assert_eq!(a.as_str().as_ptr(), b.as_str().as_ptr());
        assert_eq!(entry.frame(Framing::Plain, &id, None).as_str(), r#"{"data":{"chat":"hi"}}"#);
    }
}
