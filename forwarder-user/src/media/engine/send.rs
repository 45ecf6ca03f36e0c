//! The per-copy send unit: one down-track's rewrite, numbering and protection of a
//! packet into the data path's buffer; trunk copies and RTCP as they are.

use super::*;

/// Queues `bytes` unchanged (a trunk copy: still SRTP, still authenticated end to end).
pub(super) fn send_raw(to: SocketAddr, bytes: &[u8], c: &Counters, tx: &mut dyn Transmit) {
    let sent = tx.transmit(to, &mut |out| {
        out.get_mut(..bytes.len())?.copy_from_slice(bytes);
        Some(bytes.len())
    });
    if sent {
        bump(&c.relay_out);
    } else {
        c.count(Drop::SendFailed);
    }
}

/// Protects `plain` (an RTCP compound we built) for one peer and queues it.
pub(super) fn send_rtcp(
    ctx: &mut srtp::Context,
    to: SocketAddr,
    plain: &[u8],
    c: &Counters,
    tx: &mut dyn Transmit,
) -> bool {
    let mut why = Drop::SendFailed;
    let sent = tx.transmit(to, &mut |out| {
        out.get_mut(..plain.len())?.copy_from_slice(plain);
        ctx.protect_rtcp(out, plain.len())
            .map_err(|e| why = Drop::from_srtp(e))
            .ok()
    });
    if sent {
        bump(&c.rtcp_out);
    } else {
        c.count(why);
    }
    sent
}

/// Where RTCP about encoding `layer` of `track` goes: the stream, its publisher's
/// address, the stream's SSRC, our RTCP SSRC towards the publisher, and the context
/// that protects it. None until the publisher is bound, keyed and the SSRC known.
pub(super) fn upstream_of<'a>(
    tracks: &'a mut HashMap<TrackId, UpTrack>,
    sessions: &'a mut HashMap<SessionId, Session>,
    track: TrackId,
    layer: Layer,
) -> Option<(&'a mut Stream, SocketAddr, u32, u32, &'a mut srtp::Context)> {
    let t = tracks.get_mut(&track)?;
    let p = sessions.get_mut(&t.session)?;
    let st = t.streams.get_mut(layer as usize)?;
    let (to, ssrc, rtcp_ssrc) = (p.media_addr()?, st.ssrc?, p.rtcp_ssrc);
    Some((st, to, ssrc, rtcp_ssrc, &mut p.srtp.as_mut()?.tx))
}

/// Writes `plain` (header `hlen` bytes) rewritten for `d`, numbered as `out` says
/// (VP8 numbering shifted after a layer switch or dropped frames), and protected with
/// the subscriber's keys. Refused: why (counted by the caller).
#[allow(clippy::too_many_arguments)]
pub(super) fn send_copy(
    d: &DownTrack,
    ctx: &mut srtp::Context,
    to: SocketAddr,
    plain: &[u8],
    hlen: usize,
    vp8: Option<&Vp8Descriptor>,
    out: Out,
    rtx: Option<(u8, u32, u16)>,
    twcc: Option<Numbering>,
    tx: &mut dyn Transmit,
) -> Result<(), Drop> {
    let mut numbered = None;
    let mut why = Drop::SendFailed;
    let sent = tx.transmit(to, &mut |buf| {
        // RTX puts the original sequence number in front of the payload: 2 more.
        let room = plain.len() + if rtx.is_some() { 2 } else { 0 };
        buf.get(..room)?;
        let frame = &mut buf[..plain.len()];
        frame.copy_from_slice(plain);
        rtp::rewrite(frame, &d.route);
        // A late packet from before a dropped one keeps the delta of its place.
        if out.seq_delta != d.route.seq_delta {
            let seq = u16::from_be_bytes([plain[2], plain[3]]).wrapping_add(out.seq_delta);
            frame[2..4].copy_from_slice(&seq.to_be_bytes());
        }
        if out.marker {
            frame[1] |= 0x80;
        }
        if let Some((from, to)) = d.dd_rename {
            rtp::rename_extension(frame, from, to);
        }
        // Nothing to shift until a switch, a resume or a dropped frame moved it.
        let tl0 = d.layering.tl0_delta;
        if let Some(v) = vp8.filter(|_| out.pic_delta != 0 || tl0 != 0) {
            v.shift(&mut frame[hlen..], out.pic_delta, tl0);
        }
        // The transport-wide number, which may add an extension (the header grows).
        let (mut len, mut hlen) = (plain.len(), hlen);
        if let Some(n) = &twcc
            && let Some((seq, grown)) = n.out.number(buf, len, n.from)
        {
            numbered = Some(seq);
            hlen += grown - len;
            len = grown;
        }
        let Some((pt, ssrc, seq)) = rtx else {
            return ctx
                .protect_rtp(buf, len)
                .map_err(|e| why = Drop::from_srtp(e))
                .ok();
        };
        // RFC 4588 §4: the same header on the RTX stream (its payload type, sequence
        // and SSRC), the original sequence number the subscriber knows first in the
        // payload.
        let frame = buf.get_mut(..len + 2)?;
        let osn = [frame[2], frame[3]];
        frame.copy_within(hlen..len, hlen + 2);
        frame[hlen..hlen + 2].copy_from_slice(&osn);
        frame[1] = (frame[1] & 0x80) | (pt & 0x7f);
        frame[2..4].copy_from_slice(&seq.to_be_bytes());
        frame[8..12].copy_from_slice(&ssrc.to_be_bytes());
        ctx.protect_rtp(buf, len + 2)
            .map_err(|e| why = Drop::from_srtp(e))
            .ok()
    });
    if !sent {
        return Err(why);
    }
    if let (Some(n), Some(seq)) = (twcc, numbered) {
        n.out.sent(seq, n.at_us, plain.len());
    }
    Ok(())
}

/// A copy's transport-wide number: the viewer's numbering, the publisher's extension
/// id (renamed where the viewer's differs), and the send time (µs since the epoch).
pub(super) struct Numbering<'a> {
    pub(super) out: &'a mut TwccOut,
    pub(super) from: Option<u8>,
    pub(super) at_us: i64,
}

/// The layer ids of one packet (`plain`, header `hlen` bytes): AV1's from its
/// dependency descriptor under the template structure `dd` (or the one the packet
/// carries, returned to be kept), the others' from the payload descriptor.
pub(super) fn layer_ids_of(
    format: Format,
    dd_ext: Option<u8>,
    dd: Option<&DdStructure>,
    plain: &[u8],
    hlen: usize,
    vp8: Option<&Vp8Descriptor>,
) -> (Option<LayerIds>, Option<DdStructure>) {
    if format != Format::Av1 {
        return (format.layer_ids(&plain[hlen..], vp8), None);
    }
    let Some(d) = dd_ext
        .and_then(|id| rtp::extension(plain, id))
        .and_then(DependencyDescriptor::parse)
    else {
        return (None, None);
    };
    let ids = d.structure.as_ref().or(dd).and_then(|s| s.layer_ids(&d));
    (ids, d.structure)
}

/// Whether a packet of `format` with `payload` may start a subscriber: a keyframe's
/// first packet; for audio (and codecs whose keyframes we cannot see) any packet.
pub(super) fn may_start(format: Format, payload: &[u8]) -> bool {
    format == Format::Other || format.keyframe_start(payload)
}
