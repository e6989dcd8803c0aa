//! The store's tests: puts, reads, recovery, replay, the sweeper and the group commit.

use super::*;
use std::path::PathBuf;
use std::sync::atomic::AtomicUsize;

/// A fresh directory under the system temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("telemeter-store-{}-{name}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn config(dir: &TempDir) -> StoreConfig {
    StoreConfig {
        dir: dir.0.clone(),
        ttl: Duration::from_secs(3600),
        max_batch: 64,
    }
}

fn open(dir: &TempDir) -> Store {
    Store::open(config(dir)).unwrap()
}

/// A receive time the file format keeps exactly (whole milliseconds), near now.
fn at(offset_ms: i64) -> SystemTime {
    let now = telemeter_common::time::unix_millis(SystemTime::now()) as i64;
    telemeter_common::time::from_unix_millis((now + offset_ms) as u64)
}

fn file_of(store: &Store, cluster_id: &str) -> PathBuf {
    store.dir().join(file::file_name(cluster_id))
}

/// Checkpoints the current journal segment now, as a full one would be.
fn checkpoint_now(store: &Store) {
    let shared = &store.handle.shared;
    let segment = lock(&shared.journal).segment.take();
    if let Some(segment) = segment {
        assert!(checkpoint::checkpoint(shared, &segment, false));
    }
}

/// Waits (at most 10 s) until the checkpointer has written the segments open replayed, as it
/// does in the background, and removed them.
fn wait_for_checkpoints(store: &Store) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !journal::list(store.dir()).unwrap().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "replayed segments still not checkpointed after 10 s"
        );
        thread::sleep(Duration::from_millis(5));
    }
}

/// Every record in the journal's segments, read straight from disk: (kind, cluster, payload).
fn journal_records(dir: &Path) -> Vec<(u8, String, Vec<u8>)> {
    let mut records = Vec::new();
    for number in journal::list(dir).unwrap() {
        let torn = journal::replay(&dir.join(format!("{}{number}", journal::PREFIX)), |r| {
            records.push((r.kind, r.header.cluster_id, r.payload));
            Ok(())
        })
        .unwrap();
        assert!(torn.is_none());
    }
    records
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn put_then_get_round_trips() {
    let dir = TempDir::new("roundtrip");
    let store = open(&dir);
    let received = at(0);
    store
        .put("cluster-a", b"payload-a".to_vec(), received)
        .unwrap();

    let upload = store.get("cluster-a").unwrap().unwrap();
    assert_eq!(
        upload,
        StoredUpload {
            cluster_id: "cluster-a".to_string(),
            received,
            payload: b"payload-a".to_vec(),
        }
    );
    assert_eq!(store.get("cluster-b").unwrap(), None);
    assert_eq!(
        store.clusters(),
        vec![ClusterEntry {
            cluster_id: "cluster-a".to_string(),
            received,
            payload_bytes: 9,
        }]
    );
    let stats = store.stats();
    assert_eq!(
        (stats.clusters, stats.bytes, stats.writes, stats.commits),
        (1, 9, 1, 1)
    );
}

#[test]
fn put_replaces_the_previous_upload() {
    let dir = TempDir::new("replace");
    let store = open(&dir);
    store.put("c", b"first".to_vec(), at(-10)).unwrap();
    store.put("c", b"second, longer".to_vec(), at(0)).unwrap();
    let upload = store.get("c").unwrap().unwrap();
    assert_eq!(upload.payload, b"second, longer");
    assert_eq!(store.stats().bytes, 14);
    assert_eq!(store.clusters().len(), 1);
    checkpoint_now(&store);
    assert_eq!(store.get("c").unwrap().unwrap().payload, b"second, longer");
    // One cluster file and the lock: the old file was replaced, no temp file or segment left.
    assert_eq!(
        names_in(store.dir()),
        vec![".lock".to_string(), file::file_name("c")]
    );
}

#[test]
fn put_returns_only_after_the_file_holds_the_new_content() {
    let dir = TempDir::new("durable");
    let store = open(&dir);
    for round in 0..5u8 {
        let payload = vec![round; 1000 + usize::from(round)];
        store.put("c", payload.clone(), at(0)).unwrap();
        // Read straight from disk, bypassing the store: the journal holds it...
        let records = journal_records(store.dir());
        assert_eq!(
            records.last().unwrap(),
            &(journal::PUT, "c".to_string(), payload.clone())
        );
        // ...and after a checkpoint, the cluster file.
        if round % 2 == 1 {
            checkpoint_now(&store);
            let (header, on_disk) = file::read(&file_of(&store, "c"), true).unwrap();
            assert_eq!(header.cluster_id, "c");
            assert_eq!(on_disk.unwrap(), payload);
        }
    }
}

#[test]
fn acknowledged_uploads_in_the_journal_are_replayed_on_open() {
    let dir = TempDir::new("replay");
    let d_received = at(0);
    {
        let store = open(&dir);
        store.put("a", b"a-first".to_vec(), at(-30)).unwrap();
        store.put("b", b"b-only".to_vec(), at(-20)).unwrap();
        checkpoint_now(&store);
        store.put("a", b"a-second".to_vec(), at(-10)).unwrap();
        store.put("c", b"c-gone".to_vec(), at(-10)).unwrap();
        store.remove("c").unwrap();
        store
            .put("d", b"d-journal-only".to_vec(), d_received)
            .unwrap();
        // A crash: nothing checkpoints the segment (taken away from the closing store), which
        // ends in a record cut short.
        let shared = &store.handle.shared;
        let segment = lock(&shared.journal).segment.take().unwrap();
        let len = segment.file.metadata().unwrap().len();
        std::os::unix::fs::FileExt::write_all_at(
            &segment.file,
            &[journal::PUT, b'T', b'L', b'M'],
            len,
        )
        .unwrap();
        drop(store);
        assert!(dir
            .0
            .join(format!("{}{}", journal::PREFIX, segment.number))
            .exists());
    }
    let store = open(&dir);
    assert_eq!(store.get("a").unwrap().unwrap().payload, b"a-second");
    assert_eq!(store.get("b").unwrap().unwrap().payload, b"b-only");
    assert_eq!(store.get("c").unwrap(), None);
    let d = store.get("d").unwrap().unwrap();
    assert_eq!(
        (d.payload, d.received),
        (b"d-journal-only".to_vec(), d_received)
    );
    // Replayed into cluster files in the background, and the segments are gone.
    wait_for_checkpoints(&store);
    let mut expected = vec![".lock".to_string()];
    expected.extend(["a", "b", "d"].map(file::file_name));
    expected.sort();
    assert_eq!(names_in(store.dir()), expected);
    let (_, on_disk) = file::read(&file_of(&store, "a"), true).unwrap();
    assert_eq!(on_disk.unwrap(), b"a-second");
}

#[test]
fn full_segments_are_checkpointed_and_reads_follow() {
    let dir = TempDir::new("segments");
    let store = open(&dir);
    // Every commit starts a new segment and retires the previous one.
    store
        .handle
        .shared
        .segment_bytes
        .store(1, Ordering::Relaxed);
    for round in 0..20u8 {
        for id in ["x", "y"] {
            store.put(id, vec![round; 100], at(0)).unwrap();
            assert_eq!(store.get(id).unwrap().unwrap().payload, vec![round; 100]);
        }
    }
    drop(store);
    // A clean close checkpoints everything: only cluster files remain.
    let mut expected = vec![".lock".to_string()];
    expected.extend(["x", "y"].map(file::file_name));
    expected.sort();
    assert_eq!(names_in(&dir.0), expected);
    let store = open(&dir);
    assert_eq!(store.get("y").unwrap().unwrap().payload, vec![19u8; 100]);
}

#[test]
fn concurrent_puts_are_all_stored_and_share_commits() {
    let dir = TempDir::new("concurrent");
    let store = open(&dir);
    const THREADS: usize = 64;
    const ROUNDS: usize = 10;
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let store = store.clone();
            thread::spawn(move || {
                for round in 0..ROUNDS {
                    let own = format!("own-{t}");
                    store
                        .put(&own, format!("{t}/{round}").into_bytes(), at(0))
                        .unwrap();
                    // Shared ids: several threads replace the same cluster.
                    let shared = format!("shared-{}", t % 4);
                    let received = at(round as i64);
                    store
                        .put(&shared, format!("{t}/{round}").into_bytes(), received)
                        .unwrap();
                }
            })
        })
        .collect();
    for worker in workers {
        worker.join().unwrap();
    }

    for t in 0..THREADS {
        let upload = store.get(&format!("own-{t}")).unwrap().unwrap();
        assert_eq!(upload.payload, format!("{t}/{}", ROUNDS - 1).into_bytes());
    }
    for s in 0..4 {
        let upload = store.get(&format!("shared-{s}")).unwrap().unwrap();
        let text = String::from_utf8(upload.payload).unwrap();
        let (t, round) = text.split_once('/').unwrap();
        assert_eq!(t.parse::<usize>().unwrap() % 4, s);
        assert!(round.parse::<usize>().unwrap() < ROUNDS);
    }
    let stats = store.stats();
    assert_eq!(stats.clusters, THREADS as u64 + 4);
    assert_eq!(stats.writes, (THREADS * ROUNDS * 2) as u64);
    assert!(
        stats.commits < stats.writes,
        "no group commit: {} commits for {} writes",
        stats.commits,
        stats.writes
    );
    assert!(!names_in(store.dir())
        .iter()
        .any(|n| n.starts_with(TEMP_PREFIX)));
}

#[test]
fn uploads_answered_ok_are_served_after_reopening() {
    let dir = TempDir::new("reopen");
    let received = at(-5);
    {
        let store = open(&dir);
        let clone = store.clone();
        for i in 0..20 {
            clone
                .put(&format!("c{i}"), vec![i as u8; 100 + i], received)
                .unwrap();
        }
        // Dropping every clone closes the store and releases the lock (else reopening fails).
    }
    let store = open(&dir);
    assert_eq!(store.clusters().len(), 20);
    for i in 0..20 {
        let upload = store.get(&format!("c{i}")).unwrap().unwrap();
        assert_eq!(upload.payload, vec![i as u8; 100 + i]);
        assert_eq!(upload.received, received);
    }
    assert_eq!(
        store.stats().bytes,
        (0..20).map(|i| 100 + i as u64).sum::<u64>()
    );
}

#[test]
fn a_second_store_on_the_same_directory_is_refused() {
    let dir = TempDir::new("locked");
    let first = open(&dir);
    match Store::open(config(&dir)) {
        Err(error @ StoreError::Locked { .. }) => {
            assert!(
                error.to_string().contains("another telemeter-server"),
                "{error}"
            );
        }
        Err(other) => panic!("expected Locked, got {other}"),
        Ok(_) => panic!("a second store opened a locked directory"),
    }
    drop(first);
    open(&dir);
}

#[test]
fn open_removes_leftover_temp_files() {
    let dir = TempDir::new("leftover");
    fs::create_dir_all(&dir.0).unwrap();
    fs::write(dir.0.join(".tmp-7"), b"half a write").unwrap();
    fs::write(dir.0.join(".tmp-junk"), b"").unwrap();
    let store = open(&dir);
    assert_eq!(names_in(store.dir()), vec![".lock".to_string()]);
    assert!(store.clusters().is_empty());
}

/// Where the payload-length field of `cluster_id`'s file is.
fn payload_len_offset(cluster_id: &str) -> usize {
    (file::PREFIX_LEN + file::NEWEST_LEN) as usize + cluster_id.len() + 8
}

fn corrupt_names(dir: &Path) -> Vec<String> {
    names_in(&dir.join(CORRUPT_DIR))
}

