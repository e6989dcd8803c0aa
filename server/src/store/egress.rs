//! The journal as the durable egress backlog of `--remote-write-url`.
//!
//! With egress on ([`super::Store::open_shipping`]) every acknowledged upload is already in a
//! journal segment, durably, so the backlog costs no extra write or sync on the upload path: a
//! checkpointed segment is moved to `DIR/egress/` instead of deleted (never replayed into the
//! store again), and the sender reads records in order from a persisted cursor (segment, offset)
//! with a [`BacklogReader`]. Saving the cursor ([`Backlog::save_cursor`], atomically: temp file,
//! sync, rename, directory sync) deletes the segments wholly before it. A crash between shipping
//! and saving the cursor ships those records again: the rule is at least once.
//!
//! Lock order: `egress.moves` is taken alone, or after nothing the journal holds.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};

use super::journal::{self, Next};
use super::state::{lock, Shared};
use super::StoreError;

/// The directory, inside the store's, holding checkpointed segments not yet shipped.
pub(super) const EGRESS_DIR: &str = "egress";
/// The cursor's file inside [`EGRESS_DIR`].
const CURSOR_FILE: &str = "cursor";
/// The first word of the cursor file, naming its format.
const CURSOR_MAGIC: &str = "telemeter-egress-cursor-1";

/// What the store shares with egress when it is on.
pub(super) struct EgressShared {
    /// Segments numbered below this are shipped (or dropped): a checkpoint deletes them rather
    /// than setting them aside. Also held while a segment moves, so a reader finds it.
    pub(super) shipped_below: Mutex<u64>,
    /// The segment appended to last and how much of it is synced, set after each append: read by
    /// egress without the journal's lock, which a commit holds through its `fdatasync`.
    pub(super) tip: Mutex<Option<(u64, u64)>>,
    /// Signalled after each append (capacity 1: one pending wake-up is enough).
    pub(super) appended: Sender<()>,
    appended_rx: Receiver<()>,
}

impl EgressShared {
    pub(super) fn new(shipped_below: u64) -> EgressShared {
        let (appended, appended_rx) = crossbeam_channel::bounded(1);
        EgressShared {
            shipped_below: Mutex::new(shipped_below),
            tip: Mutex::new(None),
            appended,
            appended_rx,
        }
    }
}

/// A place in the journal: a segment's number and a byte offset in it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    /// The segment's number.
    pub segment: u64,
    /// Bytes into it.
    pub offset: u64,
}

/// One record to ship, read from the backlog.
#[derive(Debug)]
pub struct ShipRecord {
    /// Whose upload it is.
    pub cluster_id: String,
    /// When it was received, milliseconds since the Unix epoch.
    pub received_millis: u64,
    /// Validated families, protobuf-delimited (a packed record's decompressed: a record whose
    /// frames do not decompress ends its segment's reading as a failed checksum does), or, when
    /// `packed`, as the record stores them ([`ShipRecord::unpack`] decompresses them).
    pub payload: Vec<u8>,
    /// Whether `payload` is packed: only [`BacklogReader::next_record_packed`] hands one out.
    pub packed: bool,
    /// Where the next record starts.
    pub end: Position,
}

/// The egress side of a store opened with [`super::Store::open_shipping`]. Cheap to clone.
#[derive(Clone)]
pub struct Backlog {
    pub(super) shared: Arc<Shared>,
}

impl std::fmt::Debug for Backlog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backlog")
            .field("dir", &self.shared.dir)
            .finish()
    }
}

impl Backlog {
    fn egress(&self) -> Result<&EgressShared, StoreError> {
        self.shared.egress.as_ref().ok_or(StoreError::Closed)
    }

    /// The saved cursor; the start of the oldest segment kept when none was saved.
    pub fn cursor(&self) -> Result<Position, StoreError> {
        if let Some(position) = load_cursor(&self.shared.dir)? {
            return Ok(position);
        }
        let oldest = segment_numbers(&self.shared.dir)?.first().copied();
        Ok(Position {
            segment: oldest.unwrap_or(0),
            offset: 0,
        })
    }

