//! ICE-lite (RFC 8445 §2.5): we never send checks, we answer them. A valid check
//! (USERNAME ours:theirs, MESSAGE-INTEGRITY with our ice-pwd, FINGERPRINT) proves the
//! 5-tuple belongs to the session and refreshes consent (RFC 7675).

use std::net::SocketAddr;

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

impl Check {
    /// Authenticates the check with our password and builds the success response
    /// carrying the address the request came from.
    pub fn answer(mut self, local_pwd: &str, from: SocketAddr) -> Result<Vec<u8>, CheckError> {
        FINGERPRINT
            .check(&self.msg)
            .map_err(|_| CheckError::BadFingerprint)?;
        MessageIntegrity::new_short_term_integrity(local_pwd.to_string())
            .check(&mut self.msg)
            .map_err(|_| CheckError::BadIntegrity)?;
        let mut resp = Message::new();
        let setters: Vec<Box<dyn Setter>> = vec![
            Box::new(self.msg.clone()), // copies the transaction ID
            Box::new(BINDING_SUCCESS),
            Box::new(XorMappedAddress {
                ip: from.ip(),
                port: from.port(),
            }),
            Box::new(MessageIntegrity::new_short_term_integrity(
                local_pwd.to_string(),
            )),
            Box::new(FINGERPRINT),
        ];
        resp.build(&setters).map_err(|_| CheckError::NotStun)?;
        Ok(resp.raw)
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
