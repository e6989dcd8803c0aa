//! Tests of the HTTP front, end to end over loopback sockets and of the sans-IO parser.

use super::head::Head;
use super::server::{Server, ServerHandle};
use super::shared::BODY_STEP;
use super::url::{percent_decode, percent_encode};
use super::*;
use std::io::Read;
use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

/// Routes for the tests: each exercises one behaviour of the front.
struct TestApp {
    slow_started: Mutex<Option<crossbeam_channel::Sender<()>>>,
}

impl Handler for TestApp {
    fn handle(&self, request: Request) -> Response {
        match request.path.as_str() {
            "/hello" => Response::text(200, "hello"),
            "/guarded" => Response::text(
                200,
                &format!("guarded {}", String::from_utf8_lossy(&request.body)),
            ),
            "/echo" => Response::bytes(200, "application/octet-stream", request.body),
            "/query" => {
                Response::text(200, &request.query_param("q").unwrap_or_else(|| "-".into()))
            }
            "/slow" => {
                if let Some(started) = &*self.slow_started.lock().unwrap() {
                    let _ = started.send(());
                }
                std::thread::sleep(Duration::from_millis(300));
                Response::text(200, "slow done")
            }
            "/panic" => panic!("test handler panics on purpose"),
            "/thread" => Response::text(200, std::thread::current().name().unwrap_or("(unnamed)")),
            "/stream-panic" => Response::stream(
                200,
                "text/plain",
                Box::new(|out: &mut dyn Write| {
                    out.write_all(&[b'x'; 100_000])?;
                    panic!("test stream body panics on purpose")
                }),
            ),
            "/stream" => Response::stream(
                200,
                "text/plain",
                Box::new(|out: &mut dyn Write| {
                    for i in 0..2000 {
                        writeln!(out, "line {i}")?;
                    }
                    Ok(())
                }),
            ),
            _ => Response::text(404, "not found"),
        }
    }

    /// `/later*` are answered from another thread: `/later?q` after 200 ms with `later q`;
    /// `/later-dropped` never (the `Later` is dropped); `/later-close` with an answer that
    /// closes the connection; `/later-stream` with a streamed body.
    fn handle_later(&self, request: Request, defer: Defer<'_>) -> Option<Response> {
        let response = match request.path.as_str() {
            "/later" => Response::text(200, &format!("later {}", request.query)),
            "/later-dropped" => {
                drop(defer.later());
                return None;
            }
            "/later-close" => {
                Response::text(200, "later, then closed").with_header("Connection", "close")
            }
            "/later-big" => Response::bytes(200, "application/octet-stream", vec![b'x'; 16 << 20]),
            "/later-stream" => Response::stream(
                200,
                "text/plain",
                Box::new(|out: &mut dyn Write| out.write_all(b"streamed later")),
            ),
            _ => return Some(self.handle(request)),
        };
        let later = defer.later();
        if let Some(started) = &*self.slow_started.lock().unwrap() {
            let _ = started.try_send(());
        }
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            later.send(response);
        });
        None
    }

    fn body_limit(&self, _method: &str, path: &str) -> usize {
        if path == "/echo" {
            64 << 10
        } else {
            1024
        }
    }

    fn admit(&self, head: &Head, _remote: SocketAddr) -> Result<Admission, Response> {
        match (head.path.as_str(), head.header("X-Key")) {
            ("/guarded", Some("open")) => Ok(10.into()),
            ("/guarded", _) => Err(Response::text(401, "no key")),
            (path, _) => Ok(self.body_limit(&head.method, path).into()),
        }
    }
}

fn test_config() -> Config {
    Config {
        name: "test".into(),
        max_connections: 200,
        max_connections_per_peer: 200,
        workers: 2,
        header_timeout: Duration::from_secs(1),
        body_timeout: Duration::from_secs(1),
        idle_timeout: Duration::from_secs(2),
        write_timeout: Duration::from_secs(5),
        max_header_bytes: 4096,
        max_body_bytes_in_flight: 1 << 20,
        max_body_bytes_per_peer: 1 << 20,
        tls: None,
        inline_paths: Vec::new(),
    }
}

fn start_with(config: Config, app: TestApp) -> ServerHandle {
    Server::bind("127.0.0.1:0", config, Arc::new(app))
        .unwrap()
        .spawn()
}

fn start(config: Config) -> ServerHandle {
    start_with(
        config,
        TestApp {
            slow_started: Mutex::new(None),
        },
    )
}

fn connect(server: &ServerHandle) -> BufReader<TcpStream> {
    let stream = TcpStream::connect(server.local_addr()).unwrap();
    // Every wait in the tests is bounded by this.
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    BufReader::new(stream)
}

fn send(client: &mut BufReader<TcpStream>, bytes: &[u8]) {
    client.get_mut().write_all(bytes).unwrap();
}

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Reads one response; `head_only` for answers to HEAD.
fn read_reply(client: &mut impl BufRead, head_only: bool) -> Reply {
    let mut line = String::new();
    client.read_line(&mut line).unwrap();
    let status: u16 = line
        .split(' ')
        .nth(1)
        .unwrap_or_else(|| panic!("no status line: {line:?}"))
        .parse()
        .unwrap();
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        client.read_line(&mut line).unwrap();
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (name, value) = line.split_once(':').unwrap();
        headers.push((name.to_owned(), value.trim().to_owned()));
    }
    let mut reply = Reply {
        status,
        headers,
        body: Vec::new(),
    };
    if head_only || status == 100 {
        return reply;
    }
    if let Some(length) = reply.header("Content-Length") {
        let mut body = vec![0; length.parse().unwrap()];
        client.read_exact(&mut body).unwrap();
        reply.body = body;
    } else if reply.header("Transfer-Encoding") == Some("chunked") {
        loop {
            let mut size = String::new();
            client.read_line(&mut size).unwrap();
            let size = usize::from_str_radix(size.trim_end(), 16).unwrap();
            let mut chunk = vec![0; size + 2];
            client.read_exact(&mut chunk).unwrap();
            assert_eq!(&chunk[size..], b"\r\n");
            if size == 0 {
                break;
            }
            reply.body.extend_from_slice(&chunk[..size]);
        }
    } else {
        client.read_to_end(&mut reply.body).unwrap();
    }
    reply
}

/// Whether the server closed the connection (EOF rather than more bytes or a timeout).
fn closed(client: &mut BufReader<TcpStream>) -> bool {
    let mut rest = Vec::new();
    matches!(client.read_to_end(&mut rest), Ok(0))
}

