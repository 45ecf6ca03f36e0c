//! Serving HTTP with limits every listener of the daemon needs: a cap on open
//! connections (in total and per client address), a header timeout and a request
//! timeout (body read and answer), so idle, greedy or slow clients cannot hold its file
//! descriptors. Every listener (WHIP/WHEP, admin, node API, `--metrics`) serves
//! through [`serve`] with its own [`ConnLimits`]: what one suffers, the others do not,
//! and together they stay below the open-file limit ([`fd_limit`], [`RESERVED_FDS`]).

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

/// File descriptors kept for everything but HTTP connections: sockets, maps, AF_XDP,
/// logs, and a margin for the moment a limit is reached.
pub const RESERVED_FDS: usize = 256;

/// The admin listener's and the `--metrics` listener's caps (total, per source):
/// operators and scrapers are few.
pub const ADMIN_CONNECTIONS: (usize, usize) = (64, 32);
/// The node API's caps: nodes are few, each makes a call per room per second.
pub const NODE_API_CONNECTIONS: (usize, usize) = (256, 64);

/// The process's open-file limit (soft), if it can be read.
pub fn fd_limit() -> Option<usize> {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct we pass and nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) } != 0 {
        return None;
    }
    Some(usize::try_from(l.rlim_cur).unwrap_or(usize::MAX))
}

/// The public listener's connection cap: `configured`, or less when the open-file
/// limit leaves less after [`RESERVED_FDS`] and the other listeners' caps (`others`);
/// with a note saying so. An error when it leaves almost nothing.
pub fn public_cap(configured: usize, others: usize) -> anyhow::Result<(usize, Option<String>)> {
    let Some(limit) = fd_limit() else {
        return Ok((configured, None));
    };
    let room = limit.saturating_sub(RESERVED_FDS + others);
    if room < 16 {
        anyhow::bail!(
            "the open-file limit ({limit}) leaves {room} descriptors for WHIP/WHEP connections \
             after {RESERVED_FDS} reserved and {others} for the other listeners; raise it \
             (LimitNOFILE= in the service unit, or ulimit -n)"
        );
    }
    if configured <= room {
        return Ok((configured, None));
    }
    Ok((
        room,
        Some(format!(
            "[webrtc.limits] http_max_connections = {configured} is more than the open-file \
             limit ({limit}) leaves after {RESERVED_FDS} reserved and {others} for the other \
             listeners: using {room}, so the daemon never runs out of descriptors (raise \
             LimitNOFILE= for more)"
        )),
    ))
}

/// Open HTTP connections, in total and per client address, and how long a client may
/// take.
pub struct ConnLimits {
    max: usize,
    max_per_source: usize,
    header_timeout: Duration,
    /// From the end of the headers to the answer's head: the body and the handler.
    request_timeout: Duration,
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// Which connection cap refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    Total,
    PerSource,
}

/// One admitted connection; gives its place back on drop.
pub struct ConnSlot {
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
            request_timeout: header_timeout,
            open: Mutex::new((0, HashMap::new())),
        }
    }

    /// The same with another request timeout (body read and answer).
    pub fn request_timeout(mut self, t: Duration) -> ConnLimits {
        self.request_timeout = t;
        self
    }

    /// A place for a connection from `ip`, or which cap is full (any listener that
    /// caps connections in total and per client address: HTTP, ICE-TCP).
    pub fn take(self: &Arc<Self>, ip: IpAddr) -> Result<ConnSlot, Full> {
        let mut open = self.open.lock().unwrap();
        if open.0 >= self.max {
            return Err(Full::Total);
        }
        let n = open.1.entry(ip).or_default();
        if *n >= self.max_per_source {
            return Err(Full::PerSource);
        }
        *n += 1;
        open.0 += 1;
        Ok(ConnSlot {
            limits: self.clone(),
            ip,
        })
    }

    /// A place for an HTTP connection from `ip`, or what to tell the client.
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<ConnSlot, &'static str> {
        self.take(ip).map_err(|f| match f {
            Full::Total => {
                "the server has as many HTTP connections open as it allows (http_max_connections); retry shortly"
            }
            Full::PerSource => {
                "your address has as many HTTP connections open as one client may (http_max_connections_per_source); close some or reuse them"
            }
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
        let (header_timeout, request_timeout) = (limits.header_timeout, limits.request_timeout);
        tokio::spawn(async move {
            let _slot = slot;
            let svc = hyper::service::service_fn(
                move |mut req: hyper::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(ConnectInfo(peer));
                    // A body sent slowly (or a handler stuck) holds a connection only
                    // this long; a streamed answer (events) is not cut: its head is out.
                    let answer = tower::ServiceExt::oneshot(app.clone(), req);
                    async move {
                        match tokio::time::timeout(request_timeout, answer).await {
                            Ok(r) => r,
                            Err(_) => Ok(too_slow(request_timeout)),
                        }
                    }
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

/// 408 for a request whose body (or answer) took longer than `t`; the connection
/// closes with it.
fn too_slow(t: Duration) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    (
        axum::http::StatusCode::REQUEST_TIMEOUT,
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
            (header::CONNECTION, "close"),
        ],
        format!(
            "the request took longer than {} s to arrive (its body) or to be answered; \
             send it at once\n",
            t.as_secs()
        ),
    )
        .into_response()
}

/// The `Authorization: Bearer` value of a request ("" without one).
pub fn bearer(headers: &HeaderMap) -> &str {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("")
}
