//! A raw HTTP/1.1 client for the agent's API: it sends exactly the bytes a test asks for
//! (malformed bodies, lying headers, oversized payloads), which a polished client would not.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The contract's `code` of a problem+json answer.
    pub fn code(&self) -> Option<String> {
        self.json().get("code").and_then(Value::as_str).map(String::from)
    }
}

/// Bodies above this are sent as curl sends them: `Expect: 100-continue`, and the body only
/// once the server asks for it. A server that refuses early (413) then closes no connection
/// with unread data, whose reset could lose its answer.
const EXPECT_CONTINUE_ABOVE: usize = 16 * 1024;

/// One request on its own connection (`Connection: close`); `extra` headers go as given.
pub async fn request(addr: SocketAddr, method: &str, path: &str, extra: &[(&str, &str)], body: Option<&[u8]>) -> Result<Response> {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in extra {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    let expect = body.is_some_and(|b| b.len() > EXPECT_CONTINUE_ABOVE);
    if let Some(b) = body {
        head.push_str(&format!("Content-Length: {}\r\n", b.len()));
    }
    if expect {
        head.push_str("Expect: 100-continue\r\n");
    }
    head.push_str("\r\n");
    let io = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(head.as_bytes()).await?;
        let mut raw = Vec::new();
        if let Some(b) = body {
            if expect {
                // Until the end of the first answer's head: `100 Continue`, or the final answer.
                let mut buf = [0u8; 4096];
                while !raw.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await? {
                        0 => break,
                        n => raw.extend_from_slice(&buf[..n]),
                    }
                }
                if raw.starts_with(b"HTTP/1.1 100") {
                    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                    raw.drain(..end);
                    let _ = s.write_all(b).await;
                }
            } else {
                // The server may answer (413) and close before it read everything: not an error.
                let _ = s.write_all(b).await;
            }
        }
        // A reset is kept to say why an answer is missing.
        let reset = s.read_to_end(&mut raw).await.err().map(|e| e.to_string());
        anyhow::Ok((raw, reset))
    };
    let (raw, reset) = tokio::time::timeout(Duration::from_secs(90), io).await.context("no answer within 90 s")??;
    parse(&raw).with_context(|| {
        format!(
            "{method} {path}: {:?} (read: {})",
            String::from_utf8_lossy(&raw[..raw.len().min(300)]),
            reset.as_deref().unwrap_or("to the end")
        )
    })
}

fn parse(raw: &[u8]) -> Result<Response> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").context("no end of headers")?;
    let head = std::str::from_utf8(&raw[..end])?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next().and_then(|l| l.split(' ').nth(1)).context("no status line")?.parse()?;
    let headers: Vec<(String, String)> =
        lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_string(), v.trim().to_string())).collect();
    let mut body = raw[end + 4..].to_vec();
    if headers.iter().any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")) {
        body = dechunk(&body)?;
    }
    Ok(Response { status, headers, body })
}

fn dechunk(mut b: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = b.windows(2).position(|w| w == b"\r\n").context("chunk size line")?;
        let size = usize::from_str_radix(std::str::from_utf8(&b[..eol])?.split(';').next().unwrap().trim(), 16)?;
        b = &b[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if b.len() < size + 2 {
            bail!("truncated chunk");
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_chunked_answers() {
        let r = parse(b"HTTP/1.1 202 Accepted\r\nLocation: /v1/remediations/x\r\nContent-Length: 2\r\n\r\n{}").unwrap();
        assert_eq!((r.status, r.header("location"), r.json()), (202, Some("/v1/remediations/x"), serde_json::json!({})));
        let r = parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n").unwrap();
        assert_eq!(r.text(), "abcde");
    }
}
