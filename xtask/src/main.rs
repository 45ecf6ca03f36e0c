//! Project tasks. `setup` installs what a fresh machine lacks; every other task runs it
//! first, so the README's two commands work on a clean clone.
//!
//! xtask deliberately depends on no workspace crate: those need the eBPF toolchain
//! that `setup` installs.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "edgefwd project tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install toolchain pieces, Debian packages and bpffs (idempotent).
    Setup,
    /// Run the whole test suite (unit, fixtures, network namespaces). Needs root.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// A live RTP relay through XDP, then a WebRTC room (Chromium over WHIP and WHEP)
    /// through the same daemon, in network namespaces, with per-second rates; ends by itself.
    Demo {
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// Fuzz every network-facing parser (cargo-fuzz, libFuzzer) from the committed
    /// seeds; prints execs and findings per target. Crashes land in target/fuzz-artifacts.
    Fuzz {
        /// Seconds per target (with --runs: the most a target may take).
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Stop each target after this many executions (e.g. 10000000 for the
        /// README's long run) instead of at --seconds.
        #[arg(long)]
        runs: Option<u64>,
        /// Targets to run (default: all of them).
        targets: Vec<String>,
    },
    /// Benchmarks: `forward` measures packets per second per core; `srtp` the WebRTC
    /// worker's SRTP copies per second per core, AF_XDP against the socket path;
    /// `fanout` copies per second per core for 1→N in the kernel against userspace;
    /// `joins` WHIP+WHEP joins per second (ICE, DTLS, SRTP) driven by `edgefwd load-test`;
    /// `viewers` WHEP subscribers per core at a target bitrate, socket path against AF_XDP;
    /// `churn` steady viewers' loss and latency while other clients join and leave
    /// (with EDGEFWD_BASELINE_BIN=PATH, also against that build of edgefwd);
    /// `cluster` the directory's latency against real Redis, joins through a non-origin
    /// node against joins at the origin, a cold node's first media, latency per tree hop;
    /// `failover` the media gap viewers see when a relay, an edge or the origin dies or
    /// an edge is drained, against the same call with no failure.
    Bench {
        #[arg(default_value = "forward")]
        which: String,
        /// Seconds per measurement.
        #[arg(long, default_value_t = 3)]
        seconds: u64,
    },
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("xtask: error: {e:#}");
        std::process::exit(1);
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Setup => setup(),
        Cmd::Test { args } => {
            setup()?;
            require_root("the tests load XDP programs and create network namespaces")?;
            // The namespace tests start the real daemon binary.
            cargo(&["build", "--package", "forwarder-user"])?;
            if args.is_empty() {
                // The workspace's deny lints (a `// SAFETY:` line on every unsafe
                // block and impl) fail the suite like a failing test.
                cargo(&[
                    "clippy",
                    "--package",
                    "forwarder-user",
                    "--package",
                    "forwarder-common",
                    "--package",
                    "edgefwd-tests",
                    "--package",
                    "xtask",
                    "--all-targets",
                ])?;
            }
            let mut a = vec!["test"];
            a.extend(args.iter().map(String::as_str));
            cargo(&a)?;
            // A filtered run is someone chasing one test: no fuzzing then.
            if args.is_empty() {
                fuzz(FUZZ_SECONDS_IN_TEST, None, &[])?;
            }
            Ok(())
        }
        Cmd::Fuzz {
            seconds,
            runs,
            targets,
        } => {
            setup()?;
            fuzz(seconds, runs, &targets)
        }
        Cmd::Demo { seconds } => {
            setup()?;
            require_root("the demo creates network namespaces and attaches XDP")?;
            build_release_tools()?;
            sh(Command::new(root().join("target/release/edgefwd-demo")).arg(seconds.to_string()))
        }
        Cmd::Bench { which, seconds } => {
            if ![
                "forward", "srtp", "fanout", "joins", "viewers", "churn", "cluster", "failover",
            ]
            .contains(&which.as_str())
            {
                bail!(
                    "unknown benchmark {which:?}; available: forward, srtp, fanout, joins, viewers, churn, cluster, failover"
                );
            }
            setup()?;
            require_root("the benchmark creates network namespaces and attaches XDP")?;
            build_release_tools()?;
            if ["fanout", "viewers", "cluster", "failover"].contains(&which.as_str()) {
                return sh(Command::new(
                    root().join(format!("target/release/edgefwd-{which}-bench")),
                )
                .args(["--seconds", &seconds.to_string(), "--out"])
                .arg(root().join("bench/results")));
            }
            if which == "churn" {
                // EDGEFWD_BASELINE_BIN: another build of edgefwd measured in the same run.
                let mut c = Command::new(root().join("target/release/edgefwd-viewers-bench"));
                c.args(["--churn", "--seconds", &seconds.to_string(), "--out"])
                    .arg(root().join("bench/results"));
                if let Some(b) = std::env::var_os("EDGEFWD_BASELINE_BIN") {
                    c.arg("--baseline-bin").arg(b);
                }
                return sh(&mut c);
            }
            if which == "joins" {
                return sh(
                    Command::new(root().join("target/release/edgefwd-joins-bench"))
                        .arg("--out")
                        .arg(root().join("bench/results")),
                );
            }
            if which == "srtp" {
                return sh(
                    Command::new(root().join("target/release/edgefwd-srtp-bench"))
                        .args(["--seconds", &seconds.to_string(), "--out"])
                        .arg(root().join("bench/results")),
                );
            }
            let c_ref = build_c_reference()?;
            sh(Command::new(root().join("target/release/edgefwd-bench"))
                .args(["--seconds", &seconds.to_string(), "--out"])
                .arg(root().join("bench/results"))
                .arg("--c-ref")
                .arg(c_ref))
        }
    }
}

