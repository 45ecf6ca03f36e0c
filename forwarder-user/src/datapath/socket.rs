//! The socket data path's [`Transmit`]: the fallback where AF_XDP is not available,
//! and the baseline the AF_XDP path is measured against.

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
