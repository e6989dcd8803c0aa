//! Unit tests of `authorize`, beside it so the module reads as the module.

use super::*;
use crate::config::TollboothConfig;
use std::time::Instant;
use telemeter_common::tls;

#[test]
fn tokens_file_line_form() {
    let f = TokensFile::parse("# comment\n\nsecret1 a,b\nsecret2 *\n").unwrap();
    assert_eq!(f.len(), 2);
    assert_eq!(f.authorize("secret1", "a"), Ok("a".to_string()));
    assert_eq!(f.authorize("secret1", "b"), Ok("b".to_string()));
    assert_eq!(
        f.authorize("secret1", "c"),
        Err(AuthorizeError::NotAllowed {
            cluster_id: "c".into()
        })
    );
    assert_eq!(f.authorize("secret2", "anything"), Ok("anything".into()));
    assert_eq!(f.authorize("nope", "a"), Err(AuthorizeError::UnknownToken));
}

#[test]
fn tokens_file_json_form() {
    let f =
        TokensFile::parse(r#"  [{"token":"t1","clusters":["x"]},{"token":"t2","clusters":["*"]}]"#)
            .unwrap();
    assert_eq!(f.authorize("t1", "x"), Ok("x".into()));
    assert_eq!(f.authorize("t1", "y").unwrap_err().status(), 403);
    assert_eq!(f.authorize("t2", "y"), Ok("y".into()));
    assert_eq!(f.authorize("t3", "y").unwrap_err().status(), 401);
}

#[test]
fn tokens_file_upstream_form_allows_any_cluster() {
    // Upstream's test/tokens.json, and its authorization server's responses.json.
    let f = TokensFile::parse("[\n  {\n    \"token\": \"a\"\n  }\n]\n").unwrap();
    assert_eq!(f.authorize("a", "any-cluster"), Ok("any-cluster".into()));
    assert_eq!(f.authorize("b", "any-cluster").unwrap_err().status(), 401);
    assert_eq!(f.unrestricted(), 1);
    let f = TokensFile::parse(
            r#"[{"token":"a","response":{"code":201,"account_id":"1"}},{"token":"b","clusters":["x"]}]"#,
        )
        .unwrap();
    assert_eq!(f.authorize("a", "y"), Ok("y".into()));
    assert_eq!(f.authorize("b", "y").unwrap_err().status(), 403);
    assert_eq!((f.len(), f.unrestricted()), (2, 1));
    // An explicit empty list is a mistake, not "any".
    assert!(matches!(
        TokensFile::parse(r#"[{"token":"a"},{"token":"b","clusters":[]}]"#),
        Err(TokensFileError::Line { line: 2, .. })
    ));
    assert_eq!(TokensFile::parse("t1 a\nt2 *\n").unwrap().unrestricted(), 1);
}

#[test]
fn tokens_file_errors() {
    assert!(matches!(
        TokensFile::parse("only-a-token\n"),
        Err(TokensFileError::Line { line: 1, .. })
    ));
    assert!(matches!(
        TokensFile::parse("[{\"token\":1}]"),
        Err(TokensFileError::Json(_))
    ));
    assert!(matches!(
        TokensFile::parse("# nothing\n"),
        Err(TokensFileError::Empty)
    ));
}

#[test]
fn cluster_ids_are_checked() {
    assert!(check_cluster_id("abc-123").is_ok());
    assert!(check_cluster_id("").is_err());
    assert!(check_cluster_id(&"x".repeat(256)).is_err());
    assert!(check_cluster_id("a\nb").is_err());
}

#[test]
fn an_https_service_that_fails_tls_is_unavailable_not_a_panic() {
    tls::install_crypto_provider();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let peer = std::thread::spawn(move || {
        // Accept and hang up: the TLS handshake fails after the client built its TLS config.
        let _ = listener.accept();
    });
    let tollbooth = Tollbooth::new(&service(&format!("https://{addr}/"), 1, 10));
    let err = tollbooth.authorize("t", "c").unwrap_err();
    assert_eq!(err.status(), 503, "{err}");
    peer.join().unwrap();
}

fn service(url: &str, concurrency: usize, timeout_secs: u64) -> TollboothConfig {
    TollboothConfig {
        url: url.into(),
        oidc: None,
        concurrency,
        timeout: Duration::from_secs(timeout_secs),
        connect_timeout: Duration::from_secs(1),
    }
}

#[test]
fn a_stalled_service_holds_at_most_its_slots_until_the_deadline() {
    tls::install_crypto_provider();
    // Accepts, reads, never answers.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().take(4) {
            held.push(stream);
        }
        std::thread::sleep(Duration::from_secs(10));
    });
    let tollbooth = Arc::new(Tollbooth::new(&service(&format!("http://{addr}/"), 2, 1)));
    let started = Instant::now();
    let calls: Vec<_> = (0..2)
        .map(|_| {
            let t = tollbooth.clone();
            std::thread::spawn(move || t.authorize("t", "c"))
        })
        .collect();
    while tollbooth.in_flight() < 2 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "calls never started"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // Over the cap: refused at once, without touching the service.
    let refused = Instant::now();
    let err = tollbooth.authorize("t", "c").unwrap_err();
    assert_eq!(
        err,
        AuthorizeError::Busy {
            retry_after: BUSY_RETRY_AFTER_SECS
        }
    );
    assert!(refused.elapsed() < Duration::from_millis(500));
    for call in calls {
        let err = call.join().unwrap().unwrap_err();
        assert_eq!(err.status(), 503, "{err}");
    }
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(4),
        "{waited:?}"
    );
    assert_eq!(tollbooth.in_flight(), 0);
}

#[test]
fn error_statuses() {
    assert_eq!(AuthorizeError::Rejected { status: 500 }.status(), 502);
    assert_eq!(
        AuthorizeError::Rejected { status: 500 }.to_string(),
        "authorization service answered 500"
    );
    assert_eq!(AuthorizeError::Unavailable("x".into()).status(), 503);
    assert_eq!(AuthorizeError::RateLimited { retry_after: 3 }.status(), 429);
    assert_eq!(AuthorizeError::Busy { retry_after: 3 }.status(), 503);
}
