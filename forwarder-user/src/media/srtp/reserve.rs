//! Send indices reserved ahead of use, so that a process that restarts with the same
//! keys never reuses one.
//!
//! An SRTP index under one key must never carry two different packets: with
//! AEAD_AES_128_GCM the index is the nonce, and a repeated nonce gives away the
//! keystream and the authentication key (RFC 7714 §8.3). A restarted daemon that
//! resumes a session knows only what was persisted before the old process ended, and
//! a crash can come at any packet. So a send context that is to survive its process
//! uses only indices its owner has *reserved*: the owner persists a high-water mark
//! per SSRC (and for SRTCP) and only then raises the context's reservation to it; the
//! context refuses a packet past its reservation ([`Error::Unreserved`]) rather than
//! send under an index no record covers. After a crash the new process starts every
//! stream just past its persisted mark ([`Marks::resume_into`]): the receiver sees a
//! sequence jump, never a replay.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::{Context, E_FLAG, Error, MAX_STREAMS, Window};

/// What a send context may use: per SSRC the highest RTP index, and the highest
/// SRTCP index (None: no SRTCP yet).
#[derive(Default)]
pub(super) struct Reserved {
    /// One lookup per packet: an SSRC's whole allowance.
    rtp: HashMap<u32, Span>,
    rtcp: Option<u32>,
}

/// The RTP indices one SSRC may use: above `floor`, up to `up_to`.
#[derive(Default, Clone, Copy)]
struct Span {
    /// Resumed here: the index it resumed after. Anything at or below it may have
    /// been sent by an earlier process (a late packet renumbered into the past, an
    /// answer to a NACK): refused, never sent twice.
    floor: Option<u64>,
    /// The highest reserved (None: nothing yet).
    up_to: Option<u64>,
}

impl Reserved {
    pub(super) fn allows_rtp(&self, ssrc: u32, index: u64) -> Result<(), Error> {
        match self.rtp.get(&ssrc) {
            Some(Span {
                floor,
                up_to: Some(up_to),
            }) if index <= *up_to && floor.is_none_or(|f| index > f) => Ok(()),
            _ => Err(Error::Unreserved),
        }
    }

    pub(super) fn allows_rtcp(&self, index: u32) -> Result<(), Error> {
        match self.rtcp {
            Some(up_to) if index <= up_to => Ok(()),
            _ => Err(Error::Unreserved),
        }
    }
}

/// Per-stream indices of a send context: either where it stands (the highest index
/// sent) or, persisted, how far it may go (the highest reserved).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marks {
    /// (SSRC, highest RTP index: rollover counter << 16 | sequence number).
    pub rtp: Vec<(u32, u64)>,
    /// SRTCP's highest index (None: none sent, or none reserved).
    pub rtcp: Option<u32>,
}

impl Marks {
    /// Persisted reservations put to use in a new context on the same keys: each
    /// stream resumes just past its mark, and only what is reserved anew may be sent.
    pub fn resume_into(&self, ctx: &mut Context) {
        ctx.require_reservations();
        for &(ssrc, up_to) in &self.rtp {
            ctx.start_tx(ssrc, up_to);
        }
        ctx.set_srtcp_index(self.rtcp.map_or(0, |r| r.wrapping_add(1)));
    }
}

/// Where a context's streams stand, read and resumed (a cascade hand-over, a restart).
impl Context {
    /// Sets the next SRTCP index this context sends (tests; a restarted session).
    pub fn set_srtcp_index(&mut self, index: u32) {
        self.srtcp_index = index & !E_FLAG;
    }

    /// Per receive SSRC, the highest packet index authenticated (ROC << 16 | seq).
    pub fn rtp_highest(&self) -> Vec<(u32, u64)> {
        highest(&self.rtp_streams)
    }

    /// Per receive SSRC, the highest SRTCP index authenticated.
    pub fn rtcp_highest(&self) -> Vec<(u32, u64)> {
        highest(&self.rtcp_streams)
    }

    /// Continues a receive stream another context has been authenticating, from its
    /// highest index: the rollover counter carries over, and packets at or below it
    /// within the replay window are still taken once (this context never saw them).
    pub fn resume_rtp(&mut self, ssrc: u32, highest: u64) {
        resume(&mut self.rtp_streams, ssrc, highest);
    }

