//! The real binary started with the argument lists of upstream telemeter's own scripts and
//! manifests, unchanged in shape: its integration script's (test/integration.sh: `--flag value`,
//! no `--storage-path`, an EC key from openssl as `--shared-key`, `-v`) and its Kubernetes
//! StatefulSet's (`--flag=value`, wildcard listen addresses, `--join` with a service name and no
//! port, TLS on both ports with the TLS key as shared key, OIDC flags with their variables unset).
//! Each starts, answers `/healthz` and takes an upload.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use telemeter_common::delimited;
use telemeter_common::http::{self as front, Handler, Request, Response};
use telemeter_common::media::PROTO_DELIMITED;
use telemeter_common::snappy;
use telemeter_server::cluster::ring::{HashRing, DEFAULT_VNODES};

const WAIT: Duration = Duration::from_secs(30);

/// Upstream's mock authorization server (cmd/authorization-server): token `a` is known, a new
/// (token, cluster) pair gets 201, a known one 200; others 401.
#[derive(Default)]
struct AuthorizationServer {
    seen: Mutex<Vec<String>>,
}

impl Handler for AuthorizationServer {
    fn handle(&self, request: Request) -> Response {
        if request.method != "POST" {
            return Response::text(405, "POST only");
        }
        if request.header("Content-Type") != Some("application/json") {
            return Response::text(400, "InvalidBody");
        }
        let v: serde_json::Value = match serde_json::from_slice(&request.body) {
            Ok(v) => v,
            Err(_) => return Response::text(400, "InvalidBody"),
        };
        let id = v["cluster_id"].as_str().unwrap_or("").to_string();
        if v["authorization_token"] != "a" || id.is_empty() {
            return Response::json(401, &serde_json::json!({"name": "Unauthorized"}));
        }
        let mut seen = self.seen.lock().unwrap();
        let status = if seen.contains(&id) { 200 } else { 201 };
        seen.push(id.clone());
        Response::json(
            status,
            &serde_json::json!({"cluster_id": id, "authorization_token": "a", "account_id": "1"}),
        )
    }
}

fn authorization_server() -> front::ServerHandle {
    front::Server::bind(
        "127.0.0.1:0",
        front::Config::default(),
        Arc::new(AuthorizationServer::default()),
    )
    .unwrap()
    .spawn()
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("openssl (installed by make setup) must run");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `telemeter-server` with exactly `args` (nothing added) in `cwd`; waits (bounded) for its
/// addresses. `RUST_LOG` is left unset: the arguments decide the log level.
fn start_exactly(cwd: &Path, args: &[String]) -> ServerProcess {
    ServerProcess::spawn(
        Command::new(BIN)
            .args(args)
            .current_dir(cwd)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
    )
}

/// Polls `url` with `agent` (bounded) until it answers 200 and `done(body)`.
fn wait_for(agent: &ureq::Agent, url: &str, done: impl Fn(&str) -> bool) -> String {
    let started = Instant::now();
    loop {
        if let Ok(mut r) = agent.get(url).call() {
            let body = r.body_mut().read_to_string().unwrap_or_default();
            if r.status() == 200 && done(&body) {
                return body;
            }
        }
        assert!(started.elapsed() < WAIT, "{url} never became ready");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[test]
fn integration_script_arguments_start_the_server() {
    let dir = TempDir::new("upstream-integration");
    // Upstream's test key is an EC private key in PEM, as openssl writes it.
    openssl(
        dir.path(),
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            "test.key",
        ],
    );
    let authz = authorization_server();
    let authorize = format!("http://{}", authz.local_addr());
    let (cluster, nobody) = (free_udp_port(), free_udp_port());
    let listen_cluster = format!("127.0.0.1:{cluster}");
    let join = format!("127.0.0.1:{nobody}");
    let s = start_exactly(
        dir.path(),
        &args(&[
            "--authorize",
            &authorize,
            "--name",
            "instance-0",
            "--shared-key=test.key",
            "--listen",
            "localhost:0",
            "--listen-internal",
            "localhost:0",
            "--listen-cluster",
            &listen_cluster,
            "--join",
            &join,
            "--whitelist",
            r#"{_id="test"}"#,
            "--ttl",
            "10m",
            "--ratelimit",
            "4m30s",
            "--token-expire-seconds",
            "86400",
            "--partition-label",
            "_id",
            "-v",
        ]),
    );
    assert_eq!(get(&s.url_internal("/healthz"), &[]).status, 200);
    assert_eq!(get(&s.url("/healthz"), &[]).status, 200);

    // The upstream client's exchange: /authorize with token a, then one upload.
    let token = s.upload_token("a", "test");
    let r = s.upload(&token, &families(Some("test"), 3, now_ms()));
    assert_eq!(r.status, 200, "{}", r.body);
    // Served once the node has given its (absent) peer a peer timeout.
    let agent = agent();
    let body = wait_for(&agent, &s.url_internal("/federate"), |b| {
        b.contains(r#"test_metric{i="2",_id="test"}"#) || b.contains(r#"_id="test",i="2""#)
    });
    assert!(body.contains("up{"), "{body}");
    // With no --storage-path the store is ./data, as Prometheus's is.
    let data = dir.path().join("data");
    assert!(
        std::fs::read_dir(&data).unwrap().count() > 0,
        "{data:?} is empty"
    );
    // -v logs at debug level.
    assert!(
        s.logs.lock().unwrap().iter().any(|l| l.contains(" DEBUG ")),
        "no debug line with -v"
    );
}

/// An agent that speaks TLS to the servers' self-signed certificate.
fn tls_agent() -> ureq::Agent {
    telemeter_common::tls::install_crypto_provider();
    ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(20)))
            .tls_config(
                ureq::tls::TlsConfig::builder()
                    .disable_verification(true)
                    .build(),
            )
            .build(),
    )
}