#[test]
fn corrupt_files_are_set_aside_on_open_and_never_served() {
    let dir = TempDir::new("corrupt");
    {
        let store = open(&dir);
        for id in ["flipped", "truncated", "magic", "huge", "good", "renamed"] {
            store.put(id, vec![7u8; 300], at(0)).unwrap();
        }
        store.close();
    }
    let path = |id: &str| dir.0.join(file::file_name(id));

    let mut bytes = fs::read(path("flipped")).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    fs::write(path("flipped"), &bytes).unwrap();

    let bytes = fs::read(path("truncated")).unwrap();
    fs::write(path("truncated"), &bytes[..bytes.len() - 10]).unwrap();

    let mut bytes = fs::read(path("magic")).unwrap();
    bytes[..8].copy_from_slice(b"NOTSTORE");
    fs::write(path("magic"), &bytes).unwrap();

    let mut bytes = fs::read(path("huge")).unwrap();
    let at_len = payload_len_offset("huge");
    bytes[at_len..at_len + 8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    fs::write(path("huge"), &bytes).unwrap();

    // A valid file under the wrong name.
    fs::rename(path("renamed"), dir.0.join(file::file_name("elsewhere"))).unwrap();

    let store = open(&dir);
    for id in [
        "flipped",
        "truncated",
        "magic",
        "huge",
        "elsewhere",
        "renamed",
    ] {
        assert_eq!(store.get(id).unwrap(), None, "{id} was served");
    }
    assert_eq!(store.get("good").unwrap().unwrap().payload, vec![7u8; 300]);
    let listed: Vec<String> = store.clusters().into_iter().map(|c| c.cluster_id).collect();
    assert_eq!(listed, vec!["good".to_string()]);
    assert_eq!(store.stats().corrupt_files, 5);
    let set_aside = corrupt_names(store.dir());
    assert_eq!(set_aside.len(), 5);
    for id in ["flipped", "truncated", "magic", "huge", "elsewhere"] {
        let prefix = format!("{}.", file::file_name(id));
        assert!(
            set_aside.iter().any(|n| n.starts_with(&prefix)),
            "{id} not in corrupt/"
        );
        assert!(!path(id).exists());
    }
}

#[test]
fn a_file_damaged_while_running_is_set_aside_on_read() {
    let dir = TempDir::new("damaged");
    let store = open(&dir);
    store.put("a", b"aaaa".to_vec(), at(0)).unwrap();
    store.put("b", b"bbbb".to_vec(), at(0)).unwrap();
    checkpoint_now(&store);
    let path = file_of(&store, "a");
    let mut bytes = fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    fs::write(&path, &bytes).unwrap();

    assert_eq!(store.get("a").unwrap(), None);
    assert_eq!(store.get("b").unwrap().unwrap().payload, b"bbbb");
    assert_eq!(store.clusters().len(), 1);
    assert_eq!(store.stats().corrupt_files, 1);
    assert_eq!(corrupt_names(store.dir()).len(), 1);
    // The cluster can be written again afterwards.
    store.put("a", b"again".to_vec(), at(0)).unwrap();
    assert_eq!(store.get("a").unwrap().unwrap().payload, b"again");
}

#[test]
fn expired_clusters_are_hidden_then_swept() {
    let dir = TempDir::new("ttl");
    let store = open(&dir);
    store
        .put("old", b"old".to_vec(), at(-2 * 3600 * 1000))
        .unwrap();
    store.put("fresh", b"fresh".to_vec(), at(0)).unwrap();
    checkpoint_now(&store);

    let listed: Vec<String> = store.clusters().into_iter().map(|c| c.cluster_id).collect();
    assert_eq!(listed, vec!["fresh".to_string()]);
    assert_eq!(store.get("old").unwrap(), None);
    assert!(file_of(&store, "old").exists());

    assert_eq!(store.sweep(SystemTime::now()), 1);
    assert!(!file_of(&store, "old").exists());
    assert!(file_of(&store, "fresh").exists());
    let stats = store.stats();
    assert_eq!((stats.clusters, stats.expired), (1, 1));
    // Later, the fresh one expires too.
    assert_eq!(
        store.sweep(SystemTime::now() + Duration::from_secs(7200)),
        1
    );
    assert!(store.clusters().is_empty());
}

/// A payload of one gauge series stamped `ms_ago` milliseconds before now.
fn sampled(ms_ago: i64) -> Vec<u8> {
    use telemeter_common::model::{Gauge, Metric, MetricFamily, MetricType};
    let now = telemeter_common::time::unix_millis(SystemTime::now()) as i64;
    telemeter_common::delimited::encode(&[MetricFamily {
        name: Some("up".into()),
        help: None,
        r#type: Some(MetricType::Gauge as i32),
        metric: vec![Metric {
            gauge: Some(Gauge { value: Some(1.0) }),
            timestamp_ms: Some(now - ms_ago),
            ..Default::default()
        }],
    }])
}

fn listed(store: &Store) -> Vec<String> {
    store.clusters().into_iter().map(|c| c.cluster_id).collect()
}

#[test]
fn the_ttl_counts_from_the_newest_sample_not_the_receive_time() {
    let dir = TempDir::new("ttl-samples");
    // A 10 minute TTL; everything received just now.
    let ttl = Duration::from_secs(600);
    let store = Store::open(StoreConfig {
        ttl,
        ..config(&dir)
    })
    .unwrap();
    let minute = 60_000;
    store.put("stale", sampled(20 * minute), at(0)).unwrap();
    store.put("fresh", sampled(9 * minute), at(0)).unwrap();
    // Samples in the future (within the skew validation allows) are fresh.
    store.put("ahead", sampled(-4 * minute), at(0)).unwrap();
    assert_eq!(listed(&store), ["ahead", "fresh"]);
    assert_eq!(store.get("stale").unwrap(), None);
    assert!(store.get("fresh").unwrap().is_some());
    // The sweeper removes the stale one now, the fresh one a minute later (9 + 1 = 10).
    assert_eq!(store.sweep(SystemTime::now()), 1);
    assert!(!file_of(&store, "stale").exists());
    assert_eq!(store.sweep(SystemTime::now() + Duration::from_secs(50)), 0);
    assert_eq!(store.sweep(SystemTime::now() + Duration::from_secs(70)), 1);
    assert_eq!(listed(&store), ["ahead"]);
    // A later upload of older samples replaces a fresh one, and is not served: as upstream,
    // which kept the latest upload and dropped its old samples at read time.
    store.put("ahead", sampled(11 * minute), at(0)).unwrap();
    assert!(listed(&store).is_empty());
}

#[test]
fn the_newest_sample_survives_a_checkpoint_a_replay_and_a_restart() {
    let dir = TempDir::new("ttl-restart");
    let ttl = Duration::from_secs(600);
    let minute = 60_000;
    {
        let store = Store::open(StoreConfig {
            ttl,
            ..config(&dir)
        })
        .unwrap();
        // In a cluster file (checkpointed), and left in the journal (replayed at the next open).
        store
            .put("stale-file", sampled(20 * minute), at(0))
            .unwrap();
        store.put("fresh-file", sampled(minute), at(0)).unwrap();
        checkpoint_now(&store);
        store
            .put("stale-journal", sampled(20 * minute), at(0))
            .unwrap();
        store.put("fresh-journal", sampled(minute), at(0)).unwrap();
        // A crash: nothing checkpoints the segment (taken away from the closing store).
        let segment = lock(&store.handle.shared.journal).segment.take().unwrap();
        drop(store);
        assert!(segment.path.exists());
    }
    let store = Store::open(StoreConfig {
        ttl,
        ..config(&dir)
    })
    .unwrap();
    assert_eq!(listed(&store), ["fresh-file", "fresh-journal"]);
    // The replayed clusters were written as version 2 files, with their newest sample.
    drop(store);
    let store = Store::open(StoreConfig {
        ttl,
        ..config(&dir)
    })
    .unwrap();
    assert_eq!(listed(&store), ["fresh-file", "fresh-journal"]);
    let (header, _) = file::read(&file_of(&store, "stale-journal"), false).unwrap();
    assert!(header.newest_sample_ms.is_some());
}

#[test]
fn a_version_1_file_is_read_and_its_newest_sample_taken_from_its_payload() {
    let dir = TempDir::new("ttl-v1");
    fs::create_dir_all(&dir.0).unwrap();
    let minute = 60_000;
    for (id, payload) in [("old", sampled(20 * minute)), ("new", sampled(minute))] {
        let received = telemeter_common::time::unix_millis(SystemTime::now());
        let header = file::tests::encode_header_v1(id, received, &payload);
        fs::write(dir.0.join(file::file_name(id)), [header, payload].concat()).unwrap();
    }
    let ttl = Duration::from_secs(600);
    let store = Store::open(StoreConfig {
        ttl,
        ..config(&dir)
    })
    .unwrap();
    assert_eq!(listed(&store), ["new"]);
    assert_eq!(
        store.get("new").unwrap().unwrap().payload,
        sampled_like(&store, "new")
    );
    assert_eq!(store.stats().corrupt_files, 0);
    // Rewritten as version 2 when its cluster is next written.
    store.put("new", sampled(0), at(0)).unwrap();
    checkpoint_now(&store);
    let (header, _) = file::read(&file_of(&store, "new"), false).unwrap();
    assert!(header.newest_sample_ms.is_some());
}

/// The payload `store` holds for `id` (read from its file directly).
fn sampled_like(store: &Store, id: &str) -> Vec<u8> {
    file::read(&file_of(store, id), true).unwrap().1.unwrap()
}

#[test]
fn put_if_newer_keeps_the_newer_upload() {
    let dir = TempDir::new("ifnewer");
    let store = open(&dir);
    // Taken together: a put can take over 100 ms on a loaded machine, and a time taken after
    // it would then not be older at all.
    let (first, older, newest) = (at(-100), at(-200), at(0));
    assert!(store.put_if_newer("c", b"first".to_vec(), first).unwrap());
    assert!(!store.put_if_newer("c", b"older".to_vec(), older).unwrap());
    assert_eq!(store.get("c").unwrap().unwrap().payload, b"first");
    assert!(store.put_if_newer("c", b"newer".to_vec(), newest).unwrap());
    let upload = store.get("c").unwrap().unwrap();
    assert_eq!(
        (upload.payload, upload.received),
        (b"newer".to_vec(), newest)
    );
    // Received later, but with older samples (an upload that reached another server late, then
    // handed off here): the fresher values stay.
    let fresh = sampled(0);
    assert!(store.put_if_newer("d", fresh.clone(), at(-1000)).unwrap());
    assert!(!store.put_if_newer("d", sampled(60_000), at(0)).unwrap());
    assert_eq!(store.get("d").unwrap().unwrap().payload, fresh);
}

#[test]
fn a_batch_writes_each_cluster_once_and_answers_everyone() {
    let dir = TempDir::new("batch");
    let store = open(&dir);
    let shared = &store.handle.shared;
    store.put("kept", b"stored".to_vec(), at(0)).unwrap();
    let mut answers = Vec::new();
    let mut batch = Vec::new();
    for (id, payload, received, mode) in [
        ("c", "one", at(-30), Mode::Replace),
        ("c", "two", at(-20), Mode::Replace),
        ("d", "three", at(-10), Mode::Replace),
        ("kept", "stale", at(-1000), Mode::IfNewer),
    ] {
        let (reply, answer) = handoff::oneshot();
        answers.push(answer);
        batch.push(Request {
            cluster_id: id.to_string(),
            payload: payload.as_bytes().to_vec(),
            packed: None,
            serve: true,
            ship: Ship::Served,
            received_millis: telemeter_common::time::unix_millis(received),
            newest_sample_ms: telemeter_common::time::unix_millis(received) as i64,
            newest_received_ms: i64::MIN,
            patch: None,
            mode,
            condition: commit::Condition::Always,
            reply: Answer::Wait(reply),
        });
    }
    let records_before = journal_records(store.dir()).len();
    commit::commit(shared, batch);
    let results: Vec<bool> = answers
        .into_iter()
        .map(|a| a.recv().unwrap().unwrap().written())
        .collect();
    assert_eq!(results, vec![true, true, true, false]);
    // Two records written ("c" once, "d"), none for the skipped one.
    let records = journal_records(store.dir());
    assert_eq!(records.len() - records_before, 2);
    assert_eq!(records[records_before].2, b"two");
    assert_eq!(store.get("c").unwrap().unwrap().payload, b"two");
    assert_eq!(store.get("d").unwrap().unwrap().payload, b"three");
    assert_eq!(store.get("kept").unwrap().unwrap().payload, b"stored");
}

#[test]
fn remove_deletes_the_file_and_the_entry() {
    let dir = TempDir::new("remove");
    let store = open(&dir);
    store.put("c", b"x".to_vec(), at(0)).unwrap();
    store.remove("c").unwrap();
    assert_eq!(store.get("c").unwrap(), None);
    assert!(!file_of(&store, "c").exists());
    assert!(store.clusters().is_empty());
    // Removing what is not there is fine.
    store.remove("never").unwrap();
}

#[test]
fn a_failed_write_is_an_error_and_leaves_the_old_upload() {
    let dir = TempDir::new("ioerror");
    let store = open(&dir);
    let old = at(-10);
    store.put("c", b"old".to_vec(), old).unwrap();

    checkpoint_now(&store);

    // Root ignores permissions, so make the next journal segments impossible to create: a
    // directory stands where each would go (the same create failure a full or read-only
    // disk gives).
    let next = lock(&store.handle.shared.journal).next_number;
    let blockers: Vec<PathBuf> = (next..next + 4)
        .map(|n| store.dir().join(format!("{}{n}", journal::PREFIX)))
        .collect();
    for blocker in &blockers {
        fs::create_dir(blocker).unwrap();
    }
    match store.put("c", b"new".to_vec(), at(0)) {
        Err(StoreError::Io { context, .. }) => {
            assert!(context.contains(journal::PREFIX), "{context}");
            assert!(context.contains(&dir.0.display().to_string()), "{context}");
        }
        other => panic!("expected an Io error, got {other:?}"),
    }
    let upload = store.get("c").unwrap().unwrap();
    assert_eq!((upload.payload, upload.received), (b"old".to_vec(), old));
    let (_, on_disk) = file::read(&file_of(&store, "c"), true).unwrap();
    assert_eq!(on_disk.unwrap(), b"old");

    // Once the cause is gone, the next put works: no sticky failure.
    for blocker in &blockers {
        fs::remove_dir(blocker).unwrap();
    }
    store.put("c", b"newer".to_vec(), at(0)).unwrap();
    assert_eq!(store.get("c").unwrap().unwrap().payload, b"newer");
}

#[test]
fn a_read_only_directory_is_an_error_when_permissions_apply() {
    use std::os::unix::fs::PermissionsExt;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        // Root writes through 0555; the previous test covers the failure path instead.
        return;
    }
    let dir = TempDir::new("readonly");
    let store = open(&dir);
    store.put("c", b"old".to_vec(), at(-10)).unwrap();
    fs::set_permissions(store.dir(), fs::Permissions::from_mode(0o555)).unwrap();
    let result = store.put("c", b"new".to_vec(), at(0));
    fs::set_permissions(store.dir(), fs::Permissions::from_mode(0o755)).unwrap();
    assert!(matches!(result, Err(StoreError::Io { .. })), "{result:?}");
    assert_eq!(store.get("c").unwrap().unwrap().payload, b"old");
    store.put("c", b"new".to_vec(), at(0)).unwrap();
}

