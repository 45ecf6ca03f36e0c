"""An independent viewer for long streams: aiortc's ICE and DTLS, libsrtp (pylibsrtp)
decrypting every packet, and nothing decoded. It subscribes with POST /whep/ROOM,
then counts what libsrtp accepts and what it refuses, per SSRC, for --seconds.

The load test's publishers stamp every payload (magic "EFLT", track, sequence, send
time); this viewer reads the stamps, so the test can hold what arrived against what
was sent. Sequence numbers are extended across wraps (RFC 3550 A.1): "wraps" is how
many times a stream's 16-bit numbers wrapped while libsrtp kept accepting them, i.e.
how far its rollover counter went.

Prints one JSON object:
  {"srtp_errors": {"rtp": N, "rtcp": N}, "streams": {SSRC: {"packets", "wraps",
   "holes", "first_stamp", "last_stamp", "track", "longest_gap_ms"}}, ...}

  python aiortc_counter.py --base http://127.0.0.1:8080 --room r --seconds 30
"""

import argparse
import asyncio
import json
import socket
import struct
import sys
import time

import pylibsrtp
from aiortc import rtcdtlstransport
from aiortc_client import delete, negotiate, new_pc

MAGIC = b"EFLT"


class Stream:
    def __init__(self) -> None:
        self.packets = 0
        self.highest = None  # extended sequence number
        self.first = None
        self.holes = 0
        self.first_stamp = None
        self.last_stamp = None
        self.track = None
        self.last_at = None
        self.longest_gap = 0.0

    def on_packet(self, seq: int, payload: bytes, now: float) -> None:
        if self.highest is None:
            ext = (1 << 16) + seq
            self.first = ext
        else:
            delta = (seq - self.highest) & 0xFFFF
            ext = self.highest + (delta if delta < 0x8000 else delta - 0x10000)
        if self.highest is None or ext > self.highest:
            if self.highest is not None and ext > self.highest + 1:
                self.holes += ext - self.highest - 1
            self.highest = ext
        if self.last_at is not None:
            self.longest_gap = max(self.longest_gap, now - self.last_at)
        self.last_at = now
        self.packets += 1
        # The stamp: at the payload's start (audio) or after the 2-byte VP8 prefix.
        for at in (0, 2):
            if payload[at : at + 4] == MAGIC:
                track, stamp = struct.unpack_from("!II", payload, at + 4)
                self.track = track
                if self.first_stamp is None:
                    self.first_stamp = stamp
                self.last_stamp = stamp if self.last_stamp is None else max(self.last_stamp, stamp)
                break

    def report(self) -> dict:
        return {
            "packets": self.packets,
            "wraps": (self.highest >> 16) - (self.first >> 16) if self.first else 0,
            "span": self.highest - self.first + 1 if self.first else 0,
            "holes": self.holes,
            "track": self.track,
            "first_stamp": self.first_stamp,
            "last_stamp": self.last_stamp,
            "longest_gap_ms": round(self.longest_gap * 1000, 1),
        }


streams: dict[int, Stream] = {}
errors = {"rtp": 0, "rtcp": 0}


class CountingSrtp:
    """libsrtp's session as aiortc uses it, counting what it refuses."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def unprotect(self, data: bytes) -> bytes:
        try:
            return self.inner.unprotect(data)
        except pylibsrtp.Error:
            errors["rtp"] += 1
            raise

    def unprotect_rtcp(self, data: bytes) -> bytes:
        try:
            return self.inner.unprotect_rtcp(data)
        except pylibsrtp.Error:
            errors["rtcp"] += 1
            raise

    def __getattr__(self, name):
        return getattr(self.inner, name)


def install_counters() -> None:
    setup = rtcdtlstransport.RTCDtlsTransport._setup_srtp

    def counting_setup(self) -> None:
        setup(self)
        if self._rx_srtp is not None:
            self._rx_srtp = CountingSrtp(self._rx_srtp)

    async def count_rtp(self, data: bytes, arrival_time_ms: int) -> None:
        # Counted here, after libsrtp, instead of decoded: the load test's payloads
        # are stamps, not video.
        if len(data) < 12:
            return
        cc, x = data[0] & 0x0F, data[0] & 0x10
        seq, ssrc = struct.unpack_from("!H", data, 2)[0], struct.unpack_from("!I", data, 8)[0]
        at = 12 + 4 * cc
        if x and len(data) >= at + 4:
            at += 4 + 4 * struct.unpack_from("!H", data, at + 2)[0]
        streams.setdefault(ssrc, Stream()).on_packet(seq, data[at:], time.monotonic())

    rtcdtlstransport.RTCDtlsTransport._setup_srtp = counting_setup
    rtcdtlstransport.RTCDtlsTransport._handle_rtp_data = count_rtp


async def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--room", required=True)
    ap.add_argument("--seconds", type=float, required=True, help="at most this long")
    ap.add_argument(
        "--idle", type=float, default=2.0, help="done once media stopped this long"
    )
    a = ap.parse_args()
    base = a.base.rstrip("/")
    install_counters()
    pc = new_pc()
    pc.addTransceiver("audio", direction="recvonly")
    pc.addTransceiver("video", direction="recvonly")
    location = await negotiate(pc, f"{base}/whep/{a.room}")
    # Big socket buffers (FORCE: past rmem_max, as root): a Python viewer must not
    # lose what the SFU sent in time while its one thread is busy.
    ice = pc.getTransceivers()[0].receiver.transport.transport
    for p in ice._connection._protocols:
        sock = p.transport.get_extra_info("socket")
        try:
            sock.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    started = time.monotonic()
    while time.monotonic() - started < a.seconds:
        await asyncio.sleep(0.25)
        last = max((st.last_at for st in streams.values()), default=None)
        if last is not None and time.monotonic() - last > a.idle:
            break
    out = {
        "srtp_errors": errors,
        "streams": {str(s): st.report() for s, st in streams.items()},
        "dtls_state": pc.getTransceivers()[0].receiver.transport.state,
        "delete_status": await asyncio.to_thread(delete, base + location),
    }
    await pc.close()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
