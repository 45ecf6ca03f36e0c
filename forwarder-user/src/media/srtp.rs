//! SRTP and SRTCP (RFC 3711, RFC 7714) in place, over aws-lc-rs (AES-NI, CLMUL, SHA-NI).
//!
//! Every packet operation works on the caller's buffer: the fan-out writes a rewritten
//! plaintext copy into its output frame (a socket buffer or an AF_XDP TX frame) and
//! protects it there, with no allocation per packet. webrtc-srtp stays in the tests as
//! an independent reference; `cargo xtask bench srtp` measures both.
//!
//! One [`Context`] is one direction of one DTLS-SRTP association: the receive side checks
//! authentication and replay per SSRC, the send side keeps each SSRC's rollover counter
//! and one SRTCP index.

use std::collections::HashMap;

use aws_lc_rs::{aead, cipher, constant_time, hmac, iv::FixedLength};
use forwarder_common::rtp;

/// The two profiles WebRTC negotiates (RFC 5764, RFC 7714 §14.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Profile {
    AesCm128HmacSha1_80,
    AeadAes128Gcm,
}

impl Profile {
    pub const ALL: [Profile; 2] = [Profile::AeadAes128Gcm, Profile::AesCm128HmacSha1_80];

    /// From the DTLS use_srtp protection profile id.
    pub fn from_dtls(id: u16) -> Option<Profile> {
        match id {
            0x0001 => Some(Profile::AesCm128HmacSha1_80),
            0x0007 => Some(Profile::AeadAes128Gcm),
            _ => None,
        }
    }

    pub fn dtls_id(self) -> u16 {
        match self {
            Profile::AesCm128HmacSha1_80 => 0x0001,
            Profile::AeadAes128Gcm => 0x0007,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Profile::AesCm128HmacSha1_80 => "AES_CM_128_HMAC_SHA1_80",
            Profile::AeadAes128Gcm => "AEAD_AES_128_GCM",
        }
    }

    pub const fn master_key_len(self) -> usize {
        16
    }

    pub const fn master_salt_len(self) -> usize {
        match self {
            Profile::AesCm128HmacSha1_80 => 14,
            Profile::AeadAes128Gcm => 12,
        }
    }

    /// Bytes protect_rtp appends (the auth tag).
    pub const fn rtp_overhead(self) -> usize {
        match self {
            Profile::AesCm128HmacSha1_80 => CM_TAG_LEN,
            Profile::AeadAes128Gcm => GCM_TAG_LEN,
        }
    }

    /// Bytes protect_rtcp appends (E flag + index, and the tag).
    pub const fn rtcp_overhead(self) -> usize {
        self.rtp_overhead() + 4
    }
}

const CM_TAG_LEN: usize = 10;
const GCM_TAG_LEN: usize = 16;
const RTCP_HEADER_LEN: usize = 8;
const E_FLAG: u32 = 0x8000_0000;
/// Receive replay window, in packets: Chromium's own SRTP uses 1024, so reordering
/// within that distance is not mistaken for replay.
pub const REPLAY_WINDOW: u64 = 1024;
/// SSRCs one context tracks (rollover counter and replay window each). A peer holding
/// the keys could otherwise grow this without bound with authenticated random SSRCs.
pub const MAX_STREAMS: usize = 4096;

/// Why a packet was not protected or unprotected. Each is one drop reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("too short for its header and authentication tag")]
    Truncated,
    #[error("authentication failed")]
    Auth,
    #[error("replayed or older than the replay window")]
    Replay,
    #[error("the output buffer has no room for the authentication tag")]
    NoRoom,
    #[error("more than {MAX_STREAMS} SSRCs on one SRTP context")]
    TooManyStreams,
    #[error("master key or salt of the wrong length for the profile")]
    KeyLength,
    #[error("past the indices reserved for this stream (the high-water mark not yet persisted)")]
    Unreserved,
}