#[test]
fn serves_several_requests_on_one_kept_alive_connection() {
    let server = start(test_config());
    let mut client = connect(&server);
    for _ in 0..3 {
        send(&mut client, b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n");
        let reply = read_reply(&mut client, false);
        assert_eq!(reply.status, 200);
        assert_eq!(reply.text(), "hello\n");
        assert_eq!(reply.header("Connection"), None);
    }
    // Pipelined: two requests in one write, answered in order.
    send(
        &mut client,
        b"GET /query?q=a%20b+c HTTP/1.1\r\n\r\nGET /query HTTP/1.1\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(read_reply(&mut client, false).text(), "a b c\n");
    let last = read_reply(&mut client, false);
    assert_eq!(last.text(), "-\n");
    assert_eq!(last.header("Connection"), Some("close"));
    assert!(closed(&mut client));
    assert_eq!(server.stats().accepted_connections, 1);
    server.shutdown(Duration::from_secs(5));
}

#[test]
fn http_1_0_closes_unless_kept_alive() {
    let server = start(test_config());
    let mut client = connect(&server);
    send(
        &mut client,
        b"GET /hello HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    );
    let reply = read_reply(&mut client, false);
    assert_eq!(reply.header("Connection"), Some("keep-alive"));
    send(&mut client, b"GET /hello HTTP/1.0\r\n\r\n");
    let reply = read_reply(&mut client, false);
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("Connection"), Some("close"));
    assert!(closed(&mut client));
    server.shutdown(Duration::from_secs(5));
}

#[test]
fn posts_a_body() {
    let server = start(test_config());
    let mut client = connect(&server);
    send(
        &mut client,
        b"POST /echo HTTP/1.1\r\nContent-Length: 11\r\n\r\nhello world",
    );
    let reply = read_reply(&mut client, false);
    assert_eq!((reply.status, reply.text().as_str()), (200, "hello world"));
    server.shutdown(Duration::from_secs(5));
}

#[test]
fn a_post_without_length_has_an_empty_body() {
    let server = start(test_config());
    let mut client = connect(&server);
    send(&mut client, b"POST /echo HTTP/1.1\r\n\r\n");
    let reply = read_reply(&mut client, false);
    assert_eq!((reply.status, reply.text().as_str()), (200, ""));
    assert_eq!(server.stats().protocol_errors, 0);
    server.shutdown(Duration::from_secs(5));
}

/// Sends `request` on a fresh connection and reads the reply; whether the server closed the
/// connection after it.
fn exchange(server: &ServerHandle, request: &[u8]) -> (Reply, bool) {
    let mut client = connect(server);
    send(&mut client, request);
    let reply = read_reply(&mut client, false);
    let closed = closed(&mut client);
    (reply, closed)
}

#[test]
fn a_chunked_request_body_is_decoded() {
    let server = start(test_config());
    let mut client = connect(&server);
    // Sizes in both cases and with leading zeros, an extension (ignored), a trailer (dropped),
    // then a pipelined request on the same connection.
    send(
        &mut client,
        b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n\
          5\r\nhello\r\n0001;name=\"value\"\r\n \r\nA\r\n0123456789\r\n\
          0\r\nX-Checksum: abc\r\n\r\nGET /hello HTTP/1.1\r\n\r\n",
    );
    let reply = read_reply(&mut client, false);
    assert_eq!(
        (reply.status, reply.text().as_str()),
        (200, "hello 0123456789")
    );
    assert_eq!(read_reply(&mut client, false).text(), "hello\n");
    // Chunks trickled a few bytes at a time, across every boundary.
    let body: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
    let wire = chunked(
        b"POST /echo HTTP/1.1\r\ntransfer-encoding: Chunked\r\n\r\n",
        &body,
        777,
    );
    for piece in wire.chunks(5) {
        send(&mut client, piece);
    }
    let reply = read_reply(&mut client, false);
    assert_eq!((reply.status, &reply.body), (200, &body));
    assert_eq!(server.stats().protocol_errors, 0);
    assert_eq!(server.stats().body_bytes_in_flight, 0);
    server.shutdown(Duration::from_secs(5));
}

#[test]
fn ambiguous_framing_is_refused_and_the_connection_closed() {
    let server = start(test_config());
    let cases: &[(&[u8], u16, &str)] = &[
        (
            b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            400,
            "both Transfer-Encoding and Content-Length",
        ),
        (
            b"POST /echo HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            400,
            "both Transfer-Encoding and Content-Length",
        ),
        (
            b"POST /echo HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            400,
            "HTTP/1.0",
        ),
        (
            b"POST /echo HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
            501,
            "only Transfer-Encoding: chunked",
        ),
        (
            b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n",
            501,
            "only Transfer-Encoding: chunked",
        ),
        (
            b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            501,
            "only Transfer-Encoding: chunked",
        ),
        (
            b"POST /echo HTTP/1.1\r\nTransfer-Encoding: identity\r\n\r\n",
            501,
            "only Transfer-Encoding: chunked",
        ),
        (
            b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nxyz\r\nhello\r\n0\r\n\r\n",
            400,
            "not a hex number",
        ),
        (
            b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n\r\n",
            400,
            "not a hex number",
        ),
        (
            b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000005\r\nhello\r\n0\r\n\r\n",
            400,
            "more than 16 hex digits",
        ),
        (
            b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n",
            400,
            "not followed by CRLF",
        ),
        (
            b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n",
            400,
            "lone LF",
        ),
        (
            b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5 5\r\nhello\r\n0\r\n\r\n",
            400,
            "invalid chunk-size line",
        ),
        (
            b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nno colon\r\n\r\n",
            400,
            "trailer",
        ),
    ];
    for (request, status, reason) in cases {
        let (reply, closed) = exchange(&server, request);
        let what = String::from_utf8_lossy(request);
        assert_eq!(reply.status, *status, "{what:?}: {}", reply.text());
        assert!(reply.text().contains(reason), "{what:?}: {}", reply.text());
        assert_eq!(reply.header("Connection"), Some("close"), "{what:?}");
        assert!(closed, "{what:?}: the connection stayed open");
    }
    // A chunk-size line that never ends is refused at 4096 bytes, not buffered.
    let mut long = b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1;".to_vec();
    long.extend(std::iter::repeat_n(b'x', 5000));
    let (reply, _) = exchange(&server, &long);
    assert_eq!(reply.status, 400, "{}", reply.text());
    assert!(
        reply.text().contains("longer than 4096"),
        "{}",
        reply.text()
    );
    // Extensions and trailers share the head's cap.
    let mut heavy = b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..3 {
        heavy.extend_from_slice(format!("1;{}\r\nx\r\n", "e".repeat(2000)).as_bytes());
    }
    heavy.extend_from_slice(b"0\r\n\r\n");
    let (reply, _) = exchange(&server, &heavy);
    assert_eq!(reply.status, 431, "{}", reply.text());
    assert_eq!(server.stats().body_bytes_in_flight, 0);
    server.shutdown(Duration::from_secs(5));
}

#[test]
fn a_chunked_body_over_the_limit_is_413_before_it_has_all_arrived() {
    let server = start(test_config());
    let mut client = connect(&server);
    // The /hello limit is 1 KiB: the third 400-byte chunk passes it. No last chunk is sent,
    // so a server that waited for the whole body would answer 408 after a second.
    let mut wire = b"POST /hello HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..3 {
        wire.extend_from_slice(b"190\r\n");
        wire.extend_from_slice(&[b'a'; 400]);
        wire.extend_from_slice(b"\r\n");
    }
    send(&mut client, &wire);
    let started = Instant::now();
    let reply = read_reply(&mut client, false);
    assert_eq!(reply.status, 413, "{}", reply.text());
    assert!(
        reply
            .text()
            .contains("chunked body is over the limit of 1024 bytes"),
        "{}",
        reply.text()
    );
    assert!(started.elapsed() < Duration::from_millis(900));
    assert!(closed(&mut client));
    // One chunk declaring more than the limit is refused at its size line.
    let (reply, _) = exchange(
        &server,
        b"POST /hello HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\n",
    );
    assert_eq!(reply.status, 413, "{}", reply.text());
    server.shutdown(Duration::from_secs(5));
}

#[test]
fn a_chunked_body_that_stalls_gets_408() {
    let server = start(test_config());
    let mut client = connect(&server);
    send(
        &mut client,
        b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
    );
    let started = Instant::now();
    let reply = read_reply(&mut client, false);
    assert_eq!(
        (reply.status, reply.text().as_str()),
        (408, "the request body took too long\n")
    );
    // The 1 s body deadline, not the 1 s head deadline again nor the 10 s client timeout.
    assert!(started.elapsed() < Duration::from_secs(3));
    server.shutdown(Duration::from_secs(5));
}

#[test]
fn expect_100_continue_is_answered_before_a_chunked_body() {
    let server = start(test_config());
    let mut client = connect(&server);
    send(
        &mut client,
        b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n",
    );
    assert_eq!(read_reply(&mut client, false).status, 100);
    send(&mut client, b"3\r\nabc\r\n0\r\n\r\n");
    let reply = read_reply(&mut client, false);
    assert_eq!((reply.status, reply.text().as_str()), (200, "abc"));
    server.shutdown(Duration::from_secs(5));
}

#[test]
fn header_hygiene() {
    let server = start(test_config());
    let cases: &[(&[u8], &str)] = &[
        (b"GET /hello HTTP/1.1\nHost: x\r\n\r\n", "lone LF"),
        (b"GET /hello HTTP/1.1\r\nHost: x\n\r\n", "lone LF"),
        (b"GET /hello HTTP/1.1\r\nHost: x\n\n", "lone LF"),
        (
            b"GET /hello HTTP/1.1\r\nX-A: a\x01b\r\n\r\n",
            "control character",
        ),
        (
            b"GET /hello HTTP/1.1\r\nX-A: a\x00b\r\n\r\n",
            "control character",
        ),
        (
            b"GET /hello HTTP/1.1\r\nX-A: a\x1bb\r\n\r\n",
            "control character",
        ),
        (
            b"GET /hello HTTP/1.1\r\nX-A: a\x7fb\r\n\r\n",
            "control character",
        ),
        (
            b"GET /hello HTTP/1.1\r\nX-A: a\rb\r\n\r\n",
            "control character",
        ),
        (b"GET /hello HTTP/1.1\r\nX-A: a\r\n b\r\n\r\n", "obs-fold"),
        (b"GET /hello HTTP/1.1\r\nX-A : a\r\n\r\n", "header name"),
        (b"GET /hello HTTP/1.1\r\nX-A: \xff\r\n\r\n", "not UTF-8"),
    ];
    for (request, reason) in cases {
        let (reply, closed) = exchange(&server, request);
        let what = String::from_utf8_lossy(request);
        assert_eq!(reply.status, 400, "{what:?}: {}", reply.text());
        assert!(reply.text().contains(reason), "{what:?}: {}", reply.text());
        assert!(closed, "{what:?}");
    }
    // HTAB inside a value is fine.
    let (reply, _) = exchange(
        &server,
        b"GET /hello HTTP/1.1\r\nX-A: a\tb\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(reply.status, 200);
    server.shutdown(Duration::from_secs(5));
}

#[test]
fn the_handler_refuses_a_head_before_its_body() {
    let server = start(test_config());
    // 10 MB declared and none sent: the 401 comes at once, and nothing was set aside for it.
    let (reply, closed) = exchange(
        &server,
        b"POST /guarded HTTP/1.1\r\nContent-Length: 10000000\r\nExpect: 100-continue\r\n\r\n",
    );
    assert_eq!((reply.status, reply.text().as_str()), (401, "no key\n"));
    assert!(closed);
    let (reply, _) = exchange(
        &server,
        b"POST /guarded HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
    );
    assert_eq!(reply.status, 401);
    let stats = server.stats();
    assert_eq!((stats.refused_heads, stats.protocol_errors), (2, 0));
    // With the key, its limit is the one admit gave.
    let (reply, _) = exchange(
        &server,
        b"POST /guarded HTTP/1.1\r\nX-Key: open\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
    );
    assert_eq!(
        (reply.status, reply.text().as_str()),
        (200, "guarded hello\n")
    );
    let (reply, _) = exchange(
        &server,
        b"POST /guarded HTTP/1.1\r\nX-Key: open\r\nContent-Length: 20\r\n\r\n",
    );
    assert_eq!(reply.status, 413);
    server.shutdown(Duration::from_secs(5));
}

/// Waits (bounded) until `check` holds for the server's stats; the last stats seen.
fn wait_for_stats(server: &ServerHandle, check: impl Fn(&Stats) -> bool) -> Stats {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stats = server.stats();
        if check(&stats) || Instant::now() > deadline {
            return stats;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn body_memory_follows_the_bytes_that_arrived() {
    let mut config = test_config();
    config.body_timeout = Duration::from_secs(10);
    let server = start(config);
    // 60 KiB declared, 1 KiB sent: about one step is held, not 60 KiB.
    let mut declared = connect(&server);
    send(
        &mut declared,
        b"POST /echo HTTP/1.1\r\nContent-Length: 61440\r\n\r\n",
    );
    send(&mut declared, &[b'a'; 1024]);
    let stats = wait_for_stats(&server, |s| s.body_bytes_in_flight > 0);
    assert!(
        (1024..=BODY_STEP as u64).contains(&stats.body_bytes_in_flight),
        "{stats:?}"
    );
    // A head alone holds nothing.
    let mut head_only = connect(&server);
    send(
        &mut head_only,
        b"POST /echo HTTP/1.1\r\nContent-Length: 61440\r\n\r\n",
    );
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        server.stats().body_bytes_in_flight,
        stats.body_bytes_in_flight
    );
    // The rest arrives: the body is whole and the budget is back to zero once answered.
    send(&mut declared, &[b'b'; 61440 - 1024]);
    let reply = read_reply(&mut declared, false);
    assert_eq!((reply.status, reply.body.len()), (200, 61440));
    drop(head_only);
    let stats = wait_for_stats(&server, |s| s.body_bytes_in_flight == 0);
    assert_eq!(stats.body_bytes_in_flight, 0);
    server.shutdown(Duration::from_secs(5));
}

/// A client socket bound to `local` (a 127.0.0.x address) connected to the server.
fn connect_from(server: &ServerHandle, local: [u8; 4]) -> BufReader<TcpStream> {
    // SAFETY: plain socket calls on a descriptor this function owns until it is wrapped.
    let tcp = unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        assert!(fd >= 0);
        let bind = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(local),
            },
            sin_zero: [0; 8],
        };
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        assert_eq!(
            libc::bind(fd, &bind as *const _ as *const libc::sockaddr, len),
            0
        );
        let port = server.local_addr().port();
        let to = libc::sockaddr_in {
            sin_port: port.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes([127, 0, 0, 1]),
            },
            ..bind
        };
        assert_eq!(
            libc::connect(fd, &to as *const _ as *const libc::sockaddr, len),
            0
        );
        <TcpStream as std::os::fd::FromRawFd>::from_raw_fd(fd)
    };
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    BufReader::new(tcp)
}

