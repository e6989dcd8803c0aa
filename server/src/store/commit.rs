//! The group committer: the one place that writes cluster files.
//!
//! Every `put` becomes a [`Request`] on a channel. The committer takes whatever is pending (up to
//! `max_batch`), writes each upload to its own temp file (once per cluster: a later request for the
//! same cluster supersedes an earlier one), makes all of them durable with one `syncfs` (one
//! `fdatasync` per file only when `syncfs` fails), and hands the batch to the publisher, which
//! renames the files over their final names, syncs the directory once, and only then answers every
//! caller. So N concurrent uploads cost about one round of syncs instead of N, and the two stages
//! overlap (batch N is published while batch N+1 is written).

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread;

use crossbeam_channel::{Receiver, Sender};

use super::file;
use super::{lock, Entry, Shared, StoreError};

/// Whether a request replaces unconditionally or only when newer than what is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Mode {
    /// [`super::Store::put`].
    Replace,
    /// [`super::Store::put_if_newer`].
    IfNewer,
}

/// One upload waiting to be committed. The reply says whether it was written.
pub(super) struct Request {
    pub(super) cluster_id: String,
    pub(super) payload: Vec<u8>,
    pub(super) received_millis: u64,
    pub(super) mode: Mode,
    pub(super) reply: Sender<Result<bool, StoreError>>,
}

/// Runs until every sender is gone and the queue is drained.
///
/// Two stages overlap: while this thread writes and syncs batch N+1, a publisher thread renames
/// batch N into place, syncs the directory and answers its callers. Each stage ends in a journal
/// commit, so overlapping them roughly halves the time a batch holds the queue.
pub(super) fn run(shared: Arc<Shared>, requests: Receiver<Request>, max_batch: usize) {
    let max_batch = max_batch.max(1);
    let pending = Mutex::new(HashMap::new());
    thread::scope(|scope| {
        // Rendezvous: at most one batch is published while the next is prepared; whatever arrives
        // meanwhile waits in the queue and forms a bigger next batch.
        let (to_publisher, prepared) = crossbeam_channel::bounded::<Prepared>(0);
        let publisher = thread::Builder::new()
            .name("store-publisher".to_string())
            .spawn_scoped(scope, || {
                for batch in prepared {
                    publish(&shared, &pending, batch);
                }
            });
        // Without a publisher, batches are published here (slower, still correct).
        let to_publisher = publisher.ok().map(|_| to_publisher);
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
            let ready = prepare(&shared, &pending, batch);
            match &to_publisher {
                Some(to_publisher) => {
                    if let Err(unsent) = to_publisher.send(ready) {
                        // The publisher died (it panicked); publish here instead.
                        publish(&shared, &pending, unsent.into_inner());
                    }
                }
                None => publish(&shared, &pending, ready),
            }
        }
        // Dropping the sender lets the publisher finish its last batch; the scope joins it.
        drop(to_publisher);
    });
}

/// io::Error is not Clone; every caller sharing a failure gets an equal copy.
fn copy_error(error: &io::Error) -> io::Error {
    match error.raw_os_error() {
        Some(code) => io::Error::from_raw_os_error(code),
        None => io::Error::new(error.kind(), error.to_string()),
    }
}

/// One cluster's share of a batch: the request that gets written and the ones it supersedes.
struct Group {
    winner: usize,
    superseded: Vec<usize>,
    received_millis: u64,
    outcome: Option<(String, io::Error)>,
    temp: Option<PathBuf>,
    renamed: bool,
}

impl Group {
    fn fail(&mut self, context: String, error: io::Error) {
        if let Some(temp) = self.temp.take() {
            // Best effort: a temp file left behind is removed at the next open anyway.
            let _ = fs::remove_file(&temp);
        }
        self.outcome = Some((context, error));
    }
}

/// Commits one batch and answers every request in it (both stages, on this thread).
#[cfg(test)]
pub(super) fn commit(shared: &Shared, batch: Vec<Request>) {
    let pending = Mutex::new(HashMap::new());
    let ready = prepare(shared, &pending, batch);
    publish(shared, &pending, ready);
}