/// A master key and salt as DTLS exports them (RFC 5764 §4.2).
#[derive(Clone)]
pub struct MasterKey {
    pub profile: Profile,
    key: [u8; 16],
    salt: [u8; 14],
}

impl std::fmt::Debug for MasterKey {
    // Key material never reaches a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MasterKey({}, <redacted>)", self.profile.name())
    }
}

impl MasterKey {
    pub fn new(profile: Profile, key: &[u8], salt: &[u8]) -> Result<MasterKey, Error> {
        if key.len() != profile.master_key_len() || salt.len() != profile.master_salt_len() {
            return Err(Error::KeyLength);
        }
        let mut m = MasterKey {
            profile,
            key: [0; 16],
            salt: [0; 14],
        };
        m.key.copy_from_slice(key);
        m.salt[..salt.len()].copy_from_slice(salt);
        Ok(m)
    }

    pub fn key(&self) -> &[u8] {
        &self.key
    }

    pub fn salt(&self) -> &[u8] {
        &self.salt[..self.profile.master_salt_len()]
    }
}

/// RFC 3711 §4.3.3 AES-CM PRF with kdr = 0: the salt (14 or, for GCM, 12 bytes, zero
/// padded) with the label at octet 7, times 2^16, as the counter block.
fn kdf(m: &MasterKey, label: u8, out: &mut [u8]) {
    let mut iv = [0u8; 16];
    iv[..14].copy_from_slice(&m.salt);
    iv[7] ^= label;
    out.fill(0);
    let key = cipher::UnboundCipherKey::new(&cipher::AES_128, &m.key).expect("16-byte key");
    cipher::EncryptingKey::ctr(key)
        .expect("AES-128 supports CTR")
        .less_safe_encrypt(out, cipher::EncryptionContext::Iv128(FixedLength::from(iv)))
        .expect("CTR takes any length");
}

/// Session keys of one of SRTP or SRTCP, ready for packets.
// Two per context, never in bulk: boxing the larger variant would only add a
// pointer chase per packet.
#[allow(clippy::large_enum_variant)]
enum Transform {
    Cm {
        ctr: cipher::EncryptingKey,
        auth: hmac::Key,
        salt: [u8; 14],
    },
    Gcm {
        aead: aead::LessSafeKey,
        salt: [u8; 12],
    },
}

