//! The hostile input catalogue: every case sends one thing an attacker (or a broken client) could
//! send, asserts the exact status and a one-line reason, then checks that the same server still
//! stores a normal upload from another cluster. Printed as a table (`--nocapture`) so a reader sees
//! what each case is about.
//!
//! Found (2026-11): the memory bombs — 8M empty series in one family (~800 KB sent, 16 MiB
//! decompressed, within every default cap) made the server allocate 1.6 GB before its 413, because
//! prost builds a whole family before the series cap is checked; fixed by counting on the wire first
//! (`server/src/prescan.rs`). Every other case already had its exact status.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use telemeter_common::base64;
use telemeter_common::bundle;
use telemeter_common::delimited;
use telemeter_common::keys::{KeyPurpose, SharedKey};
use telemeter_common::media::PROTO_DELIMITED;
use telemeter_common::model::{Gauge, LabelPair, Metric, MetricFamily, MetricType};
use telemeter_common::snappy;
use telemeter_common::token::{TokenSigner, AUDIENCE, ISSUER};

const KEY: &str = "0123456789abcdef0123456789abcdef-hostile-shared-key";
/// What `--max-upload-bytes` is set to (the default).
const MAX_UPLOAD: usize = 1 << 20;

struct Ctx<'a> {
    s: &'a ServerProcess,
    /// An upload token for cluster `test`.
    token: String,
}

impl Ctx<'_> {
    /// An upload with `token` and the headers the upstream client sends, body as given.
    fn upload_raw(&self, token: &str, body: &[u8]) -> Reply {
        post(
            &self.s.url("/upload"),
            &[
                ("Authorization", &format!("Bearer {token}")),
                ("Content-Type", PROTO_DELIMITED),
                ("Content-Encoding", "snappy"),
            ],
            body,
        )
    }

    /// An upload of `families` for cluster `test`.
    fn upload(&self, families: &[MetricFamily]) -> Reply {
        self.upload_raw(&self.token, &pd_snappy(families))
    }

    /// An upload of a protobuf-delimited body (snappy framed here) for cluster `test`.
    fn upload_pd(&self, pd: &[u8]) -> Reply {
        self.upload_raw(&self.token, &snappy::encode_framed(pd))
    }

    fn raw(&self, request: &[u8]) -> Reply {
        raw_request(self.s.external, request)
    }
}

