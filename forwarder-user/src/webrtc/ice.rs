//! ICE-lite (RFC 8445 §2.5): we never send checks, we answer them. A valid check
//! (USERNAME ours:theirs, MESSAGE-INTEGRITY with our ice-pwd, FINGERPRINT) proves the
//! 5-tuple belongs to the session and refreshes consent (RFC 7675).
//!
//! Our ice-pwd is derived from the ufrag with a key kept on disk ([`Passwords`]), so
//! after a restart the daemon can still authenticate a check of a session it no
//! longer has, and refuse it with an error response the client believes (a browser
//! drops error responses without our MESSAGE-INTEGRITY): the client's pair fails at
//! once and it rejoins, instead of sitting "connected" with no media until its own
//! consent timeout.

use std::{net::SocketAddr, path::Path};

use anyhow::{Context as _, Result};
use aws_lc_rs::hmac;

use stun::{
    attributes::{ATTR_USE_CANDIDATE, ATTR_USERNAME},
    fingerprint::FINGERPRINT,
    integrity::MessageIntegrity,
    message::{BINDING_REQUEST, BINDING_SUCCESS, Message, Setter},
    textattrs::TextAttribute,
    xoraddr::XorMappedAddress,
};

/// A binding request, parsed but not yet authenticated.
pub struct Check {
    msg: Message,
    /// Our ufrag: the part of USERNAME before the colon; finds the session.
    pub local_ufrag: String,
    pub remote_ufrag: String,
    /// The controlling agent nominates this pair (USE-CANDIDATE).
    pub use_candidate: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CheckError {
    #[error("not a STUN message")]
    NotStun,
    #[error("STUN message that is not a binding request")]
    NotBindingRequest,
    #[error("binding request without a USERNAME of the form ours:theirs")]
    BadUsername,
    #[error("MESSAGE-INTEGRITY does not verify with the session's ice-pwd")]
    BadIntegrity,
    #[error("FINGERPRINT missing or wrong")]
    BadFingerprint,
}

pub fn parse_check(buf: &[u8]) -> Result<Check, CheckError> {
    if !stun::message::is_message(buf) {
        return Err(CheckError::NotStun);
    }
    let mut msg = Message::new();
    msg.unmarshal_binary(buf).map_err(|_| CheckError::NotStun)?;
    if msg.typ != BINDING_REQUEST {
        return Err(CheckError::NotBindingRequest);
    }
    let user =
        TextAttribute::get_from_as(&msg, ATTR_USERNAME).map_err(|_| CheckError::BadUsername)?;
    let (local, remote) = user.text.split_once(':').ok_or(CheckError::BadUsername)?;
    let (local_ufrag, remote_ufrag) = (local.to_string(), remote.to_string());
    let use_candidate = msg.contains(ATTR_USE_CANDIDATE);
    Ok(Check {
        msg,
        local_ufrag,
        remote_ufrag,
        use_candidate,
    })
}

/// Our ICE passwords: HMAC-SHA256 of the ufrag under a key that outlives the
/// process (`[webrtc] state_dir`/ice.key).
pub struct Passwords(hmac::Key);

impl Passwords {
    /// The key in `path`, made (32 random bytes, mode 0600) when there is none.
    pub fn load_or_create(path: &Path) -> Result<Passwords> {
        let key = match std::fs::read(path) {
            Ok(k) if k.len() >= 32 => k,
            Ok(k) => anyhow::bail!(
                "{} holds {} bytes, not an ICE key of 32: remove it (a new one is made)",
                path.display(),
                k.len()
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                use std::os::unix::fs::OpenOptionsExt as _;
                let k: [u8; 32] = rand::random();
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)
                        .with_context(|| format!("making {}", dir.display()))?;
                }
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
                    .with_context(|| format!("writing the ICE key {}", path.display()))?;
                std::io::Write::write_all(&mut f, &k)?;
                k.to_vec()
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        Ok(Passwords(hmac::Key::new(hmac::HMAC_SHA256, &key)))
    }

    /// A key for this process only: sessions of an earlier process cannot be refused.
    pub fn ephemeral() -> Passwords {
        Passwords(hmac::Key::new(
            hmac::HMAC_SHA256,
            &rand::random::<[u8; 32]>(),
        ))
    }