impl Transform {
    /// From session keys directly (the RFC test vectors give these).
    fn from_session(profile: Profile, enc: &[u8], salt: &[u8], auth: &[u8]) -> Transform {
        match profile {
            Profile::AesCm128HmacSha1_80 => {
                let key = cipher::UnboundCipherKey::new(&cipher::AES_128, enc).expect("16 bytes");
                Transform::Cm {
                    ctr: cipher::EncryptingKey::ctr(key).expect("AES-128 supports CTR"),
                    auth: hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, auth),
                    salt: salt.try_into().expect("14-byte session salt"),
                }
            }
            Profile::AeadAes128Gcm => Transform::Gcm {
                aead: aead::LessSafeKey::new(
                    aead::UnboundKey::new(&aead::AES_128_GCM, enc).expect("16 bytes"),
                ),
                salt: salt.try_into().expect("12-byte session salt"),
            },
        }
    }

    /// RFC 3711 §4.3.1 labels: 0/1/2 for SRTP, 3/4/5 for SRTCP.
    fn derive(m: &MasterKey, rtcp: bool) -> Transform {
        let base = if rtcp { 3 } else { 0 };
        let (mut enc, mut auth, mut salt) = ([0u8; 16], [0u8; 20], [0u8; 14]);
        let salt_len = m.profile.master_salt_len();
        kdf(m, base, &mut enc);
        kdf(m, base + 2, &mut salt[..salt_len]);
        if m.profile == Profile::AesCm128HmacSha1_80 {
            kdf(m, base + 1, &mut auth);
        }
        Transform::from_session(m.profile, &enc, &salt[..salt_len], &auth)
    }

    /// Encrypts `body` in place (CTR; decryption is the same operation).
    fn cm_crypt(
        ctr: &cipher::EncryptingKey,
        salt: &[u8; 14],
        ssrc: u32,
        index: u64,
        body: &mut [u8],
    ) {
        // IV = (k_s · 2^16) ⊕ (SSRC · 2^64) ⊕ (index · 2^16)  (RFC 3711 §4.1.1)
        let mut iv = [0u8; 16];
        iv[..14].copy_from_slice(salt);
        for (b, x) in iv[4..8].iter_mut().zip(ssrc.to_be_bytes()) {
            *b ^= x;
        }
        for (b, x) in iv[8..14].iter_mut().zip(&index.to_be_bytes()[2..]) {
            *b ^= x;
        }
        ctr.less_safe_encrypt(
            body,
            cipher::EncryptionContext::Iv128(FixedLength::from(iv)),
        )
        .expect("CTR takes any length");
    }

    fn cm_tag(auth: &hmac::Key, parts: &[&[u8]]) -> [u8; CM_TAG_LEN] {
        let mut ctx = hmac::Context::with_key(auth);
        for p in parts {
            ctx.update(p);
        }
        let mut t = [0u8; CM_TAG_LEN];
        t.copy_from_slice(&ctx.sign().as_ref()[..CM_TAG_LEN]);
        t
    }

    /// RFC 7714 §8.1: SRTP's nonce tail, ROC || SEQ.
    fn rtp_tail(roc: u32, seq: u16) -> [u8; 6] {
        let mut t = [0u8; 6];
        t[..4].copy_from_slice(&roc.to_be_bytes());
        t[4..].copy_from_slice(&seq.to_be_bytes());
        t
    }

    /// RFC 7714 §9.1: SRTCP's nonce tail, 00 00 || 0 || index.
    fn rtcp_tail(index: u32) -> [u8; 6] {
        let mut t = [0u8; 6];
        t[2..].copy_from_slice(&index.to_be_bytes());
        t
    }

    /// RFC 7714 §17: SRTCP's AAD, the 8-byte header || E || index.
    fn rtcp_aad(header: &[u8], word: [u8; 4]) -> [u8; RTCP_HEADER_LEN + 4] {
        let mut aad = [0u8; RTCP_HEADER_LEN + 4];
        aad[..RTCP_HEADER_LEN].copy_from_slice(&header[..RTCP_HEADER_LEN]);
        aad[RTCP_HEADER_LEN..].copy_from_slice(&word);
        aad
    }

    /// RFC 7714 §8.1: (00 00 || SSRC || ROC || SEQ) ⊕ salt; §9.1 for SRTCP:
    /// (00 00 || SSRC || 00 00 || 0 || index) ⊕ salt.
    fn gcm_nonce(salt: &[u8; 12], ssrc: u32, tail: [u8; 6]) -> aead::Nonce {
        let mut n = [0u8; 12];
        n[2..6].copy_from_slice(&ssrc.to_be_bytes());
        n[6..12].copy_from_slice(&tail);
        for (b, s) in n.iter_mut().zip(salt) {
            *b ^= s;
        }
        aead::Nonce::assume_unique_for_key(n)
    }
}

/// Highest index seen and the replay bitmap behind it (bit i ↔ index i mod window).
#[derive(Default)]
struct Window {
    started: bool,
    highest: u64,
    bits: [u64; (REPLAY_WINDOW / 64) as usize],
}

impl Window {
    fn check(&self, index: u64) -> Result<(), Error> {
        if !self.started || index > self.highest {
            return Ok(());
        }
        if self.highest - index >= REPLAY_WINDOW {
            return Err(Error::Replay);
        }
        let b = index % REPLAY_WINDOW;
        if self.bits[(b / 64) as usize] & (1 << (b % 64)) != 0 {
            return Err(Error::Replay);
        }
        Ok(())
    }

