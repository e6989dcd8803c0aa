//! `/upload` against the real binary, starting with a byte-for-byte replay of what the upstream Go
//! client (2018–2019 releases) sends.

mod common;

use std::time::{Duration, SystemTime};

use common::*;
use telemeter_common::delimited;
use telemeter_common::media::PROTO_DELIMITED;
use telemeter_common::model::MetricFamily;
use telemeter_common::snappy;
use telemeter_common::token::{SharedKey, TokenSigner};

const KEY: &str = "0123456789abcdef0123456789abcdef-test-shared-key";

fn start(dir: &TempDir, extra: &[&str]) -> ServerProcess {
    let tokens = dir.file("tokens", TOKENS);
    let key = dir.file("key", KEY);
    let mut args = vec![
        "--tokens-file",
        tokens.to_str().unwrap(),
        "--shared-key",
        key.to_str().unwrap(),
    ];
    if !extra.contains(&"--ratelimit") {
        args.extend(["--ratelimit", "0s"]);
    }
    args.extend_from_slice(extra);
    // The paths live in `dir`, which outlives the server.
    let args: Vec<String> = args.into_iter().map(String::from).collect();
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    ServerProcess::start(&dir.path().join("data"), &refs)
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
    assert!(retry > 3500 && retry <= 3600, "{retry}");
    assert!(
        r.body.starts_with("rate limited: next upload accepted in "),
        "{}",
        r.body
    );

    // Other clusters have their own slot.
    let other = s.upload_token("secret", "other");
    let r = s.upload(&other, &families(None, 1, now_ms()));
    assert_eq!(r.status, 200, "{}", r.body);
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
