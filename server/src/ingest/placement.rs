//! Where an accepted upload is stored.
//!
//! A single server stores every upload itself ([`LocalPlacement`]); in a cluster,
//! [`crate::cluster::placement`] looks up the cluster's owner on the hash ring and forwards to it.
//! The upload pipeline only sees [`Placement`]. Whoever stores an upload locally does it through
//! [`store_push`] (or, for a remote-write request, [`store_merged`]): with `--remote-write-url` the
//! store's journal is the egress backlog, so what these store is what gets shipped. Both work on
//! the store through the server's [`Merger`], which merges the uploads of a cluster that uses
//! remote write.

use std::fmt;
use std::time::SystemTime;

use crate::receive::merge::{uses_remote_write, MergeError, Merger};
use crate::store::{Committed, Returned, Ship, Store, StoreError};

/// Why an upload could not be stored anywhere.
#[derive(Debug)]
pub enum PlacementError {
    /// The local store failed.
    Store(StoreError),
    /// Neither this server nor any live peer could store it (cluster degraded). Each failure is
    /// logged where it happens; the client only learns that it should retry, not the peers'
    /// internal addresses.
    Unavailable,
    /// The owner refused it for its content (413: a forwarded remote-write request that would
    /// take the cluster's merged series past `--max-series`); no other member is tried.
    Refused {
        /// The owner's status, passed on to the client.
        status: u16,
        /// The owner's reason (about the client's data, nothing of the peer's).
        reason: String,
    },
    /// The owner's merge into the cluster's series was overtaken by other writes of the cluster
    /// each time it was made ([`StoreError::Contended`]): nothing stored, the client retries.
    /// No other member is tried, and the owner is well.
    Contended,
}

impl PlacementError {
    /// The HTTP status for the client: the owner's refusal as it answered it, else 503 (retry
    /// later): the data was not stored, and not for the client's fault.
    pub fn status(&self) -> u16 {
        match self {
            PlacementError::Refused { status, .. } => *status,
            _ => 503,
        }
    }
}

impl fmt::Display for PlacementError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PlacementError::Store(e) => write!(f, "storing the upload failed: {e}"),
            PlacementError::Unavailable => f.write_str("no server could store the upload; retry"),
            PlacementError::Refused { reason, .. } => f.write_str(reason),
            PlacementError::Contended => {
                f.write_str("the cluster's series changed while they were merged into; retry")
            }
        }
    }
}

impl std::error::Error for PlacementError {}

impl From<StoreError> for PlacementError {
    fn from(e: StoreError) -> Self {
        PlacementError::Store(e)
    }
}

impl From<MergeError> for PlacementError {
    /// A store failure, the merge overtaken ([`PlacementError::Contended`]), or the content
    /// refused: an upload that would take its cluster's merged series past `--max-series` (413,
    /// as remote write answers it).
    fn from(e: MergeError) -> Self {
        match e {
            MergeError::Store(StoreError::Contended { .. }) => PlacementError::Contended,
            MergeError::Store(e) => PlacementError::Store(e),
            refused @ MergeError::TooManySeries { .. } => PlacementError::Refused {
                status: 413,
                reason: refused.to_string(),
            },
        }
    }
}

/// Decides where an accepted upload is stored, and stores it durably before returning.
pub trait Placement: Send + Sync + 'static {
    /// Stores `payload` (validated families, protobuf-delimited) as `cluster_id`'s latest upload.
    fn place(
        &self,
        cluster_id: &str,
        payload: Vec<u8>,
        received: SystemTime,
    ) -> Result<(), PlacementError>;

    /// Stores a `payload` that passed validation unchanged (the wire fast path), with the
    /// `frames` it arrived as when it was snappy framed, and `newest_sample_ms`, its newest
    /// sample as the check read it: a placement that stores it locally hands both to the store
    /// (the journal keeps the frames, ~8 KB instead of ~51 KB, and the store does not walk the
    /// payload again for its TTL). By default both are dropped and the payload goes to
    /// [`Placement::place`].
    fn place_unchanged(
        &self,
        cluster_id: &str,
        payload: Vec<u8>,
        frames: Option<Vec<u8>>,
        newest_sample_ms: i64,
        received: SystemTime,
    ) -> Result<(), PlacementError> {
        let _ = (frames, newest_sample_ms);
        self.place(cluster_id, payload, received)
    }

    /// [`Placement::place_unchanged`] with `payload` lent: a placement that stores the upload
    /// locally and packed hands the buffer back (see [`Store::put_unchanged_lent`]), so the
    /// caller can decompress its next upload into it; otherwise `payload` is taken (left
    /// empty). By default it is always taken.
    fn place_unchanged_lent(
        &self,
        cluster_id: &str,
        payload: &mut Vec<u8>,
        frames: Option<Vec<u8>>,
        newest_sample_ms: i64,
        received: SystemTime,
    ) -> Result<(), PlacementError> {
        let payload = std::mem::take(payload);
        self.place_unchanged(cluster_id, payload, frames, newest_sample_ms, received)
    }

    /// [`Placement::place_unchanged_lent`] without waiting where the placement can: `then` is
    /// run once with the result, when the upload is durable (or failed), possibly on another
    /// thread (the store's committer) and possibly before this returns. By default the upload is
    /// placed on this thread and `then` run before this returns.
    fn place_unchanged_then(
        &self,
        cluster_id: &str,
        payload: &mut Vec<u8>,
        frames: Option<Vec<u8>>,
        newest_sample_ms: i64,
        received: SystemTime,
        then: Placed,
    ) {
        then(self.place_unchanged_lent(cluster_id, payload, frames, newest_sample_ms, received));
    }
}

