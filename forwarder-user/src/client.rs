//! A small HTTP/1 client, one request per connection: the link agent's demand to its
//! upstream and the CLI's reads of a running daemon's API.

use std::{net::SocketAddr, time::Duration};

use axum::{body::Bytes, http::header};
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;

/// What a request came to.
#[derive(Debug)]
pub enum Outcome<T> {
    Ok(T),
    /// It answered and said no: the reason it gave.
    Refused(String),
    /// No answer (connection, timeout, not HTTP).
    Unreachable(String),
}

/// How long one exchange may take: well under a demand lapse.
const TIMEOUT: Duration = Duration::from_secs(2);

/// One request on a fresh connection, with `Authorization: Bearer` when given.
pub async fn call(
    addr: SocketAddr,
    bearer: Option<&str>,
    method: hyper::Method,
    path: &str,
    body: Vec<u8>,
) -> Outcome<Vec<u8>> {
    let exchange = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connecting: {e}"))?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| format!("HTTP handshake: {e}"))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, addr.to_string())
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(b) = bearer {
            req = req.header(header::AUTHORIZATION, format!("Bearer {b}"));
        }
        let req = req
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        let resp = send
            .send_request(req)
            .await
            .map_err(|e| format!("request: {e}"))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("reading the answer: {e}"))?
            .to_bytes()
            .to_vec();
        Ok::<_, String>((status, body))
    };
    match tokio::time::timeout(TIMEOUT, exchange).await {
        Err(_) => Outcome::Unreachable(format!("no answer within {} s", TIMEOUT.as_secs())),
        Ok(Err(e)) => Outcome::Unreachable(e),
        Ok(Ok((s, body))) if s.is_success() => Outcome::Ok(body),
        Ok(Ok((s, body))) => Outcome::Refused(format!(
            "{}: {}",
            s.as_u16(),
            String::from_utf8_lossy(&body).trim()
        )),
    }
}
