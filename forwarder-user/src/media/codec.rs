//! What the forwarder must know of a video payload without decoding it: whether a
//! packet starts a keyframe (a subscriber may only be switched to another simulcast
//! encoding there), and where VP8 keeps its picture numbering (rewritten so a
//! subscriber sees one continuous picture sequence across switches).
//!
//! Payload formats: VP8 RFC 7741, VP9 RFC 9628, H264 RFC 6184, AV1 (AOM RTP spec §4.4).

/// The payload format of a track, from its codec name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Vp8,
    Vp9,
    H264,
    Av1,
    /// Audio, or a codec whose keyframes we cannot see.
    Other,
}

impl Format {
    pub fn from_name(name: &str) -> Format {
        match name.to_ascii_uppercase().as_str() {
            "VP8" => Format::Vp8,
            "VP9" => Format::Vp9,
            "H264" => Format::H264,
            "AV1" => Format::Av1,
            _ => Format::Other,
        }
    }

    /// Whether `payload` (the RTP payload, after the header) is the first packet of a
    /// keyframe: the point where a decoder can start.
    pub fn keyframe_start(self, payload: &[u8]) -> bool {
        match self {
            Format::Vp8 => vp8_keyframe_start(payload),
            Format::Vp9 => vp9_keyframe_start(payload),
            Format::H264 => h264_keyframe_start(payload),
            // Aggregation header: N = first packet of a coded video sequence.
            Format::Av1 => payload.first().is_some_and(|b| b & 0x08 != 0),
            Format::Other => false,
        }
    }
}

fn vp8_keyframe_start(p: &[u8]) -> bool {
    let Some(d) = Vp8Descriptor::parse(p) else {
        return false;
    };
    // S=1 and partition 0 start the frame; the payload header's P bit is 0 on keyframes.
    d.start && d.partition == 0 && p.get(d.len).is_some_and(|b| b & 0x01 == 0)
}

fn vp9_keyframe_start(p: &[u8]) -> bool {
    let Some(&b0) = p.first() else { return false };
    let (i, pbit, l, b) = (
        b0 & 0x80 != 0,
        b0 & 0x40 != 0,
        b0 & 0x20 != 0,
        b0 & 0x08 != 0,
    );
    if pbit || !b {
        return false;
    }
    if !l {
        return true;
    }
    // Layer indices follow the picture id: the keyframe starts on spatial layer 0.
    let at = 1 + usize::from(i)
        * if p.get(1).is_some_and(|b| b & 0x80 != 0) {
            2
        } else {
            1
        };
    p.get(at).is_some_and(|b| (b >> 1) & 0x07 == 0)
}

fn h264_keyframe_start(p: &[u8]) -> bool {
    let Some(&b0) = p.first() else { return false };
    let key = |nal_type: u8| nal_type == 5 || nal_type == 7;
    match b0 & 0x1f {
        // STAP-A: 16-bit sizes, each followed by a NAL unit (SPS, PPS, IDR...).
        24 => {
            let mut at = 1;
            while let (Some(&hi), Some(&lo)) = (p.get(at), p.get(at + 1)) {
                let size = u16::from_be_bytes([hi, lo]) as usize;
                if p.get(at + 2).is_some_and(|n| key(n & 0x1f)) {
                    return true;
                }
                at += 2 + size;
            }
            false
        }
        // FU-A: the start fragment of an IDR slice.
        28 => p.get(1).is_some_and(|h| h & 0x80 != 0 && key(h & 0x1f)),
        t => key(t),
    }
}

/// The VP8 payload descriptor's fields the forwarder reads or rewrites.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vp8Descriptor {
    /// Descriptor length: where the VP8 payload header starts.
    pub len: usize,
    pub start: bool,
    pub partition: u8,
    /// (offset, value, 15-bit) of the picture id, if present.
    pub picture_id: Option<(usize, u16, bool)>,
    /// (offset, value) of TL0PICIDX, if present.
    pub tl0: Option<(usize, u8)>,
    /// Temporal layer index, if present.
    pub tid: Option<u8>,
}

impl Vp8Descriptor {
    pub fn parse(p: &[u8]) -> Option<Vp8Descriptor> {
        let b0 = *p.first()?;
        let mut d = Vp8Descriptor {
            len: 1,
            start: b0 & 0x10 != 0,
            partition: b0 & 0x07,
            picture_id: None,
            tl0: None,
            tid: None,
        };
        if b0 & 0x80 == 0 {
            return Some(d);
        }
        let x = *p.get(1)?;
        d.len = 2;
        if x & 0x80 != 0 {
            let hi = *p.get(d.len)?;
            if hi & 0x80 != 0 {
                let lo = *p.get(d.len + 1)?;
                d.picture_id = Some((d.len, u16::from_be_bytes([hi & 0x7f, lo]), true));
                d.len += 2;
            } else {
                d.picture_id = Some((d.len, hi as u16, false));
                d.len += 1;
            }
        }
        if x & 0x40 != 0 {
            d.tl0 = Some((d.len, *p.get(d.len)?));
            d.len += 1;
        }
        if x & 0x30 != 0 {
            d.tid = Some(*p.get(d.len)? >> 6);
            d.len += 1;
        }
        (d.len <= p.len()).then_some(d)
    }

