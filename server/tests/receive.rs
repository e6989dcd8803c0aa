//! `POST /metrics/v1/receive` against the real binary: a real Prometheus (server and agent mode)
//! remote-writing to it, its series on `/federate` and shipped on to a second Prometheus; every
//! refusal with its status, reason and counter, followed by a bystander that still gets 200 while
//! nothing earlier is lost; merging of partial batches, concurrent ones included; a request
//! through a non-owner of a 2-node cluster stored on the owner; a request run on its connection's
//! thread under SCHED_BATCH.

mod common;

use std::net::UdpSocket;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use prost::Message;
use telemeter_common::snappy;
use telemeter_server::cluster::ring::{HashRing, DEFAULT_VNODES};
use telemeter_server::receive::auth::bearer_for;
use telemeter_server::remote_write::proto::{Label, Sample, TimeSeries, WriteRequest};

const PROMETHEUS: &str = "/usr/bin/prometheus";
const WAIT: Duration = Duration::from_secs(90);

/// A series `name{labels}` with one sample.
fn series(name: &str, labels: &[(&str, &str)], value: f64, ts: i64) -> TimeSeries {
    let mut all = vec![Label {
        name: "__name__".into(),
        value: name.into(),
    }];
    all.extend(labels.iter().map(|(n, v)| Label {
        name: n.to_string(),
        value: v.to_string(),
    }));
    TimeSeries {
        labels: all,
        samples: vec![Sample {
            value,
            timestamp: ts,
        }],
    }
}

/// The body of a remote-write request: snappy block of the protobuf.
fn body(timeseries: Vec<TimeSeries>) -> Vec<u8> {
    snappy::encode_block(&WriteRequest { timeseries }.encode_to_vec())
}

/// POSTs `body` to `/metrics/v1/receive` as Prometheus does, with the bearer of `token` and `id`.
fn receive(s: &ServerProcess, token: &str, id: &str, body: &[u8]) -> Reply {
    receive_with(s, &format!("Bearer {}", bearer_for(token, id)), body)
}

fn receive_with(s: &ServerProcess, authorization: &str, body: &[u8]) -> Reply {
    post(
        &s.url("/metrics/v1/receive"),
        &[
            ("Authorization", authorization),
            ("Content-Encoding", "snappy"),
            ("Content-Type", "application/x-protobuf"),
            ("X-Prometheus-Remote-Write-Version", "0.1.0"),
        ],
        body,
    )
}

/// The `/federate` lines of `id`, without the last-push series.
fn federated(s: &ServerProcess, id: &str) -> Vec<String> {
    let needle = format!("_id=\"{id}\"");
    series_lines(&s.federate())
        .into_iter()
        .filter(|l| l.contains(&needle) && !l.starts_with("telemeter_last_push"))
        .map(str::to_string)
        .collect()
}

fn requests_counted(s: &ServerProcess, result: &str) -> f64 {
    let metrics = get(&s.url_internal("/metrics"), &[]).body;
    metric_value(
        &metrics,
        "telemeter_server_receive_requests_total",
        &[&format!("result=\"{result}\"")],
    )
}

fn start(dir: &TempDir, extra: &[&str]) -> ServerProcess {
    let tokens = dir.file("tokens", TOKENS);
    let mut args = vec!["--tokens-file", tokens.to_str().unwrap()];
    args.extend_from_slice(extra);
    ServerProcess::start(&dir.path().join("data"), &args)
}

/// `count(selector)` on the Prometheus at `port`, when it answers one.
fn count(port: u16, selector: &str) -> Option<u64> {
    let query = format!(
        "http://127.0.0.1:{port}/api/v1/query?query={}",
        telemeter_common::http::percent_encode(&format!("count({selector})"))
    );
    let v: serde_json::Value = serde_json::from_str(&get(&query, &[]).body).ok()?;
    v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
}

