//! What the forwarder must know of a video payload without decoding it: whether a
//! packet starts a keyframe (a subscriber may only be switched to another simulcast
//! encoding there), where VP8 keeps its picture numbering (rewritten so a
//! subscriber sees one continuous picture sequence across switches), and which
//! spatial and temporal layer a packet of a scalable stream belongs to (VP8 temporal
//! layers, VP9 SVC), so the layers a subscriber should not get can be dropped.
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
    /// Y: this frame depends only on temporal layer 0, so a subscriber can start
    /// getting its layer here.
    pub sync: bool,
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
            sync: false,
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
            let b = *p.get(d.len)?;
            // TID and Y mean something only with T; K alone carries KEYIDX.
            if x & 0x20 != 0 {
                d.tid = Some(b >> 6);
                d.sync = b & 0x20 != 0;
            }
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

/// Where a temporal up-switch may happen, as the codec marks it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UpSwitch {
    #[default]
    No,
    /// VP8's Y bit: this frame depends only on layer 0, so its own temporal layer can
    /// be started here.
    ThisLayer,
    /// VP9's U bit: pictures after this one do not depend on earlier pictures of the
    /// layers above it, so every layer can be started after it (if it was forwarded).
    Above,
}

/// Where one packet of a scalable stream sits: what a subscriber's layer caps are
/// applied to. A stream without layer information is spatial 0, temporal 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LayerIds {
    pub spatial: u8,
    pub temporal: u8,
    /// The first packet of a picture: where what a subscriber gets may change.
    pub picture_start: bool,
    /// The last packet of its spatial layer's frame (VP9's E bit): with the layers
    /// above dropped, it ends the picture for the subscriber (the marker bit).
    pub layer_end: bool,
    pub up: UpSwitch,
    /// The picture id, when the descriptor has one (VP8's is renumbered across
    /// dropped frames; VP9's references pictures by it and is kept).
    pub picture: Option<u16>,
}

impl Format {
    /// The layer ids of a packet with this payload; None for formats whose layers
    /// we do not read (H264, AV1 without the dependency descriptor, audio).
    pub fn layer_ids(self, payload: &[u8], vp8: Option<&Vp8Descriptor>) -> Option<LayerIds> {
        match self {
            Format::Vp8 => {
                let d = vp8?;
                Some(LayerIds {
                    spatial: 0,
                    temporal: d.tid.unwrap_or(0),
                    picture_start: d.start && d.partition == 0,
                    layer_end: false,
                    up: if d.sync {
                        UpSwitch::ThisLayer
                    } else {
                        UpSwitch::No
                    },
                    picture: d.picture_id.map(|(_, p, _)| p),
                })
            }
            Format::Vp9 => {
                let d = Vp9Descriptor::parse(payload)?;
                Some(LayerIds {
                    spatial: d.sid,
                    temporal: d.tid,
                    picture_start: d.begin && d.sid == 0,
                    layer_end: d.end,
                    up: if d.switch_up {
                        UpSwitch::Above
                    } else {
                        UpSwitch::No
                    },
                    picture: d.picture_id,
                })
            }
            _ => None,
        }
    }
}

/// The VP9 payload descriptor's fields the forwarder reads (RFC 9628 §4.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vp9Descriptor {
    /// B: first packet of a spatial layer frame.
    pub begin: bool,
    /// E: last packet of a spatial layer frame.
    pub end: bool,
    /// P: inter-picture predicted.
    pub inter: bool,
    pub picture_id: Option<u16>,
    /// Spatial and temporal layer ids (0 without the L byte).
    pub sid: u8,
    pub tid: u8,
    /// U: switching up point.
    pub switch_up: bool,
}

impl Vp9Descriptor {
    pub fn parse(p: &[u8]) -> Option<Vp9Descriptor> {
        let b0 = *p.first()?;
        let mut d = Vp9Descriptor {
            begin: b0 & 0x08 != 0,
            end: b0 & 0x04 != 0,
            inter: b0 & 0x40 != 0,
            picture_id: None,
            sid: 0,
            tid: 0,
            switch_up: false,
        };
        let mut at = 1;
        if b0 & 0x80 != 0 {
            let hi = *p.get(at)?;
            if hi & 0x80 != 0 {
                d.picture_id = Some(u16::from_be_bytes([hi & 0x7f, *p.get(at + 1)?]));
                at += 2;
            } else {
                d.picture_id = Some(hi as u16);
                at += 1;
            }
        }
        if b0 & 0x20 != 0 {
            let l = *p.get(at)?;
            d.tid = l >> 5;
            d.switch_up = l & 0x10 != 0;
            d.sid = (l >> 1) & 0x07;
        }
        Some(d)
    }
}

