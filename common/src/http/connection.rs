//! One connection's state machine: read a head, ask the handler, read the body, queue the
//! request for a worker, write the response, then keep alive or linger and close.

use std::io::{self, BufWriter, IoSlice, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::sync::{self, lock, panic_message};

use super::head::{
    framing, head_end, is_token, leading_empty_lines, parse_head, ChunkedDecoder, Framing,
    RequestError,
};
use super::later::{Defer, Handback, Owed};
use super::pending::Pending;
use super::shared::{BodyBuffer, BudgetFull, PeerKey, Phase, Shared, Tracked, BODY_STEP};
use super::stream::{is_timeout, Deadlined, Stream};
use super::{reason_phrase, Body, Config, Request, Response};

/// How long a closing connection keeps reading (and discarding) what the peer still sends, so the
/// kernel does not answer unread data with a reset that would destroy the error response.
pub(super) const LINGER: Duration = Duration::from_secs(1);

/// The most bytes discarded while lingering.
pub(super) const LINGER_BYTES: usize = 1 << 20;

/// A response body up to this size is sent in the same write as its head.
pub(super) const RESPONSE_BUFFER_BYTES: usize = 8 << 10;

/// How often a receiving body records its progress (a lock of the connection table each time).
pub(super) const PROGRESS_MARK_EVERY: Duration = Duration::from_millis(250);

/// One open connection; dropping it forgets it in the tracking table before the socket closes.
pub(super) struct Connection {
    shared: Arc<Shared>,
    id: u64,
    remote: SocketAddr,
    peer: PeerKey,
    stream: Stream,
    /// Bytes read past the current request (the next pipelined request, or the start of a body);
    /// the socket is read straight into it.
    pending: Pending,
    /// When a body being received last recorded its progress in the table.
    progress_marked: Instant,
    /// The last response's head (and small body), kept for the next one.
    response_head: Vec<u8>,
    /// The answer this connection owes, when a request is answered later ([`Later`]).
    owed: Arc<Owed>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        // The socket stays open until the answer owed is settled (its `Later` writes to it).
        if let Some(handback) = self.owed.settle() {
            self.write_handback(handback);
        }
        {
            let mut table = self.shared.connections();
            table.connections.remove(&self.id);
            if let Some(usage) = table.peers.get_mut(&self.peer) {
                usage.connections = usage.connections.saturating_sub(1);
            }
            table.forget_if_unused(self.peer);
        }
        self.shared.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A request read and checked, with what the front needs to answer it.
pub(super) struct Parsed {
    request: Request,
    http10: bool,
    head_only: bool,
    /// Close after answering (asked by the peer, HTTP/1.0, or shutting down).
    close: bool,
    /// Released once the answer is written, so the budget covers the handler's use of the body.
    _body: BodyBuffer,
}

/// Why a connection stops reading requests.
pub(super) enum Stop {
    /// Close quietly: the peer left, went idle past its time, or we are shutting down.
    Close,
    /// Answer this protocol error, then close.
    Refuse(Response),
    /// Answer the handler's refusal of a head ([`Handler::admit`]), then close: its body, if
    /// any, was not read.
    Refused(Response),
}

impl From<RequestError> for Stop {
    fn from(e: RequestError) -> Stop {
        Stop::Refuse(Response::text(e.status(), &e.to_string()))
    }
}

impl From<BudgetFull> for Stop {
    fn from(full: BudgetFull) -> Stop {
        let reason = match full {
            BudgetFull::All => "too many request bodies in flight; retry",
            BudgetFull::Peer => "too many request bodies in flight from your address; retry",
        };
        Stop::Refuse(Response::text(503, reason).with_header("Retry-After", "1"))
    }
}

pub(super) fn serve_connection(
    shared: Arc<Shared>,
    tcp: TcpStream,
    remote: SocketAddr,
    peer: PeerKey,
) {
    let accepted_at = Instant::now();
    let id = shared.next_connection.fetch_add(1, Ordering::SeqCst);
    let owed = Arc::new(Owed::default());
    shared.connections().connections.insert(
        id,
        Tracked {
            fd: tcp.as_raw_fd(),
            owed: owed.clone(),
            peer,
            idle: true,
            closed_by_server: false,
            phase: Phase::Waiting(accepted_at),
        },
    );
    let _ = tcp.set_nodelay(true);
    let _ = tcp.set_write_timeout(Some(shared.config.write_timeout));
    let socket = Deadlined::new(tcp, Some(accepted_at + shared.config.header_timeout));
    let stream = match &shared.config.tls {
        None => Stream::Plain(socket),
        Some(tls) => match rustls::ServerConnection::new(tls.clone()) {
            Ok(session) => Stream::Tls(Box::new(rustls::StreamOwned::new(session, socket))),
            Err(e) => {
                log::warn!("{}: starting TLS for {remote}: {e}", shared.config.name);
                shared.connections().connections.remove(&id);
                shared.release_connection(peer);
                shared.open.fetch_sub(1, Ordering::SeqCst);
                return;
            }
        },
    };
    let mut connection = Connection {
        shared,
        id,
        remote,
        peer,
        stream,
        pending: Pending::default(),
        progress_marked: accepted_at,
        response_head: Vec::new(),
        owed,
    };
    // A panic in a stream body or here must still close the connection and release its slot,
    // which `Connection`'s drop does during unwinding; catching it keeps the log tidy.
    let name = connection.shared.config.name.clone();
    if let Err(panic) = catch_unwind(AssertUnwindSafe(|| connection.run(accepted_at))) {
        log::error!(
            "{name}: connection from {remote} panicked: {}",
            panic_message(&*panic)
        );
    }
}

impl Connection {
    fn config(&self) -> &Config {
        &self.shared.config
    }

    fn run(&mut self, accepted_at: Instant) {
        let mut first = true;
        loop {
            let head_deadline = match self.wait_for_request(first, accepted_at) {
                Some(deadline) => deadline,
                None => return,
            };
            first = false;
            let (response, refused_head) = match self.read_request(head_deadline) {
                Ok(parsed) => {
                    if !self.set_phase(Phase::Busy) || !self.answer(parsed) {
                        return;
                    }
                    continue;
                }
                Err(Stop::Close) => return,
                Err(Stop::Refuse(response)) => {
                    self.shared.protocol_error();
                    (response, false)
                }
                Err(Stop::Refused(response)) => {
                    self.shared.refused_heads.fetch_add(1, Ordering::SeqCst);
                    (response, true)
                }
            };
            log::debug!(
                "{}: {} from {}{}",
                self.config().name,
                response.status,
                self.remote,
                if refused_head {
                    " (refused by the handler)"
                } else {
                    ""
                }
            );
            if let Some(handback) = self.owed.settle() {
                self.write_handback(handback);
                return;
            }
            let _ = self.write_response(response, false, false, true);
            self.linger();
            return;
        }
    }

    /// Waits for the first byte of a request while marked idle (so shutdown may close us), and
    /// returns the deadline for the whole head; `None` to close.
    fn wait_for_request(&mut self, first: bool, accepted_at: Instant) -> Option<Instant> {
        if !self.set_idle(true) {
            return None;
        }
        if self.pending.is_empty() {
            let deadline = if first {
                accepted_at + self.config().header_timeout
            } else {
                Instant::now() + self.config().idle_timeout
            };
            self.stream.set_deadline(deadline);
            match self.fill() {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
        if !self.set_idle(false) {
            return None;
        }
        Some(if first {
            accepted_at + self.config().header_timeout
        } else {
            Instant::now() + self.config().header_timeout
        })
    }

    /// Marks the connection idle (waiting for a request) or not (receiving one); false when
    /// shutdown or eviction has claimed it. A head being received keeps the time its wait began,
    /// so a trickled head stays first in line for eviction.
    fn set_idle(&self, idle: bool) -> bool {
        let mut table = self.shared.connections();
        match table.connections.get_mut(&self.id) {
            Some(tracked) if !(tracked.closed_by_server || idle && self.shared.stopping()) => {
                tracked.idle = idle;
                if idle {
                    tracked.phase = Phase::Waiting(Instant::now());
                }
                true
            }
            _ => false,
        }
    }

    /// Records what the connection is doing; false when eviction or shutdown has claimed it.
    fn set_phase(&self, phase: Phase) -> bool {
        let mut table = self.shared.connections();
        match table.connections.get_mut(&self.id) {
            Some(tracked) if !tracked.closed_by_server => {
                tracked.phase = phase;
                true
            }
            _ => false,
        }
    }

    /// Reads more bytes into `pending`; the count read (0 at end of stream).
    fn fill(&mut self) -> io::Result<usize> {
        // As large as a body step, so a typical upload (head and an 8 KiB body) arrives in one
        // read: one syscall a request, not two.
        let stream = &mut self.stream;
        self.pending.read_with(BODY_STEP, |room| stream.read(room))
    }

    /// Reads some body bytes into `buf` under the body deadline, recording progress now and then.
    fn read_body_bytes(&mut self, buf: &mut [u8]) -> Result<usize, Stop> {
        loop {
            match self.stream.read(buf) {
                Ok(0) => return Err(Stop::Close),
                Ok(n) => {
                    let now = Instant::now();
                    if now.duration_since(self.progress_marked) >= PROGRESS_MARK_EVERY {
                        self.progress_marked = now;
                        // An eviction shows on the next read, as the end of the stream.
                        self.set_phase(Phase::Body(now));
                    }
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_timeout(&e) => {
                    return Err(Stop::Refuse(Response::text(
                        408,
                        "the request body took too long",
                    )))
                }
                Err(_) => return Err(Stop::Close),
            }
        }
    }

    /// Reads and checks one request: head, the handler's admission, body.
    fn read_request(&mut self, deadline: Instant) -> Result<Parsed, Stop> {
        let max = self.config().max_header_bytes;
        self.stream.set_deadline(deadline);
        let mut scanned = 0;
        let head_end = loop {
            // Empty lines before a request line are ignored (RFC 9112 §2.2): some clients send a
            // CRLF after a body.
            let blank = leading_empty_lines(&self.pending);
            if blank > 0 {
                self.pending.consume(blank);
                scanned = 0;
            }
            if let Some(end) = head_end(&self.pending, &mut scanned, max)? {
                break end;
            }
            match self.fill() {
                Ok(0) => return Err(Stop::Close),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_timeout(&e) && !self.pending.is_empty() => {
                    return Err(Stop::Refuse(Response::text(
                        408,
                        "the request head took too long",
                    )))
                }
                Err(_) => return Err(Stop::Close),
            }
        };
        let head = parse_head(self.pending.get(..head_end).unwrap_or(&[]))?;
        self.pending.consume(head_end);
        let framing = framing(&head)?;
        let admission = self
            .shared
            .handler
            .admit(&head, self.remote)
            .map_err(Stop::Refused)?;
        let limit = admission.body_limit;
        let most = match framing {
            Framing::Length(length) if length > limit => {
                self.shared
                    .handler
                    .body_too_large(&head, limit, self.remote);
                return Err(RequestError::BodyTooLarge {
                    declared: Some(length as u64),
                    limit,
                }
                .into());
            }
            Framing::Length(length) => length,
            Framing::Chunked => limit,
        };
        let has_body = framing != Framing::Length(0);
        if let Some(expect) = head.header("Expect") {
            if !expect.eq_ignore_ascii_case("100-continue") {
                return Err(RequestError::Expectation.into());
            }
            let arrived = match framing {
                Framing::Length(length) => self.pending.len() >= length,
                Framing::Chunked => !self.pending.is_empty(),
            };
            if !head.http10 && has_body && !arrived {
                let sent = self
                    .stream
                    .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                    .and_then(|()| self.stream.flush());
                if sent.is_err() {
                    return Err(Stop::Close);
                }
            }
        }
        let mut body = BodyBuffer::new(self.shared.clone(), self.peer, most);
        if has_body {
            let now = Instant::now();
            self.progress_marked = now;
            // A body that arrived with its head will not be read from the socket: nothing to
            // evict it for, and one lock of the connection table less per request.
            let arrived =
                matches!(framing, Framing::Length(length) if self.pending.len() >= length);
            if !arrived && !self.set_phase(Phase::Body(now)) {
                return Err(Stop::Close);
            }
            self.stream.set_deadline(now + self.config().body_timeout);
            match framing {
                Framing::Length(length) => self.read_sized_body(length, &mut body)?,
                Framing::Chunked => {
                    let read = self.read_chunked_body(limit, &mut body);
                    if matches!(&read, Err(Stop::Refuse(response)) if response.status == 413) {
                        self.shared
                            .handler
                            .body_too_large(&head, limit, self.remote);
                    }
                    read?
                }
            }
        }
        // A large head or a chunked body's reads may have grown the buffer; an idle keep-alive
        // connection should not keep that.
        self.pending.shrink(BODY_STEP);
        let close = head.wants_close() || self.shared.stopping();
        let head_only = head.method == "HEAD";
        let request = Request {
            method: head.method,
            path: head.path,
            query: head.query,
            headers: head.headers,
            body: body.take(),
            remote: self.remote,
            admitted: admission.note,
        };
        Ok(Parsed {
            request,
            http10: head.http10,
            head_only,
            close,
            _body: body,
        })
    }

    /// Reads a body of `length` bytes (already checked against the cap).
    fn read_sized_body(&mut self, length: usize, body: &mut BodyBuffer) -> Result<(), Stop> {
        // A body read with its head (a typical upload's 8 KiB) is copied once, from where the
        // socket put it into a buffer of its exact size, and is complete: no 16 KiB of stack
        // zeroed below for nothing.
        let from_pending = length.min(self.pending.len());
        body.append(self.pending.get(..from_pending).unwrap_or(&[]))?;
        self.pending.consume(from_pending);
        if body.bytes.len() >= length {
            return Ok(());
        }
        // Read straight into the stack, never past the body: what follows it stays unread.
        let mut chunk = [0u8; BODY_STEP];
        while body.bytes.len() < length {
            let want = (length - body.bytes.len()).min(chunk.len());
            let read = self.read_body_bytes(&mut chunk[..want])?;
            body.append(chunk.get(..read).unwrap_or(&[]))?;
        }
        Ok(())
    }

    /// Reads a chunked body of at most `limit` bytes; bytes past its end stay in `pending`.
    fn read_chunked_body(&mut self, limit: usize, body: &mut BodyBuffer) -> Result<(), Stop> {
        let mut decoder = ChunkedDecoder::new(limit, self.config().max_header_bytes);
        loop {
            // Steps move a cursor; `pending` is drained once per read, not once per chunk.
            let mut at = 0;
            while !decoder.is_done() {
                let input = self.pending.get(at..).unwrap_or(&[]);
                let step = decoder.step(input)?;
                if step.consumed == 0 {
                    break;
                }
                body.append(input.get(step.data).unwrap_or(&[]))?;
                at += step.consumed;
            }
            self.pending.consume(at);
            if decoder.is_done() {
                return Ok(());
            }
            // Read straight into `pending`, taken out for the read (a move, no copy).
            let mut pending = std::mem::take(&mut self.pending);
            let read = pending.read_with(BODY_STEP, |room| self.read_body_bytes(room));
            self.pending = pending;
            read?;
        }
    }

    /// Runs the request through the handler (here, on an inline path, else on a worker) and
    /// writes its answer; false to close the connection.
    fn answer(&mut self, parsed: Parsed) -> bool {
        let Parsed {
            request,
            http10,
            head_only,
            mut close,
            _body,
        } = parsed;
        // A pipelined request is answered only after the one before it.
        if let Some(handback) = self.owed.settle() {
            self.write_handback(handback);
            return false;
        }
        let inline = self
            .config()
            .inline_paths
            .iter()
            .position(|path| request.path == *path);
        let response = if let Some(inline) = inline {
            // Answered later only on plain TCP (a TLS session is this thread's) and when the
            // connection is kept alive as it is.
            let deferrable = matches!(self.stream, Stream::Plain(_))
                && !(close || http10 || head_only || self.shared.stopping());
            let fd = self.stream.socket().tcp.as_raw_fd();
            let handled = catch_unwind(AssertUnwindSafe(|| {
                if deferrable {
                    let defer = Defer {
                        owed: &self.owed,
                        fd,
                        shared: &self.shared,
                    };
                    self.shared.handler.handle_later(request, defer)
                } else {
                    Some(self.shared.handler.handle(request))
                }
            }));
            // No copy of the path for the log line: the request is the handler's, and this runs
            // once per upload.
            match handled {
                // Its `Later` answers; this thread reads the next request meanwhile.
                Ok(None) => {
                    drop(_body);
                    return true;
                }
                Ok(Some(response)) => response,
                Err(panic) => {
                    let path = self.config().inline_paths.get(inline).map_or("", |p| p);
                    log::error!(
                        "{}: the handler panicked on a request to {path}: {}",
                        self.config().name,
                        panic_message(&*panic)
                    );
                    Response::text(500, "internal error")
                }
            }
        } else {
            let (reply, answer) = sync::oneshot();
            {
                // Queued under the lock rather than with a clone of the sender: a clone and its
                // drop would take the queue's own lock twice more, against every worker.
                let jobs = lock(&self.shared.jobs);
                match jobs.as_ref() {
                    // With the workers gone the job is given back and dropped, and so is its
                    // reply sender.
                    Some(jobs) => drop(jobs.send((request, reply))),
                    // Shutting down: no queue to take it.
                    None => drop(reply),
                }
            }
            // `None`: shutting down, or the workers are gone.
            match answer.recv() {
                Some(response) => response,
                None => {
                    close = true;
                    Response::text(503, "shutting down")
                }
            }
        };
        drop(_body);
        if let Some(handback) = self.owed.settle() {
            // The handler took the answer and failed (a panic): that answer is the one written.
            self.write_handback(handback);
            return false;
        }
        if self.shared.stopping() {
            close = true;
        }
        match self.write_response(response, http10, head_only, close) {
            Ok(keep_alive) => keep_alive,
            Err(e) => {
                log::debug!(
                    "{}: writing a response to {}: {e}",
                    self.config().name,
                    self.remote
                );
                false
            }
        }
    }

    /// Writes `response`; whether the connection may carry another request.
    fn write_response(
        &mut self,
        response: Response,
        http10: bool,
        head_only: bool,
        close: bool,
    ) -> io::Result<bool> {
        let Response {
            status,
            headers,
            body,
        } = response;
        // HTTP/1.0 has no chunked encoding: a streamed body ends where the connection does.
        let chunked = matches!(body, Body::Stream(_)) && !http10;
        // The head is written into the connection's own buffer, kept from one response to the
        // next: a response to an upload allocates nothing here.
        let mut head = std::mem::take(&mut self.response_head);
        head.clear();
        let (status, close) = encode_head(
            &mut head,
            status,
            &headers,
            &body,
            http10,
            close,
            &self.shared.config.name,
        );
        let no_body_status = status == 204 || status == 304;
        let send_body = !head_only && !no_body_status;
        let written = match body {
            // A small answer goes out in one write (one packet), as the buffered writer sent it.
            Body::Empty => self.stream.write_all(&head),
            Body::Bytes(bytes) if !send_body => self.stream.write_all(&head).map(|()| drop(bytes)),
            Body::Bytes(bytes) if bytes.len() <= RESPONSE_BUFFER_BYTES => {
                head.extend_from_slice(&bytes);
                self.stream.write_all(&head)
            }
            Body::Bytes(bytes) => self
                .stream
                .write_all(&head)
                .and_then(|()| self.stream.write_all(&bytes)),
            Body::Stream(write_body) if send_body && chunked => {
                let name = self.shared.config.name.clone();
                // Each chunk goes straight to the socket, the head with the first.
                let mut chunks =
                    BufWriter::with_capacity(16 << 10, Chunked::new(&mut self.stream, &head));
                let written = write_body(&mut chunks).and_then(|()| chunks.flush());
                // Flushed above when it went well; nothing more is sent when it did not.
                let (chunked, _) = chunks.into_parts();
                if let Err(e) = written.and_then(|()| chunked.finish()) {
                    // Without the last chunk the peer sees a broken body, not a short one.
                    log::warn!("{name}: a streamed response body failed: {e}");
                    return Ok(false);
                }
                Ok(())
            }
            Body::Stream(write_body) => {
                let name = self.shared.config.name.clone();
                let mut out = BufWriter::with_capacity(8 << 10, &mut self.stream);
                out.write_all(&head)?;
                if send_body {
                    if let Err(e) = write_body(&mut out) {
                        log::warn!("{name}: a streamed response body failed: {e}");
                        return Ok(false);
                    }
                }
                out.flush()
            }
        };
        if head.capacity() <= 2 * RESPONSE_BUFFER_BYTES {
            self.response_head = head;
        }
        written?;
        self.stream.flush()?;
        if close {
            if let Stream::Tls(tls) = &mut self.stream {
                tls.conn.send_close_notify();
                let _ = tls.flush();
            }
        }
        Ok(!close)
    }

    /// Writes what a [`Later`] handed back (module `later`); the connection closes after it.
    fn write_handback(&mut self, handback: Handback) {
        let written = match handback {
            Handback::Bytes(bytes) => self
                .stream
                .write_all(&bytes)
                .and_then(|()| self.stream.flush()),
            Handback::Response(response) => {
                self.write_response(response, false, false, true).map(drop)
            }
        };
        if let Err(e) = written {
            log::debug!(
                "{}: writing a response to {}: {e}",
                self.config().name,
                self.remote
            );
        }
    }

    /// Closes our side, then reads and drops what the peer still sends for a moment, so an error
    /// response is not lost to a reset caused by unread request bytes.
    fn linger(&mut self) {
        let socket = self.stream.socket();
        let _ = socket.tcp.shutdown(std::net::Shutdown::Write);
        socket.deadline = Some(Instant::now() + LINGER);
        let mut discarded = 0;
        let mut sink = [0u8; 4096];
        while discarded < LINGER_BYTES {
            match socket.read(&mut sink) {
                Ok(0) | Err(_) => break,
                Ok(n) => discarded += n,
            }
        }
    }
}

/// Writes a response's status line and headers into `head`; says the status sent (an invalid
/// one becomes 500) and whether the connection closes after it.
fn encode_head(
    head: &mut Vec<u8>,
    mut status: u16,
    headers: &[(String, String)],
    body: &Body,
    http10: bool,
    mut close: bool,
    name: &str,
) -> (u16, bool) {
    if !(200..=599).contains(&status) {
        log::error!("{name}: the handler answered status {status}; sending 500");
        status = 500;
    }
    if headers.iter().any(|(n, v)| {
        n.eq_ignore_ascii_case("connection") && v.trim().eq_ignore_ascii_case("close")
    }) {
        close = true;
    }
    // HTTP/1.0 has no chunked encoding: a streamed body ends where the connection does.
    let chunked = matches!(body, Body::Stream(_)) && !http10;
    if matches!(body, Body::Stream(_)) && http10 {
        close = true;
    }
    head.extend_from_slice(b"HTTP/1.1 ");
    // Writing into a Vec cannot fail.
    let _ = write!(head, "{status} ");
    head.extend_from_slice(reason_phrase(status).as_bytes());
    head.extend_from_slice(b"\r\n");
    for (header, value) in headers {
        let framing = ["content-length", "transfer-encoding", "connection"]
            .iter()
            .any(|f| header.eq_ignore_ascii_case(f));
        let unsafe_text = !is_token(header) || value.bytes().any(|b| b == b'\r' || b == b'\n');
        if framing {
            continue;
        }
        if unsafe_text {
            log::error!(
                "{name}: dropping response header {header:?} with characters that would split the response"
            );
            continue;
        }
        head.extend_from_slice(header.as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    let no_body_status = status == 204 || status == 304;
    match body {
        _ if no_body_status => {}
        Body::Empty => head.extend_from_slice(b"Content-Length: 0\r\n"),
        Body::Bytes(bytes) => {
            let _ = write!(head, "Content-Length: {}\r\n", bytes.len());
        }
        Body::Stream(_) if chunked => head.extend_from_slice(b"Transfer-Encoding: chunked\r\n"),
        Body::Stream(_) => {}
    }
    if close {
        head.extend_from_slice(b"Connection: close\r\n");
    } else if http10 {
        head.extend_from_slice(b"Connection: keep-alive\r\n");
    }
    head.extend_from_slice(b"\r\n");
    (status, close)
}

/// A whole keep-alive HTTP/1.1 answer to a request that is neither HEAD nor HTTP/1.0, as the
/// bytes to write ([`super::later::Later`]); the response back when it cannot be written so (a
/// streamed body, or it closes the connection).
pub(super) fn encode_small(response: Response, name: &str) -> Result<Vec<u8>, Response> {
    if matches!(response.body, Body::Stream(_)) {
        return Err(response);
    }
    let mut bytes = Vec::with_capacity(128);
    let (status, close) = encode_head(
        &mut bytes,
        response.status,
        &response.headers,
        &response.body,
        false,
        false,
        name,
    );
    if close {
        return Err(response);
    }
    if let Body::Bytes(body) = &response.body {
        if status != 204 && status != 304 {
            bytes.extend_from_slice(body);
        }
    }
    Ok(bytes)
}

/// Wraps each write in one HTTP/1.1 chunk, written to `W` as one vectored write (its size line,
/// its bytes, its CRLF; the response head too, with the first): a body's bytes are not copied
/// into a buffer first, and the size line is not a send (a packet, a wakeup of the peer) of its
/// own, as it was through a `BufWriter` (one in two of a `/federate` response's sends).
pub(super) struct Chunked<'h, W: Write> {
    inner: W,
    /// What goes out before the first chunk (the response head) until it has.
    head: &'h [u8],
}

impl<'h, W: Write> Chunked<'h, W> {
    pub(super) fn new(inner: W, head: &'h [u8]) -> Chunked<'h, W> {
        Chunked { inner, head }
    }

    /// Writes the last chunk (and the head, when no chunk did) and flushes.
    pub(super) fn finish(mut self) -> io::Result<()> {
        let mut parts = [IoSlice::new(self.head), IoSlice::new(b"0\r\n\r\n")];
        write_all_vectored(&mut self.inner, &mut parts)?;
        self.inner.flush()
    }
}

impl<W: Write> Write for Chunked<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        // At most 16 hex digits and CRLF.
        let mut size_line = [0u8; 18];
        let mut cursor = io::Cursor::new(&mut size_line[..]);
        write!(cursor, "{:x}\r\n", buf.len())?;
        let size_len = usize::try_from(cursor.position()).unwrap_or(0);
        let mut parts = [
            IoSlice::new(self.head),
            IoSlice::new(size_line.get(..size_len).unwrap_or_default()),
            IoSlice::new(buf),
            IoSlice::new(b"\r\n"),
        ];
        write_all_vectored(&mut self.inner, &mut parts)?;
        self.head = &[];
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Writes all of `parts` to `w`, in as few vectored writes as `w` takes them.
fn write_all_vectored(w: &mut impl Write, mut parts: &mut [IoSlice<'_>]) -> io::Result<()> {
    // Skips leading empty parts, which a write of them all would count as done.
    IoSlice::advance_slices(&mut parts, 0);
    while !parts.is_empty() {
        match w.write_vectored(parts) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(written) => IoSlice::advance_slices(&mut parts, written),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
