//! A small HTTP/1 client, one request per connection: the node API's calls between
//! nodes (signed), the CLI's reads of a running daemon's API, and the load-test clients'
//! WHIP/WHEP offers and DELETEs.

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

/// How a request authenticates.
#[derive(Clone, Copy)]
pub enum Auth<'a> {
    None,
    /// `Authorization: Bearer <token>` (the `[webrtc]` token).
    Bearer(&'a str),
    /// An `Authorization` value as given (a node API signature).
    Header(&'a str),
}

impl<'a> Auth<'a> {
    /// A bearer token if there is one.
    pub fn bearer(token: Option<&'a str>) -> Auth<'a> {
        token.map_or(Auth::None, Auth::Bearer)
    }
}

/// One request on a fresh connection.
pub async fn call(
    addr: SocketAddr,
    auth: Auth<'_>,
    method: hyper::Method,
    path: &str,
    body: Vec<u8>,
) -> Outcome<Vec<u8>> {
    let req = Request {
        method,
        path,
        content_type: "application/json",
        body,
        timeout: TIMEOUT,
    };
    match exchange(addr, auth, req).await {
        Outcome::Ok(r) if r.status >= 300 => Outcome::Refused(format!(
            "{}: redirected to {}",
            r.status,
            r.location.unwrap_or_default()
        )),
        Outcome::Ok(r) => Outcome::Ok(r.body),
        Outcome::Refused(e) => Outcome::Refused(e),
        Outcome::Unreachable(e) => Outcome::Unreachable(e),
    }
}

pub struct Request<'a> {
    pub method: hyper::Method,
    pub path: &'a str,
    pub content_type: &'static str,
    pub body: Vec<u8>,
    pub timeout: Duration,
}

/// A successful answer (2xx), or a redirect (3xx with a Location): its status, its
/// Location header (a WHIP/WHEP resource, or where to go) and body.
pub struct Response {
    pub status: u16,
    pub location: Option<String>,
    pub body: Vec<u8>,
}

/// One request on a fresh connection; a non-2xx status is `Refused` with its body, but
/// a redirect with a Location is returned for the caller to follow.
pub async fn exchange(addr: SocketAddr, auth: Auth<'_>, r: Request<'_>) -> Outcome<Response> {
    let timeout = r.timeout;
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
            .method(r.method)
            .uri(r.path)
            .header(header::HOST, addr.to_string())
            .header(header::CONTENT_TYPE, r.content_type);
        match auth {
            Auth::None => {}
            Auth::Bearer(b) => req = req.header(header::AUTHORIZATION, format!("Bearer {b}")),
            Auth::Header(h) => req = req.header(header::AUTHORIZATION, h),
        }
        let req = req
            .body(Full::new(Bytes::from(r.body)))
            .map_err(|e| e.to_string())?;
        let resp = send
            .send_request(req)
            .await
            .map_err(|e| format!("request: {e}"))?;
        let status = resp.status();
        let location = resp
            .headers()
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("reading the answer: {e}"))?
            .to_bytes()
            .to_vec();
        Ok::<_, String>((
            status,
            Response {
                status: status.as_u16(),
                location,
                body,
            },
        ))
    };
    match tokio::time::timeout(timeout, exchange).await {
        Err(_) => Outcome::Unreachable(format!("no answer within {} s", timeout.as_secs_f64())),
        Ok(Err(e)) => Outcome::Unreachable(e),
        Ok(Ok((s, r))) if s.is_success() => Outcome::Ok(r),
        Ok(Ok((s, r))) if s.is_redirection() && r.location.is_some() => Outcome::Ok(r),
        Ok(Ok((s, r))) => Outcome::Refused(format!(
            "{}: {}",
            s.as_u16(),
            String::from_utf8_lossy(&r.body).trim()
        )),
    }
}
