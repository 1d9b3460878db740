//! The readiness probe: one HTTP/1.1 GET to a workspace, answered with a success or redirect
//! status within a deadline. Deliberately tiny: it runs for every launching instance on every
//! reconcile tick and must never hang the loop.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Whether `GET path` on `address` (`host:port`) answers within `deadline` with `expected`,
/// or with any 2xx or 3xx when `expected` is `None`.
pub async fn probe(
    address: &str,
    path: &str,
    user_agent: &str,
    expected: Option<u16>,
    deadline: Duration,
) -> bool {
    match tokio::time::timeout(deadline, status_of(address, path, user_agent)).await {
        Ok(Some(status)) => match expected {
            Some(want) => status == want,
            None => (200..=399).contains(&status),
        },
        _ => false,
    }
}

async fn status_of(address: &str, path: &str, user_agent: &str) -> Option<u16> {
    let mut stream = TcpStream::connect(address).await.ok()?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nUser-Agent: {user_agent}\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.ok()?;
    // The status line fits in the first read of any real server; read until it is complete.
    let mut head = Vec::with_capacity(256);
    let mut buf = [0u8; 256];
    while !head.contains(&b'\n') && head.len() < 4096 {
        let n = stream.read(&mut buf).await.ok()?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    parse_status_line(&head)
}

/// `HTTP/1.1 200 OK` -> 200.
fn parse_status_line(head: &[u8]) -> Option<u16> {
    let line = head.split(|&b| b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split_whitespace();
    if !parts.next()?.starts_with("HTTP/") {
        return None;
    }
    parts.next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_are_parsed() {
        assert_eq!(parse_status_line(b"HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(
            parse_status_line(b"HTTP/1.0 302 Found\r\nLocation: /"),
            Some(302)
        );
        assert_eq!(parse_status_line(b"SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(parse_status_line(b""), None);
    }

    /// A one-shot server answering `status` to the first request.
    async fn answering(status: u16) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = stream.read(&mut buf).await;
                let _ = stream
                    .write_all(
                        format!("HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n").as_bytes(),
                    )
                    .await;
            }
        });
        address
    }

    #[tokio::test]
    async fn the_expected_status_decides() {
        let ok = answering(200).await;
        let redirect = answering(302).await;
        let teapot = answering(418).await;
        let second = Duration::from_secs(2);
        assert!(probe(&ok, "/", "t", None, second).await);
        assert!(probe(&redirect, "/", "t", None, second).await);
        assert!(!probe(&redirect, "/", "t", Some(200), second).await);
        assert!(!probe(&teapot, "/", "t", None, second).await);
        assert!(probe(&teapot, "/", "t", Some(418), second).await);
    }

    #[tokio::test]
    async fn a_closed_port_is_not_ready() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        assert!(
            !probe(
                &format!("127.0.0.1:{port}"),
                "/",
                "probe",
                None,
                Duration::from_secs(1)
            )
            .await
        );
    }
}
