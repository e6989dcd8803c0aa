//! The store survives a crash: upload, SIGKILL, restart on the same directory, series still served.

mod common;

use common::*;

#[test]
fn uploads_survive_sigkill_and_restart() {
    let dir = TempDir::new("durable");
    let setup = ServerProcess::setup(&dir).key("a shared key of at least thirty-two bytes........");

    let mut first = setup.start();
    let token = first.upload_token("secret", "test");
    let r = first.upload(&token, &families(Some("test"), 20, now_ms()));
    assert_eq!(r.status, 200, "{}", r.body);
    // 200 means durable: no graceful shutdown gets a chance to flush anything.
    first.signal_and_wait(Signal::Kill);

    let second = setup.start();
    let text = second.federate();
    let lines = series_lines(&text);
    assert_eq!(lines.len(), 21, "{text}");
    assert!(lines.iter().all(|l| l.contains("_id=\"test\"")));
    // The token signed before the crash still verifies (same shared key).
    let r = second.upload(&token, &families(Some("test"), 2, now_ms()));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(series_lines(&second.federate()).len(), 3);
}

#[test]
fn a_second_server_on_the_same_directory_refuses_to_start() {
    let dir = TempDir::new("locked");
    let storage = dir.path().join("data");
    let _first = ServerProcess::start(&storage, &["--insecure-accept-any-token"]);
    let (status, stderr) = ServerProcess::run_failing(&storage, &["--insecure-accept-any-token"]);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("--storage-path"), "{stderr}");
}

/// The cluster file (in `storage`) whose header names `id`.
fn cluster_file(storage: &std::path::Path, id: &str) -> std::path::PathBuf {
    let needle = id.as_bytes();
    std::fs::read_dir(storage)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.len() == 64 && n.bytes().all(|b| b.is_ascii_hexdigit()))
        })
        .find(|p| {
            let bytes = std::fs::read(p).unwrap();
            bytes.windows(needle.len()).take(64).any(|w| w == needle)
        })
        .unwrap_or_else(|| panic!("no cluster file for {id} in {}", storage.display()))
}