    /// Deletes the segments wholly before `position` (shipped), then saves `position` as the
    /// cursor (atomically and durably). In that order because a full disk (a receiver down long
    /// enough for the backlog to fill it) refuses the cursor's new file: deleting first frees it,
    /// where saving first kept every shipped segment, and the disk full, for good. Deleting
    /// first is safe: a reader from an older cursor skips a segment that is gone.
    pub fn save_cursor(&self, position: Position) -> Result<(), StoreError> {
        let egress = self.egress()?;
        {
            let mut shipped_below = lock(&egress.shipped_below);
            if position.segment > *shipped_below {
                *shipped_below = position.segment;
                let dir = self.shared.dir.join(EGRESS_DIR);
                for number in segment_numbers(&self.shared.dir)? {
                    if number >= position.segment {
                        break;
                    }
                    let path = dir.join(format!("{}{number}", journal::PREFIX));
                    match fs::remove_file(&path) {
                        Ok(()) => {}
                        // Not checkpointed yet: the checkpoint deletes it, seeing `shipped_below`.
                        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                        Err(error) => log::warn!("removing shipped {}: {error}", path.display()),
                    }
                }
            }
        }
        save_cursor(&self.shared.dir, position)
    }

    /// A reader of the records to ship, from `from`.
    pub fn reader(&self, from: Position) -> BacklogReader {
        BacklogReader {
            backlog: self.clone(),
            at: from,
            open: None,
            record: Vec::new(),
        }
    }

    /// Waits at most `timeout` for an append to the journal.
    pub fn wait_for_append(&self, timeout: Duration) {
        if let Ok(egress) = self.egress() {
            let _ = egress.appended_rx.recv_timeout(timeout);
        }
    }

    /// Ready (for a `select!`) after an append to the journal; never ready without egress.
    pub fn appended(&self) -> Receiver<()> {
        match self.egress() {
            Ok(egress) => egress.appended_rx.clone(),
            Err(_) => crossbeam_channel::never(),
        }
    }

    /// Bytes of journal from `from` to the newest synced record (what is waiting to be shipped,
    /// counting the records that are not shipped and the gaps between commits).
    pub fn bytes_after(&self, from: Position) -> Result<u64, StoreError> {
        let tip = self.tip();
        let mut total = 0u64;
        for number in segment_numbers(&self.shared.dir)? {
            if number < from.segment {
                continue;
            }
            let len = match tip {
                Some((live, len)) if live == number => len,
                _ => self.find(number)?.map_or(0, |(_, len)| len),
            };
            total += if number == from.segment {
                len.saturating_sub(from.offset)
            } else {
                len
            };
        }
        Ok(total)
    }

    /// The segment being appended to and how much of it is synced.
    fn tip(&self) -> Option<(u64, u64)> {
        self.egress().ok().and_then(|egress| *lock(&egress.tip))
    }

    /// Segment `number` opened for reading, with its length; `None` when it is gone.
    fn find(&self, number: u64) -> Result<Option<(File, u64)>, StoreError> {
        let egress = self.egress()?;
        // A checkpoint moves segments with this held: the file is at one of the two paths.
        let _moves = lock(&egress.shipped_below);
        let name = format!("{}{number}", journal::PREFIX);
        for path in [
            self.shared.dir.join(&name),
            self.shared.dir.join(EGRESS_DIR).join(&name),
        ] {
            match File::open(&path) {
                Ok(file) => {
                    let len = file
                        .metadata()
                        .map_err(|e| StoreError::io(format!("reading {}", path.display()), e))?
                        .len();
                    return Ok(Some((file, len)));
                }
                Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                Err(error) => {
                    return Err(StoreError::io(format!("opening {}", path.display()), error))
                }
            }
        }
        Ok(None)
    }
}

/// Reads the records to ship, in journal order.
pub struct BacklogReader {
    backlog: Backlog,
    at: Position,
    /// The segment `at` is in, open.
    open: Option<File>,
    /// The last packed record read, its bytes as journaled (see [`journal::read_at_into`]).
    record: Vec<u8>,
}

impl ShipRecord {
    /// The families of a packed `payload` ([`BacklogReader::next_record_packed`]) decompressed
    /// into `plain` (a buffer used again: emptied first), exactly the length its header says; a
    /// `Format` error if they do not decompress to it (the record's checksum, verified when it was
    /// read, covers every byte of them, so only a bug or a damage that checksum missed does that).
    pub fn unpack(payload: &[u8], plain: &mut Vec<u8>) -> Result<(), StoreError> {
        journal::unpack_verified_into(payload, plain).map_err(|e| StoreError::Format {
            context: "decompressing a journaled upload to ship".to_string(),
            reason: match e {
                super::file::ReadError::Corrupt(reason) => reason,
                super::file::ReadError::Io(error) => error.to_string(),
            },
        })
    }
}

