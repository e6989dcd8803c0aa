//! The group committer: what turns every `put` into a durable journal record.
//!
//! Every `put` becomes a [`Request`] handed to the [`Queue`]. Whoever commits takes whatever is
//! pending (up to `max_batch`), keeps per cluster the last request allowed to replace (a later
//! request for the same cluster supersedes an earlier one), appends one journal record per
//! cluster to the current segment with one write, makes it durable with one `fdatasync`, points
//! the index at the records, and only then answers every caller. So N concurrent uploads cost one
//! sync instead of N; while a sync runs, new requests queue up and form the next, bigger batch.
//!
//! Who commits: a caller that finds no commit running and nothing queued commits its own request
//! on its own thread; otherwise it queues and the committer thread takes the queue as one batch
//! when the running commit is done. One sender's upload so costs its write and its sync and no
//! thread hand-off (before, the caller woke the committer and the committer woke the caller: two
//! wake-ups an upload, each a scheduling delay on a busy 2-core machine, and crossbeam's `recv`
//! spun and yielded on the committer's core while the connection thread wanted it), while under
//! load the committer thread still forms the batches, since a caller commits only when it is
//! alone. Commits never overlap: `committing` is the one permit, and requests are committed in
//! the order they took the queue's lock, so a later put of a cluster is never overwritten by an
//! earlier one.
//!
//! Measured (release, the shared 2-core VM, alternating with the hand-off to a committer thread):
//! 1 sender with the scheduler not contended (server and load generator under `chrt -f 1`), p50
//! 0.48–0.62 ms and 320–456 µs of server CPU an upload against 0.55–0.61 ms and 398–458 µs; 64
//! senders 2,612–3,400 uploads/s and 253–286 µs an upload against 1,720–2,924/s and 258–315 µs.
//! The price: while other processes keep both cores busy, the connection thread, woken several
//! times inside `fdatasync` (the disk's interrupts all land on one core), often waits a
//! scheduler tick (4 ms) for its core, which the light committer thread, woken on the interrupts'
//! core, did less often: 1 sender's p50 is then ~4 ms against 0.5–2 ms (README, 1 sender).
//!
//! With egress on, what must be shipped is journaled in the same batch even when it is not served:
//! a superseded or older upload, or a separate payload to ship, becomes a "ship only" record;
//! a served payload that is not shipped a "serve only" one (the `journal` module's kinds).
//!
//! A request that says how its payload differs from the stored one (a remote-write merge done
//! in place) is journaled as a patch of it when that is allowed (the `patch` module); the
//! journal stays locked from that decision to the append, so no other append (a removal) can
//! start a segment between them.
//!
//! A request may hold only under a [`Condition`] on what is stored, checked under the index lock
//! where the batch is formed (a merge over the payload it read, an upload as sent while its
//! cluster has no remote-write series): one that does not hold journals nothing and is answered
//! so, for its caller to merge.
//!
//! Full segments go to the checkpointer thread (the `checkpoint` module).

use std::cell::Cell;
use std::collections::{HashMap, VecDeque};

use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use telemeter_common::sync::{unpoison, ReplySender};

use super::journal::{self, Encoding, Held, Segment};
use super::patch::{Patch, MAX_PATCHES};
use super::{lock, Entry, Location, Returned, Shared, Ship, StoreError};

/// Whether a request replaces unconditionally or only when newer than what is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Mode {
    /// [`super::Store::put`].
    Replace,
    /// [`super::Store::put_if_newer`].
    IfNewer,
    /// [`super::Store::put_unless_older`].
    UnlessOlder,
}

/// What must hold of a cluster's stored payload, when the batch is committed, for a request to be
/// committed at all. When it does not, nothing of the request is journaled (not even what it
/// ships), and its caller hears why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Condition {
    /// Nothing.
    Always,
    /// The stored payload is still the one of this version (`None`: the cluster has no entry),
    /// and no other put of the cluster comes before it in the batch: a merge made over that
    /// payload would otherwise erase what was put since. Else [`Outcome::Moved`].
    Version(Option<u64>),
    /// The cluster has no remote-write series within the TTL, counting those of requests before
    /// it in the batch: an upload as sent would erase them. Else
    /// [`super::StoreError::UsesRemoteWrite`], with the payload handed back.
    NoRemoteWrite,
}

