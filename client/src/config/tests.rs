use super::*;

fn flags(args: &[&str]) -> Flags {
    let mut full = vec!["telemeter-client"];
    full.extend_from_slice(args);
    Flags::try_parse_from(full).unwrap()
}

const BASE: &[&str] = &[
    "--from",
    "http://localhost:9090",
    "--to",
    "http://server:9003/",
    "--to-token",
    "t",
    "--id",
    "c1",
];

#[test]
fn empty_path_means_federate() {
    assert_eq!(scrape_url("http://h:9090"), "http://h:9090/federate");
    assert_eq!(scrape_url("http://h:9090/"), "http://h:9090/federate");
    assert_eq!(scrape_url("http://h:9090/metrics"), "http://h:9090/metrics");
    assert_eq!(scrape_url("https://h/x?a=b"), "https://h/x?a=b");
    assert_eq!(scrape_url("http://h?a=b"), "http://h/federate?a=b");
}

#[test]
fn urls_derive_from_to() {
    let c = Config::from_flags(flags(BASE)).unwrap();
    assert_eq!(c.sources[0].url, "http://localhost:9090/federate");
    assert_eq!(c.authorize_url, "http://server:9003/authorize");
    assert_eq!(c.upload_url, "http://server:9003/upload");
    assert_eq!(c.interval, Duration::from_secs(270));
    assert_eq!(c.renames, vec![("ALERTS".into(), "alerts".into())]);
    assert_eq!(c.listen.as_deref(), Some("127.0.0.1:9002"));
}

#[test]
fn to_upload_alone_with_to_auth_works() {
    // Upstream parsed --to-upload into the wrong variable; here it is used as given.
    let c = Config::from_flags(flags(&[
        "--from",
        "http://p:9090",
        "--to-auth",
        "http://a/auth",
        "--to-upload",
        "http://u/up",
        "--to-token",
        "t",
        "--id",
        "c",
    ]))
    .unwrap();
    assert_eq!(c.authorize_url, "http://a/auth");
    assert_eq!(c.upload_url, "http://u/up");
}

#[test]
fn missing_pieces_are_named() {
    let e = Config::from_flags(flags(&[
        "--from",
        "http://p",
        "--to-token",
        "t",
        "--id",
        "c",
    ]))
    .unwrap_err();
    assert!(e.0.contains("--to"), "{e}");
    let e = Config::from_flags(flags(&[
        "--from", "http://p", "--to", "http://s", "--id", "c",
    ]))
    .unwrap_err();
    assert!(e.0.contains("--to-token"), "{e}");
    let e = Config::from_flags(flags(&[
        "--from",
        "http://p",
        "--to",
        "http://s",
        "--to-token",
        "t",
    ]))
    .unwrap_err();
    assert!(e.0.contains("--id"), "{e}");
    let e = Config::from_flags(flags(&[
        "--from",
        "p:9090",
        "--to",
        "http://s",
        "--to-token",
        "t",
        "--id",
        "c",
    ]))
    .unwrap_err();
    assert!(e.0.contains("--from"), "{e}");
}

#[test]
fn pairs_and_salts_are_checked() {
    let mut args = BASE.to_vec();
    args.extend_from_slice(&["--label", "novalue"]);
    assert!(Config::from_flags(flags(&args)).is_err());

    let mut args = BASE.to_vec();
    args.extend_from_slice(&["--anonymize-labels", "instance"]);
    let e = Config::from_flags(flags(&args)).unwrap_err();
    assert!(e.0.contains("salt"), "{e}");

    let mut args = BASE.to_vec();
    args.extend_from_slice(&[
        "--anonymize-labels",
        "instance,job",
        "--anonymize-labels",
        "pod",
        "--anonymize-salt",
        "s",
        "--rename",
        "a=b",
        "--label",
        "x=y=z",
        "--listen",
        "",
    ]);
    let c = Config::from_flags(flags(&args)).unwrap();
    assert_eq!(c.anonymize_labels, vec!["instance", "job", "pod"]);
    assert_eq!(c.renames, vec![("a".into(), "b".into())]);
    assert_eq!(c.labels, vec![("x".into(), "y=z".into())]);
    assert_eq!(c.listen, None);
}

