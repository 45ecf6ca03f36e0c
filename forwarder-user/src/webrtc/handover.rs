//! Taking over from a running daemon on the same media port: an upgrade or a planned
//! restart where the new process starts before the old one stops.
//!
//! The new `edgefwd run` does its slow start (loading and attaching the XDP program)
//! while the old one still serves, then connects to the old one's hand-over socket
//! (`<runtime_dir>/sessions-<netns>-<ip>-<port>/handover.sock`, root only: one per
//! namespace and media address). The old one seals and
//! saves its sessions (as for SIGTERM), passes its media socket over the Unix socket
//! (SCM_RIGHTS) and exits; the new one waits until it is gone (its AF_XDP sockets are
//! closed with it, so the queues are free), then takes the sessions up on the same
//! socket. Datagrams that arrive in between wait in that socket's buffer (on the AF_XDP
//! path too: with no AF_XDP socket on a queue, XDP passes media to the kernel, which
//! queues it there) instead of meeting a closed port.

use std::{
    io::{IoSlice, IoSliceMut, Read as _, Write as _},
    os::{
        fd::{AsRawFd as _, FromRawFd as _, RawFd},
        unix::net::UnixStream,
    },
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};

use super::sfu::Sfu;

/// The socket's name in the kept sessions' directory.
const SOCKET: &str = "handover.sock";
/// What the new process asks, and the old one answers with the socket.
const TAKE: &[u8] = b"take\n";
const OK: &[u8] = b"ok\n";
/// How long the new process waits for the old one's socket and then for its end.
const WAIT: Duration = Duration::from_secs(10);

/// If a daemon serves this media port (its hand-over socket answers in `dir`), takes
/// its media socket over: returns it once that process has exited. None when no
/// daemon answers (a stale socket file is removed).
pub fn take(dir: &Path) -> Result<Option<std::net::UdpSocket>> {
    let path = dir.join(SOCKET);
    let mut conn = match UnixStream::connect(&path) {
        Ok(c) => c,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            let _ = std::fs::remove_file(&path);
            return Ok(None);
        }
        Err(e) => return Err(e).with_context(|| format!("connecting to {}", path.display())),
    };
    log::info!("a daemon serves this media port: taking its sessions over");
    let old =
        nix::sys::socket::getsockopt(conn.as_raw_fd(), nix::sys::socket::sockopt::PeerCredentials)
            .map(|c| c.pid())
            .context("reading the old daemon's pid (SO_PEERCRED)")?;
    conn.set_read_timeout(Some(WAIT))?;
    conn.write_all(TAKE)?;
    let mut answer = [0u8; 8];
    let mut iov = [IoSliceMut::new(&mut answer)];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let fd = recvmsg::<()>(
        conn.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::empty(),
    )
    .ok()
    .and_then(|msg| {
        msg.cmsgs().find_map(|c| match c {
            ControlMessageOwned::ScmRights(fds) => fds.first().copied(),
            _ => None,
        })
    });
    // SAFETY: SCM_RIGHTS gave this process a new descriptor that nothing else owns.
    let socket = fd.map(|fd| unsafe { std::net::UdpSocket::from_raw_fd(fd) });
    // The old process's end closes when it exits: its AF_XDP sockets are gone then.
    // Without the socket (it failed to send it), its sessions are still saved, and
    // its port is free once it is gone: this process binds it and takes them up.
    let mut rest = Vec::new();
    if let Err(e) = conn.read_to_end(&mut rest) {
        bail!(
            "the daemon on {} did not exit within {WAIT:?} of handing its sessions over \
             ({e}); stop it (SIGTERM keeps its sessions) and start this one again",
            path.display()
        );
    }
    // Its end of this connection may close before its listeners do: gone means its
    // process is gone (or a zombie, which holds nothing).
    gone(old)?;
    if socket.is_none() {
        log::warn!("the old daemon exited without handing its media socket over; binding it anew");
    }
    Ok(socket)
}

/// Waits until process `pid` has released everything it held: it no longer exists,
/// or only as a zombie (every thread through its exit) its parent has not reaped yet.
fn gone(pid: i32) -> Result<()> {
    let status = format!("/proc/{pid}/status");
    let until = std::time::Instant::now() + WAIT;
    loop {
        match std::fs::read_to_string(&status) {
            Err(_) => return Ok(()),
            // A zombie leader may still have threads in their exit, holding the
            // files: gone once it is the only one left.
            Ok(s) if zombie_alone(&s) => return Ok(()),
            Ok(_) if std::time::Instant::now() > until => {
                bail!(
                    "the daemon (pid {pid}) that handed its sessions over has not exited in {WAIT:?}; kill it"
                )
            }
            Ok(_) => std::thread::sleep(Duration::from_millis(1)),
        }
    }
}

/// A /proc status of a zombie with no thread left but itself.
fn zombie_alone(status: &str) -> bool {
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .map(str::trim)
            .unwrap_or("")
    };
    field("State:").starts_with('Z') && field("Threads:") == "1"
}

/// Answers take-over requests for `sfu`'s media socket in `dir`: the first one seals
/// and saves the sessions, hands the socket over and ends this process.
pub fn serve(sfu: Arc<Sfu>, dir: PathBuf) -> Result<()> {
    let path = dir.join(SOCKET);
    let _ = std::fs::remove_file(&path);
    let listener = std::os::unix::net::UnixListener::bind(&path)
        .with_context(|| format!("listening on {}", path.display()))?;
    std::thread::Builder::new()
        .name("edgefwd-handover".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                let mut ask = [0u8; TAKE.len()];
                if conn.read_exact(&mut ask).is_err() || ask != TAKE {
                    continue;
                }
                let n = sfu.keep_on_stop();
                let fd = sfu.media_fd();
                let iov = [IoSlice::new(OK)];
                let fds = [fd];
                match sendmsg::<()>(
                    conn.as_raw_fd(),
                    &iov,
                    &[ControlMessage::ScmRights(&fds)],
                    MsgFlags::empty(),
                    None,
                ) {
                    Ok(_) => {
                        log::info!(
                            "handed {n} session(s) and the media socket to the next process; exiting"
                        );
                        // Now, without unwinding: the sessions are sealed, and whatever
                        // this process would still do belongs to the next one.
                        std::process::exit(0);
                    }
                    Err(e) => {
                        // Sealed: this process may send nothing more. The sessions are
                        // saved, so the next process takes them up from the files.
                        log::error!("handing the media socket over: {e}; exiting");
                        std::process::exit(1);
                    }
                }
            }
        })
        .context("starting the hand-over thread")?;
    Ok(())
}
