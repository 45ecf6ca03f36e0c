//! WebRTC control plane: WHIP/WHEP signaling, ICE-lite, DTLS-SRTP, RTCP, and a
//! userspace relay that re-encrypts per subscriber.

pub mod dtls;
pub mod feedback;
pub mod http;
pub mod ice;
pub mod sdp;
pub mod sfu;

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use serde::Deserialize;

/// `[webrtc]` in the config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebrtcConfig {
    /// WHIP/WHEP and the built-in page.
    pub http: SocketAddr,
    /// The one UDP port all peers' media uses.
    pub media: SocketAddr,
    /// Addresses put in the SDP answer as host candidates. Default: the media
    /// address, which then must not be a wildcard.
    #[serde(default)]
    pub candidates: Vec<IpAddr>,
    /// If set, WHIP/WHEP POSTs need `Authorization: Bearer <token>`.
    pub token: Option<String>,
    /// Seconds without a valid ICE check before a session is dropped (RFC 7675).
    #[serde(default = "default_consent")]
    pub consent_timeout: u64,
}

fn default_consent() -> u64 {
    30
}

impl WebrtcConfig {
    pub fn candidates(&self) -> Result<Vec<SocketAddr>> {
        if self.candidates.is_empty() {
            if self.media.ip().is_unspecified() {
                bail!(
                    "[webrtc] media = {} listens on every address, so the answer needs to know which to announce: set candidates = [\"<public IP>\"]",
                    self.media
                );
            }
            return Ok(vec![self.media]);
        }
        Ok(self
            .candidates
            .iter()
            .map(|ip| SocketAddr::new(*ip, self.media.port()))
            .collect())
    }
}

/// Binds the media socket and the HTTP listener (so errors surface at start-up and
/// clients can connect once this returns), then returns the future that serves.
pub async fn start(cfg: WebrtcConfig) -> Result<impl std::future::Future<Output = Result<()>>> {
    let candidates = cfg.candidates()?;
    let socket = std::net::UdpSocket::bind(cfg.media).with_context(|| {
        format!(
            "binding the WebRTC media port {} (in use? pick another with [webrtc] media)",
            cfg.media
        )
    })?;
    let listener = tokio::net::TcpListener::bind(cfg.http)
        .await
        .with_context(|| {
            format!(
                "binding WHIP/WHEP HTTP on {} (in use? pick another with [webrtc] http)",
                cfg.http
            )
        })?;
    let sfu = sfu::Sfu::new(
        socket,
        candidates.clone(),
        Duration::from_secs(cfg.consent_timeout),
    )?;
    log::info!(
        "WebRTC: WHIP/WHEP on http://{}/ , media on udp {} (candidates {:?})",
        cfg.http,
        cfg.media,
        candidates
    );
    Ok(async move {
        let ticker = {
            let sfu = sfu.clone();
            tokio::spawn(async move {
                let mut every = tokio::time::interval(Duration::from_secs(1));
                loop {
                    every.tick().await;
                    sfu.tick();
                }
            })
        };
        let media = tokio::spawn(sfu.clone().run_socket());
        let app = http::router(Arc::new(http::Api {
            sfu,
            token: cfg.token.clone(),
        }));
        let res = tokio::select! {
            r = axum::serve(listener, app) => r.context("WHIP/WHEP HTTP server"),
            r = media => r.context("media task")?.context("media socket"),
        };
        ticker.abort();
        res
    })
}