/// A Prometheus scraping itself every second and remote-writing to `receive_url` as cluster
/// `id` (token `secret`), in agent mode when `agent`.
fn sender(dir: &TempDir, receive_url: &str, id: &str, agent: bool) -> Prometheus {
    let port = free_port();
    let config = format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: self\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\nremote_write:\n  - url: {receive_url}\n    authorization:\n      credentials: {}\n    write_relabel_configs:\n      - target_label: _id\n        replacement: {id}\n    queue_config:\n      batch_send_deadline: 1s\n      retry_on_http_429: true\n      min_backoff: 100ms\n      max_backoff: 1s\n",
            bearer_for("secret", id)
    );
    let name = format!("sender-{id}");
    if agent {
        Prometheus::agent(dir, &name, &config, port)
    } else {
        Prometheus::start(dir, &name, &config, port, &[])
    }
}

#[test]
fn prometheus_and_its_agent_remote_write_to_receive_and_it_ships_on() {
    assert!(
        Path::new(PROMETHEUS).exists(),
        "{PROMETHEUS} is not installed: run `make setup` (Debian package prometheus)"
    );
    let dir = TempDir::new("receive-prom");
    // The receiver of our --remote-write-url: a Prometheus accepting remote write.
    let receiver = Prometheus::receiver(&dir, free_port());
    let s = start(&dir, &["--remote-write-url", &receiver.write_url()]);
    let url = s.url("/metrics/v1/receive");
    let prometheus = sender(&dir, &url, "test", false);

    // Bounded wait for: our /federate, the receiver and the sender itself agree on the number of
    // series (the sender's own series appear over its first scrapes, so equality is awaited).
    let deadline = Instant::now() + WAIT;
    loop {
        let sent = count(prometheus.port, "{job=\"self\"}");
        let shipped = count(receiver.port, "{_id=\"test\"}");
        let served = federated(&s, "test").len();
        if sent.is_some() && sent == shipped && sent == Some(served as u64) && served > 50 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "sender, receiver and /federate never agreed (sent, shipped, served) = {:?}",
            (sent, shipped, served)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let lines = federated(&s, "test");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("up{") && l.contains("job=\"self\"")),
        "{lines:?}"
    );
    assert!(requests_counted(&s, "stored") > 0.0);

    // The agent: nothing to query on it, but its series arrive with their _id.
    let _agent = sender(&dir, &url, "other", true);
    assert!(
        wait_until(WAIT, || federated(&s, "other")
            .iter()
            .any(|l| l.starts_with("up{") && l.contains("job=\"self\""))),
        "the agent's series never reached /federate"
    );
}