    /// Writes picture id + `pic_delta` and TL0PICIDX + `tl0_delta` into `p` (the payload
    /// this descriptor was parsed from), each in its own width.
    pub fn shift(&self, p: &mut [u8], pic_delta: u16, tl0_delta: u8) {
        if let Some((at, v, long)) = self.picture_id {
            if long {
                let v = v.wrapping_add(pic_delta) & 0x7fff;
                p[at] = 0x80 | (v >> 8) as u8;
                p[at + 1] = v as u8;
            } else {
                p[at] = (v.wrapping_add(pic_delta) & 0x7f) as u8;
            }
        }
        if let Some((at, v)) = self.tl0 {
            p[at] = v.wrapping_add(tl0_delta);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// VP8 descriptor: X, S, partition 0; I (15-bit picture id), L, T; then the payload
    /// header byte.
    pub(crate) fn vp8(pic: u16, tl0: u8, tid: u8, start: bool, key: bool) -> Vec<u8> {
        vec![
            0x80 | if start { 0x10 } else { 0 },
            0xe0,
            0x80 | (pic >> 8) as u8,
            pic as u8,
            tl0,
            tid << 6,
            if key { 0x10 } else { 0x11 },
            0xaa,
        ]
    }

    #[test]
    fn vp8_keyframes_and_numbering() {
        let key = vp8(0x1234, 7, 0, true, true);
        assert!(Format::Vp8.keyframe_start(&key));
        assert!(
            !Format::Vp8.keyframe_start(&vp8(1, 7, 0, true, false)),
            "delta frame"
        );
        assert!(
            !Format::Vp8.keyframe_start(&vp8(1, 7, 0, false, true)),
            "not the start"
        );
        let d = Vp8Descriptor::parse(&key).unwrap();
        assert_eq!(d.len, 6);
        assert_eq!(d.picture_id, Some((2, 0x1234, true)));
        assert_eq!(d.tl0, Some((4, 7)));
        assert_eq!(d.tid, Some(0));
        let mut p = key.clone();
        d.shift(&mut p, 0x7fff, 250); // wraps both: -1 and +250
        let e = Vp8Descriptor::parse(&p).unwrap();
        assert_eq!(e.picture_id, Some((2, 0x1233, true)));
        assert_eq!(e.tl0, Some((4, 1)));
        assert_eq!(&p[6..], &key[6..], "payload untouched");
        // 7-bit picture id, no extension fields, truncated.
        let short = [0x90, 0x80, 0x7f, 0x10];
        let d = Vp8Descriptor::parse(&short).unwrap();
        assert_eq!(d.picture_id, Some((2, 0x7f, false)));
        let mut s = short;
        d.shift(&mut s, 2, 0);
        assert_eq!(s[2], 1, "7-bit wrap");
        assert_eq!(Vp8Descriptor::parse(&[0x10]).unwrap().len, 1);
        assert_eq!(Vp8Descriptor::parse(&[0x90, 0x80]), None);
        assert!(!Format::Vp8.keyframe_start(&[]));
    }

    #[test]
    fn h264_vp9_av1_keyframes() {
        // STAP-A with SPS (7) and PPS (8).
        let stap = [24, 0, 2, 0x67, 0x42, 0, 1, 0x68];
        assert!(Format::H264.keyframe_start(&stap));
        assert!(!Format::H264.keyframe_start(&[24, 0, 1, 0x68]), "PPS alone");
        assert!(
            !Format::H264.keyframe_start(&[24, 0, 9, 0x68]),
            "size past the end"
        );
        assert!(
            Format::H264.keyframe_start(&[28, 0x85]),
            "FU-A start of an IDR"
        );
        assert!(!Format::H264.keyframe_start(&[28, 0x05]), "FU-A middle");
        assert!(!Format::H264.keyframe_start(&[28, 0x81]), "FU-A non-IDR");
        assert!(Format::H264.keyframe_start(&[0x65]), "single IDR NAL");
        assert!(!Format::H264.keyframe_start(&[0x41]));
        // VP9: B=1, P=0; with L: spatial layer 0 only.
        assert!(Format::Vp9.keyframe_start(&[0x08]));
        assert!(!Format::Vp9.keyframe_start(&[0x48]), "inter-predicted");
        assert!(Format::Vp9.keyframe_start(&[0xa8, 0x81, 0x02, 0x00]));
        assert!(
            !Format::Vp9.keyframe_start(&[0xa8, 0x81, 0x02, 0x02]),
            "spatial layer 1"
        );
        assert!(Format::Av1.keyframe_start(&[0x18]));
        assert!(!Format::Av1.keyframe_start(&[0x10]));
        assert!(!Format::Other.keyframe_start(&[0xff]));
    }
}