#[test]
fn per_peer_caps_hold_one_address_back_and_not_the_others() {
    let mut config = test_config();
    config.max_connections_per_peer = 3;
    config.max_body_bytes_per_peer = 40 << 10;
    config.body_timeout = Duration::from_secs(10);
    let server = start(config);
    // Three requests being answered from one address: its fourth connection is refused.
    let mut busy: Vec<_> = (0..3)
        .map(|_| {
            let mut client = connect_from(&server, [127, 0, 0, 2]);
            send(&mut client, b"GET /slow HTTP/1.1\r\n\r\n");
            client
        })
        .collect();
    wait_for_stats(&server, |s| s.open_connections == 3);
    std::thread::sleep(Duration::from_millis(50));
    let mut fourth = connect_from(&server, [127, 0, 0, 2]);
    let reply = read_reply(&mut fourth, false);
    assert_eq!(
        (reply.status, reply.text().as_str()),
        (503, "too many connections from your address\n")
    );
    assert_eq!(reply.header("Retry-After"), Some("1"));
    // Another address is served meanwhile.
    let mut other = connect_from(&server, [127, 0, 0, 3]);
    send(&mut other, b"GET /hello HTTP/1.1\r\n\r\n");
    assert_eq!(read_reply(&mut other, false).status, 200);
    for client in &mut busy {
        assert_eq!(read_reply(client, false).status, 200);
    }
    // Now idle: at the per-peer cap, the address's own idle connections make room.
    let mut fifth = connect_from(&server, [127, 0, 0, 2]);
    send(&mut fifth, b"GET /hello HTTP/1.1\r\n\r\n");
    assert_eq!(read_reply(&mut fifth, false).status, 200);
    let stats = server.stats();
    assert_eq!(stats.peer_rejected_connections, 1);
    assert_eq!(stats.evicted_connections, 1);
    drop((busy, fifth, other));
    // Body bytes: 30 KiB arrived on one body from 127.0.0.4 (held, it waits for the rest);
    // a second body of 20 KiB from that address passes its 40 KiB, one from elsewhere does not.
    let mut holder = connect_from(&server, [127, 0, 0, 4]);
    send(
        &mut holder,
        b"POST /echo HTTP/1.1\r\nContent-Length: 40000\r\n\r\n",
    );
    send(&mut holder, &[b'a'; 30 << 10]);
    wait_for_stats(&server, |s| s.body_bytes_in_flight >= 30 << 10);
    let mut request = b"POST /echo HTTP/1.1\r\nContent-Length: 20480\r\n\r\n".to_vec();
    request.extend_from_slice(&[b'b'; 20 << 10]);
    let mut second = connect_from(&server, [127, 0, 0, 4]);
    send(&mut second, &request);
    let reply = read_reply(&mut second, false);
    assert_eq!(
        (reply.status, reply.text().as_str()),
        (
            503,
            "too many request bodies in flight from your address; retry\n"
        )
    );
    let mut elsewhere = connect_from(&server, [127, 0, 0, 5]);
    send(&mut elsewhere, &request);
    assert_eq!(read_reply(&mut elsewhere, false).status, 200);
    send(&mut holder, &[b'a'; 40000 - (30 << 10)]);
    assert_eq!(read_reply(&mut holder, false).status, 200);
    assert_eq!(server.stats().peer_rejected_bodies, 1);
    server.shutdown(Duration::from_secs(5));
}

