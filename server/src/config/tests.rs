//! The flags' tests: every flag parsed and checked as upstream's was.

use super::*;
use clap::Parser;

fn flags(args: &[&str]) -> Flags {
    let mut all = vec!["telemeter-server", "--storage-path", "/tmp/x"];
    all.extend_from_slice(args);
    Flags::try_parse_from(all).expect("flags parse")
}

#[test]
fn flag_definitions_are_consistent() {
    use clap::CommandFactory;
    Flags::command().debug_assert();
    // Every flag explains itself in --help.
    for arg in Flags::command().get_arguments() {
        assert!(arg.get_help().is_some(), "{} has no help", arg.get_id());
    }
}

#[test]
fn needs_a_token_source() {
    let err = flags(&[]).into_config().unwrap_err();
    assert_eq!(err, ConfigError::NoTokenSource);
    assert!(err.to_string().contains("--insecure-accept-any-token"));
}

#[test]
fn token_sources_exclude_each_other() {
    let r = Flags::try_parse_from([
        "telemeter-server",
        "--storage-path",
        "/x",
        "--tokens-file",
        "/t",
        "--insecure-accept-any-token",
    ]);
    assert!(r.is_err());
}

#[test]
fn a_zero_ttl_is_refused() {
    let err = flags(&["--insecure-accept-any-token", "--ttl", "0s"])
        .into_config()
        .unwrap_err();
    assert!(
        matches!(err, ConfigError::Invalid { flag: "--ttl", .. }),
        "{err}"
    );
    assert!(err.to_string().contains("greater than 0s"), "{err}");
    let config = flags(&["--insecure-accept-any-token", "--ttl", "1s"])
        .into_config()
        .unwrap();
    assert_eq!(config.ttl, std::time::Duration::from_secs(1));
}

#[test]
fn label_pairs_are_checked() {
    assert_eq!(
        parse_label_pairs("--label", &["a=b".into(), "c=d=e".into()]).unwrap(),
        vec![("a".into(), "b".into()), ("c".into(), "d=e".into())]
    );
    assert!(parse_label_pairs("--label", &["ab".into()]).is_err());
    assert!(parse_label_pairs("--label", &["1a=b".into()]).is_err());
    assert!(parse_label_pairs("--label", &["a=".into()]).is_err());
    assert!(parse_label_pairs("--label", &["a=b".into(), "a=c".into()]).is_err());
}

#[test]
fn tls_flags_come_in_pairs() {
    let r = Flags::try_parse_from([
        "telemeter-server",
        "--storage-path",
        "/x",
        "--tls-key",
        "/k",
    ]);
    assert!(r.is_err());
}

#[test]
fn defaults_follow_upstream() {
    let c = flags(&["--insecure-accept-any-token"])
        .into_config()
        .unwrap();
    assert_eq!(c.listen, "0.0.0.0:9003");
    assert_eq!(c.listen_internal, "127.0.0.1:9004");
    assert_eq!(c.ratelimit, Duration::from_secs(270));
    assert_eq!(c.ttl, Duration::from_secs(600));
    assert_eq!(c.max_sample_age, Duration::from_secs(86_400));
    assert_eq!(c.token_lifetime, Duration::from_secs(86_400));
    assert_eq!(c.partition_label, "_id");
    assert_eq!(c.token_source, TokenSource::AnyToken);
    assert!(c.whitelist.is_empty());
}