#[test]
fn lists_split_like_upstream_csv() {
    let split = |v: &str| split_list("--label", v);
    assert_eq!(split("a=b,c=d").unwrap(), vec!["a=b", "c=d"]);
    assert_eq!(split("a=b").unwrap(), vec!["a=b"]);
    assert_eq!(split("").unwrap(), Vec::<String>::new());
    assert_eq!(split("a,,b,").unwrap(), vec!["a", "", "b", ""]);
    // Spaces are kept, as Go's CSV reader keeps them.
    assert_eq!(split(" a , b").unwrap(), vec![" a ", " b"]);
    // A quoted item holds commas; "" inside it is a quote.
    assert_eq!(split(r#""site=a,b",x=y"#).unwrap(), vec!["site=a,b", "x=y"]);
    assert_eq!(split(r#""q=say ""hi""""#).unwrap(), vec![r#"q=say "hi""#]);
    assert_eq!(split(r#""""#).unwrap(), vec![""]);
    for bad in [r#"a="b""#, r#""a"b"#, r#""open"#, r#"x,"open,y"#] {
        let e = split(bad).unwrap_err();
        assert!(e.0.starts_with("--label "), "{bad}: {e}");
        assert!(!e.0.contains('\n'));
    }
}

#[test]
fn label_rename_and_anonymize_take_lists_as_repeated_flags() {
    let listed = {
        let mut args = BASE.to_vec();
        args.extend_from_slice(&[
            "--label",
            "a=b,c=d",
            "--label",
            r#""e=f,g""#,
            "--rename",
            "x=y,ALERTS=alerts",
            "--anonymize-labels",
            "instance,pod",
            "--anonymize-salt",
            "s",
            "--elide-label",
            "p,q",
        ]);
        Config::from_flags(flags(&args)).unwrap()
    };
    let repeated = {
        let mut args = BASE.to_vec();
        args.extend_from_slice(&[
            "--label",
            "a=b",
            "--label",
            "c=d",
            "--label",
            "e=f,g",
            "--rename",
            "x=y",
            "--rename",
            "ALERTS=alerts",
            "--anonymize-labels",
            "instance",
            "--anonymize-labels",
            "pod",
            "--anonymize-salt",
            "s",
            "--elide-label",
            "p",
            "--elide-label",
            "q",
        ]);
        // The repeated form of an item with a comma still needs its quotes.
        let at = args.iter().position(|a| *a == "e=f,g").unwrap();
        args[at] = r#""e=f,g""#;
        Config::from_flags(flags(&args)).unwrap()
    };
    for c in [&listed, &repeated] {
        assert_eq!(
            c.labels,
            vec![
                ("a".into(), "b".into()),
                ("c".into(), "d".into()),
                ("e".into(), "f,g".into())
            ]
        );
        assert_eq!(
            c.renames,
            vec![("x".into(), "y".into()), ("ALERTS".into(), "alerts".into())]
        );
        assert_eq!(c.anonymize_labels, vec!["instance", "pod"]);
        assert_eq!(c.elide_labels, vec!["p", "q"]);
    }
    // `--rename ''` turns the default off.
    let mut args = BASE.to_vec();
    args.extend_from_slice(&["--rename", ""]);
    assert!(Config::from_flags(flags(&args)).unwrap().renames.is_empty());
    // A broken list names its flag.
    let mut args = BASE.to_vec();
    args.extend_from_slice(&["--label", "a=b,c"]);
    let e = Config::from_flags(flags(&args)).unwrap_err();
    assert!(e.0.contains("--label \"c\""), "{e}");
    let mut args = BASE.to_vec();
    args.extend_from_slice(&["--anonymize-labels", "a\"b", "--anonymize-salt", "s"]);
    let e = Config::from_flags(flags(&args)).unwrap_err();
    assert!(e.0.starts_with("--anonymize-labels"), "{e}");
}

#[test]
fn match_is_never_split_on_commas() {
    let mut args = BASE.to_vec();
    args.extend_from_slice(&["--match", r#"{__name__="up",job=~"a,b"}"#, "--match", "x,y"]);
    let f = flags(&args);
    assert_eq!(f.matches.len(), 2);
    let e = Config::from_flags(f).unwrap_err();
    // `x,y` is one (invalid) selector, not two.
    assert!(e.0.starts_with("--match"), "{e}");
    let mut args = BASE.to_vec();
    args.extend_from_slice(&["--match", r#"{__name__="up",job=~"a,b"}"#]);
    let c = Config::from_flags(flags(&args)).unwrap();
    assert_eq!(c.matches.len(), 1);
    assert_eq!(c.matches[0].source, r#"{__name__="up",job=~"a,b"}"#);
}

#[test]
fn secrets_come_from_files_trimmed() {
    let dir = std::env::temp_dir().join(format!("tc-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let token = dir.join("token");
    std::fs::write(&token, "secret\n").unwrap();
    let args = [
        "--from",
        "http://p",
        "--to",
        "http://s",
        "--to-token-file",
        token.to_str().unwrap(),
        "--id",
        "c",
    ];
    let c = Config::from_flags(flags(&args)).unwrap();
    assert_eq!(c.to_token, "secret");
    let missing = dir.join("nope");
    let args = [
        "--from",
        "http://p",
        "--to",
        "http://s",
        "--to-token-file",
        missing.to_str().unwrap(),
        "--id",
        "c",
    ];
    let e = Config::from_flags(flags(&args)).unwrap_err();
    assert!(e.0.contains("--to-token-file"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn to_file_needs_once_and_no_server() {
    let args = [
        "--from",
        "http://p:9090",
        "--to-token",
        "t",
        "--id",
        "c",
        "--to-file",
        "/tmp/bundles",
    ];
    let mut with_once = args.to_vec();
    with_once.push("--once");
    let c = Config::from_flags(flags(&with_once)).unwrap();
    assert_eq!(c.to_file.as_deref(), Some(Path::new("/tmp/bundles")));
    assert_eq!(c.upload_url, "");
    let mut full = vec!["telemeter-client"];
    full.extend_from_slice(&args);
    assert!(
        Flags::try_parse_from(&full).is_err(),
        "--to-file without --once"
    );
    full.extend_from_slice(&["--once", "--to", "http://s:9003"]);
    assert!(Flags::try_parse_from(&full).is_err(), "--to-file with --to");
}
