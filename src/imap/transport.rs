//! The byte stream under an IMAP session: TCP (with kernel keepalive), implicit TLS, or a plain
//! connection upgraded with STARTTLS. Certificate verification is on unless the account says
//! `accept_invalid_certs`; `security = "starttls"` never falls back to plain text.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{
    AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, ReadBuf,
};
use tokio::net::TcpStream;

use super::ImapError;
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

/// Connects over TCP with a timeout and kernel keepalive (dead peers are noticed even when
/// idle). Shared with the POP3 client.
pub async fn tcp_connect(host: &str, port: u16, timeout: Duration) -> Result<TcpStream, ImapError> {
    let addrs: Vec<_> =
        match tokio::time::timeout(timeout, tokio::net::lookup_host((host, port))).await {
            Err(_) => {
                return Err(ImapError::Timeout {
                    what: format!("resolving {host}"),
                    after: timeout,
                })
            }
            Ok(Err(e)) => {
                return Err(ImapError::Connect {
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
                last = Some(ImapError::Timeout {
                    what: format!("connecting to {host}:{port}"),
                    after: timeout,
                })
            }
            Ok(Err(e)) if e.raw_os_error() == Some(ECONNREFUSED) => {
                last = Some(ImapError::Refused {
                    host: host.to_string(),
                    port,
                })
            }
            Ok(Err(e)) => {
                last = Some(ImapError::Connect {
                    host: host.to_string(),
                    port,
                    source: e,
                })
            }
            Ok(Ok(stream)) => {
                stream.set_nodelay(true).ok();
                let keepalive = socket2::TcpKeepalive::new()
                    .with_time(Duration::from_secs(60))
                    .with_interval(Duration::from_secs(15))
                    .with_retries(4);
                socket2::SockRef::from(&stream)
                    .set_tcp_keepalive(&keepalive)
                    .ok();
                return Ok(stream);
            }
        }
    }
    Err(last.unwrap_or_else(|| ImapError::Connect {
        host: host.to_string(),
        port,
        source: io::Error::new(io::ErrorKind::NotFound, "no address found"),
    }))
}

/// A TLS connector honouring `accept_invalid_certs` and `ca_file`.
pub fn tls_connector(opts: &TlsOptions) -> Result<tokio_native_tls::TlsConnector, ImapError> {
    let mut builder = native_tls::TlsConnector::builder();
    if opts.accept_invalid_certs {
        builder
            .danger_accept_invalid_certs(true)
            .danger_accept_invalid_hostnames(true);
    }
    if let Some(path) = &opts.ca_file {
        let pem = std::fs::read(path)
            .map_err(|e| ImapError::Tls(format!("cannot read ca_file {}: {e}", path.display())))?;
        let cert = native_tls::Certificate::from_pem(&pem).map_err(|e| {
            ImapError::Tls(format!(
                "ca_file {} is not a PEM certificate: {e}",
                path.display()
            ))
        })?;
        builder.add_root_certificate(cert);
    }
    let connector = builder.build().map_err(|e| ImapError::Tls(e.to_string()))?;
    Ok(tokio_native_tls::TlsConnector::from(connector))
}

/// The TLS handshake over an established TCP stream.
pub async fn tls_handshake(
    tcp: TcpStream,
    host: &str,
    opts: &TlsOptions,
    timeout: Duration,
) -> Result<Transport, ImapError> {
    let connector = tls_connector(opts)?;
    match tokio::time::timeout(timeout, connector.connect(host, tcp)).await {
        Err(_) => Err(ImapError::Timeout {
            what: "TLS handshake".into(),
            after: timeout,
        }),
        Ok(Err(e)) => Err(ImapError::Tls(format!("handshake with {host} failed: {e}"))),
        Ok(Ok(s)) => Ok(Transport::Tls(Box::new(s))),
    }
}

/// Reads one CRLF line (at most 64 KiB) under a timeout.
async fn read_line(
    reader: &mut BufReader<&mut TcpStream>,
    timeout: Duration,
) -> Result<String, ImapError> {
    let mut line = String::new();
    let read =
        tokio::time::timeout(timeout, (&mut *reader).take(64 * 1024).read_line(&mut line)).await;
    match read {
        Err(_) => Err(ImapError::Timeout {
            what: "a server line before STARTTLS".into(),
            after: timeout,
        }),
        Ok(Err(e)) => Err(ImapError::Io(e)),
        Ok(Ok(0)) => Err(ImapError::Closed),
        Ok(Ok(_)) => Ok(line),
    }
}

/// The plain-text prologue of STARTTLS (RFC 3501 6.2.1): greeting, CAPABILITY, STARTTLS.
/// Refuses a server that does not offer STARTTLS, and one that sends anything after its OK
/// (plain-text bytes must never be read as if they came over TLS).
pub async fn starttls(mut tcp: TcpStream, timeout: Duration) -> Result<TcpStream, ImapError> {
    {
        let mut reader = BufReader::new(&mut tcp);
        let greeting = read_line(&mut reader, timeout).await?;
        let upper = greeting.to_ascii_uppercase();
        if upper.starts_with("* BYE") {
            return Err(ImapError::Bye(greeting.trim().to_string()));
        }
        if !upper.starts_with("* OK") {
            return Err(ImapError::Protocol(format!(
                "unexpected greeting {:?}",
                greeting.trim()
            )));
        }
        reader
            .get_mut()
            .write_all(b"S1 CAPABILITY\r\n")
            .await
            .map_err(ImapError::Io)?;
        let mut offered = false;
        loop {
            let line = read_line(&mut reader, timeout).await?;
            let upper = line.to_ascii_uppercase();
            if upper.starts_with("* CAPABILITY ") {
                offered |= upper.split_ascii_whitespace().any(|w| w == "STARTTLS");
            } else if upper.starts_with("S1 ") {
                if !upper.starts_with("S1 OK") {
                    return Err(ImapError::Protocol(format!(
                        "CAPABILITY failed: {}",
                        line.trim()
                    )));
                }
                break;
            }
        }
        if !offered {
            return Err(ImapError::NoStartTls);
        }
        reader
            .get_mut()
            .write_all(b"S2 STARTTLS\r\n")
            .await
            .map_err(ImapError::Io)?;
        loop {
            let line = read_line(&mut reader, timeout).await?;
            let upper = line.to_ascii_uppercase();
            if upper.starts_with("S2 OK") {
                break;
            }
            if upper.starts_with("S2 ") {
                return Err(ImapError::Protocol(format!(
                    "STARTTLS refused: {}",
                    line.trim()
                )));
            }
        }
        if !reader.buffer().is_empty() {
            return Err(ImapError::Protocol(
                "server sent data after STARTTLS OK (possible injection)".into(),
            ));
        }
    }
    Ok(tcp)
}
