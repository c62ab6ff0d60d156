//! Compiles `proxy-ebpf` for the bpf target (with BTF) so the agent can
//! embed the object with `include_bytes!`.
//!
//! With `AYA_BUILD_SKIP=1` (or `true`, aya-build's own switch) no eBPF is
//! compiled, so unit tests build on a machine without bpf-linker; an empty
//! object stands in, and the agent refuses its eBPF paths at startup
//! (`BpfError::NoObject`). CI and `cargo xtask` never set it: they test the
//! real object.
use anyhow::Context as _;

/// aya-build's variable, honoured with the same values it accepts.
const SKIP: &str = "AYA_BUILD_SKIP";

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let ebpf_dir = std::path::Path::new(&manifest_dir).join("../proxy-ebpf");
    let ebpf_dir = ebpf_dir.to_str().context("non-UTF-8 path to proxy-ebpf")?;
    if skipped() {
        // aya-build returns before writing anything, but `include_bytes!`
        // needs a file. Overwrite any real object from an earlier build, so
        // a skipped build never embeds a stale one; the next build without
        // the variable reruns this script and aya-build copies a fresh
        // object over it.
        let out_dir = std::env::var("OUT_DIR").context("OUT_DIR")?;
        let object = std::path::Path::new(&out_dir).join("tcpgate");
        std::fs::write(&object, []).with_context(|| format!("write {}", object.display()))?;
    }
    // Build the bpf target with the same toolchain as the rest of the tree;
    // `-Z build-std=core` on stable needs RUSTC_BOOTSTRAP for that one nested
    // build only, never for the agent itself.
    let toolchain = std::env::var("RUSTUP_TOOLCHAIN").unwrap_or_else(|_| "stable".to_owned());
    // SAFETY: build scripts are single-threaded at this point.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    // Also prints `rerun-if-env-changed` for the skip variable, so toggling
    // it rebuilds this crate.
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "proxy-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&toolchain),
    )
}

/// Whether aya-build will skip the eBPF build (its test, verbatim).
fn skipped() -> bool {
    std::env::var_os(SKIP).is_some_and(|v| v.eq("1") || v.eq_ignore_ascii_case("true"))
}
