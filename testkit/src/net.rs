//! Loopback ports for peers that must be told their port before they start (Prometheus, a
//! second server), where binding port 0 and reading it back is not possible.

use std::io;
use std::mem::size_of;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// A loopback TCP port that nobody else in this machine is given until the test process ends,
/// though the peer it is meant for can listen on it.
///
/// A port read back from a closed listener is free again at once: a server of another test
/// binding port 0, in the seconds before a peer that is meant to start late (a receiver that is
/// down at first) binds it, took it, and that peer never started (CI of a28228c: "prometheus
/// never became ready"). So the port stays bound, without listening, by a socket with
/// `SO_REUSEADDR` that is kept open for the rest of the process: Linux then never picks it for
/// another `bind` to port 0 nor for a `connect`'s own port, a connection to it is refused as to
/// any port nobody listens on, and a peer that binds with `SO_REUSEADDR` (Go's `net.Listen`, so
/// Prometheus, the Pushgateway, VictoriaMetrics; Rust's `TcpListener::bind`, so our binaries)
/// can still listen on it, as often as it restarts.
pub fn free_port() -> u16 {
    reserve().expect("reserve a loopback port")
}

/// Binds a socket to `127.0.0.1:0` with `SO_REUSEADDR`, leaves it open (see [`free_port`]) and
/// returns its port.
fn reserve() -> io::Result<u16> {
    // SAFETY: socket(2) takes integers only and touches no memory of ours.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by socket(2), is open, and nothing else owns it.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let on: libc::c_int = 1;
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from `on`, which outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&on as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: sockaddr_in is plain integers, for which all zeroes is a valid value.
    let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    addr.sin_family = libc::AF_INET as libc::sa_family_t;
    addr.sin_addr.s_addr = u32::from(Ipv4Addr::LOCALHOST).to_be();
    let mut len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: bind reads `len` bytes from `addr`, a sockaddr_in that outlives the call.
    let rc = unsafe {
        libc::bind(
            socket.as_raw_fd(),
            (&addr as *const libc::sockaddr_in).cast(),
            len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: getsockname writes at most `len` bytes into `addr`, which outlives the call, and
    // writes the length it used into `len`.
    let rc = unsafe {
        libc::getsockname(
            socket.as_raw_fd(),
            (&mut addr as *mut libc::sockaddr_in).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // Kept open until the process ends: the reservation is the point.
    std::mem::forget(socket);
    Ok(u16::from_be(addr.sin_port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn a_reserved_port_refuses_connections_is_never_given_again_and_a_peer_can_listen_on_it() {
        let port = free_port();
        assert_ne!(port, 0);
        let refused = TcpStream::connect(("127.0.0.1", port)).unwrap_err();
        assert_eq!(refused.kind(), io::ErrorKind::ConnectionRefused);
        for _ in 0..20_000 {
            let other = TcpListener::bind("127.0.0.1:0").unwrap();
            assert_ne!(other.local_addr().unwrap().port(), port);
        }
        for _ in 0..2 {
            let peer = TcpListener::bind(("127.0.0.1", port)).expect("the peer listens");
            let _client = TcpStream::connect(("127.0.0.1", port)).unwrap();
            assert!(peer.accept().is_ok());
        }
    }
}