#[test]
fn restart_removes_temp_files_and_sets_corrupt_files_aside() {
    let dir = TempDir::new("recovery");
    let setup = ServerProcess::setup(&dir).any_token();
    let storage = setup.storage_path();
    let mut first = setup.start();
    for id in ["good", "damaged"] {
        let token = first.upload_token("any", id);
        let r = first.upload(&token, &families(Some(id), 5, now_ms()));
        assert_eq!(r.status, 200, "{}", r.body);
    }
    // SIGTERM checkpoints the journal into the cluster files.
    assert!(first.signal_and_wait(Signal::Term).success());

    // A bit flipped in the payload of one file, and a checkpoint cut short by a crash.
    let damaged = cluster_file(storage, "damaged");
    let mut bytes = std::fs::read(&damaged).unwrap();
    *bytes.last_mut().unwrap() ^= 0x01;
    std::fs::write(&damaged, bytes).unwrap();
    let temp = storage.join(".tmp-999");
    std::fs::write(&temp, b"half a checkpoint").unwrap();

    let second = setup.start();
    let text = second.federate();
    let lines = series_lines(&text);
    assert_eq!(lines.len(), 6, "{text}");
    assert!(lines.iter().all(|l| l.contains("_id=\"good\"")), "{text}");
    assert!(!temp.exists(), "the temp file was left behind");
    assert!(!damaged.exists(), "the damaged file is still in place");
    let aside: Vec<_> = std::fs::read_dir(storage.join("corrupt"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    let name = damaged.file_name().unwrap().to_str().unwrap();
    assert!(
        aside.len() == 1 && aside[0].starts_with(name),
        "set aside: {aside:?}"
    );
    let metrics = get(&second.url_internal("/metrics"), &[]).body;
    assert_eq!(
        metric_value(&metrics, "telemeter_server_store_corrupt_files_total", &[]),
        1.0,
        "{metrics}"
    );
    // The damaged cluster can push again and is served again.
    let token = second.upload_token("any", "damaged");
    let r = second.upload(&token, &families(Some("damaged"), 1, now_ms()));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(series_lines(&second.federate()).len(), 8);
}

#[test]
fn clusters_not_pushed_for_the_ttl_are_no_longer_served_and_their_files_go() {
    let dir = TempDir::new("ttl");
    let setup = ServerProcess::setup(&dir)
        .any_token()
        .args(&["--ttl", "2s"]);
    let storage = setup.storage_path();
    let mut s = setup.start();
    let token = s.upload_token("any", "fleeting");
    let r = s.upload(&token, &families(Some("fleeting"), 3, now_ms()));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(series_lines(&s.federate()).len(), 4);

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let metrics = get(&s.url_internal("/metrics"), &[]).body;
        let expired = metric_value(&metrics, "telemeter_server_store_expired_total", &[]);
        if expired == 1.0 && series_lines(&s.federate()).is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not expired after 15 s: {expired} expired, federate: {}",
            s.federate()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // Gone from disk too, also after a restart (the removal is durable).
    assert!(s.signal_and_wait(Signal::Term).success());
    let files: Vec<_> = std::fs::read_dir(storage)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.len() == 64 || n.starts_with("journal-"))
        .collect();
    assert!(files.is_empty(), "left on disk: {files:?}");
    let again = setup.start();
    assert!(series_lines(&again.federate()).is_empty());
}

/// The TTL counts from the newest sample, as upstream meant it: a push of samples taken 20 minutes
/// ago is answered 200 but never served with `--ttl 10m`, also after a restart; and a push of
/// samples taken 6 s ago with `--ttl 12s` is served for about 6 s, not 12, then swept.
#[test]
fn the_ttl_counts_from_the_newest_sample() {
    let dir = TempDir::new("ttl-samples");
    let setup = ServerProcess::setup(&dir)
        .any_token()
        .args(&["--ttl", "10m"]);
    let mut s = setup.start();
    let late = s.upload_token("any", "late");
    let r = s.upload(&late, &families(Some("late"), 3, now_ms() - 20 * 60_000));
    assert_eq!(r.status, 200, "{}", r.body);
    let fresh = s.upload_token("any", "fresh");
    let r = s.upload(&fresh, &families(Some("fresh"), 3, now_ms() - 9 * 60_000));
    assert_eq!(r.status, 200, "{}", r.body);
    let served = |s: &ServerProcess| {
        let text = s.federate();
        (
            text.contains("_id=\"late\""),
            series_lines(&text)
                .iter()
                .filter(|l| l.contains("_id=\"fresh\""))
                .count(),
        )
    };
    assert_eq!(served(&s), (false, 4));
    // Also once reopened from its files (the newest sample is in their headers).
    assert!(s.signal_and_wait(Signal::Term).success());
    let s = setup.start();
    assert_eq!(served(&s), (false, 4));
    drop(s);

    let dir = TempDir::new("ttl-samples-short");
    let setup = ServerProcess::setup(&dir)
        .any_token()
        .args(&["--ttl", "12s"]);
    let s = setup.start();
    let token = s.upload_token("any", "aging");
    let pushed = std::time::Instant::now();
    let r = s.upload(&token, &families(Some("aging"), 3, now_ms() - 6_000));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(series_lines(&s.federate()).len(), 4);
    let deadline = pushed + std::time::Duration::from_secs(30);
    let gone = loop {
        if series_lines(&s.federate()).is_empty() {
            break pushed.elapsed();
        }
        assert!(std::time::Instant::now() < deadline, "still served");
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    // Counted from the receive time it would have stayed 12 s.
    assert!(
        gone < std::time::Duration::from_secs(10),
        "gone after {gone:?}"
    );
    loop {
        let metrics = get(&s.url_internal("/metrics"), &[]).body;
        if metric_value(&metrics, "telemeter_server_store_expired_total", &[]) == 1.0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never swept: {metrics}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    println!("samples 6 s old with a 12 s TTL: no longer served {gone:?} after the push");
}