#[test]
fn refusals_are_exact_counted_and_harm_no_bystander() {
    let dir = TempDir::new("receive-refusals");
    let s = start(&dir, &["--receive-ratelimit", "1"]);
    let now = now_ms();
    let good = |name: &str, id: &str| body(vec![series(name, &[("_id", id)], 1.0, now)]);

    // Each bystander is a cluster of its own (the `wild` token), so the rate limit of one does
    // not touch the next; every one must stay served to the end.
    let mut bystanders = Vec::new();
    let mut bystander = |s: &ServerProcess, after: &str| {
        let id = format!("bystander-{}", bystanders.len());
        let r = receive(s, "wild", &id, &good("bystander_metric", &id));
        assert_eq!(r.status, 200, "bystander after {after}: {}", r.body);
        bystanders.push(id);
    };

    struct Case {
        what: &'static str,
        authorization: String,
        body: Vec<u8>,
        status: u16,
        reason: &'static str,
        result: &'static str,
    }
    let bearer = |token: &str, id: &str| format!("Bearer {}", bearer_for(token, id));
    // A small body declaring a huge decompressed length (a varint of 100 MiB, then junk).
    let mut bomb = Vec::new();
    prost::encoding::encode_varint(100 << 20, &mut bomb);
    bomb.extend_from_slice(&[0u8; 16]);
    let cases = vec![
        Case {
            what: "no bearer",
            authorization: String::new(),
            body: good("m", "test"),
            status: 401,
            reason: "",
            result: "unauthorized",
        },
        Case {
            what: "a bearer that is not base64 JSON",
            authorization: "Bearer secret".into(),
            body: good("m", "test"),
            status: 401,
            reason: "not base64",
            result: "unauthorized",
        },
        Case {
            what: "an unknown token",
            authorization: bearer("nope", "test"),
            body: good("m", "test"),
            status: 401,
            reason: "unauthorized",
            result: "unauthorized",
        },
        Case {
            what: "a cluster id the token may not push for",
            authorization: bearer("secret", "elsewhere"),
            body: good("m", "elsewhere"),
            status: 403,
            reason: "may not push for cluster \"elsewhere\"",
            result: "forbidden",
        },
        Case {
            what: "a series without _id",
            authorization: bearer("secret", "test"),
            body: body(vec![series("m", &[("a", "1")], 1.0, now)]),
            status: 400,
            reason: "series m{a=\"1\"} lacks the label _id=\"test\"",
            result: "bad_series",
        },
        Case {
            what: "a series of another cluster",
            authorization: bearer("secret", "test"),
            body: good("m", "other"),
            status: 400,
            reason: "has _id=\"other\", not the cluster id \"test\"",
            result: "bad_series",
        },
        Case {
            what: "a label named twice",
            authorization: bearer("secret", "test"),
            body: body(vec![series(
                "m",
                &[("_id", "test"), ("a", "1"), ("a", "2")],
                1.0,
                now,
            )]),
            status: 400,
            reason: "has label \"a\" more than once",
            result: "bad_series",
        },
        Case {
            what: "a reserved label",
            authorization: bearer("secret", "test"),
            body: body(vec![series(
                "m",
                &[("_id", "test"), ("__x", "1")],
                1.0,
                now,
            )]),
            status: 400,
            reason: "names starting with __ are reserved",
            result: "bad_series",
        },
        Case {
            what: "bad snappy",
            authorization: bearer("secret", "test"),
            body: b"\xff\xff\xff\xff\xff\xffnot snappy".to_vec(),
            status: 400,
            reason: "not snappy block data",
            result: "bad_snappy",
        },
        Case {
            what: "bad protobuf",
            authorization: bearer("secret", "test"),
            body: snappy::encode_block(b"\x0a\xff\xff\xff\x0f not protobuf"),
            status: 400,
            reason: "not a prometheus.WriteRequest",
            result: "bad_protobuf",
        },
        Case {
            what: "a decompression bomb",
            authorization: bearer("secret", "test"),
            body: bomb,
            status: 413,
            reason: "more than 8388608 (--receive-max-decompressed-bytes)",
            result: "too_large",
        },
    ];
    // Metadata only (WriteRequest field 3): accepted and ignored.
    let metadata = {
        let mut md = Vec::new();
        prost::encoding::string::encode(2, &"m".to_string(), &mut md);
        let mut req = Vec::new();
        prost::encoding::encode_key(3, prost::encoding::WireType::LengthDelimited, &mut req);
        prost::encoding::encode_varint(md.len() as u64, &mut req);
        req.extend_from_slice(&md);
        snappy::encode_block(&req)
    };
    let r = receive(&s, "secret", "test", &metadata);
    assert_eq!(r.status, 200, "metadata only: {}", r.body);
    let r = receive(&s, "secret", "test", &good("kept_metric", "test"));
    assert_eq!(r.status, 200, "{}", r.body);
    bystander(&s, "start");

    let mut expected: std::collections::BTreeMap<&str, f64> = Default::default();
    for case in &cases {
        let r = if case.authorization.is_empty() {
            post(
                &s.url("/metrics/v1/receive"),
                &[("Content-Encoding", "snappy")],
                &case.body,
            )
        } else {
            receive_with(&s, &case.authorization, &case.body)
        };
        assert_eq!(r.status, case.status, "{}: {}", case.what, r.body);
        assert!(r.body.contains(case.reason), "{}: {:?}", case.what, r.body);
        *expected.entry(case.result).or_default() += 1.0;
        bystander(&s, case.what);
    }

    // Over --receive-max-bytes (128 KiB by default): refused from its declared length, before
    // the body is read (sent raw: a client library may not read an answer that comes early).
    let mut head = format!(
        "POST /metrics/v1/receive HTTP/1.1\r\nHost: x\r\nAuthorization: {}\r\nContent-Encoding: snappy\r\nContent-Length: {}\r\n\r\n",
        bearer("secret", "test"),
        (128 << 10) + 1
    )
    .into_bytes();
    head.extend_from_slice(&[0u8; 1024]);
    let r = raw_request(s.external, &head);
    assert_eq!(r.status, 413, "{}", r.body);
    *expected.entry("too_large").or_default() += 1.0;
    bystander(&s, "a body over the cap");

    // Rate limited: a burst of 10 at 1/s for cluster `test` (its refusals above took some).
    let mut limited = None;
    for _ in 0..20 {
        let r = receive(&s, "secret", "test", &good("kept_metric", "test"));
        if r.status == 429 {
            limited = Some(r);
            break;
        }
        assert_eq!(r.status, 200, "{}", r.body);
        *expected.entry("stored").or_default() += 1.0;
    }
    let limited = limited.expect("20 requests at once pass a burst of 10");
    let retry: u64 = limited
        .header("Retry-After")
        .and_then(|v| v.parse().ok())
        .expect("429 carries Retry-After in seconds");
    assert!((1..=2).contains(&retry), "Retry-After {retry}");
    *expected.entry("rate_limited").or_default() += 1.0;
    bystander(&s, "a rate-limited request");

    // Wrong encoding and method.
    let r = post(
        &s.url("/metrics/v1/receive"),
        &[("Authorization", &bearer("secret", "other"))],
        &good("m", "other"),
    );
    assert_eq!(r.status, 415, "{}", r.body);
    let r = get(&s.url("/metrics/v1/receive"), &[]);
    assert_eq!(r.status, 405, "{}", r.body);

    for (result, n) in &expected {
        // Besides the cases: the first kept_metric and every bystander were stored.
        let besides = if *result == "stored" {
            1.0 + bystanders.len() as f64
        } else {
            0.0
        };
        assert_eq!(requests_counted(&s, result), *n + besides, "{result}");
    }
    assert_eq!(requests_counted(&s, "empty"), 1.0);
    assert_eq!(requests_counted(&s, "bad_encoding"), 1.0);
    assert_eq!(requests_counted(&s, "method"), 1.0);
    // Nothing accepted was lost.
    assert_eq!(
        federated(&s, "test").len(),
        1,
        "{:?}",
        federated(&s, "test")
    );
    for id in &bystanders {
        assert_eq!(federated(&s, id).len(), 1, "{id}");
    }
    // Each refusal logged with its cluster id.
    let logs = s.logs.lock().unwrap().join("\n");
    assert!(
        logs.contains("(cluster \"elsewhere\") refused: 403"),
        "{logs}"
    );
}

