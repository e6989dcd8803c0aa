//! `/upload` against the real binary, starting with a byte-for-byte replay of what the upstream Go
//! client (2018–2019 releases) sends.

mod common;

use std::time::{Duration, SystemTime};

use common::*;
use telemeter_common::delimited;
use telemeter_common::keys::SharedKey;
use telemeter_common::media::PROTO_DELIMITED;
use telemeter_common::model::MetricFamily;
use telemeter_common::snappy;
use telemeter_common::token::TokenSigner;

const KEY: &str = "0123456789abcdef0123456789abcdef-test-shared-key";

fn start(dir: &TempDir, extra: &[&str]) -> ServerProcess {
    let setup = ServerProcess::setup(dir).key(KEY);
    // A test that sets its own rate limit gets only that one.
    let setup = if extra.contains(&"--ratelimit") {
        setup.ratelimit(None)
    } else {
        setup
    };
    setup.args(extra).start()
}

/// Whether every series line of a text body has no timestamp (`name{...} value`).
fn no_timestamps(text: &str) -> bool {
    series_lines(text).iter().all(|l| {
        let after = l.rsplit_once('}').map(|(_, v)| v).unwrap_or(l);
        let fields = after.split_whitespace().count();
        fields == 1 || (!l.contains('}') && l.split_whitespace().count() == 2)
    })
}

fn raw_upload(s: &ServerProcess, token: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
    let auth = format!("Bearer {token}");
    let mut all = vec![("Authorization", auth.as_str())];
    all.extend_from_slice(headers);
    post(&s.url("/upload"), &all, body)
}