fn pd_snappy(families: &[MetricFamily]) -> Vec<u8> {
    snappy::encode_framed(&delimited::encode(families))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Claims as our server issues them, for cluster `test`, valid for an hour from now.
fn claims() -> serde_json::Value {
    let now = unix_now();
    serde_json::json!({
        "iss": ISSUER,
        "sub": "test",
        "aud": [AUDIENCE],
        "iat": now,
        "nbf": now,
        "exp": now + 3600,
        "telemeter.openshift.io": {"labels": {"_id": "test"}},
        "cluster_id": "test",
    })
}

/// A compact JWT over `claims` with header `alg`, MACed with the upload-token key derived from
/// `shared` — so a token with bad claims but a good signature can be made.
fn sign(shared: &[u8], alg: &str, claims: &serde_json::Value) -> String {
    let key = SharedKey::from_bytes(shared)
        .unwrap()
        .derive(KeyPurpose::UploadToken);
    let signed = format!(
        "{}.{}",
        base64::encode_url(format!(r#"{{"alg":"{alg}","typ":"JWT"}}"#).as_bytes()),
        base64::encode_url(claims.to_string().as_bytes())
    );
    let tag = ring::hmac::sign(
        &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key.0),
        signed.as_bytes(),
    );
    format!("{signed}.{}", base64::encode_url(tag.as_ref()))
}

fn with_claim(name: &str, value: serde_json::Value) -> serde_json::Value {
    let mut c = claims();
    c[name] = value;
    c
}

/// One gauge family `name` with one series of `labels` at `ts`.
fn gauge(name: &str, labels: Vec<LabelPair>, value: f64, ts: i64) -> MetricFamily {
    MetricFamily {
        name: Some(name.into()),
        help: None,
        r#type: Some(MetricType::Gauge as i32),
        metric: vec![Metric {
            label: labels,
            gauge: Some(Gauge { value: Some(value) }),
            timestamp_ms: Some(ts),
            ..Default::default()
        }],
    }
}

fn varint(mut n: u64, out: &mut Vec<u8>) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// One family `tiny` (gauge) with `n` empty series, encoded by hand (building a million `Metric`
/// values just to encode them would cost the test far more than the server).
fn tiny_series(n: usize) -> Vec<u8> {
    let mut family = vec![0x0a, 4];
    family.extend_from_slice(b"tiny");
    family.extend_from_slice(&[0x18, 1]);
    for _ in 0..n {
        family.extend_from_slice(&[0x22, 0]);
    }
    let mut pd = Vec::new();
    varint(family.len() as u64, &mut pd);
    pd.extend_from_slice(&family);
    pd
}

/// One family `bomb` with one series holding `n` empty label pairs, encoded by hand.
fn empty_labels(n: usize) -> Vec<u8> {
    let mut metric = Vec::with_capacity(2 * n);
    for _ in 0..n {
        metric.extend_from_slice(&[0x0a, 0]);
    }
    let mut family = vec![0x0a, 4];
    family.extend_from_slice(b"bomb");
    family.push(0x22);
    varint(metric.len() as u64, &mut family);
    family.extend_from_slice(&metric);
    let mut pd = Vec::new();
    varint(family.len() as u64, &mut pd);
    pd.extend_from_slice(&family);
    pd
}

/// A valid body whose label value `XXXX` is swapped, byte for byte, for invalid UTF-8.
fn invalid_utf8_pd() -> Vec<u8> {
    let fam = gauge("m", vec![LabelPair::new("l", "XXXX")], 1.0, now_ms());
    let mut pd = delimited::encode(&[fam]);
    let at = pd.windows(4).position(|w| w == b"XXXX").unwrap();
    pd[at..at + 4].copy_from_slice(&[0xff, 0xfe, 0xc0, 0x80]);
    pd
}

/// A POST to `path` with `headers` and a correct Content-Length, as raw bytes.
fn raw_post(path: &str, headers: &[&str], body: &[u8]) -> Vec<u8> {
    let mut r = format!("POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
    for h in headers {
        r.push_str(h);
        r.push_str("\r\n");
    }
    r.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    let mut r = r.into_bytes();
    r.extend_from_slice(body);
    r
}

/// An `/upload` with `token`, `headers` and `Transfer-Encoding: chunked`, the chunked body as given.
fn chunked_upload(token: &str, headers: &[&str], chunked_body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "POST /upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Type: {PROTO_DELIMITED}\r\nTransfer-Encoding: chunked\r\n"
    );
    for h in headers {
        r.push_str(h);
        r.push_str("\r\n");
    }
    r.push_str("\r\n");
    let mut r = r.into_bytes();
    r.extend_from_slice(chunked_body);
    r
}

/// An `/upload` with `token` and the given coding headers, and an empty chunked body.
fn coded_upload(token: &str, headers: &[&str]) -> Vec<u8> {
    let mut r = format!("POST /upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n");
    for h in headers {
        r.push_str(h);
        r.push_str("\r\n");
    }
    r.push_str("\r\n0\r\n\r\n");
    r.into_bytes()
}

type Send = Box<dyn Fn(&Ctx) -> Reply>;

struct Case {
    name: &'static str,
    status: u16,
    /// A fragment the one-line reason must contain (case-insensitive).
    reason: &'static str,
    send: Send,
}

fn case(name: &'static str, status: u16, reason: &'static str, send: Send) -> Case {
    Case {
        name,
        status,
        reason,
        send,
    }
}

fn catalogue() -> Vec<Case> {
    let key = KEY.as_bytes();
    let mut cases = catalogue_without_unservable(key);
    // Series /federate could not serve, which would fail the central Prometheus's whole scrape.
    for upload in unservable_uploads("test") {
        let Unservable {
            name,
            content_type,
            body,
            reason,
        } = upload;
        cases.push(case(
            name,
            400,
            reason,
            Box::new(move |c| upload_as(c.s, &c.token, content_type, &body)),
        ));
    }
    cases
}

fn catalogue_without_unservable(key: &'static [u8]) -> Vec<Case> {
    vec![
        // --- tokens ---
        case(
            "no Authorization header",
            401,
            "bearer",
            Box::new(|c| {
                post(
                    &c.s.url("/upload"),
                    &[("Content-Type", PROTO_DELIMITED)],
                    b"",
                )
            }),
        ),
        case(
            "garbage bearer token",
            401,
            "well-formed",
            Box::new(|c| c.upload_raw("not.a.token", &pd_snappy(&families(None, 1, now_ms())))),
        ),
        case(
            "forged token (signed with another key)",
            401,
            "signature",
            Box::new(|c| {
                let forged = sign(&[9u8; 32], "HS256", &claims());
                c.upload_raw(&forged, &pd_snappy(&families(None, 1, now_ms())))
            }),
        ),
        case(
            "token of another telemeter deployment",
            401,
            "signature",
            Box::new(|c| {
                // A genuine token, issued by a server with another shared key.
                let theirs = TokenSigner::new(
                    &SharedKey::from_bytes(b"another-deployment-shared-key-0123456789").unwrap(),
                );
                let labels = labels(&[("_id", "test")]);
                let t = theirs.issue(
                    "test",
                    "test",
                    &labels,
                    Duration::from_secs(3600),
                    SystemTime::now(),
                );
                c.upload_raw(&t, &pd_snappy(&families(None, 1, now_ms())))
            }),
        ),
        case(
            "expired token",
            401,
            "expired",
            Box::new(move |c| {
                let t = sign(key, "HS256", &with_claim("exp", (unix_now() - 7200).into()));
                c.upload_raw(&t, &pd_snappy(&families(None, 1, now_ms())))
            }),
        ),
        case(
            "token not valid yet",
            401,
            "not valid yet",
            Box::new(move |c| {
                let t = sign(key, "HS256", &with_claim("nbf", (unix_now() + 7200).into()));
                c.upload_raw(&t, &pd_snappy(&families(None, 1, now_ms())))
            }),
        ),
        case(
            "wrong-audience token (good signature)",
            401,
            "audience",
            Box::new(move |c| {
                let t = sign(
                    key,
                    "HS256",
                    &with_claim("aud", serde_json::json!(["someone-else"])),
                );
                c.upload_raw(&t, &pd_snappy(&families(None, 1, now_ms())))
            }),
        ),
        case(
            "wrong-issuer token (good signature)",
            401,
            "issuer",
            Box::new(move |c| {
                let t = sign(key, "HS256", &with_claim("iss", "evil".into()));
                c.upload_raw(&t, &pd_snappy(&families(None, 1, now_ms())))
            }),
        ),
        case(
            "alg none token",
            401,
            "not supported",
            Box::new(|c| {
                let header = base64::encode_url(br#"{"alg":"none","typ":"JWT"}"#);
                let payload = base64::encode_url(claims().to_string().as_bytes());
                c.upload_raw(
                    &format!("{header}.{payload}."),
                    &pd_snappy(&families(None, 1, now_ms())),
                )
            }),
        ),
        case(
            "token with a control character in its cluster id",
            401,
            "no valid cluster",
            Box::new(move |c| {
                let t = sign(key, "HS256", &with_claim("cluster_id", "te\nst".into()));
                c.upload_raw(&t, &pd_snappy(&families(None, 1, now_ms())))
            }),
        ),
        case(
            "/authorize with an unknown client token",
            401,
            "",
            Box::new(|c| {
                post(
                    &c.s.url("/authorize?id=test"),
                    &[("Authorization", "Bearer nope")],
                    b"",
                )
            }),
        ),
        case(
            "/authorize for a cluster id the client token may not use",
            403,
            "",
            Box::new(|c| {
                post(
                    &c.s.url("/authorize?id=third"),
                    &[("Authorization", "Bearer secret")],
                    b"",
                )
            }),
        ),
        // --- labels the token governs ---
        case(
            "partition-label override (_id of another cluster)",
            403,
            "_id=\"other\"",
            Box::new(|c| c.upload(&families(Some("other"), 1, now_ms()))),
        ),
        // --- sizes and compression ---
        case(
            "body over the cap (declared length)",
            413,
            "over the limit",
            Box::new(|c| {
                let mut r = format!(
                "POST /upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Length: {}\r\n\r\n",
                c.token,
                MAX_UPLOAD + 1
            )
            .into_bytes();
                r.extend_from_slice(&[0u8; 1024]);
                c.raw(&r)
            }),
        ),
        case(
            "upload head without a token, 1 MB declared, no body sent",
            401,
            "bearer",
            Box::new(|c| {
                // Refused from the head: a server that waited for the body would see the end of
                // the stream instead and answer nothing.
                c.raw(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n")
            }),
        ),
        case(
            "upload head with a forged token, chunked, no body sent",
            401,
            "signature",
            Box::new(|c| {
                let forged = sign(&[9u8; 32], "HS256", &claims());
                c.raw(format!("POST /upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {forged}\r\nTransfer-Encoding: chunked\r\n\r\n").as_bytes())
            }),
        ),
        // --- request smuggling and chunked framing (RFC 9112 §6, §7.1) ---
        case(
            "Transfer-Encoding and Content-Length together",
            400,
            "both Transfer-Encoding and Content-Length",
            Box::new(|c| {
                c.raw(&chunked_upload(
                    &c.token,
                    &["Content-Length: 5"],
                    b"5\r\nhello\r\n0\r\n\r\n",
                ))
            }),
        ),
        case(
            "Content-Length before Transfer-Encoding",
            400,
            "both Transfer-Encoding and Content-Length",
            Box::new(|c| {
                c.raw(format!("POST /upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Length: 13\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET / HTTP/1.1\r\n\r\n", c.token).as_bytes())
            }),
        ),
        case(
            "Transfer-Encoding: gzip, chunked",
            501,
            "only Transfer-Encoding: chunked",
            Box::new(|c| {
                c.raw(&coded_upload(
                    &c.token,
                    &["Transfer-Encoding: gzip, chunked"],
                ))
            }),
        ),
        case(
            "Transfer-Encoding: chunked, chunked",
            501,
            "only Transfer-Encoding: chunked",
            Box::new(|c| {
                c.raw(&coded_upload(
                    &c.token,
                    &["Transfer-Encoding: chunked, chunked"],
                ))
            }),
        ),
        case(
            "Transfer-Encoding: chunked twice, as two headers",
            501,
            "only Transfer-Encoding: chunked",
            Box::new(|c| {
                c.raw(&coded_upload(
                    &c.token,
                    &["Transfer-Encoding: chunked", "Transfer-Encoding: chunked"],
                ))
            }),
        ),
        case(
            "Transfer-Encoding: identity",
            501,
            "only Transfer-Encoding: chunked",
            Box::new(|c| c.raw(&coded_upload(&c.token, &["Transfer-Encoding: identity"]))),
        ),
        case(
            "Transfer-Encoding in an HTTP/1.0 request",
            400,
            "HTTP/1.0",
            Box::new(|c| {
                c.raw(format!("POST /upload HTTP/1.0\r\nAuthorization: Bearer {}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", c.token).as_bytes())
            }),
        ),
        case(
            "chunk size not a hex number",
            400,
            "not a hex number",
            Box::new(|c| c.raw(&chunked_upload(&c.token, &[], b"zz\r\nhello\r\n0\r\n\r\n"))),
        ),
        case(
            "chunk size overflow (17 hex digits)",
            400,
            "more than 16 hex digits",
            Box::new(|c| {
                c.raw(&chunked_upload(
                    &c.token,
                    &[],
                    b"10000000000000005\r\nhello\r\n0\r\n\r\n",
                ))
            }),
        ),
        case(
            "chunk size of 2^64 - 1",
            413,
            "chunked body is over the limit",
            Box::new(|c| {
                c.raw(&chunked_upload(
                    &c.token,
                    &[],
                    b"ffffffffffffffff\r\nhello\r\n",
                ))
            }),
        ),
        case(
            "chunk data not followed by CRLF",
            400,
            "not followed by CRLF",
            Box::new(|c| c.raw(&chunked_upload(&c.token, &[], b"5\r\nhelloXY0\r\n\r\n"))),
        ),
        case(
            "chunk-size line over 4 KiB",
            400,
            "longer than 4096",
            Box::new(|c| {
                let mut body = b"1;".to_vec();
                body.extend_from_slice(&[b'x'; 5000]);
                c.raw(&chunked_upload(&c.token, &[], &body))
            }),
        ),
        case(
            "chunked body over the cap, refused before it is all sent",
            413,
            "chunked body is over the limit of 1048576 bytes",
            Box::new(|c| {
                // 17 chunks of 64 KiB and no last chunk: only a server that counts as chunks
                // arrive can answer; one waiting for the end would see the stream end first.
                let mut body = Vec::new();
                for _ in 0..17 {
                    body.extend_from_slice(b"10000\r\n");
                    body.extend_from_slice(&[7u8; 1 << 16]);
                    body.extend_from_slice(b"\r\n");
                }
                c.raw(&chunked_upload(&c.token, &[], &body))
            }),
        ),
        case(
            "chunked snappy bomb",
            413,
            "decompressed",
            Box::new(|c| {
                let bomb = snappy::encode_framed(&vec![0u8; 20 << 20]);
                let mut body = Vec::new();
                for piece in bomb.chunks(4000) {
                    body.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
                    body.extend_from_slice(piece);
                    body.extend_from_slice(b"\r\n");
                }
                body.extend_from_slice(b"0\r\n\r\n");
                c.raw(&chunked_upload(
                    &c.token,
                    &["Content-Encoding: snappy"],
                    &body,
                ))
            }),
        ),
        case(
            "chunked body that stalls (--body-timeout 2s)",
            408,
            "body took too long",
            Box::new(|c| {
                let started = std::time::Instant::now();
                let r = raw_request_then_stall(
                    c.s.external,
                    &chunked_upload(&c.token, &[], b"100\r\nonly part of the chunk"),
                );
                let took = started.elapsed();
                assert!(took < Duration::from_secs(10), "the 408 took {took:?}");
                r
            }),
        ),
        // --- header hygiene (RFC 9112 §2.2, §5) ---
        case(
            "lone LF line ends",
            400,
            "lone LF",
            Box::new(|c| c.raw(b"GET /healthz HTTP/1.1\nHost: x\n\n")),
        ),
        case(
            "a control character in a header value",
            400,
            "control character",
            Box::new(|c| c.raw(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Evil: a\x1b[2Jb\r\n\r\n")),
        ),
        case(
            "a NUL in a header value",
            400,
            "control character",
            Box::new(|c| c.raw(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Evil: a\x00b\r\n\r\n")),
        ),
        case(
            "a folded header line (obs-fold)",
            400,
            "obs-fold",
            Box::new(|c| c.raw(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n")),
        ),
        case(
            "snappy bomb (small body, huge decompressed size)",
            413,
            "decompressed",
            Box::new(|c| {
                // The framed format caps a chunk at 64 KiB, so ~21:1 is the best ratio it allows:
                // 20 MiB of zeros fit under the 1 MiB body cap and are over the 16 MiB decompressed one.
                let bomb = snappy::encode_framed(&vec![0u8; 20 << 20]);
                assert!(bomb.len() < MAX_UPLOAD, "bomb is {} bytes", bomb.len());
                c.upload_raw(&c.token, &bomb)
            }),
        ),
        case(
            "garbage snappy",
            400,
            "snappy",
            Box::new(|c| c.upload_raw(&c.token, b"\xff\x06\x00\x00sNaPpY\x01\x05\x00\x00garbage")),
        ),
        case(
            "truncated protobuf",
            400,
            "protobuf",
            Box::new(|c| {
                let pd = delimited::encode(&families(None, 10, now_ms()));
                c.upload_pd(&pd[..pd.len() - 7])
            }),
        ),
        case(
            "garbage protobuf",
            400,
            "protobuf",
            Box::new(|c| {
                c.upload_pd(b"\x20this is not a MetricFamily at all, only text pretending...")
            }),
        ),
        case(
            "varint overflow in the length prefix",
            400,
            "protobuf",
            Box::new(|c| {
                let mut pd = vec![0xffu8; 11];
                pd.extend_from_slice(b"\x0a\x01m");
                c.upload_pd(&pd)
            }),
        ),
        case(
            "a family with 1M tiny series",
            413,
            "series",
            Box::new(|c| c.upload_pd(&tiny_series(1_000_000))),
        ),
        case(
            "memory bomb: 8M empty series, 16 MiB decompressed",
            413,
            "more than 100000 series",
            Box::new(|c| {
                // Within every byte cap (~800 KB sent); decoded, it would take 1.6 GB.
                let pd = tiny_series((16 << 20) / 2 - 16);
                assert!(pd.len() <= 16 << 20);
                c.upload_pd(&pd)
            }),
        ),
        case(
            "memory bomb: 7M empty label pairs on one series",
            413,
            "would take more than",
            Box::new(|c| c.upload_pd(&empty_labels(7_000_000))),
        ),
        // --- values and timestamps ---
        case(
            "timestamp far in the past (1970)",
            400,
            "too old",
            Box::new(|c| c.upload(&[gauge("m", vec![], 1.0, 1_000)])),
        ),
        case(
            "timestamp far in the future (year 3000)",
            400,
            "future",
            Box::new(|c| c.upload(&[gauge("m", vec![], 1.0, 32_503_680_000_000)])),
        ),
        case(
            "negative timestamp",
            400,
            "too old",
            Box::new(|c| c.upload(&[gauge("m", vec![], 1.0, i64::MIN)])),
        ),
        case(
            "sample without a timestamp",
            400,
            "no timestamp",
            Box::new(|c| {
                let mut f = gauge("m", vec![], 1.0, 0);
                f.metric[0].timestamp_ms = None;
                c.upload(&[f])
            }),
        ),
        case(
            "timestamps decreasing within a family",
            400,
            "increasing",
            Box::new(|c| {
                let mut f = families(None, 3, now_ms());
                f[1].metric[2].timestamp_ms = Some(now_ms() - 60_000);
                c.upload(&f)
            }),
        ),
        // --- names and labels ---
        case(
            "invalid UTF-8 in a label value (protobuf)",
            400,
            "protobuf",
            Box::new(|c| c.upload_pd(&invalid_utf8_pd())),
        ),
        case(
            "invalid UTF-8 in a text upload",
            400,
            "text",
            Box::new(|c| {
                let body = format!("m{{l=\"\u{1}\"}} 1 {}\n", now_ms()).replace('\u{1}', "\u{0}");
                let mut bytes = body.into_bytes();
                let at = bytes.iter().position(|b| *b == 0).unwrap();
                bytes[at] = 0xff;
                post(
                    &c.s.url("/upload"),
                    &[
                        ("Authorization", &format!("Bearer {}", c.token)),
                        ("Content-Type", "text/plain; version=0.0.4"),
                    ],
                    &bytes,
                )
            }),
        ),
        case(
            "over-long label name (300 bytes)",
            400,
            "invalid labels",
            Box::new(|c| {
                c.upload(&[gauge(
                    "m",
                    vec![LabelPair::new(&"n".repeat(300), "v")],
                    1.0,
                    now_ms(),
                )])
            }),
        ),
        case(
            "over-long label value (3000 bytes)",
            400,
            "invalid labels",
            Box::new(|c| {
                c.upload(&[gauge(
                    "m",
                    vec![LabelPair::new("l", &"v".repeat(3000))],
                    1.0,
                    now_ms(),
                )])
            }),
        ),
        case(
            "over-long metric name (300 bytes)",
            400,
            "name",
            Box::new(|c| c.upload(&[gauge(&"m".repeat(300), vec![], 1.0, now_ms())])),
        ),
        case(
            "duplicate label names",
            400,
            "more than once",
            Box::new(|c| {
                c.upload(&[gauge(
                    "m",
                    vec![LabelPair::new("a", "1"), LabelPair::new("a", "2")],
                    1.0,
                    now_ms(),
                )])
            }),
        ),
        case(
            "invalid label name",
            400,
            "invalid",
            Box::new(|c| c.upload(&[gauge("m", vec![LabelPair::new("a-b", "1")], 1.0, now_ms())])),
        ),
        case(
            "65 labels on one series",
            400,
            "labels",
            Box::new(|c| {
                let many = (0..65)
                    .map(|i| LabelPair::new(&format!("l{i}"), "v"))
                    .collect();
                c.upload(&[gauge("m", many, 1.0, now_ms())])
            }),
        ),
        case(
            "unknown metric type",
            400,
            "unknown type",
            Box::new(|c| {
                let mut f = gauge("m", vec![], 1.0, now_ms());
                f.r#type = Some(99);
                c.upload(&[f])
            }),
        ),
        // --- HTTP ---
        case(
            "unknown Content-Type",
            415,
            "Content-Type",
            Box::new(|c| {
                post(
                    &c.s.url("/upload"),
                    &[
                        ("Authorization", &format!("Bearer {}", c.token)),
                        ("Content-Type", "application/json"),
                    ],
                    b"{}",
                )
            }),
        ),
        case(
            "unknown Content-Encoding",
            415,
            "Content-Encoding",
            Box::new(|c| {
                post(
                    &c.s.url("/upload"),
                    &[
                        ("Authorization", &format!("Bearer {}", c.token)),
                        ("Content-Encoding", "br"),
                    ],
                    b"x",
                )
            }),
        ),
        case(
            "GET /upload",
            405,
            "POST",
            Box::new(|c| get(&c.s.url("/upload"), &[])),
        ),
        case(
            "PUT /upload",
            405,
            "POST",
            Box::new(|c| {
                c.raw(b"PUT /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            }),
        ),
        case(
            "GET /authorize",
            405,
            "POST",
            Box::new(|c| get(&c.s.url("/authorize?id=test"), &[])),
        ),
        case(
            "huge header (64 KiB)",
            431,
            "",
            Box::new(|c| {
                let big = format!("X-Big: {}", "a".repeat(64 << 10));
                c.raw(&raw_post("/upload", &[&big], b""))
            }),
        ),
        case(
            "many headers (4,000)",
            431,
            "",
            Box::new(|c| {
                let many: Vec<String> = (0..4000).map(|i| format!("X-H{i}: 1")).collect();
                let refs: Vec<&str> = many.iter().map(String::as_str).collect();
                c.raw(&raw_post("/upload", &refs, b""))
            }),
        ),
        case(
            "many small header fields (200, under the byte cap)",
            431,
            "more than 128 header fields",
            Box::new(|c| {
                let many: Vec<String> = (0..200).map(|i| format!("X-H{i}: 1")).collect();
                let refs: Vec<&str> = many.iter().map(String::as_str).collect();
                c.raw(&raw_post("/upload", &refs, b""))
            }),
        ),
        case(
            "garbage request line",
            400,
            "",
            Box::new(|c| c.raw(b"\x16\x03\x01 hello there\r\n\r\n")),
        ),
        case(
            "conflicting Content-Length headers",
            400,
            "Content-Length",
            Box::new(|c| {
                c.raw(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab")
            }),
        ),
        case(
            "unsupported HTTP version",
            505,
            "HTTP/1",
            Box::new(|c| c.raw(b"GET /healthz HTTP/3.0\r\nHost: x\r\n\r\n")),
        ),
        // --- /import (air-gap bundles, authenticated by their tag) ---
        case(
            "import: GET",
            405,
            "only POST",
            Box::new(|c| get(&c.s.url("/import"), &[])),
        ),
        case(
            "import: not a bundle",
            400,
            "not a telemeter bundle",
            Box::new(|c| import(c, b"hello".to_vec())),
        ),
        case(
            "import: a flipped byte in the upload",
            403,
            "tag does not verify",
            Box::new(|c| {
                let mut b = sealed("test", "secret", &pd_snappy(&families(None, 1, now_ms())));
                let i = b.len() - bundle::TAG_BYTES - 2;
                b[i] ^= 0x01;
                import(c, b)
            }),
        ),
        case(
            "import: truncated",
            400,
            "truncated",
            Box::new(|c| {
                let b = sealed("test", "secret", &pd_snappy(&families(None, 1, now_ms())));
                import(c, b[..b.len() - 1].to_vec())
            }),
        ),
        case(
            "import: re-labelled for another cluster the token may not push for",
            403,
            "tag does not verify",
            Box::new(|c| {
                let mut b = sealed("test", "secret", &pd_snappy(&families(None, 1, now_ms())));
                // The header's `cluster=test` made `cluster=tesu`: same length, other cluster.
                let at = b.windows(12).position(|w| w == b"cluster=test").unwrap() + 11;
                b[at] = b'u';
                import(c, b)
            }),
        ),
        case(
            "import: made with a token not in the tokens file",
            403,
            "tag does not verify",
            Box::new(|c| {
                import(
                    c,
                    sealed("test", "revoked", &pd_snappy(&families(None, 1, now_ms()))),
                )
            }),
        ),
        case(
            "import: a header declaring a body over the cap",
            413,
            "over the limit",
            Box::new(|c| {
                let mut b = b"TELEMETER-BUNDLE/1\ncluster=test\ncreated_ms=1\nbody_bytes=".to_vec();
                b.extend_from_slice(format!("{}\n\nxx", MAX_UPLOAD + 1).as_bytes());
                import(c, b)
            }),
        ),
        case(
            "import: a body over the front's cap",
            413,
            "over the limit",
            Box::new(|c| import(c, vec![b'x'; MAX_UPLOAD + (64 << 10)])),
        ),
        case(
            "import: a valid tag over an upload that is not snappy",
            400,
            "invalid snappy body",
            Box::new(|c| import(c, sealed("test", "secret", b"not snappy at all"))),
        ),
        case(
            "import: a valid tag over an upload claiming another cluster's label",
            403,
            "_id",
            Box::new(|c| {
                import(
                    c,
                    sealed(
                        "test",
                        "secret",
                        &pd_snappy(&families(Some("other"), 1, now_ms())),
                    ),
                )
            }),
        ),
    ]
}

/// A bundle of `body` for `cluster`, tagged with the key of client token `token`.
fn sealed(cluster: &str, token: &str, body: &[u8]) -> Vec<u8> {
    bundle::Bundle {
        cluster_id: cluster.into(),
        created_ms: now_ms() as u64,
        body: body.to_vec(),
    }
    .seal(&bundle::key_of(token))
}

/// `POST /import` of `bundle`.
fn import(c: &Ctx, bundle: Vec<u8>) -> Reply {
    post(&c.s.url("/import"), &[], &bundle)
}

fn start(dir: &TempDir) -> ServerProcess {
    let max_upload = MAX_UPLOAD.to_string();
    ServerProcess::setup(dir)
        .key(KEY)
        .args(&["--max-upload-bytes", &max_upload, "--body-timeout", "2s"])
        .start()
}

#[test]
fn hostile_inputs_get_exact_statuses_and_the_server_keeps_serving() {
    let dir = TempDir::new("hostile");
    let mut s = start(&dir);
    let ctx = Ctx {
        s: &s,
        token: s.upload_token("secret", "test"),
    };
    let bystander = s.upload_token("wild", "bystander");
    let cases = catalogue();
    assert!(cases.len() >= 25, "only {} cases", cases.len());
    let mut failures = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let r = (case.send)(&ctx);
        let line = r.body.trim_end();
        println!(
            "{:>2} {:<55} → {} {:?}",
            i + 1,
            case.name,
            r.status,
            line.chars().take(110).collect::<String>()
        );
        if r.status != case.status {
            failures.push(format!(
                "{}: status {} (want {}): {line}",
                case.name, r.status, case.status
            ));
        }
        if line.is_empty() || line.contains('\n') {
            failures.push(format!("{}: reason is not one line: {line:?}", case.name));
        }
        if !line.to_lowercase().contains(&case.reason.to_lowercase()) {
            failures.push(format!(
                "{}: reason {line:?} does not say {:?}",
                case.name, case.reason
            ));
        }
        // The server is alive and stores a normal upload from someone else.
        let ok = ctx.upload_raw(&bystander, &pd_snappy(&families(None, 2, now_ms())));
        if ok.status != 200 {
            failures.push(format!(
                "{}: a normal upload afterwards got {}: {}",
                case.name, ok.status, ok.body
            ));
        }
    }
    drop(ctx);
    assert!(
        s.child.try_wait().unwrap().is_none(),
        "the server exited during the catalogue"
    );
    // Nothing of cluster `test` was stored by any of the cases; the bystander is served.
    let text = s.federate();
    assert!(!text.contains("_id=\"test\""), "{text}");
    assert_eq!(
        series_lines(&text)
            .iter()
            .filter(|l| l.contains("_id=\"bystander\""))
            .count(),
        3,
        "{text}"
    );
    // No handler panicked (a panic would be a 500 and an error line).
    let panics = s
        .logs
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("panicked"))
        .count();
    assert_eq!(panics, 0);
    // The memory bombs were refused before they were built.
    let status = std::fs::read_to_string(format!("/proc/{}/status", s.child.id())).unwrap();
    let hwm_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    println!("server peak resident memory over the catalogue: {hwm_kib} KiB");
    assert!(hwm_kib < 256 << 10, "the server peaked at {hwm_kib} KiB");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    s.signal_and_wait(Signal::Term);
}

/// NaN and ±Inf are valid Prometheus sample values (NaN is even the staleness marker): they are
/// stored and served, not refused.
#[test]
fn nan_and_infinities_are_stored_and_served() {
    let dir = TempDir::new("hostile-nan");
    let s = start(&dir);
    let token = s.upload_token("secret", "test");
    let ts = now_ms();
    let r = s.upload(
        &token,
        &[
            gauge("v", vec![LabelPair::new("k", "nan")], f64::NAN, ts),
            gauge("w", vec![LabelPair::new("k", "inf")], f64::INFINITY, ts),
            gauge(
                "x",
                vec![LabelPair::new("k", "-inf")],
                f64::NEG_INFINITY,
                ts,
            ),
        ],
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let text = s.federate();
    assert!(
        text.contains("v{k=\"nan\",_id=\"test\"} NaN") || text.contains("} NaN"),
        "{text}"
    );
    assert!(text.contains("} +Inf"), "{text}");
    assert!(text.contains("} -Inf"), "{text}");
}

// ---------------------------------------------------------------------------------------------
// The cluster's ports: gossip datagrams and forwarded pushes

use std::net::UdpSocket;
use telemeter_server::cluster::forward::{ForwardKind, Sealer};
use telemeter_server::cluster::packet::{Heartbeat, Keyring, HEADER_LEN};

fn gossip_dropped(s: &ServerProcess, reason: &str) -> f64 {
    let metrics = get(&s.url_internal("/metrics"), &[]).body;
    metric_value(
        &metrics,
        "telemeter_server_gossip_dropped_packets_total",
        &[&format!("reason=\"{reason}\"")],
    )
}

/// Waits (bounded) until the drop counter for `reason` reaches `want`; the value seen.
fn wait_dropped(s: &ServerProcess, reason: &str, want: f64) -> f64 {
    let mut seen = 0.0;
    wait_until(Duration::from_secs(10), || {
        seen = gossip_dropped(s, reason);
        seen >= want
    });
    seen
}

#[test]
fn hostile_cluster_traffic_is_dropped_counted_or_refused() {
    let dir = TempDir::new("hostile-cluster");
    let cluster_addr = format!("127.0.0.1:{}", free_udp_port());
    let s = ServerProcess::setup(&dir)
        .key(KEY)
        .args(&[
            "--name",
            "solo",
            "--listen-cluster",
            &cluster_addr,
            "--gossip-interval",
            "200ms",
            "--peer-timeout",
            "1s",
        ])
        .start();
    let bystander = s.upload_token("wild", "bystander");
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let shared = SharedKey::from_bytes(KEY.as_bytes()).unwrap();
    let gossip_key =
        Keyring::derive(std::slice::from_ref(&shared), KeyPurpose::GossipSeal).unwrap();
    let boot = 4242;
    let heartbeat = |name: &str, seq: u64, sent_ms: u64| Heartbeat {
        name: name.into(),
        boot_id: boot,
        seq,
        sent_ms,
        internal_addr: "127.0.0.1:1".into(),
        members: vec![name.into()],
    };
    let now = || now_ms() as u64;
    let genuine = heartbeat("mallory", 10, now()).encode(&gossip_key).unwrap();
    let mut flipped = genuine.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x01;
    let other = SharedKey::from_bytes(&[9; 32]).unwrap();
    let other_key = Keyring::derive(std::slice::from_ref(&other), KeyPurpose::GossipSeal).unwrap();
    // Another key presenting our key id: only the tag can tell.
    let mut impostor = heartbeat("mallory", 2, now()).encode(&other_key).unwrap();
    impostor[1..5].copy_from_slice(&genuine[1..5]);
    let cut_tag = {
        let g = heartbeat("mallory", 5, now()).encode(&gossip_key).unwrap();
        g[..g.len() - 1].to_vec()
    };

    // (case, datagrams sent in order, the drop reason the last one must be counted under)
    let datagrams: Vec<(&str, Vec<Vec<u8>>, &str)> = vec![
        (
            "sealed with another deployment's key",
            vec![heartbeat("mallory", 1, now()).encode(&other_key).unwrap()],
            "unknown_key",
        ),
        (
            "sealed with another key under our key id",
            vec![impostor],
            "bad_mac",
        ),
        (
            "genuine heartbeat, tag cut by one byte",
            vec![cut_tag],
            "bad_mac",
        ),
        (
            "one bit flipped in a genuine heartbeat",
            vec![flipped],
            "bad_mac",
        ),
        (
            "replayed genuine heartbeat",
            vec![genuine.clone(), genuine.clone()],
            "replay",
        ),
        (
            "genuine heartbeat with an older sequence number",
            vec![heartbeat("mallory", 3, now()).encode(&gossip_key).unwrap()],
            "replay",
        ),
        (
            "genuine heartbeat sent two minutes ago",
            vec![heartbeat("mallory", 99, now() - 120_000)
                .encode(&gossip_key)
                .unwrap()],
            "clock_skew",
        ),
        (
            "genuine heartbeat from the future",
            vec![heartbeat("mallory", 100, now() + 120_000)
                .encode(&gossip_key)
                .unwrap()],
            "clock_skew",
        ),
        (
            "genuine heartbeat claiming our own name",
            vec![heartbeat("solo", 1, now()).encode(&gossip_key).unwrap()],
            "self_name",
        ),
        (
            "truncated heartbeat",
            vec![genuine[..genuine.len() / 3].to_vec()],
            "garbage",
        ),
        ("garbage datagram", vec![b"\x01garbage".to_vec()], "garbage"),
        ("empty datagram", vec![Vec::new()], "garbage"),
        (
            "oversized datagram (9,000 bytes)",
            vec![vec![1u8; 9000]],
            "oversized",
        ),
    ];
    let mut failures = Vec::new();
    for (name, packets, reason) in datagrams {
        let before = gossip_dropped(&s, reason);
        for p in &packets {
            udp.send_to(p, &cluster_addr).unwrap();
            std::thread::sleep(Duration::from_millis(20));
        }
        let after = wait_dropped(&s, reason, before + 1.0);
        println!("gossip: {name:<50} → dropped as {reason} ({before} → {after})");
        if after != before + 1.0 {
            failures.push(format!("{name}: {reason} went {before} → {after}"));
        }
        let ok = post(
            &s.url("/upload"),
            &[
                ("Authorization", &format!("Bearer {bystander}")),
                ("Content-Type", PROTO_DELIMITED),
                ("Content-Encoding", "snappy"),
            ],
            &pd_snappy(&families(None, 2, now_ms())),
        );
        if ok.status != 200 {
            failures.push(format!(
                "{name}: a normal upload afterwards got {}: {}",
                ok.status, ok.body
            ));
        }
    }

    // Forwarded pushes on the internal port.
    let url = s.url_internal("/internal/forward");
    let ours = Sealer::new(std::slice::from_ref(&shared)).unwrap();
    let theirs = Sealer::new(&[other]).unwrap();
    let body = delimited::encode(&families(Some("fwd"), 1, now_ms()));
    let sealed_to = |node: &str, sealer: &Sealer, at: SystemTime| {
        sealer
            .seal(node, "fwd", SystemTime::now(), ForwardKind::Push, &body, at)
            .unwrap()
    };
    let sealed = |sealer: &Sealer, at: SystemTime| sealed_to("solo", sealer, at);
    let send = |body: &[u8]| post(&url, &[("Content-Type", "application/octet-stream")], body);
    let genuine_forward = sealed(&ours, SystemTime::now());
    let r = send(&genuine_forward);
    assert_eq!(r.status, 200, "a genuine forward: {}", r.body);
    let flipped_forward = {
        let mut f = sealed(&ours, SystemTime::now());
        // One bit of the ciphertext, past the clear header.
        f[HEADER_LEN + 10] ^= 0x01;
        f
    };
    let cut_forward = {
        let f = sealed(&ours, SystemTime::now());
        f[..f.len() - 1].to_vec()
    };
    // (case, body, what the 401's reason must say)
    let forwards: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "plain families, not sealed",
            body.clone(),
            "malformed forward",
        ),
        (
            "forward sealed with another key",
            sealed(&theirs, SystemTime::now()),
            "which is not ours",
        ),
        (
            "genuine forward with one flipped bit",
            flipped_forward,
            "does not open",
        ),
        (
            "genuine forward, tag cut by one byte",
            cut_forward,
            "does not open",
        ),
        (
            "replayed genuine forward",
            genuine_forward.clone(),
            "replayed",
        ),
        (
            "genuine forward sealed ten minutes ago",
            sealed(&ours, SystemTime::now() - Duration::from_secs(600)),
            "away from our clock",
        ),
        (
            // Captured on its way to another node of the cluster and replayed here: our replay
            // cache has never seen it, the destination inside the seal catches it.
            "genuine forward sealed for another node",
            sealed_to("node-b", &ours, SystemTime::now()),
            "addressed to node \"node-b\"",
        ),
    ];
    let unauthorized = || {
        metric_value(
            &get(&s.url_internal("/metrics"), &[]).body,
            "telemeter_server_cluster_forwards_received_total",
            &["result=\"unauthorized\""],
        )
    };
    for (name, body, reason) in forwards {
        let before = unauthorized();
        let r = send(&body);
        let line = r.body.trim_end();
        println!("forward: {name:<44} → {} {line:?}", r.status);
        if r.status != 401 || !line.contains(reason) || line.contains('\n') {
            failures.push(format!(
                "{name}: {} {line:?}, want 401 saying {reason:?}",
                r.status
            ));
        }
        let after = unauthorized();
        if after != before + 1.0 {
            failures.push(format!("{name}: unauthorized went {before} → {after}"));
        }
        let ok = post(
            &s.url("/upload"),
            &[
                ("Authorization", &format!("Bearer {bystander}")),
                ("Content-Type", PROTO_DELIMITED),
                ("Content-Encoding", "snappy"),
            ],
            &pd_snappy(&families(None, 2, now_ms())),
        );
        if ok.status != 200 {
            failures.push(format!(
                "{name}: a normal upload afterwards got {}: {}",
                ok.status, ok.body
            ));
        }
    }
    // Only the genuine forward and the bystander were stored.
    let text = s.federate();
    let fwd = series_lines(&text)
        .iter()
        .filter(|l| l.contains("_id=\"fwd\""))
        .count();
    assert_eq!(fwd, 2, "{text}");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