#[test]
fn partial_batches_merge_newer_wins_and_concurrent_ones_lose_nothing() {
    let dir = TempDir::new("receive-merge");
    let s = start(&dir, &["--receive-ratelimit", "0"]);
    let now = now_ms();
    let r = receive(
        &s,
        "secret",
        "test",
        &body(vec![series("a", &[("_id", "test")], 1.0, now - 1000)]),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let r = receive(
        &s,
        "secret",
        "test",
        &body(vec![series(
            "b",
            &[("_id", "test"), ("k", "v")],
            2.0,
            now - 1000,
        )]),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        federated(&s, "test"),
        vec!["a{_id=\"test\"} 1", "b{_id=\"test\",k=\"v\"} 2"]
    );
    // A newer value replaces; an older one does not.
    let r = receive(
        &s,
        "secret",
        "test",
        &body(vec![series("a", &[("_id", "test")], 5.0, now)]),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let r = receive(
        &s,
        "secret",
        "test",
        &body(vec![series("a", &[("_id", "test")], 9.0, now - 5000)]),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        federated(&s, "test"),
        vec!["a{_id=\"test\"} 5", "b{_id=\"test\",k=\"v\"} 2"]
    );

    // 8 senders × 10 requests of distinct series at once: all 82 series end up stored.
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let url = s.url("/metrics/v1/receive");
            std::thread::spawn(move || {
                for i in 0..10 {
                    let r = post(
                        &url,
                        &[
                            (
                                "Authorization",
                                &format!("Bearer {}", bearer_for("secret", "test")),
                            ),
                            ("Content-Encoding", "snappy"),
                        ],
                        &body(vec![series(
                            "c",
                            &[
                                ("_id", "test"),
                                ("t", &t.to_string()),
                                ("i", &i.to_string()),
                            ],
                            1.0,
                            now,
                        )]),
                    );
                    assert_eq!(r.status, 200, "{}", r.body);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let lines = federated(&s, "test");
    assert_eq!(lines.len(), 82, "{lines:?}");
}

/// A UDP port free now (bound, then released).
fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn receive_through_a_non_owner_is_stored_on_the_owner() {
    let dir = TempDir::new("receive-cluster");
    let key = dir.file(
        "shared.key",
        "0123456789abcdef0123456789abcdef-test-shared-key",
    );
    let tokens = dir.file("tokens", TOKENS);
    let names = ["node-a", "node-b"];
    let addrs = [
        format!("127.0.0.1:{}", free_udp_port()),
        format!("127.0.0.1:{}", free_udp_port()),
    ];
    let nodes: Vec<ServerProcess> = (0..2)
        .map(|i| {
            ServerProcess::start(
                &dir.path().join(names[i]),
                &[
                    "--tokens-file",
                    tokens.to_str().unwrap(),
                    "--shared-key",
                    key.to_str().unwrap(),
                    "--name",
                    names[i],
                    "--listen-cluster",
                    &addrs[i],
                    "--join",
                    &addrs[1 - i],
                    "--gossip-interval",
                    "200ms",
                    "--peer-timeout",
                    "1s",
                ],
            )
        })
        .collect();
    assert!(
        wait_until(WAIT, || nodes.iter().all(|n| {
            let debug: serde_json::Value =
                serde_json::from_str(&get(&n.url_internal("/debug/cluster"), &[]).body)
                    .unwrap_or_default();
            debug["converged"] == true && debug["alive"].as_array().is_some_and(|a| a.len() == 2)
        })),
        "the cluster never converged"
    );
    let ring = HashRing::new(&names, DEFAULT_VNODES);
    let owner = ring.owner("test").unwrap();
    let (owner_node, other_node) = if owner == "node-a" {
        (&nodes[0], &nodes[1])
    } else {
        (&nodes[1], &nodes[0])
    };
    let now = now_ms();
    for (i, name) in ["a", "b"].iter().enumerate() {
        let r = receive(
            other_node,
            "secret",
            "test",
            &body(vec![series(name, &[("_id", "test")], i as f64, now)]),
        );
        assert_eq!(r.status, 200, "{}", r.body);
    }
    // Both batches merged on the owner, nothing on the non-owner.
    let lines = federated(owner_node, "test");
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(other_node
        .federate()
        .lines()
        .all(|l| !l.contains("_id=\"test\"")));
    let received = get(&owner_node.url_internal("/metrics"), &[]).body;
    assert_eq!(
        metric_value(
            &received,
            "telemeter_server_cluster_forwards_received_total",
            &["result=\"receive\""]
        ),
        2.0,
        "{received}"
    );
    let sent = get(&other_node.url_internal("/metrics"), &[]).body;
    assert_eq!(
        metric_value(
            &sent,
            "telemeter_server_cluster_forwards_total",
            &["kind=\"receive\"", "result=\"ok\""]
        ),
        2.0,
        "{sent}"
    );
}

#[test]
fn uploads_merge_once_a_cluster_uses_remote_write_even_after_a_restart() {
    let dir = TempDir::new("receive-upload");
    let args = ["--receive-ratelimit", "0", "--ratelimit", "0s"];
    let s = start(&dir, &args);
    let token = s.upload_token("secret", "test");
    // Before any remote write an upload replaces: 3 series, then 1 series.
    let r = s.upload(&token, &families(Some("test"), 2, now_ms()));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(federated(&s, "test").len(), 3);
    let r = s.upload(&token, &families(Some("test"), 0, now_ms()));
    assert_eq!(r.status, 200, "{}", r.body);
    let up = "up{job=\"prometheus\",_id=\"test\"} 1".to_string();
    assert_eq!(federated(&s, "test"), vec![up.clone()]);

    // Remote write merges into the upload's series.
    let r = receive(
        &s,
        "secret",
        "test",
        &body(vec![series("rw_metric", &[("_id", "test")], 7.0, now_ms())]),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        federated(&s, "test"),
        vec!["rw_metric{_id=\"test\"} 7".to_string(), up]
    );
    // From now on an upload merges too: it neither erases the remote-write series nor its own
    // earlier ones (they stay until the TTL).
    let r = s.upload(&token, &families(Some("test"), 1, now_ms()));
    assert_eq!(r.status, 200, "{}", r.body);
    let lines = federated(&s, "test");
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert!(
        lines.contains(&"rw_metric{_id=\"test\"} 7".to_string()),
        "{lines:?}"
    );

    // The knowledge survives a crash (the store's journal records carry it) and a clean stop
    // (the checkpoint writes it in the cluster file's header).
    let mut s = s;
    for stop in [Signal::Kill, Signal::Term] {
        let status = s.signal_and_wait(stop);
        assert!(stop == Signal::Kill || status.success(), "{status:?}");
        s = start(&dir, &args);
        let token = s.upload_token("secret", "test");
        let r = s.upload(&token, &families(Some("test"), 0, now_ms()));
        assert_eq!(r.status, 200, "{}", r.body);
        let lines = federated(&s, "test");
        assert!(
            lines.contains(&"rw_metric{_id=\"test\"} 7".to_string()),
            "after {stop:?}: {lines:?}"
        );
        assert_eq!(lines.len(), 3, "after {stop:?}: {lines:?}");
    }
}

#[test]
fn an_upload_that_would_take_a_remote_write_cluster_past_max_series_is_refused_with_413() {
    let dir = TempDir::new("receive-upload-cap");
    let s = start(
        &dir,
        &[
            "--receive-ratelimit",
            "0",
            "--ratelimit",
            "0s",
            "--max-series",
            "4",
        ],
    );
    let token = s.upload_token("secret", "test");
    let rw = body(vec![series("rw_metric", &[("_id", "test")], 7.0, now_ms())]);
    assert_eq!(receive(&s, "secret", "test", &rw).status, 200);
    // Three series merged into the one of remote write: four, the cap.
    let r = s.upload(&token, &families(Some("test"), 2, now_ms()));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(federated(&s, "test").len(), 4);
    // Four series alone are within the cap; merged, five are not.
    let r = s.upload(&token, &families(Some("test"), 3, now_ms()));
    assert_eq!(r.status, 413, "{}", r.body);
    assert!(r.body.contains("more than 4 series"), "{}", r.body);
    // Nothing of it stored, and the cluster's remote write goes on.
    assert_eq!(federated(&s, "test").len(), 4);
    assert_eq!(receive(&s, "secret", "test", &rw).status, 200);
}

#[test]
fn remote_write_is_held_to_the_required_labels_as_an_upload_is() {
    let dir = TempDir::new("receive-required");
    let s = start(
        &dir,
        &[
            "--receive-ratelimit",
            "0",
            "--required-label",
            "tenant=acme",
        ],
    );
    // Set on a series that has none, kept on one that has it.
    let r = receive(
        &s,
        "secret",
        "test",
        &body(vec![
            series("plain", &[("_id", "test")], 1.0, now_ms()),
            series(
                "tagged",
                &[("_id", "test"), ("tenant", "acme")],
                2.0,
                now_ms(),
            ),
        ]),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        federated(&s, "test"),
        [
            "plain{_id=\"test\",tenant=\"acme\"} 1",
            "tagged{_id=\"test\",tenant=\"acme\"} 2"
        ]
    );
    // Another value: refused as an upload's would be, naming the series; nothing stored.
    let r = receive(
        &s,
        "secret",
        "test",
        &body(vec![series(
            "tagged",
            &[("_id", "test"), ("tenant", "evil")],
            3.0,
            now_ms(),
        )]),
    );
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(
        r.body
            .contains("tenant=\"evil\", not \"acme\" (--required-label)"),
        "{}",
        r.body
    );
    assert_eq!(requests_counted(&s, "forbidden"), 1.0);
    assert!(federated(&s, "test")[1].ends_with("} 2"));
}

#[test]
fn an_upload_naming_remote_writes_help_text_does_not_make_uploads_merge() {
    let dir = TempDir::new("receive-upload-spoof");
    let args = ["--ratelimit", "0s"];
    let s = start(&dir, &args);
    let token = s.upload_token("secret", "test");
    // A client may send any help text, remote write's own too: its upload is still stored as
    // sent, and so is the next one (which erases the series the first had and it has not).
    let mut spoofed = families(Some("test"), 2, now_ms());
    spoofed[1].help = Some("Received by remote write.".into());
    let r = s.upload(&token, &spoofed);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(federated(&s, "test").len(), 3);
    let r = s.upload(&token, &families(Some("test"), 0, now_ms()));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        federated(&s, "test"),
        vec!["up{job=\"prometheus\",_id=\"test\"} 1".to_string()]
    );
}

#[test]
fn an_upload_stored_as_sent_is_what_the_next_remote_write_merges_into() {
    let dir = TempDir::new("receive-upload-after-ttl");
    let ttl_ms = 3_000;
    let args = [
        "--receive-ratelimit",
        "0",
        "--ratelimit",
        "0s",
        "--ttl",
        "3s",
    ];
    let s = start(&dir, &args);
    let token = s.upload_token("secret", "test");
    // Twice: the second request is merged from the server's memory of the cluster.
    let mut last = 0;
    for value in [1.0, 2.0] {
        last = now_ms();
        let request = body(vec![series("rw_metric", &[("_id", "test")], value, last)]);
        let r = receive(&s, "secret", "test", &request);
        assert_eq!(r.status, 200, "{}", r.body);
    }
    assert_eq!(
        federated(&s, "test"),
        vec!["rw_metric{_id=\"test\"} 2".to_string()]
    );
    // Once the remote-write series is past the TTL the cluster's uploads replace again: this one
    // is stored as sent.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while now_ms() <= last + ttl_ms + 100 {
        assert!(
            std::time::Instant::now() < deadline,
            "the clock did not move"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let r = s.upload(&token, &families(Some("test"), 0, now_ms()));
    assert_eq!(r.status, 200, "{}", r.body);
    let up = "up{job=\"prometheus\",_id=\"test\"} 1".to_string();
    assert_eq!(federated(&s, "test"), vec![up.clone()]);
    // The next request merges into the upload, not into the series remembered from before it.
    let request = body(vec![series("rw_metric", &[("_id", "test")], 3.0, now_ms())]);
    let r = receive(&s, "secret", "test", &request);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        federated(&s, "test"),
        vec!["rw_metric{_id=\"test\"} 3".to_string(), up]
    );
}

/// Starts the server on `storage` as [`start`] does, with journal segments closed at
/// `segment_bytes` (the store's test hook) when given, so a few requests cross segments.
fn start_with_segments(dir: &TempDir, segment_bytes: Option<u64>) -> ServerProcess {
    let tokens = dir.file("tokens", TOKENS);
    let mut command = Command::new(BIN);
    command
        .args([
            "--listen",
            "127.0.0.1:0",
            "--listen-internal",
            "127.0.0.1:0",
        ])
        .arg("--storage-path")
        .arg(dir.path().join("data"))
        .arg("--tokens-file")
        .arg(&tokens)
        .args(["--receive-ratelimit", "0"])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(bytes) = segment_bytes {
        command.env(
            telemeter_server::store::SEGMENT_BYTES_ENV,
            bytes.to_string(),
        );
    }
    let mut child = command.spawn().expect("start telemeter-server");
    let (tx, rx) = std::sync::mpsc::channel();
    let logs = testkit::capture_lines(child.stderr.take().unwrap(), "server", move |line| {
        if let Some(rest) = line.split("listening external=").nth(1) {
            let mut parts = rest.split(" internal=");
            let ext = parts.next().unwrap_or("").trim().to_string();
            let int = parts.next().unwrap_or("").trim().to_string();
            let _ = tx.send((ext, int));
        }
    });
    let (ext, int) = rx
        .recv_timeout(START_TIMEOUT)
        .expect("the server reports its addresses");
    let server = ServerProcess {
        child,
        external: ext.parse().unwrap(),
        internal: int.parse().unwrap(),
        logs,
    };
    assert!(wait_until(START_TIMEOUT, || get(
        &server.url_internal("/healthz"),
        &[]
    )
    .status
        == 200));
    server
}

/// Request `n` of cluster `test`: 40 series with long labels (so a request changes a small part
/// of the cluster's payload, and up to 16 patches follow each image) at value `n`, and from
/// the fifth request on every seventh adds a series (a new series takes the full merge: an image).
fn batch(n: usize, now: i64) -> Vec<u8> {
    let long = "x".repeat(600);
    let mut all: Vec<TimeSeries> = (0..40)
        .map(|i| {
            series(
                "rw_crash",
                &[("_id", "test"), ("i", &i.to_string()), ("pad", &long)],
                (n * 1000 + i) as f64,
                now + n as i64,
            )
        })
        .collect();
    for extra in (5..=n).filter(|k| k % 7 == 0) {
        all.push(series(
            "rw_added",
            &[("_id", "test"), ("k", &extra.to_string())],
            n as f64,
            now + n as i64,
        ));
    }
    body(all)
}

#[test]
fn a_kill_9_after_any_acknowledged_request_serves_what_was_served_before() {
    // Default segments, and segments of 3 pages: commits start on a fresh page, so the latter
    // close every request or two and chains keep meeting segment boundaries (and checkpoints).
    for segment_bytes in [None, Some(3 * 4096)] {
        let dir = TempDir::new("receive-crash");
        let mut s = start_with_segments(&dir, segment_bytes);
        let now = now_ms() - 60_000;
        let mut sent = 0;
        // Crashes after 1 request, around the image interval (16 patches), and further on.
        for requests in [1, 2, 14, 1, 1, 1, 1, 30] {
            for _ in 0..requests {
                sent += 1;
                let r = receive(&s, "secret", "test", &batch(sent, now));
                assert_eq!(r.status, 200, "{}", r.body);
            }
            // The padding shortened, so a failure prints what differs.
            let short = |lines: Vec<String>| -> Vec<String> {
                lines
                    .iter()
                    .map(|l| l.replace(&"x".repeat(600), "x…"))
                    .collect()
            };
            let served = short(federated(&s, "test"));
            assert_eq!(
                served.len(),
                40 + (5..=sent).filter(|k| k % 7 == 0).count(),
                "{served:?}"
            );
            assert!(
                served.contains(&format!(
                    "rw_crash{{_id=\"test\",i=\"3\",pad=\"x…\"}} {}",
                    sent * 1000 + 3
                )),
                "{served:?}"
            );
            s.signal_and_wait(Signal::Kill);
            s = start_with_segments(&dir, segment_bytes);
            assert_eq!(
                short(federated(&s, "test")),
                served,
                "after {sent} requests ({segment_bytes:?})"
            );
        }
    }
}

/// The scheduling policy of each of `pid`'s threads, by thread name (`/proc/PID/task/*/stat`:
/// the name in parentheses, the policy the 41st field; 3 is SCHED_BATCH).
fn thread_policies(pid: u32) -> Vec<(String, u32)> {
    let mut policies = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue; // the thread ended meanwhile
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = stat[open + 1..close].to_string();
        // Fields after the name start at the 3rd: the 41st is the 38th of them (0-based).
        let policy = stat[close + 1..]
            .split_whitespace()
            .nth(38)
            .and_then(|p| p.parse().ok())
            .unwrap();
        policies.push((name, policy));
    }
    policies
}

#[test]
fn receive_runs_on_its_connections_thread_as_sched_batch() {
    const SCHED_BATCH: u32 = 3;
    let dir = TempDir::new("receive-inline");
    let s = start(&dir, &[]);
    let payload = body(vec![series("a", &[("_id", "test")], 1.0, now_ms())]);
    // A keep-alive connection held open, so its thread is still there to be looked at.
    let mut stream = std::net::TcpStream::connect(s.external).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let head = format!(
        "POST /metrics/v1/receive HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Encoding: snappy\r\nContent-Type: application/x-protobuf\r\nContent-Length: {}\r\n\r\n",
        bearer_for("secret", "test"),
        payload.len()
    );
    std::io::Write::write_all(&mut stream, head.as_bytes()).unwrap();
    std::io::Write::write_all(&mut stream, &payload).unwrap();
    let mut answer = Vec::new();
    let mut chunk = [0u8; 4096];
    while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
        let read = std::io::Read::read(&mut stream, &mut chunk).unwrap();
        assert!(read > 0, "closed before the answer: {answer:?}");
        answer.extend_from_slice(&chunk[..read]);
    }
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    let policies = thread_policies(s.child.id());
    // On a worker it would have left the connection's thread as it was (and a worker serves
    // `/federate` too, which must stay a normal thread).
    assert!(
        policies
            .iter()
            .any(|(name, policy)| name == "external-conn" && *policy == SCHED_BATCH),
        "{policies:?}"
    );
    assert!(
        !policies
            .iter()
            .any(|(name, policy)| name.contains("worker") && *policy == SCHED_BATCH),
        "{policies:?}"
    );
    drop(stream);
}
