//! The group committer: the thread that turns every `put` into a durable journal record.
//!
//! Every `put` becomes a [`Request`] on a channel. The committer takes whatever is pending (up to
//! `max_batch`), keeps per cluster the last request allowed to replace (a later request for the
//! same cluster supersedes an earlier one), appends one journal record per cluster to the current
//! segment with one write, makes it durable with one `fdatasync`, points the index at the records,
//! and only then answers every caller. So N concurrent uploads cost one sync instead of N; while a
//! sync runs, new requests queue up and form the next, bigger batch.
//!
//! Full segments go to the checkpointer thread (the `checkpoint` module).

use std::collections::HashMap;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crossbeam_channel::Receiver;
use telemeter_common::sync::ReplySender;

use super::journal;
use super::{lock, Entry, Location, Shared, StoreError};

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

/// One upload waiting to be committed. The reply says whether it was written.
pub(super) struct Request {
    pub(super) cluster_id: String,
    pub(super) payload: Vec<u8>,
    pub(super) received_millis: u64,
    /// The payload's newest sample time (the TTL counts from it), read by the caller.
    pub(super) newest_sample_ms: i64,
    pub(super) mode: Mode,
    pub(super) reply: ReplySender<Result<bool, StoreError>>,
}

/// Runs until every sender is gone and the queue is drained, then hands the last segment to the
/// checkpointer (so a clean stop leaves only cluster files behind).
pub(super) fn run(shared: Arc<Shared>, requests: Receiver<Request>, max_batch: usize) {
    let max_batch = max_batch.max(1);
    // `recv` keeps returning queued requests after the last sender is dropped, so closing the
    // store still commits what was already asked for.
    while let Ok(first) = requests.recv() {
        let mut batch = vec![first];
        while batch.len() < max_batch {
            match requests.try_recv() {
                Ok(request) => batch.push(request),
                Err(_) => break,
            }
        }
        commit(&shared, batch);
    }
    let mut journal = lock(&shared.journal);
    if let (Some(segment), Some(retired)) = (journal.segment.take(), journal.retired.as_ref()) {
        let _ = retired.send(segment);
    }
    // The checkpointer ends once it has done what is queued.
    journal.retired = None;
}

/// Commits one batch and answers every request in it.
pub(super) fn commit(shared: &Shared, batch: Vec<Request>) {
    // Per cluster, the last request that is allowed to replace; the others are superseded.
    struct Group {
        winner: usize,
        superseded: Vec<usize>,
        received_millis: u64,
        newest_sample_ms: i64,
        image: usize,
    }
    let mut groups: Vec<Group> = Vec::new();
    let mut skipped: Vec<usize> = Vec::new();
    {
        let index = lock(&shared.index);
        let mut by_cluster: HashMap<&str, usize> = HashMap::new();
        for (i, request) in batch.iter().enumerate() {
            let group = by_cluster.get(request.cluster_id.as_str()).copied();
            let current = match group.and_then(|g| groups.get(g)) {
                Some(group) => Some((group.received_millis, group.newest_sample_ms)),
                None => index
                    .get(&request.cluster_id)
                    .map(|entry| (entry.received_millis, entry.newest_sample_ms)),
            };
            let keep_current = match request.mode {
                Mode::Replace => false,
                Mode::IfNewer => {
                    current.is_some_and(|(stored, _)| stored > request.received_millis)
                }
                Mode::UnlessOlder => {
                    current.is_some_and(|(_, stored)| stored > request.newest_sample_ms)
                }
            };
            if keep_current {
                skipped.push(i);
                continue;
            }
            match group.and_then(|g| groups.get_mut(g)) {
                Some(group) => {
                    group.superseded.push(group.winner);
                    group.winner = i;
                    group.received_millis = request.received_millis;
                    group.newest_sample_ms = request.newest_sample_ms;
                }
                None => {
                    by_cluster.insert(&request.cluster_id, groups.len());
                    groups.push(Group {
                        winner: i,
                        superseded: Vec::new(),
                        received_millis: request.received_millis,
                        newest_sample_ms: request.newest_sample_ms,
                        image: 0,
                    });
                }
            }
        }
    }

    // One buffer, one write, one sync for the whole batch.
    let mut bytes = Vec::with_capacity(
        groups
            .iter()
            .filter_map(|g| batch.get(g.winner))
            .map(|r| r.payload.len() + 128 + r.cluster_id.len())
            .sum(),
    );
    let mut refused: Vec<(usize, String)> = Vec::new();
    for (g, group) in groups.iter_mut().enumerate() {
        let Some(request) = batch.get(group.winner) else {
            continue;
        };
        match journal::encode(
            journal::PUT,
            &request.cluster_id,
            request.received_millis,
            &request.payload,
            &mut bytes,
        ) {
            Ok(image) => group.image = image,
            Err(reason) => refused.push((g, reason)),
        }
    }
    let written: Result<u64, StoreError> = if bytes.is_empty() {
        Ok(0)
    } else {
        shared.append(&bytes, |segment, base| {
            let mut index = lock(&shared.index);
            let mut written = 0;
            for (g, group) in groups.iter().enumerate() {
                if refused.iter().any(|(r, _)| *r == g) {
                    continue;
                }
                if let Some(request) = batch.get(group.winner) {
                    index.insert(
                        request.cluster_id.clone(),
                        Entry {
                            received_millis: request.received_millis,
                            newest_sample_ms: request.newest_sample_ms,
                            payload_bytes: request.payload.len() as u64,
                            location: Location::Journal {
                                segment: Arc::clone(segment),
                                offset: base + group.image as u64,
                            },
                        },
                    );
                    written += 1 + group.superseded.len() as u64;
                }
            }
            written
        })
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
    for (g, group) in groups.iter().enumerate() {
        let result = match (&written, refused.iter().find(|(r, _)| *r == g)) {
            (_, Some((_, reason))) => Err(StoreError::format(
                format!(
                    "encoding the file of cluster {:?}",
                    batch
                        .get(group.winner)
                        .map(|r| r.cluster_id.as_str())
                        .unwrap_or_default()
                ),
                reason.clone(),
            )),
            (Ok(_), None) => Ok(true),
            (Err(error), None) => Err(error.duplicate()),
        };
        for &i in std::iter::once(&group.winner).chain(&group.superseded) {
            if let Some(request) = batch.get(i) {
                // The caller may have given up waiting; nothing to do then.
                request.reply.send(match &result {
                    Ok(v) => Ok(*v),
                    Err(error) => Err(error.duplicate()),
                });
            }
        }
    }
    for i in skipped {
        if let Some(request) = batch.get(i) {
            request.reply.send(Ok(false));
        }
    }
}
