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
    let s = ServerProcess::setup(&dir)
        .ratelimit(None)
        .args(&["--required-label", "env=prod"])
        .start();

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

#[test]
fn upstream_tokens_file_lets_its_tokens_push_for_any_cluster() {
    let dir = TempDir::new("upstream-tokens");
    // Upstream's test/tokens.json, byte for byte.
    let tokens = dir.file("tokens.json", "[\n  {\n    \"token\": \"a\"\n  }\n]\n");
    let s = ServerProcess::start(
        &dir.path().join("data"),
        &[
            "--tokens-file",
            tokens.to_str().unwrap(),
            "--ratelimit",
            "0s",
        ],
    );
    for id in ["test", "another-cluster"] {
        let upload = s.upload_token("a", id);
        let r = s.upload(&upload, &families(Some(id), 2, now_ms()));
        assert_eq!(r.status, 200, "{id}: {}", r.body);
    }
    let r = post(
        &s.url("/authorize?id=test"),
        &[("Authorization", &bearer("b"))],
        b"",
    );
    assert_eq!(r.status, 401, "{}", r.body);
    let warnings: Vec<String> = s
        .logs
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("WARN") && l.contains("ANY cluster"))
        .cloned()
        .collect();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains("1 of the 1 tokens in") && warnings[0].contains("tokens.json"),
        "{warnings:?}"
    );
}

/// A small OIDC issuer: discovery, and a token endpoint that counts its requests, records their
/// forms and hands out `oidc-<n>-x9` tokens living `expires_in` seconds.
#[derive(Default)]
struct Issuer {
    base: std::sync::Mutex<String>,
    forms: std::sync::Mutex<Vec<String>>,
    expires_in: std::sync::atomic::AtomicU64,
}

impl Issuer {
    fn token_requests(&self) -> usize {
        self.forms.lock().unwrap().len()
    }
}

impl Handler for Issuer {
    fn handle(&self, request: Request) -> Response {
        let base = self.base.lock().unwrap().clone();
        match (request.method.as_str(), request.path.as_str()) {
            ("GET", "/realms/t/.well-known/openid-configuration") => Response::json(
                200,
                &serde_json::json!({
                    "issuer": format!("{base}/realms/t"),
                    "token_endpoint": format!("{base}/realms/t/token"),
                }),
            ),
            ("POST", "/realms/t/token") => {
                let grant = request.form_param("grant_type").unwrap_or_default();
                let field = |name: &str| request.form_param(name).unwrap_or_default();
                let mut forms = self.forms.lock().unwrap();
                forms.push(format!(
                    "{grant} id={} secret={} user={} password={}",
                    field("client_id"),
                    field("client_secret"),
                    field("username"),
                    field("password")
                ));
                let n = forms.len();
                Response::json(
                    200,
                    &serde_json::json!({
                        "access_token": format!("oidc-{n}-x9"),
                        "token_type": "Bearer",
                        "expires_in": self.expires_in.load(std::sync::atomic::Ordering::SeqCst),
                    }),
                )
            }
            _ => Response::text(404, "no"),
        }
    }
}

/// A tollbooth that wants a live bearer from the issuer: `revoked` ones get 401.
#[derive(Default)]
struct GuardedTollbooth {
    revoked: std::sync::Mutex<Vec<String>>,
    bearers: std::sync::Mutex<Vec<String>>,
}

impl Handler for GuardedTollbooth {
    fn handle(&self, request: Request) -> Response {
        let bearer = request
            .header("Authorization")
            .and_then(|h| h.strip_prefix("Bearer "))
            .unwrap_or("")
            .to_string();
        self.bearers.lock().unwrap().push(bearer.clone());
        if !bearer.starts_with("oidc-") || self.revoked.lock().unwrap().contains(&bearer) {
            return Response::text(401, "bearer refused");
        }
        Tollbooth.handle(request)
    }
}

fn serve(handler: Arc<dyn Handler>) -> front::ServerHandle {
    front::Server::bind("127.0.0.1:0", front::Config::default(), handler)
        .unwrap()
        .spawn()
}