/// What [`Placement::place_unchanged_then`] runs with the result of a placement.
pub type Placed = Box<dyn FnOnce(Result<(), PlacementError>) + Send>;

/// Stores everything in the local store; with remote write on, the store's journal is the egress
/// backlog, so what it stores is shipped.
#[derive(Clone)]
pub struct LocalPlacement {
    merger: Merger,
}

impl LocalPlacement {
    /// A placement writing to `merger`'s store.
    pub fn new(merger: Merger) -> LocalPlacement {
        LocalPlacement { merger }
    }
}

impl Placement for LocalPlacement {
    fn place(
        &self,
        cluster_id: &str,
        payload: Vec<u8>,
        received: SystemTime,
    ) -> Result<(), PlacementError> {
        Ok(store_push(&self.merger, cluster_id, payload, received)?)
    }

    fn place_unchanged(
        &self,
        cluster_id: &str,
        payload: Vec<u8>,
        frames: Option<Vec<u8>>,
        newest_sample_ms: i64,
        received: SystemTime,
    ) -> Result<(), PlacementError> {
        Ok(store_upload(
            &self.merger,
            cluster_id,
            payload,
            frames,
            Some(newest_sample_ms),
            received,
        )?)
    }

    fn place_unchanged_lent(
        &self,
        cluster_id: &str,
        payload: &mut Vec<u8>,
        frames: Option<Vec<u8>>,
        newest_sample_ms: i64,
        received: SystemTime,
    ) -> Result<(), PlacementError> {
        Ok(store_upload_lent(
            &self.merger,
            cluster_id,
            payload,
            frames,
            Some(newest_sample_ms),
            received,
        )?)
    }

    fn place_unchanged_then(
        &self,
        cluster_id: &str,
        payload: &mut Vec<u8>,
        frames: Option<Vec<u8>>,
        newest_sample_ms: i64,
        received: SystemTime,
        then: Placed,
    ) {
        let store = self.merger.store();
        // A cluster that also pushes by remote write is merged, as `store_upload_lent` does, on
        // this thread; every other upload is put as it is, answered where its commit ends.
        if uses_remote_write(store, cluster_id, received) {
            then(self.place_unchanged_lent(
                cluster_id,
                payload,
                frames,
                newest_sample_ms,
                received,
            ));
            return;
        }
        let merger = self.merger.clone();
        store.put_unchanged_then(
            cluster_id,
            payload,
            frames,
            newest_sample_ms,
            received,
            move |stored: Result<bool, StoreError>| match stored {
                // Its cluster began to push by remote write since it was asked: merged instead,
                // on a thread of its own (this may be the committer's, which a merge waits for).
                Err(StoreError::UsesRemoteWrite(returned)) => {
                    merge_elsewhere(merger, returned, received, then)
                }
                stored => then(stored.map(|_| ()).map_err(PlacementError::from)),
            },
        );
    }
}

/// Merges an upload the store handed back ([`StoreError::UsesRemoteWrite`]) on a new thread,
/// then runs `then`. Rare (an upload in flight in the moment its cluster's first remote-write
/// request is stored, which then holds for `--ttl`), and bounded by the uploads in flight.
fn merge_elsewhere(merger: Merger, returned: Returned, received: SystemTime, then: Placed) {
    let slot = std::sync::Arc::new(std::sync::Mutex::new(Some((returned, then))));
    let mine = std::sync::Arc::clone(&slot);
    let spawned = std::thread::Builder::new()
        .name("upload-merge".to_string())
        .spawn(move || {
            if let Some((returned, then)) = telemeter_common::sync::lock(&mine).take() {
                then(merge_returned(&merger, returned, received).map_err(PlacementError::from));
            }
        });
    if let Err(e) = spawned {
        // Not stored: the client hears 503 and sends it again.
        if let Some((returned, then)) = telemeter_common::sync::lock(&slot).take() {
            log::warn!(
                "cluster {:?}: no thread to merge an upload into its remote-write series: {e}",
                returned.cluster_id
            );
            then(Err(PlacementError::Unavailable));
        }
    }
}

