//! Sessions that outlive the process: each keyed session is saved to a file of its
//! own under the runtime directory (tmpfs: a crash keeps it, a reboot, which ends
//! every client's session anyway, does not; keys never reach a disk), with the SRTP
//! indices reserved ahead of use, and read back by the next process
//! ([`super::restore`]).
//!
//! The writer runs every [`TICK`] off the packet path: it reads each session's send
//! marks from its engine, and where a stream has used half of what is reserved, it
//! persists a mark [`AHEAD`] further and only then hands it to the engine
//! (`Command::Reserve`). A stop for a restart (SIGTERM, or a take-over by a new
//! process: `webrtc/handover.rs`) seals every send context first (nothing more is
//! sent), so the marks saved then are exact and the next process continues one
//! number on. A record that cannot be written is removed and its session is no longer
//! kept (its sends released) rather than stalled at its reservation.

use std::{
    io::Write as _,
    net::IpAddr,
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use serde::Deserialize;

use super::*;
use crate::media::{engine::Persisted, srtp::Marks};

/// SRTP indices reserved past the last used one per stream. A crash shows the
/// viewer a sequence jump of at most this many; 20,000 packets/s per stream at one
/// write per [`TICK`] (a viewer's video is 100-1,000).
pub const AHEAD: u64 = 2048;
/// How often the writer looks.
pub const TICK: Duration = Duration::from_millis(50);
/// A kept session is saved again at least this often (its numbering moves on).
const REFRESH: Duration = Duration::from_secs(5);
/// Sessions read from one engine per hold of its lock.
const CHUNK: usize = 64;
/// The file format; another one is not read back.
const VERSION: u32 = 1;

/// What is kept of a session between saves.
pub struct Kept {
    rx: MasterKey,
    tx: MasterKey,
    /// What the last file says the send context may use.
    pub reserved: Marks,
    saved_at: Instant,
    /// Changed since saved (bindings, tracks, layer caps).
    pub dirty: bool,
}

impl Kept {
    pub(super) fn new(rx: MasterKey, tx: MasterKey, reserved: Marks) -> Kept {
        Kept {
            rx,
            tx,
            reserved,
            saved_at: Instant::now(),
            dirty: false,
        }
    }
}

/// One session as a file.
#[derive(Serialize, Deserialize)]
pub struct Saved {
    pub version: u32,
    pub saved_unix_us: u64,
    pub id: String,
    pub room: String,
    pub role: Role,
    pub http_source: IpAddr,
    pub ice_ufrag: String,
    pub remote_ufrag: String,
    pub addrs: Vec<SocketAddr>,
    pub nominated: Option<SocketAddr>,
    /// DTLS protection profile id, and each key as hex (key || salt).
    pub profile: u16,
    pub rx_key: String,
    pub tx_key: String,
    pub rtcp_ssrc: u32,
    pub tracks: Vec<Track>,
    pub downtracks: Vec<Subscription>,
    pub slots: Vec<Slot>,
    pub layer_prefs: Vec<(String, (u8, u8, bool))>,
    /// The send indices reserved (or, after a seal, used): the next process starts
    /// every stream one past its mark.
    pub reserved: Marks,
    pub engine: Persisted,
}

fn key_hex(k: &MasterKey) -> String {
    hex::encode([k.key(), k.salt()].concat())
}

pub(super) fn key_from_hex(profile: Profile, s: &str) -> anyhow::Result<MasterKey> {
    let b = hex::decode(s)?;
    let n = profile.master_key_len();
    anyhow::ensure!(b.len() > n, "key of {} bytes", b.len());
    Ok(MasterKey::new(profile, &b[..n], &b[n..])?)
}

fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

impl Saved {
    pub(super) fn of(s: &Session, k: &Kept, reserved: Marks, engine: Persisted) -> Saved {
        Saved {
            version: VERSION,
            saved_unix_us: unix_us(),
            id: s.id.clone(),
            room: s.room.clone(),
            role: s.role,
            http_source: s.http_source,
            ice_ufrag: s.ice_ufrag.clone(),
            remote_ufrag: s.remote_ufrag.clone(),
            addrs: s.addrs.clone(),
            nominated: s.nominated,
            profile: k.rx.profile.dtls_id(),
            rx_key: key_hex(&k.rx),
            tx_key: key_hex(&k.tx),
            rtcp_ssrc: s.rtcp_ssrc,
            tracks: s.tracks.clone(),
            downtracks: s.downtracks.clone(),
            slots: s.reserved.clone(),
            layer_prefs: s.layer_prefs.iter().map(|(m, p)| (m.clone(), *p)).collect(),
            reserved,
            engine,
        }
    }

    /// How long ago it was saved.
    pub fn age(&self) -> Duration {
        Duration::from_micros(unix_us().saturating_sub(self.saved_unix_us))
    }
}

/// The directory of one media port's kept sessions.
pub struct Keeper {
    dir: PathBuf,
    /// Held while marks are raised or sealed: a seal never races a raise.
    lock: Mutex<bool>,
}

impl Keeper {
    /// `<runtime_dir>/sessions-<netns>-<ip>-<port>` for the media address `media`,
    /// made (mode 0700) if missing. The network namespace (its inode) and the address
    /// are part of the name: daemons on one host in other namespaces, or on other
    /// addresses of the same port, each keep their own sessions (and a new daemon
    /// takes over only the one it replaces).
    pub fn open(runtime_dir: &Path, media: SocketAddr) -> anyhow::Result<Keeper> {
        use std::os::unix::fs::MetadataExt as _;
        let ns = std::fs::metadata("/proc/self/ns/net")
            .map(|m| m.ino())
            .context("reading this process's network namespace (/proc/self/ns/net)")?;
        let dir = runtime_dir.join(format!("sessions-{ns}-{}-{}", media.ip(), media.port()));
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("making {}", dir.display()))?;
        Ok(Keeper {
            dir,
            lock: Mutex::new(false),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// Writes `s` whole (a temporary file renamed over the old: a crash leaves one or
    /// the other, never half), readable by root only (it holds keys).
    pub fn save(&self, s: &Saved) -> anyhow::Result<()> {
        let tmp = self.dir.join(format!(".{}.tmp", s.id));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.write_all(&serde_json::to_vec(s)?)?;
        std::fs::rename(&tmp, self.path(&s.id))
            .with_context(|| format!("renaming into {}", self.dir.display()))?;
        Ok(())
    }

    pub fn forget(&self, id: &str) {
        let _ = self.remove(id);
    }

    /// Removes session `id`'s record (none is fine).
    pub fn remove(&self, id: &str) -> anyhow::Result<()> {
        match std::fs::remove_file(self.path(id)) {
            // Gone with its directory too (ENOTDIR: something else stands there).
            Err(e)
                if !matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
                ) =>
            {
                Err(e).with_context(|| format!("removing {}", self.path(id).display()))
            }
            _ => Ok(()),
        }
    }

    /// Every session file younger than `max_age`; older or unreadable ones are
    /// removed, saying why.
    pub fn load(&self, max_age: Duration) -> Vec<Saved> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return vec![];
        };
        let mut out = Vec::new();
        for e in entries.flatten() {
            let p = e.path();
            if p.extension().is_none_or(|x| x != "json") {
                let _ = std::fs::remove_file(&p);
                continue;
            }
            let read = std::fs::read(&p)
                .map_err(anyhow::Error::from)
                .and_then(|b| Ok(serde_json::from_slice::<Saved>(&b)?));
            match read {
                Ok(s) if s.version == VERSION && s.age() < max_age => out.push(s),
                Ok(s) => {
                    log::info!(
                        "session {} saved {:.0?} ago (consent timeout {max_age:?}): its client has given up; removed",
                        s.id,
                        s.age()
                    );
                    let _ = std::fs::remove_file(&p);
                }
                Err(e) => {
                    log::warn!("{}: {e:#}; removed", p.display());
                    let _ = std::fs::remove_file(&p);
                }
            }
        }
        out
    }
}

