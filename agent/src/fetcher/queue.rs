//! The request queue of one backend and the rule that picks its next request: pure policy, no
//! I/O, no locks and no clock but a rate limit's, so it is tested here on its own.
//!
//! Jobs (one chunk each) wait in one FIFO per [`Priority`]. [`Queue::next`] takes the first job
//! of the most urgent queue that may start now and extends it with the jobs of the same queue
//! and blob whose stored bytes are adjacent (before or after) into one range request, up to
//! that class's request size:
//!
//! | class | who asks | slots | request size |
//! |---|---|---|---|
//! | `Demand` | a reader waits for the chunk (or is about to: the rest of the tensor it reads) | `demand_requests` of its own, carrying at most `demand_bytes` | `request_bytes` |
//! | `Prefetch` | read-ahead of a sequential reader, a tensor stream, the image's hot set | `low_requests`, shared with the two below | `request_bytes` |
//! | `Speculative` | a guess: the rest of a file or directory just touched | at most `speculative_requests` of the `low_requests`, and none starts while a prefetch request is queued or running | `speculative_request_bytes` |
//! | `Background` | warm, the whole image in layout order | at most `background_requests` of the `low_requests`, and none starts while a demand or speculative request is queued or running | `background_request_bytes` |
//!
//! So a demand request never waits for a slot behind other work, and starts before any other
//! queued request; while demand jobs wait for a slot, or demand requests carry `demand_bytes`
//! (a reader's tensor, fetched first), no request of another class starts; what it may share the link with are the requests already in flight, which
//! the slot counts and request sizes of the classes below bound. Speculative requests are kept
//! small, because a reader that needs a chunk of one waits for its bytes. A demand request also
//! carries, after its own chunks, the queued jobs of any class that continue it (riders: a
//! guess at the reader's next chunks costs no round trip of its own).
//!
//! A backend behind a mirror with slices (`crate::mirror`) has an alignment: a request is not
//! extended with a chunk that starts in another slice than the one its bytes end in (or, going
//! backwards, ends in another than the one they start in), so a request touches one slice, or
//! two where a chunk straddles their boundary, and the tier fetches each slice once. Its
//! background requests are then smaller, so more of them may run (up to `low_requests`), as
//! many as keep `background_requests` full-size requests' bytes in flight.
//!
//! A background job may carry a [`RateLimit`]: its (coalesced) request starts only when the
//! bucket holds its bytes, and until then nothing behind it in that queue starts either;
//! [`Next::WaitForTokens`] says how long that is.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::rate::RateLimit;

/// Who asked for a chunk, most urgent first; see the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Priority {
    /// A reader is blocked on the chunk.
    Demand,
    /// Read-ahead of a sequential reader, a tensor stream, a hot-chunk profile.
    Prefetch,
    /// A guess at what a reader reads next.
    Speculative,
    /// Warm, the whole image: only while no demand request is queued or running.
    Background,
}

impl Priority {
    pub const ALL: [Priority; 4] = [
        Priority::Demand,
        Priority::Prefetch,
        Priority::Speculative,
        Priority::Background,
    ];

    fn slot(self) -> usize {
        self as usize
    }
}

/// What the queue needs to know of a job.
pub trait Queued {
    /// The blob the chunk is stored in.
    fn blob(&self) -> &str;
    /// The chunk's stored bytes in its blob.
    fn range(&self) -> Range<u64>;
    /// The bandwidth limit of a background job.
    fn limit(&self) -> Option<&Arc<RateLimit>>;
}

/// Slot counts and request sizes; see the module docs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub demand_requests: usize,
    /// Most stored bytes of demand requests in flight (one starts anyway when none runs): a
    /// reader's tensor fetched first then has the link to itself, and the next reader's waits
    /// its turn instead of sharing the link with it.
    pub demand_bytes: u64,
    pub low_requests: usize,
    pub speculative_requests: usize,
    pub background_requests: usize,
    pub request_bytes: u64,
    pub speculative_request_bytes: u64,
    pub background_request_bytes: u64,
}