#[test]
fn cluster_flags() {
    let c = flags(&["--insecure-accept-any-token"])
        .into_config()
        .unwrap();
    assert_eq!(c.cluster, None);
    let err = flags(&[
        "--insecure-accept-any-token",
        "--listen-cluster",
        "127.0.0.1:9005",
    ])
    .into_config()
    .unwrap_err();
    assert!(err.to_string().contains("--shared-key"), "{err}");
    let c = flags(&[
        "--insecure-accept-any-token",
        "--shared-key",
        "/k",
        "--listen-cluster",
        "127.0.0.1:9005",
        "--join",
        "10.0.0.2:9005",
        "--join",
        "10.0.0.3:9005",
        "--name",
        "a",
        "--peer-timeout",
        "5s",
    ])
    .into_config()
    .unwrap();
    assert_eq!(
        c.cluster,
        Some(ClusterFlags {
            listen_cluster: "127.0.0.1:9005".into(),
            join: vec!["10.0.0.2:9005".into(), "10.0.0.3:9005".into()],
            internal_tls: false,
            name: "a".into(),
            advertise_internal: None,
            gossip_interval: Duration::from_secs(1),
            peer_timeout: Duration::from_secs(5),
        })
    );
    let err = flags(&[
        "--insecure-accept-any-token",
        "--shared-key",
        "/k",
        "--listen-cluster",
        "127.0.0.1:9005",
        "--peer-timeout",
        "1s",
    ])
    .into_config()
    .unwrap_err();
    assert!(err.to_string().contains("--peer-timeout"), "{err}");
    // Upstream's manifests serve the internal port over TLS in a cluster: forwards use https.
    let c = flags(&[
        "--insecure-accept-any-token",
        "--shared-key",
        "/k",
        "--listen-cluster",
        "127.0.0.1:9005",
        "--internal-tls-key",
        "/k",
        "--internal-tls-crt",
        "/c",
    ])
    .into_config()
    .unwrap();
    assert!(c.cluster.unwrap().internal_tls);
    // --join without --listen-cluster is refused by the parser.
    assert!(
        Flags::try_parse_from(["telemeter-server", "--storage-path", "/x", "--join", "a:1"])
            .is_err()
    );
    assert!(host_name().is_some());
}

#[test]
fn remote_write_flags() {
    let c = flags(&["--insecure-accept-any-token"])
        .into_config()
        .unwrap();
    assert_eq!(c.remote_write, None);
    let c = flags(&[
        "--insecure-accept-any-token",
        "--remote-write-url",
        "http://127.0.0.1:9090/api/v1/write",
        "--remote-write-queue",
        "5",
        "--remote-write-timeout",
        "2s",
        "--remote-write-shards",
        "3",
        "--remote-write-max-backlog-bytes",
        "1000000",
        "--remote-write-max-backlog-age",
        "1h",
    ])
    .into_config()
    .unwrap();
    assert_eq!(
        c.remote_write,
        Some(RemoteWriteConfig {
            queue_capacity: 5,
            timeout: Duration::from_secs(2),
            shards: 3,
            max_backlog_bytes: 1_000_000,
            max_backlog_age: Duration::from_secs(3600),
            ..RemoteWriteConfig::new("http://127.0.0.1:9090/api/v1/write")
        })
    );
    for bad in [
        vec!["--remote-write-url", "ftp://x"],
        vec![
            "--remote-write-url",
            "http://x",
            "--remote-write-queue",
            "0",
        ],
        vec![
            "--remote-write-url",
            "http://x",
            "--remote-write-timeout",
            "0s",
        ],
        vec![
            "--remote-write-url",
            "http://x",
            "--remote-write-shards",
            "0",
        ],
        vec![
            "--remote-write-url",
            "http://x",
            "--remote-write-max-backlog-bytes",
            "0",
        ],
        vec![
            "--remote-write-url",
            "http://x",
            "--remote-write-max-backlog-age",
            "0s",
        ],
    ] {
        let mut args = vec!["--insecure-accept-any-token"];
        args.extend(bad);
        let err = flags(&args).into_config().unwrap_err();
        assert!(err.to_string().contains("--remote-write"), "{err}");
    }
}

#[test]
fn shared_key_is_repeatable_in_order() {
    let c = flags(&[
        "--insecure-accept-any-token",
        "--shared-key=/new",
        "--shared-key",
        "/old",
    ])
    .into_config()
    .unwrap();
    assert_eq!(c.shared_key, [PathBuf::from("/new"), PathBuf::from("/old")]);
    let c = flags(&["--insecure-accept-any-token"])
        .into_config()
        .unwrap();
    assert!(c.shared_key.is_empty());
}

#[test]
fn join_takes_lists_and_defaults_the_port() {
    let c = flags(&[
        "--insecure-accept-any-token",
        "--shared-key=/k",
        "--listen-cluster=0.0.0.0:8082",
        "--join=telemeter-server",
        "--join",
        "10.0.0.2,10.0.0.3:9000,[::1],::2,[::3]:7,host:1",
        "--join=",
    ])
    .into_config()
    .unwrap();
    assert_eq!(
        c.cluster.unwrap().join,
        [
            "telemeter-server:8082",
            "10.0.0.2:8082",
            "10.0.0.3:9000",
            "[::1]:8082",
            "[::2]:8082",
            "[::3]:7",
            "host:1"
        ]
    );
    // No port to borrow: upstream memberlist's.
    assert_eq!(
        join_addresses("127.0.0.1:0", &["peer".into()]).unwrap(),
        ["peer:7946"]
    );
    for bad in ["host:", ":80", "host:99999", "a:b:c:"] {
        assert!(
            join_addresses("127.0.0.1:1", &[bad.into()]).is_err(),
            "{bad}"
        );
    }
}