#[test]
fn a_closed_store_refuses_puts_and_drop_does_not_hang() {
    let dir = TempDir::new("closed");
    let store = open(&dir);
    let clone = store.clone();
    store.put("c", b"x".to_vec(), at(0)).unwrap();
    store.close();
    assert!(matches!(
        clone.put("c", b"y".to_vec(), at(0)),
        Err(StoreError::Closed)
    ));
    // Reads still work from the index and the files.
    assert_eq!(clone.get("c").unwrap().unwrap().payload, b"x");
    drop(store);
    drop(clone);
    open(&dir);
}

/// Not a test: compares group commit with a naive write + fsync + rename + dir fsync per put.
/// `cargo test -p telemeter-server store::tests::bench -- --ignored --nocapture`
#[test]
#[ignore]
fn bench_group_commit_against_naive_fsync() {
    const THREADS: usize = 64;
    const PUTS: usize = 200;
    let payload = vec![0x5au8; 20 * 1024];

    let dir = TempDir::new("bench-group");
    let store = open(&dir);
    let started = std::time::Instant::now();
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let store = store.clone();
            let payload = payload.clone();
            thread::spawn(move || {
                for _ in 0..PUTS {
                    store
                        .put(&format!("bench-{t}"), payload.clone(), at(0))
                        .unwrap();
                }
            })
        })
        .collect();
    for worker in workers {
        worker.join().unwrap();
    }
    let group = started.elapsed();
    let stats = store.stats();
    drop(store);

    let naive_dir = TempDir::new("bench-naive");
    fs::create_dir_all(&naive_dir.0).unwrap();
    let started = std::time::Instant::now();
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let dir = naive_dir.0.clone();
            let payload = payload.clone();
            thread::spawn(move || {
                use std::io::Write;
                for i in 0..PUTS {
                    let id = format!("bench-{t}");
                    let header = file::encode_header(&id, 0, 0, i64::MIN, &payload).unwrap();
                    let temp = dir.join(format!(".tmp-{t}-{i}"));
                    let mut out = File::create(&temp).unwrap();
                    out.write_all(&header).unwrap();
                    out.write_all(&payload).unwrap();
                    out.sync_data().unwrap();
                    fs::rename(&temp, dir.join(file::file_name(&id))).unwrap();
                    File::open(&dir).unwrap().sync_all().unwrap();
                }
            })
        })
        .collect();
    for worker in workers {
        worker.join().unwrap();
    }
    let naive = started.elapsed();

    // The same, one put at a time (a single writer, as without group commit in one thread).
    const SERIAL_PUTS: usize = 25;
    let serial_lock = Arc::new(Mutex::new(()));
    let started = std::time::Instant::now();
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let dir = naive_dir.0.clone();
            let payload = payload.clone();
            let serial_lock = Arc::clone(&serial_lock);
            thread::spawn(move || {
                use std::io::Write;
                for i in 0..SERIAL_PUTS {
                    let _one_at_a_time = lock(&serial_lock);
                    let id = format!("bench-{t}");
                    let header = file::encode_header(&id, 0, 0, i64::MIN, &payload).unwrap();
                    let temp = dir.join(format!(".tmp-s{t}-{i}"));
                    let mut out = File::create(&temp).unwrap();
                    out.write_all(&header).unwrap();
                    out.write_all(&payload).unwrap();
                    out.sync_data().unwrap();
                    fs::rename(&temp, dir.join(file::file_name(&id))).unwrap();
                    File::open(&dir).unwrap().sync_all().unwrap();
                }
            })
        })
        .collect();
    for worker in workers {
        worker.join().unwrap();
    }
    let serial = started.elapsed();

    let total = (THREADS * PUTS) as f64;
    println!(
        "group commit: {:.0} puts/s ({} puts in {} commits, {:.2?}); \
         naive fsync per put, 64 threads at once: {:.0} puts/s ({:.2?}); \
         naive, one put at a time: {:.0} puts/s ({} puts in {:.2?})",
        total / group.as_secs_f64(),
        stats.writes,
        stats.commits,
        group,
        total / naive.as_secs_f64(),
        naive,
        (THREADS * SERIAL_PUTS) as f64 / serial.as_secs_f64(),
        THREADS * SERIAL_PUTS,
        serial
    );
}

#[test]
fn a_journal_written_in_format_version_1_is_replayed_on_open() {
    // What a server from before CRC-32C left behind when it crashed: a segment of version 1
    // records and no cluster files yet.
    let dir = TempDir::new("journal-v1");
    fs::create_dir_all(&dir.0).unwrap();
    let received = at(-1_000);
    let mut bytes = Vec::new();
    for (kind, id, payload) in [
        (journal::PUT, "kept", &b"old format"[..]),
        (journal::PUT, "gone", &b"removed later"[..]),
        (journal::REMOVE, "gone", &b""[..]),
    ] {
        journal::encode_as(
            journal::Checksum::Hash64,
            kind,
            id,
            telemeter_common::time::unix_millis(received),
            payload,
            &mut bytes,
        )
        .unwrap();
    }
    fs::write(dir.0.join(format!("{}0", journal::PREFIX)), &bytes).unwrap();

    let store = open(&dir);
    let upload = store.get("kept").unwrap().unwrap();
    assert_eq!(
        (upload.payload.as_slice(), upload.received),
        (&b"old format"[..], received)
    );
    assert_eq!(store.get("gone").unwrap(), None);
    // Replayed into cluster files (in the background), the old segment is gone, and new records
    // are version 3.
    wait_for_checkpoints(&store);
    assert!(file_of(&store, "kept").exists());
    assert!(!dir.0.join(format!("{}0", journal::PREFIX)).exists());
    store.put("new", b"new format".to_vec(), at(0)).unwrap();
    let records = journal_records(&dir.0);
    assert_eq!(
        records,
        vec![(journal::PUT, "new".to_string(), b"new format".to_vec())]
    );
    let segment = names_in(&dir.0)
        .into_iter()
        .find(|n| journal::is_segment_name(n))
        .unwrap();
    assert_eq!(
        fs::read(dir.0.join(segment)).unwrap()[0],
        journal::PUT_MARKED
    );
    store.close();
}

#[test]
fn put_unless_older_never_lets_older_samples_replace_newer_ones() {
    let dir = TempDir::new("unlessolder");
    let store = open(&dir);
    let (old, new) = (sampled(60_000), sampled(1_000));
    // Received later, but its samples are older (a spooled upload after a fresh one): kept out.
    assert!(store.put_unless_older("c", new.clone(), at(-10)).unwrap());
    assert!(!store.put_unless_older("c", old.clone(), at(0)).unwrap());
    assert_eq!(store.get("c").unwrap().unwrap().payload, new);
    // From an empty store: the first is written, then only what is not older.
    let dir2 = TempDir::new("unlessolder-batch");
    let store2 = open(&dir2);
    assert!(store2.put_unless_older("d", old.clone(), at(0)).unwrap());
    assert!(store2.put_unless_older("d", new.clone(), at(0)).unwrap());
    assert!(!store2.put_unless_older("d", old, at(0)).unwrap());
    assert_eq!(store2.get("d").unwrap().unwrap().payload, new);
}

#[test]
fn a_payload_damaged_on_disk_is_found_by_its_first_read_and_never_served() {
    let dir = TempDir::new("lazy-verify");
    {
        let store = open(&dir);
        for id in ["damaged", "good"] {
            store.put(id, vec![7u8; 300], at(0)).unwrap();
        }
        store.close();
    }
    let path = |id: &str| dir.0.join(file::file_name(id));
    damage_payload(&path("damaged"));

    // Open reads headers only: the damage is in the payload, so it is found by the first read.
    let store = open(&dir);
    assert_eq!(store.stats().corrupt_files, 0);
    assert!(path("damaged").exists());
    assert_eq!(
        store.get("damaged").unwrap(),
        None,
        "damaged payload served"
    );
    assert_eq!(store.get_pinned("damaged").unwrap().map(|p| p.upload), None);
    assert_eq!(store.stats().corrupt_files, 1);
    assert!(!path("damaged").exists());
    let prefix = format!("{}.", file::file_name("damaged"));
    assert!(corrupt_names(store.dir())
        .iter()
        .any(|n| n.starts_with(&prefix)));
    assert_eq!(listed(&store), ["good"]);

    // The first read verifies and remembers it; later reads of that file skip the SHA-256.
    let verified = |store: &Store| {
        matches!(
            lock(&store.handle.shared.index)
                .get("good")
                .map(|e| &e.location),
            Some(Location::File { verified: true, .. })
        )
    };
    assert!(!verified(&store));
    assert_eq!(store.get("good").unwrap().unwrap().payload, vec![7u8; 300]);
    assert!(verified(&store));
    assert_eq!(store.get("good").unwrap().unwrap().payload, vec![7u8; 300]);
    // A new version of the file is not: damaged after its checkpoint, it is never served.
    store.put("good", vec![8u8; 300], at(0)).unwrap();
    checkpoint_now(&store);
    assert!(!verified(&store));
    let mut bytes = fs::read(path("good")).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    fs::write(path("good"), &bytes).unwrap();
    assert_eq!(store.get("good").unwrap(), None);
    assert_eq!(store.stats().corrupt_files, 2);
}

#[test]
fn open_leaves_the_journal_to_the_checkpointer_and_crashes_around_it_lose_nothing() {
    let dir = TempDir::new("crash-open-crash-open");
    // Opened as after a crash, with the checkpointer dead from the start: whatever open did
    // is all that reached the disk.
    let open_then_crash = || Store::open_checkpointing(config(&dir), false, false).unwrap();
    let mut want: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    {
        let store = open(&dir);
        for (id, byte) in [("filed", 1u8), ("replaced", 2), ("removed", 3)] {
            store.put(id, vec![byte; 200], at(0)).unwrap();
            want.insert(id.to_string(), vec![byte; 200]);
        }
        checkpoint_now(&store);
        store.put("replaced", vec![4u8; 200], at(0)).unwrap();
        store.put("journaled", vec![5u8; 200], at(0)).unwrap();
        store.remove("removed").unwrap();
        want.insert("replaced".to_string(), vec![4u8; 200]);
        want.insert("journaled".to_string(), vec![5u8; 200]);
        want.remove("removed");
        // A crash: nothing checkpoints the segment.
        let _segment = lock(&store.handle.shared.journal).segment.take().unwrap();
    }
    let check = |store: &Store, want: &BTreeMap<String, Vec<u8>>| {
        let listed: Vec<String> = store.clusters().into_iter().map(|c| c.cluster_id).collect();
        assert_eq!(listed, want.keys().cloned().collect::<Vec<_>>());
        for (id, payload) in want {
            assert_eq!(&store.get(id).unwrap().unwrap().payload, payload, "{id}");
        }
        assert_eq!(store.get("removed").unwrap(), None);
    };
    for round in 0..3u8 {
        let store = open_then_crash();
        check(&store, &want);
        // Open wrote no cluster file: the replayed segments are still there.
        assert!(!journal::list(&dir.0).unwrap().is_empty());
        // Acknowledged after open, in a segment of its own, numbered after the replayed ones.
        let id = format!("after-open-{round}");
        store.put(&id, vec![round; 100], at(0)).unwrap();
        store.put("replaced", vec![10 + round; 200], at(0)).unwrap();
        want.insert(id, vec![round; 100]);
        want.insert("replaced".to_string(), vec![10 + round; 200]);
        check(&store, &want);
        drop(store);
    }
    {
        let store = open(&dir);
        check(&store, &want);
        wait_for_checkpoints(&store);
        check(&store, &want);
    }
    // Everything is in cluster files now.
    let store = open(&dir);
    assert!(journal::list(&dir.0).unwrap().is_empty());
    check(&store, &want);
}