    /// The ice-pwd of ufrag `ufrag`: 32 hex characters (128 bits).
    pub fn for_ufrag(&self, ufrag: &str) -> String {
        let tag = hmac::sign(&self.0, ufrag.as_bytes());
        hex::encode(&tag.as_ref()[..16])
    }
}

impl Check {
    /// Checks FINGERPRINT and our MESSAGE-INTEGRITY; the request for the response.
    fn authenticate(mut self, local_pwd: &str) -> Result<Message, CheckError> {
        FINGERPRINT
            .check(&self.msg)
            .map_err(|_| CheckError::BadFingerprint)?;
        MessageIntegrity::new_short_term_integrity(local_pwd.to_string())
            .check(&mut self.msg)
            .map_err(|_| CheckError::BadIntegrity)?;
        Ok(self.msg)
    }

    /// The response to `req`: its transaction ID, `attrs`, our MESSAGE-INTEGRITY and a
    /// FINGERPRINT.
    fn respond(
        req: Message,
        local_pwd: &str,
        attrs: Vec<Box<dyn Setter>>,
    ) -> Result<Vec<u8>, CheckError> {
        let mut setters: Vec<Box<dyn Setter>> = vec![Box::new(req)];
        setters.extend(attrs);
        setters.push(Box::new(MessageIntegrity::new_short_term_integrity(
            local_pwd.to_string(),
        )));
        setters.push(Box::new(FINGERPRINT));
        let mut resp = Message::new();
        resp.build(&setters).map_err(|_| CheckError::NotStun)?;
        Ok(resp.raw)
    }

    /// Authenticates the check with our password and builds the success response
    /// carrying the address the request came from.
    pub fn answer(self, local_pwd: &str, from: SocketAddr) -> Result<Vec<u8>, CheckError> {
        let req = self.authenticate(local_pwd)?;
        let attrs: Vec<Box<dyn Setter>> = vec![
            Box::new(BINDING_SUCCESS),
            Box::new(XorMappedAddress {
                ip: from.ip(),
                port: from.port(),
            }),
        ];
        Self::respond(req, local_pwd, attrs)
    }

    /// Authenticates the check with our password and builds an error response (400,
    /// signed and fingerprinted, so the client acts on it) for a session this node no
    /// longer has: Chromium fails the candidate pair on a 400 (it retries on 401).
    pub fn refuse(self, local_pwd: &str) -> Result<Vec<u8>, CheckError> {
        let req = self.authenticate(local_pwd)?;
        let attrs: Vec<Box<dyn Setter>> = vec![
            Box::new(stun::message::BINDING_ERROR),
            Box::new(stun::error_code::ErrorCodeAttribute {
                code: stun::error_code::CODE_BAD_REQUEST,
                reason: b"session unknown here (the server restarted): rejoin".to_vec(),
            }),
        ];
        Self::respond(req, local_pwd, attrs)
    }
}

/// A connectivity check as the controlling agent sends it (RFC 8445 §7.2.2): USERNAME
/// theirs:ours, PRIORITY, ICE-CONTROLLING, USE-CANDIDATE when `nominate`, signed with
/// the peer's ice-pwd. The load-test clients' ICE, and the tests'.
pub fn binding_request(user: &str, pwd: &str, nominate: bool) -> Vec<u8> {
    let mut m = Message::new();
    let mut setters: Vec<Box<dyn Setter>> = vec![
        Box::new(BINDING_REQUEST),
        Box::new(stun::agent::TransactionId::new()),
        Box::new(TextAttribute::new(ATTR_USERNAME, user.into())),
    ];
    if nominate {
        setters.push(Box::new(stun::attributes::RawAttribute {
            typ: ATTR_USE_CANDIDATE,
            length: 0,
            value: vec![],
        }));
    }
    setters.push(Box::new(stun::attributes::RawAttribute {
        typ: stun::attributes::ATTR_PRIORITY,
        length: 4,
        value: 0x6e7f1effu32.to_be_bytes().to_vec(),
    }));
    setters.push(Box::new(stun::attributes::RawAttribute {
        typ: stun::attributes::ATTR_ICE_CONTROLLING,
        length: 8,
        value: rand::random::<u64>().to_be_bytes().to_vec(),
    }));
    setters.push(Box::new(MessageIntegrity::new_short_term_integrity(
        pwd.into(),
    )));
    setters.push(Box::new(FINGERPRINT));
    m.build(&setters)
        .expect("a binding request of fixed attributes always builds");
    m.raw
}

/// Whether `buf` is a binding success response (to one of our checks).
pub fn is_binding_success(buf: &[u8]) -> bool {
    let mut m = Message::new();
    stun::message::is_message(buf) && m.unmarshal_binary(buf).is_ok() && m.typ == BINDING_SUCCESS
}

#[cfg(test)]
pub(crate) mod tests {
    use stun::message::Getter;