#[test]
fn at_the_cap_a_body_still_arriving_is_not_evicted() {
    let mut config = test_config();
    config.max_connections = 4;
    config.body_timeout = Duration::from_secs(10);
    config.header_timeout = Duration::from_secs(10);
    let server = start(config);
    // The oldest connection is a body trickling in, 2,000 bytes over about 2 s.
    let mut upload = connect(&server);
    send(
        &mut upload,
        b"POST /echo HTTP/1.1\r\nContent-Length: 2000\r\n\r\n",
    );
    let trickle = {
        let mut writer = upload.get_ref().try_clone().unwrap();
        std::thread::spawn(move || {
            for _ in 0..20 {
                writer.write_all(&[b'u'; 100]).unwrap();
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    // Meanwhile a flood of silent and garbage-trickling connections, far over the cap.
    let mut flood = Vec::new();
    for i in 0..40 {
        let mut client = connect(&server);
        if i % 2 == 0 {
            let _ = client.get_mut().write_all(b"GET /hel");
        }
        flood.push(client);
        std::thread::sleep(Duration::from_millis(20));
    }
    trickle.join().unwrap();
    let reply = read_reply(&mut upload, false);
    assert_eq!((reply.status, reply.body.len()), (200, 2000));
    assert!(server.stats().evicted_connections >= 30);
    server.shutdown(Duration::from_secs(5));
}

#[test]
fn a_declared_length_over_the_limit_is_413_without_reading_the_body() {
    let server = start(test_config());
    let mut client = connect(&server);
    // None of the 10 MB is sent: had the server waited for it, the answer would be a 408
    // after the 1 s body deadline, not a 413.
    send(
        &mut client,
        b"POST /echo HTTP/1.1\r\nContent-Length: 10000000\r\n\r\n",
    );
    let reply = read_reply(&mut client, false);
    assert_eq!(reply.status, 413);
    assert_eq!(reply.header("Connection"), Some("close"));
    server.shutdown(Duration::from_secs(5));
}

#[test]
fn a_head_over_the_limit_is_431() {
    let server = start(test_config());
    let mut client = connect(&server);
    let mut request = b"GET /hello HTTP/1.1\r\n".to_vec();
    for i in 0..200 {
        request.extend_from_slice(format!("X-Filler-{i}: {}\r\n", "a".repeat(40)).as_bytes());
    }
    request.extend_from_slice(b"\r\n");
    send(&mut client, &request);
    assert_eq!(read_reply(&mut client, false).status, 431);
    server.shutdown(Duration::from_secs(5));
}

#[test]
fn a_garbage_request_line_is_400() {
    let server = start(test_config());
    for garbage in [
        &b"HELLO\r\n\r\n"[..],
        b"GET /x HTTP/1.1 extra\r\n\r\n",
        b"GET nopath HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nno colon here\r\n\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
    ] {
        let mut client = connect(&server);
        send(&mut client, garbage);
        let reply = read_reply(&mut client, false);
        assert_eq!(reply.status, 400, "{:?}", String::from_utf8_lossy(garbage));
    }
    let mut client = connect(&server);
    send(&mut client, b"GET / HTTP/2.0\r\n\r\n");
    assert_eq!(read_reply(&mut client, false).status, 505);
    server.shutdown(Duration::from_secs(5));
}

#[test]
fn half_a_head_gets_408_and_silence_gets_closed() {
    let server = start(test_config());
    let mut half = connect(&server);
    send(&mut half, b"GET /hello HTTP/1.1\r\nHost: x\r\n");
    let mut silent = connect(&server);
    let reply = read_reply(&mut half, false);
    assert_eq!(reply.status, 408);
    assert!(closed(&mut half));
    // Nothing was asked, so nothing is answered: just a close.
    assert!(closed(&mut silent));
    server.shutdown(Duration::from_secs(5));
}

#[test]
fn a_body_that_stops_coming_gets_408() {
    let server = start(test_config());
    let mut client = connect(&server);
    send(
        &mut client,
        b"POST /echo HTTP/1.1\r\nContent-Length: 100\r\n\r\nonly part",
    );
    assert_eq!(read_reply(&mut client, false).status, 408);
    server.shutdown(Duration::from_secs(5));
}

#[test]
fn slow_loris_connections_do_not_block_a_normal_request() {
    let mut config = test_config();
    config.header_timeout = Duration::from_secs(30);
    let server = start(config);
    let mut trickling: Vec<_> = (0..50)
        .map(|_| {
            let mut client = connect(&server);
            send(&mut client, b"GET /hello HTTP/1.1\r\n");
            client
        })
        .collect();
    for client in &mut trickling {
        send(client, b"X-Slow: 1\r\n");
    }
    let mut client = connect(&server);
    send(&mut client, b"GET /hello HTTP/1.1\r\n\r\n");
    let reply = read_reply(&mut client, false);
    assert_eq!((reply.status, reply.text().as_str()), (200, "hello\n"));
    assert_eq!(server.stats().open_connections, 51);
    drop(trickling);
    server.shutdown(Duration::from_secs(5));
}

#[test]
fn busy_connections_over_the_cap_get_503() {
    let mut config = test_config();
    config.max_connections = 4;
    let server = start(config);
    // Four complete requests in hand (two in the workers, two queued behind them for 300 ms
    // each): nothing can be evicted, so the fifth connection is refused.
    let mut clients: Vec<_> = (0..4)
        .map(|_| {
            let mut client = connect(&server);
            send(&mut client, b"GET /slow HTTP/1.1\r\n\r\n");
            client
        })
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    let mut fifth = connect(&server);
    let reply = read_reply(&mut fifth, false);
    assert_eq!(reply.status, 503);
    assert_eq!(reply.header("Connection"), Some("close"));
    let stats = server.stats();
    assert_eq!(stats.rejected_connections, 1);
    assert_eq!(stats.evicted_connections, 0);
    // The first four are answered.
    for client in &mut clients {
        assert_eq!(read_reply(client, false).status, 200);
    }
    server.shutdown(Duration::from_secs(5));
}

#[test]
fn at_the_cap_the_longest_waiting_idle_connection_makes_room() {
    let mut config = test_config();
    config.max_connections = 4;
    config.header_timeout = Duration::from_secs(30);
    let server = start(config);
    // The oldest only trickles a head; the next three are idle keep-alive connections.
    let mut trickler = connect(&server);
    send(&mut trickler, b"GET /hello HTTP/1.1\r\n");
    std::thread::sleep(Duration::from_millis(20));
    let mut idle: Vec<_> = (0..3)
        .map(|_| {
            let mut client = connect(&server);
            send(&mut client, b"GET /hello HTTP/1.1\r\n\r\n");
            assert_eq!(read_reply(&mut client, false).status, 200);
            client
        })
        .collect();
    let mut fifth = connect(&server);
    send(&mut fifth, b"GET /hello HTTP/1.1\r\n\r\n");
    let reply = read_reply(&mut fifth, false);
    assert_eq!((reply.status, reply.text().as_str()), (200, "hello\n"));
    let stats = server.stats();
    assert_eq!(
        (stats.evicted_connections, stats.rejected_connections),
        (1, 0)
    );
    // The trickler, waiting longest, was the one closed; the idle ones still work.
    assert!(closed(&mut trickler));
    send(&mut idle[0], b"GET /hello HTTP/1.1\r\n\r\n");
    assert_eq!(read_reply(&mut idle[0], false).status, 200);
    server.shutdown(Duration::from_secs(5));
}

#[test]
fn streams_a_chunked_response() {
    let server = start(test_config());
    let mut client = connect(&server);
    send(&mut client, b"GET /stream HTTP/1.1\r\n\r\n");
    let reply = read_reply(&mut client, false);
    assert_eq!(reply.header("Transfer-Encoding"), Some("chunked"));
    let expected: String = (0..2000).map(|i| format!("line {i}\n")).collect();
    assert_eq!(reply.text(), expected);
    // The connection stays usable after the last chunk.
    send(&mut client, b"GET /hello HTTP/1.1\r\n\r\n");
    assert_eq!(read_reply(&mut client, false).text(), "hello\n");
    // HTTP/1.0 has no chunks: the body runs to the close.
    let mut old = connect(&server);
    send(&mut old, b"GET /stream HTTP/1.0\r\n\r\n");
    let reply = read_reply(&mut old, false);
    assert_eq!(reply.header("Transfer-Encoding"), None);
    assert_eq!(reply.text(), expected);
    server.shutdown(Duration::from_secs(5));
}

#[test]
fn head_answers_without_a_body() {
    let server = start(test_config());
    let mut client = connect(&server);
    send(&mut client, b"HEAD /hello HTTP/1.1\r\n\r\n");
    let reply = read_reply(&mut client, true);
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("Content-Length"), Some("6"));
    // Had a body been sent, this would read "hello" instead of a status line.
    send(&mut client, b"GET /hello HTTP/1.1\r\n\r\n");
    let reply = read_reply(&mut client, false);
    assert_eq!((reply.status, reply.text().as_str()), (200, "hello\n"));
    server.shutdown(Duration::from_secs(5));
}

#[test]
fn expect_100_continue_is_answered_before_the_body() {
    let server = start(test_config());
    let mut client = connect(&server);
    send(
        &mut client,
        b"POST /echo HTTP/1.1\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
    );
    let interim = read_reply(&mut client, false);
    assert_eq!(interim.status, 100);
    send(&mut client, b"abcde");
    let reply = read_reply(&mut client, false);
    assert_eq!((reply.status, reply.text().as_str()), (200, "abcde"));
    server.shutdown(Duration::from_secs(5));
}

#[test]
fn inline_paths_run_on_the_connection_thread_the_rest_on_a_worker() {
    let mut config = test_config();
    config.inline_paths = vec!["/thread".into(), "/panic".into()];
    let server = start(config);
    let mut client = connect(&server);
    send(&mut client, b"GET /thread HTTP/1.1\r\n\r\n");
    assert_eq!(read_reply(&mut client, false).text(), "test-conn\n");
    // A panic there is a 500 too, and the connection serves the next request.
    send(&mut client, b"GET /panic HTTP/1.1\r\n\r\n");
    let reply = read_reply(&mut client, false);
    assert_eq!(
        (reply.status, reply.text().as_str()),
        (500, "internal error\n")
    );
    send(&mut client, b"GET /thread?x HTTP/1.1\r\n\r\n");
    assert_eq!(read_reply(&mut client, false).text(), "test-conn\n");
    server.shutdown(Duration::from_secs(5));

    // Without the setting, the same path is a worker's.
    let server = start(test_config());
    let mut client = connect(&server);
    send(&mut client, b"GET /thread HTTP/1.1\r\n\r\n");
    assert!(read_reply(&mut client, false)
        .text()
        .starts_with("test-worker-"));
    server.shutdown(Duration::from_secs(5));
}

#[test]
fn a_handler_panic_is_a_500_and_the_worker_lives_on() {
    let mut config = test_config();
    config.workers = 1;
    let server = start(config);
    let mut client = connect(&server);
    for _ in 0..2 {
        send(&mut client, b"GET /panic HTTP/1.1\r\n\r\n");
        let reply = read_reply(&mut client, false);
        assert_eq!(
            (reply.status, reply.text().as_str()),
            (500, "internal error\n")
        );
    }
    send(&mut client, b"GET /hello HTTP/1.1\r\n\r\n");
    assert_eq!(read_reply(&mut client, false).status, 200);
    server.shutdown(Duration::from_secs(5));
}

#[test]
fn a_stream_body_panic_breaks_only_its_own_response() {
    let server = start(test_config());
    let mut client = connect(&server);
    send(&mut client, b"GET /stream-panic HTTP/1.1\r\n\r\n");
    let mut line = String::new();
    client.read_line(&mut line).unwrap();
    assert!(line.starts_with("HTTP/1.1 200"), "{line}");
    // The body ends without its last chunk: the client sees a broken, not a short, body.
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).unwrap();
    assert!(!rest.ends_with(b"0\r\n\r\n"));
    assert!(rest.len() > 100_000);
    // The server is fine.
    let mut client = connect(&server);
    send(&mut client, b"GET /hello HTTP/1.1\r\n\r\n");
    assert_eq!(read_reply(&mut client, false).status, 200);
    server.shutdown(Duration::from_secs(5));
}

#[test]
fn shutdown_finishes_an_in_flight_request() {
    let (started, started_rx) = crossbeam_channel::bounded(1);
    let server = start_with(
        test_config(),
        TestApp {
            slow_started: Mutex::new(Some(started)),
        },
    );
    let addr = server.local_addr();
    let mut idle = connect(&server);
    send(&mut idle, b"GET /hello HTTP/1.1\r\n\r\n");
    assert_eq!(read_reply(&mut idle, false).status, 200);
    let mut client = connect(&server);
    send(&mut client, b"GET /slow HTTP/1.1\r\n\r\n");
    started_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    let stopper = std::thread::spawn(move || server.shutdown(Duration::from_secs(10)));
    let reply = read_reply(&mut client, false);
    assert_eq!((reply.status, reply.text().as_str()), (200, "slow done\n"));
    assert_eq!(reply.header("Connection"), Some("close"));
    // The idle keep-alive connection is closed rather than waited for.
    assert!(closed(&mut idle));
    stopper.join().unwrap();
    assert!(TcpStream::connect(addr).is_err(), "still accepting");
}

#[test]
fn dropping_the_handle_stops_the_server() {
    let server = start(test_config());
    let mut idle = connect(&server);
    send(&mut idle, b"GET /hello HTTP/1.1\r\n\r\n");
    assert_eq!(read_reply(&mut idle, false).status, 200);
    drop(server);
    assert!(closed(&mut idle));
}

#[test]
fn serves_over_tls() {
    crate::tls::install_crypto_provider();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tls");
    let mut config = test_config();
    config.tls = Some(
        crate::tls::server_config(
            &fixtures.join("server.pem"),
            &fixtures.join("server-key.pem"),
        )
        .unwrap(),
    );
    let server = start(config);

    let mut roots = rustls::RootCertStore::empty();
    for cert in crate::tls::load_certificates(&fixtures.join("ca.pem")).unwrap() {
        roots.add(cert).unwrap();
    }
    let client_config = Arc::new(
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    for host in ["localhost", "127.0.0.1"] {
        let name = rustls_pki_types::ServerName::try_from(host).unwrap();
        let session = rustls::ClientConnection::new(client_config.clone(), name).unwrap();
        let tcp = TcpStream::connect(server.local_addr()).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut tls = BufReader::new(rustls::StreamOwned::new(session, tcp));
        for _ in 0..2 {
            tls.get_mut()
                .write_all(b"POST /echo HTTP/1.1\r\nContent-Length: 6\r\n\r\nsecret")
                .unwrap();
            let reply = read_reply(&mut tls, false);
            assert_eq!((reply.status, reply.text().as_str()), (200, "secret"));
        }
        assert_eq!(
            tls.get_ref().conn.alpn_protocol(),
            None,
            "the client offered no ALPN"
        );
    }
    // A plaintext client gets nothing useful and the server survives it.
    let mut plain = connect(&server);
    send(&mut plain, b"GET /hello HTTP/1.1\r\n\r\n");
    let mut rest = Vec::new();
    let _ = plain.read_to_end(&mut rest);
    assert!(!rest.starts_with(b"HTTP/1.1 200"));
    server.shutdown(Duration::from_secs(5));
}

#[test]
fn binding_a_used_address_names_it() {
    let server = start(test_config());
    let addr = server.local_addr().to_string();
    let e = Server::bind(
        &addr,
        test_config(),
        Arc::new(TestApp {
            slow_started: Mutex::new(None),
        }),
    )
    .err()
    .unwrap();
    assert_eq!(e.to_string(), format!("address {addr} is already in use"));
    assert!(matches!(
        Server::bind(
            "not an address",
            test_config(),
            Arc::new(TestApp {
                slow_started: Mutex::new(None)
            })
        ),
        Err(HttpError::Address(_))
    ));
    server.shutdown(Duration::from_secs(5));
}

fn request(query: &str, headers: &[(&str, &str)], body: &[u8]) -> Request {
    Request {
        method: "POST".into(),
        path: "/".into(),
        query: query.into(),
        headers: headers
            .iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect(),
        body: body.to_vec(),
        remote: SocketAddr::from(([127, 0, 0, 1], 1)),
        admitted: None,
    }
}

#[test]
fn decodes_query_and_form_parameters() {
    let r = request(
        "a=1&b=x+y%2Fz&a=2&empty&bad=%zz&c=%E2%9C%93",
        &[(
            "content-type",
            "application/x-www-form-urlencoded; charset=utf-8",
        )],
        b"id=cluster%201&token=t",
    );
    assert_eq!(r.query_params("a"), vec!["1", "2"]);
    assert_eq!(r.query_param("b").as_deref(), Some("x y/z"));
    assert_eq!(r.query_param("empty").as_deref(), Some(""));
    assert_eq!(r.query_param("bad"), None);
    assert_eq!(r.query_param("c").as_deref(), Some("✓"));
    assert_eq!(r.query_param("missing"), None);
    assert_eq!(r.form_param("id").as_deref(), Some("cluster 1"));
    let json = request("", &[("Content-Type", "application/json")], b"id=1");
    assert_eq!(json.form_param("id"), None);
    assert_eq!(percent_decode("%4"), None);
    assert_eq!(percent_decode("%ff"), None, "not UTF-8");
    assert_eq!(percent_encode("a b/✓~"), "a%20b%2F%E2%9C%93~");
    assert_eq!(
        percent_decode(&percent_encode("x=1&y+z")).as_deref(),
        Some("x=1&y+z")
    );
}

#[test]
fn finds_bearer_tokens() {
    let token = |value: &str| {
        request("", &[("authorization", value)], b"")
            .bearer_token()
            .ok()
            .map(str::to_owned)
    };
    assert_eq!(token("Bearer abc").as_deref(), Some("abc"));
    assert_eq!(token("bEaReR   abc  ").as_deref(), Some("abc"));
    assert_eq!(token("Basic abc"), None);
    assert_eq!(token("Bearer "), None);
    assert_eq!(token("Bearer"), None);
    assert_eq!(
        request("", &[], b"").bearer_token(),
        Err(BearerError::NotBearer)
    );
    assert_eq!(
        request("", &[("X-A", "1")], b"").header("x-a"),
        Some("1"),
        "header names are case-insensitive"
    );
}

/// Not a test of behaviour but a measurement: `cargo test -p telemeter-common --lib
/// idle_connection_cost -- --ignored --nocapture`.
#[test]
#[ignore]
fn idle_connection_cost() {
    fn status(field: &str) -> String {
        std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .find(|l| l.starts_with(field))
            .unwrap_or("")
            .to_owned()
    }
    let mut config = test_config();
    config.header_timeout = Duration::from_secs(60);
    config.max_connections = 2000;
    let server = start(config);
    println!("before: {} {}", status("Threads"), status("VmRSS"));
    let clients: Vec<_> = (0..1000).map(|_| connect(&server)).collect();
    while server.stats().open_connections < 1000 {
        std::thread::sleep(Duration::from_millis(10));
    }
    println!(
        "1000 idle: {} {} open={}",
        status("Threads"),
        status("VmRSS"),
        server.stats().open_connections
    );
    drop(clients);
    server.shutdown(Duration::from_secs(5));
}

#[test]
fn the_bearer_parser_is_the_one_authorize_answers_with() {
    assert_eq!(bearer(Some(" Bearer  tok ")), Ok("tok"));
    assert_eq!(bearer(Some("BEARER x y")), Ok("x y"));
    // The scheme ends at a space only, as production has always read it.
    assert_eq!(bearer(Some("Bearer\ttok")), Err(BearerError::NotBearer));
    assert_eq!(bearer(Some("Basic abc")), Err(BearerError::NotBearer));
    assert_eq!(bearer(None), Err(BearerError::NotBearer));
    assert_eq!(bearer(Some("Bearer   ")), Err(BearerError::Empty));
    assert_eq!(
        BearerError::NotBearer.to_string(),
        "Only bearer authorization allowed"
    );
    assert_eq!(BearerError::Empty.reason(), "Invalid Authorization header");
}

/// A connected pair of loopback sockets: (ours, the peer's).
fn socket_pair() -> (TcpStream, TcpStream) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let peer = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (ours, _) = listener.accept().unwrap();
    (ours, peer)
}

#[test]
fn a_read_keeps_a_timeout_within_the_slack_and_still_ends_at_its_deadline() {
    use super::stream::{Deadlined, TIMEOUT_SLACK};
    let (ours, mut peer) = socket_pair();
    let mut socket = Deadlined::new(ours, Some(Instant::now() + Duration::from_secs(5)));
    let mut buf = [0u8; 16];
    peer.write_all(b"one").unwrap();
    assert_eq!(socket.read(&mut buf).unwrap(), 3);
    let set = socket.tcp.read_timeout().unwrap().unwrap();
    assert!(set > Duration::from_secs(4), "{set:?}");

    // The same time left, to within the slack: the socket's timeout is not set again.
    socket.deadline = Some(Instant::now() + set + TIMEOUT_SLACK / 2);
    peer.write_all(b"two").unwrap();
    assert_eq!(socket.read(&mut buf).unwrap(), 3);
    assert_eq!(socket.tcp.read_timeout().unwrap(), Some(set));

    // Far less time left: set again, so the read ends at its deadline, not 5 s later.
    let started = Instant::now();
    socket.deadline = Some(started + Duration::from_millis(150));
    let err = socket.read(&mut buf).unwrap_err();
    assert!(super::stream::is_timeout(&err), "{err:?}");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(150) && took < Duration::from_secs(2),
        "{took:?}"
    );

    // A kept timeout shorter than the time left (within the slack) ends the read early: it is
    // read again, and ends no sooner than the deadline.
    let kept = socket.tcp.read_timeout().unwrap().unwrap();
    let started = Instant::now();
    let deadline = started + kept + TIMEOUT_SLACK / 2;
    socket.deadline = Some(deadline);
    let err = socket.read(&mut buf).unwrap_err();
    assert!(super::stream::is_timeout(&err), "{err:?}");
    assert!(Instant::now() >= deadline);
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[test]
fn a_body_that_arrives_with_its_head_is_answered_whole() {
    // Head and an 8 KiB body sent at once arrive in one read (of a body step): the body is
    // taken from what was read with the head, on each request of a kept-alive connection.
    let server = start(test_config());
    let body = vec![b'x'; 8 << 10];
    let mut request = format!(
        "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(&body);
    let mut client = connect(&server);
    for _ in 0..3 {
        send(&mut client, &request);
        let reply = read_reply(&mut client, false);
        assert_eq!(reply.status, 200);
        assert_eq!(reply.body, body);
    }
}

fn later_config() -> Config {
    let mut config = test_config();
    config.inline_paths = [
        "/later",
        "/later-dropped",
        "/later-close",
        "/later-stream",
        "/later-big",
        "/hello",
    ]
    .map(String::from)
    .to_vec();
    config
}

#[test]
fn an_answer_given_later_keeps_the_order_of_pipelined_requests() {
    let server = start(later_config());
    let mut client = connect(&server);
    // Both requests in one write: the second is read while the first's answer is owed, and
    // answered only after it.
    send(
        &mut client,
        b"GET /later?1 HTTP/1.1\r\n\r\nGET /hello HTTP/1.1\r\n\r\n",
    );
    assert_eq!(read_reply(&mut client, false).text(), "later 1\n");
    assert_eq!(read_reply(&mut client, false).text(), "hello\n");
    // The connection stays kept alive for the next one.
    send(&mut client, b"GET /later?2 HTTP/1.1\r\n\r\n");
    let reply = read_reply(&mut client, false);
    assert_eq!((reply.status, reply.text().as_str()), (200, "later 2\n"));
    assert_eq!(reply.header("Connection"), None);
    server.shutdown(Duration::from_secs(5));
}

#[test]
fn an_answer_never_given_is_a_500_and_the_connection_closes() {
    let server = start(later_config());
    let mut client = connect(&server);
    send(&mut client, b"GET /later-dropped HTTP/1.1\r\n\r\n");
    let reply = read_reply(&mut client, false);
    assert_eq!(
        (reply.status, reply.text().as_str()),
        (500, "internal error\n")
    );
    assert!(closed(&mut client));
    server.shutdown(Duration::from_secs(5));
}

#[test]
fn a_later_answer_that_closes_or_streams_is_written_whole_then_the_connection_closes() {
    let server = start(later_config());
    let mut client = connect(&server);
    send(&mut client, b"GET /later-close HTTP/1.1\r\n\r\n");
    let reply = read_reply(&mut client, false);
    assert_eq!(reply.text(), "later, then closed\n");
    assert_eq!(reply.header("Connection"), Some("close"));
    assert!(closed(&mut client));

    let mut client = connect(&server);
    send(&mut client, b"GET /later-stream HTTP/1.1\r\n\r\n");
    let reply = read_reply(&mut client, false);
    assert_eq!(reply.text(), "streamed later");
    assert!(closed(&mut client));
    server.shutdown(Duration::from_secs(5));
}

#[test]
fn shutdown_waits_for_an_answer_owed_then_closes_its_connection() {
    let (started, started_rx) = crossbeam_channel::bounded(1);
    let server = start_with(
        later_config(),
        TestApp {
            slow_started: Mutex::new(Some(started)),
        },
    );
    let mut idle = connect(&server);
    send(&mut idle, b"GET /hello HTTP/1.1\r\n\r\n");
    assert_eq!(read_reply(&mut idle, false).status, 200);
    let mut client = connect(&server);
    send(&mut client, b"GET /later?owed HTTP/1.1\r\n\r\n");
    started_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    let stopper = std::thread::spawn(move || server.shutdown(Duration::from_secs(10)));
    let reply = read_reply(&mut client, false);
    assert_eq!((reply.status, reply.text().as_str()), (200, "later owed\n"));
    // Then it is closed like an idle one, not left open until its idle timeout.
    let started = Instant::now();
    assert!(closed(&mut client));
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "closed only at its timeout"
    );
    assert!(closed(&mut idle));
    stopper.join().unwrap();
}

#[test]
fn a_later_answer_larger_than_the_socket_takes_is_finished_by_the_connection() {
    let server = start(later_config());
    let mut client = connect(&server);
    // 16 MiB do not fit in a loopback socket's buffers at once: the answering thread writes
    // what fits without blocking and hands the rest back.
    send(&mut client, b"GET /later-big HTTP/1.1\r\n\r\n");
    let reply = read_reply(&mut client, false);
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body.len(), 16 << 20);
    assert!(reply.body.iter().all(|&b| b == b'x'));
    assert!(
        closed(&mut client),
        "a handed-back answer closes the connection"
    );
    server.shutdown(Duration::from_secs(5));
}

/// A socket that takes at most `max` bytes a write and counts its writes.
struct Trickle {
    bytes: Vec<u8>,
    writes: usize,
    max: usize,
}

impl std::io::Write for Trickle {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.write_vectored(&[std::io::IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        self.writes += 1;
        let mut taken = 0;
        for buf in bufs {
            let take = buf.len().min(self.max - taken);
            self.bytes.extend_from_slice(&buf[..take]);
            taken += take;
        }
        Ok(taken)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_chunked_body_goes_out_a_write_a_chunk_with_the_head_in_the_first_whatever_the_socket_takes() {
    use super::connection::Chunked;
    let body: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let expected = chunked(b"HEAD\r\n", &body, 40_000);
    for max in [usize::MAX, 7, 1] {
        let mut socket = Trickle {
            bytes: Vec::new(),
            writes: 0,
            max,
        };
        let mut chunked = Chunked::new(&mut socket, b"HEAD\r\n");
        for piece in body.chunks(40_000) {
            std::io::Write::write_all(&mut chunked, piece).unwrap();
        }
        chunked.finish().unwrap();
        assert_eq!(socket.bytes, expected, "taking {max} bytes a write");
        if max == usize::MAX {
            // Three chunks and the last.
            assert_eq!(socket.writes, 4);
        }
    }
    // Without a chunk, the head goes out with the last one.
    let mut socket = Trickle {
        bytes: Vec::new(),
        writes: 0,
        max: usize::MAX,
    };
    Chunked::new(&mut socket, b"HEAD\r\n").finish().unwrap();
    assert_eq!(socket.bytes, b"HEAD\r\n0\r\n\r\n");
    assert_eq!(socket.writes, 1);
}

/// `head` then `body` in HTTP/1.1 chunks of `piece` bytes, and the last chunk.
fn chunked(head: &[u8], body: &[u8], piece: usize) -> Vec<u8> {
    let mut wire = head.to_vec();
    for piece in body.chunks(piece) {
        wire.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        wire.extend_from_slice(piece);
        wire.extend_from_slice(b"\r\n");
    }
    wire.extend_from_slice(b"0\r\n\r\n");
    wire
}

/// A sized body read with its head is taken as it came (the buffer it was read into becomes the
/// body): the handler gets it whole, alone or with a request pipelined after it, and its budget
/// is given back once answered.
#[test]
fn a_body_that_came_with_its_head_is_handed_on_whole() {
    let server = start(test_config());
    let mut client = connect(&server);
    let body: Vec<u8> = (0..8000u32).map(|i| (i % 253) as u8).collect();
    let head = format!(
        "POST /echo HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let alone = [head.as_bytes(), &body].concat();
    send(&mut client, &alone);
    let reply = read_reply(&mut client, false);
    assert_eq!((reply.status, &reply.body), (200, &body));
    assert_eq!(
        wait_for_stats(&server, |s| s.body_bytes_in_flight == 0).body_bytes_in_flight,
        0
    );
    // Another request after it in the same write: the body is only its own bytes.
    let pipelined = [head.as_bytes(), &body, b"GET /hello HTTP/1.1\r\n\r\n"].concat();
    send(&mut client, &pipelined);
    let reply = read_reply(&mut client, false);
    assert_eq!((reply.status, &reply.body), (200, &body));
    assert_eq!(read_reply(&mut client, false).text(), "hello\n");
    // And again on the same connection, after the buffer was handed on.
    send(&mut client, &alone);
    let reply = read_reply(&mut client, false);
    assert_eq!((reply.status, &reply.body), (200, &body));
    assert_eq!(
        wait_for_stats(&server, |s| s.body_bytes_in_flight == 0).body_bytes_in_flight,
        0
    );
    server.shutdown(Duration::from_secs(5));
}

/// A head's fields, held in one buffer, read back as parsed: in order, names as sent, values
/// without surrounding blanks (empty ones too), the first of a repeated name by any case.
#[test]
fn header_fields_read_back_in_order_from_one_buffer() {
    let raw = b"POST /upload?x=1 HTTP/1.1\r\nHost: a\r\nX-Empty:\r\nAuthorization:  Bearer t \r\n\
                content-type: text/plain\r\nX-Twice: 1\r\nx-twice: 2\r\n\r\n";
    let head = parse_head(raw).unwrap();
    let fields: Vec<(&str, &str)> = head.headers.iter().collect();
    assert_eq!(
        fields,
        [
            ("Host", "a"),
            ("X-Empty", ""),
            ("Authorization", "Bearer t"),
            ("content-type", "text/plain"),
            ("X-Twice", "1"),
            ("x-twice", "2"),
        ]
    );
    assert_eq!(head.headers.len(), 6);
    assert_eq!(head.header("Content-Type"), Some("text/plain"));
    assert_eq!(head.header("x-empty"), Some(""));
    assert_eq!(head.header("X-TWICE"), Some("1"));
    assert_eq!(head.header("Missing"), None);
    assert_eq!(head.headers.field(6), None);
    let rebuilt: Headers = fields.into_iter().collect();
    assert_eq!(rebuilt, head.headers);
    assert!(Headers::new().is_empty());
    assert_eq!(Headers::new().iter().next(), None);
    assert_eq!(
        format!("{:?}", Headers::from(vec![("A", "1")])),
        r#"[("A", "1")]"#
    );
}

/// A note gives back what it holds only as its own type; one made from a shared value gives back
/// that very value, not a copy.
#[test]
fn a_note_gives_back_its_value_by_type_and_a_shared_one_itself() {
    let note = Note::new(7u32);
    assert_eq!(note.get::<u32>(), Some(&7));
    assert_eq!(note.get::<u64>(), None);
    assert_eq!(note.get_shared::<u32>().as_deref(), Some(&7));
    let shared = Arc::new(String::from("cluster"));
    let note = Note::shared(shared.clone());
    assert_eq!(note.get::<String>().map(String::as_str), Some("cluster"));
    assert!(Arc::ptr_eq(&note.get_shared::<String>().unwrap(), &shared));
    assert!(note.get_shared::<u32>().is_none());
    assert!(note.get::<Arc<String>>().is_none());
}