impl Limits {
    fn request_bytes(&self, class: Priority) -> u64 {
        match class {
            Priority::Demand | Priority::Prefetch => self.request_bytes,
            Priority::Speculative => self.speculative_request_bytes,
            Priority::Background => self.background_request_bytes,
        }
    }
}

/// What may start next.
#[derive(Debug)]
pub enum Next<J> {
    /// Start one request for these jobs (sorted by offset, adjacent, one blob), taken from
    /// the queue of this class; the queue counts it as running until [`Queue::finished`].
    Batch(Vec<J>, Priority),
    /// Nothing may start now; a finished request makes room.
    Idle,
    /// Only a rate-limited background request could start, once its bucket refills in this
    /// long.
    WaitForTokens(Duration),
}

/// Jobs queued by class and requests running by class.
pub struct Queue<J> {
    waiting: [VecDeque<J>; 4],
    running: [usize; 4],
    /// Stored bytes of the demand requests running.
    demand_bytes: u64,
    /// When the armed rate-limit timer fires, if one is armed (kept here for the dispatcher,
    /// which owns the timer).
    pub token_timer: Option<Instant>,
    /// The slice size requests stay within (see the module docs).
    alignment: Option<u64>,
}

impl<J> Default for Queue<J> {
    fn default() -> Self {
        Queue::aligned(None)
    }
}

impl<J> Queue<J> {
    /// An empty queue whose requests stay within slices of `alignment` bytes.
    pub fn aligned(alignment: Option<u64>) -> Self {
        Queue {
            waiting: Default::default(),
            running: [0; 4],
            demand_bytes: 0,
            token_timer: None,
            alignment: alignment.filter(|&a| a > 0),
        }
    }
}

/// Queued jobs looked at when extending a request with adjacent chunks: a full 8 MiB request of
/// 32 KiB chunks, or of default 1 MiB chunks with other blobs' jobs interleaved; images with
/// smaller chunks get smaller coalesced requests.
const COALESCE_SCAN: usize = 256;

impl<J: Queued> Queue<J> {
    pub fn push(&mut self, class: Priority, job: J) {
        self.waiting[class.slot()].push_back(job);
    }

    /// Queues `job` ahead of the others of its class (the newest guesses are the best).
    pub fn push_front(&mut self, class: Priority, job: J) {
        self.waiting[class.slot()].push_front(job);
    }

    /// Jobs waiting in `class`'s queue.
    pub fn waiting(&self, class: Priority) -> usize {
        self.waiting[class.slot()].len()
    }

    /// Requests of `class` running.
    pub fn running(&self, class: Priority) -> usize {
        self.running[class.slot()]
    }

    /// Whether `class` has requests running or jobs waiting.
    fn busy(&self, class: Priority) -> bool {
        self.running(class) > 0 || self.waiting(class) > 0
    }

    /// A request that [`Queue::next`] returned, of `bytes` stored bytes, has ended.
    pub fn finished(&mut self, class: Priority, bytes: u64) {
        let running = &mut self.running[class.slot()];
        *running = running.saturating_sub(1);
        if class == Priority::Demand {
            self.demand_bytes = self.demand_bytes.saturating_sub(bytes);
        }
    }

    /// Takes the first job of `class`'s queue that `pick` accepts (to move it to another).
    pub fn remove(&mut self, class: Priority, pick: impl Fn(&J) -> bool) -> Option<J> {
        let jobs = &mut self.waiting[class.slot()];
        let at = jobs.iter().position(pick)?;
        jobs.remove(at)
    }

    /// Takes every job of `class`'s queue that `pick` accepts, keeping the others in order.
    pub fn drain(&mut self, class: Priority, mut pick: impl FnMut(&J) -> bool) -> Vec<J> {
        let jobs = &mut self.waiting[class.slot()];
        let mut taken = Vec::new();
        let mut kept = VecDeque::with_capacity(jobs.len());
        for job in jobs.drain(..) {
            if pick(&job) {
                taken.push(job);
            } else {
                kept.push_back(job);
            }
        }
        *jobs = kept;
        taken
    }

