//! `edgefwd simulate`: asks the real XDP program, through BPF_PROG_TEST_RUN, what it
//! would do with a packet, against the live routes of a running daemon.

use std::path::Path;

use anyhow::{Context as _, Result, bail};
use aya::programs::TestRunOptions;
use aya::{Ebpf, programs::TestRun as _};
use forwarder_common::{PROG_FORWARD, verdicts::Verdict};
use serde::Serialize;

use crate::{
    dataplane::loader::{self, Counters},
    dataplane::maps::Maps,
    dataplane::packet::{Decoded, decode},
};

#[derive(Debug, Serialize)]
pub struct Outcome {
    pub action: &'static str,
    /// The counted reason, read back from the program's private counters.
    pub verdict: Option<&'static str>,
    #[serde(with = "hex_bytes")]
    pub output: Vec<u8>,
    pub decoded: Decoded,
}

mod hex_bytes {
    pub fn serialize<S: serde::Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(b))
    }
}

pub fn action_name(a: u32) -> &'static str {
    match a {
        0 => "XDP_ABORTED",
        1 => "XDP_DROP",
        2 => "XDP_PASS",
        3 => "XDP_TX",
        4 => "XDP_REDIRECT",
        _ => "unknown",
    }
}

/// A loaded program with live state maps and private counters.
pub struct Simulator {
    ebpf: Ebpf,
    counters: Maps,
}

impl Simulator {
    pub fn new(pin_dir: &Path) -> Result<Self> {
        let mut ebpf = loader::load(pin_dir, Counters::Private)?;
        let counters = Maps::from_ebpf(&mut ebpf)?;
        Ok(Simulator { ebpf, counters })
    }

    /// Also gives the fixture tests their harness: the same call with a test pin dir.
    pub fn from_parts(ebpf: Ebpf, counters: Maps) -> Self {
        Simulator { ebpf, counters }
    }

    pub fn maps(&mut self) -> &mut Maps {
        &mut self.counters
    }

    pub fn run(&mut self, frame: &[u8]) -> Result<Outcome> {
        if frame.len() < 14 {
            bail!(
                "packet is {} bytes; an Ethernet frame needs at least 14",
                frame.len()
            );
        }
        let before = self.counters.verdict_totals()?;
        let prog = loader::program(&mut self.ebpf, PROG_FORWARD)?;
        let mut out = vec![0u8; frame.len() + 256];
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ..Default::default()
            })
            .context("BPF_PROG_TEST_RUN")?;
        out.truncate(r.data_size_out as usize);
        let after = self.counters.verdict_totals()?;
        let verdict = before
            .iter()
            .zip(after.iter())
            .find(|((_, a), (_, b))| b.packets > a.packets)
            .map(|(_, (v, _)): (_, &(Verdict, _))| v.name());
        let decoded = decode(&out);
        Ok(Outcome {
            action: action_name(r.return_value),
            verdict,
            output: out,
            decoded,
        })
    }
}

impl Simulator {
    /// The loaded object (to attach its programs).
    pub fn ebpf(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }
}

/// Frames of a pcap file (Ethernet link type).
pub fn pcap_frames(path: &Path) -> Result<Vec<Vec<u8>>> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut r = pcap_file::pcap::PcapReader::new(f).with_context(|| {
        format!(
            "{} is not a pcap file (pcapng: convert with editcap -F pcap)",
            path.display()
        )
    })?;
    let mut out = Vec::new();
    while let Some(p) = r.next_packet() {
        out.push(p?.data.into_owned());
    }
    Ok(out)
}