/// What became of one request, once committed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Outcome {
    /// Not stored to be served (the stored upload kept, or only shipped).
    Kept,
    /// Stored, and replaced by a later request of the same batch.
    Superseded,
    /// Stored, and served now as the index entry of this [`super::Entry::version`].
    Stored(u64),
    /// Not stored, nothing journaled: the request's patch cannot extend what the index holds
    /// (another payload, a full chain, another segment); the caller puts the whole payload.
    Unpatchable,
    /// Not stored, nothing journaled: its [`Condition::Version`] does not hold.
    Moved,
}

impl Outcome {
    /// Whether the payload was written to be served.
    pub(super) fn written(self) -> bool {
        !matches!(self, Outcome::Kept | Outcome::Unpatchable | Outcome::Moved)
    }
}

/// One upload waiting to be committed. The reply says what became of it.
pub(super) struct Request {
    pub(super) cluster_id: String,
    /// What to serve (empty when `serve` is false, or when `patch` says it instead): families,
    /// or with `packed` the upload as it arrived, snappy framed.
    pub(super) payload: Vec<u8>,
    /// `Some(decompressed length)` when `payload` is snappy framed: it is journaled packed.
    pub(super) packed: Option<u64>,
    /// Whether `payload` is to be served (false: the request only ships).
    pub(super) serve: bool,
    /// What egress ships of this request (when it is on).
    pub(super) ship: Ship,
    pub(super) received_millis: u64,
    /// The payload's newest sample time (the TTL counts from it), read by the caller.
    pub(super) newest_sample_ms: i64,
    /// The payload's newest remote-write sample (`i64::MIN`: none), as the caller knows it.
    pub(super) newest_received_ms: i64,
    /// What to serve as a change of the stored payload it was made over, sealed (the `patch`
    /// module), instead of `payload`: journaled when the index still holds that payload as a
    /// chain of the segment appended to with room for it, else answered
    /// [`Outcome::Unpatchable`] with nothing journaled (its ship record neither).
    pub(super) patch: Option<Patch>,
    pub(super) mode: Mode,
    pub(super) condition: Condition,
    pub(super) reply: Answer,
}

/// What a caller is told once its request is committed: whether its payload was written to be
/// served ([`Outcome::written`]), or why it failed.
pub(super) type Then = Box<dyn FnOnce(Result<bool, StoreError>) + Send>;

/// Who hears what became of a request: a caller waiting on its own thread, or a continuation
/// run where the commit ends (the committer's thread, or the caller's own when it commits
/// alone), so that the caller need not sleep until then.
pub(super) enum Answer {
    /// The caller waits for the reply.
    Wait(ReplySender<Result<Outcome, StoreError>>),
    /// Run once with the outcome; dropped unanswered (the store closed, the committer gone),
    /// run with [`StoreError::Closed`], as a waiting caller would hear.
    Then(Cell<Option<Then>>),
}

impl Answer {
    /// A continuation answer.
    pub(super) fn then(then: Then) -> Answer {
        Answer::Then(Cell::new(Some(then)))
    }

    /// Answers; the first answer counts.
    pub(super) fn send(&self, result: Result<Outcome, StoreError>) {
        match self {
            Answer::Wait(reply) => reply.send(result),
            Answer::Then(then) => {
                if let Some(then) = then.take() {
                    run_then(then, result);
                }
            }
        }
    }
}

impl Drop for Answer {
    fn drop(&mut self) {
        if let Answer::Then(then) = self {
            if let Some(then) = then.take() {
                run_then(then, Err(StoreError::Closed));
            }
        }
    }
}

/// Runs a continuation; a panic in it is the caller's bug and stays there: it must not end the
/// committer thread (every later put would be refused).
fn run_then(then: Then, result: Result<Outcome, StoreError>) {
    let written = result.map(Outcome::written);
    if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| then(written))) {
        log::error!(
            "the answer to a committed put panicked: {}",
            telemeter_common::sync::panic_message(&*panic)
        );
    }
}