impl BacklogReader {
    /// Where the next record is read from.
    pub fn position(&self) -> Position {
        self.at
    }

    /// The next record to ship, skipping those that are not (serve only, removals); `None` when
    /// every synced record is read.
    pub fn next_record(&mut self) -> Result<Option<ShipRecord>, StoreError> {
        self.next_record_into(&mut Vec::new())
    }

    /// [`BacklogReader::next_record`], a packed record decompressed into `unpacked`, a buffer
    /// used again (its payload then; a plain record's leaves it), instead of a fresh zeroed one
    /// for each upload (see [`telemeter_common::snappy::decode_framed_into`]).
    pub fn next_record_into(
        &mut self,
        unpacked: &mut Vec<u8>,
    ) -> Result<Option<ShipRecord>, StoreError> {
        self.next_with(Some(unpacked), &mut Vec::new())
    }

    /// [`BacklogReader::next_record`], a packed record handed out as stored (`packed`, its
    /// checksum verified) in `buffer`'s allocation, which it then takes (a plain record's leaves
    /// it): whoever converts it decompresses it ([`ShipRecord::unpack`]) just before. Egress's
    /// one reader thread then no longer does the decompression of every upload for all its
    /// shards (its share of egress's CPU fell from 20 % to 5 % in perf; the decompression itself
    /// costs the same on a shard), its queues hold ~8 KB an upload, not ~51 KB, and the families
    /// are read right after they are written.
    pub fn next_record_packed(
        &mut self,
        buffer: &mut Vec<u8>,
    ) -> Result<Option<ShipRecord>, StoreError> {
        self.next_with(None, buffer)
    }

    /// The body of [`BacklogReader::next_record_into`] (with `unpacked`) and
    /// [`BacklogReader::next_record_packed`] (without, a packed record read into `buffer`).
    fn next_with(
        &mut self,
        mut unpacked: Option<&mut Vec<u8>>,
        buffer: &mut Vec<u8>,
    ) -> Result<Option<ShipRecord>, StoreError> {
        // Bounded: each turn reads a record or moves to a later segment.
        loop {
            let tip = self.backlog.tip();
            if self.open.is_none() {
                match self.backlog.find(self.at.segment)? {
                    Some((file, _)) => self.open = Some(file),
                    None => {
                        // Gone (dropped, or never written): the next one kept, if any.
                        let next = segment_numbers(&self.backlog.shared.dir)?
                            .into_iter()
                            .find(|&n| n > self.at.segment);
                        match next {
                            Some(number) => {
                                self.at = Position {
                                    segment: number,
                                    offset: 0,
                                };
                                continue;
                            }
                            None => return Ok(None),
                        }
                    }
                }
            }
            let Some(file) = &self.open else {
                return Ok(None);
            };
            let live = matches!(tip, Some((number, _)) if number == self.at.segment);
            let len = match tip {
                Some((number, len)) if number == self.at.segment => len,
                _ => file
                    .metadata()
                    .map_err(|e| StoreError::io("reading a journal segment's length", e))?
                    .len(),
            };
            let next = match unpacked.as_deref_mut() {
                Some(unpacked) => {
                    journal::read_at_into(file, self.at.offset, len, unpacked, &mut self.record)
                }
                None => journal::read_at_packed(file, self.at.offset, len, buffer),
            }
            .map_err(|e| {
                StoreError::io(format!("reading journal segment {}", self.at.segment), e)
            })?;
            match next {
                Next::Record(record, end) => {
                    self.at.offset = end;
                    if matches!(record.kind, journal::PUT | journal::SHIP) {
                        return Ok(Some(ShipRecord {
                            cluster_id: record.header.cluster_id,
                            received_millis: record.header.received_millis,
                            payload: record.payload,
                            packed: record.packed,
                            end: self.at,
                        }));
                    }
                }
                Next::End if live => return Ok(None),
                Next::Torn(reason) if live => {
                    // The committer wrote past `len` only if that write failed; wait for the next.
                    log::debug!("egress: segment {} {reason}", self.at.segment);
                    return Ok(None);
                }
                end => {
                    if let Next::Torn(reason) = end {
                        log::info!(
                            "egress: the rest of journal segment {} is no whole record ({reason}); skipped",
                            self.at.segment
                        );
                    }
                    // A whole segment: on to the next one, if it exists yet.
                    let next = segment_numbers(&self.backlog.shared.dir)?
                        .into_iter()
                        .find(|&n| n > self.at.segment);
                    match next {
                        Some(number) => {
                            self.open = None;
                            self.at = Position {
                                segment: number,
                                offset: 0,
                            };
                        }
                        None => return Ok(None),
                    }
                }
            }
        }
    }
}