#[test]
fn upstream_client_replay() {
    let dir = TempDir::new("replay");
    let s = start(&dir, &[]);
    // 1. POST /authorize?id=test, bearer client token, empty body.
    let r = post(
        &s.url("/authorize?id=test"),
        &[("Authorization", "Bearer secret")],
        b"",
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    let token = v["token"].as_str().unwrap();
    assert_eq!(v["labels"]["_id"], "test");
    // 2. POST /upload, PD + snappy framed, every series stamped with _id="test" by the client.
    let body = snappy::encode_framed(&delimited::encode(&families(Some("test"), 10, now_ms())));
    let r = raw_upload(
        &s,
        token,
        &[
            ("Content-Type", PROTO_DELIMITED),
            ("Content-Encoding", "snappy"),
        ],
        &body,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.is_empty());
    // 3. /federate serves them with _id="test" and without timestamps.
    let text = s.federate();
    let lines = series_lines(&text);
    assert_eq!(lines.len(), 11, "{text}");
    assert!(lines.iter().all(|l| l.contains("_id=\"test\"")), "{text}");
    assert!(lines
        .iter()
        .any(|l| l.starts_with("test_metric{") && l.contains("i=\"7\"")));
    assert!(no_timestamps(&text), "{text}");
    // PD when asked for, without timestamps too.
    let r = get(
        &s.url_internal("/federate"),
        &[("Accept", telemeter_common::media::ACCEPT_PD_THEN_TEXT)],
    );
    assert_eq!(r.status, 200);
    assert!(r
        .header("Content-Type")
        .unwrap()
        .starts_with("application/vnd.google.protobuf"));
    let fams = delimited::decode(&r.bytes, &delimited::Limits::default()).unwrap();
    // Beside what was pushed, the last push time of the one cluster.
    let (last_push, fams): (Vec<_>, Vec<_>) = fams
        .iter()
        .partition(|f| f.name.as_deref() == Some("telemeter_last_push_timestamp_seconds"));
    assert_eq!(last_push.len(), 1);
    assert_eq!(last_push[0].metric.len(), 1);
    let series: Vec<_> = fams.iter().flat_map(|f| &f.metric).collect();
    assert_eq!(series.len(), 11);
    assert!(series.iter().all(|m| m.timestamp_ms.is_none()));
    assert!(series.iter().all(|m| m.label_value("_id") == Some("test")));
}

#[test]
fn encodings_formats_and_stamping() {
    let dir = TempDir::new("formats");
    let s = start(&dir, &["--label", "region=eu"]);
    let token = s.upload_token("secret", "test");

    // Identity encoding, no _id on the series: the server stamps it.
    let body = delimited::encode(&families(None, 3, now_ms()));
    let r = raw_upload(&s, &token, &[("Content-Type", PROTO_DELIMITED)], &body);
    assert_eq!(r.status, 200, "{}", r.body);
    let text = s.federate();
    assert_eq!(series_lines(&text).len(), 4, "{text}");
    assert!(series_lines(&text)
        .iter()
        .all(|l| l.contains("_id=\"test\"") && l.contains("region=\"eu\"")));

    // Text upload replaces the cluster's set.
    let ts = now_ms();
    let body = format!("# TYPE text_metric gauge\ntext_metric{{a=\"1\"}} 5 {ts}\n");
    let r = raw_upload(
        &s,
        &token,
        &[("Content-Type", "text/plain; version=0.0.4")],
        body.as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let text = s.federate();
    let lines = series_lines(&text);
    assert_eq!(lines.len(), 1, "{text}");
    assert!(lines[0].starts_with("text_metric{"));
    assert!(lines[0].ends_with(" 5"), "{text}");
}

#[test]
fn token_failures() {
    let dir = TempDir::new("tokens");
    let s = start(&dir, &[]);
    let body = snappy::encode_framed(&delimited::encode(&families(Some("test"), 1, now_ms())));
    let headers = [
        ("Content-Type", PROTO_DELIMITED),
        ("Content-Encoding", "snappy"),
    ];

    let r = raw_upload(&s, "not-a-token", &headers, &body);
    assert_eq!(r.status, 401, "{}", r.body);
    let r = post(&s.url("/upload"), &headers, &body);
    assert_eq!(r.status, 401, "{}", r.body);

    let labels = labels(&[("_id", "test")]);
    let ours = TokenSigner::new(&SharedKey::from_bytes(KEY.as_bytes()).unwrap());
    let long_ago = SystemTime::now() - Duration::from_secs(3 * 86_400);
    let expired = ours.issue("test", "test", &labels, Duration::from_secs(3600), long_ago);
    let r = raw_upload(&s, &expired, &headers, &body);
    assert_eq!(r.status, 401, "{}", r.body);
    assert!(r.body.contains("expired"), "{}", r.body);

    let theirs = TokenSigner::new(&SharedKey::from_bytes(&[7u8; 32]).unwrap());
    let forged = theirs.issue(
        "test",
        "test",
        &labels,
        Duration::from_secs(3600),
        SystemTime::now(),
    );
    let r = raw_upload(&s, &forged, &headers, &body);
    assert_eq!(r.status, 401, "{}", r.body);

    // A token we signed ourselves is good: the shared key works across processes.
    let good = ours.issue(
        "test",
        "test",
        &labels,
        Duration::from_secs(3600),
        SystemTime::now(),
    );
    let r = raw_upload(&s, &good, &headers, &body);
    assert_eq!(r.status, 200, "{}", r.body);
}

#[test]
fn bad_bodies() {
    let dir = TempDir::new("bodies");
    let s = start(
        &dir,
        &[
            "--max-upload-bytes",
            "500000",
            "--max-decompressed-bytes",
            "1000000",
        ],
    );
    let token = s.upload_token("secret", "test");
    let pd = [("Content-Type", PROTO_DELIMITED)];
    let pd_snappy = [
        ("Content-Type", PROTO_DELIMITED),
        ("Content-Encoding", "snappy"),
    ];
    let encoded = |f: &[MetricFamily]| snappy::encode_framed(&delimited::encode(f));

    // Someone else's cluster id on a series.
    let r = s.upload(&token, &families(Some("other"), 1, now_ms()));
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(r.body.contains("_id=\"other\""), "{}", r.body);

    // Over the compressed cap.
    let r = raw_upload(&s, &token, &pd, &vec![0u8; 600_000]);
    assert_eq!(r.status, 413, "{}", r.body);

    // A snappy bomb: small on the wire, over the decompressed cap.
    let bomb = snappy::encode_framed(&vec![0u8; 4 << 20]);
    assert!(bomb.len() < 500_000, "bomb is {} bytes", bomb.len());
    let r = raw_upload(&s, &token, &pd_snappy, &bomb);
    assert_eq!(r.status, 413, "{}", r.body);

    let r = raw_upload(&s, &token, &pd, b"this is not protobuf at all");
    assert_eq!(r.status, 400, "{}", r.body);
    let r = raw_upload(&s, &token, &pd_snappy, b"not snappy either");
    assert_eq!(r.status, 400, "{}", r.body);

    let good = encoded(&families(None, 1, now_ms()));
    let r = raw_upload(
        &s,
        &token,
        &[
            ("Content-Type", "application/json"),
            ("Content-Encoding", "snappy"),
        ],
        &good,
    );
    assert_eq!(r.status, 415, "{}", r.body);
    let r = raw_upload(
        &s,
        &token,
        &[
            ("Content-Type", PROTO_DELIMITED),
            ("Content-Encoding", "gzip"),
        ],
        &good,
    );
    assert_eq!(r.status, 415, "{}", r.body);

    let day_ago = now_ms() - 25 * 3600 * 1000;
    let r = s.upload(&token, &families(None, 1, day_ago));
    assert_eq!(r.status, 400, "{}", r.body);
    let later = now_ms() + 3600 * 1000;
    let r = s.upload(&token, &families(None, 1, later));
    assert_eq!(r.status, 400, "{}", r.body);

    let mut f = families(None, 3, now_ms());
    f[1].metric[2].timestamp_ms = Some(now_ms() - 60_000);
    let r = s.upload(&token, &f);
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("test_metric"), "{}", r.body);

    let r = get(&s.url("/upload"), &[]);
    assert_eq!(r.status, 405);

    // Nothing of the above was stored.
    assert!(series_lines(&s.federate()).is_empty());
    let r = s.upload(&token, &families(None, 2, now_ms()));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(series_lines(&s.federate()).len(), 3);
}

#[test]
fn rate_limit() {
    let dir = TempDir::new("ratelimit");
    let s = start(&dir, &["--ratelimit", "1h"]);
    let token = s.upload_token("secret", "test");

    // A rejected upload does not use the slot.
    let r = s.upload(&token, &families(Some("other"), 1, now_ms()));
    assert_eq!(r.status, 403, "{}", r.body);
    let r = s.upload(&token, &families(None, 1, now_ms()));
    assert_eq!(r.status, 200, "{}", r.body);

    let r = s.upload(&token, &families(None, 1, now_ms()));
    assert_eq!(r.status, 429, "{}", r.body);
    let retry: u64 = r.header("Retry-After").unwrap().parse().unwrap();
    // Accepted from a quarter of the window before it is due (the client's own schedule).
    assert!(retry > 2600 && retry <= 2700, "{retry}");
    assert!(
        r.body.starts_with("rate limited: next upload accepted in "),
        "{}",
        r.body
    );

    // The 429 comes from the head: a sender over its limit is answered before its body is read
    // (here a head declaring a megabyte that never comes).
    let mut tcp = std::net::TcpStream::connect(s.external).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    use std::io::{Read, Write};
    write!(
        tcp,
        "POST /upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Length: 1000000\r\n\r\n"
    )
    .unwrap();
    let mut head = [0u8; 64];
    let n = tcp.read(&mut head).unwrap();
    let head = String::from_utf8_lossy(&head[..n]);
    assert!(head.starts_with("HTTP/1.1 429 "), "{head}");

    // Other clusters have their own slot.
    let other = s.upload_token("secret", "other");
    let r = s.upload(&other, &families(None, 1, now_ms()));
    assert_eq!(r.status, 200, "{}", r.body);
}

/// The server's CPU time so far (user + system), from `/proc`.
fn cpu_time(s: &ServerProcess) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", s.child.id())).unwrap();
    // After the command name in parentheses: state is field 3, utime and stime fields 14 and 15.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(ticks * 1000 / per_second)
}