/// Where puts meet whoever commits them: the requests waiting for a commit, and whether one runs.
pub(super) struct Queue {
    state: Mutex<QueueState>,
    /// Wakes the committer thread: requests queued with no commit running, or the store closed.
    work: Condvar,
    max_batch: usize,
}

struct QueueState {
    /// Requests not yet taken into a batch, oldest first.
    waiting: VecDeque<Request>,
    /// A commit is running, on the committer thread or on a caller's: the one permit to commit.
    committing: bool,
    /// Closed: puts are refused; the committer thread commits what is queued, then stops.
    closed: bool,
}

/// Ends a commit when dropped (also while unwinding from a panic in it): gives the permit back
/// and wakes the committer thread if requests queued meanwhile, so a commit that panicked on a
/// caller's thread does not leave every later put waiting for ever.
struct Committing<'a>(&'a Queue);

impl Drop for Committing<'_> {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.committing = false;
        let wake = !state.waiting.is_empty() || state.closed;
        drop(state);
        if wake {
            self.0.work.notify_one();
        }
    }
}

impl Queue {
    /// An open queue whose batches hold at most `max_batch` requests (at least one).
    pub(super) fn new(max_batch: usize) -> Queue {
        Queue {
            state: Mutex::new(QueueState {
                waiting: VecDeque::new(),
                committing: false,
                closed: false,
            }),
            work: Condvar::new(),
            max_batch: max_batch.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, QueueState> {
        lock(&self.state)
    }

    /// Commits `request` here when no commit runs and none is queued (its reply is then sent
    /// before this returns), else queues it for the committer thread. Refused once closed.
    pub(super) fn submit(&self, shared: &Shared, request: Request) -> Result<(), StoreError> {
        let mut state = self.lock();
        if state.closed {
            return Err(StoreError::Closed);
        }
        if state.committing || !state.waiting.is_empty() {
            state.waiting.push_back(request);
            // A running commit looks at the queue when it ends; otherwise the committer thread
            // was woken for what is queued already, and one more wake-up is harmless.
            let wake = !state.committing;
            drop(state);
            if wake {
                self.work.notify_one();
            }
            return Ok(());
        }
        state.committing = true;
        drop(state);
        let _committing = Committing(self);
        commit(shared, vec![request]);
        Ok(())
    }

    /// Whether a commit runs now (tests wait for one to start).
    #[cfg(test)]
    pub(super) fn committing(&self) -> bool {
        self.lock().committing
    }

    /// Refuses further puts; the committer thread commits what is queued, then stops.
    pub(super) fn close(&self) {
        self.lock().closed = true;
        self.work.notify_all();
    }

    /// The next batch for the committer thread, waiting for one; `None` once closed, with nothing
    /// queued and no commit running.
    fn next_batch(&self) -> Option<Vec<Request>> {
        let mut state = self.lock();
        loop {
            if !state.committing {
                if !state.waiting.is_empty() {
                    state.committing = true;
                    let take = state.waiting.len().min(self.max_batch);
                    return Some(state.waiting.drain(..take).collect());
                }
                if state.closed {
                    return None;
                }
            }
            state = unpoison(self.work.wait(state));
        }
    }
}

/// The committer thread: commits what callers queued while another commit ran, until the queue
/// is closed and drained, then hands the last segment to the checkpointer (so a clean stop
/// leaves only cluster files behind).
pub(super) fn run(shared: Arc<Shared>, queue: Arc<Queue>) {
    /// Should the committer thread die, the requests queued and to come are refused (their
    /// reply senders dropped, so their callers hear `Closed`) rather than waited for in vain.
    struct Refuse<'a>(&'a Queue);
    impl Drop for Refuse<'_> {
        fn drop(&mut self) {
            let orphans = {
                let mut state = self.0.lock();
                state.closed = true;
                std::mem::take(&mut state.waiting)
            };
            drop(orphans);
        }
    }
    let _refuse = Refuse(&queue);
    while let Some(batch) = queue.next_batch() {
        let _committing = Committing(&queue);
        commit(&shared, batch);
    }
    let mut journal = lock(&shared.journal);
    if let (Some(segment), Some(retired)) = (journal.segment.take(), journal.retired.as_ref()) {
        let _ = retired.send(segment);
    }
    // The checkpointer ends once it has done what is queued.
    journal.retired = None;
}

