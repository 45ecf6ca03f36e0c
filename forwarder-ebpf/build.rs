use which::which;

/// Rebuild when bpf-linker changes: a new linker may produce different code, and cargo
/// does not track the linker binary on its own.
fn main() {
    let bpf_linker = which("bpf-linker").expect(
        "bpf-linker not found on PATH: run `cargo xtask setup` (builds it against the nightly's LLVM)",
    );
    println!("cargo:rerun-if-changed={}", bpf_linker.to_str().unwrap());
}
