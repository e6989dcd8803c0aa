//! Unit tests of `oidc`, beside it so the module reads as the module.

use super::*;
use crate::config::Secret;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

#[test]
fn margins() {
    assert_eq!(
        refresh_margin(Duration::from_secs(4)),
        Duration::from_secs(1)
    );
    assert_eq!(
        refresh_margin(Duration::from_secs(3600)),
        MAX_REFRESH_MARGIN
    );
    assert_eq!(refresh_margin(Duration::ZERO), Duration::ZERO);
    let n = serde_json::json!(60);
    let s = serde_json::json!(" 60 ");
    assert_eq!(expires_in(Some(&n)), Some(Duration::from_secs(60)));
    assert_eq!(expires_in(Some(&s)), Some(Duration::from_secs(60)));
    assert_eq!(expires_in(Some(&serde_json::json!(-1))), None);
    assert_eq!(expires_in(None), None);
}

/// A tiny issuer: discovery names `issuer` (`None`: its own URL), the token endpoint answers
/// `status` with `body`, counting token requests and recording their forms.
fn issuer(
    issuer: Option<&'static str>,
    status: u16,
    body: &'static str,
) -> (String, Arc<AtomicUsize>, Arc<Mutex<Vec<String>>>) {
    issuer_replying(issuer, vec![(status, body)])
}

