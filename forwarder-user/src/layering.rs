//! The import rules of the crate's folders, checked over the source: which part may
//! use which (`use crate::…`, grouped imports included; test code excluded), no
//! circle between folders, and a media engine with no runtime, clock or Redis in it.
//!
//! Layers, lowest first: `http` (plumbing); `media` (sans-I/O); `dataplane` (the XDP
//! program's maps); `datapath` (drives engines); `cluster` and `webrtc`; `daemon` (the
//! composition root); `cli` and `loadtest` (tools). A part uses only parts below it,
//! with two exceptions written out in `ALLOWED`.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

/// What each folder (or top-level file) may use besides itself.
const ALLOWED: &[(&str, &[&str])] = &[
    ("http", &[]),
    ("media", &[]),
    ("dataplane", &[]),
    ("datapath", &["media", "dataplane"]),
    ("cluster", &["http", "dataplane"]),
    // webrtc implements the cluster's traits and uses its config and secret.
    (
        "webrtc",
        &["http", "media", "dataplane", "datapath", "cluster"],
    ),
    (
        "daemon",
        &[
            "http",
            "media",
            "dataplane",
            "datapath",
            "cluster",
            "webrtc",
        ],
    ),
    (
        "cli",
        &[
            "http",
            "media",
            "dataplane",
            "datapath",
            "cluster",
            "webrtc",
            "daemon",
        ],
    ),
    // The load-test clients speak WebRTC with the engine's own SRTP and signalling.
    ("loadtest", &["http", "media", "datapath", "webrtc", "cli"]),
];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The part a file belongs to: its top folder, or its name for a top-level file.
fn part_of(path: &Path) -> String {
    let rel = path.strip_prefix(src()).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_string()
}

/// Production code: a file that is a test module is none; else what comes before
/// its `#[cfg(test)]` module.
fn production(path: &Path, text: &str) -> String {
    let in_tests = path
        .components()
        .any(|c| c.as_os_str() == "tests" || c.as_os_str() == "tests.rs");
    if in_tests {
        return String::new();
    }
    text.split("#[cfg(test)]").next().unwrap_or("").to_string()
}

/// Every part named after `crate::` in `code`: `crate::x::…` and each top-level name of
/// a group `crate::{x::…, y, z::{…}}`.
fn used_parts(code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.trim_start()
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        let before = rest[..i].chars().last();
        rest = &rest[i + "crate::".len()..];
        // `some_crate::x` is another crate's path.
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            let (mut depth, mut start) = (0usize, 0usize);
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        out.insert(ident(&group[start..j]));
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        out.insert(ident(&group[start..j]));
                        start = j + 1;
                    }
                    _ => {}
                }
            }
        } else {
            out.insert(ident(rest));
        }
    }
    out.retain(|p| !p.is_empty());
    out
}

/// part → the parts it uses (production code only).
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let parts: BTreeSet<String> = files.iter().map(|f| part_of(f)).collect();
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in &files {
        let part = part_of(f);
        let text = std::fs::read_to_string(f).unwrap();
        let used = used_parts(&production(f, &text));
        let e = g.entry(part.clone()).or_default();
        e.extend(used.into_iter().filter(|u| *u != part && parts.contains(u)));
    }
    g
}

#[test]
fn parts_use_only_the_parts_below_them() {
    let g = graph();
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    let mut wrong = Vec::new();
    for (part, uses) in &g {
        let Some(ok) = allowed.get(part.as_str()) else {
            // The crate roots (lib.rs, main.rs) and this test stand above every part.
            if !["lib", "main", "layering"].contains(&part.as_str()) {
                wrong.push(format!("{part} is in no layer: add it to ALLOWED"));
            }
            continue;
        };
        for u in uses {
            if !ok.contains(&u.as_str()) {
                wrong.push(format!("{part} uses {u}"));
            }
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}\nthe graph: {g:#?}");
}

#[test]
fn no_circle_between_parts() {
    let g = graph();
    // Depth-first search for a back edge.
    fn visit<'a>(
        g: &'a BTreeMap<String, BTreeSet<String>>,
        n: &'a str,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| *p == n) {
            let mut c: Vec<String> = path[i..].iter().map(|s| s.to_string()).collect();
            c.push(n.to_string());
            return Some(c);
        }
        if !done.insert(n) {
            return None;
        }
        path.push(n);
        for m in g.get(n).into_iter().flatten() {
            if let Some(c) = visit(g, m, path, done) {
                return Some(c);
            }
        }
        path.pop();
        None
    }
    let mut done = BTreeSet::new();
    for n in g.keys() {
        if let Some(c) = visit(&g, n, &mut vec![], &mut done) {
            panic!("a circle: {}", c.join(" -> "));
        }
    }
}

/// The engine runs under both data paths and in tests at any speed: time comes in
/// as an argument, never from a clock, a runtime or a store.
#[test]
fn the_media_engine_reads_no_clock_and_runs_no_runtime() {
    let mut files = Vec::new();
    rust_files(&src().join("media"), &mut files);
    let mut wrong = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        let code = production(&f, &text);
        for bad in [
            "tokio",
            "redis",
            "Instant::now()",
            "SystemTime::now()",
            "std::thread::sleep",
        ] {
            if code.contains(bad) {
                wrong.push(format!("{}: {bad}", f.display()));
            }
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

#[test]
fn grouped_imports_are_read() {
    let got = used_parts(
        "use crate::{\n    media::{a, b},\n    webrtc::x, http,\n};\nfn f() { other_crate::y(); crate::cli::z(); }",
    );
    let want: BTreeSet<String> = ["media", "webrtc", "http", "cli"].map(String::from).into();
    assert_eq!(got, want);
}