/// Reads bits most significant first, as the dependency descriptor is written.
struct Bits<'a> {
    data: &'a [u8],
    at: usize,
}

impl Bits<'_> {
    fn read(&mut self, n: usize) -> Option<u32> {
        let mut v = 0u32;
        for _ in 0..n {
            let byte = *self.data.get(self.at / 8)?;
            v = (v << 1) | u32::from((byte >> (7 - self.at % 8)) & 1);
            self.at += 1;
        }
        Some(v)
    }
}

/// Which spatial and temporal layer each frame dependency template is (the
/// template structure a keyframe's dependency descriptor carries).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DdStructure {
    pub template_id_offset: u8,
    /// Per template: (spatial id, temporal id).
    pub layers: Vec<(u8, u8)>,
}

impl DdStructure {
    /// The layer ids a descriptor's template id stands for under this structure.
    pub fn layer_ids(&self, d: &DependencyDescriptor) -> Option<LayerIds> {
        let i = (d.template_id as usize + 64 - self.template_id_offset as usize) % 64;
        let &(spatial, temporal) = self.layers.get(i)?;
        Some(LayerIds {
            spatial,
            temporal,
            picture_start: d.start && spatial == 0,
            layer_end: d.end,
            up: UpSwitch::No,
            picture: None,
        })
    }
}

/// The AV1 dependency descriptor's fields the forwarder reads (AV1 RTP specification,
/// appendix A): the mandatory ones, and the template layers when the structure is
/// present (keyframes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DependencyDescriptor {
    /// First and last packet of a layer's frame.
    pub start: bool,
    pub end: bool,
    pub template_id: u8,
    pub frame_number: u16,
    pub structure: Option<DdStructure>,
}