#[test]
fn kubernetes_manifest_arguments_form_a_tls_cluster() {
    let dir = TempDir::new("upstream-manifest");
    // The StatefulSet mounts one serving certificate for every pod, and uses its key as the
    // shared key too.
    openssl(
        dir.path(),
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=telemeter-server.telemeter.svc",
            "-keyout",
            "tls.key",
            "-out",
            "tls.crt",
        ],
    );
    let authz = authorization_server();
    let authorize = format!("--authorize=http://{}/", authz.local_addr());
    // Every pod listens on the same cluster port; here each on its own loopback address.
    let ips = ["127.0.0.2", "127.0.0.3"];
    let port = free_udp_port_on(ips[0]);
    let names = ["telemeter-server-0", "telemeter-server-1"];
    let nodes: Vec<ServerProcess> = (0..2)
        .map(|i| {
            start_exactly(
                dir.path(),
                &args(&[
                    // A peer's address without a port: --listen-cluster's.
                    &format!("--join={}", ips[1 - i]),
                    &format!("--name={}", names[i]),
                    "--listen=0.0.0.0:0",
                    "--listen-internal=0.0.0.0:0",
                    &format!("--listen-cluster={}:{port}", ips[i]),
                    &format!("--storage-dir=data-{i}"),
                    "--shared-key=tls.key",
                    "--tls-key=tls.key",
                    "--tls-crt=tls.crt",
                    "--internal-tls-key=tls.key",
                    "--internal-tls-crt=tls.crt",
                    &authorize,
                    // $(RHD_URL) and friends, unset.
                    "--authorize-issuer-url=",
                    "--authorize-client-id=",
                    "--authorize-username=",
                    "--authorize-password=",
                    r#"--whitelist={__name__="up"}"#,
                ]),
            )
        })
        .collect();
    let agent = tls_agent();
    for node in &nodes {
        wait_for(
            &agent,
            &format!("https://{}/healthz", node.internal),
            |_| true,
        );
        wait_for(
            &agent,
            &format!("https://{}/healthz", node.external),
            |_| true,
        );
    }
    // Both see both, each advertising an internal address peers can reach.
    for node in &nodes {
        let debug = wait_for(
            &agent,
            &format!("https://{}/debug/cluster", node.internal),
            |b| b.contains(r#""converged":true"#) && b.contains(names[0]) && b.contains(names[1]),
        );
        let debug: serde_json::Value = serde_json::from_str(&debug).unwrap();
        for member in debug["members"].as_array().unwrap() {
            let addr = member["internal_addr"].as_str().unwrap();
            assert!(addr.starts_with("127.0.0.1:"), "{debug}");
        }
    }

    // A cluster id node 1 owns, pushed to node 0: forwarded over https, stored by node 1.
    let ring = HashRing::new(&names, DEFAULT_VNODES);
    let id = (0..)
        .map(|n| format!("cluster-{n}"))
        .find(|id| ring.owner(id) == Some(names[1]))
        .unwrap();
    let base = format!("https://{}", nodes[0].external);
    let mut r = agent
        .post(format!("{base}/authorize?id={id}"))
        .header("Authorization", "Bearer a")
        .send(&b""[..])
        .unwrap();
    let body = r.body_mut().read_to_string().unwrap();
    assert_eq!(r.status(), 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let token = v["token"].as_str().unwrap();
    let mut r = agent
        .post(format!("{base}/upload"))
        .header("Authorization", format!("Bearer {token}"))
        .header("Content-Type", PROTO_DELIMITED)
        .header("Content-Encoding", "snappy")
        .send(&snappy::encode_framed(&delimited::encode(&families(Some(&id), 2, now_ms())))[..])
        .unwrap();
    assert_eq!(
        r.status(),
        200,
        "{}",
        r.body_mut().read_to_string().unwrap_or_default()
    );
    let federated = wait_for(
        &agent,
        &format!("https://{}/federate", nodes[1].internal),
        |b| b.contains(&format!("_id=\"{id}\"")),
    );
    // The whitelist kept `up` only.
    assert!(!federated.contains("test_metric"), "{federated}");
    let metrics = wait_for(
        &agent,
        &format!("https://{}/metrics", nodes[1].internal),
        |_| true,
    );
    assert_eq!(
        metric_value(
            &metrics,
            "telemeter_server_cluster_forwards_received_total",
            &[r#"result="push""#]
        ),
        1.0,
        "{metrics}"
    );
}
