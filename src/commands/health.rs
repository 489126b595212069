//! `mailpump health`: the container's health probe. It GETs `/healthz` from the daemon's own
//! `[metrics] listen` address (a wildcard address is asked on loopback), prints the status and
//! the body, and succeeds only on a 200. No shell, no curl needed in the image.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::Config;

/// The whole exchange, below Docker's HEALTHCHECK `--timeout=5s`.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(4);
/// More than any `/healthz` answer (a list of failing mailboxes) needs.
const MAX_RESPONSE: u64 = 64 * 1024;

/// Where to reach a server listening on `listen`.
fn probe_address(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

/// One `GET path` over HTTP/1.1: the status code and the body.
async fn get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut sock = TcpStream::connect(addr).await?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: mailpump-health\r\nConnection: close\r\n\r\n"
    );
    sock.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    sock.take(MAX_RESPONSE).read_to_end(&mut response).await?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {head:?}")))?;
    Ok((status, body.trim_end().to_string()))
}

/// `mailpump health`: true when the daemon's `/healthz` answers 200.
pub async fn health(config: &Config) -> bool {
    let Some(metrics) = &config.metrics else {
        println!("unhealthy: no [metrics] listen in the config, nothing to ask");
        return false;
    };
    let addr = match metrics.listen.parse::<SocketAddr>() {
        Ok(a) => probe_address(a),
        Err(e) => {
            println!("unhealthy: [metrics] listen {:?}: {e}", metrics.listen);
            return false;
        }
    };
    match tokio::time::timeout(HEALTH_TIMEOUT, get(addr, "/healthz")).await {
        Ok(Ok((status, body))) => {
            println!("{status} {body}");
            status == 200
        }
        Ok(Err(e)) => {
            println!("unhealthy: http://{addr}/healthz: {e}");
            false
        }
        Err(_) => {
            println!(
                "unhealthy: http://{addr}/healthz: no answer within {}s",
                HEALTH_TIMEOUT.as_secs()
            );
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wildcard_listen_address_is_probed_on_loopback() {
        let p = |s: &str| probe_address(s.parse().unwrap()).to_string();
        assert_eq!(p("0.0.0.0:9464"), "127.0.0.1:9464");
        assert_eq!(p("[::]:9464"), "[::1]:9464");
        assert_eq!(p("127.0.0.2:80"), "127.0.0.2:80");
    }
}