#[test]
fn labels_take_lists() {
    let c = flags(&[
        "--insecure-accept-any-token",
        "--label=a=1,b=2",
        "--label",
        "c=3",
        "--required-label=env=prod,tier=web",
    ])
    .into_config()
    .unwrap();
    let pairs = |p: &[(&str, &str)]| -> Vec<(String, String)> {
        p.iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    };
    assert_eq!(c.labels, pairs(&[("a", "1"), ("b", "2"), ("c", "3")]));
    assert_eq!(
        c.required_labels,
        pairs(&[("env", "prod"), ("tier", "web")])
    );
    // A selector holds commas: --whitelist is never split.
    let c = flags(&[
        "--insecure-accept-any-token",
        "--whitelist",
        r#"{__name__="up",job="a"}"#,
    ])
    .into_config()
    .unwrap();
    assert_eq!(c.whitelist.len(), 1);
}

#[test]
fn storage_defaults_to_data_and_takes_upstreams_name() {
    let c = Flags::try_parse_from(["telemeter-server", "--insecure-accept-any-token"])
        .unwrap()
        .into_config()
        .unwrap();
    assert_eq!(c.storage_path, PathBuf::from("data"));
    let c = Flags::try_parse_from([
        "telemeter-server",
        "--insecure-accept-any-token",
        "--storage-dir=/var/lib/x",
        "--limit-bytes=5242880",
    ])
    .unwrap()
    .into_config()
    .unwrap();
    assert_eq!(c.storage_path, PathBuf::from("/var/lib/x"));
    assert_eq!(c.max_upload_bytes, 5_242_880);
}

#[test]
fn durations_may_be_written_as_go_writes_them() {
    let c = flags(&[
        "--insecure-accept-any-token",
        "--ratelimit=4.5m",
        "--ttl",
        "1h30m",
        "--max-future-skew=2.5s",
    ])
    .into_config()
    .unwrap();
    assert_eq!(c.ratelimit, Duration::from_secs(270));
    assert_eq!(c.ttl, Duration::from_secs(5400));
    assert_eq!(c.max_future_skew, Duration::from_millis(2500));
    let err = flags(&["--insecure-accept-any-token", "--ttl=10 minutes"])
        .into_config()
        .unwrap_err();
    assert!(
        err.to_string().starts_with("--ttl: invalid duration"),
        "{err}"
    );
}

#[test]
fn verbosity() {
    assert_eq!(flags(&[]).log_filter(), None);
    assert_eq!(flags(&["-v"]).log_filter(), Some("debug"));
    assert_eq!(flags(&["--verbose"]).log_filter(), Some("debug"));
    assert_eq!(
        flags(&["-v", "--log-level", "warn"]).log_filter(),
        Some("warn")
    );
    assert!(Flags::try_parse_from(["telemeter-server", "--log-level", "loud"]).is_err());
}

fn tollbooth(c: Config) -> TollboothConfig {
    match c.token_source {
        TokenSource::Tollbooth(t) => t,
        other => panic!("{other:?}"),
    }
}