/// `reserved` raised to `AHEAD` past every used mark in `used`; None when every
/// stream still has more than half its reservation left.
fn raised(reserved: &Marks, used: &Marks, force: bool) -> Option<Marks> {
    let mark = |ssrc: u32| reserved.rtp.iter().find(|(s, _)| *s == ssrc).map(|x| x.1);
    let low = used
        .rtp
        .iter()
        .any(|&(ssrc, u)| mark(ssrc).is_none_or(|r| u + AHEAD / 2 >= r))
        || used.rtcp.is_some_and(|u| {
            reserved
                .rtcp
                .is_none_or(|r| u as u64 + AHEAD / 2 >= r as u64)
        });
    if !low && !force {
        return None;
    }
    let mut out = reserved.clone();
    for &(ssrc, u) in &used.rtp {
        match out.rtp.iter_mut().find(|(s, _)| *s == ssrc) {
            Some(x) => x.1 = x.1.max(u + AHEAD),
            None => out.rtp.push((ssrc, u + AHEAD)),
        }
    }
    if let Some(u) = used.rtcp {
        out.rtcp = Some(out.rtcp.unwrap_or(0).max(u.saturating_add(AHEAD as u32)));
    }
    Some(out)
}

/// What a new session reserves at its keys: every SSRC its answer announced from its
/// chosen start, and SRTCP from 0.
fn first_reservation(s: &Session) -> Marks {
    let starts = s
        .downtracks
        .iter()
        .map(|d| (d.ssrc_out, d.rtx, d.start))
        .chain(s.reserved.iter().map(|r| (r.ssrc_out, r.rtx, r.start)));
    let mut rtp = Vec::new();
    for (ssrc, rtx, start) in starts {
        rtp.push((ssrc, start.index + AHEAD));
        if let (Some((_, r)), Some(i)) = (rtx, start.rtx_index) {
            rtp.push((r, i + AHEAD));
        }
    }
    Marks {
        rtp,
        rtcp: Some(AHEAD as u32),
    }
}

