//! The byte stream under an IMAP or POP3 session: TCP (with kernel keepalive), implicit TLS, or
//! a plain connection upgraded to TLS after the protocol's go-ahead (IMAP STARTTLS, POP3 STLS;
//! each protocol speaks its own plain-text prologue, [`upgrade`] does the rest). Certificate
//! verification is on unless the account says `accept_invalid_certs`.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, BufReader, ReadBuf};
use tokio::net::TcpStream;

use super::NetError;
use crate::config::TlsOptions;

/// TCP or TLS over TCP.
#[derive(Debug)]
pub enum Transport {
    Plain(TcpStream),
    Tls(Box<tokio_native_tls::TlsStream<TcpStream>>),
    /// An in-memory pipe to a scripted server (unit tests with paused time).
    #[cfg(test)]
    Memory(tokio::io::DuplexStream),
}

impl AsyncRead for Transport {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            #[cfg(test)]
            Transport::Memory(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Transport {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            #[cfg(test)]
            Transport::Memory(s) => Pin::new(s).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_flush(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            #[cfg(test)]
            Transport::Memory(s) => Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            #[cfg(test)]
            Transport::Memory(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// errno 111 on Linux. Recognised by number: async-imap reuses `ErrorKind::ConnectionRefused`
/// for a tagged BAD, so the kind alone proves nothing.
const ECONNREFUSED: i32 = 111;

/// Kernel keepalive: the first probe after this much silence, then one per interval; the
/// connection is dead after this many unanswered probes (about two minutes in all).
const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(15);
const KEEPALIVE_PROBES: u32 = 4;

/// Connects over TCP with a timeout and kernel keepalive (dead peers are noticed even when
/// idle).
pub async fn tcp_connect(host: &str, port: u16, timeout: Duration) -> Result<TcpStream, NetError> {
    let addrs: Vec<_> =
        match tokio::time::timeout(timeout, tokio::net::lookup_host((host, port))).await {
            Err(_) => {
                return Err(NetError::Timeout {
                    what: format!("resolving {host}"),
                    after: timeout,
                })
            }
            Ok(Err(e)) => {
                return Err(NetError::Connect {
                    host: host.to_string(),
                    port,
                    source: e,
                })
            }
            Ok(Ok(a)) => a.collect(),
        };
    let mut last = None;
    for addr in addrs {
        match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Err(_) => {
                last = Some(NetError::Timeout {
                    what: format!("connecting to {host}:{port}"),
                    after: timeout,
                })
            }
            Ok(Err(e)) if e.raw_os_error() == Some(ECONNREFUSED) => {
                last = Some(NetError::Refused {
                    host: host.to_string(),
                    port,
                })
            }
            Ok(Err(e)) => {
                last = Some(NetError::Connect {
                    host: host.to_string(),
                    port,
                    source: e,
                })
            }
            Ok(Ok(stream)) => {
                stream.set_nodelay(true).ok();
                let keepalive = socket2::TcpKeepalive::new()
                    .with_time(KEEPALIVE_IDLE)
                    .with_interval(KEEPALIVE_INTERVAL)
                    .with_retries(KEEPALIVE_PROBES);
                socket2::SockRef::from(&stream)
                    .set_tcp_keepalive(&keepalive)
                    .ok();
                return Ok(stream);
            }
        }
    }
    Err(last.unwrap_or_else(|| NetError::Connect {
        host: host.to_string(),
        port,
        source: io::Error::new(io::ErrorKind::NotFound, "no address found"),
    }))
}

/// A TLS connector honouring `accept_invalid_certs` and `ca_file`.
pub fn tls_connector(opts: &TlsOptions) -> Result<tokio_native_tls::TlsConnector, NetError> {
    let mut builder = native_tls::TlsConnector::builder();
    if opts.accept_invalid_certs {
        builder
            .danger_accept_invalid_certs(true)
            .danger_accept_invalid_hostnames(true);
    }
    if let Some(path) = &opts.ca_file {
        let pem = std::fs::read(path)
            .map_err(|e| NetError::Tls(format!("cannot read ca_file {}: {e}", path.display())))?;
        let cert = native_tls::Certificate::from_pem(&pem).map_err(|e| {
            NetError::Tls(format!(
                "ca_file {} is not a PEM certificate: {e}",
                path.display()
            ))
        })?;
        builder.add_root_certificate(cert);
    }
    let connector = builder.build().map_err(|e| NetError::Tls(e.to_string()))?;
    Ok(tokio_native_tls::TlsConnector::from(connector))
}

/// The TLS handshake over an established TCP stream.
pub async fn tls_handshake(
    tcp: TcpStream,
    host: &str,
    opts: &TlsOptions,
    timeout: Duration,
) -> Result<Transport, NetError> {
    let connector = tls_connector(opts)?;
    match tokio::time::timeout(timeout, connector.connect(host, tcp)).await {
        Err(_) => Err(NetError::Timeout {
            what: "TLS handshake".into(),
            after: timeout,
        }),
        Ok(Err(e)) => Err(NetError::Tls(format!("handshake with {host} failed: {e}"))),
        Ok(Ok(s)) => Ok(Transport::Tls(Box::new(s))),
    }
}

/// The TLS upgrade after a protocol's plain-text go-ahead (`after`, e.g. "STARTTLS OK"):
/// refuses when the server sent anything beyond the go-ahead (bytes read in plain text must
/// never be read as if they came over TLS), then the handshake as [`tls_handshake`].
pub async fn upgrade(
    reader: BufReader<Transport>,
    after: &'static str,
    host: &str,
    opts: &TlsOptions,
    timeout: Duration,
) -> Result<Transport, NetError> {
    if !reader.buffer().is_empty() {
        return Err(NetError::DataBeforeTls { after });
    }
    match reader.into_inner() {
        Transport::Plain(tcp) => tls_handshake(tcp, host, opts, timeout).await,
        _ => Err(NetError::Tls(format!(
            "{after} on a connection that is not plain TCP"
        ))),
    }
}
