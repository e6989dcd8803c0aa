//! Termination signals as a channel, so main loops can select on them like on any other event.
//!
//! The channel carries a [`Signal`] rather than the raw number, so no caller hard-codes what
//! `SIGHUP` is on this platform.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

/// A signal [`termination_channel`] reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    /// `SIGTERM`: stop (what service managers send).
    Terminate,
    /// `SIGINT`: stop (Ctrl-C).
    Interrupt,
    /// `SIGHUP`: by convention, reload the configuration.
    Reload,
}

impl Signal {
    /// The signal of number `number`, if it is one of those reported.
    pub fn from_number(number: libc::c_int) -> Option<Signal> {
        match number {
            libc::SIGTERM => Some(Signal::Terminate),
            libc::SIGINT => Some(Signal::Interrupt),
            libc::SIGHUP => Some(Signal::Reload),
            _ => None,
        }
    }

    /// The platform's number for this signal.
    pub fn number(self) -> libc::c_int {
        match self {
            Signal::Terminate => libc::SIGTERM,
            Signal::Interrupt => libc::SIGINT,
            Signal::Reload => libc::SIGHUP,
        }
    }
}

impl fmt::Display for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Signal::Terminate => "SIGTERM",
            Signal::Interrupt => "SIGINT",
            Signal::Reload => "SIGHUP",
        })
    }
}

/// The signals [`termination_channel`] turns into messages.
const SIGNALS: [Signal; 3] = [Signal::Terminate, Signal::Interrupt, Signal::Reload];

/// The `pthread_t` of the last waiting thread started, so tests can direct a signal at it.
static WAITER: AtomicU64 = AtomicU64::new(0);

fn signal_set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset only write into the set we own; the signal numbers are valid.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in SIGNALS {
            libc::sigaddset(&mut set, signal.number());
        }
        set
    }
}

/// Blocks SIGTERM, SIGINT and SIGHUP in the calling thread (and so in every thread it starts later)
/// and starts a thread that waits for them with `sigwait`, sending each as a [`Signal`] on the
/// returned channel. Call it first thing in `main`, before any other thread starts.
///
/// Threads started before the call keep the signals unblocked, and the kernel may deliver a
/// process-directed signal to one of them, which then takes the default action (termination). If
/// the receiver is dropped, the next signal also takes its default action, so a process that
/// stopped listening can still be stopped.
pub fn termination_channel() -> crossbeam_channel::Receiver<Signal> {
    let set = signal_set();
    // SAFETY: `set` is initialised; a null old-set pointer is allowed. The call only fails for an
    // invalid `how`, which SIG_BLOCK is not.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        log::error!(
            "blocking termination signals failed: {}",
            std::io::Error::from_raw_os_error(rc)
        );
    }
    let (sender, receiver) = crossbeam_channel::unbounded();
    let spawned = std::thread::Builder::new()
        .name("signals".into())
        .stack_size(64 << 10)
        .spawn(move || {
            // SAFETY: pthread_self has no preconditions.
            WAITER.store(unsafe { libc::pthread_self() } as u64, Ordering::SeqCst);
            loop {
                let mut signal: libc::c_int = 0;
                // SAFETY: `set` is initialised and `signal` is a valid out pointer.
                let rc = unsafe { libc::sigwait(&set, &mut signal) };
                if rc != 0 {
                    log::error!(
                        "waiting for signals failed: {}",
                        std::io::Error::from_raw_os_error(rc)
                    );
                    return;
                }
                // sigwait only returns members of `set`, which are all reported signals.
                let Some(reported) = Signal::from_number(signal) else {
                    continue;
                };
                if sender.send(reported).is_err() {
                    // Nobody listens any more: let the signal do what it would have done.
                    // SAFETY: unblocking in this thread then raising to this thread is the
                    // documented way to get a signal's default action.
                    unsafe {
                        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
                        libc::raise(signal);
                    }
                    return;
                }
            }
        });
    if let Err(e) = spawned {
        log::error!("starting the signal thread failed: {e}");
    }
    receiver
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A process-directed `kill(getpid(), SIGHUP)` cannot be tested here: the test harness runs
    /// tests on threads that do not block SIGHUP, and the kernel may pick one of them, killing the
    /// test process. So the signal is directed at the waiting thread itself, which exercises the
    /// same `sigwait` → channel path.
    #[test]
    fn a_sighup_directed_at_the_waiter_arrives_on_the_channel() {
        let receiver = termination_channel();
        // The waiter publishes its id as it starts; bounded wait.
        let mut waiter = 0;
        for _ in 0..500 {
            waiter = WAITER.load(Ordering::SeqCst);
            if waiter != 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_ne!(waiter, 0, "the signal thread never started");
        // SAFETY: `waiter` is the id of a live thread (it loops forever while the receiver lives).
        let rc = unsafe { libc::pthread_kill(waiter as libc::pthread_t, libc::SIGHUP) };
        assert_eq!(rc, 0);
        assert_eq!(
            receiver.recv_timeout(Duration::from_secs(10)),
            Ok(Signal::Reload)
        );
    }

    #[test]
    fn numbers_round_trip() {
        for signal in SIGNALS {
            assert_eq!(Signal::from_number(signal.number()), Some(signal));
        }
        assert_eq!(Signal::from_number(libc::SIGKILL), None);
        assert_eq!(Signal::Reload.to_string(), "SIGHUP");
    }
}
