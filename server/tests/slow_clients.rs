//! Slow and many clients: 1,000 connections that send one byte of a request head every few
//! seconds and 2,000 that send nothing, held open (and reopened when the server drops them) for
//! 60 s, while a normal client pushes every 200 ms on fresh connections. Its uploads must all
//! succeed with p99 under a second, and the server's threads and memory must stay bounded; the
//! peaks are printed.
//!
//! The attacking sockets come from 40 loopback addresses (127.0.1.x, 127.0.2.x), none of them the
//! normal client's (127.0.0.1): a crowd from many addresses meets the global connection cap,
//! whereas a crowd from the client's own address would meet the per-address cap
//! (`--max-connections-per-peer`), which by design makes that address's connections share it.
//!
//! Long, so `#[ignore]`d: `make test-reliability` runs it. `SLOW_SECS` shortens it,
//! `SLOW_MAX_CONNECTIONS` sets the server's `--max-connections` (default: the server's own, 1024,
//! well under the 3,000 attacking sockets).
//!
//! Found (2026-11): with `--max-connections 1024` the attack filled the cap and 73 of 84 normal
//! uploads failed (503 "too many connections", or a reset): the front refused new connections while
//! every slot was held by a socket that never completed a request. Fixed in `common::http`: at the
//! cap the connection that has waited longest without completing a request is closed to make room,
//! so attackers evict each other and a prompt client gets in. With room for all 3,000 sockets
//! (`--max-connections 4096`) before the fix: 0 failures, p99 83 ms, 3,016 threads, 82 MB resident.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use telemeter_common::delimited;
use telemeter_common::media::PROTO_DELIMITED;
use telemeter_common::snappy;

const KEY: &str = "0123456789abcdef0123456789abcdef-slowclient-shared-key";
const SLOW: usize = 1000;
const IDLE: usize = 2000;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Raises this process's open-file limit to at least `want` (the server child inherits it); the
/// reason when the hard limit does not allow it.
fn raise_nofile(want: u64) -> Result<u64, String> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return Err(format!("getrlimit: {}", std::io::Error::last_os_error()));
        }
        if limit.rlim_cur < want {
            if limit.rlim_max < want {
                return Err(format!(
                    "the hard open-file limit is {}, below the {want} the test needs",
                    limit.rlim_max
                ));
            }
            limit.rlim_cur = want;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(format!("setrlimit: {}", std::io::Error::last_os_error()));
            }
        }
    }
    Ok(limit.rlim_cur)
}

/// Threads, resident and peak resident memory (KiB) of `pid` from /proc.
fn proc_status(pid: u32) -> Option<(u64, u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        text.lines()
            .find(|l| l.starts_with(name))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    Some((field("Threads:")?, field("VmRSS:")?, field("VmHWM:")?))
}

/// Source addresses each attack spreads its sockets over.
const ATTACK_ADDRESSES: usize = 20;

/// Attacker sockets: kept open, reopened when the server closes them.
struct Attack {
    addr: SocketAddr,
    sockets: Vec<Option<TcpStream>>,
    /// Whether these sockets trickle bytes (else they stay silent).
    trickle: bool,
    /// The third byte of the attack's 127.0.x.y source addresses.
    net: u8,
    reconnects: u64,
}

impl Attack {
    /// Socket `i` comes from one of [`ATTACK_ADDRESSES`] addresses, none the normal client's: a
    /// crowd of many addresses, so it meets the global cap rather than the per-address one.
    fn connect(net: u8, i: usize, addr: SocketAddr) -> Option<TcpStream> {
        let from = Ipv4Addr::new(127, 0, net, 1 + (i % ATTACK_ADDRESSES) as u8);
        let tcp = connect_from(from, addr).ok()?;
        tcp.set_nonblocking(true).ok()?;
        Some(tcp)
    }

    fn new(addr: SocketAddr, n: usize, trickle: bool, net: u8) -> Attack {
        Attack {
            addr,
            sockets: (0..n).map(|i| Attack::connect(net, i, addr)).collect(),
            trickle,
            net,
            reconnects: 0,
        }
    }

