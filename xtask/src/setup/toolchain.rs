//! The Rust toolchain: what `rustc` reports, and the rustup components the
//! build needs.

use std::env;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context as _, Result, bail};

use super::report;
use crate::cmd;
use crate::host::Host;

/// Components beyond the default toolchain, and why we need them.
const COMPONENTS: &[(&str, &str)] = &[
    // The eBPF crate is built with `-Z build-std=core`.
    ("rust-src", "for -Z build-std=core on the bpf target"),
    // `cargo xtask test` checks formatting; minimal rustup profiles lack it.
    ("rustfmt", "for the formatting check"),
    // ... and runs clippy with warnings as errors.
    ("clippy", "for the lint check"),
];

/// What `rustc -vV` and `rustc --print sysroot` say.
#[derive(Debug, PartialEq, Eq)]
pub struct RustcInfo {
    /// e.g. `1.95.0`, or `1.97.0-nightly`.
    pub release: String,
    /// The host triple, e.g. `x86_64-unknown-linux-gnu`.
    pub host: String,
    /// e.g. `22.1.2`.
    pub llvm_version: String,
    pub llvm_major: u32,
    pub sysroot: PathBuf,
}

impl RustcInfo {
    pub fn query() -> Result<Self> {
        let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
        let verbose = cmd::read(Command::new(&rustc).arg("-vV"))?;
        let sysroot = cmd::read(Command::new(&rustc).args(["--print", "sysroot"]))?;
        parse_rustc_verbose(&verbose, PathBuf::from(sysroot.trim()))
    }
}

/// Parses `rustc -vV`, whose lines look like `release: 1.95.0` and
/// `LLVM version: 22.1.2`.
pub fn parse_rustc_verbose(text: &str, sysroot: PathBuf) -> Result<RustcInfo> {
    let field = |name: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
            .map(|value| value.trim().to_owned())
            .with_context(|| format!("`rustc -vV` has no `{name}:` line:\n{text}"))
    };
    let llvm_version = field("LLVM version")?;
    let llvm_major = llvm_version
        .split('.')
        .next()
        .and_then(|major| major.parse().ok())
        .with_context(|| format!("`rustc -vV` reports an odd LLVM version `{llvm_version}`"))?;
    Ok(RustcInfo {
        release: field("release")?,
        host: field("host")?,
        llvm_version,
        llvm_major,
        sysroot,
    })
}

pub fn ensure_components(host: &Host, rustc: &RustcInfo) -> Result<()> {
    let listing = cmd::read(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        &host.toolchain,
    ]))
    .context("tcpgate's build needs rustup to add toolchain components")?;
    for (name, why) in COMPONENTS {
        if component_installed(&listing, name, &rustc.host) {
            report(name, format!("already installed ({})", host.toolchain));
            continue;
        }
        report(name, format!("installing {why} ({})", host.toolchain));
        cmd::run(Command::new("rustup").args([
            "component",
            "add",
            name,
            "--toolchain",
            &host.toolchain,
        ]))?;
    }
    Ok(())
}

/// rustup lists target-independent components bare (`rust-src`) and the
/// others with the host triple (`rustfmt-x86_64-unknown-linux-gnu`).
pub fn component_installed(listing: &str, name: &str, host_triple: &str) -> bool {
    let qualified = format!("{name}-{host_triple}");
    listing
        .lines()
        .map(str::trim)
        .any(|line| line == name || line == qualified)
}

/// Fails with a clear message when rustc's LLVM is not one bpf-linker 0.13
/// can be built for; cargo's own error would only say a feature is missing.
pub fn check_llvm_supported(rustc: &RustcInfo, supported: &[u32]) -> Result<()> {
    if supported.contains(&rustc.llvm_major) {
        return Ok(());
    }
    bail!(
        "rustc {} uses LLVM {}, but bpf-linker 0.13 builds only against LLVM {:?}; \
         use a Rust toolchain whose `rustc -vV` reports one of those",
        rustc.release,
        rustc.llvm_version,
        supported
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const STABLE: &str = "rustc 1.95.0 (59807616e 2026-04-14)
binary: rustc
commit-hash: 59807616e1fa2540724bfbac14d7976d7e4a3860
commit-date: 2026-04-14
host: x86_64-unknown-linux-gnu
release: 1.95.0
LLVM version: 22.1.2
";

    #[test]
    fn parses_release_host_and_llvm_major() {
        let info = parse_rustc_verbose(STABLE, PathBuf::from("/sysroot")).expect("parses");
        assert_eq!(
            info,
            RustcInfo {
                release: "1.95.0".into(),
                host: "x86_64-unknown-linux-gnu".into(),
                llvm_version: "22.1.2".into(),
                llvm_major: 22,
                sysroot: PathBuf::from("/sysroot"),
            }
        );
    }

    #[test]
    fn a_missing_llvm_line_is_a_clear_error() {
        let text = STABLE.replace("LLVM version: 22.1.2\n", "");
        let err = parse_rustc_verbose(&text, PathBuf::new()).expect_err("no LLVM line");
        assert!(err.to_string().contains("no `LLVM version:` line"), "{err}");
    }

    #[test]
    fn an_unparsable_llvm_version_is_a_clear_error() {
        let text = STABLE.replace("22.1.2", "unknown");
        let err = parse_rustc_verbose(&text, PathBuf::new()).expect_err("odd version");
        assert!(
            err.to_string().contains("odd LLVM version `unknown`"),
            "{err}"
        );
    }

    #[test]
    fn components_match_bare_or_with_the_host_triple_only() {
        let listing = "cargo-x86_64-unknown-linux-gnu\nrust-src\n\
                       rustc-dev-x86_64-unknown-linux-gnu\nrustfmt-x86_64-unknown-linux-gnu\n";
        let host = "x86_64-unknown-linux-gnu";
        assert!(component_installed(listing, "rust-src", host));
        assert!(component_installed(listing, "rustfmt", host));
        assert!(!component_installed(listing, "rustc", host));
        assert!(!component_installed(listing, "clippy", host));
        assert!(!component_installed(
            "rust-std-x86_64-unknown-linux-gnu",
            "rust-src",
            host
        ));
    }

    #[test]
    fn unsupported_llvm_names_both_versions() {
        let info = parse_rustc_verbose(&STABLE.replace("22.1.2", "19.1.0"), PathBuf::new())
            .expect("parses");
        let err = check_llvm_supported(&info, &[21, 22]).expect_err("19 unsupported");
        assert!(err.to_string().contains("LLVM 19.1.0"), "{err}");
        assert!(check_llvm_supported(&info, &[19]).is_ok());
    }
}
