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

use crate::receive::merge::{uses_remote_write, Merger};
use crate::store::{Ship, Store, StoreError};

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
        }
    }
}

impl std::error::Error for PlacementError {}

impl From<StoreError> for PlacementError {
    fn from(e: StoreError) -> Self {
        PlacementError::Store(e)
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
        store.put_unchanged_then(
            cluster_id,
            payload,
            frames,
            newest_sample_ms,
            received,
            move |stored: Result<bool, StoreError>| {
                then(stored.map(|_| ()).map_err(PlacementError::from))
            },
        );
    }
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
/// store's own: the merger is only used for a cluster that did.
pub fn store_push(
    merger: &Merger,
    cluster_id: &str,
    payload: Vec<u8>,
    received: SystemTime,
) -> Result<(), StoreError> {
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
) -> Result<(), StoreError> {
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
) -> Result<(), StoreError> {
    let store = merger.store();
    // A cluster that also pushes by remote write: merged, so neither path erases the other's
    // series (README, "Remote write and uploads together"); the merged view is not what arrived.
    if uses_remote_write(store, cluster_id, received) {
        return merger.store_accepted(cluster_id, std::mem::take(payload), received);
    }
    // Replaced without the merge: the store gives it a new version, so whatever the merger
    // cached of the cluster is not used again.
    match newest_sample_ms {
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
    }
    .map(|_| ())
}

/// Stores `merged` (a cluster's series after a remote-write request was merged into them) durably
/// as `cluster_id`'s payload, and has egress ship only `delta` (the request's own samples): the
/// merged payload holds samples shipped before, which a receiver would refuse as out of order.
/// The one place a received remote-write request is stored. `newest_received_ms` is `merged`'s
/// newest remote-write sample, kept by the store beside it ([`Store::newest_received`]). Returns
/// the store's version of the put ([`Store::put_merged`]).
pub fn store_merged(
    store: &Store,
    cluster_id: &str,
    merged: Vec<u8>,
    delta: Vec<u8>,
    received: SystemTime,
    newest_received_ms: i64,
) -> Result<Option<u64>, StoreError> {
    // One journal batch: the merged view served, the delta shipped (ignored without egress).
    store.put_merged(
        cluster_id,
        merged,
        Ship::Payload(delta),
        received,
        newest_received_ms,
    )
}
