//! This node in the cluster: its name, and the two keys every node derives from the
//! cluster secret (HKDF-SHA256), so the secret itself never crosses the network.
//!
//! * Requests on the node API are signed: `Authorization: EdgefwdNode node=NAME,
//!   ts=UNIX_MS, sig=HEX`, an HMAC-SHA256 over the node, time, method, path and body
//!   digest. A captured request gives no key, goes stale within [`MAX_SKEW`], and
//!   cannot be changed; a node can speak only under the name it signed.
//! * Key material in an answer (a relayed publisher's SRTP keys) is sealed with
//!   AES-256-GCM (random nonce) and bound to what it is for (the associated data:
//!   room, node, publisher), so plain HTTP between nodes carries no usable key. A
//!   private network for the node API (`[cluster] api`) is still the advice.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Result, anyhow};
use aws_lc_rs::{aead, digest, hkdf, hmac};

/// How far a request's time may be from ours (clocks of a cluster agree within this,
/// NTP does much better); a replay of a captured request is refused after it.
pub const MAX_SKEW: Duration = Duration::from_secs(60);

const SCHEME: &str = "EdgefwdNode";

pub struct Identity {
    /// This node's name (checked with [`super::check_name`]).
    pub node: String,
    auth: hmac::Key,
    seal: aead::RandomizedNonceKey,
    /// The ICE password of the nodes' RTT probes (STUN to each other's media port).
    pub probe_pwd: String,
}

/// The ufrag of the nodes' RTT probes: a binding request to this ufrag, signed with
/// [`Identity::probe_pwd`], is answered by any node of the cluster.
pub const PROBE_UFRAG: &str = "edgefwd-probe";