/// The largest batch buffer kept for the next commit ([`JournalState::batch_buffer`]): a rare
/// huge batch (15 MiB uploads) is let go rather than held.
const BATCH_BUFFER_KEPT: usize = 4 << 20;

/// Keeps `bytes`' memory in `kept` for the next commit, emptied, unless it is over
/// [`BATCH_BUFFER_KEPT`].
fn keep_batch_buffer(kept: &mut Vec<u8>, mut bytes: Vec<u8>) {
    if bytes.capacity() <= BATCH_BUFFER_KEPT {
        bytes.clear();
        *kept = bytes;
    }
}

/// Commits one batch and answers every request in it.
pub(super) fn commit(shared: &Shared, batch: Vec<Request>) {
    // Per cluster, the last request that is allowed to replace; the others are superseded.
    struct Group {
        winner: usize,
        superseded: Vec<usize>,
        received_millis: u64,
        newest_sample_ms: i64,
        /// The winner's newest remote-write sample.
        newest_received_ms: i64,
        image: usize,
        version: u64,
        /// The chain the winner's patch extends, when it is journaled as a patch.
        chain: Option<Chain>,
    }
    /// What became of one request in the grouping.
    #[derive(Clone, Copy)]
    enum Role {
        /// Its payload is served: the winner of this group.
        Winner(usize),
        /// Replaced by a later request of the same batch (group).
        Superseded,
        /// Not served (kept the stored upload, or asked only to be shipped).
        Skipped,
        /// A patch that cannot be journaled: nothing of it is.
        Unpatchable,
        /// Its [`Condition`] does not hold: nothing of it is journaled.
        Unmet,
    }
    let egress = shared.egress.is_some();
    let mut groups: Vec<Group> = Vec::new();
    let mut roles: Vec<Role> = Vec::with_capacity(batch.len());
    // Locked from the choice between patch and image to the append: a patch only extends a
    // chain in the segment it is appended to (see the `patch` module), and no other append (a
    // removal) may start a segment in between.
    let mut journal_state = lock(&shared.journal);
    let target = shared.appending_to(&journal_state);
    {
        let index = lock(&shared.index);
        let mut by_cluster: HashMap<&str, usize> = HashMap::new();
        for (i, request) in batch.iter().enumerate() {
            if !request.serve {
                roles.push(Role::Skipped);
                continue;
            }
            let group = by_cluster.get(request.cluster_id.as_str()).copied();
            let stored = index.get(&request.cluster_id);
            let met = match request.condition {
                Condition::Always => true,
                Condition::Version(base) => {
                    group.is_none() && stored.map(|entry| entry.version) == base
                }
                Condition::NoRemoteWrite => {
                    // Unknown (a file written before the store kept the marker, not read since):
                    // as its caller found, which read it.
                    let newest_received = match group.and_then(|g| groups.get(g)) {
                        Some(group) => Some(group.newest_received_ms),
                        None => stored.and_then(|entry| entry.newest_received_ms),
                    };
                    !newest_received.is_some_and(|newest| {
                        super::is_recent(newest, request.received_millis, shared.ttl)
                    })
                }
            };
            if !met {
                roles.push(Role::Unmet);
                continue;
            }
            let current = match group.and_then(|g| groups.get(g)) {
                Some(group) => Some((group.received_millis, group.newest_sample_ms)),
                None => stored.map(|entry| (entry.received_millis, entry.newest_sample_ms)),
            };
            let keep_current = match request.mode {
                Mode::Replace => false,
                // Fresher samples win, as for a push (`UnlessOlder`); of the same, the later
                // arrival. A handoff of an upload that reached another server late (spooled
                // through an outage, while this one was thought down) replaces nothing fresher.
                Mode::IfNewer => current.is_some_and(|(stored_received, stored_newest)| {
                    stored_newest > request.newest_sample_ms
                        || (stored_newest == request.newest_sample_ms
                            && stored_received > request.received_millis)
                }),
                Mode::UnlessOlder => {
                    current.is_some_and(|(_, stored)| stored > request.newest_sample_ms)
                }
            };
            if keep_current {
                roles.push(Role::Skipped);
                continue;
            }
            // A patch extends only the stored payload it was made over, never one of this batch.
            let chain = match (&request.patch, group) {
                (None, _) => None,
                (Some(_), Some(_)) => {
                    roles.push(Role::Unpatchable);
                    continue;
                }
                (Some(patch), None) => {
                    match extendable(index.get(&request.cluster_id), patch, target) {
                        Some(chain) => Some(chain),
                        None => {
                            roles.push(Role::Unpatchable);
                            continue;
                        }
                    }
                }
            };
            match group {
                Some(g) => {
                    if let Some(group) = groups.get_mut(g) {
                        group.chain = None;
                        if let Some(role) = roles.get_mut(group.winner) {
                            *role = Role::Superseded;
                        }
                        group.superseded.push(group.winner);
                        group.winner = i;
                        group.received_millis = request.received_millis;
                        group.newest_sample_ms = request.newest_sample_ms;
                        group.newest_received_ms = request.newest_received_ms;
                    }
                    roles.push(Role::Winner(g));
                }
                None => {
                    by_cluster.insert(&request.cluster_id, groups.len());
                    roles.push(Role::Winner(groups.len()));
                    groups.push(Group {
                        winner: i,
                        superseded: Vec::new(),
                        received_millis: request.received_millis,
                        newest_sample_ms: request.newest_sample_ms,
                        newest_received_ms: request.newest_received_ms,
                        image: 0,
                        version: 0,
                        chain,
                    });
                }
            }
        }
    }

    // One buffer, one write, one sync for the whole batch, its records in the order asked (so
    // egress ships each cluster's payloads in that order).
    let mut bytes = std::mem::take(&mut journal_state.batch_buffer);
    bytes.reserve(
        batch
            .iter()
            .map(|r| r.payload.len() + r.ship.len() + 256 + 2 * r.cluster_id.len())
            .sum(),
    );
    let mut refused: HashMap<usize, String> = HashMap::new();
    // Whether a request's answer depends on the append (it wrote a record).
    let mut recorded = vec![false; batch.len()];
    for (i, request) in batch.iter().enumerate() {
        let role = roles.get(i).copied().unwrap_or(Role::Skipped);
        // (kind, payload, whether it is packed): the served record, then the shipped one; held
        // in place rather than in a vector, one allocation an upload less.
        let packed = request.packed.is_some();
        if let Role::Unpatchable | Role::Unmet = role {
            continue;
        }
        let served: Option<(u8, &[u8], bool)> = match (role, &request.patch) {
            (Role::Winner(_), Some(patch)) => Some((journal::PATCH, &patch.bytes, false)),
            (Role::Winner(_), None) => {
                let kind = match (&request.ship, egress) {
                    (Ship::Served, _) | (_, false) => journal::PUT,
                    _ => journal::SERVE,
                };
                Some((kind, &request.payload, packed))
            }
            _ => None,
        };
        let shipped: Option<(u8, &[u8], bool)> = match (&request.ship, role) {
            _ if !egress => None,
            (Ship::Payload(ship), _) => Some((journal::SHIP, ship, false)),
            (Ship::Served, Role::Superseded | Role::Skipped) if request.serve => {
                Some((journal::SHIP, &request.payload, packed))
            }
            _ => None,
        };
        let records = served.into_iter().chain(shipped);
        for (n, (kind, payload, packed)) in records.enumerate() {
            // A served payload's record carries its remote-write marker, so a replay restores it;
            // a packed one is an upload as sent, which has none.
            let encoded = match (packed, request.packed, kind) {
                (true, Some(plain_len), _) => journal::encode_packed(
                    kind,
                    &request.cluster_id,
                    request.received_millis,
                    plain_len,
                    request.newest_sample_ms,
                    payload,
                    &mut bytes,
                ),
                (_, _, journal::PUT | journal::SERVE) => journal::encode_marked(
                    kind,
                    &request.cluster_id,
                    request.received_millis,
                    payload,
                    request.newest_received_ms,
                    &mut bytes,
                ),
                _ => journal::encode(
                    kind,
                    &request.cluster_id,
                    request.received_millis,
                    payload,
                    &mut bytes,
                ),
            };
            match encoded {
                Ok(image) => {
                    recorded[i] = true;
                    if let (0, Role::Winner(g)) = (n, role) {
                        if let Some(group) = groups.get_mut(g) {
                            group.image = image;
                        }
                    }
                }
                Err(reason) => {
                    refused.insert(i, reason);
                    break;
                }
            }
        }
    }
    let written: Result<(u64, Vec<Entry>), StoreError> = if bytes.is_empty() {
        Ok((0, Vec::new()))
    } else {
        shared.append_locked(&mut journal_state, &bytes, |segment, base| {
            let mut index = lock(&shared.index);
            let mut written = 0;
            // Replaced entries that keep a mapping, or the last reference to a segment (retired
            // while its checkpoint failed): unmapped and closed after the locks are let go.
            let mut mapped = Vec::new();
            // Bytes of payloads the index finds in this segment that reads of it hold in memory
            // (packed records, chains): see `journal::Held`.
            let mut held = Held::default();
            for group in &mut groups {
                if refused.contains_key(&group.winner) {
                    continue;
                }
                if let Some(request) = batch.get(group.winner) {
                    group.version = shared.versions.fetch_add(1, Ordering::Relaxed);
                    let offset = base + group.image as u64;
                    let (payload_bytes, encoding) = match (&request.patch, request.packed) {
                        (Some(patch), _) => (patch.payload_len(), Encoding::Plain),
                        (None, Some(plain_len)) => (
                            plain_len,
                            Encoding::Packed {
                                record_bytes: journal::packed_record_bytes(request.payload.len()),
                            },
                        ),
                        (None, None) => (request.payload.len() as u64, Encoding::Plain),
                    };
                    let location = match group.chain.take() {
                        Some(mut chain) => {
                            chain.patches.push(offset);
                            Location::Chain {
                                segment: chain.segment,
                                image: chain.image,
                                patches: chain.patches,
                                patch_bytes: chain.patch_bytes,
                            }
                        }
                        None => Location::Journal {
                            segment: Arc::clone(segment),
                            offset,
                            encoding,
                        },
                    };
                    let entry = Entry {
                        received_millis: request.received_millis,
                        newest_sample_ms: request.newest_sample_ms,
                        newest_received_ms: Some(request.newest_received_ms),
                        payload_bytes,
                        location,
                        version: group.version,
                    };
                    held.add(&entry, segment.number);
                    // Replaced in place when the cluster has an entry (nearly every upload):
                    // no copy of its id for a key the index holds already.
                    let replaced = match index.get_mut(request.cluster_id.as_str()) {
                        Some(slot) => Some(std::mem::replace(slot, entry)),
                        None => index.insert(request.cluster_id.clone(), entry),
                    };
                    if let Some(replaced) = replaced {
                        held.remove(&replaced, segment.number);
                        if replaced.location.mapped() || replaced.location.holds_last_segment() {
                            mapped.push(replaced);
                        }
                    }
                    written += 1 + group.superseded.len() as u64;
                }
            }
            ((written, mapped), held)
        })
    };
    keep_batch_buffer(&mut journal_state.batch_buffer, bytes);
    drop(journal_state);
    // The replaced entries' kept mappings are unmapped once every answer is out.
    let (written, unmapped) = match written {
        Ok((written, mapped)) => (Ok(written), mapped),
        Err(error) => (Err(error), Vec::new()),
    };
    if let Ok(written) = &written {
        if *written > 0 {
            shared.counters.commits.fetch_add(1, Ordering::Relaxed);
            shared
                .counters
                .writes
                .fetch_add(*written, Ordering::Relaxed);
        }
    }

    // Only now, with the records durable, answer.
    let encoding_error = |cluster_id: &str, reason: &str| {
        StoreError::format(
            format!("encoding the journal record of cluster {cluster_id:?}"),
            reason.to_string(),
        )
    };
    for group in &groups {
        let result = match (&written, refused.get(&group.winner)) {
            (_, Some(reason)) => Err(encoding_error(
                batch
                    .get(group.winner)
                    .map(|r| r.cluster_id.as_str())
                    .unwrap_or_default(),
                reason,
            )),
            (Ok(_), None) => Ok(Outcome::Stored(group.version)),
            (Err(error), None) => Err(error.duplicate()),
        };
        for &i in std::iter::once(&group.winner).chain(&group.superseded) {
            if let Some(request) = batch.get(i) {
                // A superseded request whose own ship record could not be encoded failed.
                let result = match refused.get(&i) {
                    Some(reason) if i != group.winner => {
                        Err(encoding_error(&request.cluster_id, reason))
                    }
                    _ => match &result {
                        Ok(_) if i != group.winner => Ok(Outcome::Superseded),
                        Ok(outcome) => Ok(*outcome),
                        Err(error) => Err(error.duplicate()),
                    },
                };
                // The caller may have given up waiting; nothing to do then.
                request.reply.send(result);
            }
        }
    }
    for (i, mut request) in batch.into_iter().enumerate() {
        if let Some(Role::Unpatchable) = roles.get(i) {
            request.reply.send(Ok(Outcome::Unpatchable));
            continue;
        }
        if let Some(Role::Unmet) = roles.get(i) {
            let result = match request.condition {
                Condition::NoRemoteWrite => Err(StoreError::UsesRemoteWrite(Returned {
                    cluster_id: std::mem::take(&mut request.cluster_id),
                    payload: std::mem::take(&mut request.payload),
                    packed: request.packed,
                })),
                Condition::Always | Condition::Version(_) => Ok(Outcome::Moved),
            };
            request.reply.send(result);
            continue;
        }
        if !matches!(roles.get(i), Some(Role::Skipped)) {
            continue;
        }
        let result = match (refused.get(&i), &written) {
            (Some(reason), _) => Err(encoding_error(&request.cluster_id, reason)),
            (None, Err(error)) if recorded[i] => Err(error.duplicate()),
            _ => Ok(Outcome::Kept),
        };
        request.reply.send(result);
    }
    drop(unmapped);
}

