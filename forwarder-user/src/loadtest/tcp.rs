//! The load test's ICE-TCP client side: a UDP socket on loopback bridged to one TCP
//! connection to the SFU's passive candidate (RFC 4571 framing both ways), so the
//! client's UDP code (ICE, DTLS, SRTP, media) runs unchanged over TCP. The bridge's
//! hop costs the load tool, not the SFU.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use tokio::io::AsyncWriteExt as _;
use tokio::net::{TcpStream, UdpSocket};

use crate::webrtc::tcp::{MAX_FRAME, read_frame};

/// Connects to `server` and returns the bridge's UDP address: datagrams sent there
/// go down the connection framed, frames from it come back from there. The bridge
/// ends when the connection does.
pub async fn bridge(server: SocketAddr) -> std::io::Result<SocketAddr> {
    let stream = TcpStream::connect(server).await?;
    stream.set_nodelay(true)?;
    let local: SocketAddr = if server.is_ipv4() {
        (Ipv4Addr::LOCALHOST, 0).into()
    } else {
        (Ipv6Addr::LOCALHOST, 0).into()
    };
    let udp = UdpSocket::bind(local).await?;
    crate::webrtc::tcp::grow_receive_buffer(&udp);
    let udp = Arc::new(udp);
    let at = udp.local_addr()?;
    let (mut rd, mut wr) = stream.into_split();
    // The client's address: learned from its first datagram (it sends first: ICE).
    let (client_tx, mut client_rx) = tokio::sync::watch::channel(None::<SocketAddr>);
    let up = {
        let udp = udp.clone();
        tokio::spawn(async move {
            let mut b = vec![0u8; 2048];
            while let Ok((n, from)) = udp.recv_from(&mut b).await {
                if n == 0 || n > MAX_FRAME {
                    continue;
                }
                if client_tx.borrow().is_none() {
                    let _ = client_tx.send(Some(from));
                }
                let mut framed = Vec::with_capacity(n + 2);
                framed.extend_from_slice(&(n as u16).to_be_bytes());
                framed.extend_from_slice(&b[..n]);
                if wr.write_all(&framed).await.is_err() {
                    break;
                }
            }
        })
    };
    tokio::spawn(async move {
        let Ok(client) = client_rx
            .wait_for(|c| c.is_some())
            .await
            .map(|c| c.unwrap())
        else {
            return;
        };
        let mut buf = [0u8; MAX_FRAME];
        while let Ok(Some(n)) = read_frame(&mut rd, &mut buf).await {
            let _ = udp.send_to(&buf[..n], client).await;
        }
        up.abort();
    });
    Ok(at)
}