    fn set(&mut self, index: u64, on: bool) {
        let b = index % REPLAY_WINDOW;
        let (w, m) = ((b / 64) as usize, 1u64 << (b % 64));
        if on {
            self.bits[w] |= m;
        } else {
            self.bits[w] &= !m;
        }
    }

    /// Records an authenticated packet.
    fn accept(&mut self, index: u64) {
        if !self.started || index >= self.highest + REPLAY_WINDOW {
            self.bits = Default::default();
        } else {
            // Forget what the window slides past: slots of the indices now ahead.
            for i in self.highest + 1..=index {
                self.set(i, false);
            }
        }
        if !self.started || index > self.highest {
            self.highest = index;
            self.started = true;
        }
        self.set(index, true);
    }
}

/// RFC 3711 Appendix A: the packet index of `seq` given the highest index so far;
/// None for a packet from before the stream's first rollover period.
fn estimate_index(highest: u64, seq: u16) -> Option<u64> {
    let roc = highest >> 16;
    let s_l = (highest & 0xffff) as u16;
    let v = if s_l < 0x8000 {
        if seq > s_l && seq - s_l > 0x8000 {
            roc.checked_sub(1)?
        } else {
            roc
        }
    } else if s_l - 0x8000 > seq {
        roc + 1
    } else {
        roc
    };
    Some((v << 16) | seq as u64)
}

/// One direction of one SRTP association.
pub struct Context {
    profile: Profile,
    rtp: Transform,
    rtcp: Transform,
    /// Per SSRC: RTP index window (receive) or highest index (send).
    rtp_streams: HashMap<u32, Window>,
    /// Per SSRC: SRTCP index window (receive only).
    rtcp_streams: HashMap<u32, Window>,
    /// Next SRTCP index we send (31 bits).
    srtcp_index: u32,
    /// Send side of a session that survives restarts: the indices it may use.
    reserved: Option<Box<reserve::Reserved>>,
}

impl Context {
    pub fn new(m: &MasterKey) -> Context {
        Context {
            profile: m.profile,
            rtp: Transform::derive(m, false),
            rtcp: Transform::derive(m, true),
            rtp_streams: HashMap::new(),
            rtcp_streams: HashMap::new(),
            srtcp_index: 0,
            reserved: None,
        }
    }

    /// A context on session keys given directly (test vectors), for SRTP and SRTCP alike.
    pub fn from_session_keys(profile: Profile, enc: &[u8], salt: &[u8], auth: &[u8]) -> Context {
        Context {
            profile,
            rtp: Transform::from_session(profile, enc, salt, auth),
            rtcp: Transform::from_session(profile, enc, salt, auth),
            rtp_streams: HashMap::new(),
            rtcp_streams: HashMap::new(),
            srtcp_index: 0,
            reserved: None,
        }
    }

    pub fn profile(&self) -> Profile {
        self.profile
    }

    fn stream(map: &mut HashMap<u32, Window>, ssrc: u32) -> Result<&mut Window, Error> {
        if map.len() >= MAX_STREAMS && !map.contains_key(&ssrc) {
            return Err(Error::TooManyStreams);
        }
        Ok(map.entry(ssrc).or_default())
    }

