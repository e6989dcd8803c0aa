//! Child processes under test: their logs captured line by line, bounded waits for their exit,
//! signals by name, and a guard that never leaves one running after a failed assertion.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, ExitStatus, Output};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::wait::wait_for;

/// The lines a child wrote so far, shared with the thread reading them.
pub type Logs = Arc<Mutex<Vec<String>>>;

/// Reads `stream` (a child's piped stderr or stdout) on a thread: echoes each line to the test's
/// stderr as `[prefix] line` (cargo shows it for a failing test), hands it to `on_line`, then
/// keeps it in the returned [`Logs`]. The thread ends when the child closes the stream.
pub fn capture_lines(
    stream: impl Read + Send + 'static,
    prefix: &str,
    mut on_line: impl FnMut(&str) + Send + 'static,
) -> Logs {
    let logs: Logs = Arc::new(Mutex::new(Vec::new()));
    let kept = logs.clone();
    let prefix = prefix.to_string();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            eprintln!("[{prefix}] {line}");
            on_line(&line);
            telemeter_common::sync::lock(&kept).push(line);
        }
    });
    logs
}

/// A signal to send with [`kill`]: the ones the tests use, by name rather than number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGHUP: reload.
    Hup,
    /// SIGINT: interrupt (Ctrl-C), a graceful stop.
    Int,
    /// SIGKILL: a crash the process cannot see coming.
    Kill,
    /// SIGTERM: the graceful stop a service manager sends.
    Term,
    /// SIGSTOP: freeze (a peer that hangs).
    Stop,
    /// SIGCONT: thaw after [`Signal::Stop`].
    Cont,
}

impl Signal {
    fn number(self) -> libc::c_int {
        match self {
            Signal::Hup => libc::SIGHUP,
            Signal::Int => libc::SIGINT,
            Signal::Kill => libc::SIGKILL,
            Signal::Term => libc::SIGTERM,
            Signal::Stop => libc::SIGSTOP,
            Signal::Cont => libc::SIGCONT,
        }
    }
}

/// Sends `signal` to process `pid`.
pub fn kill(pid: u32, signal: Signal) -> std::io::Result<()> {
    let pid = libc::pid_t::try_from(pid)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "pid out of range"))?;
    // SAFETY: kill(2) takes two integers and touches no memory of ours.
    if unsafe { libc::kill(pid, signal.number()) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Waits up to `within` for `child` to exit: its status, or None if it is still running (left
/// running: the caller decides).
pub fn wait_exit(child: &mut Child, within: Duration) -> Option<ExitStatus> {
    wait_for(within, || child.try_wait().ok().flatten())
}

/// [`wait_exit`], killing (and reaping) the child when the bound passes.
pub fn wait_or_kill(child: &mut Child, within: Duration) -> Option<ExitStatus> {
    let status = wait_exit(child, within);
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    status
}

/// Waits up to `within` for `child`, killing it when the bound passes, and returns what it
/// printed on its piped stdout and stderr.
pub fn wait_output(mut child: Child, within: Duration) -> Output {
    if wait_exit(&mut child, within).is_none() {
        let _ = child.kill();
    }
    child.wait_with_output().expect("child output")
}

/// A child process killed on drop, so a failing assertion never leaves it running.
pub struct Guard(pub Child);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// What `binary --version` prints, checked to exit 0.
pub fn version_line(binary: &str) -> String {
    let out = std::process::Command::new(binary)
        .arg("--version")
        .output()
        .unwrap_or_else(|e| panic!("running {binary} --version: {e}"));
    assert!(out.status.success(), "{binary} --version: {:?}", out.status);
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Checks a `--version` line of binary `name`: `name VERSION (revision R, ...)`, where R is this
/// checkout's revision when git can tell it (the binary was built from it: cargo builds it
/// again when HEAD moves).
pub fn assert_version_line(name: &str, version: &str, text: &str) {
    assert!(
        text.starts_with(&format!("{name} {version} (revision ")),
        "{text}"
    );
    let revision = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_string());
    if let Some(revision) = revision {
        assert!(text.contains(revision.as_str()), "{text} lacks {revision}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    #[test]
    fn a_term_signal_ends_a_sleeping_child_and_the_wait_sees_it() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        assert_eq!(wait_exit(&mut child, Duration::from_millis(50)), None);
        kill(child.id(), Signal::Term).unwrap();
        let status = wait_exit(&mut child, Duration::from_secs(10)).expect("exited");
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGTERM));
    }

    #[test]
    fn wait_or_kill_reaps_a_child_past_its_bound() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        assert_eq!(wait_or_kill(&mut child, Duration::from_millis(50)), None);
        assert!(child.try_wait().unwrap().is_some());
    }

    #[test]
    fn captured_lines_are_kept_in_order() {
        let mut child = Command::new("printf")
            .arg("a\\nb\\n")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let logs = capture_lines(child.stdout.take().unwrap(), "printf", |_| {});
        assert!(wait_exit(&mut child, Duration::from_secs(10)).is_some());
        assert!(crate::wait_until(Duration::from_secs(10), || logs
            .lock()
            .unwrap()
            .len()
            == 2));
        assert_eq!(*logs.lock().unwrap(), ["a", "b"]);
    }
}
