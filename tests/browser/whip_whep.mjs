// One browser scenario against a running edgefwd, through its built-in page:
//   publish: a Chromium publishes the fake camera + microphone over WHIP;
//   watch:   a second Chromium process subscribes over WHEP and must decode;
//   view:    a Chromium opens the page's live view and waits until it shows --expect
//            connected sessions of the room with traffic, then saves --screenshot.
//   simulcast: a Chromium publishes three simulcast encodings; two viewers watch, one
//            capped to the lowest layer through its WHEP resource (PUT .../layers);
//            once both decode, the cap is lifted and the capped one must move up.
//   sample:  a Chromium subscribes over WHEP and prints its video stats (decoded frame
//            size, frames, freezes) and connection states as one JSON line a second
//            for --hold seconds.
//   svc:     a Chromium publishes one VP9 encoding with spatial and temporal layers
//            (--svc, e.g. L3T3_KEY); two viewers watch, one capped to spatial layer 0;
//            the other is then capped to temporal layer 0 (its frame rate must drop)
//            and the first one's cap is lifted (its picture must grow).
//   move:    a Chromium watches through /v1/edges (the page's edge choice); once it
//            decodes it prints {"whep": RESOURCE}; the caller kills that node, and
//            the page must move to another node and decode there.
// --edges makes the watch role choose its node the same way.
// --simulcast makes the publish role send three encodings, --svc MODE one scalable one.
// Prints one JSON object on stdout (the Rust test asserts on it); exits non-zero
// with the reason on stderr if the subscriber never decodes.
//
//   node whip_whep.mjs --base http://127.0.0.1:8080 --room r1 [--codec VP8|H264]
//        [--no-pqc] [--role both|publish|watch|view|simulcast] [--hold SECONDS] [--timeout SECONDS]
//        [--expect N] [--screenshot PNG] [--simulcast] [--watch-base URL] [--svc MODE] [--edges]
import { chromium } from 'playwright-core';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const args = process.argv.slice(2);
const opt = (name, dflt) => {
  const i = args.indexOf('--' + name);
  return i >= 0 ? args[i + 1] : dflt;
};
const flag = name => args.includes('--' + name);
const base = opt('base');
const room = opt('room', 'test');
const codec = opt('codec', '');
const role = opt('role', 'both');
const hold = Number(opt('hold', '0'));
const timeoutMs = Number(opt('timeout', '40')) * 1000;
const expect = Number(opt('expect', '1'));
const screenshot = opt('screenshot', '');
// simulcast: the viewers watch on this node (a cascade: published on --base).
const watchBase = opt('watch-base', base);
const svc = opt('svc', '');
if (!base) {
  console.error('usage: whip_whep.mjs --base URL [--room R] [--codec VP8|H264] [--no-pqc] [--role both|publish|watch]');
  process.exit(2);
}

const dirs = [];
async function launch(origin = base) {
  const dir = mkdtempSync(join(tmpdir(), 'edgefwd-chromium-'));
  dirs.push(dir);
  const extra = flag('no-pqc') ? ['--disable-features=WebRtcPqcForDtls'] : [];
  // Recvonly transceivers offer AV1's dependency descriptor only with this trial
  // (a sender offers it for SVC); without it a viewer cannot assemble AV1 SVC frames.
  extra.push('--force-fieldtrials=WebRTC-DependencyDescriptorAdvertised/Enabled/');
  // getUserMedia needs a secure context; off loopback (the SFU in a network
  // namespace) plain http is one only by this flag.
  extra.push('--unsafely-treat-insecure-origin-as-secure=' + origin);
  // launchPersistentContext owns --user-data-dir: a fresh profile per process.
  const ctx = await chromium.launchPersistentContext(dir, {
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: [
      '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
      '--use-fake-device-for-media-stream', '--use-fake-ui-for-media-stream',
      '--allow-loopback-in-peer-connection', ...extra,
    ],
  });
  const page = ctx.pages()[0] || await ctx.newPage();
  page.on('console', m => { if (m.type() === 'error') console.error('[page]', m.text()); });
  await page.goto(origin + '/');
  return { ctx, page };
}

