//! Compiles `proxy-ebpf` for the bpf target (with BTF) so the agent can
//! embed the object with `include_bytes!`.
use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let ebpf_dir = std::path::Path::new(&manifest_dir).join("../proxy-ebpf");
    let ebpf_dir = ebpf_dir.to_str().context("non-UTF-8 path to proxy-ebpf")?;
    // Build the bpf target with the same toolchain as the rest of the tree;
    // `-Z build-std=core` on stable needs RUSTC_BOOTSTRAP for that one nested
    // build only, never for the agent itself.
    let toolchain = std::env::var("RUSTUP_TOOLCHAIN").unwrap_or_else(|_| "stable".to_owned());
    // SAFETY: build scripts are single-threaded at this point.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "proxy-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&toolchain),
    )
}
