//! The operator's view on the internal port: the status page in a real headless browser, the
//! clusters API, and a removal that survives a restart.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const CHROMIUM: &str = "/usr/bin/chromium";

/// The server (again on the same storage after a stop), each cluster rate limited for an hour.
fn start(dir: &TempDir) -> ServerProcess {
    ServerProcess::setup(dir).ratelimit(Some("1h")).start()
}

fn push_three(s: &ServerProcess) {
    for (id, n) in [("a", 2), ("b", 4), ("c", 1)] {
        let token = s.upload_token("wild", id);
        let r = s.upload(&token, &families(None, n, now_ms()));
        assert_eq!(r.status, 200, "{}", r.body);
    }
}

fn delete(s: &ServerProcess, id: &str) -> Reply {
    raw_request(
        s.internal,
        format!("DELETE /api/v1/clusters/{id} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
}

/// Runs headless Chromium on `url` with `args`; what it printed.
fn chromium(dir: &TempDir, profile: &str, url: &str, args: &[&str]) -> std::process::Output {
    assert!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is not installed: run `make setup` (Debian package chromium)"
    );
    let child = Command::new(CHROMIUM)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
        ])
        .arg(format!(
            "--user-data-dir={}",
            dir.path().join(profile).display()
        ))
        .args(args)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start chromium");
    testkit::wait_output(child, Duration::from_secs(60))
}

#[test]
fn status_page_in_headless_chromium_and_the_clusters_api() {
    let dir = TempDir::new("status-page");
    let s = start(&dir);
    push_three(&s);

    let r = get(&s.url_internal("/api/v1/clusters"), &[]);
    assert_eq!(r.status, 200, "{}", r.body);
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    let clusters = v["clusters"].as_array().unwrap();
    let summary: Vec<(String, u64, String)> = clusters
        .iter()
        .map(|c| {
            (
                c["id"].as_str().unwrap().to_string(),
                c["series"].as_u64().unwrap(),
                c["rate_limit"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    // Each pushed once within the 1h window: limited until it passes.
    assert_eq!(
        summary,
        [
            ("a".to_string(), 3, "limited".to_string()),
            ("b".to_string(), 5, "limited".to_string()),
            ("c".to_string(), 2, "limited".to_string()),
        ],
        "{}",
        r.body
    );
    assert!(clusters.iter().all(|c| c["bytes"].as_u64().unwrap() > 0));
    assert!(clusters
        .iter()
        .all(|c| c["last_push_age_seconds"].as_f64().unwrap() < 60.0));

    let url = s.url_internal("/");
    let out = chromium(&dir, "profile-dom", &url, &["--dump-dom"]);
    let dom = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "chromium: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (id, series) in [("a", 3), ("b", 5), ("c", 2)] {
        let row = dom
            .split("<tr ")
            .find(|row| row.contains(&format!("data-id=\"{id}\"")))
            .unwrap_or_else(|| panic!("no row for cluster {id} in\n{dom}"));
        assert!(row.contains(&format!("<td>{id}</td>")), "{row}");
        assert!(
            row.contains(&format!("<td class=\"num\">{series}</td>")),
            "{row}"
        );
        assert!(row.contains("limited (next in "), "{row}");
    }
    assert_eq!(dom.matches("class=\"cluster\"").count(), 3, "{dom}");

    let screenshot = dir.path().join("status.png");
    let out = chromium(
        &dir,
        "profile-shot",
        &url,
        &[
            &format!("--screenshot={}", screenshot.display()),
            "--window-size=1024,600",
        ],
    );
    assert!(
        out.status.success(),
        "chromium: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let png = std::fs::read(&screenshot).expect("the screenshot");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    assert!(
        png.len() > 5_000,
        "a {} byte screenshot is blank",
        png.len()
    );
}

#[test]
fn delete_removes_a_cluster_durably() {
    let dir = TempDir::new("status-delete");
    let mut s = start(&dir);
    push_three(&s);

    let r = delete(&s, "b");
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("removed cluster \"b\""), "{}", r.body);
    let text = s.federate();
    assert!(!text.contains("_id=\"b\""), "{text}");
    assert!(text.contains("_id=\"a\""), "{text}");
    assert_eq!(delete(&s, "b").status, 404);
    assert_eq!(delete(&s, "nobody").status, 404);
    let r = raw_request(
        s.internal,
        b"GET /api/v1/clusters/a HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(r.status, 405);

    // Gone after a restart too (the removal was journaled), the others still there.
    assert_eq!(s.signal_and_wait(Signal::Term).code(), Some(0));
    let s = start(&dir);
    let text = s.federate();
    assert!(!text.contains("_id=\"b\""), "{text}");
    assert!(text.contains("_id=\"a\""), "{text}");
    assert!(text.contains("_id=\"c\""), "{text}");
    let r = get(&s.url_internal("/api/v1/clusters"), &[]);
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    let ids: Vec<&str> = v["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["a", "c"]);
}
