//! IMAP's plain-text STARTTLS prologue (RFC 3501 6.2.1): greeting, CAPABILITY, STARTTLS, then
//! the upgrade that [`crate::net::upgrade`] shares with POP3's STLS. `security = "starttls"`
//! never falls back to plain text.

use std::time::Duration;

use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use super::ImapError;
use crate::config::TlsOptions;
use crate::net::{self, NetError, Transport};

/// The longest line the prologue reads.
const MAX_LINE: usize = 64 * 1024;

/// Reads one CRLF line (at most 64 KiB) under a timeout.
async fn read_line(
    reader: &mut BufReader<Transport>,
    timeout: Duration,
) -> Result<String, ImapError> {
    let mut buf = Vec::new();
    net::read_line(
        reader,
        &mut buf,
        MAX_LINE,
        timeout,
        "a server line before STARTTLS",
    )
    .await?;
    String::from_utf8(buf).map_err(|_| {
        NetError::Io(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "stream did not contain valid UTF-8",
        ))
        .into()
    })
}

/// Greeting, CAPABILITY and STARTTLS in plain text, then TLS. Refuses a server that does not
/// offer STARTTLS, and one that sends anything after its OK.
pub async fn starttls(
    tcp: TcpStream,
    host: &str,
    tls: &TlsOptions,
    timeout: Duration,
) -> Result<Transport, ImapError> {
    let mut reader = BufReader::new(Transport::Plain(tcp));
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
        .map_err(NetError::Io)?;
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
        .map_err(NetError::Io)?;
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
    Ok(net::upgrade(reader, "STARTTLS OK", host, tls, timeout).await?)
}
