//! Termination signals as a channel, so main loops can select on them like on any other event.

use std::sync::atomic::{AtomicU64, Ordering};

/// The signals [`termination_channel`] turns into messages.
const SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

/// The `pthread_t` of the last waiting thread started, so tests can direct a signal at it.
static WAITER: AtomicU64 = AtomicU64::new(0);

fn signal_set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset only write into the set we own; the signal numbers are valid.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in SIGNALS {
            libc::sigaddset(&mut set, signal);
        }
        set
    }
}

/// Blocks SIGTERM, SIGINT and SIGHUP in the calling thread (and so in every thread it starts later)
/// and starts a thread that waits for them with `sigwait`, sending each signal number on the
/// returned channel. Call it first thing in `main`, before any other thread starts.
///
/// Threads started before the call keep the signals unblocked, and the kernel may deliver a
/// process-directed signal to one of them, which then takes the default action (termination). If
/// the receiver is dropped, the next signal also takes its default action, so a process that
/// stopped listening can still be stopped.
pub fn termination_channel() -> crossbeam_channel::Receiver<i32> {
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
                if sender.send(signal).is_err() {
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
            Ok(libc::SIGHUP)
        );
    }
}
