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
        }
    }

    pub fn profile(&self) -> Profile {
        self.profile
    }

    /// Sets the next SRTCP index this context sends (tests; a restarted session).
    pub fn set_srtcp_index(&mut self, index: u32) {
        self.srtcp_index = index & !E_FLAG;
    }

    /// Per receive SSRC, the highest packet index authenticated (ROC << 16 | seq).
    pub fn rtp_highest(&self) -> Vec<(u32, u64)> {
        self.rtp_streams
            .iter()
            .filter(|(_, w)| w.started)
            .map(|(s, w)| (*s, w.highest))
            .collect()
    }

    /// Continues a receive stream another context has been authenticating, from its
    /// highest index: the rollover counter carries over, and packets at or below it
    /// within the replay window are still taken once (this context never saw them).
    pub fn resume_rtp(&mut self, ssrc: u32, highest: u64) {
        if self.rtp_streams.len() >= MAX_STREAMS && !self.rtp_streams.contains_key(&ssrc) {
            return;
        }
        let w = self.rtp_streams.entry(ssrc).or_default();
        *w = Window {
            started: true,
            highest,
            bits: Default::default(),
        };
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

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng, rngs::StdRng};
    use webrtc_srtp::{context::Context as Reference, protection_profile::ProtectionProfile};

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        hex::decode(s).unwrap()
    }

    /// RFC 3711 Appendix B.3.
    #[test]
    fn rfc3711_b3_key_derivation() {
        let m = MasterKey::new(
            Profile::AesCm128HmacSha1_80,
            &hex("E1F97A0D3E018BE0D64FA32C06DE4139"),
            &hex("0EC675AD498AFEEBB6960B3AABE6"),
        )
        .unwrap();
        let (mut enc, mut salt, mut auth) = ([0u8; 16], [0u8; 14], [0u8; 20]);
        kdf(&m, 0, &mut enc);
        kdf(&m, 2, &mut salt);
        kdf(&m, 1, &mut auth);
        assert_eq!(enc.to_vec(), hex("C61E7A93744F39EE10734AFE3FF7A087"));
        assert_eq!(salt.to_vec(), hex("30CBBC08863D8C85D49DB34A9AE1"));
        assert_eq!(
            auth.to_vec(),
            hex("CEBE321F6FF7716B6FD4AB49AF256A156D38BAA4")
        );
    }

    /// RFC 3711 Appendix B.2: the AES-CM keystream for SSRC 0, index 0, over 2^16 blocks
    /// (the counter runs through the low 16 bits of the IV).
    #[test]
    fn rfc3711_b2_keystream() {
        let key = cipher::EncryptingKey::ctr(
            cipher::UnboundCipherKey::new(
                &cipher::AES_128,
                &hex("2B7E151628AED2A6ABF7158809CF4F3C"),
            )
            .unwrap(),
        )
        .unwrap();
        let salt: [u8; 14] = hex("F0F1F2F3F4F5F6F7F8F9FAFBFCFD").try_into().unwrap();
        let mut ks = vec![0u8; 16 * 0xff02];
        Transform::cm_crypt(&key, &salt, 0, 0, &mut ks);
        let block = |i: usize| ks[i * 16..(i + 1) * 16].to_vec();
        assert_eq!(block(0), hex("E03EAD0935C95E80E166B16DD92B4EB4"));
        assert_eq!(block(1), hex("D23513162B02D0F72A43A2FE4A5F97AB"));
        assert_eq!(block(2), hex("41E95B3BB0A2E8DD477901E4FCA894C0"));
        assert_eq!(block(0xfeff), hex("EC8CDF7398607CB0F2D21675EA9EA1E4"));
        assert_eq!(block(0xff00), hex("362B7C3C6773516318A077D7FC5073AE"));
        assert_eq!(block(0xff01), hex("6A2CC3787889374FBEB4C81B17BA6C44"));
    }

    const GCM_KEY: &str = "000102030405060708090a0b0c0d0e0f";
    const GCM_SALT: &str = "517569642070726f2071756f";
    const RFC7714_RTP: &str =
        "8040f17b8041f8d35501a0b2 47616c6c696120657374206f6d6e697320646976697361
        20696e207061727465732074726573";
    const RFC7714_SRTP: &str =
        "8040f17b8041f8d35501a0b2 f24de3a3fb34de6cacba861c9d7e4bcabe633bd50d294e6f
        42a5f47a51c7d19b36de3adf8833 899d7f27beb16a9152cf765ee4390cce";
    const RFC7714_RTCP: &str = "81c8000d4d617273 4e5450314e545032525450200000042a0000e9304c756e61
        deadbeefdeadbeefdeadbeefdeadbeefdeadbeef";
    const RFC7714_SRTCP: &str =
        "81c8000d4d617273 63e94885dcdab67ca727d7662f6b7e997ff5c0f76c06f32dc676a5f1730d6fda
        4ce09b4686303ded0bb9275bc84aa458 96cf4d2fc5abf87245d9eade 800005d4";

    fn gcm_vectors() -> Context {
        Context::from_session_keys(Profile::AeadAes128Gcm, &hex(GCM_KEY), &hex(GCM_SALT), &[])
    }

    /// RFC 7714 §16.1 (SRTP) and §17.1 (SRTCP), both ways, and a flipped bit refused.
    #[test]
    fn rfc7714_vectors() {
        let (plain, want) = (hex(RFC7714_RTP), hex(RFC7714_SRTP));
        let mut buf = plain.clone();
        buf.resize(plain.len() + 16, 0);
        assert_eq!(
            gcm_vectors().protect_rtp(&mut buf, plain.len()),
            Ok(want.len())
        );
        assert_eq!(buf, want);
        let mut rx = gcm_vectors();
        let mut tampered = want.clone();
        tampered[20] ^= 1;
        assert_eq!(rx.unprotect_rtp(&mut tampered), Err(Error::Auth));
        let mut got = want.clone();
        assert_eq!(rx.unprotect_rtp(&mut got), Ok(plain.len()));
        assert_eq!(&got[..plain.len()], &plain[..]);
        let mut again = want.clone();
        assert_eq!(rx.unprotect_rtp(&mut again), Err(Error::Replay));

        let (plain, want) = (hex(RFC7714_RTCP), hex(RFC7714_SRTCP));
        let mut buf = plain.clone();
        buf.resize(plain.len() + 20, 0);
        let mut tx = gcm_vectors();
        tx.set_srtcp_index(0x5d4);
        assert_eq!(tx.protect_rtcp(&mut buf, plain.len()), Ok(want.len()));
        assert_eq!(buf, want);
        let mut rx = gcm_vectors();
        let mut got = want.clone();
        assert_eq!(rx.unprotect_rtcp(&mut got), Ok(plain.len()));
        assert_eq!(&got[..plain.len()], &plain[..]);
        let mut again = want.clone();
        assert_eq!(rx.unprotect_rtcp(&mut again), Err(Error::Replay));
    }

    fn reference(profile: Profile, m: &MasterKey) -> Reference {
        let p = match profile {
            Profile::AesCm128HmacSha1_80 => ProtectionProfile::Aes128CmHmacSha1_80,
            Profile::AeadAes128Gcm => ProtectionProfile::AeadAes128Gcm,
        };
        Reference::new(m.key(), m.salt(), p, None, None).unwrap()
    }

    fn random_rtp(rng: &mut StdRng, seq: u16, ssrc: u32) -> Vec<u8> {
        let csrcs = rng.gen_range(0..3u8);
        let ext = rng.gen_bool(0.5);
        let mut p = vec![
            0x80 | csrcs | if ext { 0x10 } else { 0 },
            rng.gen_range(96..128),
        ];
        p.extend_from_slice(&seq.to_be_bytes());
        p.extend_from_slice(&rng.r#gen::<u32>().to_be_bytes());
        p.extend_from_slice(&ssrc.to_be_bytes());
        for _ in 0..csrcs {
            p.extend_from_slice(&rng.r#gen::<u32>().to_be_bytes());
        }
        if ext {
            // Well-formed one-byte extensions (RFC 8285): webrtc-srtp re-parses them.
            let mut body = Vec::new();
            for _ in 0..rng.gen_range(1..3) {
                let n = rng.gen_range(1..=4u8);
                body.push((rng.gen_range(1..=14u8) << 4) | (n - 1));
                body.extend((0..n).map(|_| rng.r#gen::<u8>()));
            }
            while body.len() % 4 != 0 {
                body.push(0);
            }
            p.extend_from_slice(&[0xbe, 0xde]);
            p.extend_from_slice(&((body.len() / 4) as u16).to_be_bytes());
            p.extend_from_slice(&body);
        }
        let n = rng.gen_range(0..1300);
        p.extend((0..n).map(|_| rng.r#gen::<u8>()));
        p
    }

    /// Both directions against webrtc-srtp on random packets (CSRCs, extensions, sizes),
    /// through a sequence rollover so the ROC is 1 for the second half, both profiles.
    #[test]
    fn interoperates_with_webrtc_srtp_across_a_rollover() {
        for profile in Profile::ALL {
            let mut rng = StdRng::seed_from_u64(profile.dtls_id() as u64);
            let key: Vec<u8> = (0..16).map(|_| rng.r#gen()).collect();
            let salt: Vec<u8> = (0..profile.master_salt_len())
                .map(|_| rng.r#gen())
                .collect();
            let m = MasterKey::new(profile, &key, &salt).unwrap();
            let (mut ours_tx, mut ours_rx) = (Context::new(&m), Context::new(&m));
            let (mut ref_tx, mut ref_rx) = (reference(profile, &m), reference(profile, &m));
            let ssrc = rng.r#gen::<u32>();
            for i in 0..400u32 {
                let seq = (65_336 + i) as u16; // 200 before the wrap, 200 after
                let plain = random_rtp(&mut rng, seq, ssrc);
                // ours → webrtc-srtp
                let mut buf = plain.clone();
                buf.resize(plain.len() + profile.rtp_overhead(), 0);
                let n = ours_tx.protect_rtp(&mut buf, plain.len()).unwrap();
                let theirs = ref_tx.encrypt_rtp(&plain).unwrap();
                assert_eq!(
                    &buf[..n],
                    &theirs[..],
                    "{profile:?} seq {seq}: same ciphertext"
                );
                assert_eq!(&ref_rx.decrypt_rtp(&buf[..n]).unwrap()[..], &plain[..]);
                // webrtc-srtp → ours
                let mut wire = theirs.to_vec();
                let n = ours_rx.unprotect_rtp(&mut wire).unwrap();
                assert_eq!(&wire[..n], &plain[..], "{profile:?} seq {seq}");
            }
            assert!(
                ours_rx.rtp_streams[&ssrc].highest >> 16 == 1,
                "the ROC moved to 1"
            );
            for i in 0..50u32 {
                let mut rtcp = vec![0x81, 201, 0, 7];
                rtcp.extend_from_slice(&ssrc.to_be_bytes());
                rtcp.extend((0..24).map(|_| rng.r#gen::<u8>()));
                rtcp[4 + 4 + 4..4 + 4 + 8].copy_from_slice(&i.to_be_bytes());
                let mut buf = rtcp.clone();
                buf.resize(rtcp.len() + profile.rtcp_overhead(), 0);
                let n = ours_tx.protect_rtcp(&mut buf, rtcp.len()).unwrap();
                assert_eq!(&ref_rx.decrypt_rtcp(&buf[..n]).unwrap()[..], &rtcp[..]);
                let mut wire = ref_tx.encrypt_rtcp(&rtcp).unwrap().to_vec();
                let n = ours_rx.unprotect_rtcp(&mut wire).unwrap();
                assert_eq!(&wire[..n], &rtcp[..]);
            }
        }
    }

    /// Reordering inside the window is accepted once; too old, duplicated, truncated or
    /// forged packets are refused with their reason and change nothing.
    #[test]
    fn replay_window_reordering_and_refusals() {
        for profile in Profile::ALL {
            let m = MasterKey::new(profile, &[7; 16], &vec![9; profile.master_salt_len()]).unwrap();
            let (mut tx, mut rx) = (Context::new(&m), Context::new(&m));
            let mut rng = StdRng::seed_from_u64(1);
            let wire: Vec<Vec<u8>> = (0..1100u16)
                .map(|seq| {
                    let plain = random_rtp(&mut rng, seq.wrapping_add(65_000), 42);
                    let mut b = plain.clone();
                    b.resize(plain.len() + profile.rtp_overhead(), 0);
                    let n = tx.protect_rtp(&mut b, plain.len()).unwrap();
                    b.truncate(n);
                    b
                })
                .collect();
            let mut try_rx = |i: usize| rx.unprotect_rtp(&mut wire[i].clone());
            assert!(try_rx(5).is_ok());
            assert!(try_rx(3).is_ok(), "reordered, inside the window");
            assert_eq!(try_rx(3), Err(Error::Replay));
            assert!(try_rx(1090).is_ok(), "across the rollover");
            assert_eq!(try_rx(10), Err(Error::Replay), "older than the window");
            assert!(try_rx(1000).is_ok(), "reordered across the rollover");
            let mut forged = wire[1095].clone();
            let last = forged.len() - 1;
            forged[last] ^= 0x40;
            assert_eq!(rx.unprotect_rtp(&mut forged), Err(Error::Auth));
            assert!(
                rx.unprotect_rtp(&mut wire[1095].clone()).is_ok(),
                "the forgery changed nothing"
            );
            assert_eq!(
                rx.unprotect_rtp(&mut wire[1096][..20].to_vec()),
                Err(Error::Truncated)
            );
            assert_eq!(
                rx.unprotect_rtcp(&mut [0x80, 201, 0, 1, 0, 0, 0, 1]),
                Err(Error::Truncated)
            );
        }
    }

    #[test]
    fn wrong_key_lengths_are_refused() {
        assert_eq!(
            MasterKey::new(Profile::AeadAes128Gcm, &[0; 16], &[0; 14]).err(),
            Some(Error::KeyLength)
        );
        assert_eq!(
            MasterKey::new(Profile::AesCm128HmacSha1_80, &[0; 15], &[0; 14]).err(),
            Some(Error::KeyLength)
        );
        let m = MasterKey::new(Profile::AeadAes128Gcm, &[1; 16], &[2; 12]).unwrap();
        assert!(!format!("{m:?}").contains("01"), "no key bytes in Debug");
        let mut small = [0x80u8, 96, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 5];
        assert_eq!(
            Context::new(&m).protect_rtp(&mut small, 13),
            Err(Error::NoRoom)
        );
    }
}
