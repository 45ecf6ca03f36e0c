//! SRTP and SRTCP: RFC vectors, interoperation with webrtc-srtp, the replay window.

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
        cipher::UnboundCipherKey::new(&cipher::AES_128, &hex("2B7E151628AED2A6ABF7158809CF4F3C"))
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
const RFC7714_RTP: &str = "8040f17b8041f8d35501a0b2 47616c6c696120657374206f6d6e697320646976697361
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

/// A restarted process's receive context, resumed from the persisted highest SRTCP
/// index, refuses a sender's SRTCP older than the replay window (a fresh one took
/// anything) and takes what follows.
#[test]
fn resumed_srtcp_refuses_what_is_older_than_the_window() {
    for profile in Profile::ALL {
        let m = MasterKey::new(profile, &[3; 16], &vec![5; profile.master_salt_len()]).unwrap();
        let (mut tx, mut rx) = (Context::new(&m), Context::new(&m));
        let report = |i: u32| {
            let mut r = vec![0x80, 201, 0, 1, 0, 0, 0, 42];
            r.extend_from_slice(&i.to_be_bytes());
            r
        };
        let wire: Vec<Vec<u8>> = (0..1300u32)
            .map(|i| {
                let plain = report(i);
                let mut b = plain.clone();
                b.resize(plain.len() + profile.rtcp_overhead(), 0);
                let n = tx.protect_rtcp(&mut b, plain.len()).unwrap();
                b.truncate(n);
                b
            })
            .collect();
        for w in &wire[..1200] {
            rx.unprotect_rtcp(&mut w.clone()).unwrap();
        }
        let kept = rx.rtcp_highest();
        assert_eq!(kept, vec![(42, 1199)]);
        assert!(
            Context::new(&m)
                .unprotect_rtcp(&mut wire[5].clone())
                .is_ok(),
            "a context not resumed takes an old report"
        );
        let mut fresh = Context::new(&m);
        for (ssrc, highest) in kept {
            fresh.resume_rtcp(ssrc, highest);
        }
        assert_eq!(
            fresh.unprotect_rtcp(&mut wire[5].clone()),
            Err(Error::Replay),
            "older than the window"
        );
        for w in &wire[1200..] {
            assert!(fresh.unprotect_rtcp(&mut w.clone()).is_ok());
        }
    }
}
