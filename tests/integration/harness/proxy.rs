//! A fault-injecting TCP proxy between mailpump and Dovecot: it can freeze the connections it
//! carries (a NAT box that forgot them), reset a connection in the middle of a response, trickle
//! bytes, hold back the next command that names something, or refuse connections for a while
//! (by closing its listening socket).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What happens to bytes from the server to mailpump.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    Pass,
    /// The next connection that has carried this many bytes downstream is reset (RST).
    ResetAfter(u64),
    /// Each 256-byte piece waits this long.
    Trickle(Duration),
    /// Untagged `* n EXPUNGE` lines are dropped: a server that announces no expunge (as none is
    /// announced for a mailbox being closed). Only for small exchanges (a line is looked for
    /// inside one piece).
    DropExpunges,
}

struct Shared {
    frozen_before: AtomicU64,
    generation: AtomicU64,
    mode: Mutex<Mode>,
    resets: AtomicU64,
    /// The next piece from mailpump containing these bytes waits this long (once).
    hold: Mutex<Option<(Vec<u8>, Duration)>>,
    /// Held pieces that started, and that ended, waiting.
    holds_started: AtomicU64,
    holds_ended: AtomicU64,
}

pub struct Proxy {
    pub port: u16,
    target: u16,
    shared: Arc<Shared>,
    accept_task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

async fn upstream_pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    gen: u64,
    shared: Arc<Shared>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if gen < shared.frozen_before.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        let held = {
            let mut hold = shared.hold.lock().unwrap();
            let hit = hold.as_ref().and_then(|(needle, delay)| {
                buf[..n]
                    .windows(needle.len())
                    .any(|w| w == needle.as_slice())
                    .then_some(*delay)
            });
            if hit.is_some() {
                *hold = None;
            }
            hit
        };
        if let Some(delay) = held {
            shared.holds_started.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(delay).await;
            shared.holds_ended.fetch_add(1, Ordering::SeqCst);
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

async fn downstream_pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    to: tokio::net::tcp::OwnedWriteHalf,
    gen: u64,
    shared: Arc<Shared>,
) {
    let mut to = to;
    let mut buf = vec![0u8; 64 * 1024];
    let mut carried = 0u64;
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if gen < shared.frozen_before.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        let mode = *shared.mode.lock().unwrap();
        match mode {
            Mode::ResetAfter(limit) if carried + n as u64 >= limit => {
                let keep = (limit.saturating_sub(carried)) as usize;
                let _ = to.write_all(&buf[..keep.min(n)]).await;
                *shared.mode.lock().unwrap() = Mode::Pass;
                shared.resets.fetch_add(1, Ordering::SeqCst);
                // an abortive close: the peer sees a reset in the middle of the literal
                let stream = to.reunite(from).expect("halves of one stream");
                let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                drop(stream);
                return;
            }
            Mode::Trickle(every) => {
                for piece in buf[..n].chunks(256) {
                    tokio::time::sleep(every).await;
                    if to.write_all(piece).await.is_err() {
                        return;
                    }
                }
            }
            Mode::DropExpunges => {
                let kept = drop_expunges(&buf[..n]);
                if to.write_all(&kept).await.is_err() {
                    return;
                }
            }
            _ => {
                if to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
        carried += n as u64;
    }
}

/// `piece` without its `* n EXPUNGE` lines.
fn drop_expunges(piece: &[u8]) -> Vec<u8> {
    let mut kept = Vec::with_capacity(piece.len());
    for line in piece.split_inclusive(|b| *b == b'\n') {
        let text = String::from_utf8_lossy(line);
        let mut words = text.split_whitespace();
        let expunge = words.next() == Some("*")
            && words.next().is_some_and(|n| n.parse::<u32>().is_ok())
            && words
                .next()
                .is_some_and(|w| w.eq_ignore_ascii_case("EXPUNGE"))
            && words.next().is_none();
        if !expunge {
            kept.extend_from_slice(line);
        }
    }
    kept
}

impl Proxy {
    pub async fn start(target_port: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(Shared {
            frozen_before: AtomicU64::new(0),
            generation: AtomicU64::new(0),
            mode: Mutex::new(Mode::Pass),
            resets: AtomicU64::new(0),
            hold: Mutex::new(None),
            holds_started: AtomicU64::new(0),
            holds_ended: AtomicU64::new(0),
        });
        let proxy = Proxy {
            port,
            target: target_port,
            shared,
            accept_task: Mutex::new(None),
        };
        proxy.serve(listener);
        proxy
    }

    fn serve(&self, listener: TcpListener) {
        let shared = self.shared.clone();
        let target = self.target;
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(upstream) = TcpStream::connect(("127.0.0.1", target)).await else {
                    continue;
                };
                let gen = shared.generation.fetch_add(1, Ordering::SeqCst);
                let (cr, cw) = client.into_split();
                let (ur, uw) = upstream.into_split();
                tokio::spawn(upstream_pump(cr, uw, gen, shared.clone()));
                tokio::spawn(downstream_pump(ur, cw, gen, shared.clone()));
            }
        });
        *self.accept_task.lock().unwrap() = Some(task);
    }

    /// Every connection open now stops carrying bytes (both ways) and never closes.
    pub fn freeze_existing(&self) {
        self.shared.frozen_before.store(
            self.shared.generation.load(Ordering::SeqCst),
            Ordering::SeqCst,
        );
    }

    pub fn set_mode(&self, mode: Mode) {
        *self.shared.mode.lock().unwrap() = mode;
    }

    /// The next piece mailpump sends that contains `needle` (a command: `EXAMINE`) reaches the
    /// server only `delay` later, once.
    pub fn hold_next(&self, needle: &str, delay: Duration) {
        *self.shared.hold.lock().unwrap() = Some((needle.as_bytes().to_vec(), delay));
    }

    /// How many held pieces started waiting, and how many went on.
    pub fn holds(&self) -> (u64, u64) {
        (
            self.shared.holds_started.load(Ordering::SeqCst),
            self.shared.holds_ended.load(Ordering::SeqCst),
        )
    }

    pub fn resets(&self) -> u64 {
        self.shared.resets.load(Ordering::SeqCst)
    }

    /// Closes the listening socket: connecting gets "connection refused" until `accept_again`.
    pub fn refuse(&self) {
        if let Some(task) = self.accept_task.lock().unwrap().take() {
            task.abort();
        }
    }

    pub async fn accept_again(&self) {
        let listener = loop {
            match TcpListener::bind(("127.0.0.1", self.port)).await {
                Ok(l) => break l,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        self.serve(listener);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(task) = self.accept_task.lock().unwrap().take() {
            task.abort();
        }
    }
}