    /// Picks the next request by the rules of the module docs.
    pub fn next(&mut self, limits: &Limits) -> Next<J> {
        let demand_room = self.running(Priority::Demand) == 0
            || (self.running(Priority::Demand) < limits.demand_requests
                && self.demand_bytes < limits.demand_bytes);
        if demand_room {
            if let Some(batch) = self.take_batch(Priority::Demand, limits) {
                return self.start(batch, Priority::Demand);
            }
        }
        // Demand jobs waiting for a slot, or demand requests carrying `demand_bytes` (a
        // reader's tensor fetched first), are what readers need now and fill the link: nothing
        // else starts to share it with them.
        if self.waiting(Priority::Demand) > 0 || self.demand_bytes >= limits.demand_bytes {
            return Next::Idle;
        }
        let low: usize = [
            Priority::Prefetch,
            Priority::Speculative,
            Priority::Background,
        ]
        .iter()
        .map(|&c| self.running(c))
        .sum();
        if low >= limits.low_requests.max(1) {
            return Next::Idle;
        }
        if let Some(batch) = self.take_batch(Priority::Prefetch, limits) {
            return self.start(batch, Priority::Prefetch);
        }
        // Guesses wait while known needs (a profile's hot set, a stream, a read-ahead) are
        // being fetched: they would share the link with them.
        if !self.busy(Priority::Prefetch)
            && self.running(Priority::Speculative) < limits.speculative_requests.max(1)
        {
            if let Some(batch) = self.take_batch(Priority::Speculative, limits) {
                return self.start(batch, Priority::Speculative);
            }
        }
        if self.busy(Priority::Demand)
            || self.busy(Priority::Speculative)
            || self.running(Priority::Background) >= self.background_slots(limits)
        {
            return Next::Idle;
        }
        let Some(batch) = self.take_batch(Priority::Background, limits) else {
            return Next::Idle;
        };
        if let Some(limit) = batch[0].limit() {
            let bytes = batch.iter().map(|j| len(&j.range())).sum();
            if let Err(wait) = limit.try_take(bytes) {
                // Back to the head, in blob order; the next dispatch coalesces them again.
                let jobs = &mut self.waiting[Priority::Background.slot()];
                for job in batch.into_iter().rev() {
                    jobs.push_front(job);
                }
                return Next::WaitForTokens(wait);
            }
        }
        self.start(batch, Priority::Background)
    }

    /// Background requests that may run at once: `background_requests`, or, where requests are
    /// cut at slices smaller than `background_request_bytes`, as many more as keep the same
    /// bytes in flight (a warm through a tier fills the link as one without it does), within
    /// `low_requests`.
    fn background_slots(&self, limits: &Limits) -> usize {
        let slots = limits.background_requests.max(1);
        match self.alignment {
            Some(slice) if slice < limits.background_request_bytes => {
                let per_request = limits.background_request_bytes.div_ceil(slice) as usize;
                slots
                    .saturating_mul(per_request)
                    .min(limits.low_requests.max(slots))
            }
            _ => slots,
        }
    }

    fn start(&mut self, batch: Vec<J>, class: Priority) -> Next<J> {
        self.running[class.slot()] += 1;
        if class == Priority::Demand {
            self.demand_bytes += batch.iter().map(|j| len(&j.range())).sum::<u64>();
        }
        Next::Batch(batch, class)
    }

    /// Takes the job at the head of `class`'s queue and the queued jobs that extend its byte
    /// range in the same blob (under the same bandwidth limit), up to the class's request size.
    /// A demand request then also takes, as riders, the jobs of the other queues that continue
    /// it (after it, never before: the reader's bytes come first): a guess at what the reader
    /// reads next costs no round trip of its own when it rides along. Only the head of each
    /// queue is searched, so a long queue costs a bounded scan per request.
    fn take_batch(&mut self, class: Priority, limits: &Limits) -> Option<Vec<J>> {
        let max_bytes = limits.request_bytes(class);
        let alignment = self.alignment;
        let first = self.waiting[class.slot()].pop_front()?;
        let mut range = first.range();
        let mut batch = vec![first];
        let mut extend = |jobs: &mut VecDeque<J>, batch: &mut Vec<J>, both_ways: bool| loop {
            let head = &batch[0];
            let next = jobs.iter().take(COALESCE_SCAN).position(|j| {
                j.blob() == head.blob() && same_limit(j.limit(), head.limit()) && {
                    let r = j.range();
                    let after =
                        r.start == range.end && same_slice(alignment, range.end - 1, r.start);
                    let before = both_ways
                        && r.end == range.start
                        && same_slice(alignment, r.end - 1, range.start);
                    (after || before) && len(&range) + len(&r) <= max_bytes
                }
            });
            let Some(at) = next else { break };
            let Some(job) = jobs.remove(at) else { break };
            let r = job.range();
            range = range.start.min(r.start)..range.end.max(r.end);
            batch.push(job);
        };
        extend(&mut self.waiting[class.slot()], &mut batch, true);
        if class == Priority::Demand {
            for rider in [
                Priority::Prefetch,
                Priority::Speculative,
                Priority::Background,
            ] {
                extend(&mut self.waiting[rider.slot()], &mut batch, false);
            }
        }
        batch.sort_by_key(|j| j.range().start);
        Some(batch)
    }
}