/// [`issuer`] answering the n-th token request with `replies[n]` (the last one repeats).
fn issuer_replying(
    issuer: Option<&'static str>,
    replies: Vec<(u16, &'static str)>,
) -> (String, Arc<AtomicUsize>, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let count = Arc::new(AtomicUsize::new(0));
    let forms = Arc::new(Mutex::new(Vec::new()));
    let (c, f, b) = (count.clone(), forms.clone(), base.clone());
    std::thread::spawn(move || {
        for stream in listener.incoming().take(20) {
            let Ok(stream) = stream else { break };
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            let mut length = 0;
            loop {
                let mut header = String::new();
                reader.read_line(&mut header).unwrap();
                if let Some(v) = header.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap();
                }
                if header == "\r\n" || header.is_empty() {
                    break;
                }
            }
            let mut form = vec![0; length];
            reader.read_exact(&mut form).unwrap();
            let (code, reply) = if line.starts_with("GET /.well-known/openid-configuration") {
                let named = issuer.map(str::to_owned).unwrap_or_else(|| b.clone());
                (
                    200,
                    format!(r#"{{"issuer":"{named}","token_endpoint":"{b}/token"}}"#),
                )
            } else {
                let n = c.fetch_add(1, Ordering::SeqCst);
                f.lock().unwrap().push(String::from_utf8(form).unwrap());
                let (status, body) = replies[n.min(replies.len() - 1)];
                (status, body.to_string())
            };
            let mut stream = stream;
            let _ = write!(
                    stream,
                    "HTTP/1.1 {code} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{reply}",
                    reply.len()
                );
        }
    });
    (base, count, forms)
}

fn source(issuer_url: &str, password: bool) -> TokenSource {
    TokenSource::new(
        OidcConfig {
            issuer_url: format!("{issuer_url}/"),
            client_id: "telemeter".into(),
            client_secret: Some(Secret::from("s3cr=t&".to_string())),
            password_grant: password
                .then(|| ("bob".to_string(), Secret::from("pa ss".to_string()))),
        },
        ureq::Agent::new_with_config(
            ureq::Agent::config_builder()
                .http_status_as_error(false)
                .build(),
        ),
    )
}

fn soon() -> Instant {
    Instant::now() + Duration::from_secs(5)
}

#[test]
fn client_credentials_then_cached_then_refused() {
    let (url, count, forms) = issuer(
        None,
        200,
        r#"{"access_token":"tok","token_type":"Bearer","expires_in":3600}"#,
    );
    let src = source(&url, false);
    assert_eq!(src.token(soon()).unwrap(), "tok");
    assert_eq!(src.token(soon()).unwrap(), "tok");
    assert_eq!(count.load(Ordering::SeqCst), 1);
    assert_eq!(
        forms.lock().unwrap()[0],
        "grant_type=client_credentials&client_id=telemeter&client_secret=s3cr%3Dt%26"
    );
    // A 401 right after the fetch is the client token's fault, not ours.
    let fetched = |at: Instant| src.lock().token.as_mut().unwrap().fetched_at = at;
    fetched(Instant::now());
    assert!(!src.refused("tok"));
    assert!(src.refused("an older token"));
    assert_eq!(count.load(Ordering::SeqCst), 1);
    // Later it is ours: the token is dropped, the next call fetches another.
    fetched(Instant::now() - MIN_AGE_TO_REFRESH_AFTER_401);
    assert!(src.refused("tok"));
    assert_eq!(src.token(soon()).unwrap(), "tok");
    assert_eq!(count.load(Ordering::SeqCst), 2);
    assert!(format!("{src:?}").contains("issuer_url"));
    assert!(!format!("{:?}", src.config).contains("s3cr"));
}

#[test]
fn a_token_due_but_unexpired_is_used_while_the_issuer_fails() {
    let (url, count, _) = issuer_replying(
        None,
        vec![
            (200, r#"{"access_token":"tok","expires_in":3600}"#),
            (500, r#"{"error":"server_error"}"#),
        ],
    );
    let src = source(&url, false);
    assert_eq!(src.token(soon()).unwrap(), "tok");
    let due = |field: fn(&mut Cached) -> &mut Option<Instant>| {
        *field(src.lock().token.as_mut().unwrap()) = Some(Instant::now());
    };
    due(|c| &mut c.refresh_at);
    assert_eq!(src.token(soon()).unwrap(), "tok");
    assert_eq!(count.load(Ordering::SeqCst), 2);
    // Remembered or met again, the failure does not stop the token until it expires.
    assert_eq!(src.token(soon()).unwrap(), "tok");
    due(|c| &mut c.expires_at);
    assert!(matches!(src.token(soon()), Err(OidcError::Token(_))));
}

#[test]
fn password_grant() {
    let (url, _, forms) = issuer(None, 200, r#"{"access_token":"t2"}"#);
    assert_eq!(source(&url, true).token(soon()).unwrap(), "t2");
    assert_eq!(
            forms.lock().unwrap()[0],
            "grant_type=password&username=bob&password=pa+ss&client_id=telemeter&client_secret=s3cr%3Dt%26"
        );
}

#[test]
fn refusals_and_wrong_documents_are_errors_remembered_briefly() {
    let (url, count, _) = issuer(None, 401, r#"{"error":"invalid_client"}"#);
    let src = source(&url, false);
    let err = src.token(soon()).unwrap_err();
    assert!(
        err.to_string().ends_with("answered 401 invalid_client"),
        "{err}"
    );
    assert_eq!(src.token(soon()), Err(err));
    assert_eq!(count.load(Ordering::SeqCst), 1);

    let (url, count, _) = issuer(Some("https://elsewhere"), 200, "{}");
    let err = source(&url, false).token(soon()).unwrap_err();
    assert!(matches!(err, OidcError::Discovery(_)), "{err}");
    assert!(err.to_string().contains("names issuer"), "{err}");
    assert_eq!(count.load(Ordering::SeqCst), 0);

    let (url, _, _) = issuer(None, 200, r#"{"access_token":"x","token_type":"mac"}"#);
    assert!(source(&url, false).token(soon()).is_err());
    let (url, _, _) = issuer(None, 200, r#"{"token_type":"bearer"}"#);
    assert!(source(&url, false).token(soon()).is_err());
    assert_eq!(
        source(&url, false).token(Instant::now()),
        Err(OidcError::Deadline)
    );
}
