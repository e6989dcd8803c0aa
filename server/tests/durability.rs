//! The store survives a crash: upload, SIGKILL, restart on the same directory, series still served.

mod common;

use common::*;

#[test]
fn uploads_survive_sigkill_and_restart() {
    let dir = TempDir::new("durable");
    let tokens = dir.file("tokens", TOKENS);
    let key = dir.file("key", "a shared key of at least thirty-two bytes........");
    let storage = dir.path().join("data");
    let args = [
        "--tokens-file",
        tokens.to_str().unwrap(),
        "--shared-key",
        key.to_str().unwrap(),
        "--ratelimit",
        "0s",
    ];

    let mut first = ServerProcess::start(&storage, &args);
    let token = first.upload_token("secret", "test");
    let r = first.upload(&token, &families(Some("test"), 20, now_ms()));
    assert_eq!(r.status, 200, "{}", r.body);
    // 200 means durable: no graceful shutdown gets a chance to flush anything.
    first.signal_and_wait(libc::SIGKILL);

    let second = ServerProcess::start(&storage, &args);
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