/// The numbers of the segments in the store's directory and in `egress/`, ascending, once each.
pub(super) fn segment_numbers(dir: &Path) -> Result<Vec<u64>, StoreError> {
    let mut numbers = journal::list(dir)
        .map_err(|e| StoreError::io(format!("listing directory {}", dir.display()), e))?;
    let egress = dir.join(EGRESS_DIR);
    match journal::list(&egress) {
        Ok(more) => numbers.extend(more),
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(error) => {
            return Err(StoreError::io(
                format!("listing directory {}", egress.display()),
                error,
            ))
        }
    }
    numbers.sort_unstable();
    numbers.dedup();
    Ok(numbers)
}

fn cursor_path(dir: &Path) -> PathBuf {
    dir.join(EGRESS_DIR).join(CURSOR_FILE)
}

/// The saved cursor, if any. A cursor file that does not parse is logged and ignored (shipping
/// from the oldest segment kept ships more twice, and loses nothing).
pub(super) fn load_cursor(dir: &Path) -> Result<Option<Position>, StoreError> {
    let path = cursor_path(dir);
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(error) if error.kind() == io::ErrorKind::InvalidData => String::new(),
        Err(error) => return Err(StoreError::io(format!("reading {}", path.display()), error)),
    };
    let mut words = text.split_ascii_whitespace();
    let parsed = match (words.next(), words.next(), words.next(), words.next()) {
        (Some(CURSOR_MAGIC), Some(segment), Some(offset), None) => {
            match (segment.parse(), offset.parse()) {
                (Ok(segment), Ok(offset)) => Some(Position { segment, offset }),
                _ => None,
            }
        }
        _ => None,
    };
    if parsed.is_none() {
        log::warn!(
            "{}: not a cursor; shipping from the oldest segment kept",
            path.display()
        );
    }
    Ok(parsed)
}

/// Writes the cursor the durable way: temp file, synced, renamed over, directory synced.
fn save_cursor(dir: &Path, position: Position) -> Result<(), StoreError> {
    let egress = dir.join(EGRESS_DIR);
    let temp = egress.join(".tmp-cursor");
    let target = cursor_path(dir);
    let written = (|| {
        fs::create_dir_all(&egress)?;
        let mut out = File::create(&temp)?;
        writeln!(
            out,
            "{CURSOR_MAGIC} {} {}",
            position.segment, position.offset
        )?;
        out.sync_data()?;
        fs::rename(&temp, &target)?;
        File::open(&egress)?.sync_all()
    })();
    written.map_err(|e| StoreError::io(format!("saving {}", target.display()), e))
}

impl Shared {
    /// Sets a fully replayed or checkpointed segment aside for egress, or deletes it when egress
    /// is off or has shipped past it. Returns whether it is gone from the store's directory.
    pub(super) fn retire_segment(&self, path: &Path, number: u64) -> io::Result<()> {
        let Some(egress) = &self.egress else {
            return fs::remove_file(path);
        };
        let shipped_below = lock(&egress.shipped_below);
        if number < *shipped_below {
            return fs::remove_file(path);
        }
        let dir = self.dir.join(EGRESS_DIR);
        fs::create_dir_all(&dir)?;
        fs::rename(path, dir.join(format!("{}{number}", journal::PREFIX)))?;
        // The new name first, so a crash between the two leaves the segment somewhere.
        File::open(&dir)?.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::super::{checkpoint, Ship, Store, StoreConfig};
    use super::*;
    use std::time::SystemTime;
    use telemeter_common::delimited;
    use telemeter_common::model::{Gauge, Metric, MetricFamily, MetricType};

    fn config(dir: &Path) -> StoreConfig {
        StoreConfig {
            dir: dir.to_path_buf(),
            ttl: Duration::from_secs(3600),
            max_batch: 64,
        }
    }

    /// One gauge sample of `value` at `ts` (ms), as the store holds uploads.
    fn payload(value: f64, ts: i64) -> Vec<u8> {
        delimited::encode(&[MetricFamily {
            name: Some("g".into()),
            help: None,
            r#type: Some(MetricType::Gauge as i32),
            metric: vec![Metric {
                gauge: Some(Gauge { value: Some(value) }),
                timestamp_ms: Some(ts),
                ..Default::default()
            }],
        }])
    }

    fn drain(reader: &mut BacklogReader) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        while let Some(record) = reader.next_record().unwrap() {
            out.push((record.cluster_id, record.payload));
        }
        out
    }

