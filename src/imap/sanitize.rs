//! A read-side filter between the socket and async-imap, for server output that is valid (or
//! harmless) but that imap-proto cannot parse:
//! - untagged responses it does not know (`* XAPPLEPUSHSERVICE ...`): RFC 3501 section 7 asks
//!   clients to ignore them, imap-proto fails the whole session; they are dropped;
//! - `* CAPABILITY` lines with repeated spaces: the spaces are collapsed;
//! - `* LIST`, `* LSUB`, `* STATUS` and `* NAMESPACE`, which imap-proto cannot parse once
//!   extensions add to them (LIST-EXTENDED's `("OLDNAME" (...))`, STATUS `MAILBOXID`,
//!   NAMESPACE itself): each is taken whole (literals included) into the [`Captured`] queue
//!   and replaced by [`CAPTURED_MARK`], an untagged OK that wakes a reader without a command
//!   pending; `imap::listing` parses them.
//!
//! Everything else passes byte for byte. Literals (`{n}` at the end of a line) are carried
//! whole and never inspected, so message bodies cannot be mistaken for responses.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Untagged response names imap-proto parses (after `* `, or after `* n ` for the numbered).
const KNOWN: &[&str] = &[
    "OK",
    "NO",
    "BAD",
    "BYE",
    "PREAUTH",
    "CAPABILITY",
    "SEARCH",
    "SORT",
    "FLAGS",
    "ENABLED",
    "ID",
    "QUOTA",
    "QUOTAROOT",
    "ACL",
    "LISTRIGHTS",
    "MYRIGHTS",
    "METADATA",
    "VANISHED",
];
/// Untagged responses taken whole into the [`Captured`] queue.
const CAPTURED: &[&str] = &["LIST", "LSUB", "STATUS", "NAMESPACE"];
/// What a captured response is replaced by in the stream async-imap reads.
pub const CAPTURED_MARK: &str = "mailpump-captured";
/// At most this many captured responses wait to be read.
const MAX_QUEUED: usize = 100_000;
/// A captured response may not be larger than this (a LIST line is a name and a few flags).
const MAX_CAPTURED: usize = 1024 * 1024;

/// The raw responses taken out of the stream (each whole, with its literals), oldest first.
pub type Captured = Arc<Mutex<VecDeque<Vec<u8>>>>;

const KNOWN_NUMBERED: &[&str] = &["EXISTS", "RECENT", "EXPUNGE", "FETCH"];
/// A single line (not counting literals) longer than this is refused.
const MAX_LINE: usize = 64 * 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decision {
    Pass,
    Drop,
    Capability,
    Capture,
}

#[derive(Debug)]
pub struct Sanitize<T> {
    inner: T,
    /// Bytes ready for the reader.
    out: Vec<u8>,
    out_pos: usize,
    /// The line being collected (up to and including its `\n`).
    line: Vec<u8>,
    /// The fate of the response in progress (None between responses).
    decision: Option<Decision>,
    /// Literal bytes still to carry.
    literal: u64,
    eof: bool,
    /// The response being captured, and the queue it goes to once whole.
    capturing: Vec<u8>,
    captured: Captured,
    /// The buffer socket reads go into (kept between reads; its capacity is the read size).
    scratch: Vec<u8>,
    /// Bytes the last read gave.
    last_read: usize,
}

/// The smallest read of the socket, and the size an idle connection's buffer returns to.
const MIN_READ: usize = 16 * 1024;
/// The largest read of the socket.
const MAX_READ: usize = 512 * 1024;