    /// As [`Context::resume_rtp`], for a sender's SRTCP: a restarted process refuses
    /// what is older than the replay window, as the one before it did.
    pub fn resume_rtcp(&mut self, ssrc: u32, highest: u64) {
        resume(&mut self.rtcp_streams, ssrc, highest);
    }
}

fn highest(streams: &HashMap<u32, Window>) -> Vec<(u32, u64)> {
    streams
        .iter()
        .filter(|(_, w)| w.started)
        .map(|(s, w)| (*s, w.highest))
        .collect()
}

fn resume(streams: &mut HashMap<u32, Window>, ssrc: u32, highest: u64) {
    if streams.len() >= MAX_STREAMS && !streams.contains_key(&ssrc) {
        return;
    }
    *streams.entry(ssrc).or_default() = Window {
        started: true,
        highest,
        bits: Default::default(),
    };
}

impl Context {
    /// From now on this context sends only under indices reserved with
    /// [`Context::reserve`] (nothing is reserved yet).
    pub fn require_reservations(&mut self) {
        if self.reserved.is_none() {
            self.reserved = Some(Box::default());
        }
    }

    /// Send stream `ssrc` continues after index `highest`: its next packet with
    /// sequence number `highest as u16 + 1` is index `highest + 1`, whatever the
    /// rollover counter; with reservations, nothing at or below `highest` is sent.
    pub fn start_tx(&mut self, ssrc: u32, highest: u64) {
        self.resume_rtp(ssrc, highest);
        if let Some(r) = self.reserved.as_mut() {
            r.rtp.entry(ssrc).or_default().floor = Some(highest);
        }
    }

    /// Raises what may be sent (never lowers it): RTP per SSRC up to its index, and
    /// SRTCP up to `rtcp`. The caller has persisted these first.
    pub fn reserve(&mut self, rtp: &[(u32, u64)], rtcp: Option<u32>) {
        let Some(r) = self.reserved.as_mut() else {
            return;
        };
        for &(ssrc, up_to) in rtp {
            let span = r.rtp.entry(ssrc).or_default();
            span.up_to = Some(span.up_to.map_or(up_to, |x| x.max(up_to)));
        }
        if let Some(up_to) = rtcp {
            let up_to = up_to & !E_FLAG;
            r.rtcp = Some(r.rtcp.map_or(up_to, |x| x.max(up_to)));
        }
    }

    /// Sends under any index again: no record will ever resume these keys (the owner
    /// removed it), so there is nothing a later process could reuse.
    pub fn release(&mut self) {
        self.reserved = None;
    }

    /// Nothing more may be sent: the reservation comes down to what was used, so a
    /// process that hands its sessions over can persist the exact marks and the next
    /// one resumes one past them (no jump).
    pub fn seal(&mut self) -> Marks {
        let used = self.tx_marks();
        self.reserved = Some(Box::new(Reserved {
            rtp: used
                .rtp
                .iter()
                .map(|&(ssrc, used)| {
                    let floor = self.reserved.as_ref().and_then(|r| r.rtp.get(&ssrc)?.floor);
                    (
                        ssrc,
                        Span {
                            floor,
                            up_to: Some(used),
                        },
                    )
                })
                .collect(),
            rtcp: used.rtcp,
        }));
        used
    }

