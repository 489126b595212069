//! A TCP proxy between mailpump and Dovecot that can turn the connections it carries into
//! silent, half-dead ones (as a NAT box that forgot them would), while new connections work.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub struct Proxy {
    pub port: u16,
    /// Connections of this generation and older are frozen.
    frozen_before: Arc<AtomicU64>,
    generation: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    gen: u64,
    frozen_before: Arc<AtomicU64>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if gen < frozen_before.load(Ordering::SeqCst) {
            // silently swallow everything from now on, never closing
            loop {
                if from.read(&mut buf).await.map(|n| n == 0).unwrap_or(true) {
                    std::future::pending::<()>().await;
                }
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl Proxy {
    pub async fn start(target_port: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let frozen_before = Arc::new(AtomicU64::new(0));
        let generation = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (fb, g, st) = (frozen_before.clone(), generation.clone(), stop.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if st.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(upstream) = TcpStream::connect(("127.0.0.1", target_port)).await else {
                    continue;
                };
                let gen = g.fetch_add(1, Ordering::SeqCst);
                let (cr, cw) = client.into_split();
                let (ur, uw) = upstream.into_split();
                tokio::spawn(pump(cr, uw, gen, fb.clone()));
                tokio::spawn(pump(ur, cw, gen, fb.clone()));
            }
        });
        Proxy {
            port,
            frozen_before,
            generation,
            stop,
        }
    }

    /// Every connection open now stops carrying bytes (both ways) and never closes.
    pub fn freeze_existing(&self) {
        self.frozen_before
            .store(self.generation.load(Ordering::SeqCst), Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}