impl DependencyDescriptor {
    pub fn parse(ext: &[u8]) -> Option<DependencyDescriptor> {
        let mut b = Bits { data: ext, at: 0 };
        let mut d = DependencyDescriptor {
            start: b.read(1)? == 1,
            end: b.read(1)? == 1,
            template_id: b.read(6)? as u8,
            frame_number: b.read(16)? as u16,
            structure: None,
        };
        if ext.len() > 3 && b.read(1)? == 1 {
            // The other flags (active decode targets, custom DTIs, fdiffs, chains).
            b.read(4)?;
            let template_id_offset = b.read(6)? as u8;
            let _dt_cnt_minus_one = b.read(5)?;
            let (mut spatial, mut temporal) = (0u8, 0u8);
            let mut layers = Vec::new();
            loop {
                layers.push((spatial, temporal));
                // A template per layer at most (64 ids): a longer list is malformed.
                if layers.len() > 64 {
                    return None;
                }
                match b.read(2)? {
                    0 => {}
                    1 => temporal += 1,
                    2 => {
                        temporal = 0;
                        spatial += 1;
                    }
                    _ => break,
                }
            }
            d.structure = Some(DdStructure {
                template_id_offset,
                layers,
            });
        }
        Some(d)
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

    /// VP9 descriptor with I (15-bit picture id) and L: B/E per `begin`/`end`, P for
    /// non-key pictures, TID/U/SID/D; then TL0PICIDX (non-flexible mode) and a byte.
    pub(crate) fn vp9(
        pic: u16,
        sid: u8,
        tid: u8,
        begin: bool,
        end: bool,
        key: bool,
        up: bool,
    ) -> Vec<u8> {
        let b0 = 0xa0
            | if key { 0 } else { 0x40 }
            | if begin { 0x08 } else { 0 }
            | if end { 0x04 } else { 0 };
        vec![
            b0,
            0x80 | (pic >> 8) as u8,
            pic as u8,
            tid << 5 | if up { 0x10 } else { 0 } | sid << 1 | u8::from(sid > 0 && key),
            7,
            0xbb,
        ]
    }

    #[test]
    fn layer_ids_of_vp8_and_vp9() {
        let p = vp9(0x1234, 2, 1, true, true, false, true);
        let ids = Format::Vp9.layer_ids(&p, None).unwrap();
        assert_eq!(
            ids,
            LayerIds {
                spatial: 2,
                temporal: 1,
                picture_start: false,
                layer_end: true,
                up: UpSwitch::Above,
                picture: Some(0x1234),
            }
        );
        let key = vp9(5, 0, 0, true, false, true, false);
        assert!(Format::Vp9.keyframe_start(&key));
        let ids = Format::Vp9.layer_ids(&key, None).unwrap();
        assert!(ids.picture_start && !ids.layer_end && ids.up == UpSwitch::No);
        // No L byte: one layer; truncated picture id: nothing.
        assert_eq!(Format::Vp9.layer_ids(&[0x0c], None).unwrap().spatial, 0);
        assert_eq!(Format::Vp9.layer_ids(&[0x80], None), None);
        // VP8: T with Y; K alone carries no temporal id.
        let mut v = vp8(9, 3, 2, true, false);
        v[5] |= 0x20;
        let d = Vp8Descriptor::parse(&v).unwrap();
        let ids = Format::Vp8.layer_ids(&v, Some(&d)).unwrap();
        assert_eq!(
            (ids.temporal, ids.up, ids.picture),
            (2, UpSwitch::ThisLayer, Some(9))
        );
        let k_only = [0x90, 0x10, 0x45, 0x10];
        let d = Vp8Descriptor::parse(&k_only).unwrap();
        assert_eq!((d.tid, d.sync, d.len), (None, false, 3));
        assert_eq!(Format::H264.layer_ids(&[0x65], None), None);
    }

    /// Writes bits most significant first (test dependency descriptors).
    pub(crate) fn bits(fields: &[(u32, usize)]) -> Vec<u8> {
        let mut out = vec![];
        let mut at = 0;
        for &(v, n) in fields {
            for i in (0..n).rev() {
                if at % 8 == 0 {
                    out.push(0);
                }
                *out.last_mut().unwrap() |= (((v >> i) & 1) as u8) << (7 - at % 8);
                at += 1;
            }
        }
        out
    }

    /// A dependency descriptor: start/end, template id, frame number; with `layers`,
    /// the structure (offset 0) whose templates are L3T1 then the given next_layer_idc
    /// list.
    pub(crate) fn dd(
        start: bool,
        end: bool,
        template: u8,
        frame: u16,
        idcs: Option<&[u32]>,
    ) -> Vec<u8> {
        let mut f = vec![
            (start as u32, 1),
            (end as u32, 1),
            (template as u32, 6),
            (frame as u32, 16),
        ];
        if let Some(idcs) = idcs {
            f.extend([(1, 1), (0, 4), (0, 6), (2, 5)]);
            f.extend(idcs.iter().map(|i| (*i, 2)));
        }
        bits(&f)
    }

    #[test]
    fn av1_dependency_descriptor_layers() {
        // L3T1: three templates, spatial 0, 1, 2.
        let key = DependencyDescriptor::parse(&dd(true, false, 0, 7, Some(&[2, 2, 3]))).unwrap();
        let st = key.structure.clone().unwrap();
        assert_eq!(st.layers, [(0, 0), (1, 0), (2, 0)]);
        assert_eq!((key.start, key.end, key.frame_number), (true, false, 7));
        let ids = st.layer_ids(&key).unwrap();
        assert!(ids.picture_start && ids.spatial == 0 && !ids.layer_end);
        let d = DependencyDescriptor::parse(&dd(false, true, 2, 9, None)).unwrap();
        assert_eq!(d.structure, None);
        let ids = st.layer_ids(&d).unwrap();
        assert_eq!(
            (ids.spatial, ids.temporal, ids.layer_end, ids.picture_start),
            (2, 0, true, false)
        );
        // L1T3 templates: 0 -> temporal 1 -> temporal 2.
        let t = DependencyDescriptor::parse(&dd(true, true, 0, 1, Some(&[1, 1, 3]))).unwrap();
        assert_eq!(t.structure.unwrap().layers, [(0, 0), (0, 1), (0, 2)]);
        // A template id the structure lacks; truncated; endless templates.
        assert_eq!(
            st.layer_ids(&DependencyDescriptor::parse(&dd(true, true, 5, 1, None)).unwrap()),
            None
        );
        assert_eq!(DependencyDescriptor::parse(&[0x80, 1]), None);
        assert_eq!(
            DependencyDescriptor::parse(&dd(true, true, 0, 1, Some(&[0; 80]))),
            None
        );
    }
}