#[test]
fn authorize_flags() {
    let t = tollbooth(
        flags(&["--authorize", "https://tollbooth/v1"])
            .into_config()
            .unwrap(),
    );
    assert_eq!(
        t,
        TollboothConfig {
            url: "https://tollbooth/v1".into(),
            oidc: None,
            concurrency: 16,
            timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(2),
        }
    );
    // Upstream's manifest with its secrets unset: every OIDC flag empty, so no OIDC.
    let t = tollbooth(
        flags(&[
            "--authorize=https://tollbooth/v1",
            "--authorize-issuer-url=",
            "--authorize-client-id=",
            "--authorize-username=",
            "--authorize-password=",
        ])
        .into_config()
        .unwrap(),
    );
    assert_eq!(t.oidc, None);
    let t = tollbooth(
        flags(&[
            "--authorize=https://tollbooth/v1",
            "--authorize-issuer-url=https://sso/realms/x",
            "--authorize-client-id=telemeter",
            "--authorize-username=bob",
            "--authorize-password=hunter2",
            "--authorize-concurrency=4",
            "--authorize-timeout=1.5s",
            "--authorize-connect-timeout=300ms",
        ])
        .into_config()
        .unwrap(),
    );
    assert_eq!(
        t.oidc,
        Some(OidcConfig {
            issuer_url: "https://sso/realms/x".into(),
            client_id: "telemeter".into(),
            client_secret: None,
            password_grant: Some(("bob".into(), Secret::from("hunter2".to_string()))),
        })
    );
    assert_eq!(
        (t.concurrency, t.timeout, t.connect_timeout),
        (4, Duration::from_millis(1500), Duration::from_millis(300))
    );
    // Secrets stay out of Debug output, so out of any log line.
    assert!(!format!("{t:?}").contains("hunter2"), "{t:?}");
    let c = flags(&[
        "--authorize=https://tollbooth/v1",
        "--authorize-issuer-url=https://sso",
        "--authorize-client-id=telemeter",
        "--authorize-client-secret=s3cret",
    ])
    .into_config()
    .unwrap();
    assert!(!format!("{c:?}").contains("s3cret"));
    assert_eq!(
        tollbooth(c).oidc.unwrap().client_secret,
        Some(Secret::from("s3cret".to_string()))
    );

    for (bad, flag) in [
        (
            vec!["--authorize-issuer-url=https://sso"],
            "--authorize-issuer-url",
        ),
        (
            vec!["--authorize=http://t", "--authorize-issuer-url=https://sso"],
            "--authorize-client-id",
        ),
        (
            vec![
                "--authorize=http://t",
                "--authorize-issuer-url=sso",
                "--authorize-client-id=c",
            ],
            "--authorize-issuer-url",
        ),
        (
            vec![
                "--authorize=http://t",
                "--authorize-issuer-url=https://sso",
                "--authorize-client-id=c",
                "--authorize-username=bob",
            ],
            "--authorize-username",
        ),
        (
            vec!["--authorize=http://t", "--authorize-concurrency=0"],
            "--authorize-concurrency",
        ),
        (
            vec!["--authorize=http://t", "--authorize-timeout=0s"],
            "--authorize-timeout",
        ),
    ] {
        let err = flags(&bad).into_config().unwrap_err();
        assert!(err.to_string().starts_with(flag), "{bad:?}: {err}");
    }
    // --authorize= (empty, as from an unset variable) is no token source.
    assert_eq!(
        flags(&["--authorize="]).into_config().unwrap_err(),
        ConfigError::NoTokenSource
    );
}

#[test]
fn labels_the_server_adds_must_be_servable() {
    for (flag, value) in [
        ("--label", "le=x"),
        ("--label", "__name__=x"),
        ("--required-label", "quantile=x"),
        ("--partition-label", "__id"),
        ("--partition-label", "le"),
    ] {
        let err = flags(&["--insecure-accept-any-token", flag, value])
            .into_config()
            .unwrap_err();
        assert!(err.to_string().contains(flag), "{err}");
    }
    let err = flags(&[
        "--insecure-accept-any-token",
        "--label",
        "region=eu",
        "--required-label",
        "region=us",
    ])
    .into_config()
    .unwrap_err();
    assert!(err.to_string().contains("also a --required-label"), "{err}");
}

#[test]
fn partition_label_cannot_be_set_by_label_flags() {
    let err = flags(&["--insecure-accept-any-token", "--label", "_id=x"])
        .into_config()
        .unwrap_err();
    assert!(err.to_string().contains("partition label"), "{err}");
}

#[test]
fn the_forward_cap_covers_both_decompressed_caps() {
    // A forwarded remote-write request within --receive-max-decompressed-bytes must pass the
    // internal port, whichever cap is the larger.
    for (upload, receive) in [("16777216", "67108864"), ("67108864", "8388608")] {
        let config = flags(&[
            "--insecure-accept-any-token",
            "--max-decompressed-bytes",
            upload,
            "--receive-max-decompressed-bytes",
            receive,
        ])
        .into_config()
        .unwrap();
        // Twice the larger (64 MiB), as a forwarded upload has always had twice its own.
        assert_eq!(crate::server::max_forward_bytes(&config), 128 << 20);
    }
}