/// The `n` of a line ending in `{n}\r\n` or `{n+}\r\n`.
fn literal_length(line: &[u8]) -> Option<u64> {
    let line = line.strip_suffix(b"\n")?;
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let line = line.strip_suffix(b"}")?;
    let open = line.iter().rposition(|b| *b == b'{')?;
    let digits = &line[open + 1..];
    let digits = digits.strip_suffix(b"+").unwrap_or(digits);
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

fn classify(line: &[u8]) -> Decision {
    let Some(rest) = line.strip_prefix(b"* ") else {
        return Decision::Pass;
    };
    let mut words = rest
        .split(|b| *b == b' ' || *b == b'\r' || *b == b'\n')
        .filter(|w| !w.is_empty());
    let Some(first) = words.next() else {
        return Decision::Pass;
    };
    let word = String::from_utf8_lossy(first).to_ascii_uppercase();
    if word.bytes().all(|b| b.is_ascii_digit()) {
        let name = words
            .next()
            .map(|w| String::from_utf8_lossy(w).to_ascii_uppercase())
            .unwrap_or_default();
        let name = name.split('(').next().unwrap_or("");
        return if KNOWN_NUMBERED.contains(&name) {
            Decision::Pass
        } else {
            Decision::Drop
        };
    }
    match word.as_str() {
        "CAPABILITY" => Decision::Capability,
        w if CAPTURED.contains(&w) => Decision::Capture,
        w if KNOWN.contains(&w) => Decision::Pass,
        _ => Decision::Drop,
    }
}

fn collapse_spaces(line: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(line.len());
    for &b in line {
        if !(b == b' ' && out.last() == Some(&b' ')) {
            out.push(b);
        }
    }
    // "IMAP4rev1 \r\n" -> "IMAP4rev1\r\n"
    if out.ends_with(b" \r\n") {
        out.drain(out.len() - 3..out.len() - 2);
    }
    out
}

impl<T> Sanitize<T> {
    pub fn new(inner: T) -> Sanitize<T> {
        Sanitize {
            inner,
            out: Vec::new(),
            out_pos: 0,
            line: Vec::new(),
            decision: None,
            literal: 0,
            eof: false,
            capturing: Vec::new(),
            captured: Captured::default(),
            scratch: Vec::new(),
            last_read: 0,
        }
    }

    /// The queue captured responses go to.
    pub fn captured(&self) -> Captured {
        self.captured.clone()
    }

    pub fn get_mut(&mut self) -> &mut T {
        &mut self.inner
    }

    /// Sorts freshly read bytes into `out`.
    fn process(&mut self, mut input: &[u8]) -> io::Result<()> {
        while !input.is_empty() {
            if self.literal > 0 {
                let n = (self.literal as usize).min(input.len());
                match self.decision {
                    Some(Decision::Drop) => {}
                    Some(Decision::Capture) => self.capturing.extend_from_slice(&input[..n]),
                    _ => self.out.extend_from_slice(&input[..n]),
                }
                if self.capturing.len() > MAX_CAPTURED {
                    return Err(io::Error::other(
                        "a LIST or STATUS response larger than 1 MiB",
                    ));
                }
                self.literal -= n as u64;
                input = &input[n..];
                continue;
            }
            match input.iter().position(|b| *b == b'\n') {
                None => {
                    self.line.extend_from_slice(input);
                    if self.line.len() > MAX_LINE {
                        return Err(io::Error::other("a response line longer than 64 MiB"));
                    }
                    return Ok(());
                }
                Some(i) => {
                    self.line.extend_from_slice(&input[..=i]);
                    input = &input[i + 1..];
                    let line = std::mem::take(&mut self.line);
                    let decision = *self.decision.get_or_insert_with(|| classify(&line));
                    match decision {
                        Decision::Pass => self.out.extend_from_slice(&line),
                        Decision::Capability => self.out.extend_from_slice(&collapse_spaces(&line)),
                        Decision::Drop => {
                            tracing::debug!(line = %String::from_utf8_lossy(&line[..line.len().min(80)]).trim_end(), "unknown_response_ignored")
                        }
                        Decision::Capture => {
                            self.capturing.extend_from_slice(&line);
                            if self.capturing.len() > MAX_CAPTURED {
                                return Err(io::Error::other(
                                    "a LIST or STATUS response larger than 1 MiB",
                                ));
                            }
                        }
                    }
                    match literal_length(&line) {
                        Some(n) => self.literal = n,
                        None => {
                            if self.decision == Some(Decision::Capture) {
                                let whole = std::mem::take(&mut self.capturing);
                                let mut queue = crate::error::lock(&self.captured);
                                // a session that never reads them (an IDLE watcher) keeps
                                // only the newest
                                if queue.len() >= MAX_QUEUED {
                                    queue.pop_front();
                                }
                                queue.push_back(whole);
                                self.out.extend_from_slice(
                                    format!("* OK {CAPTURED_MARK}\r\n").as_bytes(),
                                );
                            }
                            self.decision = None
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Sanitize<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.out_pos < this.out.len() {
                let n = (this.out.len() - this.out_pos).min(buf.remaining());
                buf.put_slice(&this.out[this.out_pos..this.out_pos + n]);
                this.out_pos += n;
                if this.out_pos == this.out.len() {
                    if this.out.capacity() > 4 * MIN_READ {
                        // read out: a large buffer is not kept (a session may sit unread)
                        this.out = Vec::new();
                    } else {
                        this.out.clear();
                    }
                    this.out_pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            // One read takes what the socket holds, up to the buffer's size. Reads start in
            // a MIN_READ buffer on the stack (no heap for the small reads of an idle session);
            // after a read that filled it the buffer moves to the heap and doubles after each
            // full read up to MAX_READ (a backfill moves hundreds of MB: few large reads, not
            // many small ones), and goes again when the connection falls quiet. Buffers are
            // initialised: TLS streams zero whatever uninitialised space they are handed, on
            // every read.
            let mut stack = [0u8; MIN_READ];
            let mut heap = std::mem::take(&mut this.scratch);
            let buffer: &mut [u8] = if heap.is_empty() {
                &mut stack
            } else {
                &mut heap
            };
            let size = buffer.len();
            let mut rb = ReadBuf::new(buffer);
            match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                Poll::Pending => {
                    if this.last_read < MIN_READ {
                        // quiet: nothing kept while waiting (out is empty here)
                        this.out = Vec::new();
                    } else {
                        this.scratch = heap;
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => {
                    this.scratch = heap;
                    return Poll::Ready(Err(e));
                }
                Poll::Ready(Ok(())) => {
                    let filled = rb.filled();
                    this.last_read = filled.len();
                    let full = filled.len() == size;
                    let result = if filled.is_empty() {
                        // EOF: whatever partial line there is goes up as it is
                        this.eof = true;
                        let rest = std::mem::take(&mut this.line);
                        this.out.extend_from_slice(&rest);
                        Ok(())
                    } else {
                        this.process(filled)
                    };
                    if full && size < MAX_READ {
                        heap = vec![0; size * 2];
                    } else if this.last_read < MIN_READ {
                        heap = Vec::new();
                    }
                    this.scratch = heap;
                    result?;
                }
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Sanitize<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::AsyncReadExt;

    /// Runs `input` through the filter, fed `step` bytes at a time.
    async fn filtered(input: &[u8], step: usize) -> Vec<u8> {
        let mut s = Sanitize::new(tokio_test_reader(input, step));
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        out
    }

    fn tokio_test_reader(input: &[u8], step: usize) -> impl AsyncRead + Unpin {
        let mut builder = tokio_test::io::Builder::new();
        for chunk in input.chunks(step) {
            builder.read(chunk);
        }
        builder.build()
    }

    const SESSION: &[u8] = b"* OK ready\r\n* CAPABILITY IMAP4rev1  IDLE  \r\nA1 OK done\r\n* XAPPLEPUSHSERVICE aps-version 2\r\n* 3 XWEIRD {5}\r\nab\r\nc more\r\n* SEARCH 1 2\r\n* 1 FETCH (UID 1 BODY[] {23}\r\n* XFAKE in a literal\r\n)\r\nA2 OK done\r\n";
    const EXPECTED: &[u8] = b"* OK ready\r\n* CAPABILITY IMAP4rev1 IDLE\r\nA1 OK done\r\n* SEARCH 1 2\r\n* 1 FETCH (UID 1 BODY[] {23}\r\n* XFAKE in a literal\r\n)\r\nA2 OK done\r\n";

    #[tokio::test]
    async fn unknown_responses_are_dropped_literals_and_the_rest_kept() {
        assert_eq!(
            String::from_utf8_lossy(&filtered(SESSION, 4096).await),
            String::from_utf8_lossy(EXPECTED)
        );
    }

    #[tokio::test]
    async fn any_split_of_the_input_gives_the_same_output() {
        for step in [1, 2, 3, 5, 7, 11, 64] {
            assert_eq!(filtered(SESSION, step).await, EXPECTED, "step {step}");
        }
    }

    /// After a large transfer, a connection that falls quiet (a small read, then nothing)
    /// keeps no read buffers: a thousand idling sessions must not each hold one.
    #[tokio::test]
    async fn a_quiet_connection_keeps_no_read_buffer() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut server, client) = tokio::io::duplex(1024 * 1024);
        let body = vec![b'x'; 8 * 1024 * 1024];
        let mut sent = format!("* 1 FETCH (UID 1 BODY[] {{{}}}\r\n", body.len()).into_bytes();
        sent.extend_from_slice(&body);
        sent.extend_from_slice(b")\r\nA1 OK done\r\n* OK still here\r\n");
        let expected = sent.len();
        let writer = tokio::spawn(async move {
            server.write_all(&sent).await.unwrap();
            server // kept open: the connection stays up, and quiet
        });
        let mut s = Sanitize::new(client);
        let mut got = vec![0u8; expected];
        s.read_exact(&mut got).await.unwrap();
        assert!(
            s.scratch.len() > MIN_READ || s.last_read < MIN_READ,
            "reads grew while streaming"
        );
        let _server = writer.await.unwrap();
        let mut one = [0u8; 1];
        let quiet = tokio::time::timeout(Duration::from_millis(50), s.read(&mut one)).await;
        assert!(quiet.is_err(), "nothing more to read");
        assert_eq!((s.scratch.capacity(), s.out.capacity()), (0, 0));
    }

    #[test]
    fn literal_markers_are_recognised() {
        assert_eq!(literal_length(b"* 1 FETCH (BODY[] {123}\r\n"), Some(123));
        assert_eq!(literal_length(b"A1 APPEND x {5+}\r\n"), Some(5));
        assert_eq!(literal_length(b"* OK {not}\r\n"), None);
        assert_eq!(literal_length(b"* OK done\r\n"), None);
    }
}