    /// One pass: trickle a byte (when trickling), notice closed sockets and reopen them.
    fn tick(&mut self, head_byte: u8) {
        let mut buf = [0u8; 512];
        for (i, slot) in self.sockets.iter_mut().enumerate() {
            let alive = match slot {
                None => false,
                Some(tcp) => {
                    let mut alive = true;
                    if self.trickle && tcp.write(&[head_byte]).is_err() {
                        alive = false;
                    }
                    // The server answering (408, 503) or closing means this one is done.
                    match tcp.read(&mut buf) {
                        Ok(_) => alive = false,
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                        Err(_) => alive = false,
                    }
                    alive
                }
            };
            if !alive {
                *slot = Attack::connect(self.net, i, self.addr);
                self.reconnects += 1;
                if let (Some(tcp), true) = (slot.as_mut(), self.trickle) {
                    let _ = tcp.write(b"POST /upload HTTP/1.1\r\nHost: x\r\nX-Slow: ");
                }
            }
        }
    }

    fn open(&self) -> usize {
        self.sockets.iter().filter(|s| s.is_some()).count()
    }
}

/// One upload on a fresh connection: status (0 when the connection failed) and how long it took.
fn timed_upload(url: &str, token: &str, body: &[u8]) -> (u16, Duration) {
    let agent = ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build(),
    );
    let started = Instant::now();
    let status = match agent
        .post(url)
        .header("Authorization", &format!("Bearer {token}"))
        .header("Content-Type", PROTO_DELIMITED)
        .header("Content-Encoding", "snappy")
        .send(body)
    {
        Ok(mut r) => {
            let _ = r.body_mut().read_to_vec();
            r.status().as_u16()
        }
        Err(_) => 0,
    };
    (status, started.elapsed())
}