const sleep = ms => new Promise(r => setTimeout(r, ms));
// A viewer's inbound video stats, and both viewers' of a two-viewer scenario.
const videoOf = async b => (await b.page.evaluate(() => window.summary(window.subPc))).inbound.video || {};
const videoOfBoth = async (low, high) => ({ low: await videoOf(low), high: await videoOf(high) });
// Waits until `done(low, high)` holds for the two viewers' video stats.
async function untilBoth(low, high, what, done) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await videoOfBoth(low, high);
    if (done(v.low, v.high)) return v;
    if (Date.now() > deadline) throw new Error(`${what} within ${timeoutMs / 1000} s: ${JSON.stringify(v)}`);
    await sleep(500);
  }
}
const result = { codec, pqc: !flag('no-pqc') };
const browsers = [];
let ok = true;
try {
  let pub, sub;
  if (role === 'simulcast') {
    pub = await launch();
    browsers.push(pub);
    result.whip = await pub.page.evaluate(([r, c]) => window.publish(r, c, true), [room, codec]);
    const low = await launch(watchBase), high = await launch(watchBase);
    browsers.push(low, high);
    await low.page.evaluate(r => window.watch(r), room);
    result.capped = await low.page.evaluate(() => window.setLayers({ max_layer: 0 }));
    await high.page.evaluate(r => window.watch(r), room);
    const until = (what, done) => untilBoth(low, high, what, done);
    result.before = await until('the capped viewer did not get a smaller layer than the other',
      (l, h) => l.framesDecoded > 30 && h.framesDecoded > 30 && l.frameWidth > 0 && h.frameWidth > l.frameWidth);
    // With the SFU's transport feedback, the publisher's estimate rises and it sends
    // its top encoding: the uncapped viewer gets to the full-size picture.
    result.top = await until('the uncapped viewer did not get the top (full-size) layer',
      (l, h) => h.frameWidth >= 960);
    result.publisher = await pub.page.evaluate(() => window.summary(window.pubPc));
    result.lifted = await low.page.evaluate(() => window.setLayers({ max_layer: null }));
    const t0 = Date.now();
    result.after = await until('the viewer did not move up after its cap was lifted',
      l => l.frameWidth > result.before.low.frameWidth);
    result.switchMs = Date.now() - t0;
    // Two more seconds of decoding on the new layer, so a freeze would show.
    await sleep(2000);
    result.settled = await videoOfBoth(low, high);
    result.api = await (await fetch(watchBase + '/api/sessions')).json();
    for (const b of [low, high, pub]) await b.page.evaluate(() => window.leave());
  } else if (role === 'svc') {
    pub = await launch();
    browsers.push(pub);
    result.whip = await pub.page.evaluate(([r, c, m]) => window.publish(r, c, false, m), [room, codec, svc]);
    const low = await launch(watchBase), high = await launch(watchBase);
    browsers.push(low, high);
    await low.page.evaluate(r => window.watch(r), room);
    result.capped = await low.page.evaluate(() => window.setLayers({ max_layer: 0 }));
    await high.page.evaluate(r => window.watch(r), room);
    const both = () => videoOfBoth(low, high);
    const until = (what, done) => untilBoth(low, high, what, done);
    // Frames decoded per second by each viewer over `ms`.
    const rate = async ms => {
      const a = await both();
      await sleep(ms);
      const b = await both();
      const fps = k => (b[k].framesDecoded - a[k].framesDecoded) * 1000 / ms;
      return { low: fps('low'), high: fps('high'), at: b };
    };
    result.before = await until('the capped viewer did not get a smaller picture than the other',
      (l, h) => l.framesDecoded > 30 && h.framesDecoded > 30 && l.frameWidth > 0 && h.frameWidth > l.frameWidth);
    result.top = await until('the uncapped viewer did not get the full-size picture (spatial layer 2)',
      (l, h) => h.frameWidth >= 960);
    result.publisher = await pub.page.evaluate(() => window.summary(window.pubPc));
    result.fullRate = await rate(4000);
    result.temporalCapped = await high.page.evaluate(() => window.setLayers({ max_temporal: 0 }));
    await sleep(1000);
    result.baseRate = await rate(4000);
    result.lifted = await low.page.evaluate(() => window.setLayers({ max_layer: null }));
    result.after = await until('the viewer did not get a larger picture after its cap was lifted',
      l => l.frameWidth > result.before.low.frameWidth);
    await sleep(2000);
    result.settled = await both();
    result.api = await (await fetch(watchBase + '/api/sessions')).json();
    for (const b of [low, high, pub]) await b.page.evaluate(() => window.leave());
  } else if (role === 'view') {
    const v = await launch();
    browsers.push(v);
    // The page shows this room's tree of nodes (with a cluster directory).
    await v.page.evaluate(r => { document.getElementById('room').value = r; }, room);
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      result.rows = await v.page.evaluate(r => [...document.querySelectorAll('table[data-room] tr[data-session]')]
        .filter(tr => tr.closest('table').dataset.room === r)
        .map(tr => ({ ...tr.dataset, text: tr.innerText, sparkline: !!tr.querySelector('canvas') })), room);
      // A few seconds of samples, so the sparklines in the screenshot show something.
      // A subscriber's row also waits for its first receiver report (loss and RTT).
      const live = result.rows.filter(x => x.connected === 'true' && Number(x.pps) > 0 && Number(x.samples) >= 4 &&
        x.loss !== undefined && (x.role !== 'subscriber' || x.rtt !== undefined));
      if (live.length >= expect) break;
      if (Date.now() > deadline) {
        ok = false;
        console.error(`the live view did not show ${expect} live session(s) of ${room} within ${timeoutMs / 1000} s: ${JSON.stringify(result.rows)}`);
        break;
      }
      await sleep(500);
    }
    result.status = await v.page.evaluate(() => document.getElementById('livestatus').textContent);
    result.tree = await v.page.evaluate(() => document.getElementById('tree').textContent);
    if (screenshot) await v.page.screenshot({ path: screenshot, fullPage: true });
  } else if (role === 'move') {
    // A viewer through /v1/edges that must survive its node: once it decodes it
    // prints {"whep": RESOURCE} (the test kills that node), then waits until the page
    // moved to another node and decodes there.
    sub = await launch();
    browsers.push(sub);
    result.whep = await sub.page.evaluate(r => window.watch(r, true), room);
    const frames = async () => ((await sub.page.evaluate(() => window.summary(window.subPc))).inbound.video || {}).framesDecoded || 0;
    const deadline = Date.now() + timeoutMs;
    while (await frames() <= 30) {
      if (Date.now() > deadline) throw new Error('the viewer did not decode before its node was killed');
      await sleep(250);
    }
    console.log(JSON.stringify({ whep: result.whep }));
    const killedAt = Date.now();
    for (;;) {
      const moves = await sub.page.evaluate(() => window.moves);
      if (moves > 0 && await frames() > 30) break;
      if (Date.now() > deadline + 30000) throw new Error('the viewer did not move and decode at another node');
      await sleep(100);
    }
    result.movedMs = Date.now() - killedAt;
    result.moves = await sub.page.evaluate(() => window.moves);
    result.moveReasons = await sub.page.evaluate(() => window.moveReasons);
    result.subscriber = await sub.page.evaluate(() => window.summary(window.subPc));
    result.log = await sub.page.evaluate(() => document.getElementById('log').textContent);
  } else if (role === 'sample') {
    sub = await launch();
    browsers.push(sub);
    result.whep = await sub.page.evaluate(r => window.watch(r), room);
    const end = Date.now() + hold * 1000;
    while (Date.now() < end) {
      const s = await sub.page.evaluate(() => window.summary(window.subPc));
      const state = await sub.page.evaluate(() => [window.subPc.connectionState, window.subPc.iceConnectionState]);
      console.log(JSON.stringify({ at: Date.now(), video: s.inbound.video || {}, state: state[0], ice: state[1] }));
      await sleep(1000);
    }
  } else if (role !== 'watch' && role !== 'simulcast' && role !== 'svc' && role !== 'move') {
    pub = await launch();
    browsers.push(pub);
    result.whip = await pub.page.evaluate(([r, c, sim, m]) => window.publish(r, c, sim, m), [room, codec, flag('simulcast'), svc]);
  }
  if (role === 'view' || role === 'simulcast' || role === 'sample' || role === 'svc' || role === 'move') {
    // Done above.
  } else if (role === 'publish') {
    await sleep(hold * 1000);
    result.publisher = await pub.page.evaluate(() => window.summary(window.pubPc));
    result.pubMoves = await pub.page.evaluate(() => window.pubMoves);
    result.pubMoveReasons = await pub.page.evaluate(() => window.pubMoveReasons);
  } else {
    sub = await launch();
    browsers.push(sub);
    // --edges: the node chosen as the page does, by probes to /v1/edges' candidates.
    result.whep = await sub.page.evaluate(([r, e]) => window.watch(r, e), [room, flag('edges')]);
    const deadline = Date.now() + timeoutMs;
    let s;
    for (;;) {
      s = await sub.page.evaluate(() => window.summary(window.subPc));
      const v = s.inbound.video, a = s.inbound.audio;
      // A few seconds of decoding, so keyframe, NACK and RTCP paths have run.
      if (v && v.framesDecoded > 30 && a && a.packetsReceived > 50) break;
      if (Date.now() > deadline) {
        ok = false;
        console.error(`subscriber did not decode within ${timeoutMs / 1000} s: ${JSON.stringify(s)}`);
        break;
      }
      await sleep(500);
    }
    await sleep(hold * 1000);
    result.subscriber = await sub.page.evaluate(() => window.summary(window.subPc));
    if (pub) result.publisher = await pub.page.evaluate(() => window.summary(window.pubPc));
    // DELETE with the peer connections still up, then the server's view: only DELETE
    // can have ended the sessions by then.
    result.deleted = await sub.page.evaluate(() => window.deleteSessions());
    if (pub) result.deleted.push(...await pub.page.evaluate(() => window.deleteSessions()));
    result.afterDelete = await (await fetch(base + '/api/sessions')).json();
    await sub.page.evaluate(() => window.leave());
  }
  if (pub && role !== 'simulcast' && role !== 'svc') await pub.page.evaluate(() => window.leave());
} catch (e) {
  ok = false;
  console.error(String(e && e.stack || e));
} finally {
  for (const b of browsers) await b.ctx.close().catch(() => {});
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
}
console.log(JSON.stringify(result));
process.exit(ok ? 0 : 1);
