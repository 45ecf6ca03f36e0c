//! Test support: network-namespace guards, pin-directory guards, packet builders, and a
//! lock that serialises tests touching kernel state.

pub mod bench;
pub mod netns;
pub mod pkt;
pub mod rawsock;

pub use rawsock::RawSock;

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Mutex, MutexGuard,
        atomic::{AtomicU32, Ordering},
    },
};

static KERNEL: Mutex<()> = Mutex::new(());
static SEQ: AtomicU32 = AtomicU32::new(0);

/// Tests that attach programs, create namespaces or pin maps run one at a time.
pub fn kernel_lock() -> MutexGuard<'static, ()> {
    KERNEL.lock().unwrap_or_else(|p| p.into_inner())
}

/// A name unique to this process and call, for namespaces and pin dirs.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}x{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// Whether `name` is `<prefix><pid>x<n>` (from [`unique`]) of a process that is gone.
/// Guards clean up on drop, panics included, but a test or bench killed by a signal
/// never drops them; what it left is recognisable by its dead owner.
pub fn orphaned(name: &str, prefix: &str) -> bool {
    let Some(rest) = name.strip_prefix(prefix) else {
        return false;
    };
    let Some(pid) = rest.split('x').next().and_then(|p| p.parse::<u32>().ok()) else {
        return false;
    };
    pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists()
}

/// Removes pin directories left by killed processes (once per process).
fn sweep_pin_dirs() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        for e in std::fs::read_dir("/sys/fs/bpf")
            .into_iter()
            .flatten()
            .flatten()
        {
            if orphaned(&e.file_name().to_string_lossy(), "edgefwd-test-") {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    });
}

pub fn require_root() {
    assert!(
        // SAFETY: geteuid(2) has no preconditions and cannot fail.
        unsafe { libc::geteuid() } == 0,
        "this test loads XDP programs and creates network namespaces: run it as root \
         (cargo xtask test does)"
    );
}

/// A pin directory on bpffs, removed (with the maps pinned in it) on drop.
pub struct PinDir(pub PathBuf);

impl PinDir {
    pub fn new() -> PinDir {
        require_root();
        sweep_pin_dirs();
        let p = PathBuf::from("/sys/fs/bpf").join(unique("edgefwd-test-"));
        PinDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Default for PinDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The edgefwd binary built beside this test (cargo xtask test builds it first).
pub fn edgefwd_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // Binaries sit beside edgefwd in target/<profile>/, tests one level down in deps/.
    let dir = exe.parent().expect("target dir");
    let p = if dir.ends_with("deps") {
        dir.parent().unwrap()
    } else {
        dir
    }
    .join("edgefwd");
    assert!(
        p.exists(),
        "{} not found: build it first (`cargo build -p forwarder-user`; cargo xtask test does)",
        p.display()
    );
    p
}

/// Starts `edgefwd run` and waits for its "forwarding on" line (printed once routes are
/// programmed). Its log (stderr) stays on the caller's stderr. The daemon gets SIGTERM
/// when the calling thread ends, so a test or bench killed by a signal (no unwinding,
/// no guard drop) does not leave it running: call this from the thread that owns the
/// guard.
/// A free TCP and UDP port on loopback (bound, then let go): for a daemon on fixed
/// ports, which a restarted one binds again.
pub fn free_port() -> u16 {
    let t = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = t.local_addr().unwrap().port();
    std::net::UdpSocket::bind(("127.0.0.1", port)).map_or_else(|_| free_port(), |_| port)
}

pub fn spawn_edgefwd(mut cmd: Command) -> Edgefwd {
    use std::os::unix::process::CommandExt;
    // SAFETY: the pre_exec closure only calls prctl (async-signal-safe) between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.stdout(Stdio::piped()).spawn().expect("start edgefwd");
    let mut line = String::new();
    let _ = BufReader::new(child.stdout.take().unwrap()).read_line(&mut line);
    if !line.contains("forwarding on") {
        let status = child.wait();
        panic!("edgefwd did not start ({status:?}); first line {line:?}; its log is above");
    }
    print!("{line}");
    Edgefwd(Some(child), line.trim().to_string())
}

/// Writes `config` to a temporary file and starts `edgefwd run --iface IFACE` with it in
/// `ns`, maps pinned at `pin`, plus `extra` arguments; the config file is removed once
/// the daemon is up (it has read it).
pub fn start_node(
    ns: &netns::NetNs,
    pin: &Path,
    iface: &str,
    config: &str,
    extra: &[&str],
    cpu: Option<usize>,
) -> Edgefwd {
    let cfg = std::env::temp_dir().join(format!("{}.toml", unique("edgefwd-cfg")));
    std::fs::write(&cfg, config).unwrap();
    let mut cmd = ns.command(edgefwd_bin().to_str().unwrap());
    cmd.args([
        "--pin-dir",
        pin.to_str().unwrap(),
        "run",
        "--iface",
        iface,
        "--config",
    ])
    .arg(&cfg)
    .args(extra);
    if let Some(cpu) = cpu {
        use std::os::unix::process::CommandExt;
        // SAFETY: sched_setaffinity on the child itself, with a set we built.
        unsafe {
            // The whole daemon (every thread it starts inherits this) on that core.
            cmd.pre_exec(move || {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(cpu, &mut set);
                libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
                Ok(())
            });
        }
    }
    let child = spawn_edgefwd(cmd);
    let _ = std::fs::remove_file(&cfg);
    child
}

/// Gives a test socket a receive buffer of `bytes` (SO_RCVBUFFORCE, as root): tests that
/// read only after a stream ended need room for all of it.
pub fn big_rcvbuf(s: &std::net::UdpSocket, bytes: i32) {
    // SAFETY: setsockopt on the caller's socket with a live int.
    unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(s),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&bytes as *const i32).cast(),
            4,
        )
    };
}

