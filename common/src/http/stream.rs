//! The socket a connection reads and writes: plain or TLS, with one deadline shared by all the
//! reads of a phase.

use std::io::{self, IoSlice, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// How far a read's end may miss its deadline (either way) before the socket's timeout is set
/// again: see [`Deadlined::read`].
pub(super) const TIMEOUT_SLACK: Duration = Duration::from_millis(10);

/// A socket whose reads share one deadline, so a peer trickling bytes cannot stretch a phase
/// (head, body, idle wait, TLS handshake) past its time, however many reads it takes.
pub(super) struct Deadlined {
    pub(super) tcp: TcpStream,
    pub(super) deadline: Option<Instant>,
    /// The receive timeout the socket has now (`None`: never set, so none).
    pub(super) timeout: Option<Duration>,
}

impl Deadlined {
    /// `tcp`, its reads ending at `deadline`.
    pub(super) fn new(tcp: TcpStream, deadline: Option<Instant>) -> Deadlined {
        Deadlined {
            tcp,
            deadline,
            timeout: None,
        }
    }
}

impl Read for Deadlined {
    /// The kernel ends a read its timeout after the read starts. Setting that timeout is a
    /// syscall, and most reads of a phase start with the same time left to within microseconds
    /// (every idle wait between keep-alive requests does), so the timeout already set is kept
    /// while it ends this read within [`TIMEOUT_SLACK`] of the deadline. A read it ends before
    /// the deadline is read again with the exact time left, so no phase ends early, and none
    /// ends more than the slack late.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(deadline) = self.deadline else {
            return self.tcp.read(buf);
        };
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::ErrorKind::TimedOut.into());
            }
            if self
                .timeout
                .is_none_or(|set| set.abs_diff(left) > TIMEOUT_SLACK)
            {
                self.tcp.set_read_timeout(Some(left))?;
                self.timeout = Some(left);
            }
            match self.tcp.read(buf) {
                Err(e) if is_timeout(&e) && Instant::now() < deadline => {}
                read => return read,
            }
        }
    }
}

impl Write for Deadlined {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.tcp.write(buf)
    }

    // One `writev`, not a write of the first part only (the default).
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.tcp.write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.tcp.flush()
    }
}

pub(super) enum Stream {
    Plain(Deadlined),
    Tls(Box<rustls::StreamOwned<rustls::ServerConnection, Deadlined>>),
}

impl Stream {
    pub(super) fn socket(&mut self) -> &mut Deadlined {
        match self {
            Stream::Plain(socket) => socket,
            Stream::Tls(tls) => &mut tls.sock,
        }
    }

    pub(super) fn set_deadline(&mut self, deadline: Instant) {
        self.socket().deadline = Some(deadline);
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(socket) => socket.read(buf),
            Stream::Tls(tls) => tls.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(socket) => socket.write(buf),
            Stream::Tls(tls) => tls.write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Plain(socket) => socket.write_vectored(bufs),
            Stream::Tls(tls) => tls.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(socket) => socket.flush(),
            Stream::Tls(tls) => tls.flush(),
        }
    }
}

pub(super) fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}
