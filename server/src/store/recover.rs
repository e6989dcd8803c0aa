//! Opening a storage directory: temp files removed, every cluster file verified (the bad ones set
//! aside in `corrupt/`) and indexed, then the journal replayed over them and removed (or, with
//! egress on, moved to `egress/` until shipped).

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use super::file::{self, ReadError};
use super::journal;
use super::state::{lock, newest_sample_ms, sync_file_system, Entry, Location, Shared};
use super::{StoreError, CORRUPT_DIR, LOCK_FILE, TEMP_PREFIX};

impl Shared {
    /// Removes temp files, verifies every cluster file, sets aside the bad ones and indexes the rest.
    pub(super) fn recover(&self) -> Result<(), StoreError> {
        let context = || format!("listing directory {}", self.dir.display());
        let entries = fs::read_dir(&self.dir).map_err(|e| StoreError::io(context(), e))?;
        let mut index = BTreeMap::new();
        for entry in entries {
            let entry = entry.map_err(|e| StoreError::io(context(), e))?;
            let path = entry.path();
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                log::warn!("{}: unexpected file in the store, ignored", path.display());
                continue;
            };
            if name.starts_with(TEMP_PREFIX) {
                // A write that never completed, and so was never answered Ok.
                fs::remove_file(&path)
                    .map_err(|e| StoreError::io(format!("removing {}", path.display()), e))?;
                continue;
            }
            if name == LOCK_FILE
                || name == CORRUPT_DIR
                || name == super::egress::EGRESS_DIR
                || journal::is_segment_name(&name)
            {
                continue;
            }
            if !file::is_cluster_file_name(&name) {
                log::warn!("{}: unexpected file in the store, ignored", path.display());
                continue;
            }
            match file::read(&path, false) {
                Ok((header, payload)) if file::file_name(&header.cluster_id) == name => {
                    // Version 1 files do not record it: they hand their payload out instead.
                    let newest_sample_ms = header.newest_sample_ms.unwrap_or_else(|| {
                        newest_sample_ms(
                            payload.as_deref().unwrap_or_default(),
                            header.received_millis,
                        )
                    });
                    index.insert(
                        header.cluster_id,
                        Entry {
                            received_millis: header.received_millis,
                            newest_sample_ms,
                            payload_bytes: header.payload_len,
                            location: Location::File,
                        },
                    );
                }
                Ok((header, _)) => self.set_aside(
                    &name,
                    &format!(
                        "holds cluster {:?}, whose file has another name",
                        header.cluster_id
                    ),
                ),
                Err(ReadError::Corrupt(reason)) => self.set_aside(&name, &reason),
                Err(ReadError::Io(error)) => {
                    return Err(StoreError::io(format!("reading {}", path.display()), error))
                }
            }
        }
        *lock(&self.index) = index;
        self.replay_journal()
    }

    /// Applies the journal's segments, in order, to the cluster files, syncs them and deletes the
    /// segments. Every acknowledged upload not yet checkpointed is in a segment.
    fn replay_journal(&self) -> Result<(), StoreError> {
        let numbers = journal::list(&self.dir)
            .map_err(|e| StoreError::io(format!("listing directory {}", self.dir.display()), e))?;
        // Segments set aside for egress count too: a new one must never take their numbers.
        if let Some(&newest) = super::egress::segment_numbers(&self.dir)?.last() {
            lock(&self.journal).next_number = newest + 1;
        }
        if numbers.is_empty() {
            return Ok(());
        }
        let mut applied = 0u64;
        for &number in &numbers {
            let path = self.dir.join(format!("{}{number}", journal::PREFIX));
            let torn = journal::replay(&path, |record| {
                applied += 1;
                self.apply(record)
            })
            .map_err(|e| StoreError::io(format!("replaying {}", path.display()), e))?;
            if let Some((bytes, reason)) = torn {
                // An append a crash cut off; it was never answered Ok.
                log::info!(
                    "{}: the last {bytes} bytes are no whole record ({reason}); ignored",
                    path.display()
                );
            }
        }
        // Durable before the segments go: a crash now replays them again, which is harmless.
        if !sync_file_system(self) {
            for entry in lock(&self.index).keys() {
                let path = self.path_of(entry);
                if let Ok(file) = File::open(&path) {
                    file.sync_data()
                        .map_err(|e| StoreError::io(format!("syncing {}", path.display()), e))?;
                }
            }
        }
        let sync_dir = |what: &str| {
            self.dir_file.sync_all().map_err(|e| {
                StoreError::io(
                    format!("syncing directory {} ({what})", self.dir.display()),
                    e,
                )
            })
        };
        sync_dir("after replaying the journal")?;
        for &number in &numbers {
            let path = self.dir.join(format!("{}{number}", journal::PREFIX));
            self.retire_segment(&path, number)
                .map_err(|e| StoreError::io(format!("removing {}", path.display()), e))?;
        }
        sync_dir("after removing the journal")?;
        log::info!(
            "replayed {applied} journal records from {} segment(s)",
            numbers.len()
        );
        Ok(())
    }

    /// Applies one replayed journal record to the directory and the index.
    fn apply(&self, record: journal::Record) -> io::Result<()> {
        let cluster_id = record.header.cluster_id;
        let target = self.path_of(&cluster_id);
        if record.kind == journal::SHIP {
            // Shipped by egress from the segment; never served.
            return Ok(());
        }
        if record.kind == journal::REMOVE {
            match fs::remove_file(&target) {
                Ok(()) => {}
                Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                Err(error) => return Err(error),
            }
            lock(&self.index).remove(&cluster_id);
            return Ok(());
        }
        let temp = self.dir.join(format!(
            "{TEMP_PREFIX}{}",
            self.next_temp.fetch_add(1, Ordering::Relaxed)
        ));
        let newest_sample_ms = newest_sample_ms(&record.payload, record.header.received_millis);
        let header = file::encode_header(
            &cluster_id,
            record.header.received_millis,
            newest_sample_ms,
            &record.payload,
        )
        .map_err(|reason| io::Error::new(io::ErrorKind::InvalidData, reason))?;
        let mut out = File::options().write(true).create_new(true).open(&temp)?;
        out.write_all(&header)?;
        out.write_all(&record.payload)?;
        drop(out);
        fs::rename(&temp, &target)?;
        lock(&self.index).insert(
            cluster_id,
            Entry {
                received_millis: record.header.received_millis,
                newest_sample_ms,
                payload_bytes: record.payload.len() as u64,
                location: Location::File,
            },
        );
        Ok(())
    }

    /// Moves a damaged file to `corrupt/` so it is never served again, but kept for inspection.
    pub(super) fn set_aside(&self, name: &str, reason: &str) {
        let path = self.dir.join(name);
        let corrupt = self.dir.join(CORRUPT_DIR);
        let seconds = telemeter_common::time::unix_millis(SystemTime::now()) / 1000;
        let mut target = corrupt.join(format!("{name}.{seconds}"));
        let mut n = 1;
        while target.exists() {
            target = corrupt.join(format!("{name}.{seconds}.{n}"));
            n += 1;
        }
        let moved = fs::create_dir_all(&corrupt).and_then(|()| fs::rename(&path, &target));
        self.counters.corrupt_files.fetch_add(1, Ordering::Relaxed);
        match moved {
            Ok(()) => log::warn!(
                "{} {reason}; moved to {} and no longer served",
                path.display(),
                target.display()
            ),
            Err(error) => log::warn!(
                "{} {reason}; not served, and could not be moved to {}: {error}",
                path.display(),
                target.display()
            ),
        }
    }
}