/// The median of `samples`.
fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

/// One token, many maximum-size uploads that are refused only at their last series: the server
/// reads the first few (the cluster's refusal budget) and answers every other one 429 before
/// reading it, so they cost next to no CPU, and a bystander pushing meanwhile is not slowed down.
#[test]
fn refused_uploads_cost_the_sender_and_not_the_bystander() {
    const SERIES: usize = 20_000;
    const ATTACKERS: usize = 4;
    const TRIES: usize = 25;
    let dir = TempDir::new("refusal-budget");
    let max_series = SERIES.to_string();
    let s = start(&dir, &["--ratelimit", "1h", "--max-series", &max_series]);
    // As big as the caps allow, valid to the last series, whose timestamp goes backwards.
    let ts = now_ms();
    let mut attack = families(Some("test"), SERIES - 1, ts);
    attack[1].metric[SERIES - 2].timestamp_ms = Some(ts - 1);
    let attack = snappy::encode_framed(&delimited::encode(&attack));
    let attacker = s.upload_token("secret", "test");
    let bystander = |i: usize| s.upload_token("wild", &format!("bystander-{i}"));
    let bystander_upload = |token: &str| {
        let started = std::time::Instant::now();
        let r = s.upload(token, &families(None, 20, now_ms()));
        assert_eq!(r.status, 200, "{}", r.body);
        started.elapsed()
    };
    let quiet: Vec<Duration> = (0..10).map(|i| bystander_upload(&bystander(i))).collect();

    let cpu_before = cpu_time(&s);
    let (answers, during) = std::thread::scope(|scope| {
        let attackers: Vec<_> = (0..ATTACKERS)
            .map(|_| {
                scope.spawn(|| {
                    (0..TRIES)
                        .map(|_| {
                            let r = raw_upload(
                                &s,
                                &attacker,
                                &[
                                    ("Content-Type", PROTO_DELIMITED),
                                    ("Content-Encoding", "snappy"),
                                ],
                                &attack,
                            );
                            (r.status, r.header("Retry-After").map(String::from), r.body)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let during: Vec<Duration> = (10..30).map(|i| bystander_upload(&bystander(i))).collect();
        let answers: Vec<_> = attackers
            .into_iter()
            .flat_map(|a| a.join().unwrap())
            .collect();
        (answers, during)
    });
    let cpu = cpu_time(&s) - cpu_before;
    let refused = answers.iter().filter(|(status, ..)| *status == 400).count();
    let limited = answers.iter().filter(|(status, ..)| *status == 429).count();
    println!(
        "{} attacking uploads of {} bytes: {refused} read and refused (400), {limited} answered 429 unread; \
         server CPU over the attack {cpu:?}; bystander p50 {:?} quiet, {:?} under attack",
        answers.len(),
        attack.len(),
        median(quiet),
        median(during.clone())
    );
    // Exactly the budget was read, whatever the timing; everything else was refused unread.
    assert_eq!((refused, limited), (3, ATTACKERS * TRIES - 3));
    for (status, retry_after, body) in &answers {
        if *status == 400 {
            assert!(body.contains("not in increasing order"), "{body}");
        } else {
            // One refusal comes back every 20 minutes with a one-hour window.
            let secs: u64 = retry_after.as_deref().unwrap().parse().unwrap();
            assert!(secs > 1100 && secs <= 1200, "{secs}");
            assert!(body.contains("refused or empty") && !body.trim_end().contains('\n'));
        }
    }
    let metrics = get(&s.url_internal("/metrics"), &[]).body;
    let uploads = |status: &str| {
        metric_value(
            &metrics,
            "telemeter_server_uploads_total",
            &[&format!("status=\"{status}\"")],
        )
    };
    assert_eq!(uploads("400"), 3.0, "{metrics}");
    assert_eq!(uploads("429"), (ATTACKERS * TRIES - 3) as f64, "{metrics}");
    assert_eq!(uploads("200"), 30.0, "{metrics}");
    // The cluster is locked out of reads, not forever: a valid upload is 429 too, for now.
    let r = s.upload(&attacker, &families(None, 1, now_ms()));
    assert_eq!(r.status, 429, "{}", r.body);
}

/// Retries `upload` until it is not 429, waiting what `Retry-After` says (bounded); the reply,
/// and how many 429s came first.
fn until_admitted(upload: impl Fn() -> Reply) -> (Reply, usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut limited = 0;
    loop {
        let r = upload();
        if r.status != 429 {
            return (r, limited);
        }
        limited += 1;
        assert!(
            std::time::Instant::now() < deadline,
            "still 429: {}",
            r.body
        );
        // Much more often than Retry-After asks: retrying must not push the next turn away.
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A client whose every upload is emptied by the whitelist (as an upstream client's may be) is
/// answered 200 and never locked out: each empty upload costs one refusal from a budget that
/// comes back with time alone, 429s cost nothing however often it retries, and its first real
/// upload is stored as soon as it is read.
#[test]
fn empty_uploads_never_lock_a_client_out() {
    let dir = TempDir::new("empty-uploads");
    // A 3 s window: one refusal back every second.
    let s = start(&dir, &["--ratelimit", "3s", "--whitelist", "up"]);
    let token = s.upload_token("secret", "test");
    let mut empty = families(None, 1, now_ms());
    empty.remove(0);
    for _ in 0..3 {
        let r = s.upload(&token, &empty);
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let r = s.upload(&token, &empty);
    assert_eq!(r.status, 429, "{}", r.body);
    assert_eq!(r.header("Retry-After"), Some("1"));
    for _ in 0..3 {
        let (r, limited) = until_admitted(|| s.upload(&token, &empty));
        assert_eq!(r.status, 200, "{}", r.body);
        assert!(limited > 0);
    }
    assert!(series_lines(&s.federate()).is_empty());
    let (r, _) = until_admitted(|| s.upload(&token, &families(None, 1, now_ms())));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(series_lines(&s.federate()).len(), 1);
}

#[test]
fn whitelist_filters_series() {
    let dir = TempDir::new("whitelist");
    let list = dir.file("whitelist", "# only these\ntest_metric{i=~\"[01]\"}\n");
    let s = start(
        &dir,
        &[
            "--whitelist",
            "up",
            "--whitelist-file",
            list.to_str().unwrap(),
            "--ratelimit",
            "1h",
        ],
    );
    let token = s.upload_token("secret", "test");
    // Nothing matches: 200, nothing stored, and the slot is not used.
    let mut f = families(None, 5, now_ms());
    f.remove(0);
    f[0].metric.retain(|m| m.label_value("i") == Some("4"));
    let r = s.upload(&token, &f);
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(series_lines(&s.federate()).is_empty());

    let r = s.upload(&token, &families(None, 5, now_ms()));
    assert_eq!(r.status, 200, "{}", r.body);
    let text = s.federate();
    let mut lines = series_lines(&text);
    lines.sort();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(lines[0].starts_with("test_metric{") && lines[0].contains("i=\"0\""));
    assert!(lines[1].contains("i=\"1\""));
    assert!(lines[2].starts_with("up{"));
}