/// A running `edgefwd`. Dropping it stops the daemon too, so a test or bench that
/// panics leaves no daemon behind (one would keep its namespace alive and hold the
/// caller's stderr pipe open, which hangs `cmd | tail`).
pub struct Edgefwd(Option<Child>, String);

impl Edgefwd {
    /// The daemon's "forwarding on ..." line (it names the XDP attach mode).
    pub fn ready_line(&self) -> &str {
        &self.1
    }

    /// An address the ready line reports as `key=addr` (`metrics`, `webrtc-http`,
    /// `webrtc-media`, `webrtc-admin`): where the daemon bound a port-0 setting.
    pub fn ready_addr(&self, key: &str) -> std::net::SocketAddr {
        let prefix = format!("{key}=");
        self.1
            .split_whitespace()
            .find_map(|w| w.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("the ready line names no {key}: {:?}", self.1))
            .parse()
            .unwrap_or_else(|e| panic!("{key} in the ready line is no address ({e}): {:?}", self.1))
    }

    pub fn id(&self) -> u32 {
        self.0.as_ref().map_or(0, Child::id)
    }

    /// SIGKILL, as a crash or the OOM killer would end it; waits until it is gone.
    pub fn kill9(&mut self) {
        let mut child = self.0.take().expect("edgefwd already stopped");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Waits up to `timeout` for the daemon to exit by itself (it handed its sessions
    /// over to a new process); None if it still runs.
    pub fn wait_exit(&mut self, timeout: std::time::Duration) -> Option<std::process::ExitStatus> {
        let child = self.0.as_mut().expect("edgefwd already stopped");
        let until = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < until {
            if let Some(status) = child.try_wait().expect("waiting for edgefwd") {
                self.0 = None;
                return Some(status);
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        None
    }

    /// SIGTERM, then waits: the daemon exits (XDP stays attached through its pinned
    /// link; `edgefwd down` removes it). SIGKILL after 10 s, so
    /// a hung daemon fails the caller instead of hanging it.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        self.stop_timed().0
    }

    /// [`Edgefwd::stop`], and how long the daemon took to exit after SIGTERM.
    pub fn stop_timed(&mut self) -> (std::process::ExitStatus, std::time::Duration) {
        let mut child = self.0.take().expect("edgefwd already stopped");
        let start = std::time::Instant::now();
        // SAFETY: kill(2) with the pid of our own child, which has not been reaped yet.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        for _ in 0..10_000 {
            if let Some(status) = child.try_wait().expect("waiting for edgefwd") {
                return (status, start.elapsed());
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let _ = child.kill();
        let status = child.wait().expect("waiting for edgefwd");
        panic!("edgefwd ignored SIGTERM for 10 s and was killed ({status})");
    }
}

impl Drop for Edgefwd {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            // Already unwinding or done with it: no clean shutdown needed.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `cmd.output()` with a deadline: a child still running after `limit` is killed and
/// the test fails, naming the command, instead of hanging CI.
pub fn output_within(cmd: &mut Command, limit: std::time::Duration) -> std::process::Output {
    use std::io::Read;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    // Drained on threads, so a chatty child cannot block on a full pipe meanwhile.
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            v
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("waiting for a child") {
            break s;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = err.join().unwrap_or_default();
            panic!(
                "{cmd:?} still running after {limit:?}: killed. Its stderr:\n{}",
                String::from_utf8_lossy(&stderr)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    std::process::Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

const CHART_FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// Registers the benchmark charts' font ("sans-serif"), read from its file: plotters
/// renders text through ab_glyph, without fontconfig.
pub fn register_chart_font() -> Result<(), Box<dyn std::error::Error>> {
    let font = std::fs::read(CHART_FONT).map_err(|e| {
        format!("{CHART_FONT}: {e}; install fonts-dejavu-core (cargo xtask setup does)")
    })?;
    plotters::style::register_font(
        "sans-serif",
        plotters::style::FontStyle::Normal,
        Box::leak(font.into()),
    )
    .map_err(|_| "registering the chart font failed")?;
    Ok(())
}

/// A real `redis-server` (Debian's, installed by `cargo xtask setup`) on a free
/// loopback port, without persistence; stopped on drop.
pub struct RedisServer {
    child: Child,
    pub port: u16,
    /// Where it listens, and the network namespace it runs in (None: this one).
    host: String,
    netns: Option<String>,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        Self::start_on(port, "127.0.0.1", None)
    }

    /// A server in network namespace `ns` on `ip`:6379, for nodes in other namespaces
    /// that reach `ip`.
    pub fn start_in(ns: &netns::NetNs, ip: &str) -> RedisServer {
        Self::start_on(6379, ip, Some(ns.name.clone()))
    }

    fn command(&self, program: &str) -> Command {
        match &self.netns {
            Some(n) => netns::command_in(n, program),
            None => Command::new(program),
        }
    }

    /// A new, empty server on the port a killed one had (Redis restarted, its data
    /// lost).
    pub fn restart(&mut self) {
        self.kill();
        let fresh = Self::start_on(self.port, &self.host, self.netns.clone());
        *self = fresh;
    }

    fn start_on(port: u16, host: &str, netns: Option<String>) -> RedisServer {
        let mut cmd = match &netns {
            Some(n) => netns::command_in(n, "redis-server"),
            None => Command::new("redis-server"),
        };
        let child = cmd
            .args(["--port", &port.to_string(), "--bind", host])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            // Nodes in other namespaces connect over the test's bridge (it holds only
            // test addresses); protected mode would refuse all but loopback.
            .args(["--protected-mode", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server (cargo xtask setup installs it)");
        let r = RedisServer {
            child,
            port,
            host: host.to_string(),
            netns,
        };
        for _ in 0..100 {
            if r.cli(&["PING"]).trim() == "PONG" {
                return r;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!("redis-server on port {port} did not answer PING within 5 s");
    }

    pub fn url(&self) -> String {
        format!("redis://{}:{}/", self.host, self.port)
    }

    /// `redis-cli` against it: its output.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = self
            .command("redis-cli")
            .args(["-h", &self.host, "-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Stops it (SIGKILL), as a crash or a partition would take it away.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orphaned_names_are_those_of_dead_processes() {
        let mine = unique("efwd-fwd-");
        assert!(
            !orphaned(&mine, "efwd-fwd-"),
            "{mine} belongs to this process"
        );
        // Above the kernel's largest pid_max (2^22): no such process can exist.
        assert!(orphaned("efwd-fwd-4194305x1", "efwd-fwd-"));
        assert!(!orphaned("efwd-fwd-4194305x1", "edgefwd-test-"));
        assert!(!orphaned("efwd-fwd-notapid", "efwd-fwd-"));
        let init = "efwd-fwd-1x0";
        assert!(!orphaned(init, "efwd-fwd-"), "pid 1 is alive");
    }
}