/// A batch whose temp files are written and durable, waiting to be renamed into place.
struct Prepared {
    batch: Vec<Request>,
    groups: Vec<Group>,
    skipped: Vec<usize>,
}

/// Receive times of the clusters in batches prepared but not yet published; `put_if_newer`
/// compares with them as well as with the index.
type Pending = Mutex<HashMap<String, u64>>;

/// Stage one: decides what gets written, writes the temp files and makes them durable.
fn prepare(shared: &Shared, pending: &Pending, batch: Vec<Request>) -> Prepared {
    // Decide what gets written: per cluster, the last request that is allowed to replace.
    let mut groups: Vec<Group> = Vec::new();
    let mut skipped: Vec<usize> = Vec::new();
    {
        let index = lock(&shared.index);
        let mut pending = lock(pending);
        let mut by_cluster: HashMap<&str, usize> = HashMap::new();
        for (i, request) in batch.iter().enumerate() {
            let group = by_cluster.get(request.cluster_id.as_str()).copied();
            let current = match group.and_then(|g| groups.get(g)) {
                Some(group) => Some(group.received_millis),
                None => pending.get(&request.cluster_id).copied().or_else(|| {
                    index
                        .get(&request.cluster_id)
                        .map(|entry| entry.received_millis)
                }),
            };
            if request.mode == Mode::IfNewer
                && current.is_some_and(|stored| stored > request.received_millis)
            {
                skipped.push(i);
                continue;
            }
            match group.and_then(|g| groups.get_mut(g)) {
                Some(group) => {
                    group.superseded.push(group.winner);
                    group.winner = i;
                    group.received_millis = request.received_millis;
                }
                None => {
                    by_cluster.insert(&request.cluster_id, groups.len());
                    groups.push(Group {
                        winner: i,
                        superseded: Vec::new(),
                        received_millis: request.received_millis,
                        outcome: None,
                        temp: None,
                        renamed: false,
                    });
                }
            }
        }
        for group in &groups {
            if let Some(request) = batch.get(group.winner) {
                pending.insert(request.cluster_id.clone(), group.received_millis);
            }
        }
    }

    // Write every temp file; keep them open for the per-file fallback sync.
    let mut open_files: Vec<(usize, File)> = Vec::new();
    for (g, group) in groups.iter_mut().enumerate() {
        let Some(request) = batch.get(group.winner) else {
            continue;
        };
        let seq = shared.next_temp.fetch_add(1, Ordering::Relaxed);
        let temp = shared.dir.join(format!(".tmp-{seq}"));
        let header = match file::encode_header(
            &request.cluster_id,
            request.received_millis,
            &request.payload,
        ) {
            Ok(header) => header,
            Err(reason) => {
                group.fail(
                    format!("encoding the file of cluster {:?}", request.cluster_id),
                    io::Error::new(io::ErrorKind::InvalidInput, reason),
                );
                continue;
            }
        };
        let created = File::options().write(true).create_new(true).open(&temp);
        let mut out = match created {
            Ok(out) => out,
            Err(error) => {
                group.fail(format!("creating {}", temp.display()), error);
                continue;
            }
        };
        group.temp = Some(temp.clone());
        let written = out
            .write_all(&header)
            .and_then(|()| out.write_all(&request.payload));
        if let Err(error) = written {
            group.fail(format!("writing {}", temp.display()), error);
            continue;
        }
        open_files.push((g, out));
    }

    // One syncfs flushes every temp file at once. Since Linux 5.8 it also reports writeback errors
    // seen on the file system since the directory fd was opened; when it fails we cannot tell which
    // file was hit, so each file is synced on its own to find out.
    if !open_files.is_empty() && !sync_file_system(shared) {
        for (g, out) in &open_files {
            if let Some(group) = groups.get_mut(*g) {
                if let Err(error) = out.sync_data() {
                    let temp = group.temp.clone().unwrap_or_default();
                    group.fail(format!("syncing {}", temp.display()), error);
                }
            }
        }
    }
    drop(open_files);
    Prepared {
        batch,
        groups,
        skipped,
    }
}