/// Seconds per fuzz target inside `cargo xtask test`: enough to replay the seeds and
/// explore a little, so a parser change that panics on them fails the suite.
const FUZZ_SECONDS_IN_TEST: u64 = 4;
const FUZZ_DIR: &str = "tests/fuzz";

/// Builds the fuzz targets once, runs each for `seconds`, prints a table and writes
/// target/fuzz-report.json. Any crash, leak or timeout fails the run.
fn fuzz(seconds: u64, runs: Option<u64>, only: &[String]) -> Result<()> {
    let all = fuzz_targets()?;
    for t in only {
        if !all.contains(t) {
            bail!("unknown fuzz target {t:?}; available: {}", all.join(", "));
        }
    }
    let targets: Vec<&String> = all
        .iter()
        .filter(|t| only.is_empty() || only.contains(t))
        .collect();
    // Safe-Rust parsers: no AddressSanitizer (it halves the exec rate and finds nothing
    // the bounds checks do not); debug assertions and overflow checks stay on.
    let fuzz_cmd = |sub: &str| {
        let mut c = Command::new("rustup");
        c.args([
            "run",
            "nightly",
            "cargo",
            "fuzz",
            sub,
            "--fuzz-dir",
            FUZZ_DIR,
        ])
        .args(["--sanitizer", "none", "--target-dir", "target/fuzz"])
        .current_dir(root())
        .env_remove("CARGO")
        .env_remove("RUSTC");
        c
    };
    step_x(&format!("building {} fuzz targets", targets.len()));
    sh(&mut fuzz_cmd("build"))?;
    let mut rows = Vec::new();
    let mut failed = Vec::new();
    for t in &targets {
        let corpus = root().join("target/fuzz-corpus").join(t);
        let artifacts = root().join("target/fuzz-artifacts").join(t);
        std::fs::create_dir_all(&corpus)?;
        std::fs::create_dir_all(&artifacts)?;
        let seeds = root().join(FUZZ_DIR).join("seeds").join(t);
        // New inputs go to the first corpus directory (under target/), never into the
        // committed seeds.
        let started = std::time::Instant::now();
        let mut run = fuzz_cmd("run");
        run.arg(t)
            .arg(&corpus)
            .arg(&seeds)
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .arg("-max_len=10000")
            .arg("-timeout=10")
            .arg("-print_final_stats=1")
            .arg(format!("-artifact_prefix={}/", artifacts.display()));
        if let Some(n) = runs {
            run.arg(format!("-runs={n}"));
        }
        let out = run
            .output()
            .with_context(|| format!("running fuzz target {t}"))?;
        let took = started.elapsed().as_secs_f64();
        let log = String::from_utf8_lossy(&out.stderr);
        let stat = |name: &str| {
            log.lines()
                .find_map(|l| l.strip_prefix(&format!("stat::{name}:")))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        let execs = stat("number_of_executed_units").unwrap_or(0);
        let corpus_n = std::fs::read_dir(&corpus).map(|d| d.count()).unwrap_or(0);
        let findings = std::fs::read_dir(&artifacts)
            .map(|d| d.count())
            .unwrap_or(0);
        if !out.status.success() || findings > 0 {
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!(
                "fuzz target {t} failed ({}):\n{}",
                out.status,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
            failed.push(t.to_string());
        }
        if let Some(n) = runs
            && execs < n
            && failed.last() != Some(&t.to_string())
        {
            eprintln!("fuzz target {t}: {execs} of {n} runs within the {seconds} s cap");
        }
        rows.push((t.to_string(), took, execs, corpus_n, findings));
    }
    println!(
        "\n{:<12} {:>8} {:>14} {:>10} {:>8} {:>9}",
        "target", "seconds", "execs", "execs/s", "corpus", "findings"
    );
    for (t, took, execs, corpus_n, findings) in &rows {
        println!(
            "{t:<12} {took:>8.0} {execs:>14} {:>10.0} {corpus_n:>8} {findings:>9}",
            *execs as f64 / took.max(0.001)
        );
    }
    let json: Vec<String> = rows
        .iter()
        .map(|(t, s, e, c, f)| {
            format!(
                r#"{{"target":"{t}","seconds":{s:.1},"execs":{e},"corpus":{c},"findings":{f}}}"#
            )
        })
        .collect();
    std::fs::write(
        root().join("target/fuzz-report.json"),
        format!("[{}]\n", json.join(",")),
    )?;
    if !failed.is_empty() {
        bail!(
            "fuzz targets failed: {} (reproduce: rustup run nightly cargo fuzz run --fuzz-dir {FUZZ_DIR} -s none TARGET target/fuzz-artifacts/TARGET/crash-*)",
            failed.join(", ")
        );
    }
    Ok(())
}

/// The `[[bin]]` names of the fuzz crate.
fn fuzz_targets() -> Result<Vec<String>> {
    let manifest = std::fs::read_to_string(root().join(FUZZ_DIR).join("Cargo.toml"))?;
    let mut names = Vec::new();
    let mut in_bin = false;
    for l in manifest.lines().map(str::trim) {
        if l.starts_with('[') {
            in_bin = l == "[[bin]]";
        } else if in_bin && let Some(v) = l.strip_prefix("name = ") {
            names.push(v.trim_matches('"').to_string());
        }
    }
    if names.is_empty() {
        bail!("no [[bin]] targets in {FUZZ_DIR}/Cargo.toml");
    }
    Ok(names)
}

fn step_x(what: &str) {
    eprintln!("xtask: {what}");
}

/// The daemon plus the demo and bench binaries, optimised.
fn build_release_tools() -> Result<()> {
    cargo(&[
        "build",
        "--release",
        "--package",
        "forwarder-user",
        "--package",
        "edgefwd-tests",
    ])
}

/// The hand-written C XDP forwarder the benchmark measures ours against, in the same
/// run: clang's BPF target with libbpf's headers (both from setup).
fn build_c_reference() -> Result<PathBuf> {
    let src = root().join("tests/bench-ref/ref_forward.c");
    let out_dir = root().join("target/bench-ref");
    std::fs::create_dir_all(&out_dir)?;
    let obj = out_dir.join("ref_forward.o");
    // linux/bpf.h includes asm/types.h, which Debian keeps under the multiarch directory
    // that clang's BPF target does not search by itself.
    let multiarch = output(Command::new("cc").arg("-print-multiarch"))
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| format!("{}-linux-gnu", std::env::consts::ARCH));
    sh(Command::new("clang")
        .args(["-O2", "-g", "-Wall", "-Werror", "-target", "bpf"])
        .arg(format!("-I/usr/include/{multiarch}"))
        .arg("-c")
        .arg(&src)
        .arg("-o")
        .arg(&obj))
    .context(
        "building the C reference forwarder (clang and libbpf-dev come from `cargo xtask setup`)",
    )?;
    Ok(obj)
}

fn require_root(why: &str) -> Result<()> {
    let out = Command::new("id").arg("-u").output()?;
    if String::from_utf8_lossy(&out.stdout).trim() != "0" {
        bail!("run as root: {why} (e.g. `sudo -E cargo xtask ...`)");
    }
    Ok(())
}

fn sh(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("spawning {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn cargo(args: &[&str]) -> Result<()> {
    sh(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(args)
            .current_dir(root()),
    )
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

// fonts-dejavu-core: the text of the benchmark chart (rendered without fontconfig).
// chromium: the browser the WebRTC tests publish and watch with (playwright-core drives
// it; no browser download). nftables: random loss on a namespace's loopback (this
// kernel has no netem). clang, libbpf-dev: the C reference forwarder the benchmark
// compares against in the same run. redis-server: the cluster's directory, started by
// the tests that need it.
const DEBIAN_PACKAGES: &[&str] = &[
    "iproute2",
    "ethtool",
    "procps",
    "util-linux",
    "fonts-dejavu-core",
    "chromium",
    "nftables",
    "python3-venv",
    "clang",
    "libbpf-dev",
    "redis-server",
];

/// Where `setup` puts aiortc, the second WebRTC implementation the tests use.
const AIORTC_VENV: &str = "target/aiortc-venv";

fn setup() -> Result<()> {
    // 1. Nightly with rust-src: the eBPF crate is built with -Z build-std=core.
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))
        .context("rustup not found: install Rust with rustup")?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        step("installing the nightly toolchain");
        sh(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    let comps = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]))
    .unwrap_or_default();
    if !comps.lines().any(|l| l.starts_with("rust-src")) {
        step("adding rust-src to nightly");
        sh(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }

    // clippy on the default toolchain: the suite runs it (a minimal rustup profile
    // has none).
    if output(Command::new("cargo").args(["clippy", "--version"])).is_none() {
        step("adding clippy to the default toolchain");
        sh(Command::new("rustup").args(["component", "add", "clippy"]))?;
    }

    // 2. bpf-linker, built against the nightly's own libLLVM (no system LLVM needed).
    // It links the nightly's libLLVM dynamically, so ask through `rustup run nightly`,
    // which puts the toolchain's lib directory on the library path (as aya-build does).
    if output(Command::new("rustup").args(["run", "nightly", "bpf-linker", "--version"])).is_none()
    {
        let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))
            .context("rustc +nightly --print sysroot")?;
        let lib = PathBuf::from(sysroot.trim()).join("lib");
        let so = std::fs::read_dir(&lib)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("libLLVM.so."))
            })
            .with_context(|| {
                format!(
                    "no libLLVM.so.* in {}: is the nightly toolchain complete?",
                    lib.display()
                )
            })?;
        let vv = output(Command::new("rustc").args(["+nightly", "-vV"])).unwrap_or_default();
        let major = vv
            .lines()
            .find_map(|l| l.strip_prefix("LLVM version: "))
            .and_then(|v| v.split('.').next())
            .context("nightly rustc reports no LLVM version")?
            .to_string();
        let prefix = root().join("target/llvm-prefix");
        std::fs::create_dir_all(prefix.join("lib"))?;
        let link = prefix.join("lib/libLLVM.so");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&so, &link)?;
        step(&format!(
            "building bpf-linker against {} (LLVM {major})",
            so.display()
        ));
        sh(Command::new("cargo")
            .args([
                "install",
                "--force",
                "bpf-linker",
                "--no-default-features",
                "--features",
                &format!("llvm-{major}"),
            ])
            .env("LLVM_PREFIX", &prefix))?;
    }

    // 3. Debian packages the tests and the daemon use.
    let mut wanted: Vec<&str> = DEBIAN_PACKAGES.to_vec();
    if which("node").is_none() || which("npm").is_none() {
        wanted.extend(["nodejs", "npm"]);
    }
    // python3 may come from pyenv (venv built in) rather than Debian.
    if output(Command::new("python3").args(["-c", "import venv, ensurepip"])).is_some() {
        wanted.retain(|p| *p != "python3-venv");
    }
    let missing: Vec<&str> = wanted
        .iter()
        .copied()
        .filter(|p| {
            !output(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .is_some_and(|s| s.contains("install ok installed"))
        })
        .collect();
    if !missing.is_empty() {
        step(&format!(
            "installing Debian packages: {}",
            missing.join(" ")
        ));
        require_root("installing Debian packages")?;
        sh(Command::new("apt-get").args(["update", "-qq"]))?;
        sh(Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }

    // 4. playwright-core (pinned by package-lock.json) for driving Debian's chromium.
    let browser = root().join("tests/browser");
    if !browser
        .join("node_modules/playwright-core/package.json")
        .exists()
    {
        step("installing playwright-core (npm ci in tests/browser)");
        sh(Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&browser))?;
    }

    // 5. aiortc in a virtualenv (PyPI wheels: libsrtp, OpenSSL and FFmpeg included).
    let py = root().join(AIORTC_VENV).join("bin/python");
    if output(Command::new(&py).args(["-c", "import aiortc"])).is_none() {
        step("installing aiortc into target/aiortc-venv");
        sh(Command::new("python3")
            .args(["-m", "venv"])
            .arg(root().join(AIORTC_VENV)))?;
        sh(Command::new(&py)
            .args(["-m", "pip", "install", "-q", "-r"])
            .arg(root().join("tests/clients/requirements.txt")))?;
    }

    // 6. cargo-fuzz, for the fuzz targets `test` runs briefly and `fuzz` runs long.
    if output(Command::new("rustup").args(["run", "nightly", "cargo", "fuzz", "--version"]))
        .is_none()
    {
        step("installing cargo-fuzz");
        sh(Command::new("cargo").args(["install", "--locked", "cargo-fuzz"]))?;
    }

    // 7. bpffs, where the daemon pins its maps.
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    if !mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf "))
    {
        if output(Command::new("id").arg("-u")).is_some_and(|u| u.trim() == "0") {
            step("mounting bpffs on /sys/fs/bpf");
            sh(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
        } else {
            eprintln!(
                "xtask: note: bpffs is not mounted on /sys/fs/bpf; as root: mount -t bpf bpf /sys/fs/bpf"
            );
        }
    }
    Ok(())
}

fn which(program: &str) -> Option<String> {
    output(Command::new("sh").args(["-c", &format!("command -v {program}")]))
}

fn step(what: &str) {
    eprintln!("xtask setup: {what}");
}