impl Sfu {
    /// DTLS keyed session `s`: saved with its first reservation, which its keys then
    /// carry. None (the session is not kept) without a keeper, when the save fails, or
    /// for a session over ICE-TCP (its connection ends with this process; the client
    /// joins again).
    pub(super) fn keep_first(
        &self,
        s: &mut Session,
        rx: &MasterKey,
        tx: &MasterKey,
    ) -> Option<crate::media::engine::Reserve> {
        let keeper = self.keep.as_ref()?;
        if let Some(t) = self.ice_tcp.get()
            && s.addrs.iter().any(|a| t.client_of(a).is_some())
        {
            return None;
        }
        let kept = Kept::new(rx.clone(), tx.clone(), first_reservation(s));
        let saved = Saved::of(s, &kept, kept.reserved.clone(), Persisted::default());
        if let Err(e) = keeper.save(&saved) {
            log::warn!("session {}: {e:#}; it will not survive a restart", s.id);
            return None;
        }
        let up_to = kept.reserved.clone();
        s.kept = Some(kept);
        Some(crate::media::engine::Reserve { after: None, up_to })
    }

    /// The writer's round: raises the reservations of streams that used half of
    /// theirs and saves changed sessions, persisting before granting.
    pub fn keep_tick(&self) {
        let Some(keeper) = &self.keep else { return };
        let sealed = keeper.lock.lock().unwrap();
        if *sealed {
            return;
        }
        let now = Instant::now();
        let views = self.engine_views(now, false);
        let mut writes = Vec::new();
        {
            let st = self.state.lock().unwrap();
            for (id, media, p) in views {
                let Some(s) = st.sessions.get(&id).filter(|s| s.media == media) else {
                    continue;
                };
                let Some(k) = &s.kept else { continue };
                let force = k.dirty || now.duration_since(k.saved_at) >= REFRESH;
                if let Some(up_to) = raised(&k.reserved, &p.tx, force) {
                    writes.push((
                        s.id.clone(),
                        media,
                        Saved::of(s, k, up_to.clone(), p),
                        up_to,
                    ));
                }
            }
        }
        for (id, media, saved, up_to) in writes {
            if let Err(e) = keeper.save(&saved) {
                self.unkeep(keeper, &id, media, &e);
                continue;
            }
            self.command(Command::Reserve {
                id: media,
                up_to: up_to.clone(),
            });
            if let Some(k) = self
                .state
                .lock()
                .unwrap()
                .sessions
                .get_mut(&id)
                .and_then(|s| s.kept.as_mut())
            {
                k.reserved = up_to;
                k.saved_at = now;
                k.dirty = false;
            }
        }
    }