/// Merges an upload the store handed back into its cluster's series.
fn merge_returned(
    merger: &Merger,
    returned: Returned,
    received: SystemTime,
) -> Result<(), MergeError> {
    let cluster_id = returned.cluster_id.clone();
    merger.store_accepted(&cluster_id, returned.into_families()?, received)
}

/// Stores `payload` durably as `cluster_id`'s latest upload unless the stored one has newer
/// samples (a late upload never replaces fresher values on `/federate`). With egress on,
/// the store journals it to be shipped either way (the receiver keeps history, so a late upload
/// gives it the samples an outage would have lost, with their original timestamps): the journal
/// is the egress backlog, so nothing is shipped that was not stored, and nothing stored is lost
/// by a crash before it is shipped. Every path that stores a push it owns (an upload stored here,
/// a push forwarded to this node) goes through here.
///
/// A cluster that never used remote write (the store's index says so) takes no lock but the
/// store's own: the merger is only used for a cluster that did, and refuses an upload that would
/// take the cluster's merged series past its cap ([`MergeError::TooManySeries`]).
pub fn store_push(
    merger: &Merger,
    cluster_id: &str,
    payload: Vec<u8>,
    received: SystemTime,
) -> Result<(), MergeError> {
    store_upload(merger, cluster_id, payload, None, None, received)
}

/// [`store_push`], with the `frames` the payload arrived as when it is stored unchanged, and
/// its newest sample when the caller knows it (`None`: the store reads it from the payload). A
/// cluster that also pushes by remote write is merged as by [`store_push`] (the merged view is
/// not what arrived), and its frames dropped.
pub fn store_upload(
    merger: &Merger,
    cluster_id: &str,
    payload: Vec<u8>,
    frames: Option<Vec<u8>>,
    newest_sample_ms: Option<i64>,
    received: SystemTime,
) -> Result<(), MergeError> {
    let mut payload = payload;
    store_upload_lent(
        merger,
        cluster_id,
        &mut payload,
        frames,
        newest_sample_ms,
        received,
    )
}

/// [`store_upload`] with `payload` lent: when the store journals it packed it is handed back
/// (see [`Store::put_unchanged_lent`]), so the caller can decompress its next upload into it;
/// otherwise it is taken (left empty).
fn store_upload_lent(
    merger: &Merger,
    cluster_id: &str,
    payload: &mut Vec<u8>,
    frames: Option<Vec<u8>>,
    newest_sample_ms: Option<i64>,
    received: SystemTime,
) -> Result<(), MergeError> {
    let store = merger.store();
    // A cluster that also pushes by remote write: merged, so neither path erases the other's
    // series (README, "Remote write and uploads together"); the merged view is not what arrived.
    if uses_remote_write(store, cluster_id, received) {
        return merger.store_accepted(cluster_id, std::mem::take(payload), received);
    }
    // Replaced without the merge: the store gives it a new version, so whatever the merger
    // cached of the cluster is not used again. Unless the cluster began to push by remote write
    // meanwhile (the store checks where it commits): then merged after all.
    let stored = match newest_sample_ms {
        Some(newest_sample_ms) => {
            store.put_unchanged_lent(cluster_id, payload, frames, newest_sample_ms, received)
        }
        None => {
            let payload = std::mem::take(payload);
            match frames {
                Some(frames) => {
                    store.put_unless_older_packed(cluster_id, payload, frames, received)
                }
                None => store.put_unless_older(cluster_id, payload, received),
            }
        }
    };
    match stored {
        // Handed back packed: the families are in `payload` already when they were lent back
        // before the commit (`put_unchanged_lent`), not to be decompressed again.
        Err(StoreError::UsesRemoteWrite(returned))
            if returned.is_packed() && !payload.is_empty() =>
        {
            merger.store_accepted(cluster_id, std::mem::take(payload), received)
        }
        Err(StoreError::UsesRemoteWrite(returned)) => merge_returned(merger, returned, received),
        stored => stored.map(|_| ()).map_err(MergeError::Store),
    }
}

/// Stores `merged` (a cluster's series after a remote-write request was merged into them) durably
/// as `cluster_id`'s payload, and has egress ship only `ship` (the request's own samples, or
/// nothing for a handoff): the merged payload holds samples shipped before, which a receiver
/// would refuse as out of order.
/// The one place a received remote-write request is stored. `newest_received_ms` is `merged`'s
/// newest remote-write sample, kept by the store beside it ([`Store::newest_received`]). Stored
/// only over the stored payload of version `base`, the one it was merged into; what became of
/// it as [`Store::put_merged`] says.
pub fn store_merged(
    store: &Store,
    cluster_id: &str,
    merged: Vec<u8>,
    ship: Ship,
    received: SystemTime,
    newest_received_ms: i64,
    base: Option<u64>,
) -> Result<Committed, StoreError> {
    // One journal batch: the merged view served, the delta shipped (ignored without egress).
    store.put_merged(cluster_id, merged, ship, received, newest_received_ms, base)
}
