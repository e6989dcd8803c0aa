//! `deploy/`'s systemd units: hardened (`systemd-analyze security` exposure at most 2.5 each) and
//! a timer that cannot leave a site past the TTL after one failed run.

use std::path::Path;
use std::process::Command;

fn deploy(file: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(file)
}

#[test]
fn every_unit_is_hardened_to_an_exposure_of_at_most_2_5() {
    for unit in [
        "telemeter-server.service",
        "telemeter-client.service",
        "telemeter-client-once.service",
    ] {
        // --threshold fails the command when the exposure (in tenths) is above it.
        let out = Command::new("systemd-analyze")
            .args(["security", "--offline=true", "--threshold=25"])
            .arg(deploy(unit))
            .current_dir(std::env::temp_dir())
            .output()
            .expect("systemd-analyze (Debian package systemd)");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let last = text.lines().last().unwrap_or("").to_string();
        assert!(out.status.success(), "{unit}: {last}\n{text}");
        assert!(last.contains("Overall exposure level"), "{unit}: {text}");
    }
}

#[test]
fn the_timer_runs_on_the_wall_clock_precisely_and_failed_runs_retry() {
    let timer = std::fs::read_to_string(deploy("telemeter-client-once.timer")).unwrap();
    let lines: Vec<&str> = timer.lines().map(str::trim).collect();
    // Persistent= applies to OnCalendar= only.
    assert!(lines.contains(&"Persistent=true"));
    assert!(
        lines.iter().any(|l| l.starts_with("OnCalendar=")),
        "{timer}"
    );
    assert!(
        !lines.iter().any(|l| l.starts_with("OnUnitActiveSec=")),
        "{timer}"
    );
    assert!(lines.contains(&"AccuracySec=1s"), "{timer}");
    let service = std::fs::read_to_string(deploy("telemeter-client-once.service")).unwrap();
    let lines: Vec<&str> = service.lines().map(str::trim).collect();
    assert!(lines.contains(&"Restart=on-failure"), "{service}");
    assert!(lines.contains(&"RestartPreventExitStatus=2 3"), "{service}");
}
