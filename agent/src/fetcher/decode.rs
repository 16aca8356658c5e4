//! Decoding ahead of readers: one thread decodes disk-cached chunks into the memory LRU before
//! readers ask for them, so that a reader finds them decoded (a memory hit) instead of waiting
//! for a decode. It has two lanes:
//!
//! - *known*: chunks a reader will read, in the order it will (a hot-chunk profile's, as they
//!   arrive from the backend), first in, first out;
//! - *guesses*: chunks a reader may read next ([`Fetcher::speculate`](super::Fetcher::speculate)),
//!   newest first (the newest guess is the most specific); only the latest [`MAX_GUESSES`]
//!   are kept.
//!
//! Known chunks go first. Chunks decoded ahead and not read yet take room in the LRU that
//! readers' chunks would use, so the thread stops while they hold half the LRU budget, and
//! goes on as readers read them (or the LRU evicts them unread, which is counted as a wasted
//! guess). One thread: on a small host it takes at most one core beside the readers.

use std::collections::{HashMap, VecDeque};
use std::sync::{Condvar, Mutex};

use fusefs::ChunkRef;

use crate::sync::lock;

/// Guesses kept waiting; older ones are dropped (newer guesses are better).
const MAX_GUESSES: usize = 64;

pub(super) struct DecodeAhead {
    state: Mutex<Lanes>,
    wake: Condvar,
    /// Most decoded bytes ahead of readers at once.
    budget: usize,
}

#[derive(Default)]
struct Lanes {
    known: VecDeque<ChunkRef>,
    guesses: VecDeque<ChunkRef>,
    /// Decoded ahead and not read (nor evicted) yet: digest -> decoded bytes.
    unread: HashMap<[u8; 32], usize>,
    unread_bytes: usize,
    closed: bool,
}

impl DecodeAhead {
    /// A decoder that keeps at most `budget` decoded bytes ahead of readers.
    pub(super) fn new(budget: usize) -> DecodeAhead {
        DecodeAhead {
            state: Mutex::new(Lanes::default()),
            wake: Condvar::new(),
            budget,
        }
    }

    /// Queues chunks a reader will read, in order.
    pub(super) fn known(&self, chunk: ChunkRef) {
        lock(&self.state).known.push_back(chunk);
        self.wake.notify_one();
    }

    /// Queues guesses, most likely first, ahead of older guesses.
    pub(super) fn guesses(&self, chunks: &[ChunkRef]) {
        {
            let mut lanes = lock(&self.state);
            for chunk in chunks.iter().rev() {
                lanes.guesses.push_front(chunk.clone());
            }
            lanes.guesses.truncate(MAX_GUESSES);
        }
        self.wake.notify_one();
    }

    /// The next chunk to decode, once the budget has room; `None` once closed.
    pub(super) fn next(&self) -> Option<ChunkRef> {
        let mut lanes = lock(&self.state);
        loop {
            if lanes.closed {
                return None;
            }
            if lanes.unread_bytes < self.budget {
                if let Some(chunk) = lanes
                    .known
                    .pop_front()
                    .or_else(|| lanes.guesses.pop_front())
                {
                    return Some(chunk);
                }
            }
            lanes = self
                .wake
                .wait(lanes)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }

    /// A chunk was decoded ahead into memory.
    pub(super) fn decoded(&self, digest: [u8; 32], bytes: usize) {
        let mut lanes = lock(&self.state);
        if lanes.unread.insert(digest, bytes).is_none() {
            lanes.unread_bytes += bytes;
        }
    }

    /// A reader read the chunk, or the LRU evicted it: whether it had been decoded ahead.
    pub(super) fn gone(&self, digest: &[u8; 32]) -> bool {
        let mut lanes = lock(&self.state);
        let Some(bytes) = lanes.unread.remove(digest) else {
            return false;
        };
        lanes.unread_bytes -= bytes;
        drop(lanes);
        self.wake.notify_one();
        true
    }

    /// Whether anything was decoded ahead and not read yet (a cheap test before [`gone`]).
    ///
    /// [`gone`]: DecodeAhead::gone
    pub(super) fn has_unread(&self) -> bool {
        !lock(&self.state).unread.is_empty()
    }

    /// Stops the thread (the fetcher is going away).
    pub(super) fn close(&self) {
        lock(&self.state).closed = true;
        self.wake.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fusefs::format::ChunkRecord;

    fn chunk(i: u8) -> ChunkRef {
        ChunkRef {
            index: u32::from(i),
            record: ChunkRecord {
                blob: 0,
                flags: 0,
                comp_off: 0,
                comp_len: 1,
                raw_len: 1,
                crc32: 0,
                digest: [i; 32],
            },
            blob_digest: String::new(),
        }
    }

    #[test]
    fn known_chunks_go_first_in_order_then_the_newest_guesses() {
        let d = DecodeAhead::new(1 << 20);
        d.guesses(&[chunk(1), chunk(2)]);
        d.known(chunk(10));
        d.guesses(&[chunk(3), chunk(4)]);
        d.known(chunk(11));
        let order: Vec<u32> = (0..6).map(|_| d.next().unwrap().index).collect();
        assert_eq!(order, vec![10, 11, 3, 4, 1, 2]);
    }

    #[test]
    fn only_the_latest_guesses_are_kept() {
        let d = DecodeAhead::new(1 << 20);
        for i in 0..100u8 {
            d.guesses(&[chunk(i)]);
        }
        assert_eq!(d.next().unwrap().index, 99);
        let mut n = 1;
        while lock(&d.state).guesses.pop_front().is_some() {
            n += 1;
        }
        assert_eq!(n, MAX_GUESSES);
    }

    #[test]
    fn decoding_waits_while_unread_chunks_fill_the_budget() {
        let d = std::sync::Arc::new(DecodeAhead::new(100));
        d.decoded([1; 32], 60);
        d.decoded([2; 32], 60);
        d.known(chunk(3));
        let waiter = {
            let d = d.clone();
            std::thread::spawn(move || d.next().map(|c| c.index))
        };
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!waiter.is_finished(), "decoded past the budget");
        assert!(d.gone(&[1; 32]));
        assert!(!d.gone(&[1; 32]), "counted once");
        assert_eq!(waiter.join().unwrap(), Some(3));
        d.close();
        assert!(d.next().is_none());
    }
}