fn len(range: &Range<u64>) -> u64 {
    range.end - range.start
}

/// Whether offsets `a` and `b` are in the same slice of `alignment` bytes (always without one).
fn same_slice(alignment: Option<u64>, a: u64, b: u64) -> bool {
    alignment.is_none_or(|size| a / size == b / size)
}

fn same_limit(a: Option<&Arc<RateLimit>>, b: Option<&Arc<RateLimit>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        (None, None) => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone)]
    struct Job {
        blob: &'static str,
        start: u64,
        len: u64,
        limit: Option<Arc<RateLimit>>,
    }

    impl Queued for Job {
        fn blob(&self) -> &str {
            self.blob
        }
        fn range(&self) -> Range<u64> {
            self.start..self.start + self.len
        }
        fn limit(&self) -> Option<&Arc<RateLimit>> {
            self.limit.as_ref()
        }
    }

    fn job(blob: &'static str, start: u64, len: u64) -> Job {
        Job {
            blob,
            start,
            len,
            limit: None,
        }
    }

    /// Demand bytes are not bounded here (so `finished` may be told 0 bytes), except where a
    /// test says so.
    fn limits() -> Limits {
        Limits {
            demand_requests: 2,
            demand_bytes: u64::MAX,
            low_requests: 3,
            speculative_requests: 1,
            background_requests: 1,
            request_bytes: 300,
            speculative_request_bytes: 200,
            background_request_bytes: 300,
        }
    }

    /// The next batch's class and its (blob, start) pairs; panics unless it is a batch.
    fn take(q: &mut Queue<Job>) -> (Priority, Vec<(&'static str, u64)>) {
        take_with(q, &limits())
    }

    fn take_with(q: &mut Queue<Job>, limits: &Limits) -> (Priority, Vec<(&'static str, u64)>) {
        match q.next(limits) {
            Next::Batch(batch, class) => (class, batch.iter().map(|j| (j.blob, j.start)).collect()),
            other => panic!("expected a batch, got {other:?}"),
        }
    }

    #[test]
    fn adjacent_jobs_of_one_blob_coalesce_in_either_direction_up_to_the_size() {
        let mut q = Queue::default();
        for start in [200, 100, 300, 0] {
            q.push(Priority::Demand, job("a", start, 100));
        }
        q.push(Priority::Demand, job("b", 400, 100));
        // 200 first, then 100 (before it) and 300 (after it): 300 bytes, the limit.
        assert_eq!(
            take(&mut q),
            (Priority::Demand, vec![("a", 100), ("a", 200), ("a", 300)])
        );
        // 0 is adjacent to nothing left in "a"; "b" is another blob.
        assert_eq!(take(&mut q), (Priority::Demand, vec![("a", 0)]));
        assert!(
            matches!(q.next(&limits()), Next::Idle),
            "both demand slots in use"
        );
        q.finished(Priority::Demand, 0);
        assert_eq!(take(&mut q), (Priority::Demand, vec![("b", 400)]));
    }

    #[test]
    fn an_aligned_queue_keeps_each_request_within_a_slice() {
        let mut q = Queue::aligned(Some(200));
        for start in [100, 0, 200, 300] {
            q.push(Priority::Demand, job("a", start, 100));
        }
        // 100 takes 0 (same slice, before it), not 200 (the next slice), though 300 bytes fit.
        assert_eq!(take(&mut q), (Priority::Demand, vec![("a", 0), ("a", 100)]));
        assert_eq!(
            take(&mut q),
            (Priority::Demand, vec![("a", 200), ("a", 300)])
        );
        // A chunk that straddles a boundary joins the slice its first byte is in; the next
        // chunk starts in the slice where that one ends, so it joins too.
        let mut q = Queue::aligned(Some(150));
        for start in [0, 100, 200] {
            q.push(Priority::Demand, job("a", start, 100));
        }
        assert_eq!(
            take(&mut q),
            (Priority::Demand, vec![("a", 0), ("a", 100), ("a", 200)])
        );
    }

    #[test]
    fn an_aligned_queue_runs_more_background_requests_within_the_low_slots() {
        let limits = limits();
        let mut plain = Queue::default();
        // Slices of a third of a background request: three times the requests, within
        // low_requests.
        let mut aligned = Queue::aligned(Some(limits.background_request_bytes / 3));
        for q in [&mut plain, &mut aligned] {
            for start in 0..8 {
                q.push(Priority::Background, job("a", start * 1000, 10));
            }
        }
        let started = |q: &mut Queue<Job>| {
            let mut n = 0;
            while let Next::Batch(..) = q.next(&limits) {
                n += 1;
            }
            n
        };
        assert_eq!(started(&mut plain), limits.background_requests);
        assert_eq!(
            started(&mut aligned),
            (limits.background_requests * 3).min(limits.low_requests)
        );
    }

    #[test]
    fn demand_goes_first_then_prefetch_then_speculation_then_background() {
        let mut q = Queue::default();
        q.push(Priority::Background, job("a", 0, 10));
        q.push(Priority::Speculative, job("a", 100, 10));
        q.push(Priority::Prefetch, job("a", 200, 10));
        q.push(Priority::Demand, job("a", 300, 10));
        assert_eq!(take(&mut q).0, Priority::Demand);
        assert_eq!(take(&mut q).0, Priority::Prefetch);
        // Guesses wait while the prefetch request runs...
        assert!(matches!(q.next(&limits()), Next::Idle));
        q.finished(Priority::Prefetch, 0);
        assert_eq!(take(&mut q).0, Priority::Speculative);
        // ...and background work while a demand or speculative request runs.
        assert!(matches!(q.next(&limits()), Next::Idle));
        q.finished(Priority::Demand, 0);
        assert!(matches!(q.next(&limits()), Next::Idle));
        q.finished(Priority::Speculative, 0);
        assert_eq!(take(&mut q).0, Priority::Background);
        // One background slot.
        q.push(Priority::Background, job("a", 1000, 10));
        assert!(matches!(q.next(&limits()), Next::Idle));
    }

    #[test]
    fn a_demand_read_never_waits_for_a_slot_behind_other_work() {
        let mut q = Queue::default();
        for i in 0..10 {
            q.push(Priority::Prefetch, job("a", i * 1000, 10));
        }
        for _ in 0..3 {
            assert_eq!(take(&mut q).0, Priority::Prefetch);
        }
        assert!(matches!(q.next(&limits()), Next::Idle), "low slots full");
        q.push(Priority::Demand, job("a", 99_000, 10));
        assert_eq!(take(&mut q), (Priority::Demand, vec![("a", 99_000)]));
    }

    #[test]
    fn speculation_is_limited_to_its_slots_and_smaller_requests() {
        let mut q = Queue::default();
        for i in 0..4 {
            q.push(Priority::Speculative, job("a", i * 100, 100));
        }
        q.push(Priority::Speculative, job("b", 0, 100));
        // 200 bytes per speculative request.
        assert_eq!(
            take(&mut q),
            (Priority::Speculative, vec![("a", 0), ("a", 100)])
        );
        // One speculative slot: the rest waits although low slots are free.
        assert!(matches!(q.next(&limits()), Next::Idle));
        q.finished(Priority::Speculative, 0);
        assert_eq!(
            take(&mut q),
            (Priority::Speculative, vec![("a", 200), ("a", 300)])
        );
    }

    #[test]
    fn demand_in_flight_is_bounded_in_bytes_and_nothing_else_starts_while_demand_waits() {
        let mut q = Queue::default();
        let capped = Limits {
            demand_requests: 8,
            demand_bytes: 150,
            ..limits()
        };
        q.push(Priority::Demand, job("a", 0, 200));
        q.push(Priority::Demand, job("b", 0, 100));
        q.push(Priority::Prefetch, job("c", 0, 10));
        // The first starts though it alone is over the bound: none ran.
        assert!(matches!(q.next(&capped), Next::Batch(_, Priority::Demand)));
        // The second waits for bytes, and the prefetch job waits behind it.
        assert!(matches!(q.next(&capped), Next::Idle));
        q.finished(Priority::Demand, 200);
        assert_eq!(
            take_with(&mut q, &capped),
            (Priority::Demand, vec![("b", 0)])
        );
        // No demand job waits now and the one running carries less than the bound: the
        // prefetch job starts beside it.
        assert_eq!(
            take_with(&mut q, &capped),
            (Priority::Prefetch, vec![("c", 0)])
        );
    }

    #[test]
    fn background_waits_while_demand_is_queued_or_running() {
        let mut q = Queue::default();
        let tight = Limits {
            demand_requests: 1,
            ..limits()
        };
        q.push(Priority::Demand, job("a", 0, 10));
        q.push(Priority::Demand, job("a", 1000, 10));
        q.push(Priority::Background, job("b", 0, 10));
        assert!(matches!(q.next(&tight), Next::Batch(_, Priority::Demand)));
        // One demand request runs and one is queued: no background request starts.
        assert!(matches!(q.next(&tight), Next::Idle));
        q.finished(Priority::Demand, 0);
        assert!(matches!(q.next(&tight), Next::Batch(_, Priority::Demand)));
        assert!(matches!(q.next(&tight), Next::Idle));
        q.finished(Priority::Demand, 0);
        assert!(matches!(
            q.next(&tight),
            Next::Batch(_, Priority::Background)
        ));
    }

    #[test]
    fn a_rate_limited_background_request_waits_for_its_tokens_in_place() {
        let limit = RateLimit::new(1000);
        let mut q = Queue::default();
        // The bucket holds 250 bytes: the first request of 200 goes, the next waits.
        for start in [0, 200] {
            q.push(
                Priority::Background,
                Job {
                    limit: Some(limit.clone()),
                    ..job("a", start * 10, 200)
                },
            );
        }
        assert!(matches!(
            q.next(&limits()),
            Next::Batch(_, Priority::Background)
        ));
        q.finished(Priority::Background, 0);
        match q.next(&limits()) {
            Next::WaitForTokens(wait) => assert!(wait > Duration::from_millis(100), "{wait:?}"),
            other => panic!("expected a wait, got {other:?}"),
        }
        assert_eq!(
            q.waiting(Priority::Background),
            1,
            "still queued, at the head"
        );
    }

    #[test]
    fn jobs_under_different_limits_do_not_coalesce() {
        let mut q = Queue::default();
        q.push(
            Priority::Background,
            Job {
                limit: Some(RateLimit::new(1 << 30)),
                ..job("a", 0, 10)
            },
        );
        q.push(Priority::Background, job("a", 10, 10));
        assert_eq!(take(&mut q), (Priority::Background, vec![("a", 0)]));
    }

    #[test]
    fn remove_and_drain_take_jobs_out_of_one_queue() {
        let mut q = Queue::default();
        for i in 0..5 {
            q.push(Priority::Speculative, job("a", i * 100, 10));
        }
        let moved = q.remove(Priority::Speculative, |j| j.start == 300).unwrap();
        q.push(Priority::Demand, moved);
        let dropped = q.drain(Priority::Speculative, |j| j.start % 200 == 0);
        assert_eq!(
            dropped.iter().map(|j| j.start).collect::<Vec<_>>(),
            vec![0, 200, 400]
        );
        assert_eq!(q.waiting(Priority::Speculative), 1);
        assert_eq!(take(&mut q), (Priority::Demand, vec![("a", 300)]));
    }
}