    use super::*;

    pub(crate) fn request(user: &str, pwd: &str, nominate: bool) -> Vec<u8> {
        binding_request(user, pwd, nominate)
    }

    #[test]
    fn valid_check_gets_a_signed_response_with_the_mapped_address() {
        let req = request("srv1:cli1", "serverpassword12345678", true);
        let c = parse_check(&req).unwrap();
        assert_eq!(
            (c.local_ufrag.as_str(), c.remote_ufrag.as_str()),
            ("srv1", "cli1")
        );
        assert!(c.use_candidate);
        let from: SocketAddr = "192.0.2.2:51000".parse().unwrap();
        let raw = c.answer("serverpassword12345678", from).unwrap();
        let mut resp = Message::new();
        resp.unmarshal_binary(&raw).unwrap();
        assert_eq!(resp.typ, BINDING_SUCCESS);
        let mut reqm = Message::new();
        reqm.unmarshal_binary(&req).unwrap();
        assert_eq!(resp.transaction_id, reqm.transaction_id);
        let mut xor = XorMappedAddress::default();
        xor.get_from(&resp).unwrap();
        assert_eq!(SocketAddr::new(xor.ip, xor.port), from);
        MessageIntegrity::new_short_term_integrity("serverpassword12345678".into())
            .check(&mut resp)
            .unwrap();
        FINGERPRINT.check(&resp).unwrap();
    }

    /// A session this node no longer has: its check (signed with the password derived
    /// from the same key) gets a signed 400; a check with another password, nothing.
    #[test]
    fn a_check_of_a_forgotten_session_gets_a_signed_400() {
        let dir = std::env::temp_dir().join(format!("edgefwd-ice-{}", rand::random::<u64>()));
        let path = dir.join("ice.key");
        let before = Passwords::load_or_create(&path).unwrap();
        let pwd = before.for_ufrag("abcd1234");
        assert_eq!(pwd.len(), 32);
        // The key outlives the process: a later one derives the same password.
        let after = Passwords::load_or_create(&path).unwrap();
        assert_eq!(after.for_ufrag("abcd1234"), pwd);
        assert_ne!(after.for_ufrag("abcd1235"), pwd);
        assert_ne!(Passwords::ephemeral().for_ufrag("abcd1234"), pwd);
        let req = request("abcd1234:cli1", &pwd, false);
        let raw = parse_check(&req).unwrap().refuse(&pwd).unwrap();
        let mut resp = Message::new();
        resp.unmarshal_binary(&raw).unwrap();
        assert_eq!(resp.typ, stun::message::BINDING_ERROR);
        let mut code = stun::error_code::ErrorCodeAttribute::default();
        code.get_from(&resp).unwrap();
        assert_eq!(code.code.0, 400);
        MessageIntegrity::new_short_term_integrity(pwd.clone())
            .check(&mut resp)
            .unwrap();
        FINGERPRINT.check(&resp).unwrap();
        let forged = request("abcd1234:cli1", "another-password-123456", false);
        assert_eq!(
            parse_check(&forged).unwrap().refuse(&pwd).unwrap_err(),
            CheckError::BadIntegrity
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn wrong_password_and_garbage_are_refused() {
        let req = request("srv1:cli1", "serverpassword12345678", false);
        let c = parse_check(&req).unwrap();
        assert!(!c.use_candidate);
        assert_eq!(
            c.answer("otherpassword", "127.0.0.1:1".parse().unwrap())
                .unwrap_err(),
            CheckError::BadIntegrity
        );
        assert_eq!(
            parse_check(&[0x16, 0xfe, 0xfd, 0, 0]).err(),
            Some(CheckError::NotStun)
        );
        assert_eq!(
            parse_check(&request("nocolon", "x", false)).err(),
            Some(CheckError::BadUsername)
        );
        let mut corrupt = request("srv1:cli1", "serverpassword12345678", false);
        let n = corrupt.len();
        corrupt[n - 1] ^= 1;
        let c = parse_check(&corrupt).unwrap();
        assert_eq!(
            c.answer("serverpassword12345678", "127.0.0.1:1".parse().unwrap())
                .unwrap_err(),
            CheckError::BadFingerprint
        );
    }
}
