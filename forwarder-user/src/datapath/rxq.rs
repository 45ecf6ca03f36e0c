//! Datagrams the kernel dropped because a socket's receive queue was full: invisible to
//! the process unless asked for. With `SO_RXQ_OVFL` on, every `recvmsg` carries the
//! socket's cumulative drop count (`sk_drops`) as a control message, so the count
//! costs no extra syscall; [`observe`] folds the per-socket totals into one counter.
//! The count travels with the datagram queued after the drops, so drops show up when
//! the next datagram gets in (at once under overload, which is when they matter).

use std::{
    io, mem,
    net::SocketAddr,
    os::fd::{AsRawFd, BorrowedFd},
    sync::atomic::{AtomicU64, Ordering},
};

/// Control-message buffer for one `SO_RXQ_OVFL` message (CMSG_SPACE(4) is 24 on
/// 64-bit Linux); u64 elements keep it aligned for `cmsghdr`.
pub type Control = [u64; 4];

/// Sets an int-valued `SOL_SOCKET` option (the buffer sizes, `SO_RXQ_OVFL`).
pub fn set_int(fd: BorrowedFd<'_>, opt: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: a valid socket fd and a c_int option value of the size passed.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&value as *const libc::c_int).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Asks the kernel to report the socket's drop count with every datagram.
pub fn enable(fd: BorrowedFd<'_>) -> io::Result<()> {
    set_int(fd, libc::SO_RXQ_OVFL, 1)
}

/// The drop count carried by a received message's control data; the kernel leaves
/// it out while the count is 0.
pub fn read(hdr: &libc::msghdr) -> Option<u32> {
    // SAFETY: `hdr` was filled by recvmsg/recvmmsg, so msg_control/msg_controllen
    // describe control messages the kernel wrote; the CMSG_* macros stay inside them.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(hdr);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SO_RXQ_OVFL {
                return Some(std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<u32>()));
            }
            c = libc::CMSG_NXTHDR(hdr, c);
        }
    }
    None
}

/// One `recvmsg` on a non-blocking socket: length, source and the drop count.
pub fn recv_from(
    fd: BorrowedFd<'_>,
    buf: &mut [u8],
    control: &mut Control,
) -> io::Result<(usize, SocketAddr, Option<u32>)> {
    // SAFETY: sockaddr_storage and msghdr are plain C structs; all-zero is valid.
    let mut addr: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: as above.
    let mut hdr: libc::msghdr = unsafe { mem::zeroed() };
    hdr.msg_name = (&mut addr as *mut libc::sockaddr_storage).cast();
    hdr.msg_namelen = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    hdr.msg_iov = &mut iov;
    hdr.msg_iovlen = 1;
    hdr.msg_control = control.as_mut_ptr().cast();
    hdr.msg_controllen = mem::size_of::<Control>();
    // SAFETY: every pointer in `hdr` points at a live buffer of the length given.
    let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut hdr, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let from = crate::datapath::userpath::sockaddr_to(&addr)
        .ok_or_else(|| io::Error::other("datagram from a non-IP address"))?;
    Ok((n as usize, from, read(&hdr)))
}

/// Folds a socket's cumulative count into `total`: each socket's reader keeps the
/// last value it saw (`last`, from 0) and adds the difference.
pub fn observe(total: &AtomicU64, last: &mut u32, now: u32) {
    // sk_drops is a wrapping 32-bit counter.
    let d = now.wrapping_sub(*last);
    if d != 0 {
        total.fetch_add(d as u64, Ordering::Relaxed);
        *last = now;
    }
}

#[cfg(test)]
mod tests {
    use std::{net::UdpSocket, os::fd::AsFd};

    use super::*;

    /// A socket with a small receive buffer, flooded while nobody reads: the count
    /// the kernel reports plus what was read is exactly what was sent.
    #[test]
    fn counts_what_the_full_queue_dropped() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        set_int(rx.as_fd(), libc::SO_RCVBUF, 4096).unwrap();
        enable(rx.as_fd()).unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        const SENT: u64 = 500;
        for i in 0..SENT {
            tx.send_to(&(i as u32).to_be_bytes(), rx.local_addr().unwrap())
                .unwrap();
        }
        let (mut read_n, mut last, total) = (0u64, 0u32, AtomicU64::new(0));
        let mut buf = [0u8; 64];
        let mut control = Control::default();
        let mut drain = |read_n: &mut u64, last: &mut u32| loop {
            match recv_from(rx.as_fd(), &mut buf, &mut control) {
                Ok((n, from, drops)) => {
                    assert_eq!(from, tx.local_addr().unwrap());
                    assert_eq!(n, 4);
                    if let Some(d) = drops {
                        observe(&total, last, d);
                    }
                    *read_n += 1;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("recvmsg: {e}"),
            }
        };
        drain(&mut read_n, &mut last);
        // The drops after the last queued datagram ride on the next one.
        tx.send_to(b"last", rx.local_addr().unwrap()).unwrap();
        drain(&mut read_n, &mut last);
        assert!(
            total.load(Ordering::Relaxed) > 0,
            "a 4 KiB queue must overflow with {SENT} datagrams"
        );
        assert_eq!(
            read_n + total.load(Ordering::Relaxed),
            SENT + 1,
            "read {read_n}, dropped {}",
            total.load(Ordering::Relaxed)
        );
    }
}
