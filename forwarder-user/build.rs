use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../forwarder-ebpf");
    let package = aya_build::Package {
        name: "forwarder-ebpf",
        root_dir: root,
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::default()).context(
        "building the XDP program failed; if the nightly toolchain, rust-src or bpf-linker \
         is missing, run `cargo xtask setup`",
    )
}