    /// Where this send context stands: per SSRC the highest index sent, and SRTCP's.
    pub fn tx_marks(&self) -> Marks {
        let mut rtp = self.rtp_highest();
        rtp.sort_unstable();
        Marks {
            rtp,
            rtcp: self.srtcp_index.checked_sub(1),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::media::srtp::{MasterKey, Profile};

    const SSRC: u32 = 0x1234_5678;
    /// Indices reserved ahead per grant, and when a grant is due (this many left).
    const AHEAD: u64 = 64;

    /// One step of a sender's life, in the order the daemon does them: send an RTP
    /// packet or an RTCP report, persist new marks, hand the persisted marks to the
    /// send context.
    #[derive(Clone, Copy, Debug)]
    enum Step {
        Rtp,
        Rtcp,
        Persist,
        Grant,
    }

    fn rtp(seq: u16) -> Vec<u8> {
        let mut p = vec![0x80, 96, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0];
        p[2..4].copy_from_slice(&seq.to_be_bytes());
        p[8..12].copy_from_slice(&SSRC.to_be_bytes());
        p.extend_from_slice(&[0xab; 40]);
        p
    }

    /// A sender with its persisted store: what the daemon's writer and a down-track
    /// do to one SSRC, crashable between any two steps.
    struct Life {
        ctx: Context,
        /// The next sequence number the down-track numbers (its munger's job).
        next: u64,
        store: Marks,
        rtp_sent: Vec<u64>,
        rtcp_sent: Vec<u32>,
        refused: usize,
    }

    impl Life {
        fn start(key: &MasterKey, first: u64) -> Life {
            let mut ctx = Context::new(key);
            ctx.require_reservations();
            let store = Marks {
                rtp: vec![(SSRC, first + AHEAD)],
                rtcp: Some(AHEAD as u32),
            };
            ctx.reserve(&store.rtp, store.rtcp);
            // A fresh stream starts just before `first`.
            ctx.start_tx(SSRC, first - 1);
            Life {
                ctx,
                next: first,
                store,
                rtp_sent: vec![],
                rtcp_sent: vec![],
                refused: 0,
            }
        }

        /// After a crash: the store as the old life left it, in a new context.
        fn recover(key: &MasterKey, store: Marks) -> Life {
            let mut ctx = Context::new(key);
            store.resume_into(&mut ctx);
            let next = store.rtp[0].1 + 1;
            Life {
                ctx,
                next,
                store,
                rtp_sent: vec![],
                rtcp_sent: vec![],
                refused: 0,
            }
        }

        fn step(&mut self, s: Step, rx: &mut Context) {
            match s {
                Step::Rtp => {
                    let plain = rtp(self.next as u16);
                    let mut buf = plain.clone();
                    buf.resize(plain.len() + 16, 0);
                    match self.ctx.protect_rtp(&mut buf, plain.len()) {
                        Ok(n) => {
                            let index = self.ctx.tx_marks().rtp[0].1;
                            assert_eq!(index, self.next, "the index follows the numbering");
                            self.rtp_sent.push(index);
                            self.next += 1;
                            // The receiver follows across the jump (its ROC too).
                            assert_eq!(rx.unprotect_rtp(&mut buf[..n]), Ok(plain.len()));
                        }
                        Err(Error::Unreserved) => self.refused += 1,
                        Err(e) => panic!("{e}"),
                    }
                }
                Step::Rtcp => {
                    let mut buf = vec![0x81, 201, 0, 1, 0, 0, 0, 9];
                    let len = buf.len();
                    buf.resize(len + 30, 0);
                    let index = self.ctx.srtcp_index;
                    match self.ctx.protect_rtcp(&mut buf, len) {
                        Ok(_) => self.rtcp_sent.push(index),
                        Err(Error::Unreserved) => self.refused += 1,
                        Err(e) => panic!("{e}"),
                    }
                }
                Step::Persist => {
                    let used = self.ctx.tx_marks();
                    let high = used.rtp.first().map_or(self.next, |x| x.1);
                    if high + AHEAD / 2 >= self.store.rtp[0].1 {
                        self.store.rtp[0].1 = high + AHEAD;
                    }
                    let r = used.rtcp.unwrap_or(0);
                    if r as u64 + AHEAD / 2 >= self.store.rtcp.unwrap() as u64 {
                        self.store.rtcp = Some(r + AHEAD as u32);
                    }
                }
                Step::Grant => self.ctx.reserve(&self.store.rtp, self.store.rtcp),
            }
        }
    }

    /// A schedule: mostly media, a report now and then, the writer every few
    /// packets, its grant sometimes a little later.
    fn schedule(n: usize) -> Vec<Step> {
        (0..n)
            .map(|i| match i % 11 {
                3 => Step::Rtcp,
                5 | 9 if i % 3 == 0 => Step::Persist,
                7 | 10 => Step::Grant,
                _ => Step::Rtp,
            })
            .collect()
    }

    /// Crash after every step of a sender's life, recover from what was persisted,
    /// go on: no RTP or SRTCP index is ever used twice under the key, and the
    /// receiver authenticates every packet of both lives (across the jump and a
    /// rollover: the stream starts just below 2^16).
    #[test]
    fn an_index_never_repeats_across_a_crash_at_any_point() {
        for profile in [Profile::AeadAes128Gcm, Profile::AesCm128HmacSha1_80] {
            let key =
                MasterKey::new(profile, &[7; 16], &vec![3; profile.master_salt_len()]).unwrap();
            let steps = schedule(400);
            for crash in 0..steps.len() {
                let mut rx = Context::new(&key);
                let mut first = Life::start(&key, 0xffff - 150);
                for s in &steps[..crash] {
                    first.step(*s, &mut rx);
                }
                let mut second = Life::recover(&key, first.store.clone());
                for s in &steps {
                    second.step(*s, &mut rx);
                }
                let rtp: Vec<u64> = first
                    .rtp_sent
                    .iter()
                    .chain(&second.rtp_sent)
                    .copied()
                    .collect();
                let unique: HashSet<u64> = rtp.iter().copied().collect();
                assert_eq!(
                    unique.len(),
                    rtp.len(),
                    "{profile:?}, crash after step {crash}: an RTP index twice"
                );
                let rtcp: Vec<u32> = first
                    .rtcp_sent
                    .iter()
                    .chain(&second.rtcp_sent)
                    .copied()
                    .collect();
                let unique: HashSet<u32> = rtcp.iter().copied().collect();
                assert_eq!(
                    unique.len(),
                    rtcp.len(),
                    "{profile:?}, crash after step {crash}: an SRTCP index twice"
                );
                // Progress in both lives: grants keep up with this schedule.
                assert!(second.rtp_sent.len() > 250, "{}", second.rtp_sent.len());
                // The jump the receiver sees is within one reservation.
                if let (Some(a), Some(b)) = (first.rtp_sent.last(), second.rtp_sent.first()) {
                    assert!(b - a <= AHEAD + 1, "jump {a} -> {b}");
                }
            }
        }
    }

    #[test]
    fn a_context_that_requires_reservations_refuses_past_them() {
        let key = MasterKey::new(Profile::AeadAes128Gcm, &[1; 16], &[2; 12]).unwrap();
        let mut ctx = Context::new(&key);
        ctx.require_reservations();
        let mut buf = rtp(10);
        let len = buf.len();
        buf.resize(len + 16, 0);
        assert_eq!(
            ctx.protect_rtp(&mut buf.clone(), len),
            Err(Error::Unreserved)
        );
        ctx.reserve(&[(SSRC, 10)], None);
        assert_eq!(ctx.protect_rtp(&mut buf.clone(), len), Ok(len + 16));
        let mut next = rtp(11);
        next.resize(len + 16, 0);
        assert_eq!(ctx.protect_rtp(&mut next, len), Err(Error::Unreserved));
        // Reservations only grow.
        ctx.reserve(&[(SSRC, 5)], Some(0));
        assert_eq!(ctx.protect_rtp(&mut next, len), Err(Error::Unreserved));
        let mut rtcp = vec![0x81, 201, 0, 1, 0, 0, 0, 9];
        rtcp.resize(8 + 30, 0);
        assert!(ctx.protect_rtcp(&mut rtcp.clone(), 8).is_ok());
        assert_eq!(ctx.protect_rtcp(&mut rtcp, 8), Err(Error::Unreserved));
        assert_eq!(
            ctx.tx_marks(),
            Marks {
                rtp: vec![(SSRC, 10)],
                rtcp: Some(0)
            }
        );
        // Sealed: nothing more, whatever was reserved beyond.
        ctx.reserve(&[(SSRC, 100)], Some(100));
        assert_eq!(ctx.seal().rtp, vec![(SSRC, 10)]);
        assert_eq!(ctx.protect_rtp(&mut next, len), Err(Error::Unreserved));
    }
}
