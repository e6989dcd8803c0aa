//! The store's format across versions: a storage directory written before the journal kept
//! uploads packed (snappy framed as they arrived, issue #20) opens and serves the same families,
//! and what the new server journals packed survives a crash and a checkpoint.
//!
//! `tests/fixtures/store-before-packed/` was written by the server of commit `46714a0` (plain
//! version 2 journal records, version 2 cluster files) with `write_the_old_format_fixture` below:
//! `filed` and `replaced` pushed then a clean stop (their cluster files), then `replaced` pushed
//! again and `journaled` pushed, then SIGKILL (both left in `journal-1` only). `federate.txt` is
//! what that server's `/federate` served from that directory.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

/// The samples are as old as the fixture: served while they are younger than this.
const TTL: &str = "36500d";

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/store-before-packed")
}

fn args<'a>(tokens: &'a Path, key: &'a Path) -> [&'a str; 8] {
    [
        "--tokens-file",
        tokens.to_str().unwrap(),
        "--shared-key",
        key.to_str().unwrap(),
        "--ratelimit",
        "0s",
        "--ttl",
        TTL,
    ]
}

/// `from`'s files (not the lock) copied into `to`.
fn copy_store(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        if name == ".lock" || !entry.file_type().unwrap().is_file() {
            continue;
        }
        fs::copy(entry.path(), to.join(&name)).unwrap();
    }
}

/// The series lines of a `/federate` text, sorted.
fn sorted_series(text: &str) -> Vec<String> {
    let mut lines: Vec<String> = series_lines(text).into_iter().map(str::to_string).collect();
    lines.sort();
    lines
}

/// Names of the journal segments in `dir`.
fn segments(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("journal-"))
        .collect();
    names.sort();
    names
}

#[test]
fn a_store_written_before_packed_records_opens_and_serves_the_same_families() {
    let dir = TempDir::new("store-format-old");
    let tokens = dir.file("tokens", TOKENS);
    let key = dir.file("key", "a shared key of at least thirty-two bytes........");
    let storage = dir.path().join("data");
    copy_store(&fixture().join("data"), &storage);
    let want = sorted_series(&fs::read_to_string(fixture().join("federate.txt")).unwrap());
    // Two clusters' files, two clusters' uploads in the old journal (one of them newer than its
    // file): the fixture is what it says.
    assert_eq!(segments(&storage).len(), 1);
    assert_eq!(
        want.iter().filter(|l| l.contains("_id=\"filed\"")).count(),
        4
    );
    assert_eq!(
        want.iter()
            .filter(|l| l.contains("_id=\"replaced\""))
            .count(),
        5
    );
    assert_eq!(
        want.iter()
            .filter(|l| l.contains("_id=\"journaled\""))
            .count(),
        6
    );

    let mut server = ServerProcess::start(&storage, &args(&tokens, &key));
    assert_eq!(sorted_series(&server.federate()), want);
    // Once the checkpointer has written the old segment's files, the same.
    assert!(
        wait_until(Duration::from_secs(20), || segments(&storage).is_empty()),
        "the replayed segment was never checkpointed"
    );
    assert_eq!(sorted_series(&server.federate()), want);

    // A push now is journaled packed next to the old files; it survives a crash.
    let token = server.upload_token("wild", "journaled");
    let pushed = families(Some("journaled"), 2, now_ms());
    assert_eq!(server.upload(&token, &pushed).status, 200);
    server.signal_and_wait(Signal::Kill);
    let server = ServerProcess::start(&storage, &args(&tokens, &key));
    let served = sorted_series(&server.federate());
    let others: Vec<&String> = want
        .iter()
        .filter(|l| !l.contains("_id=\"journaled\""))
        .collect();
    assert_eq!(
        served
            .iter()
            .filter(|l| !l.contains("_id=\"journaled\""))
            .collect::<Vec<_>>(),
        others
    );
    assert_eq!(
        served
            .iter()
            .filter(|l| l.contains("_id=\"journaled\""))
            .count(),
        3,
        "{served:?}"
    );
}

#[test]
fn packed_uploads_are_journaled_as_they_arrived_and_survive_a_crash() {
    let dir = TempDir::new("store-format-packed");
    let tokens = dir.file("tokens", TOKENS);
    let key = dir.file("key", "a shared key of at least thirty-two bytes........");
    let storage = dir.path().join("data");
    let mut server = ServerProcess::start(&storage, &args(&tokens, &key));
    let token = server.upload_token("secret", "test");
    let pushed = families(Some("test"), 300, now_ms());
    let body =
        telemeter_common::snappy::encode_framed(&telemeter_common::delimited::encode(&pushed));
    let reply = post(
        &server.url("/upload"),
        &[
            ("Authorization", &format!("Bearer {token}")),
            ("Content-Type", telemeter_common::media::PROTO_DELIMITED),
            ("Content-Encoding", "snappy"),
        ],
        &body,
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    let before = sorted_series(&server.federate());
    assert_eq!(before.len(), 301);
    // The journal holds the body as it was sent.
    let journal = fs::read(storage.join("journal-0")).unwrap();
    assert!(
        journal.windows(body.len()).any(|w| w == body.as_slice()),
        "the snappy frames are not in the journal"
    );
    server.signal_and_wait(Signal::Kill);

    let mut server = ServerProcess::start(&storage, &args(&tokens, &key));
    assert_eq!(sorted_series(&server.federate()), before);
    // A clean stop checkpoints: the cluster file is plain, and served the same.
    server.signal_and_wait(Signal::Term);
    assert!(segments(&storage).is_empty());
    let server = ServerProcess::start(&storage, &args(&tokens, &key));
    assert_eq!(sorted_series(&server.federate()), before);
}

/// Writes the fixture with the server named by `TELEMETER_SERVER_BIN` (the old one) into
/// `FIXTURE_OUT`: `TELEMETER_SERVER_BIN=… FIXTURE_OUT=… cargo test -p telemeter-server --test
/// store_format -- --ignored write_the_old_format_fixture`.
#[test]
#[ignore = "writes the checked-in fixture with an old server binary"]
fn write_the_old_format_fixture() {
    let out = PathBuf::from(std::env::var("FIXTURE_OUT").expect("FIXTURE_OUT"));
    let dir = TempDir::new("store-format-writer");
    let tokens = dir.file("tokens", TOKENS);
    let key = dir.file("key", "a shared key of at least thirty-two bytes........");
    let storage = dir.path().join("data");
    let ts = now_ms();
    let push = |server: &ServerProcess, id: &str, n: usize, ts: i64| {
        let token = server.upload_token("wild", id);
        let reply = server.upload(&token, &families(Some(id), n, ts));
        assert_eq!(reply.status, 200, "{}", reply.body);
    };
    let mut server = ServerProcess::start(&storage, &args(&tokens, &key));
    push(&server, "filed", 3, ts);
    push(&server, "replaced", 7, ts);
    server.signal_and_wait(Signal::Term);
    let mut server = ServerProcess::start(&storage, &args(&tokens, &key));
    push(&server, "replaced", 4, ts + 1000);
    push(&server, "journaled", 5, ts + 1000);
    server.signal_and_wait(Signal::Kill);
    let _ = fs::remove_dir_all(&out);
    copy_store(&storage, &out.join("data"));
    let server = ServerProcess::start(&storage, &args(&tokens, &key));
    fs::write(out.join("federate.txt"), server.federate()).unwrap();
}