/// An index entry's chain that a patch extends: the chain with the patch's bytes counted.
struct Chain {
    segment: Arc<Segment>,
    image: u64,
    patches: Vec<u64>,
    patch_bytes: u64,
}

/// The chain `patch` extends when it can be journaled over `entry` in the segment `target` (the
/// one the append goes to, `None` when it starts a new one): the entry is the payload the patch
/// was made over, an image or chain of that segment, of the same length, with fewer than
/// [`MAX_PATCHES`] patches, and its patches' bytes stay within the payload's size.
fn extendable(entry: Option<&Entry>, patch: &Patch, target: Option<u64>) -> Option<Chain> {
    let entry = entry?;
    let (segment, image, patches, patch_bytes) = match &entry.location {
        Location::Journal {
            segment,
            offset,
            encoding: Encoding::Plain,
        } => (segment, *offset, &[][..], 0),
        // A packed payload is an upload as sent, never a merge's: nothing to patch.
        Location::Journal { .. } => return None,
        Location::Chain {
            segment,
            image,
            patches,
            patch_bytes,
        } => (segment, *image, &patches[..], *patch_bytes),
        Location::File { .. } => return None,
    };
    let patch_bytes = patch_bytes + patch.len() as u64;
    (entry.version == patch.base_version
        && Some(segment.number) == target
        && entry.payload_bytes == patch.payload_len()
        && patches.len() < MAX_PATCHES
        && patch_bytes <= entry.payload_bytes)
        .then(|| Chain {
            segment: Arc::clone(segment),
            image,
            patches: patches.to_vec(),
            patch_bytes,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_batch_buffer_kept_is_empty_and_never_over_its_cap() {
        let mut kept = Vec::new();
        let mut big = Vec::with_capacity(BATCH_BUFFER_KEPT + 1);
        big.extend_from_slice(b"record");
        keep_batch_buffer(&mut kept, big);
        assert!(kept.is_empty());
        assert!(kept.capacity() <= BATCH_BUFFER_KEPT, "{}", kept.capacity());
        let mut small = Vec::with_capacity(4096);
        small.extend_from_slice(b"record");
        keep_batch_buffer(&mut kept, small);
        assert!(kept.is_empty() && kept.capacity() <= BATCH_BUFFER_KEPT);
        assert!(kept.capacity() >= 4096, "kept for the next commit");
    }
}
