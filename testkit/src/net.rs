//! Loopback ports for peers that must be told their port before they start (Prometheus, a
//! second server), where binding port 0 and reading it back is not possible.

use std::net::TcpListener;

/// A loopback port nobody listens on right now. Another process may take it before the caller
/// binds it; callers start their peer promptly and fail loudly if the bind fails.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}