/// Polls `/authorize` (bounded) until it answers 200 and `done` holds.
fn authorize_until(s: &ServerProcess, token: &str, done: impl Fn() -> bool) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let r = post(
            &s.url("/authorize?id=c1"),
            &[("Authorization", &bearer(token))],
            b"",
        );
        if r.status == 200 && done() {
            let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
            return v["token"].as_str().unwrap().to_string();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never: last answer {} {}",
            r.status,
            r.body
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[test]
fn oidc_token_for_the_authorization_service_is_fetched_cached_refreshed_and_never_logged() {
    use std::sync::atomic::Ordering;
    let issuer = Arc::new(Issuer::default());
    issuer.expires_in.store(3600, Ordering::SeqCst);
    let issuer_front = serve(issuer.clone());
    *issuer.base.lock().unwrap() = format!("http://{}", issuer_front.local_addr());
    let tollbooth = Arc::new(GuardedTollbooth::default());
    let tollbooth_front = serve(tollbooth.clone());
    let dir = TempDir::new("oidc");
    let issuer_url = format!("http://{}/realms/t/", issuer_front.local_addr());
    let s = ServerProcess::start(
        &dir.path().join("data"),
        &[
            "--authorize",
            &format!("http://{}/", tollbooth_front.local_addr()),
            "--authorize-issuer-url",
            &issuer_url,
            "--authorize-client-id",
            "telemeter",
            "--authorize-client-secret",
            "s3cret-value",
            "--ratelimit",
            "0s",
            // Debug logs too must not show a secret.
            "-v",
        ],
    );

    // The first /authorize fetches a token with the client credentials grant and presents it.
    let upload = authorize_until(&s, "known", || true);
    assert_eq!(
        *issuer.forms.lock().unwrap(),
        ["client_credentials id=telemeter secret=s3cret-value user= password="]
    );
    assert_eq!(*tollbooth.bearers.lock().unwrap(), ["oidc-1-x9"]);
    // The upload flow works with the token it gave.
    let r = s.upload(&upload, &families(Some("c1"), 3, now_ms()));
    assert_eq!(r.status, 200, "{}", r.body);
    // Cached: the next /authorize asks the issuer nothing.
    authorize_until(&s, "known", || true);
    assert_eq!(issuer.token_requests(), 1);
    // A client token the service does not know is still a 401. The server cannot tell it from a
    // revoked access token, so it may fetch one more token and retry, once: no more.
    let r = post(
        &s.url("/authorize?id=c1"),
        &[("Authorization", &bearer("nope"))],
        b"",
    );
    assert_eq!(r.status, 401, "{}", r.body);
    assert!(issuer.token_requests() <= 2);
    let bearer_now = |n: usize| format!("oidc-{n}-x9");

    // The service revokes the token in use: after its 401 the server fetches another and retries.
    issuer.expires_in.store(2, Ordering::SeqCst);
    let revoked = issuer.token_requests();
    tollbooth.revoked.lock().unwrap().push(bearer_now(revoked));
    authorize_until(&s, "known", || issuer.token_requests() > revoked);
    let renewed = issuer.token_requests();
    assert_eq!(
        tollbooth.bearers.lock().unwrap().last(),
        Some(&bearer_now(renewed))
    );
    // That one expires in 2 s: it is replaced before, without a 401 from the service (only the
    // revoked token was ever refused).
    authorize_until(&s, "known", || issuer.token_requests() > renewed);
    let bearers = tollbooth.bearers.lock().unwrap().clone();
    assert_eq!(bearers.last(), Some(&bearer_now(issuer.token_requests())));
    let revoked_list = tollbooth.revoked.lock().unwrap().clone();
    assert_eq!(revoked_list, [bearer_now(revoked)]);

    // The same with the password grant.
    let dir2 = TempDir::new("oidc-password");
    let s2 = ServerProcess::start(
        &dir2.path().join("data"),
        &[
            "--authorize",
            &format!("http://{}/", tollbooth_front.local_addr()),
            "--authorize-issuer-url",
            &issuer_url,
            "--authorize-client-id=telemeter",
            "--authorize-username=bob",
            "--authorize-password=pw-secret",
            "-v",
        ],
    );
    authorize_until(&s2, "known", || true);
    assert_eq!(
        issuer.forms.lock().unwrap().last().map(String::as_str),
        Some("password id=telemeter secret= user=bob password=pw-secret")
    );

    for (server, secrets) in [(&s, ["s3cret-value", "-x9"]), (&s2, ["pw-secret", "-x9"])] {
        let logs = server.logs.lock().unwrap();
        assert!(
            logs.iter().any(|l| l.contains("DEBUG")),
            "-v logs at debug level"
        );
        for line in logs.iter() {
            for secret in secrets {
                assert!(!line.contains(secret), "a secret was logged: {line}");
            }
        }
    }
}

/// A tollbooth whose `slow` token stalls 1.5 s (then is unknown: 401), `stuck` 20 s (or until
/// released); others answer at once. It counts the stalled calls in flight.
#[derive(Default)]
struct StallingTollbooth {
    stalled: std::sync::Mutex<(usize, usize, bool)>,
    wake: std::sync::Condvar,
}

impl StallingTollbooth {
    fn stalled_now_and_most(&self) -> (usize, usize) {
        let g = self.stalled.lock().unwrap();
        (g.0, g.1)
    }

    fn release(&self) {
        self.stalled.lock().unwrap().2 = true;
        self.wake.notify_all();
    }
}

impl Handler for StallingTollbooth {
    fn handle(&self, request: Request) -> Response {
        let v: serde_json::Value = serde_json::from_slice(&request.body).unwrap_or_default();
        let stall = match v["authorization_token"].as_str() {
            Some("slow") => Some(std::time::Duration::from_millis(1500)),
            Some("stuck") => Some(std::time::Duration::from_secs(20)),
            _ => None,
        };
        if let Some(stall) = stall {
            let mut g = self.stalled.lock().unwrap();
            g.0 += 1;
            g.1 = g.1.max(g.0);
            let until = std::time::Instant::now() + stall;
            while !g.2 && std::time::Instant::now() < until {
                g = self
                    .wake
                    .wait_timeout(g, std::time::Duration::from_millis(200))
                    .unwrap()
                    .0;
            }
            g.0 -= 1;
        }
        Tollbooth.handle(request)
    }
}

#[test]
fn a_stalled_authorization_service_does_not_slow_uploads() {
    use std::time::{Duration, Instant};
    let tollbooth = Arc::new(StallingTollbooth::default());
    let config = front::Config {
        workers: 32,
        ..front::Config::default()
    };
    let stub = front::Server::bind("127.0.0.1:0", config, tollbooth.clone())
        .unwrap()
        .spawn();
    let dir = TempDir::new("authorize-flood");
    let s = ServerProcess::start(
        &dir.path().join("data"),
        &[
            "--authorize",
            &format!("http://{}/", stub.local_addr()),
            "--authorize-concurrency",
            "4",
            "--authorize-timeout",
            "2s",
            // Few workers: without the cap the flood would take them all.
            "--workers",
            "8",
            "--ratelimit",
            "0s",
        ],
    );
    let upload = s.upload_token("known", "bystander");

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood: Vec<_> = (0..12)
        .map(|_| {
            let (url, stop) = (s.url("/authorize?id=c1"), stop.clone());
            std::thread::spawn(move || {
                let mut replies = Vec::new();
                let until = Instant::now() + Duration::from_secs(30);
                while !stop.load(std::sync::atomic::Ordering::SeqCst) && Instant::now() < until {
                    let started = Instant::now();
                    let r = post(&url, &[("Authorization", "Bearer slow")], b"");
                    replies.push((
                        r.status,
                        r.header("Retry-After").is_some(),
                        r.body,
                        started.elapsed(),
                    ));
                    std::thread::sleep(Duration::from_millis(50));
                }
                replies
            })
        })
        .collect();
    // Wait (bounded) until the service holds as many calls as allowed.
    let started = Instant::now();
    while tollbooth.stalled_now_and_most().0 < 4 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the flood never reached the service"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Uploads for three seconds (two generations of stalled calls) keep their latency.
    let mut latencies = Vec::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        let t = Instant::now();
        let r = s.upload(&upload, &families(Some("bystander"), 5, now_ms()));
        latencies.push(t.elapsed());
        assert_eq!(r.status, 200, "{}", r.body);
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let replies: Vec<_> = flood.into_iter().flat_map(|t| t.join().unwrap()).collect();
    let slowest = latencies.iter().max().unwrap();
    println!(
        "{} uploads during the flood, slowest {slowest:?}; {} flood replies",
        latencies.len(),
        replies.len()
    );
    assert!(*slowest < Duration::from_secs(1), "{latencies:?}");
    // The service never saw more calls than allowed.
    assert_eq!(tollbooth.stalled_now_and_most().1, 4);
    // Every flood request got its answer: a 503 with Retry-After at once when the slots were
    // taken, the service's (401) when it had a slot.
    let busy = replies
        .iter()
        .filter(|(status, retry_after, body, took)| {
            *status == 503
                && *retry_after
                && body.starts_with("authorization service busy")
                && *took < Duration::from_secs(1)
        })
        .count();
    let answered = replies
        .iter()
        .filter(|(status, _, body, _)| *status == 401 && body.trim_end() == "unauthorized")
        .count();
    assert!(busy > 0 && answered > 0, "{replies:?}");
    assert_eq!(busy + answered, replies.len(), "{replies:?}");
    for (_, _, body, _) in &replies {
        assert_eq!(body.trim_end().lines().count(), 1, "{body:?}");
    }

    // A call the service never answers ends at the deadline, with a one-line 503.
    let t = Instant::now();
    let r = post(
        &s.url("/authorize?id=c1"),
        &[("Authorization", "Bearer stuck")],
        b"",
    );
    let took = t.elapsed();
    tollbooth.release();
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(
        r.body.starts_with("authorization service unavailable")
            && r.body.trim_end().lines().count() == 1,
        "{}",
        r.body
    );
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(5),
        "{took:?}"
    );
}