/// A payload of one series stamped `ms_ago` milliseconds before now, in a family with `help`
/// (remote write's, [`REMOTE_WRITE_HELP`], or another); and that timestamp.
fn with_help(help: &str, ms_ago: i64) -> (Vec<u8>, i64) {
    use telemeter_common::model::{Metric, MetricFamily, MetricType, Untyped};
    let stamp = telemeter_common::time::unix_millis(SystemTime::now()) as i64 - ms_ago;
    let payload = telemeter_common::delimited::encode(&[MetricFamily {
        name: Some("up".into()),
        help: Some(help.into()),
        r#type: Some(MetricType::Untyped as i32),
        metric: vec![Metric {
            untyped: Some(Untyped { value: Some(1.0) }),
            timestamp_ms: Some(stamp),
            ..Default::default()
        }],
    }]);
    (payload, stamp)
}

/// Puts the three kinds of marker the store must keep as given, none of which its payload says:
/// a merge's marker over a payload with no remote-write family, a merge's "none" over a payload
/// with one, and a plain upload whose client named a family with remote write's help (a client
/// cannot make its cluster's uploads merge). Returns what each must read back.
fn put_markers(store: &Store) -> Vec<(&'static str, Option<i64>)> {
    let (plain, _) = with_help("from an upload", 1_000);
    let (received, stamp) = with_help(REMOTE_WRITE_HELP, 2_000);
    store
        .put_merged("merged", plain, Ship::Nothing, at(0), 1234, None)
        .unwrap();
    store
        .put_merged(
            "dropped",
            received.clone(),
            Ship::Nothing,
            at(0),
            i64::MIN,
            None,
        )
        .unwrap();
    store.put("spoofed", received, at(0)).unwrap();
    assert_ne!(stamp, 1234);
    vec![
        ("dropped", Some(i64::MIN)),
        ("merged", Some(1234)),
        ("never", None),
        ("spoofed", Some(i64::MIN)),
    ]
}

