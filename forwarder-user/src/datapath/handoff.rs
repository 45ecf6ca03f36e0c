//! Datagrams one AF_XDP worker hands another. XDP can only steer a frame to the
//! socket of the queue it arrived on, and the NIC picks that queue by its own flow
//! hash, while each room's state lives in one worker's engine: a frame that arrived
//! on another worker's queue is copied into the owner's inbox and the owner is woken.
//! Buffers go round (the owner returns them spare): no allocation once warm.

use std::{
    net::SocketAddr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
};

use crossbeam_queue::ArrayQueue;

/// Datagrams waiting per inbox: at 64-frame batches, a few batches of slack.
pub const INBOX: usize = 1024;

pub struct Handoff {
    pub from: SocketAddr,
    /// Its session, as the giver's router found it (the owner looks it up no more).
    pub session: u32,
    /// The sender's next-hop MAC as the frame showed it: the owner's copies go there.
    pub mac: [u8; 6],
    pub buf: Vec<u8>,
}

/// One worker's inbox: datagrams for its engine, and the eventfd that wakes it.
pub struct Inbox {
    queue: ArrayQueue<Handoff>,
    spare: ArrayQueue<Vec<u8>>,
    wake: OwnedFd,
}

impl Inbox {
    pub fn new() -> std::io::Result<Inbox> {
        // SAFETY: eventfd takes no pointers; the result is checked before use.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Inbox {
            queue: ArrayQueue::new(INBOX),
            spare: ArrayQueue::new(INBOX),
            // SAFETY: fd is a new eventfd that nothing else owns.
            wake: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Copies `pkt` in; false when the inbox is full (the datagram is dropped: the
    /// caller counts it). The owner is not woken here: [`Inbox::wake`] once per batch.
    pub fn give(&self, from: SocketAddr, session: u32, mac: [u8; 6], pkt: &[u8]) -> bool {
        let mut buf = self.spare.pop().unwrap_or_default();
        buf.clear();
        buf.extend_from_slice(pkt);
        match self.queue.push(Handoff {
            from,
            session,
            mac,
            buf,
        }) {
            Ok(()) => true,
            Err(h) => {
                let _ = self.spare.push(h.buf);
                false
            }
        }
    }

    /// Hands up to `max` waiting datagrams to `f`, oldest first (a flow's order is
    /// kept); returns how many. Bounded: a giver that refills the inbox as fast as it
    /// is taken must not keep its owner here, away from its own queue, its TX flush
    /// and its timers (the owner comes back for the rest after its batch).
    pub fn take(&self, max: usize, mut f: impl FnMut(SocketAddr, u32, [u8; 6], &mut [u8])) -> u64 {
        let mut n = 0;
        while n < max as u64 {
            let Some(mut h) = self.queue.pop() else { break };
            f(h.from, h.session, h.mac, &mut h.buf);
            let _ = self.spare.push(h.buf);
            n += 1;
        }
        n
    }

    /// Whether datagrams wait (the owner's next wait must not sleep).
    pub fn pending(&self) -> bool {
        !self.queue.is_empty()
    }

    pub fn wake(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live buffer to our own eventfd; a full
        // counter (EAGAIN) means a wake-up is pending anyway.
        unsafe { libc::write(self.wake.as_raw_fd(), one.as_ptr().cast(), 8) };
    }

    /// Resets the wake-up (the worker then looks at everything pending).
    pub fn clear_wake(&self) {
        let mut v = [0u8; 8];
        // SAFETY: reads at most 8 bytes into a live buffer from our own non-blocking
        // eventfd; EAGAIN (nothing pending) is fine.
        unsafe { libc::read(self.wake.as_raw_fd(), v.as_mut_ptr().cast(), 8) };
    }

    pub fn fd(&self) -> RawFd {
        self.wake.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_full_is_refused_and_buffers_go_round() {
        let inbox = Inbox::new().unwrap();
        let from: SocketAddr = "192.0.2.1:5000".parse().unwrap();
        let mac = [2, 0, 0, 0, 0, 1];
        for i in 0..INBOX {
            assert!(inbox.give(from, i as u32, mac, &(i as u32).to_be_bytes()));
        }
        assert!(
            !inbox.give(from, 0, mac, b"one too many"),
            "a full inbox refuses"
        );
        inbox.wake();
        crate::datapath::xsk::wait_readable(&[inbox.fd()], 1000);
        inbox.clear_wake();
        let mut next = 0u32;
        // At most a batch at a time, in order across batches.
        let mut taken = 0;
        while inbox.pending() {
            let n = inbox.take(64, |f, id, m, b| {
                assert_eq!((f, id, m, &*b), (from, next, mac, &next.to_be_bytes()[..]));
                next += 1;
            });
            assert!(n <= 64);
            taken += n;
        }
        assert_eq!(taken, INBOX as u64);
        // The spare buffers are used again, with the new contents only.
        assert!(inbox.give(from, 0, mac, b"again"));
        inbox.take(64, |_, _, _, b| assert_eq!(b, b"again"));
        assert_eq!(inbox.take(64, |_, _, _, _| panic!("empty")), 0);
    }
}
