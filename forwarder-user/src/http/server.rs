//! Serving HTTP with limits every listener of the daemon needs: a cap on open
//! connections (in total and per client address) and a header timeout, so idle or
//! greedy clients cannot hold its file descriptors. The WHIP/WHEP listener, its admin
//! listener and the node API all serve through [`serve`].

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Router,
    extract::ConnectInfo,
    http::{HeaderMap, header},
};
use tokio::net::TcpListener;

/// Open HTTP connections, in total and per client address.
pub struct ConnLimits {
    max: usize,
    max_per_source: usize,
    header_timeout: Duration,
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// One admitted connection; gives its place back on drop.
struct ConnSlot {
    limits: Arc<ConnLimits>,
    ip: IpAddr,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let mut open = self.limits.open.lock().unwrap();
        open.0 -= 1;
        if let Some(n) = open.1.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.1.remove(&self.ip);
            }
        }
    }
}

impl ConnLimits {
    pub fn with(max: usize, max_per_source: usize, header_timeout: Duration) -> ConnLimits {
        ConnLimits {
            max,
            max_per_source,
            header_timeout,
            open: Mutex::new((0, HashMap::new())),
        }
    }

    /// A place for a connection from `ip`, or why there is none.
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<ConnSlot, &'static str> {
        let mut open = self.open.lock().unwrap();
        if open.0 >= self.max {
            return Err(
                "the server has as many HTTP connections open as it allows (http_max_connections); retry shortly",
            );
        }
        let n = open.1.entry(ip).or_default();
        if *n >= self.max_per_source {
            return Err(
                "your address has as many HTTP connections open as one client may (http_max_connections_per_source); close some or reuse them",
            );
        }
        *n += 1;
        open.0 += 1;
        Ok(ConnSlot {
            limits: self.clone(),
            ip,
        })
    }
}

/// Serves `app` on `listener` with per-connection limits: a cap on open connections
/// (in total and per client address; over it the client gets a 503 and the
/// connection is closed), and a header timeout that also closes idle kept-alive
/// connections, so idle clients cannot hold the daemon's file descriptors.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Arc<ConnLimits>,
) -> anyhow::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors or similar: back off instead of spinning.
                log::warn!("HTTP accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let slot = match limits.admit(peer.ip()) {
            Ok(s) => s,
            Err(why) => {
                let body = format!("{why}\n");
                let reply = format!(
                    "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\nretry-after: 1\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                // Best effort and never waiting: the socket buffer takes it or not.
                // (A plain write: tokio's try_write says WouldBlock until its reactor
                // has seen the new socket writable.)
                if let Ok(mut s) = stream.into_std() {
                    let _ = std::io::Write::write(&mut s, reply.as_bytes());
                }
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let header_timeout = limits.header_timeout;
        tokio::spawn(async move {
            let _slot = slot;
            let svc = hyper::service::service_fn(
                move |mut req: hyper::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(ConnectInfo(peer));
                    tower::ServiceExt::oneshot(app.clone(), req)
                },
            );
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(TokioIo::new(stream), svc);
            if let Err(e) = conn.await {
                log::debug!("HTTP connection from {peer}: {e}");
            }
        });
    }
}

/// The `Authorization: Bearer` value of a request ("" without one).
pub fn bearer(headers: &HeaderMap) -> &str {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("")
}
