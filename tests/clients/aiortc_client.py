"""A WebRTC peer that is not Chromium: aiortc (Python, its own ICE, DTLS, SRTP and codecs).

  publish: send aiortc's synthetic video and audio to POST /whip/ROOM and hold;
  watch:   subscribe with POST /whep/ROOM and count decoded frames;
  both:    publish, then watch the same room from a second peer connection.

Prints one JSON object; exits 1 if the subscriber decodes too little in time.

  python aiortc_client.py --base http://127.0.0.1:8080 --room r [--role both] [--hold S]
"""

import argparse
import asyncio
import json
import sys
import time
import urllib.error
import urllib.request

from aiortc import (
    RTCBundlePolicy,
    RTCConfiguration,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.mediastreams import AudioStreamTrack, MediaStreamError, VideoStreamTrack


def post_sdp(url: str, sdp: str) -> tuple[str, str]:
    req = urllib.request.Request(
        url, data=sdp.encode(), method="POST", headers={"Content-Type": "application/sdp"}
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            if r.status != 201:
                raise RuntimeError(f"{url}: HTTP {r.status}")
            return r.read().decode(), r.headers["Location"]
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"{url}: HTTP {e.code}: {e.read().decode().strip()}") from None


def delete(url: str) -> int:
    req = urllib.request.Request(url, method="DELETE")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


async def negotiate(pc: RTCPeerConnection, url: str) -> str:
    # aiortc gathers all candidates inside setLocalDescription: no trickle needed.
    await pc.setLocalDescription(await pc.createOffer())
    answer, location = await asyncio.to_thread(post_sdp, url, pc.localDescription.sdp)
    await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
    return location


def new_pc() -> RTCPeerConnection:
    return RTCPeerConnection(RTCConfiguration(bundlePolicy=RTCBundlePolicy.MAX_BUNDLE))


async def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--room", default="aiortc")
    ap.add_argument("--role", choices=["both", "publish", "watch"], default="both")
    ap.add_argument("--hold", type=float, default=0)
    ap.add_argument("--timeout", type=float, default=30)
    a = ap.parse_args()
    base = a.base.rstrip("/")
    out: dict = {"role": a.role}
    ok = True
    pcs = []
    locations = []

    if a.role in ("both", "publish"):
        pub = new_pc()
        pcs.append(pub)
        pub.addTransceiver(AudioStreamTrack(), direction="sendonly")
        pub.addTransceiver(VideoStreamTrack(), direction="sendonly")
        locations.append(await negotiate(pub, f"{base}/whip/{a.room}"))
        out["whip"] = locations[-1]

    if a.role == "publish":
        await asyncio.sleep(a.hold)
    else:
        sub = new_pc()
        pcs.append(sub)
        sub.addTransceiver("audio", direction="recvonly")
        sub.addTransceiver("video", direction="recvonly")
        frames = {"audio": 0, "video": 0}
        sizes = set()

        async def consume(track):
            try:
                while True:
                    f = await track.recv()
                    frames[track.kind] += 1
                    if track.kind == "video":
                        sizes.add((f.width, f.height))
            except MediaStreamError:
                pass

        sub.on("track", lambda t: asyncio.ensure_future(consume(t)))
        locations.append(await negotiate(sub, f"{base}/whep/{a.room}"))
        out["whep"] = locations[-1]
        deadline = time.monotonic() + a.timeout
        while frames["video"] < 30 or frames["audio"] < 50:
            if time.monotonic() > deadline:
                ok = False
                print(f"subscriber decoded too little in {a.timeout} s: {frames}", file=sys.stderr)
                break
            await asyncio.sleep(0.2)
        await asyncio.sleep(a.hold)
        out["frames"] = frames
        out["video_sizes"] = sorted(sizes)
        dtls = sub.getTransceivers()[0].receiver.transport
        out["dtls_state"] = dtls.state

    for loc in reversed(locations):
        out.setdefault("delete_status", []).append(await asyncio.to_thread(delete, base + loc))
    for pc in pcs:
        await pc.close()
    print(json.dumps(out))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