/// Stage two: renames the batch's files into place, syncs the directory, updates the index and
/// answers every caller.
fn publish(shared: &Shared, pending: &Pending, prepared: Prepared) {
    let Prepared {
        batch,
        mut groups,
        skipped,
    } = prepared;

    // Rename and sync the directory under the mutation lock, so `remove` and the sweeper never
    // interleave with a replacement and the index always follows the directory.
    let mut written = 0u64;
    {
        let _mutation = lock(&shared.mutation);
        let mut any_renamed = false;
        for group in groups.iter_mut() {
            let (Some(temp), Some(request)) = (group.temp.clone(), batch.get(group.winner)) else {
                continue;
            };
            let target = shared.dir.join(file::file_name(&request.cluster_id));
            match fs::rename(&temp, &target) {
                Ok(()) => {
                    group.temp = None;
                    group.renamed = true;
                    any_renamed = true;
                }
                Err(error) => group.fail(
                    format!("renaming {} to {}", temp.display(), target.display()),
                    error,
                ),
            }
        }
        if any_renamed {
            if let Err(error) = shared.dir_file.sync_all() {
                // The renames happened but may not survive a crash: the callers must not hear Ok.
                // The files stay (the old ones are gone), so the index follows them below.
                let context = format!("syncing directory {}", shared.dir.display());
                for group in groups.iter_mut().filter(|g| g.renamed) {
                    group.outcome = Some((context.clone(), copy_error(&error)));
                }
            }
            let mut index = lock(&shared.index);
            for group in groups.iter().filter(|g| g.renamed) {
                if let Some(request) = batch.get(group.winner) {
                    index.insert(
                        request.cluster_id.clone(),
                        Entry {
                            received_millis: request.received_millis,
                            payload_bytes: request.payload.len() as u64,
                        },
                    );
                }
            }
        }
        let mut pending = lock(pending);
        for group in &groups {
            if let Some(request) = batch.get(group.winner) {
                // A later batch may have claimed the cluster since; its entry stays.
                if pending.get(&request.cluster_id) == Some(&group.received_millis) {
                    pending.remove(&request.cluster_id);
                }
            }
        }
        drop(pending);
        for group in &groups {
            if group.renamed && group.outcome.is_none() {
                written += 1 + group.superseded.len() as u64;
            }
        }
    }
    if written > 0 {
        shared.counters.commits.fetch_add(1, Ordering::Relaxed);
        shared.counters.writes.fetch_add(written, Ordering::Relaxed);
    }

    // Only now, with data and renames durable, answer.
    for group in &groups {
        for &i in std::iter::once(&group.winner).chain(&group.superseded) {
            let result = match &group.outcome {
                None => Ok(true),
                Some((context, error)) => Err(StoreError::Io {
                    context: context.clone(),
                    source: copy_error(error),
                }),
            };
            if let Some(request) = batch.get(i) {
                // The caller may have given up waiting; nothing to do then.
                let _ = request.reply.send(result);
            }
        }
    }
    for i in skipped {
        if let Some(request) = batch.get(i) {
            let _ = request.reply.send(Ok(false));
        }
    }
}

/// Flushes the whole file system holding the directory; false when that failed or is unavailable.
#[cfg(target_os = "linux")]
fn sync_file_system(shared: &Shared) -> bool {
    use std::os::unix::io::AsRawFd;
    // SAFETY: syncfs only reads the descriptor, which `shared.dir_file` keeps open.
    let status = unsafe { libc::syncfs(shared.dir_file.as_raw_fd()) };
    if status != 0 {
        log::warn!(
            "syncfs on {} failed ({}); syncing each file instead",
            shared.dir.display(),
            io::Error::last_os_error()
        );
    }
    status == 0
}

#[cfg(not(target_os = "linux"))]
fn sync_file_system(_shared: &Shared) -> bool {
    false
}
