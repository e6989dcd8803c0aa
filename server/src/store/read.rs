//! Reading one cluster's upload: from the journal segment that holds it until the checkpoint,
//! then from its cluster file, verified on every read.

use std::io;
use std::path::Path;
use std::time::SystemTime;

use super::file::{self, ReadError};
use super::state::{is_live, lock, Location, Shared};
use super::{StoreError, StoredUpload};

impl Shared {
    /// `cluster_id`'s upload if it is live: from its journal record until that is checkpointed,
    /// then from its file, verified; a corrupt file is set aside and reads as absent.
    pub(super) fn get(&self, cluster_id: &str) -> Result<Option<StoredUpload>, StoreError> {
        let Some(entry) = lock(&self.index).get(cluster_id).cloned() else {
            return Ok(None);
        };
        if !is_live(entry.newest_sample_ms, SystemTime::now(), self.ttl) {
            return Ok(None);
        }
        if let Location::Journal { segment, offset } = &entry.location {
            let context = || format!("reading {} at {offset}", segment.path.display());
            return match segment.read_put(cluster_id, *offset, entry.payload_bytes) {
                Ok((header, payload)) if header.cluster_id == cluster_id => {
                    Ok(Some(StoredUpload {
                        cluster_id: header.cluster_id,
                        received: telemeter_common::time::from_unix_millis(header.received_millis),
                        payload,
                    }))
                }
                Ok((header, _)) => Err(StoreError::format(
                    context(),
                    format!("holds cluster {:?}", header.cluster_id),
                )),
                Err(ReadError::Corrupt(reason)) => Err(StoreError::format(context(), reason)),
                Err(ReadError::Io(error)) => Err(StoreError::io(context(), error)),
            };
        }
        let path = self.path_of(cluster_id);
        // The upload, or none; `Err` inside when the file is corrupt (with the reason).
        let read = || match self.read_upload(cluster_id, &path) {
            Ok(upload) => Ok(Ok(Some(upload))),
            // Removed or swept since the index was read.
            Err(ReadError::Io(error)) if error.kind() == io::ErrorKind::NotFound => Ok(Ok(None)),
            Err(ReadError::Io(error)) => {
                Err(StoreError::io(format!("reading {}", path.display()), error))
            }
            Err(ReadError::Corrupt(reason)) => Ok(Err(reason)),
        };
        if let Ok(found) = read()? {
            return Ok(found);
        }
        // Read again under the mutation lock: the committer may have replaced the file in
        // between, and a good new file must not be set aside.
        let _mutation = lock(&self.mutation);
        match read()? {
            Ok(found) => Ok(found),
            Err(reason) => {
                lock(&self.index).remove(cluster_id);
                self.set_aside(&file::file_name(cluster_id), &reason);
                Ok(None)
            }
        }
    }

    /// Reads and verifies `cluster_id`'s file.
    fn read_upload(&self, cluster_id: &str, path: &Path) -> Result<StoredUpload, ReadError> {
        let (header, payload) = file::read(path, true)?;
        if header.cluster_id != cluster_id {
            return Err(ReadError::Corrupt(format!(
                "holds cluster {:?}, whose file has another name",
                header.cluster_id
            )));
        }
        Ok(StoredUpload {
            cluster_id: header.cluster_id,
            received: telemeter_common::time::from_unix_millis(header.received_millis),
            payload: payload.unwrap_or_default(),
        })
    }
}