    /// Protects the RTP packet `buf[..len]` in place and appends its tag; returns the
    /// SRTP length. `buf` must have room for `profile().rtp_overhead()` more bytes.
    pub fn protect_rtp(&mut self, buf: &mut [u8], len: usize) -> Result<usize, Error> {
        let tag_len = self.profile.rtp_overhead();
        if buf.len() < len + tag_len {
            return Err(Error::NoRoom);
        }
        let hlen = rtp::header_len(&buf[..len]).map_err(|_| Error::Truncated)?;
        let (seq, ssrc) = rtp_ids(buf);
        let w = Self::stream(&mut self.rtp_streams, ssrc)?;
        let index = if w.started {
            estimate_index(w.highest, seq).unwrap_or(seq as u64)
        } else {
            seq as u64
        };
        if let Some(r) = &self.reserved {
            r.allows_rtp(ssrc, index)?;
        }
        if !w.started || index > w.highest {
            w.highest = index;
            w.started = true;
        }
        let roc = (index >> 16) as u32;
        match &self.rtp {
            Transform::Cm { ctr, auth, salt } => {
                Transform::cm_crypt(ctr, salt, ssrc, index, &mut buf[hlen..len]);
                let tag = Transform::cm_tag(auth, &[&buf[..len], &roc.to_be_bytes()]);
                buf[len..len + tag_len].copy_from_slice(&tag);
            }
            Transform::Gcm { aead, salt } => {
                let nonce = Transform::gcm_nonce(salt, ssrc, Transform::rtp_tail(roc, seq));
                let (head, rest) = buf.split_at_mut(hlen);
                let tag = aead
                    .seal_in_place_separate_tag(
                        nonce,
                        aead::Aad::from(&*head),
                        &mut rest[..len - hlen],
                    )
                    .map_err(|_| Error::NoRoom)?;
                buf[len..len + tag_len].copy_from_slice(tag.as_ref());
            }
        }
        Ok(len + tag_len)
    }

    /// Authenticates, replay-checks and decrypts the SRTP packet `buf` in place; returns
    /// the RTP length. Nothing about the stream changes unless the packet authenticates.
    pub fn unprotect_rtp(&mut self, buf: &mut [u8]) -> Result<usize, Error> {
        let tag_len = self.profile.rtp_overhead();
        if buf.len() < rtp::RTP_FIXED_HEADER_LEN + tag_len {
            return Err(Error::Truncated);
        }
        let len = buf.len() - tag_len;
        let hlen = rtp::header_len(&buf[..len]).map_err(|_| Error::Truncated)?;
        let (seq, ssrc) = rtp_ids(buf);
        // One stream lookup per packet: the window found here is updated below.
        let Context {
            rtp: transform,
            rtp_streams,
            ..
        } = self;
        let known = rtp_streams.get_mut(&ssrc);
        let index = match known.as_deref() {
            Some(w) if w.started => estimate_index(w.highest, seq).ok_or(Error::Replay)?,
            _ => seq as u64,
        };
        if let Some(w) = known.as_deref() {
            w.check(index)?;
        }
        let roc = (index >> 16) as u32;
        match transform {
            Transform::Cm { ctr, auth, salt } => {
                let tag = Transform::cm_tag(auth, &[&buf[..len], &roc.to_be_bytes()]);
                constant_time::verify_slices_are_equal(&tag, &buf[len..])
                    .map_err(|_| Error::Auth)?;
                Transform::cm_crypt(ctr, salt, ssrc, index, &mut buf[hlen..len]);
            }
            Transform::Gcm { aead, salt } => {
                let nonce = Transform::gcm_nonce(salt, ssrc, Transform::rtp_tail(roc, seq));
                let (head, rest) = buf.split_at_mut(hlen);
                aead.open_in_place(nonce, aead::Aad::from(&*head), rest)
                    .map_err(|_| Error::Auth)?;
            }
        }
        match known {
            Some(w) => w.accept(index),
            None => Self::stream(rtp_streams, ssrc)?.accept(index),
        }
        Ok(len)
    }

