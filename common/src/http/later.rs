//! Answering a request from another thread than its connection's: [`Later`].
//!
//! Why: a request whose answer waits for something slow and shared (an upload waits for the
//! store's group commit, ~2 ms) would have its connection's thread sleep until then, be woken
//! for the answer, write it, then sleep again in `recv` for the next request: two sleeps and
//! wake-ups a request, the larger part of an upload's cost on a busy 2-core machine. With a
//! [`Later`], the thread that finishes the work (the committer) writes the answer, and the
//! connection's thread goes straight back to reading: one sleep a request.
//!
//! How it stays as correct as answering in place:
//! - Order: a connection owes at most one answer at a time. Before it answers anything else
//!   (a pipelined request, a protocol error) or closes, it waits until the answer owed is
//!   settled, so answers go out in request order and the socket is open while one is owed.
//! - Never blocking the answering thread: the answer is written with `MSG_DONTWAIT`. What does not
//!   fit in the socket's buffer (a peer that stops reading its answers) is handed back to the
//!   connection's thread, woken by shutting our read side, which writes it under the write
//!   timeout and closes. A streamed body, an answer that closes the connection, and an answer
//!   never given (the [`Later`] dropped) are handed back the same way (the last as `500`).
//! - Shutdown and eviction: a connection that owes an answer is not idle for them; once it is
//!   settled, a server stopping meanwhile has its read side shut by whoever settled it, so its
//!   thread leaves as an idle one would.
//! - Only plain-TCP keep-alive requests are answered later (a TLS session's state is its
//!   connection thread's), and only on the front's inline paths.

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use crate::sync::{lock, unpoison};

use super::shared::Shared;
use super::Response;

/// The answer a connection owes, shared between it and its [`Later`].
#[derive(Default)]
pub(super) struct Owed {
    /// An answer is owed: from when the handler took the [`Later`] until it is settled. Read
    /// without the lock by shutdown and eviction (which leave such a connection alone).
    outstanding: AtomicBool,
    /// What the connection must still write once settled, and whether its thread waits for it.
    handback: Mutex<Settling>,
    settled: Condvar,
}

/// [`Owed`]'s state under its lock.
#[derive(Default)]
struct Settling {
    /// What the connection must still write once settled; `None` when the answer went out.
    handback: Option<Handback>,
    /// Threads asleep in [`Owed::settle`]: the answering thread wakes them only when there are
    /// some. Nearly always none (the connection waits only when the peer's next request beat
    /// the answer's settling), and a condition variable's notify is a `futex` system call
    /// whether anyone sleeps or not: one an upload, on the committer's thread, for nothing.
    waiting: usize,
}

/// What the answering thread could not write, for the connection's thread to write and close.
pub(super) enum Handback {
    /// The rest of an encoded answer.
    Bytes(Vec<u8>),
    /// A whole answer (a streamed body, or one that closes the connection).
    Response(Response),
}

impl Owed {
    /// Whether an answer is owed now.
    pub(super) fn outstanding(&self) -> bool {
        self.outstanding.load(Ordering::SeqCst)
    }

    /// Waits until no answer is owed, and takes what was handed back, if anything.
    pub(super) fn settle(&self) -> Option<Handback> {
        let mut state = lock(&self.handback);
        while self.outstanding.load(Ordering::SeqCst) {
            state.waiting += 1;
            state = unpoison(self.settled.wait(state));
            state.waiting -= 1;
        }
        state.handback.take()
    }
}

/// The promise of the answer to one request, to be given from any thread with
/// [`Later::send`]; dropped without it, the request is answered `500`. See the module doc.
pub struct Later {
    owed: Arc<Owed>,
    fd: RawFd,
    shared: Arc<Shared>,
    sent: bool,
}

/// What [`super::Handler::handle_later`] is given: takes the [`Later`] of the request when the
/// handler will answer it later.
pub struct Defer<'a> {
    pub(super) owed: &'a Arc<Owed>,
    pub(super) fd: RawFd,
    pub(super) shared: &'a Arc<Shared>,
}

impl Defer<'_> {
    /// The request will be answered later, through the returned [`Later`]: the handler then
    /// returns `None`.
    pub fn later(self) -> Later {
        self.owed.outstanding.store(true, Ordering::SeqCst);
        Later {
            owed: self.owed.clone(),
            fd: self.fd,
            shared: self.shared.clone(),
            sent: false,
        }
    }
}

impl Later {
    /// Answers the request with `response`, without blocking: what cannot be written at once is
    /// handed back to the connection's thread (module doc).
    pub fn send(mut self, response: Response) {
        self.sent = true;
        let handback = match super::connection::encode_small(response, &self.shared.config.name) {
            Ok(bytes) => match send_now(self.fd, &bytes) {
                Ok(written) if written == bytes.len() => None,
                Ok(written) => Some(Handback::Bytes(
                    bytes.get(written..).unwrap_or(&[]).to_vec(),
                )),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Some(Handback::Bytes(bytes)),
                // The peer is gone; the connection's read fails too, and it closes.
                Err(_) => None,
            },
            Err(response) => Some(Handback::Response(response)),
        };
        self.settle(handback);
    }

    fn settle(&self, handback: Option<Handback>) {
        let wake = handback.is_some();
        let mut state = lock(&self.owed.handback);
        state.handback = handback;
        self.owed.outstanding.store(false, Ordering::SeqCst);
        // Under the lock, so the connection (which closes the socket only after it saw the
        // answer settled, under this lock) has not closed it yet. A handback needs the thread
        // now, not at its next request; a server stopping since this answer was owed skipped
        // the connection (it was not idle), so it is shut here (see `Shared::stop`).
        if wake || self.shared.stopping() {
            // SAFETY: the descriptor is the connection's, open while its answer is owed (see
            // above and `Connection`'s drop, which settles before closing).
            unsafe {
                libc::shutdown(self.fd, libc::SHUT_RD);
            }
        }
        // Read under the lock: a thread that found the answer owed counted itself before it
        // let the lock go to sleep, so none is missed.
        let waiting = state.waiting > 0;
        drop(state);
        if waiting {
            self.owed.settled.notify_all();
        }
    }
}

impl Drop for Later {
    fn drop(&mut self) {
        if !self.sent {
            log::error!(
                "{}: a request's answer was never given; answering 500",
                self.shared.config.name
            );
            self.settle(Some(Handback::Response(Response::text(
                500,
                "internal error",
            ))));
        }
    }
}

/// One `send(2)` that never blocks and never raises SIGPIPE.
fn send_now(fd: RawFd, bytes: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `bytes` is a valid buffer of its length; `fd` is open (see `Later::settle`).
        let sent = unsafe {
            libc::send(
                fd,
                bytes.as_ptr().cast(),
                bytes.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if sent >= 0 {
            return Ok(sent as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}
