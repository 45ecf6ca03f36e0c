//! The socket data path's [`Transmit`]: the fallback where AF_XDP is not available,
//! and the baseline the AF_XDP path is measured against; and the AF_XDP engines' way
//! to peers on this host's own media address.

use std::net::SocketAddr;

use crate::media::Transmit;

/// One `sendto` per copy, from one reused buffer.
pub struct SocketTx<'a> {
    pub sock: &'a std::net::UdpSocket,
    pub buf: &'a mut [u8],
}

impl Transmit for SocketTx<'_> {
    fn transmit(
        &mut self,
        to: SocketAddr,
        fill: &mut dyn FnMut(&mut [u8]) -> Option<usize>,
    ) -> bool {
        let Some(n) = fill(self.buf) else {
            return false;
        };
        self.sock.send_to(&self.buf[..n], to).is_ok()
    }
}

/// An AF_XDP engine's copies to a peer on this host's own media address (an ICE-TCP
/// leg, webrtc/tcp.rs): XDP never sees such a peer (its datagrams go over `lo`) and
/// the TX ring cannot deliver to this host, so they take the media socket.
pub struct LocalOut {
    sock: std::net::UdpSocket,
    buf: Vec<u8>,
}

impl LocalOut {
    pub fn new(sock: std::net::UdpSocket) -> LocalOut {
        LocalOut {
            sock,
            buf: vec![0u8; forwarder_common::rtp::MAX_RTP_LEN + 64],
        }
    }
}

impl Transmit for LocalOut {
    fn transmit(
        &mut self,
        to: SocketAddr,
        fill: &mut dyn FnMut(&mut [u8]) -> Option<usize>,
    ) -> bool {
        SocketTx {
            sock: &self.sock,
            buf: &mut self.buf,
        }
        .transmit(to, fill)
    }
}
