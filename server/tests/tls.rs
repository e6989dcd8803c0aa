//! The external port over TLS (rustls), with a throwaway certificate made by `openssl`.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

#[test]
fn external_port_serves_tls() {
    let dir = TempDir::new("tls");
    let (cert, key) = (dir.path().join("crt.pem"), dir.path().join("key.pem"));
    let (ca, ca_key, csr) = (
        dir.path().join("ca.pem"),
        dir.path().join("ca.key"),
        dir.path().join("leaf.csr"),
    );
    let ext = dir.file(
        "ext",
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    );
    const P256: [&str; 5] = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    // webpki refuses a CA certificate as a server's, so: a CA, and a leaf it signs.
    let mut steps = [
        Command::new("openssl"),
        Command::new("openssl"),
        Command::new("openssl"),
    ];
    steps[0]
        .args(["req", "-x509", "-days", "1", "-subj", "/CN=test-ca"])
        .args(P256)
        .arg("-keyout")
        .arg(&ca_key)
        .arg("-out")
        .arg(&ca);
    steps[1]
        .args(["req", "-subj", "/CN=localhost"])
        .args(P256)
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&csr);
    steps[2]
        .args(["x509", "-req", "-days", "1", "-CAcreateserial", "-in"])
        .arg(&csr)
        .arg("-CA")
        .arg(&ca)
        .arg("-CAkey")
        .arg(&ca_key)
        .arg("-extfile")
        .arg(&ext)
        .arg("-out")
        .arg(&cert);
    for step in &mut steps {
        let made = step.output();
        if !matches!(&made, Ok(out) if out.status.success()) {
            eprintln!("skipping: openssl could not make certificates: {made:?}");
            return;
        }
    }
    let s = ServerProcess::setup(&dir)
        .ratelimit(None)
        .args(&[
            "--tls-crt",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ])
        .start();

    telemeter_common::tls::install_crypto_provider();
    let pem = std::fs::read(&ca).unwrap();
    let root = ureq::tls::Certificate::from_pem(&pem).unwrap();
    let agent = ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(20)))
            .tls_config(
                ureq::tls::TlsConfig::builder()
                    .root_certs(ureq::tls::RootCerts::new_with_certs(&[root]))
                    .build(),
            )
            .build(),
    );
    let base = format!("https://{}", s.external);
    let r = agent.get(format!("{base}/healthz")).call().unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let mut r = agent
        .post(format!("{base}/authorize?id=test"))
        .header("Authorization", "Bearer secret")
        .send(&b""[..])
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let body = r.body_mut().read_to_string().unwrap();
    assert!(body.contains("\"_id\":\"test\""), "{body}");
    // Plain HTTP on the TLS port gets nothing useful.
    let plain = get(&format!("http://{}/healthz", s.external), &[]);
    assert_ne!(plain.status, 200);
}