    fn checkpoint_now(store: &Store) {
        let shared = &store.handle.shared;
        let segment = lock(&shared.journal).segment.take();
        if let Some(segment) = segment {
            assert!(checkpoint::checkpoint(shared, &segment, false));
        }
    }

    #[test]
    fn a_packed_record_is_handed_out_packed_in_the_buffer_given_and_unpacks_to_its_families() {
        let dir = testkit::TempDir::new("egress-packed");
        let now = telemeter_common::time::sample_millis(SystemTime::now());
        let (plain, packed) = (payload(1.0, now), payload(2.0, now));
        // Many series, so the frames are far shorter than the families.
        let big = delimited::encode(&testkit::payload::families("p", now));
        let store = Store::open_shipping(config(dir.path())).unwrap();
        store
            .put_unless_older("a", plain.clone(), SystemTime::now())
            .unwrap();
        for families in [&packed, &big] {
            let frames = telemeter_common::snappy::encode_framed(families);
            store
                .put_unless_older_packed("b", families.clone(), frames, SystemTime::now())
                .unwrap();
        }
        let backlog = store.backlog().unwrap();
        let mut reader = backlog.reader(backlog.cursor().unwrap());
        let mut buffer = Vec::with_capacity(1 << 16);
        let given = buffer.as_ptr();
        // A plain record leaves the buffer, and is the families.
        let record = reader.next_record_packed(&mut buffer).unwrap().unwrap();
        assert_eq!((record.packed, &record.payload), (false, &plain));
        assert_eq!((buffer.capacity(), buffer.as_ptr()), (1 << 16, given));
        // A packed one takes it, and holds the frames, not the families.
        let record = reader.next_record_packed(&mut buffer).unwrap().unwrap();
        assert!(record.packed);
        assert_eq!((buffer.capacity(), record.payload.as_ptr()), (0, given));
        let mut families = vec![0xaa; 3];
        ShipRecord::unpack(&record.payload, &mut families).unwrap();
        assert_eq!(families, packed);
        let record = reader.next_record_packed(&mut Vec::new()).unwrap().unwrap();
        assert!(record.packed && record.payload.len() * 3 < big.len());
        ShipRecord::unpack(&record.payload, &mut families).unwrap();
        assert_eq!(families, big);
        assert!(reader.next_record_packed(&mut buffer).unwrap().is_none());
        // What does not decompress to its header's length is an error, never a panic.
        let mut damaged = record.payload.clone();
        let last = damaged.len() - 1;
        damaged.truncate(last);
        assert!(ShipRecord::unpack(&damaged, &mut families).is_err());
        // The same records, decompressed by the reader as before.
        let mut reader = backlog.reader(backlog.cursor().unwrap());
        let want = vec![
            ("a".to_string(), plain),
            ("b".to_string(), packed),
            ("b".to_string(), big),
        ];
        assert_eq!(drain(&mut reader), want);
    }

