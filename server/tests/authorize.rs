//! `/authorize` against the real binary: tokens file, tollbooth, and start-up without a token source.

mod common;

use std::sync::Arc;

use common::*;
use telemeter_common::http::{self as front, Handler, Request, Response};

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

#[test]
fn tokens_file_authorize() {
    let dir = TempDir::new("authz");
    let tokens = dir.file("tokens", TOKENS);
    let storage = dir.path().join("data");
    let s = ServerProcess::start(
        &storage,
        &[
            "--tokens-file",
            tokens.to_str().unwrap(),
            "--required-label",
            "env=prod",
        ],
    );

    let r = post(
        &s.url("/authorize?id=test"),
        &[("Authorization", &bearer("secret"))],
        b"",
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("Content-Type"), Some("application/json"));
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(v["version"], 1);
    assert_eq!(v["expiresInSeconds"], 86400);
    assert_eq!(v["labels"]["_id"], "test");
    assert_eq!(v["labels"]["env"], "prod");
    assert!(v["token"].as_str().unwrap().split('.').count() == 3);

    // The id may come as a url-encoded form field instead.
    let r = post(
        &s.url("/authorize"),
        &[
            ("Authorization", &bearer("secret")),
            ("Content-Type", "application/x-www-form-urlencoded"),
        ],
        b"id=other",
    );
    assert_eq!(r.status, 200, "{}", r.body);

    // A wildcard token works for any id.
    let r = post(
        &s.url("/authorize?id=zzz"),
        &[("Authorization", &bearer("wild"))],
        b"",
    );
    assert_eq!(r.status, 200, "{}", r.body);

    let r = post(
        &s.url("/authorize?id=test"),
        &[("Authorization", &bearer("wrong"))],
        b"",
    );
    assert_eq!(r.status, 401, "{}", r.body);

    let r = post(&s.url("/authorize?id=test"), &[], b"");
    assert_eq!(r.status, 401);
    assert_eq!(r.body, "Only bearer authorization allowed\n");

    let r = post(
        &s.url("/authorize?id=test"),
        &[("Authorization", "Basic abc")],
        b"",
    );
    assert_eq!(r.status, 401);

    let r = post(
        &s.url("/authorize?id=nope"),
        &[("Authorization", &bearer("secret"))],
        b"",
    );
    assert_eq!(r.status, 403, "{}", r.body);

    let r = post(
        &s.url("/authorize"),
        &[("Authorization", &bearer("secret"))],
        b"",
    );
    assert_eq!(r.status, 400);
    assert!(r.body.contains("'id' parameter"), "{}", r.body);

    let long = "x".repeat(300);
    let r = post(
        &s.url(&format!("/authorize?id={long}")),
        &[("Authorization", &bearer("wild"))],
        b"",
    );
    assert_eq!(r.status, 400, "{}", r.body);

    let r = get(
        &s.url("/authorize?id=test"),
        &[("Authorization", &bearer("secret"))],
    );
    assert_eq!(r.status, 405);

    // The body of /authorize is capped at 4 KiB.
    let r = post(
        &s.url("/authorize?id=test"),
        &[("Authorization", &bearer("secret"))],
        &vec![b'a'; 8 << 10],
    );
    assert_eq!(r.status, 413);
}

#[test]
fn refuses_to_start_without_a_token_source() {
    let dir = TempDir::new("notoken");
    let (status, stderr) = ServerProcess::run_failing(&dir.path().join("data"), &[]);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("no client token source: give --tokens-file or --authorize"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}

#[test]
fn refuses_to_start_with_a_bad_tokens_file() {
    let dir = TempDir::new("badtokens");
    let tokens = dir.file("tokens", "just-one-word\n");
    let (status, stderr) = ServerProcess::run_failing(
        &dir.path().join("data"),
        &["--tokens-file", tokens.to_str().unwrap()],
    );
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("--tokens-file"), "{stderr}");
}

/// A stand-in for the upstream authorization service: the client token decides the answer.
struct Tollbooth;

impl Handler for Tollbooth {
    fn handle(&self, request: Request) -> Response {
        if request.method != "POST" {
            return Response::text(405, "POST only");
        }
        let v: serde_json::Value = match serde_json::from_slice(&request.body) {
            Ok(v) => v,
            Err(_) => return Response::text(400, "bad body"),
        };
        let id = v["cluster_id"].as_str().unwrap_or("");
        let answer = serde_json::json!({"account_id": format!("acct-{id}"), "cluster_id": id});
        match v["authorization_token"].as_str().unwrap_or("") {
            "new" => Response::json(201, &answer),
            "known" => Response::json(200, &answer),
            "limited" => Response::text(429, "slow down").with_header("Retry-After", "7"),
            "broken" => Response::text(500, "oops"),
            "noaccount" => Response::json(200, &serde_json::json!({"account_id": ""})),
            _ => Response::text(401, "unknown token"),
        }
    }
}

#[test]
fn tollbooth_authorize() {
    let stub = front::Server::bind("127.0.0.1:0", front::Config::default(), Arc::new(Tollbooth))
        .unwrap()
        .spawn();
    let url = format!("http://{}/v1/cluster_registrations", stub.local_addr());
    let dir = TempDir::new("tollbooth");
    let s = ServerProcess::start(&dir.path().join("data"), &["--authorize", &url]);

    for token in ["new", "known"] {
        let r = post(
            &s.url("/authorize?id=c1"),
            &[("Authorization", &bearer(token))],
            b"",
        );
        assert_eq!(r.status, 200, "{token}: {}", r.body);
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(v["labels"]["_id"], "c1");
    }
    let r = post(
        &s.url("/authorize?id=c1"),
        &[("Authorization", &bearer("nope"))],
        b"",
    );
    assert_eq!(r.status, 401, "{}", r.body);
    let r = post(
        &s.url("/authorize?id=c1"),
        &[("Authorization", &bearer("limited"))],
        b"",
    );
    assert_eq!(r.status, 429, "{}", r.body);
    assert_eq!(r.header("Retry-After"), Some("7"));
    let r = post(
        &s.url("/authorize?id=c1"),
        &[("Authorization", &bearer("broken"))],
        b"",
    );
    assert_eq!(r.status, 502, "{}", r.body);
    assert_eq!(r.body, "authorization service answered 500\n");
    let r = post(
        &s.url("/authorize?id=c1"),
        &[("Authorization", &bearer("noaccount"))],
        b"",
    );
    assert_eq!(r.status, 502, "{}", r.body);

    // The service going away is the server's problem to report, not a client error.
    stub.shutdown(std::time::Duration::from_secs(1));
    let r = post(
        &s.url("/authorize?id=c1"),
        &[("Authorization", &bearer("known"))],
        b"",
    );
    assert_eq!(r.status, 503, "{}", r.body);
}