#[test]
#[ignore = "60 s; run by make test-reliability"]
fn slow_and_idle_connections_do_not_starve_a_normal_client() {
    let secs: u64 = env_or("SLOW_SECS", 60);
    let max_connections: usize = env_or("SLOW_MAX_CONNECTIONS", 1024);
    // 3,000 attacker sockets here, as many accepted ones in the server.
    if let Err(reason) = raise_nofile(4096) {
        println!("SKIPPED: {reason}");
        return;
    }

    let dir = TempDir::new("slow");
    let max = max_connections.to_string();
    let s = ServerProcess::setup(&dir)
        .key(KEY)
        .args(&["--max-connections", &max])
        .start();
    let pid = s.child.id();
    let token = s.upload_token("secret", "test");
    let (threads0, rss0, _) = proc_status(pid).unwrap();
    println!(
        "before: {threads0} threads, {rss0} KiB resident; --max-connections {max_connections}"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let peak_threads = Arc::new(AtomicU64::new(threads0));
    let peak_rss = Arc::new(AtomicU64::new(rss0));
    let peak_open = Arc::new(AtomicU64::new(0));
    let monitor = {
        let (stop, peak_threads, peak_rss) = (stop.clone(), peak_threads.clone(), peak_rss.clone());
        let (peak_open, metrics_url) = (peak_open.clone(), s.url_internal("/metrics"));
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                if let Some((threads, rss, _)) = proc_status(pid) {
                    peak_threads.fetch_max(threads, Ordering::SeqCst);
                    peak_rss.fetch_max(rss, Ordering::SeqCst);
                }
                let metrics = get(&metrics_url, &[]).body;
                let open = metric_value(
                    &metrics,
                    "telemeter_server_http_open_connections",
                    &["external"],
                );
                peak_open.fetch_max(open as u64, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };
    let attackers: Vec<_> = [(SLOW, true, 1), (IDLE, false, 2)]
        .into_iter()
        .map(|(n, trickle, net)| {
            let (stop, addr) = (stop.clone(), s.external);
            std::thread::spawn(move || {
                let mut attack = Attack::new(addr, n, trickle, net);
                let mut min_open = usize::MAX;
                while !stop.load(Ordering::SeqCst) {
                    attack.tick(b'a');
                    min_open = min_open.min(attack.open());
                    // A byte every 3 s per slow socket; silent ones are checked as often.
                    for _ in 0..30 {
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
                (attack.reconnects, min_open)
            })
        })
        .collect();

    // Let the attack take hold, then push like a normal client for the rest of the time.
    std::thread::sleep(Duration::from_secs(3.min(secs)));
    let url = s.url("/upload");
    let deadline = Instant::now() + Duration::from_secs(secs.saturating_sub(3));
    let mut latencies = Vec::new();
    let mut failures = Vec::new();
    while Instant::now() < deadline {
        let body = snappy::encode_framed(&delimited::encode(&families(None, 50, now_ms())));
        let (status, took) = timed_upload(&url, &token, &body);
        if status != 200 {
            failures.push(status);
        }
        latencies.push(took);
        std::thread::sleep(Duration::from_millis(200));
    }
    let metrics = get(&s.url_internal("/metrics"), &[]).body;
    stop.store(true, Ordering::SeqCst);
    for (a, name) in attackers.into_iter().zip(["slow", "idle"]) {
        let (reconnects, min_open) = a.join().unwrap();
        println!("{name} attackers: {reconnects} reconnects, at least {min_open} open at any pass");
    }
    monitor.join().unwrap();
    let (_, _, hwm) = proc_status(pid).unwrap();

    latencies.sort();
    let n = latencies.len();
    let p = |q: f64| latencies[((n as f64 * q).ceil() as usize).clamp(1, n) - 1];
    let (p50, p99, worst) = (p(0.5), p(0.99), latencies[n - 1]);
    let threads = peak_threads.load(Ordering::SeqCst);
    let rss = peak_rss.load(Ordering::SeqCst);
    println!(
        "normal client: {n} uploads, {} failed {failures:?}; p50 {p50:?}, p99 {p99:?}, max {worst:?}",
        failures.len()
    );
    let open = peak_open.load(Ordering::SeqCst);
    println!(
        "server peaks: {open} open connections, {threads} threads, {rss} KiB resident (VmHWM {hwm} KiB)"
    );
    for name in [
        "telemeter_server_http_open_connections",
        "telemeter_server_http_rejected_connections_total",
        "telemeter_server_http_evicted_connections_total",
        "telemeter_server_http_protocol_errors_total",
    ] {
        println!(
            "{name}{{port=\"external\"}} {}",
            metric_value(&metrics, name, &["external"])
        );
    }

    // The attack really held its connections (else the rest proves nothing).
    assert!(
        open as usize >= (SLOW + IDLE).min(max_connections) * 95 / 100,
        "only {open} connections were open at once"
    );
    assert!(failures.is_empty(), "normal uploads failed: {failures:?}");
    // No one was refused at the cap while evicted connections were leaving: the accept loop
    // waits for them. (Found 2026-12: under CPU contention the departures lagged, dozens of
    // connections got 503, and now and then one was the normal client's.)
    let rejected = metric_value(
        &metrics,
        "telemeter_server_http_rejected_connections_total",
        &["external"],
    );
    assert_eq!(rejected, 0.0, "connections refused at the cap");
    assert!(p99 < Duration::from_secs(1), "p99 {p99:?}");
    // Bounded: one thread per connection up to the cap, on top of the fixed ones the idle server
    // already had (the worker pools of both ports, accept, store: `threads0`); the internal port
    // is idle here. (At the cap, up to cap/8 evicted connections may still be on their way out.)
    let bound = threads0 + max_connections as u64 + max_connections as u64 / 8 + 16;
    assert!(threads <= bound, "{threads} threads, over {bound}");
    // A connection thread costs its touched stack pages and buffers: well under 64 KiB each.
    let memory_bound = 64 * 1024 + max_connections as u64 * 64;
    assert!(
        hwm <= memory_bound,
        "VmHWM {hwm} KiB over {memory_bound} KiB"
    );
}

// ---------------------------------------------------------------------------------------------
// Body memory and worker slots held by peers that send heads and stall

/// A TCP connection to `to` from the local address `from` (a 127.0.0.x address), so one test can
/// play many peer addresses.
fn connect_from(from: Ipv4Addr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let SocketAddr::V4(to) = to else {
        panic!("IPv4 only")
    };
    let addr = |ip: Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(ip.octets()),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain socket calls on a descriptor owned here until it is wrapped (or closed).
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // Linux bounds a blocking connect by the send timeout.
        let timeout = libc::timeval {
            tv_sec: 2,
            tv_usec: 0,
        };
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            &timeout as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
        let local = addr(from, 0);
        let remote = addr(*to.ip(), to.port());
        if libc::bind(fd, &local as *const _ as *const libc::sockaddr, len) != 0
            || libc::connect(fd, &remote as *const _ as *const libc::sockaddr, len) != 0
        {
            let e = std::io::Error::last_os_error();
            libc::close(fd);
            return Err(e);
        }
        let tcp = <TcpStream as std::os::fd::FromRawFd>::from_raw_fd(fd);
        tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
        tcp.set_write_timeout(Some(Duration::from_secs(10)))?;
        Ok(tcp)
    }
}

/// An upload from `from` on a fresh connection: its status (0 when the connection failed).
fn upload_from(from: Ipv4Addr, to: SocketAddr, token: &str, body: &[u8]) -> u16 {
    let Ok(mut tcp) = connect_from(from, to) else {
        return 0;
    };
    let mut request = format!(
        "POST /upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Type: {PROTO_DELIMITED}\r\nContent-Encoding: snappy\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    if tcp.write_all(&request).is_err() {
        return 0;
    }
    let mut reply = Vec::new();
    let _ = tcp.read_to_end(&mut reply);
    let head = String::from_utf8_lossy(&reply);
    head.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// Values of the external port's front metrics: (body bytes held, heads refused, open).
fn front(s: &ServerProcess) -> (f64, f64, f64) {
    let m = get(&s.url_internal("/metrics"), &[]).body;
    let v = |name: &str| metric_value(&m, name, &["port=\"external\""]);
    (
        v("telemeter_server_http_body_bytes_in_flight"),
        v("telemeter_server_http_refused_heads_total"),
        v("telemeter_server_http_open_connections"),
    )
}

/// Polls the front metrics (bounded, 20 s) until `check` holds; the last values seen.
fn wait_front(s: &ServerProcess, check: impl Fn((f64, f64, f64)) -> bool) -> (f64, f64, f64) {
    let mut seen = (0.0, 0.0, 0.0);
    wait_until(Duration::from_secs(20), || {
        seen = front(s);
        check(seen)
    });
    seen
}

/// Found (2026-12): 300 connections each sending only an `/upload` head with
/// `Content-Length: 1000000` reserved (and zero-filled) 300 MB against the 256 MiB body budget
/// for the 30 s body deadline, so every legitimate upload got 503. Now the token is checked from
/// the head (401 before any body memory), and a body holds only what has arrived.
#[test]
fn stalled_upload_heads_hold_no_body_memory_and_a_bystander_keeps_uploading() {
    let dir = TempDir::new("stalled-heads");
    let s = ServerProcess::setup(&dir).key(KEY).start();
    let addr = s.external;
    let token = s.upload_token("secret", "test");
    let bystander_token = s.upload_token("wild", "bystander");
    let body = snappy::encode_framed(&delimited::encode(&families(None, 20, now_ms())));
    let bystander = Ipv4Addr::new(127, 0, 0, 2);

    // 300 heads without a valid token from ten addresses (none, then garbage, then a forged
    // one), each declaring 1 MB and sending nothing more.
    let forged = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ0ZXN0In0.c2lnbmF0dXJl";
    let mut unauthenticated = Vec::new();
    for i in 0..300u32 {
        let from = Ipv4Addr::new(127, 0, 1, 10 + (i % 10) as u8);
        let mut tcp = connect_from(from, addr).expect("attacker connection");
        let auth = match i % 3 {
            0 => String::new(),
            1 => "Authorization: Bearer garbage\r\n".to_string(),
            _ => format!("Authorization: Bearer {forged}\r\n"),
        };
        let head =
            format!("POST /upload HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 1000000\r\n\r\n");
        tcp.write_all(head.as_bytes()).unwrap();
        unauthenticated.push(tcp);
    }
    let (held, refused, _) = wait_front(&s, |(_, refused, _)| refused >= 300.0);
    println!("unauthenticated heads: {refused} refused from the head, {held} body bytes held");
    assert_eq!(
        refused, 300.0,
        "every head without a valid token is refused"
    );
    assert_eq!(held, 0.0);
    for tcp in &mut unauthenticated {
        let mut reply = [0u8; 12];
        tcp.read_exact(&mut reply).unwrap();
        assert_eq!(&reply, b"HTTP/1.1 401", "a refused head gets 401");
    }
    for _ in 0..5 {
        assert_eq!(upload_from(bystander, addr, &bystander_token, &body), 200);
    }
    drop(unauthenticated);

    // 200 heads with a valid token from four addresses, each declaring 1 MB: half send nothing
    // more, half 1,000 bytes of it; then all stall (within the 30 s body deadline).
    let mut authenticated = Vec::new();
    for i in 0..200u32 {
        let from = Ipv4Addr::new(127, 0, 2, 10 + (i % 4) as u8);
        let mut tcp = connect_from(from, addr).expect("stalling connection");
        let head = format!(
            "POST /upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Length: 1000000\r\n\r\n"
        );
        tcp.write_all(head.as_bytes()).unwrap();
        if i % 2 == 1 {
            tcp.write_all(&[0u8; 1000]).unwrap();
        }
        authenticated.push(tcp);
    }
    // Each of the 100 that sent bytes holds one 16 KiB step; the heads alone hold nothing.
    let step = 16.0 * 1024.0;
    let (held, _, open) = wait_front(&s, |(held, _, open)| held >= 100.0 * step && open >= 200.0);
    println!(
        "authenticated stalled uploads: {open} open, {held} body bytes held ({:.1} KiB each of the 100 that sent 1,000 bytes)",
        held / 100.0 / 1024.0
    );
    assert!(open >= 200.0, "only {open} connections open");
    assert_eq!(held, 100.0 * step, "held {held} bytes");
    // Far under the 256 MiB budget, so a bystander is not turned away.
    for _ in 0..5 {
        assert_eq!(upload_from(bystander, addr, &bystander_token, &body), 200);
    }
    drop(authenticated);
    let (held, _, _) = wait_front(&s, |(held, _, _)| held == 0.0);
    assert_eq!(
        held, 0.0,
        "budget not returned after the stalled uploads closed"
    );
}

/// Found (2026-12): at the connection cap the connection waiting longest without completing a
/// request was closed to make room, which could be an authenticated upload still receiving its
/// body over a slow link. Now idle and head-receiving connections go first and a body that is
/// still arriving is never closed.
#[test]
fn a_trickling_upload_survives_a_flood_at_the_connection_cap() {
    let dir = TempDir::new("trickle-flood");
    let s = ServerProcess::setup(&dir)
        .key(KEY)
        .args(&["--max-connections", "16"])
        .start();
    let addr = s.external;
    let token = s.upload_token("secret", "test");
    let body = snappy::encode_framed(&delimited::encode(&families(None, 400, now_ms())));

    // The upload: its head, then its body in 40 pieces over about 4 s.
    let mut upload = connect_from(Ipv4Addr::new(127, 0, 3, 2), addr).unwrap();
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Type: {PROTO_DELIMITED}\r\nContent-Encoding: snappy\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    upload.write_all(head.as_bytes()).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    // The flood: silent sockets and garbage heads from other addresses, reopened as they are
    // closed, many times the cap.
    let flood = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut opened = 0u64;
            let mut sockets: Vec<TcpStream> = Vec::new();
            while !stop.load(Ordering::SeqCst) && opened < 5_000 {
                let from = Ipv4Addr::new(127, 0, 4, 10 + (opened % 50) as u8);
                if let Ok(mut tcp) = connect_from(from, addr) {
                    if opened % 2 == 0 {
                        let _ = tcp.write_all(b"GET /heal");
                    }
                    sockets.push(tcp);
                }
                opened += 1;
                if sockets.len() > 64 {
                    sockets.remove(0);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            opened
        })
    };
    let piece = body.len().div_ceil(40);
    for part in body.chunks(piece) {
        std::thread::sleep(Duration::from_millis(100));
        upload.write_all(part).unwrap();
    }
    let mut reply = Vec::new();
    let _ = upload.read_to_end(&mut reply);
    stop.store(true, Ordering::SeqCst);
    let opened = flood.join().unwrap();
    let reply = String::from_utf8_lossy(&reply);
    let metrics = get(&s.url_internal("/metrics"), &[]).body;
    let evicted = metric_value(
        &metrics,
        "telemeter_server_http_evicted_connections_total",
        &["external"],
    );
    println!(
        "flood: {opened} connections opened against --max-connections 16, {evicted} evicted; the upload: {:?}",
        reply.lines().next()
    );
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    // The flood did fill the cap again and again.
    assert!(evicted >= 100.0, "only {evicted} evictions");
    let text = s.federate();
    assert!(text.contains("_id=\"test\""), "{text}");
}