    /// A session whose record could not be written (a full or read-only runtime
    /// directory): rather than stall it at its reservation, it stops being kept. Its
    /// record is removed first; only if that worked may it send past what the record
    /// said (no later process can resume its keys then). It ends with this process.
    fn unkeep(&self, keeper: &Keeper, id: &str, media: SessionId, e: &anyhow::Error) {
        match keeper.remove(id) {
            Ok(()) => {
                log::warn!(
                    "session {id}: {e:#}; it is no longer kept for the next process (it ends \
                     with this one); give [webrtc] runtime_dir room"
                );
                self.command(Command::Unkeep { id: media });
                if let Some(s) = self.state.lock().unwrap().sessions.get_mut(id) {
                    s.kept = None;
                }
            }
            Err(r) => log::error!(
                "session {id}: {e:#}, and its old record cannot be removed ({r:#}): it sends \
                 only what that record covers, then stalls (fix [webrtc] runtime_dir)"
            ),
        }
    }

    /// Each kept session's engine view (sealed: nothing more is sent). A shard's
    /// engine is held for [`CHUNK`] sessions at a time, so its worker waits
    /// microseconds, not a pass over every session.
    fn engine_views(&self, now: Instant, seal: bool) -> Vec<(String, SessionId, Persisted)> {
        let kept: Vec<(String, SessionId)> = {
            let st = self.state.lock().unwrap();
            st.sessions
                .values()
                .filter(|s| s.kept.is_some())
                .map(|s| (s.id.clone(), s.media))
                .collect()
        };
        let mut out = Vec::new();
        for shard in 0..self.shards() {
            let mine: Vec<&(String, SessionId)> = kept
                .iter()
                .filter(|(_, m)| self.shard_of(*m) == shard)
                .collect();
            for chunk in mine.chunks(CHUNK) {
                self.with_shard(shard, |e, _| {
                    for (id, m) in chunk {
                        let p = if seal {
                            e.seal(*m, now)
                        } else {
                            e.persisted(*m, now)
                        };
                        if let Some(p) = p {
                            out.push((id.clone(), *m, p));
                        }
                    }
                });
            }
        }
        out
    }

    /// A stop for a restart: every kept session's send side sealed and saved with
    /// exact marks. Returns how many were saved.
    pub fn keep_on_stop(&self) -> usize {
        let Some(keeper) = &self.keep else { return 0 };
        let mut sealed = keeper.lock.lock().unwrap();
        *sealed = true;
        let views = self.engine_views(Instant::now(), true);
        let st = self.state.lock().unwrap();
        let mut n = 0;
        for (id, media, p) in views {
            let Some(s) = st.sessions.get(&id).filter(|s| s.media == media) else {
                continue;
            };
            let Some(k) = &s.kept else { continue };
            // Exact: one past these is the next index, and nothing was sent past them.
            let mut exact = p.tx.clone();
            for (ssrc, mark) in &k.reserved.rtp {
                if !exact.rtp.iter().any(|(s, _)| s == ssrc) {
                    // Reserved, never used: the start is the mark minus AHEAD.
                    exact.rtp.push((*ssrc, mark.saturating_sub(AHEAD)));
                }
            }
            match keeper.save(&Saved::of(s, k, exact, p)) {
                Ok(()) => n += 1,
                Err(e) => log::warn!("session {}: {e:#}; lost at this restart", s.id),
            }
        }
        n
    }
}