    /// Protects the RTCP compound packet `buf[..len]` in place (always encrypted, E = 1);
    /// returns the SRTCP length. `buf` needs `profile().rtcp_overhead()` bytes of room.
    pub fn protect_rtcp(&mut self, buf: &mut [u8], len: usize) -> Result<usize, Error> {
        let over = self.profile.rtcp_overhead();
        if len < RTCP_HEADER_LEN {
            return Err(Error::Truncated);
        }
        if buf.len() < len + over {
            return Err(Error::NoRoom);
        }
        let ssrc = u32::from_be_bytes(buf[4..8].try_into().expect("4 bytes"));
        let index = self.srtcp_index;
        if let Some(r) = &self.reserved {
            r.allows_rtcp(index)?;
        }
        self.srtcp_index = (index + 1) & !E_FLAG;
        let word = (E_FLAG | index).to_be_bytes();
        match &self.rtcp {
            Transform::Cm { ctr, auth, salt } => {
                Transform::cm_crypt(
                    ctr,
                    salt,
                    ssrc,
                    index as u64,
                    &mut buf[RTCP_HEADER_LEN..len],
                );
                buf[len..len + 4].copy_from_slice(&word);
                let tag = Transform::cm_tag(auth, &[&buf[..len + 4]]);
                buf[len + 4..len + over].copy_from_slice(&tag);
            }
            Transform::Gcm { aead, salt } => {
                let nonce = Transform::gcm_nonce(salt, ssrc, Transform::rtcp_tail(index));
                let aad = Transform::rtcp_aad(buf, word);
                let tag = aead
                    .seal_in_place_separate_tag(
                        nonce,
                        aead::Aad::from(aad),
                        &mut buf[RTCP_HEADER_LEN..len],
                    )
                    .map_err(|_| Error::NoRoom)?;
                buf[len..len + GCM_TAG_LEN].copy_from_slice(tag.as_ref());
                buf[len + GCM_TAG_LEN..len + over].copy_from_slice(&word);
            }
        }
        Ok(len + over)
    }

    /// Authenticates, replay-checks and decrypts the SRTCP packet `buf` in place;
    /// returns the RTCP length. Unencrypted SRTCP (E = 0) is refused as unauthenticated:
    /// WebRTC peers always encrypt.
    pub fn unprotect_rtcp(&mut self, buf: &mut [u8]) -> Result<usize, Error> {
        let over = self.profile.rtcp_overhead();
        if buf.len() < RTCP_HEADER_LEN + over {
            return Err(Error::Truncated);
        }
        let len = buf.len() - over;
        let ssrc = u32::from_be_bytes(buf[4..8].try_into().expect("4 bytes"));
        let word_at = match self.profile {
            Profile::AesCm128HmacSha1_80 => len,
            Profile::AeadAes128Gcm => buf.len() - 4,
        };
        let word = u32::from_be_bytes(buf[word_at..word_at + 4].try_into().expect("4 bytes"));
        if word & E_FLAG == 0 {
            return Err(Error::Auth);
        }
        let index = word & !E_FLAG;
        if let Some(w) = self.rtcp_streams.get(&ssrc) {
            w.check(index as u64)?;
        }
        match &self.rtcp {
            Transform::Cm { ctr, auth, salt } => {
                let tag = Transform::cm_tag(auth, &[&buf[..len + 4]]);
                constant_time::verify_slices_are_equal(&tag, &buf[len + 4..])
                    .map_err(|_| Error::Auth)?;
                Transform::cm_crypt(
                    ctr,
                    salt,
                    ssrc,
                    index as u64,
                    &mut buf[RTCP_HEADER_LEN..len],
                );
            }
            Transform::Gcm { aead, salt } => {
                let nonce = Transform::gcm_nonce(salt, ssrc, Transform::rtcp_tail(index));
                let aad = Transform::rtcp_aad(buf, word.to_be_bytes());
                let end = buf.len() - 4;
                aead.open_in_place(nonce, aead::Aad::from(aad), &mut buf[RTCP_HEADER_LEN..end])
                    .map_err(|_| Error::Auth)?;
            }
        }
        Self::stream(&mut self.rtcp_streams, ssrc)?.accept(index as u64);
        Ok(len)
    }
}

fn rtp_ids(buf: &[u8]) -> (u16, u32) {
    (
        u16::from_be_bytes([buf[2], buf[3]]),
        u32::from_be_bytes([buf[8], buf[9], buf[10], buf[11]]),
    )
}

mod reserve;
pub use reserve::Marks;

#[cfg(test)]
mod tests;