fn markers(store: &Store, ids: &[(&'static str, Option<i64>)]) -> Vec<(&'static str, Option<i64>)> {
    ids.iter()
        .map(|(id, _)| (*id, store.newest_received(id).unwrap()))
        .collect()
}

#[test]
fn the_remote_write_marker_survives_a_journal_replay() {
    let dir = TempDir::new("marker-replay");
    let expected = {
        let store = open(&dir);
        let expected = put_markers(&store);
        assert_eq!(markers(&store, &expected), expected, "before the restart");
        // A crash: nothing checkpoints the segment (taken away from the closing store).
        let segment = lock(&store.handle.shared.journal).segment.take().unwrap();
        drop(store);
        assert!(segment.path.exists());
        expected
    };
    let store = Store::open_checkpointing(config(&dir), false, false).unwrap();
    assert!(store
        .handle
        .shared
        .index
        .lock()
        .unwrap()
        .values()
        .all(|e| matches!(e.location, Location::Journal { .. })));
    assert_eq!(markers(&store, &expected), expected, "replayed");
}

#[test]
fn the_remote_write_marker_survives_a_checkpoint_in_the_file_header() {
    let dir = TempDir::new("marker-file");
    let expected = {
        let store = open(&dir);
        let expected = put_markers(&store);
        checkpoint_now(&store);
        store.close();
        expected
    };
    assert!(journal::list(&dir.0).unwrap().is_empty());
    for (id, marker) in &expected {
        if let Some(marker) = marker {
            let (header, _) = file::read(&dir.0.join(file::file_name(id)), false).unwrap();
            assert_eq!(header.newest_received_ms, Some(*marker), "{id}");
        }
    }
    let store = open(&dir);
    assert_eq!(markers(&store, &expected), expected, "from the headers");
    // Answered from the index: a file whose payload was damaged since is not read (a read would
    // set it aside), and a removed one still answers until the store notices.
    let damaged = file_of(&store, "merged");
    let mut bytes = fs::read(&damaged).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    fs::write(&damaged, &bytes).unwrap();
    assert_eq!(store.newest_received("merged").unwrap(), Some(1234));
    assert_eq!(store.stats().corrupt_files, 0, "no payload was read");
    assert_eq!(
        store.get("merged").unwrap(),
        None,
        "a read does see the damage"
    );
    assert_eq!(store.stats().corrupt_files, 1);
    assert_eq!(store.newest_received("merged").unwrap(), None, "set aside");
    // The sweeper forgets it with the entry.
    assert_eq!(
        store.sweep(SystemTime::now() + Duration::from_secs(7200)),
        2
    );
    assert_eq!(store.newest_received("dropped").unwrap(), None);
}

#[test]
fn a_version_2_file_opens_serves_and_learns_its_marker_from_its_payload_once() {
    let dir = TempDir::new("marker-v2");
    fs::create_dir_all(&dir.0).unwrap();
    let (received, stamp) = with_help(REMOTE_WRITE_HELP, 2_000);
    let (plain, _) = with_help("from an upload", 1_000);
    for (id, payload) in [("received", &received), ("plain", &plain)] {
        let millis = telemeter_common::time::unix_millis(SystemTime::now());
        let header = file::tests::encode_header_v2(id, millis, millis as i64, payload);
        fs::write(
            dir.0.join(file::file_name(id)),
            [header, payload.clone()].concat(),
        )
        .unwrap();
    }
    let store = open(&dir);
    assert_eq!(listed(&store), ["plain", "received"]);
    assert_eq!(store.get("received").unwrap().unwrap().payload, received);
    assert_eq!(store.newest_received("received").unwrap(), Some(stamp));
    assert_eq!(store.newest_received("plain").unwrap(), Some(i64::MIN));
    // Learned once: kept in the index, not read from the file again.
    fs::remove_file(file_of(&store, "received")).unwrap();
    assert_eq!(store.newest_received("received").unwrap(), Some(stamp));
    // Rewritten in the current version with its marker when its cluster is next written.
    store
        .put_merged(
            "plain",
            plain,
            Ship::Nothing,
            at(0),
            77,
            store.version("plain"),
        )
        .unwrap();
    checkpoint_now(&store);
    let bytes = fs::read(file_of(&store, "plain")).unwrap();
    assert_eq!(&bytes[8..10], &file::VERSION.to_le_bytes());
    let (header, _) = file::read(&file_of(&store, "plain"), false).unwrap();
    assert_eq!(header.newest_received_ms, Some(77));
}

#[test]
fn a_handoff_over_a_version_2_file_of_remote_write_series_is_merged_into_it() {
    // The file's marker is unknown until its payload is read: a handoff asks as an upload does.
    use telemeter_common::model::{Metric, MetricFamily, MetricType, Untyped};
    let dir = TempDir::new("handoff-v2");
    fs::create_dir_all(&dir.0).unwrap();
    let (received, _) = with_help(REMOTE_WRITE_HELP, 2_000);
    let millis = telemeter_common::time::unix_millis(SystemTime::now());
    let header = file::tests::encode_header_v2("c", millis, millis as i64 - 2_000, &received);
    fs::write(
        dir.0.join(file::file_name("c")),
        [header, received].concat(),
    )
    .unwrap();
    let store = open(&dir);
    let merger = crate::receive::merge::Merger::new(store.clone());
    let upload = telemeter_common::delimited::encode(&[MetricFamily {
        name: Some("node_load1".into()),
        help: Some("from an upload".into()),
        r#type: Some(MetricType::Untyped as i32),
        metric: vec![Metric {
            untyped: Some(Untyped { value: Some(0.5) }),
            timestamp_ms: Some(telemeter_common::time::unix_millis(SystemTime::now()) as i64),
            ..Default::default()
        }],
    }]);
    let later = SystemTime::now() + Duration::from_secs(1);
    assert!(crate::cluster::handoff::store_handoff(&merger, "c", upload, later).unwrap());
    let mut families: Vec<String> = telemeter_common::delimited::decode(
        &store.get("c").unwrap().unwrap().payload,
        &telemeter_common::delimited::Limits::default(),
    )
    .unwrap()
    .into_iter()
    .map(|family| family.name.unwrap_or_default())
    .collect();
    families.sort();
    assert_eq!(families, ["node_load1", "up"]);
}

#[test]
fn a_version_3_file_is_verified_by_its_sha256_served_and_rewritten_as_version_4() {
    let dir = TempDir::new("file-v3");
    fs::create_dir_all(&dir.0).unwrap();
    let (received, stamp) = with_help(REMOTE_WRITE_HELP, 2_000);
    let (plain, _) = with_help("from an upload", 1_000);
    let millis = telemeter_common::time::unix_millis(SystemTime::now());
    for (id, payload, marker) in [("received", &received, stamp), ("plain", &plain, i64::MIN)] {
        let header = file::tests::encode_header_v3(id, millis, millis as i64, marker, payload);
        fs::write(
            dir.0.join(file::file_name(id)),
            [header, payload.clone()].concat(),
        )
        .unwrap();
    }
    // A third whose payload was damaged on disk: its SHA-256 no longer matches.
    let mut damaged = file::tests::encode_header_v3("damaged", millis, millis as i64, 0, &plain);
    damaged.extend_from_slice(&plain);
    *damaged.last_mut().unwrap() ^= 0x10;
    fs::write(dir.0.join(file::file_name("damaged")), damaged).unwrap();
    let store = open(&dir);
    assert_eq!(store.get("received").unwrap().unwrap().payload, received);
    assert_eq!(store.newest_received("received").unwrap(), Some(stamp));
    assert_eq!(store.get("plain").unwrap().unwrap().payload, plain);
    assert!(store.get("damaged").unwrap().is_none());
    assert_eq!(corrupt_names(&dir.0).len(), 1);
    store
        .put_merged(
            "plain",
            plain.clone(),
            Ship::Nothing,
            at(0),
            77,
            store.version("plain"),
        )
        .unwrap();
    checkpoint_now(&store);
    let bytes = fs::read(file_of(&store, "plain")).unwrap();
    assert_eq!(&bytes[8..10], &4u16.to_le_bytes());
    let (header, payload) = file::read(&file_of(&store, "plain"), true).unwrap();
    assert_eq!(header.newest_received_ms, Some(77));
    assert_eq!(payload.unwrap(), plain);
}

#[test]
fn a_journal_of_version_2_records_gives_the_marker_its_payload_says() {
    let dir = TempDir::new("marker-journal-v2");
    fs::create_dir_all(&dir.0).unwrap();
    let (received, stamp) = with_help(REMOTE_WRITE_HELP, 2_000);
    let (plain, _) = with_help("from an upload", 1_000);
    let mut bytes = Vec::new();
    let millis = telemeter_common::time::unix_millis(SystemTime::now());
    journal::encode(journal::PUT, "received", millis, &received, &mut bytes).unwrap();
    journal::encode(journal::SERVE, "plain", millis, &plain, &mut bytes).unwrap();
    fs::write(dir.0.join(format!("{}0", journal::PREFIX)), &bytes).unwrap();
    let store = open(&dir);
    assert_eq!(store.newest_received("received").unwrap(), Some(stamp));
    assert_eq!(store.newest_received("plain").unwrap(), Some(i64::MIN));
    assert_eq!(store.get("received").unwrap().unwrap().payload, received);
}

#[test]
fn a_version_3_record_whose_marker_changed_fails_its_checksum() {
    let dir = TempDir::new("marker-flip");
    fs::create_dir_all(&dir.0).unwrap();
    let mut bytes = Vec::new();
    journal::encode_marked(journal::PUT, "a", 5, b"payload", 99, &mut bytes).unwrap();
    journal::encode_marked(journal::SERVE, "b", 5, b"payload", 98, &mut bytes).unwrap();
    assert!(journal::encode_marked(journal::SHIP, "c", 5, b"", 0, &mut Vec::new()).is_err());
    let path = dir.0.join("journal-0");
    fs::write(&path, &bytes).unwrap();
    let mut seen = Vec::new();
    let torn = journal::replay(&path, |r| {
        seen.push((r.kind, r.header.newest_received_ms, r.payload));
        Ok(())
    })
    .unwrap();
    assert!(torn.is_none());
    assert_eq!(
        seen,
        [
            (journal::PUT, Some(99), b"payload".to_vec()),
            (journal::SERVE, Some(98), b"payload".to_vec())
        ]
    );
    // The first record's marker is its last 8 bytes before the second record.
    let first_len = bytes.len() / 2;
    bytes[first_len - 1] ^= 0x01;
    fs::write(&path, &bytes).unwrap();
    let torn = journal::replay(&path, |_| Ok(())).unwrap();
    assert_eq!(torn.map(|(left, _)| left), Some(bytes.len() as u64));
}

#[test]
fn a_handoff_carries_the_marker_in_its_payload() {
    // A peer hands over the payload alone (old peers and new alike): its families say.
    let dir = TempDir::new("marker-handoff");
    let store = open(&dir);
    let (received, stamp) = with_help(REMOTE_WRITE_HELP, 2_000);
    let (plain, _) = with_help("from an upload", 1_000);
    assert!(store.put_if_newer("received", received, at(0)).unwrap());
    assert!(store.put_if_newer("plain", plain, at(0)).unwrap());
    assert_eq!(store.newest_received("received").unwrap(), Some(stamp));
    assert_eq!(store.newest_received("plain").unwrap(), Some(i64::MIN));
}

/// A payload of `series` gauge series (compressible, as real ones are), newest sample stamped
/// `ms_ago` before now, and its snappy frames.
fn packable(series: usize, ms_ago: i64) -> (Vec<u8>, Vec<u8>) {
    use telemeter_common::model::{Gauge, LabelPair, Metric, MetricFamily, MetricType};
    let now = telemeter_common::time::unix_millis(SystemTime::now()) as i64;
    let payload = telemeter_common::delimited::encode(&[MetricFamily {
        name: Some("node_cpu_seconds_total".into()),
        help: Some("Seconds the CPUs spent in each mode.".into()),
        r#type: Some(MetricType::Gauge as i32),
        metric: (0..series)
            .map(|i| Metric {
                label: vec![LabelPair {
                    name: Some("cpu".into()),
                    value: Some(i.to_string()),
                }],
                gauge: Some(Gauge {
                    value: Some(i as f64),
                }),
                timestamp_ms: Some(now - ms_ago - i as i64),
                ..Default::default()
            })
            .collect(),
    }]);
    let frames = telemeter_common::snappy::encode_framed(&payload);
    assert!(series < 100 || frames.len() * 2 < payload.len());
    (payload, frames)
}

/// Whether `needle` occurs in `haystack`.
fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

#[test]
fn a_packed_upload_is_journaled_as_it_arrived_and_every_read_gets_its_families() {
    let dir = TempDir::new("packed");
    let (payload, frames) = packable(200, 0);
    let newer = sampled(0);
    let received = at(0);
    {
        let store = open(&dir);
        assert!(store
            .put_unless_older_packed("a", payload.clone(), frames.clone(), received)
            .unwrap());
        // The journal holds the frames, not the families.
        let segment = fs::read(dir.0.join(format!("{}0", journal::PREFIX))).unwrap();
        assert!(contains(&segment, &frames) && !contains(&segment, &payload));
        assert_eq!(store.get("a").unwrap().unwrap().payload, payload);
        assert_eq!(
            store.clusters(),
            vec![ClusterEntry {
                cluster_id: "a".to_string(),
                received,
                payload_bytes: payload.len() as u64,
            }]
        );
        let pinned = store.get_pinned("a").unwrap().unwrap();
        assert_eq!(pinned.upload.payload, payload);
        // A newer upload does not change what the pin reads.
        store.put("a", newer.clone(), at(1)).unwrap();
        let mut range = Vec::new();
        pinned.read_range(7, 300, &mut range).unwrap();
        assert_eq!(range, payload[7..300]);
        assert!(pinned
            .read_range(0, payload.len() as u64 + 1, &mut range)
            .is_err());
        // An older upload, packed, does not replace it (its newest sample is older).
        let (older, older_frames) = packable(10, 60_000);
        assert!(!store
            .put_unless_older_packed("a", older, older_frames, at(2))
            .unwrap());
        store
            .put_unless_older_packed("b", payload.clone(), frames.clone(), received)
            .unwrap();
        store.close();
    }
    // Replayed (the crash before the checkpoint): served from the packed record.
    {
        let store = Store::open_checkpointing(config(&dir), false, false).unwrap();
        assert_eq!(store.get("b").unwrap().unwrap().payload, payload);
        assert_eq!(store.get("a").unwrap().unwrap().payload, newer);
        let pinned = store.get_pinned("b").unwrap().unwrap();
        let mut range = Vec::new();
        pinned
            .read_range(0, payload.len() as u64, &mut range)
            .unwrap();
        assert_eq!(range, payload);
    }
    // Checkpointed: the cluster file holds the families, plain, as before.
    let store = open(&dir);
    wait_for_checkpoints(&store);
    let file = fs::read(file_of(&store, "b")).unwrap();
    assert!(file.ends_with(&payload));
    assert_eq!(store.get("b").unwrap().unwrap().payload, payload);
}

#[test]
fn packed_payloads_past_the_budget_close_the_segment_and_repeated_clusters_count_once() {
    let dir = TempDir::new("packed-budget");
    let store = open(&dir);
    let shared = &store.handle.shared;
    let (payload, frames) = packable(200, 0);
    lock(&shared.journal).packed_budget = 3 * payload.len() as u64;
    let segment_now = || lock(&shared.journal).segment.as_ref().map(|s| s.number);
    let put = |id: &str| {
        store
            .put_unless_older_packed(id, payload.clone(), frames.clone(), at(0))
            .unwrap()
    };
    // One cluster put again and again holds one payload in the segment.
    for _ in 0..10 {
        put("a");
    }
    assert_eq!(segment_now(), Some(0));
    // Plain puts do not count.
    store.put("plain", payload.clone(), at(0)).unwrap();
    put("b");
    assert_eq!(segment_now(), Some(0));
    put("c");
    assert_eq!(lock(&shared.journal).packed_bytes, 3 * payload.len() as u64);
    // Three payloads' worth: the next put starts a new segment, and the checkpointer writes
    // the full one's files.
    put("d");
    assert_eq!(segment_now(), Some(1));
    assert_eq!(lock(&shared.journal).packed_bytes, payload.len() as u64);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while journal::list(store.dir()).unwrap() != [1] {
        assert!(
            std::time::Instant::now() < deadline,
            "segment 0 not checkpointed"
        );
        thread::sleep(Duration::from_millis(5));
    }
    for id in ["a", "b", "c", "d"] {
        assert_eq!(store.get(id).unwrap().unwrap().payload, payload, "{id}");
    }
    assert!(fs::read(file_of(&store, "c")).unwrap().ends_with(&payload));
}

/// The records of every segment as a fresh replay reads them from disk now, while other threads
/// may be appending: a record cut short at the tail ends the replay, as it would on open.
fn replayed_now(dir: &Path) -> Vec<(u8, String, Vec<u8>)> {
    let mut records = Vec::new();
    for number in journal::list(dir).unwrap() {
        journal::replay(&dir.join(format!("{}{number}", journal::PREFIX)), |r| {
            records.push((r.kind, r.header.cluster_id, r.payload));
            Ok(())
        })
        .unwrap();
    }
    records
}

/// A request for `commit` straight from a test, and the receiver of its answer.
fn commit_request(
    cluster_id: &str,
    payload: &[u8],
) -> (Request, handoff::ReplyReceiver<Result<Outcome, StoreError>>) {
    let (reply, answer) = handoff::oneshot();
    let received_millis = telemeter_common::time::unix_millis(at(0));
    let request = Request {
        cluster_id: cluster_id.to_string(),
        payload: payload.to_vec(),
        packed: None,
        serve: true,
        ship: Ship::Served,
        received_millis,
        newest_sample_ms: received_millis as i64,
        newest_received_ms: i64::MIN,
        patch: None,
        mode: Mode::Replace,
        condition: commit::Condition::Always,
        reply: Answer::Wait(reply),
    };
    (request, answer)
}

/// Waits (at most 10 s) for `answer` on another thread, so a request nobody commits fails the
/// test instead of hanging it.
fn answer_within_10s(
    answer: handoff::ReplyReceiver<Result<Outcome, StoreError>>,
) -> Option<Result<bool, StoreError>> {
    let (tx, rx) = crossbeam_channel::bounded(1);
    thread::spawn(move || {
        let _ = tx.send(answer.recv().map(|r| r.map(Outcome::written)));
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("no answer within 10 s")
}

#[test]
fn every_concurrent_put_is_in_the_journal_when_it_is_answered() {
    // Callers that find the journal idle commit on their own threads, the others queue for the
    // committer thread: either way an Ok means a fresh replay of the segments on disk finds the
    // record, with the payload that caller put. (Each thread has its own clusters: of two puts of
    // one cluster in one batch only the later is written, and the earlier is answered Ok.)
    let dir = TempDir::new("leader");
    let store = open(&dir);
    const THREADS: usize = 8;
    const PUTS: usize = 20;
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let store = store.clone();
            thread::spawn(move || {
                for n in 0..PUTS {
                    let cluster = format!("c{t}-{}", n % 3);
                    let payload = format!("{t}/{n}").into_bytes();
                    store.put(&cluster, payload.clone(), at(0)).unwrap();
                    let replayed = replayed_now(store.dir());
                    assert!(
                        replayed.iter().any(|(kind, c, p)| *kind == journal::PUT
                            && *c == cluster
                            && *p == payload),
                        "{cluster} {t}/{n} answered Ok but not in the journal"
                    );
                }
            })
        })
        .collect();
    for worker in workers {
        worker.join().unwrap();
    }
    let stats = store.stats();
    assert_eq!(stats.writes, (THREADS * PUTS) as u64);
    assert!(
        stats.commits >= 1 && stats.commits <= stats.writes,
        "{stats:?}"
    );
    drop(store);
    // And a restart serves, per cluster, one of the payloads put last by some thread.
    let store = open(&dir);
    assert_eq!(store.clusters().len(), THREADS * 3);
}

#[test]
fn a_put_alone_commits_on_its_callers_thread() {
    let dir = TempDir::new("alone");
    let store = open(&dir);
    // A queue no committer thread serves: only a commit on the caller's thread can answer.
    let queue = Queue::new(8);
    let (request, answer) = commit_request("c", b"mine");
    queue.submit(&store.handle.shared, request).unwrap();
    assert_eq!(answer_within_10s(answer).map(|r| r.ok()), Some(Some(true)));
    assert_eq!(store.get("c").unwrap().unwrap().payload, b"mine");
    assert!(replayed_now(store.dir())
        .iter()
        .any(|(_, c, p)| c == "c" && p == b"mine"));
    queue.close();
    let (request, _answer) = commit_request("c", b"late");
    assert!(matches!(
        queue.submit(&store.handle.shared, request),
        Err(StoreError::Closed)
    ));
}

#[test]
fn puts_during_a_commit_queue_and_share_the_next_one() {
    let dir = TempDir::new("queued");
    let store = open(&dir);
    let shared = Arc::clone(&store.handle.shared);
    let queue = Arc::clone(&store.handle.queue);
    // Holding the journal stops the first put inside its own commit, after it took the permit.
    let journal_held = lock(&shared.journal);
    let first = {
        let store = store.clone();
        thread::spawn(move || store.put("first", b"1".to_vec(), at(0)))
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !queue.committing() {
        assert!(
            std::time::Instant::now() < deadline,
            "the first put never started committing"
        );
        thread::sleep(Duration::from_millis(1));
    }
    // These must queue, not commit: a commit here would wait for the journal held above, so
    // they are submitted from another thread and must all return within the bound.
    let submitted = {
        let (shared, queue) = (Arc::clone(&shared), Arc::clone(&queue));
        let (tx, rx) = crossbeam_channel::bounded(1);
        thread::spawn(move || {
            let answers: Vec<_> = (0..8)
                .map(|i| {
                    let (request, answer) =
                        commit_request(&format!("q{i}"), format!("{i}").as_bytes());
                    queue.submit(&shared, request).map(|()| answer)
                })
                .collect();
            let _ = tx.send(answers);
        });
        rx.recv_timeout(Duration::from_secs(10))
            .expect("a put during a commit did not queue")
    };
    assert_eq!(store.stats().commits, 0);
    drop(journal_held);
    first.join().unwrap().unwrap();
    for answer in submitted {
        let answer = answer.unwrap();
        assert_eq!(answer_within_10s(answer).map(|r| r.ok()), Some(Some(true)));
    }
    // One commit for the first put, one for the eight queued behind it.
    let stats = store.stats();
    assert_eq!((stats.commits, stats.writes), (2, 9), "{stats:?}");
    for i in 0..8 {
        assert_eq!(
            store.get(&format!("q{i}")).unwrap().unwrap().payload,
            format!("{i}").into_bytes()
        );
    }
}

/// Now in milliseconds: the newest sample of the test payloads (which hold no series).
fn now_ms() -> i64 {
    telemeter_common::time::unix_millis(SystemTime::now()) as i64
}

/// A payload edited in place `n` times: a few 4-byte ranges a time, as a remote-write merge
/// rewrites samples, each edit also given as a [`Patch`] of the store's version it was made over.
fn edit(payload: &mut [u8], n: usize, base_version: u64) -> Patch {
    let mut patch = Patch::new(base_version, payload.len());
    for k in 0..3 {
        let at = (n * 131 + k * 617) % (payload.len() - 4);
        let bytes = [(n % 256) as u8, k as u8, 0xaa, (n / 256) as u8];
        payload[at..at + 4].copy_from_slice(&bytes);
        patch.push(at as u32, &bytes);
    }
    patch
}

#[test]
fn patches_are_journaled_instead_of_images_and_a_crash_replays_them_to_what_was_served() {
    for segment_bytes in [journal::SEGMENT_BYTES, 3 * journal::PAGE, 1] {
        let dir = TempDir::new("patches");
        let mut payload: Vec<u8> = (0..2000u32).map(|i| (i % 251) as u8).collect();
        let mut n = 0;
        // Crashes after 1 request, around the image interval (16 patches after an image), and
        // further on; each session starts from what the previous one served.
        for requests in [1, 15, 16, 17, 18, 40] {
            let store = Store::open_checkpointing(config(&dir), false, false).unwrap();
            store
                .handle
                .shared
                .segment_bytes
                .store(segment_bytes, Ordering::Relaxed);
            if n == 0 {
                store
                    .put_merged("c", payload.clone(), Ship::Nothing, at(0), 7, None)
                    .unwrap();
            }
            for _ in 0..requests {
                n += 1;
                let base = store.version("c").unwrap();
                let patch = edit(&mut payload, n, base);
                let version = store
                    .put_patched(
                        "c",
                        patch,
                        || payload.clone(),
                        Ship::Nothing,
                        at(0),
                        now_ms(),
                        7 + n as i64,
                    )
                    .unwrap();
                assert_eq!(version, Committed::Current(store.version("c").unwrap()));
                assert_eq!(
                    store.get("c").unwrap().unwrap().payload,
                    payload,
                    "after {n}"
                );
            }
            // A crash: nothing checkpointed, the segments as they are.
            drop(store);
            let store = Store::open_checkpointing(config(&dir), false, false).unwrap();
            let upload = store.get("c").unwrap().unwrap();
            assert_eq!(
                upload.payload, payload,
                "replayed after {n} ({segment_bytes})"
            );
            assert_eq!(store.newest_received("c").unwrap(), Some(7 + n as i64));
        }
        let kinds: Vec<u8> = journal_records(&dir.0).iter().map(|r| r.0).collect();
        let patches = kinds.iter().filter(|&&k| k == journal::PATCH).count();
        if segment_bytes == 1 {
            // Every commit starts a segment: no chain can be extended.
            assert_eq!(patches, 0, "{kinds:?}");
        } else if segment_bytes == journal::SEGMENT_BYTES {
            // An image per 16 patches, and one per restart (a new segment).
            let images = kinds.len() - patches;
            assert!(images <= 6 + n / 16 + 1, "{kinds:?}");
            assert!(patches >= n - images, "{kinds:?}");
        } else {
            assert!(patches > 0 && patches < n, "{kinds:?}");
        }
        // A clean open checkpoints the chains into the cluster's file, which then serves it.
        let store = open(&dir);
        wait_for_checkpoints(&store);
        assert_eq!(store.get("c").unwrap().unwrap().payload, payload);
        drop(store);
        let store = open(&dir);
        assert_eq!(store.get("c").unwrap().unwrap().payload, payload);
    }
}

#[test]
fn in_one_batch_a_merge_and_an_upload_as_sent_never_erase_each_other() {
    let dir = TempDir::new("batch-conditions");
    // Shipping: a refused request must not even be journaled to ship.
    let store = Store::open_shipping(config(&dir)).unwrap();
    store.put("c", b"stored".to_vec(), at(0)).unwrap();
    let base = store.version("c");
    let records = journal_records(&dir.0).len();
    let shared = &store.handle.shared;
    // An upload (to replace, finding no remote write), then a merge made over the stored
    // payload: the merge would erase the upload.
    let (mut upload, uploaded) = commit_request("c", b"upload");
    upload.condition = commit::Condition::NoRemoteWrite;
    let (mut merge, merged) = commit_request("c", b"merged");
    merge.condition = commit::Condition::Version(base);
    merge.newest_received_ms = now_ms();
    commit::commit(shared, vec![upload, merge]);
    assert!(matches!(uploaded.recv(), Some(Ok(Outcome::Stored(_)))));
    assert!(matches!(merged.recv(), Some(Ok(Outcome::Moved))));
    assert_eq!(store.get("c").unwrap().unwrap().payload, b"upload");
    // The merge again, over the upload, then an upload that had found no remote write: it is
    // handed back, whole, to be merged.
    let (mut merge, merged) = commit_request("c", b"merged");
    merge.condition = commit::Condition::Version(store.version("c"));
    merge.newest_received_ms = now_ms();
    let (mut upload, uploaded) = commit_request("c", b"late upload");
    upload.condition = commit::Condition::NoRemoteWrite;
    commit::commit(shared, vec![merge, upload]);
    assert!(matches!(merged.recv(), Some(Ok(Outcome::Stored(_)))));
    match uploaded.recv() {
        Some(Err(StoreError::UsesRemoteWrite(returned))) => {
            assert_eq!(returned.cluster_id, "c");
            assert_eq!(returned.into_families().unwrap(), b"late upload");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(store.get("c").unwrap().unwrap().payload, b"merged");
    // Nothing journaled of either refused request, not even to ship: the upload and the merge.
    let kinds: Vec<(u8, Vec<u8>)> = journal_records(&dir.0)
        .into_iter()
        .skip(records)
        .map(|(kind, _, payload)| (kind, payload))
        .collect();
    assert_eq!(
        kinds,
        [
            (journal::PUT, b"upload".to_vec()),
            (journal::PUT, b"merged".to_vec())
        ]
    );
}

#[test]
fn a_merge_over_another_payload_than_the_stored_one_stores_nothing() {
    let dir = TempDir::new("patch-base");
    let store = open(&dir);
    let mut payload = vec![1u8; 500];
    store
        .put_merged("c", payload.clone(), Ship::Nothing, at(0), 1, None)
        .unwrap();
    let base = store.version("c").unwrap();
    // Another write comes between the merge's read and its put: neither the patch nor the
    // whole edited payload may erase it.
    store.put("c", vec![2u8; 500], at(0)).unwrap();
    let records = journal_records(&dir.0).len();
    let patch = edit(&mut payload, 1, base);
    let committed = store
        .put_patched(
            "c",
            patch,
            || payload.clone(),
            Ship::Nothing,
            at(0),
            now_ms(),
            2,
        )
        .unwrap();
    assert_eq!(committed, Committed::Moved);
    let whole = store
        .put_merged("c", payload.clone(), Ship::Nothing, at(0), 2, Some(base))
        .unwrap();
    assert_eq!(whole, Committed::Moved);
    assert_eq!(store.get("c").unwrap().unwrap().payload, vec![2u8; 500]);
    assert_eq!(journal_records(&dir.0).len(), records);
    // Over no payload, when the cluster has one now, neither.
    assert_eq!(
        store
            .put_merged("c", payload.clone(), Ship::Nothing, at(0), 2, None)
            .unwrap(),
        Committed::Moved
    );
    assert_eq!(store.get("c").unwrap().unwrap().payload, vec![2u8; 500]);
    // Over the stored payload, whole: stored.
    assert!(matches!(
        store
            .put_merged(
                "c",
                payload.clone(),
                Ship::Nothing,
                at(0),
                2,
                store.version("c")
            )
            .unwrap(),
        Committed::Current(_)
    ));
    assert_eq!(store.get("c").unwrap().unwrap().payload, payload);
    let kinds: Vec<u8> = journal_records(&dir.0).iter().map(|r| r.0).collect();
    assert!(!kinds.contains(&journal::PATCH), "{kinds:?}");
    // A patch past the payload's size in total is written whole as well.
    let mut big = Patch::new(store.version("c").unwrap(), 500);
    big.push(0, &[3u8; 500]);
    payload = vec![3u8; 500];
    store
        .put_patched(
            "c",
            big,
            || payload.clone(),
            Ship::Nothing,
            at(0),
            now_ms(),
            3,
        )
        .unwrap();
    let kinds: Vec<u8> = journal_records(&dir.0).iter().map(|r| r.0).collect();
    assert!(!kinds.contains(&journal::PATCH), "{kinds:?}");
    drop(store);
    assert_eq!(open(&dir).get("c").unwrap().unwrap().payload, payload);
}

#[test]
fn chained_payloads_past_the_budget_close_the_segment_so_pins_stay_bounded() {
    // A read of a chain holds the payload it rebuilds in memory (a `/federate` scrape pins every
    // cluster), so the chains a segment holds are bounded as packed payloads are.
    let dir = TempDir::new("chain-budget");
    let store = open(&dir);
    let shared = &store.handle.shared;
    let payloads: Vec<Vec<u8>> = (0..3u32)
        .map(|c| (0..2000u32).map(|i| ((i + c) % 251) as u8).collect())
        .collect();
    let len = payloads[0].len() as u64;
    lock(&shared.journal).chain_budget = 2 * len;
    let segment_now = || lock(&shared.journal).segment.as_ref().map(|s| s.number);
    let mut payloads = payloads;
    let mut n = 0;
    let mut patch = |store: &Store, id: &str, payload: &mut Vec<u8>| {
        n += 1;
        let base = store.version(id).unwrap();
        let edit = edit(payload, n, base);
        store
            .put_patched(
                id,
                edit,
                || payload.clone(),
                Ship::Nothing,
                at(0),
                now_ms(),
                7,
            )
            .unwrap();
    };
    for (id, payload) in ["a", "b", "c"].iter().zip(payloads.iter()) {
        store
            .put_merged(id, payload.clone(), Ship::Nothing, at(0), 7, None)
            .unwrap();
    }
    // Images are read from the segment file: they hold nothing.
    assert_eq!(lock(&shared.journal).chained_bytes, 0);
    // A chain of one cluster counts once, however long.
    for _ in 0..5 {
        patch(&store, "a", &mut payloads[0]);
    }
    assert_eq!(lock(&shared.journal).chained_bytes, len);
    patch(&store, "b", &mut payloads[1]);
    assert_eq!(lock(&shared.journal).chained_bytes, 2 * len);
    assert_eq!(segment_now(), Some(0));
    // At the budget: the next request starts a segment, where its cluster's chain starts over
    // with a whole image.
    patch(&store, "c", &mut payloads[2]);
    assert_eq!(segment_now(), Some(1));
    assert_eq!(lock(&shared.journal).chained_bytes, 0);
    for (id, payload) in ["a", "b", "c"].iter().zip(payloads.iter()) {
        assert_eq!(&store.get(id).unwrap().unwrap().payload, payload, "{id}");
    }
}

#[test]
fn packed_payloads_awaiting_their_checkpoint_past_the_budget_are_journaled_plain() {
    // Segments can close faster than the checkpointer writes their files, and every packed
    // payload in a segment not yet checkpointed is held in memory by a read that pins it (a
    // `/federate` scrape pins every cluster). Past the budget, uploads are journaled plain.
    let dir = TempDir::new("packed-unsettled");
    let store = Store::open_checkpointing(config(&dir), false, false).unwrap();
    let shared = &store.handle.shared;
    let (payload, frames) = packable(200, 0);
    let len = payload.len() as u64;
    // Every packed put closes its segment; none is checkpointed (a crashed checkpointer).
    lock(&shared.journal).packed_budget = 1;
    shared
        .packed_unsettled_budget
        .store(3 * len, Ordering::Relaxed);
    let encoding_of = |id: &str| match &lock(&shared.index).get(id).unwrap().location {
        Location::Journal { encoding, .. } => *encoding,
        other => panic!("{id} is at {other:?}"),
    };
    for id in ["a", "b", "c", "d", "e"] {
        store
            .put_unless_older_packed(id, payload.clone(), frames.clone(), at(0))
            .unwrap();
    }
    for id in ["a", "b", "c"] {
        assert!(matches!(encoding_of(id), Encoding::Packed { .. }), "{id}");
    }
    for id in ["d", "e"] {
        assert_eq!(encoding_of(id), Encoding::Plain, "{id}");
    }
    assert_eq!(shared.packed_unsettled.load(Ordering::Relaxed), 3 * len);
    for id in ["a", "b", "c", "d", "e"] {
        assert_eq!(store.get(id).unwrap().unwrap().payload, payload, "{id}");
    }
    drop(store);
    // Checkpoints settle what they write: a store whose checkpointer runs packs again.
    let store = open(&dir);
    let shared = &store.handle.shared;
    store
        .put_unless_older_packed("f", payload.clone(), frames.clone(), at(0))
        .unwrap();
    assert!(matches!(
        &lock(&shared.index).get("f").unwrap().location,
        Location::Journal {
            encoding: Encoding::Packed { .. },
            ..
        }
    ));
    for id in ["a", "b", "c", "d", "e", "f"] {
        assert_eq!(store.get(id).unwrap().unwrap().payload, payload, "{id}");
    }
}

/// A lent payload journaled packed is handed back to the caller untouched (the same buffer, for
/// its next upload), and read back whole; one that is not packed (no frames) is taken.
#[test]
fn a_lent_payload_comes_back_only_when_it_is_journaled_packed() {
    let dir = TempDir::new("lent");
    let store = open(&dir);
    let (payload, frames) = packable(300, 1_000);
    let newest = newest_sample_ms(&payload, 0);
    let mut lent = payload.clone();
    let buffer = lent.as_ptr();
    assert!(store
        .put_unchanged_lent("a", &mut lent, Some(frames), newest, at(0))
        .unwrap());
    assert_eq!((lent.as_ptr(), &lent), (buffer, &payload));
    assert_eq!(store.get("a").unwrap().unwrap().payload, payload);
    let mut plain = payload.clone();
    assert!(store
        .put_unchanged_lent("b", &mut plain, None, newest, at(0))
        .unwrap());
    assert_eq!(
        plain.capacity(),
        0,
        "stored plain, the payload is the store's"
    );
    assert_eq!(store.get("b").unwrap().unwrap().payload, payload);
}

/// An upload put without waiting is answered once, when it is durable (read back whole, and
/// the lent buffer handed back when journaled packed); a closed store answers `Closed` rather
/// than never.
#[test]
fn an_upload_put_without_waiting_is_answered_once_durable_and_a_closed_store_says_so() {
    let dir = TempDir::new("then");
    let store = open(&dir);
    let (payload, frames) = packable(300, 1_000);
    let newest = newest_sample_ms(&payload, 0);
    let (answered, answers) = crossbeam_channel::unbounded();
    let then = |answered: crossbeam_channel::Sender<Result<bool, StoreError>>| {
        Box::new(move |stored| answered.send(stored).unwrap())
    };
    let mut lent = payload.clone();
    store.put_unchanged_then(
        "a",
        &mut lent,
        Some(frames),
        newest,
        at(0),
        then(answered.clone()),
    );
    let stored = answers.recv_timeout(Duration::from_secs(10)).unwrap();
    assert!(stored.unwrap());
    assert_eq!(
        lent, payload,
        "journaled packed, the payload is handed back"
    );
    assert_eq!(store.get("a").unwrap().unwrap().payload, payload);

    store.close();
    let mut late = payload.clone();
    store.put_unchanged_then("b", &mut late, None, newest, at(0), then(answered));
    assert!(matches!(
        answers.recv_timeout(Duration::from_secs(10)).unwrap(),
        Err(StoreError::Closed)
    ));
    assert!(answers.try_recv().is_err(), "answered once");
}

/// A pin's bytes, `len` of them, read in ranges as `/federate` reads them: the whole, then a
/// part through the same buffer.
fn pinned_ranges(pinned: &PinnedUpload, len: usize) -> (Vec<u8>, Vec<u8>) {
    let mut buffer = Vec::new();
    let whole = pinned
        .read_range_reusing(0, len as u64, &mut buffer)
        .unwrap()
        .to_vec();
    let part = pinned
        .read_range_reusing(3, 10, &mut buffer)
        .unwrap()
        .to_vec();
    assert!(pinned
        .read_range_reusing(0, len as u64 + 1, &mut buffer)
        .is_err());
    (whole, part)
}

#[test]
fn a_mapped_pin_reads_its_version_after_its_segment_is_cut_and_deleted_and_its_file_replaced() {
    let dir = TempDir::new("mapped");
    let first = sampled(0);
    let newer = sampled(1);
    {
        // Shipping: the checkpoint cuts the segment's zeros written ahead before deleting it.
        let store = Store::open_shipping(config(&dir)).unwrap();
        store.put("a", first.clone(), at(0)).unwrap();
        let from_journal = store.get_pinned("a").unwrap().unwrap();
        assert!(from_journal.mapped());
        let segment = dir.0.join(format!("{}0", journal::PREFIX));
        let zeroed = fs::metadata(&segment).unwrap().len();
        checkpoint_now(&store);
        // Cut to its record (the zeros past it are gone) and moved aside for egress: the pin's
        // pages are all before the cut.
        let segment = dir
            .0
            .join(egress::EGRESS_DIR)
            .join(format!("{}0", journal::PREFIX));
        assert!(fs::metadata(&segment).unwrap().len() < zeroed);
        let (whole, part) = pinned_ranges(&from_journal, first.len());
        assert_eq!((whole, part), (first.clone(), first[3..10].to_vec()));
        fs::remove_file(&segment).unwrap();
        assert_eq!(pinned_ranges(&from_journal, first.len()).0, first);
        // Where mapping fails, the same bytes by `pread`.
        let unmapped = from_journal.without_mapping();
        assert!(!unmapped.mapped());
        let (whole, part) = pinned_ranges(&unmapped, first.len());
        assert_eq!((whole, part), (first.clone(), first[3..10].to_vec()));
        store.close();
    }
    let store = open(&dir);
    let from_file = store.get_pinned("a").unwrap().unwrap();
    assert!(from_file.mapped() && from_file.version().is_some());
    // Renamed over by a checkpoint of a newer upload, then removed: the pin holds the inode.
    store.put("a", newer.clone(), at(1)).unwrap();
    checkpoint_now(&store);
    assert!(file_of(&store, "a").exists());
    assert_eq!(store.get("a").unwrap().unwrap().payload, newer);
    store.remove("a").unwrap();
    let (whole, part) = pinned_ranges(&from_file, first.len());
    assert_eq!((whole, part), (first.clone(), first[3..10].to_vec()));
    let mut range = Vec::new();
    from_file.read_range(2, 9, &mut range).unwrap();
    assert_eq!(range, first[2..9]);
    // A lazy pin, as `/federate` takes, maps too.
    store.put("b", newer.clone(), at(2)).unwrap();
    checkpoint_now(&store);
    let lazily = store.get_pinned_lazily("b", None).unwrap().unwrap();
    assert!(lazily.mapped());
    assert_eq!(pinned_ranges(&lazily, newer.len()).0, newer);
    let unmapped = lazily.without_mapping();
    let (whole, part) = pinned_ranges(&unmapped, newer.len());
    assert_eq!((whole, part), (newer.clone(), newer[3..10].to_vec()));
}

/// Whether `cluster_id`'s index entry keeps a mapping of its file.
fn keeps_mapping(store: &Store, cluster_id: &str) -> bool {
    lock(&store.handle.shared.index)
        .get(cluster_id)
        .is_some_and(|entry| entry.location.mapped())
}

#[test]
fn the_records_of_a_segment_are_pinned_through_one_mapping_of_it() {
    let dir = TempDir::new("segment-mapping");
    let store = open(&dir);
    let (first, second) = (sampled(0), sampled(1));
    store.put("a", first.clone(), at(0)).unwrap();
    store.put("b", second.clone(), at(1)).unwrap();
    let a = store.get_pinned("a").unwrap().unwrap();
    let b = store.get_pinned("b").unwrap().unwrap();
    assert!(a.shares_mapping_with(&b), "one mapping for the segment");
    assert_eq!(pinned_ranges(&a, first.len()).0, first);
    assert_eq!(pinned_ranges(&b, second.len()).0, second);
    // Still read through it once the segment is checkpointed and deleted.
    checkpoint_now(&store);
    assert!(file_of(&store, "a").exists());
    let (whole, part) = pinned_ranges(&b, second.len());
    assert_eq!((whole, part), (second.clone(), second[3..10].to_vec()));
}

#[test]
fn a_segment_that_could_not_be_mapped_is_mapped_by_a_later_pin() {
    let dir = TempDir::new("segment-mapping-retry");
    let store = open(&dir);
    let (first, second) = (sampled(0), sampled(1));
    store.put("a", first.clone(), at(0)).unwrap();
    store.put("b", second.clone(), at(1)).unwrap();
    // No mapping to be had (as past MAX_MAPPINGS): read by `pread`.
    read::REFUSE_MAPPINGS.with(|refuse| refuse.set(true));
    let unmapped = store.get_pinned("a").unwrap().unwrap();
    read::REFUSE_MAPPINGS.with(|refuse| refuse.set(false));
    assert!(!unmapped.mapped());
    assert_eq!(pinned_ranges(&unmapped, first.len()).0, first);
    // Mappings to be had again: the segment is mapped whole, once, for the pins of both records.
    let a = store.get_pinned("a").unwrap().unwrap();
    let b = store.get_pinned("b").unwrap().unwrap();
    assert!(
        a.shares_mapping_with(&b),
        "the segment was not mapped again"
    );
    assert_eq!(pinned_ranges(&b, second.len()).0, second);
}

#[test]
fn a_verified_files_mapping_is_kept_for_later_pins_until_the_file_is_replaced_or_removed() {
    let dir = TempDir::new("kept-mapping");
    let store = open(&dir);
    let (first, newer) = (sampled(0), sampled(1));
    store.put("a", first.clone(), at(0)).unwrap();
    checkpoint_now(&store);
    assert!(!keeps_mapping(&store, "a"));
    // The first pin of the file verifies it and leaves its mapping with the index entry.
    let verified = store.get_pinned_lazily("a", None).unwrap().unwrap();
    assert!(keeps_mapping(&store, "a"));
    let version = verified.version();
    assert!(version.is_some());
    // A later pin of the same payload, by a caller that knows it, reads through that mapping
    // without opening the file; one that does not know the payload maps and verifies anew.
    let later = store.get_pinned_lazily("a", version).unwrap().unwrap();
    assert!(later.shares_mapping_with(&verified));
    assert_eq!(later.version(), version);
    assert_eq!(later.upload.cluster_id, "a");
    let (whole, part) = pinned_ranges(&later, first.len());
    assert_eq!((whole, part), (first.clone(), first[3..10].to_vec()));
    let unknown = store.get_pinned_lazily("a", None).unwrap().unwrap();
    assert!(!unknown.shares_mapping_with(&verified));
    assert_eq!(pinned_ranges(&unknown, first.len()).0, first);

    // A newer upload: the entry lets the mapping go (the pins keep theirs).
    store.put("a", newer.clone(), at(1)).unwrap();
    assert!(!keeps_mapping(&store, "a"));
    let from_journal = store.get_pinned_lazily("a", version).unwrap().unwrap();
    assert_ne!(from_journal.version(), version);
    assert_eq!(pinned_ranges(&from_journal, newer.len()).0, newer);
    assert_eq!(pinned_ranges(&later, first.len()).0, first);
    // Its file, once checkpointed and pinned, is kept mapped in turn; removed, it is served no
    // more, and the pins taken before still read their bytes.
    checkpoint_now(&store);
    let newer_version = from_journal.version();
    let first_pin = store
        .get_pinned_lazily("a", newer_version)
        .unwrap()
        .unwrap();
    assert!(keeps_mapping(&store, "a"));
    let second_pin = store
        .get_pinned_lazily("a", newer_version)
        .unwrap()
        .unwrap();
    assert!(second_pin.shares_mapping_with(&first_pin));
    store.remove("a").unwrap();
    assert!(store
        .get_pinned_lazily("a", newer_version)
        .unwrap()
        .is_none());
    assert_eq!(pinned_ranges(&second_pin, newer.len()).0, newer);
}

/// Hands the current journal segment to the checkpointer thread, as a full one is.
fn retire_now(store: &Store) {
    let shared = &store.handle.shared;
    let mut journal = lock(&shared.journal);
    let segment = journal.segment.take().unwrap();
    journal.retired.as_ref().unwrap().send(segment).unwrap();
}

#[test]
fn a_payload_keeps_its_pin_version_from_the_journal_to_its_file_and_no_longer() {
    let dir = TempDir::new("pin-version");
    let first = b"\x05first".to_vec();
    let store = open(&dir);
    store.put("a", first.clone(), at(0)).unwrap();
    let from_journal = store.get_pinned("a").unwrap().unwrap();
    let version = from_journal.version();
    assert!(version.is_some());
    checkpoint_now(&store);
    assert!(file_of(&store, "a").exists());
    // Same payload, another place: the same version, whether read or pinned lazily (verified
    // streaming, its payload not kept, since the caller knows it).
    let from_file = store.get_pinned("a").unwrap().unwrap();
    assert_eq!(from_file.version(), version);
    assert_eq!(from_file.upload.payload, first);
    checkpoint_now(&store);
    store.put("b", first.clone(), at(0)).unwrap();
    checkpoint_now(&store);
    let lazily = store.get_pinned_lazily("b", None).unwrap().unwrap();
    assert!(lazily.payload_read(), "an unknown, unverified file is read");
    // A newer put of the very same bytes is another version.
    store.put("a", first.clone(), at(1)).unwrap();
    let newer = store.get_pinned("a").unwrap().unwrap().version();
    assert!(newer.is_some() && newer != version);
    // Removed, then put again: another version.
    store.remove("a").unwrap();
    assert!(store.get_pinned("a").unwrap().is_none());
    store.put("a", first.clone(), at(1)).unwrap();
    let again = store.get_pinned("a").unwrap().unwrap().version();
    assert!(again.is_some() && again != newer && again != version);
    // A restart numbers versions from 0 again: the store's identity tells them apart.
    let before_restart = store.get_pinned("b").unwrap().unwrap().version();
    store.close();
    drop(store);
    let store = open(&dir);
    let after = store.get_pinned("b").unwrap().unwrap();
    assert!(after.version().is_some() && after.version() != before_restart);
    assert_eq!(after.upload.payload, first);
}

#[test]
fn a_lazy_pin_of_a_known_journal_record_or_file_reads_no_payload_and_an_unknown_one_does() {
    let dir = TempDir::new("lazy-known");
    let payload = b"\x05hello\x03abc".to_vec();
    let store = open(&dir);
    store.put("a", payload.clone(), at(0)).unwrap();
    let read = store.get_pinned_lazily("a", None).unwrap().unwrap();
    assert!(read.payload_read());
    assert_eq!(read.upload.payload, payload);
    let version = read.version();
    let lazy = store.get_pinned_lazily("a", version).unwrap().unwrap();
    assert!(!lazy.payload_read() && lazy.upload.payload.is_empty());
    assert_eq!(lazy.version(), version);
    assert_eq!(lazy.payload_len(), payload.len() as u64);
    assert_eq!(lazy.upload.received, read.upload.received);
    assert_eq!(pinned_ranges(&lazy, payload.len()).0, payload);
    // After the checkpoint: the unverified file is verified (not kept), then trusted.
    checkpoint_now(&store);
    let verifying = store.get_pinned_lazily("a", version).unwrap().unwrap();
    assert!(!verifying.payload_read());
    assert_eq!(verifying.version(), version);
    assert_eq!(pinned_ranges(&verifying, payload.len()).0, payload);
    let trusted = store.get_pinned_lazily("a", version).unwrap().unwrap();
    assert!(!trusted.payload_read());
    assert_eq!(pinned_ranges(&trusted, payload.len()).0, payload);
    // A newer put: the version the caller knows is stale, so the payload is read.
    let newer = b"\x06hello!".to_vec();
    store.put("a", newer.clone(), at(1)).unwrap();
    let stale = store.get_pinned_lazily("a", version).unwrap().unwrap();
    assert!(stale.payload_read());
    assert_eq!(stale.upload.payload, newer);
    assert_ne!(stale.version(), version);
}

#[test]
fn a_known_but_unverified_file_that_is_damaged_is_set_aside_not_pinned() {
    let dir = TempDir::new("lazy-damaged");
    let payload = b"\x05hello\x03abc".to_vec();
    let store = open(&dir);
    store.put("a", payload.clone(), at(0)).unwrap();
    let version = store.get_pinned("a").unwrap().unwrap().version();
    checkpoint_now(&store);
    // One payload byte flipped in place (same inode, same lengths): only its checksum tells.
    let path = file_of(&store, "a");
    let mut bytes = fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    {
        use std::io::{Seek, Write};
        let mut out = File::options().write(true).open(&path).unwrap();
        out.seek(io::SeekFrom::Start(0)).unwrap();
        out.write_all(&bytes).unwrap();
    }
    assert!(store.get_pinned_lazily("a", version).unwrap().is_none());
    assert!(!path.exists());
}

#[test]
fn the_checkpointer_waits_for_a_scrape_in_progress_but_no_longer_than_its_bound() {
    let dir = TempDir::new("yield");
    let store = open(&dir);
    store
        .handle
        .shared
        .max_yield_ms
        .store(600, Ordering::Relaxed);
    // Past the packed budget too, as every bulk load is (packing has stopped then anyway).
    store
        .handle
        .shared
        .packed_unsettled_budget
        .store(0, Ordering::Relaxed);
    store.put("a", b"\x05first".to_vec(), at(0)).unwrap();
    // Yields while the scrape runs, and goes on as soon as it ends.
    let scrape = store.scrape();
    retire_now(&store);
    thread::sleep(Duration::from_millis(200));
    assert!(!file_of(&store, "a").exists());
    drop(scrape);
    wait_for_checkpoints(&store);
    assert!(file_of(&store, "a").exists());
    let yielded = store.stats().checkpoint_yielded_micros;
    assert!(yielded >= 150_000, "{yielded}");
    // A scrape that never ends holds the checkpoint back by the bound, no more.
    store.put("b", b"\x05first".to_vec(), at(0)).unwrap();
    let scrape = store.scrape();
    let started = std::time::Instant::now();
    retire_now(&store);
    wait_for_checkpoints(&store);
    let took = started.elapsed();
    assert!(file_of(&store, "b").exists());
    assert!(took >= Duration::from_millis(550), "{took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    let total = store.stats().checkpoint_yielded_micros - yielded;
    assert!((550_000..=700_000).contains(&total), "{total}");
    // Closing does not wait for it at all.
    store.put("c", b"\x05first".to_vec(), at(0)).unwrap();
    let started = std::time::Instant::now();
    store.close();
    assert!(started.elapsed() < Duration::from_millis(500));
    assert!(file_of(&store, "c").exists());
    drop(scrape);
}

#[test]
fn a_put_committed_while_a_removal_unlinks_the_old_file_is_kept() {
    let dir = TempDir::new("remove-race");
    let store = open(&dir);
    store.put("a", b"old".to_vec(), at(0)).unwrap();
    checkpoint_now(&store);
    assert!(file_of(&store, "a").exists());
    // Between the removal record and the unlink of the old file, a put is committed and
    // acknowledged: it must outlive the removal, which came before it.
    put_while_stopped_at(&store, "removal recorded", |store| store.remove("a")).unwrap();
    let read = |store: &Store| store.get("a").unwrap().map(|upload| upload.payload);
    assert_eq!(
        read(&store),
        Some(b"new".to_vec()),
        "an acknowledged put was lost"
    );
    checkpoint_now(&store);
    assert_eq!(read(&store), Some(b"new".to_vec()));
    store.close();
    drop(store);
    assert_eq!(read(&open(&dir)), Some(b"new".to_vec()));
}

/// Runs `op` on another thread, stopped where the store reaches `point`
/// ([`Shared::pause_at`]); there, a put of "new" for cluster "a" is committed and acknowledged,
/// then `op` goes on. Returns what `op` returned.
fn put_while_stopped_at<T: Send + 'static>(
    store: &Store,
    point: &'static str,
    op: impl FnOnce(&Store) -> T + Send + 'static,
) -> T {
    let (stopped, go_on) = store.pause_once_at(point);
    let thread = {
        let store = store.clone();
        std::thread::spawn(move || op(&store))
    };
    stopped.recv().unwrap();
    store.put("a", b"new".to_vec(), at(1)).unwrap();
    go_on.send(()).unwrap();
    let result = thread.join().unwrap();
    *lock(&store.handle.shared.pause) = None;
    result
}

/// Flips one bit of the payload of the cluster file at `path`: its checksum no longer holds.
fn damage_payload(path: &Path) {
    let mut bytes = fs::read(path).unwrap();
    let middle = bytes.len() - 150;
    bytes[middle] ^= 0x01;
    fs::write(path, &bytes).unwrap();
}

#[test]
fn a_put_committed_while_a_corrupt_file_is_set_aside_is_kept() {
    let dir = TempDir::new("corrupt-race");
    {
        let store = open(&dir);
        store.put("a", vec![7u8; 300], at(0)).unwrap();
        store.close();
    }
    damage_payload(&dir.0.join(file::file_name("a")));
    let store = open(&dir);
    // Between finding the file corrupt and setting it aside, a put is committed and
    // acknowledged: the file goes, the put stays.
    let read = put_while_stopped_at(&store, "corrupt file found", |store| store.get("a"));
    assert_eq!(read.unwrap(), None, "the corrupt file was served");
    assert_eq!(store.stats().corrupt_files, 1);
    let read = |store: &Store| store.get("a").unwrap().map(|upload| upload.payload);
    assert_eq!(
        read(&store),
        Some(b"new".to_vec()),
        "an acknowledged put was lost"
    );
    checkpoint_now(&store);
    store.close();
    drop(store);
    assert_eq!(read(&open(&dir)), Some(b"new".to_vec()));
}

#[test]
fn a_segment_that_could_not_be_removed_keeps_every_later_one_for_the_replay() {
    let dir = TempDir::new("retire-fails");
    let store = open(&dir);
    // Kept packed (as an unchanged upload is): what reads of it hold counts until settled.
    let older = b"older".to_vec();
    let frames = telemeter_common::snappy::encode_framed(&older);
    store
        .put_unless_older_packed("a", older, frames, at(0))
        .unwrap();
    assert!(store.handle.shared.packed_unsettled.load(Ordering::Relaxed) > 0);
    // The segment cannot be removed once checkpointed: a directory stands at its path (root
    // ignores permissions); the store still reads it through its open descriptor.
    let number = lock(&store.handle.shared.journal)
        .segment
        .as_ref()
        .map(|segment| segment.number)
        .unwrap();
    let segment = store.dir().join(format!("{}{number}", journal::PREFIX));
    let aside = store.dir().join("aside");
    fs::rename(&segment, &aside).unwrap();
    fs::create_dir(&segment).unwrap();
    retire_now(&store);
    store.put("a", b"newer".to_vec(), at(1)).unwrap();
    retire_now(&store);
    store.close();
    // Its files are written all the same: the journal may pack again.
    assert_eq!(
        store.handle.shared.packed_unsettled.load(Ordering::Relaxed),
        0
    );
    drop(store);
    // The first segment stayed (as a failed unlink leaves it): the next start replays it, and
    // must replay the later one after it, which holds the newer upload.
    fs::remove_dir(&segment).unwrap();
    fs::rename(&aside, &segment).unwrap();
    let store = open(&dir);
    assert_eq!(
        store.get("a").unwrap().map(|upload| upload.payload),
        Some(b"newer".to_vec()),
        "an older upload was replayed over a newer one"
    );
}

#[test]
fn a_removal_asked_at_a_time_leaves_an_upload_received_after_it() {
    let dir = TempDir::new("remove-if-received");
    let store = open(&dir);
    store.put("a", b"later".to_vec(), at(1_000)).unwrap();
    // Asked before the upload was received (a removal sent again: a replay): nothing removed.
    assert!(!store.remove_if_received_by("a", at(0)).unwrap());
    assert_eq!(store.get("a").unwrap().unwrap().payload, b"later");
    // Asked at or after it: removed.
    assert!(store.remove_if_received_by("a", at(1_000)).unwrap());
    assert!(store.get("a").unwrap().is_none());
    assert!(!store.remove_if_received_by("a", at(2_000)).unwrap());
}

#[test]
fn a_removal_for_one_version_leaves_a_newer_upload() {
    let dir = TempDir::new("remove-if-version");
    let store = open(&dir);
    store.put("a", b"handed off".to_vec(), at(0)).unwrap();
    checkpoint_now(&store);
    let handed_off = store.version("a").unwrap();
    // A newer upload lands while the handoff sends the older one to its owner.
    store.put("a", b"newer".to_vec(), at(1)).unwrap();
    assert!(!store.remove_if_version("a", handed_off).unwrap());
    let read = |store: &Store| store.get("a").unwrap().map(|upload| upload.payload);
    assert_eq!(read(&store), Some(b"newer".to_vec()));
    // The version handed off is removed, as `remove` does.
    let newer = store.version("a").unwrap();
    assert!(store.remove_if_version("a", newer).unwrap());
    assert_eq!(read(&store), None);
    assert!(!file_of(&store, "a").exists());
    assert!(!store.remove_if_version("a", newer).unwrap());
    store.close();
    drop(store);
    assert_eq!(read(&open(&dir)), None, "the removal did not last");
}