    #[test]
    fn what_is_acknowledged_is_shipped_in_order_across_checkpoints_and_restarts() {
        let dir = testkit::TempDir::new("egress-order");
        let now = telemeter_common::time::sample_millis(SystemTime::now());
        let (fresh, late, merged, delta, handed) = (
            payload(1.0, now),
            payload(2.0, now - 60_000),
            payload(3.0, now),
            payload(4.0, now),
            payload(5.0, now),
        );
        {
            let store = Store::open_shipping(config(dir.path())).unwrap();
            let backlog = store.backlog().unwrap();
            assert_eq!(backlog.cursor().unwrap(), Position::default());
            store.put("a", fresh.clone(), SystemTime::now()).unwrap();
            // Older than what is served: not served, but shipped.
            assert!(!store
                .put_unless_older("a", late.clone(), SystemTime::now())
                .unwrap());
            assert_eq!(store.get("a").unwrap().unwrap().payload, fresh);
            // Serve one payload, ship another, in one batch.
            assert!(store
                .put_shipping(
                    "b",
                    Some(merged.clone()),
                    Ship::Payload(delta.clone()),
                    SystemTime::now()
                )
                .unwrap());
            // A handoff is served, never shipped again; a ship-only put is not served.
            store.put_if_newer("c", handed, SystemTime::now()).unwrap();
            assert!(!store
                .put_shipping("d", None, Ship::Payload(delta.clone()), SystemTime::now())
                .unwrap());
            assert!(store.get("d").unwrap().is_none());
            assert_eq!(store.get("b").unwrap().unwrap().payload, merged);

            let mut reader = backlog.reader(backlog.cursor().unwrap());
            let want = vec![
                ("a".to_string(), fresh.clone()),
                ("a".to_string(), late.clone()),
                ("b".to_string(), delta.clone()),
                ("d".to_string(), delta.clone()),
            ];
            assert_eq!(drain(&mut reader), want);
            // The segment has zeros written ahead of its records; set aside, it is cut to them.
            let records_end = reader.position().offset;
            let segment_len = |path: PathBuf| fs::metadata(path).unwrap().len();
            let written_ahead = segment_len(dir.path().join(format!("{}0", journal::PREFIX)));
            assert!(written_ahead > records_end + (1 << 20), "{written_ahead}");
            // A checkpoint sets the segment aside, still readable, not served from again.
            checkpoint_now(&store);
            assert!(journal::list(dir.path()).unwrap().is_empty());
            assert_eq!(journal::list(&dir.path().join(EGRESS_DIR)).unwrap(), [0]);
            let set_aside = dir
                .path()
                .join(EGRESS_DIR)
                .join(format!("{}0", journal::PREFIX));
            assert_eq!(segment_len(set_aside), records_end);
            assert_eq!(
                backlog.bytes_after(Position::default()).unwrap(),
                records_end
            );
            assert_eq!(
                drain(&mut backlog.reader(Position::default())),
                want,
                "read again from egress/"
            );
            assert!(backlog.bytes_after(Position::default()).unwrap() > 0);
            // New records go to a new segment, read on from the first.
            store.put("e", fresh.clone(), SystemTime::now()).unwrap();
            assert_eq!(drain(&mut reader), [("e".to_string(), fresh.clone())]);
            assert_eq!(reader.position().segment, 1);
            store.close();
        }
        {
            // Closing checkpointed segment 1 too; nothing was saved, so all is shipped again.
            let store = Store::open_shipping(config(dir.path())).unwrap();
            assert_eq!(store.get("a").unwrap().unwrap().payload, fresh);
            assert!(
                store.get("d").unwrap().is_none(),
                "ship-only is never served"
            );
            let backlog = store.backlog().unwrap();
            let mut reader = backlog.reader(backlog.cursor().unwrap());
            assert_eq!(drain(&mut reader).len(), 5);
            // Saving the cursor deletes what is wholly behind it, and survives a restart.
            let end = reader.position();
            backlog.save_cursor(end).unwrap();
            assert_eq!(journal::list(&dir.path().join(EGRESS_DIR)).unwrap(), [1]);
            assert_eq!(backlog.bytes_after(end).unwrap(), 0);
            store.put("f", late.clone(), SystemTime::now()).unwrap();
            store.close();
        }
        let store = Store::open_shipping(config(dir.path())).unwrap();
        let backlog = store.backlog().unwrap();
        let mut reader = backlog.reader(backlog.cursor().unwrap());
        assert_eq!(drain(&mut reader), [("f".to_string(), late)]);
        // A new segment never takes the number of one set aside.
        store.put("g", fresh, SystemTime::now()).unwrap();
        assert_eq!(reader.next_record().unwrap().unwrap().end.segment, 3);
    }

