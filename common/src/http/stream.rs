//! The socket a connection reads and writes: plain or TLS, with one deadline shared by all the
//! reads of a phase.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::Instant;

/// A socket whose reads share one deadline, so a peer trickling bytes cannot stretch a phase
/// (head, body, idle wait, TLS handshake) past its time, however many reads it takes.
pub(super) struct Deadlined {
    pub(super) tcp: TcpStream,
    pub(super) deadline: Option<Instant>,
}

impl Read for Deadlined {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(deadline) = self.deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::ErrorKind::TimedOut.into());
            }
            self.tcp.set_read_timeout(Some(left))?;
        }
        self.tcp.read(buf)
    }
}

impl Write for Deadlined {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.tcp.write(buf)
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
