//! Reloading without a restart: SIGHUP and `POST /-/reload` read the tokens file and the
//! whitelist file again; a broken file keeps the old ones, says why, and shows in
//! `telemeter_server_config_last_reload_successful`.

mod common;

use std::time::Duration;

use common::*;

fn authorize_status(s: &ServerProcess, token: &str, id: &str) -> u16 {
    post(
        &s.url(&format!("/authorize?id={id}")),
        &[("Authorization", &format!("Bearer {token}"))],
        b"",
    )
    .status
}

fn reload_gauge(s: &ServerProcess) -> f64 {
    let r = get(&s.url_internal("/metrics"), &[]);
    metric_value(
        &r.body,
        "telemeter_server_config_last_reload_successful",
        &[],
    )
}

fn logged(s: &ServerProcess, needle: &str) -> bool {
    s.logs
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .any(|line| line.contains(needle))
}

#[test]
fn sighup_adds_a_token_and_a_broken_file_keeps_the_old_ones() {
    let dir = TempDir::new("reload-sighup");
    let tokens = dir.file("tokens", "old a\n");
    let whitelist = dir.file("whitelist", "test_metric\n");
    let s = ServerProcess::start(
        &dir.path().join("data"),
        &[
            "--tokens-file",
            tokens.to_str().unwrap(),
            "--whitelist-file",
            whitelist.to_str().unwrap(),
            "--ratelimit",
            "0s",
        ],
    );
    assert_eq!(authorize_status(&s, "old", "a"), 200);
    assert_eq!(authorize_status(&s, "new", "b"), 401);
    assert_eq!(reload_gauge(&s), 1.0);

    std::fs::write(&tokens, "old a\nnew b\n").unwrap();
    std::fs::write(&whitelist, "up\n").unwrap();
    testkit::kill(s.child.id(), Signal::Hup).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || authorize_status(&s, "new", "b")
            == 200),
        "the new token never authorized after SIGHUP"
    );
    // The whitelist was read again too: now only `up` is stored.
    let token = s.upload_token("new", "b");
    let r = s.upload(&token, &families(None, 3, now_ms()));
    assert_eq!(r.status, 200, "{}", r.body);
    let text = s.federate();
    let lines = series_lines(&text);
    assert_eq!(lines.len(), 1, "{text}");
    assert!(lines[0].starts_with("up{"), "{text}");

    // A broken tokens file: the old tokens stay, the log says why, the gauge drops to 0.
    std::fs::write(&tokens, "[{\"token\": ").unwrap();
    testkit::kill(s.child.id(), Signal::Hup).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || reload_gauge(&s) == 0.0),
        "the failed reload never showed in the gauge"
    );
    assert!(logged(
        &s,
        "reload (SIGHUP) failed, keeping the tokens and whitelist in use"
    ));
    assert_eq!(authorize_status(&s, "new", "b"), 200);
    assert_eq!(authorize_status(&s, "old", "a"), 200);
}

#[test]
fn post_reload_on_the_internal_port() {
    let dir = TempDir::new("reload-post");
    let tokens = dir.file("tokens", "old a\n");
    let s = ServerProcess::start(
        &dir.path().join("data"),
        &["--tokens-file", tokens.to_str().unwrap()],
    );
    assert_eq!(get(&s.url_internal("/-/reload"), &[]).status, 405);
    // Not on the external port, which clients reach.
    assert_eq!(post(&s.url("/-/reload"), &[], b"").status, 404);

    std::fs::write(&tokens, "new b\n").unwrap();
    let r = post(&s.url_internal("/-/reload"), &[], b"");
    assert_eq!((r.status, r.body.as_str()), (200, "reloaded\n"));
    assert_eq!(authorize_status(&s, "new", "b"), 200);
    assert_eq!(authorize_status(&s, "old", "a"), 401);

    std::fs::write(&tokens, "").unwrap();
    let r = post(&s.url_internal("/-/reload"), &[], b"");
    assert_eq!(r.status, 500);
    assert!(r.body.contains("no token in the file"), "{}", r.body);
    assert_eq!(authorize_status(&s, "new", "b"), 200);
    assert_eq!(reload_gauge(&s), 0.0);
}