fn derive(secret: &[u8], label: &[u8]) -> [u8; 32] {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"edgefwd cluster v1").extract(secret);
    let mut out = [0u8; 32];
    prk.expand(&[label], hkdf::HKDF_SHA256)
        .and_then(|okm| okm.fill(&mut out))
        .expect("32 bytes is a valid HKDF-SHA256 length");
    out
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Identity {
    pub fn new(node: &str, secret: &str) -> Result<Identity> {
        super::check_name(node)?;
        let seal = aead::RandomizedNonceKey::new(
            &aead::AES_256_GCM,
            &derive(secret.as_bytes(), b"relay keys"),
        )
        .map_err(|_| anyhow!("AES-256-GCM key setup failed"))?;
        Ok(Identity {
            node: node.to_string(),
            auth: hmac::Key::new(
                hmac::HMAC_SHA256,
                &derive(secret.as_bytes(), b"node api requests"),
            ),
            seal,
            probe_pwd: derive(secret.as_bytes(), b"rtt probes")[..16]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
        })
    }

    fn mac(&self, node: &str, ts: u64, method: &str, path: &str, body: &[u8]) -> hmac::Tag {
        let body_digest = digest::digest(&digest::SHA256, body);
        let mut ctx = hmac::Context::with_key(&self.auth);
        for part in [
            node.as_bytes(),
            ts.to_string().as_bytes(),
            method.as_bytes(),
        ] {
            ctx.update(part);
            ctx.update(b"\n");
        }
        ctx.update(path.as_bytes());
        ctx.update(b"\n");
        ctx.update(body_digest.as_ref());
        ctx.sign()
    }

    /// The Authorization header value for a request from this node.
    pub fn sign(&self, method: &str, path: &str, body: &[u8]) -> String {
        self.sign_at(now_ms(), method, path, body)
    }

    fn sign_at(&self, ts: u64, method: &str, path: &str, body: &[u8]) -> String {
        let tag = self.mac(&self.node, ts, method, path, body);
        format!(
            "{SCHEME} node={},ts={ts},sig={}",
            self.node,
            hex::encode(tag.as_ref())
        )
    }

    /// The node that signed this request, or what is wrong with it (for a 401).
    pub fn verify(
        &self,
        authorization: &str,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> Result<String, String> {
        self.verify_at(now_ms(), authorization, method, path, body)
    }

    fn verify_at(
        &self,
        now: u64,
        authorization: &str,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> Result<String, String> {
        let unsigned = || {
            format!(
                "the node API takes requests signed with the cluster secret \
                 (Authorization: {SCHEME} node=NAME,ts=UNIX_MS,sig=HEX), as every edgefwd \
                 node of this version sends them; a bearer secret is not accepted (it would \
                 cross the network)"
            )
        };
        let fields = authorization
            .strip_prefix(SCHEME)
            .and_then(|r| r.strip_prefix(' '))
            .ok_or_else(unsigned)?;
        let (mut node, mut ts, mut sig) = (None, None, None);
        for kv in fields.split(',') {
            match kv.trim().split_once('=') {
                Some(("node", v)) => node = Some(v),
                Some(("ts", v)) => ts = v.parse::<u64>().ok(),
                Some(("sig", v)) => sig = hex::decode(v).ok(),
                _ => {}
            }
        }
        let (Some(node), Some(ts), Some(sig)) = (node, ts, sig) else {
            return Err(unsigned());
        };
        let tag = self.mac(node, ts, method, path, body);
        if aws_lc_rs::constant_time::verify_slices_are_equal(tag.as_ref(), &sig).is_err() {
            return Err(format!(
                "the signature of node {node:?} does not verify: its [cluster] secret is not \
                 this node's (every node of a cluster needs the same secret_file)"
            ));
        }
        if now.abs_diff(ts) > MAX_SKEW.as_millis() as u64 {
            return Err(format!(
                "node {node:?} signed this request {} s away from this node's clock (at most \
                 {} s): a replay, or a clock to fix (run NTP on every node)",
                now.abs_diff(ts) / 1000,
                MAX_SKEW.as_secs()
            ));
        }
        Ok(node.to_string())
    }

    /// `plain` sealed for the nodes of this cluster, bound to `context`: hex of nonce,
    /// ciphertext and tag.
    pub fn seal(&self, context: &str, plain: &[u8]) -> String {
        let mut buf = plain.to_vec();
        let nonce = self
            .seal
            .seal_in_place_append_tag(aead::Aad::from(context.as_bytes()), &mut buf)
            .expect("AES-GCM seals any length we send");
        let mut out = nonce.as_ref().to_vec();
        out.extend_from_slice(&buf);
        hex::encode(out)
    }

    /// What [`Identity::seal`] sealed for the same `context`.
    pub fn open(&self, context: &str, sealed: &str) -> Result<Vec<u8>> {
        let bytes = hex::decode(sealed).map_err(|e| anyhow!("sealed keys are not hex: {e}"))?;
        let n = aead::NONCE_LEN;
        if bytes.len() < n + aead::AES_256_GCM.tag_len() {
            return Err(anyhow!("sealed keys are {} bytes, too short", bytes.len()));
        }
        let nonce = aead::Nonce::try_assume_unique_for_key(&bytes[..n])
            .map_err(|_| anyhow!("bad nonce"))?;
        let mut buf = bytes[n..].to_vec();
        let plain = self
            .seal
            .open_in_place(nonce, aead::Aad::from(context.as_bytes()), &mut buf)
            .map_err(|_| {
                anyhow!(
                    "sealed keys do not open: another cluster secret, or keys meant for \
                     another room, node or publisher"
                )
            })?;
        Ok(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef0123";

    #[test]
    fn a_signed_request_verifies_once_and_only_as_sent() {
        let a = Identity::new("a", SECRET).unwrap();
        let b = Identity::new("b", SECRET).unwrap();
        let h = a.sign_at(1_000_000, "POST", "/node/v1/rooms/r/relay", b"{}");
        assert!(!h.contains(SECRET));
        assert_eq!(
            b.verify_at(1_000_500, &h, "POST", "/node/v1/rooms/r/relay", b"{}"),
            Ok("a".to_string())
        );
        // Another body, path, method, name, or a stale time: refused.
        for (method, path, body) in [
            ("POST", "/node/v1/rooms/r/relay", &b"{ }"[..]),
            ("POST", "/node/v1/rooms/s/relay", b"{}"),
            ("PUT", "/node/v1/rooms/r/relay", b"{}"),
        ] {
            assert!(b.verify_at(1_000_500, &h, method, path, body).is_err());
        }
        let renamed = h.replace("node=a", "node=c");
        let e = b
            .verify_at(1_000_500, &renamed, "POST", "/node/v1/rooms/r/relay", b"{}")
            .unwrap_err();
        assert!(e.contains("does not verify"), "{e}");
        let e = b
            .verify_at(
                1_000_000 + 61_000,
                &h,
                "POST",
                "/node/v1/rooms/r/relay",
                b"{}",
            )
            .unwrap_err();
        assert!(e.contains("replay"), "{e}");
        // Another secret; the old bearer form.
        let other = Identity::new("a", "another-secret-0123456").unwrap();
        let h2 = other.sign_at(1_000_000, "POST", "/p", b"");
        assert!(b.verify_at(1_000_000, &h2, "POST", "/p", b"").is_err());
        let e = b
            .verify_at(1_000_000, &format!("Bearer {SECRET}"), "POST", "/p", b"")
            .unwrap_err();
        assert!(e.contains("signed"), "{e}");
    }

    #[test]
    fn sealed_keys_open_only_for_their_context_and_secret() {
        let a = Identity::new("a", SECRET).unwrap();
        let b = Identity::new("b", SECRET).unwrap();
        let key = [7u8; 30];
        let s = a.seal("room\nb\npub", &key);
        assert!(
            !s.contains(&hex::encode(key)),
            "the key is not in the clear"
        );
        assert_eq!(b.open("room\nb\npub", &s).unwrap(), key);
        assert_ne!(a.seal("room\nb\npub", &key), s, "a fresh nonce each time");
        assert!(b.open("room\nc\npub", &s).is_err());
        let other = Identity::new("b", "another-secret-0123456").unwrap();
        assert!(other.open("room\nb\npub", &s).is_err());
        let mut flipped = hex::decode(&s).unwrap();
        flipped[20] ^= 1;
        assert!(b.open("room\nb\npub", &hex::encode(flipped)).is_err());
    }
}
