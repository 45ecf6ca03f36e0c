// edgefwd edge choice: which node should this viewer watch a room from?
//
// Served by every node at /edges.js (an ES module). Usage:
//
//   import { chooseEdge } from "http://NODE/edges.js";
//   const edge = await chooseEdge("http://NODE", "my-room", { token });
//   // edge.whep: POST the WHEP offer there; edge.rtts: {node: ms} as measured
//
// It asks NODE for 2-3 candidates (GET /v1/edges?room=ROOM), races a probe to each
// (GET its probe URL, three times, the fastest counts: the first may pay for a new
// connection), takes the fastest node that answered, and reports the choice and
// every RTT to that node (POST /v1/edges/report), where they are logged and counted
// in /metrics (edgefwd_edge_chosen_total, edgefwd_edge_probe_rtt_ms_sum/_count).
//
// When the chosen node dies, ask again with the answer you had: chooseEdge(base, room,
// { avoid: [edge.node], fallbacks: edge.edges }) skips the dead node and, if `base`
// itself does not answer, asks the other candidates for their lists. The built-in
// page does this on ICE failure or two seconds without video (make-before-break:
// the new session plays before the old one is closed).
//
// A node that drains tells its viewers to move before it ends their sessions:
//
//   const stop = followMoves(resource, { token, onMove: (why) => ... });
//
// reads the WHEP session's event stream (GET RESOURCE/events) and calls onMove once
// with {reason, ends_in_ms} when its node asks; move then as above (the old session
// still plays meanwhile). stop() ends the stream. A WHIP session's stream says the
// same to a publisher: publish again at the room's WHIP URL (the room's next node
// takes the room over once the new session's keys are up) and keep sending on the
// old session for ends_in_ms, as the built-in page does.

const PROBES = 3;
const PROBE_TIMEOUT_MS = 2000;

async function probeOnce(url) {
  const ctl = new AbortController();
  const timer = setTimeout(() => ctl.abort(), PROBE_TIMEOUT_MS);
  const t0 = performance.now();
  try {
    const r = await fetch(url, { cache: "no-store", signal: ctl.signal });
    if (!r.ok) throw new Error(`probe ${url}: HTTP ${r.status}`);
    return performance.now() - t0;
  } finally {
    clearTimeout(timer);
  }
}

/// The fastest of PROBES round trips to `url` (ms), or null if none answered.
export async function probe(url) {
  let best = null;
  for (let i = 0; i < PROBES; i++) {
    try {
      const ms = await probeOnce(url);
      best = best === null ? ms : Math.min(best, ms);
    } catch (_) {
      // One lost probe is not a dead node; all lost is.
    }
  }
  return best;
}

/// Follows WHEP or WHIP session `resource` (its URL): calls `opts.onMove(data)` once
/// when its node says to move. Returns a function that stops following.
export function followMoves(resource, opts = {}) {
  const ctl = new AbortController();
  const headers = opts.token ? { Authorization: `Bearer ${opts.token}` } : {};
  (async () => {
    const r = await fetch(`${resource}/events`, { headers, signal: ctl.signal, cache: "no-store" });
    if (!r.ok || !r.body) return;
    const reader = r.body.getReader();
    const text = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buf += text.decode(value, { stream: true });
      // Server-sent events: blank-line separated, "event:" and "data:" lines.
      let end;
      while ((end = buf.indexOf("\n\n")) >= 0) {
        const block = buf.slice(0, end);
        buf = buf.slice(end + 2);
        const event = /^event: ?(.*)$/m.exec(block)?.[1];
        const data = /^data: ?(.*)$/m.exec(block)?.[1];
        if (event === "move") {
          ctl.abort();
          let parsed = {};
          try { parsed = JSON.parse(data || "{}"); } catch (_) { /* reason unknown */ }
          opts.onMove?.(parsed);
          return;
        }
      }
    }
  })().catch(() => { /* aborted, or the node is gone: the stall check covers it */ });
  return () => ctl.abort();
}

/// Asks `base` (a node's http URL) for candidates for `room`, probes them all at
/// once, reports, and returns {node, whep, rtts} of the fastest.
export async function chooseEdge(base, room, opts = {}) {
  const headers = opts.token ? { Authorization: `Bearer ${opts.token}` } : {};
  const avoid = opts.avoid || [];
  // Where to ask: `base`, then (if it does not answer) the fallbacks' nodes.
  const askAt = [base, ...(opts.fallbacks || []).filter(e => !avoid.includes(e.node)).map(e => new URL(e.whep).origin)];
  let edges = null, lastError = null;
  for (const at of askAt) {
    try {
      const r = await fetch(`${at}/v1/edges?room=${encodeURIComponent(room)}`, { headers });
      if (!r.ok) throw new Error(`${at}/v1/edges: HTTP ${r.status}: ${await r.text()}`);
      edges = (await r.json()).edges.filter(e => !avoid.includes(e.node));
      break;
    } catch (e) {
      lastError = e;
    }
  }
  if (edges === null) throw lastError;
  if (!edges.length) throw new Error(`no node has room for another viewer of ${room}`);
  const measured = await Promise.all(edges.map((e) => probe(e.probe)));
  const rtts = {};
  let best = null;
  edges.forEach((e, i) => {
    if (measured[i] === null) return;
    rtts[e.node] = Math.round(measured[i] * 100) / 100;
    if (best === null || measured[i] < measured[best]) best = i;
  });
  // Nothing answered a probe: the first candidate, as the server ordered them.
  const chosen = edges[best === null ? 0 : best];
  const origin = new URL(chosen.whep).origin;
  try {
    await fetch(`${origin}/v1/edges/report`, {
      method: "POST",
      headers: { ...headers, "Content-Type": "application/json" },
      body: JSON.stringify({ room, chosen: chosen.node, rtt_ms: rtts }),
    });
  } catch (_) {
    // The report is for the operator; the viewer goes on without it.
  }
  return { node: chosen.node, whep: chosen.whep, rtts, edges };
}