    #[test]
    fn shipped_segments_are_deleted_even_when_the_cursor_cannot_be_saved() {
        let dir = testkit::TempDir::new("egress-full");
        let now = telemeter_common::time::sample_millis(SystemTime::now());
        let store = Store::open_shipping(config(dir.path())).unwrap();
        let backlog = store.backlog().unwrap();
        store
            .put("a", payload(1.0, now), SystemTime::now())
            .unwrap();
        checkpoint_now(&store);
        store
            .put("b", payload(2.0, now), SystemTime::now())
            .unwrap();
        let mut reader = backlog.reader(backlog.cursor().unwrap());
        assert_eq!(drain(&mut reader).len(), 2);
        assert_eq!(journal::list(&dir.path().join(EGRESS_DIR)).unwrap(), [0]);
        // The cursor's new file cannot be made (as on a full disk; a directory in its way here).
        fs::create_dir_all(dir.path().join(EGRESS_DIR).join(".tmp-cursor")).unwrap();
        assert!(backlog.save_cursor(reader.position()).is_err());
        assert!(
            journal::list(&dir.path().join(EGRESS_DIR))
                .unwrap()
                .is_empty(),
            "a shipped segment kept while the cursor could not be saved"
        );
        // From the cursor saved before (none: the start), the gone segment is skipped.
        let again = drain(&mut backlog.reader(backlog.cursor().unwrap()));
        assert_eq!(again, [("b".to_string(), payload(2.0, now))]);
        store.close();
    }

    #[test]
    fn a_put_superseded_or_kept_out_in_one_batch_is_still_shipped_in_order() {
        use super::super::commit::{self, Mode, Request};
        let dir = testkit::TempDir::new("egress-batch");
        let store = Store::open_shipping(config(dir.path())).unwrap();
        let now = telemeter_common::time::sample_millis(SystemTime::now());
        let (first, second, older) = (
            payload(1.0, now - 1000),
            payload(2.0, now),
            payload(3.0, now - 5000),
        );
        let mut answers = Vec::new();
        let mut batch = Vec::new();
        for (payload, mode) in [
            (first.clone(), Mode::Replace),
            (second.clone(), Mode::Replace),
            (older.clone(), Mode::UnlessOlder),
        ] {
            let (reply, answer) = telemeter_common::sync::oneshot();
            answers.push(answer);
            batch.push(Request {
                cluster_id: "a".to_string(),
                newest_sample_ms: super::super::state::newest_sample_ms(&payload, 0),
                payload,
                packed: None,
                serve: true,
                ship: Ship::Served,
                received_millis: telemeter_common::time::unix_millis(SystemTime::now()),
                newest_received_ms: i64::MIN,
                patch: None,
                mode,
                condition: commit::Condition::Always,
                reply: commit::Answer::Wait(reply),
            });
        }
        commit::commit(&store.handle.shared, batch);
        let results: Vec<bool> = answers
            .into_iter()
            .map(|a| a.recv().unwrap().unwrap().written())
            .collect();
        // The second replaces the first in the same batch; the older one is kept out.
        assert_eq!(results, [true, true, false]);
        assert_eq!(store.get("a").unwrap().unwrap().payload, second);
        let backlog = store.backlog().unwrap();
        let shipped: Vec<Vec<u8>> = drain(&mut backlog.reader(Position::default()))
            .into_iter()
            .map(|(_, payload)| payload)
            .collect();
        assert_eq!(
            shipped,
            [first, second, older],
            "all three, in the order asked"
        );
    }

    #[test]
    fn without_egress_nothing_is_kept_or_journaled_to_ship() {
        let dir = testkit::TempDir::new("egress-off");
        let store = Store::open(config(dir.path())).unwrap();
        assert!(store.backlog().is_none());
        let now = telemeter_common::time::sample_millis(SystemTime::now());
        assert!(!store
            .put_shipping(
                "a",
                None,
                Ship::Payload(payload(1.0, now)),
                SystemTime::now()
            )
            .unwrap());
        store
            .put("b", payload(1.0, now), SystemTime::now())
            .unwrap();
        assert!(!store
            .put_unless_older("b", payload(1.0, now - 1000), SystemTime::now())
            .unwrap());
        let segment = lock(&store.handle.shared.journal).segment.clone().unwrap();
        let mut kinds = Vec::new();
        journal::replay(&segment.path, |r| {
            kinds.push(r.kind);
            Ok(())
        })
        .unwrap();
        assert_eq!(kinds, [journal::PUT], "only the served put");
        checkpoint_now(&store);
        assert!(!dir.path().join(EGRESS_DIR).exists());
        assert!(journal::list(dir.path()).unwrap().is_empty());
    }
}
