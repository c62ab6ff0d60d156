//! bpf-linker 0.13, built against the Rust toolchain's own libLLVM.
//!
//! rustc hands bpf-linker LLVM bitcode, so both must use the same LLVM major.
//! No prebuilt bpf-linker can be downloaded here, and Debian's LLVM is older
//! than rustc's, so we link it against the libLLVM shipped in the sysroot.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Result, anyhow};

use super::llvm_prefix::{llvm_major_from_lib_name, llvm_prefix};
use super::report;
use super::toolchain::{RustcInfo, check_llvm_supported};
use crate::cmd;
use crate::host::Host;

const STEP: &str = "bpf-linker";
const VERSION_REQ: &str = "^0.13";
/// The `llvm-<major>` features bpf-linker 0.13 offers.
const SUPPORTED_LLVM: &[u32] = &[21, 22, 23];

pub fn ensure(host: &Host, rustc: &RustcInfo) -> Result<()> {
    let reason = match host.find_program("bpf-linker") {
        None => Unusable::NotFound,
        Some(path) => match inspect(&path, rustc.llvm_major) {
            Ok(found) => {
                report(
                    STEP,
                    format!(
                        "already installed: {} at {}, linked against LLVM {} (rustc uses LLVM {})",
                        found.version,
                        path.display(),
                        found.llvm_major,
                        rustc.llvm_major
                    ),
                );
                return Ok(());
            }
            Err(reason) => reason,
        },
    };
    check_llvm_supported(rustc, SUPPORTED_LLVM)?;
    let started = Instant::now();
    report(
        STEP,
        format!(
            "{reason}; building 0.13 against rustc's LLVM {} (about 1 minute)",
            rustc.llvm_major
        ),
    );
    let prefix = llvm_prefix(host, rustc)?;
    let bin_dir = host.cargo_home.join("bin");
    let mut install = host.cargo();
    install
        .env("LLVM_PREFIX", &prefix)
        .args(["install", "bpf-linker", "--version", VERSION_REQ])
        .args(["--no-default-features", "--features"])
        .arg(format!("llvm-{}", rustc.llvm_major))
        .arg("--locked")
        // Explicit, so CARGO_INSTALL_ROOT or install.root cannot send it
        // somewhere our PATH does not look.
        .arg("--root")
        .arg(&host.cargo_home);
    // cargo refuses to replace an installed version without --force; only a
    // broken or mismatched one gets here.
    if bin_dir.join("bpf-linker").symlink_metadata().is_ok() {
        install.arg("--force");
    }
    cmd::run(&mut install)?;
    let built = bin_dir.join("bpf-linker");
    let found = inspect(&built, rustc.llvm_major)
        .map_err(|reason| anyhow!("the bpf-linker just built is not usable: {reason}"))?;
    report(
        STEP,
        format!(
            "built {} at {}, linked against LLVM {}, in {}",
            found.version,
            built.display(),
            found.llvm_major,
            crate::took(started)
        ),
    );
    Ok(())
}

struct Found {
    version: String,
    llvm_major: u32,
}

/// Why an existing bpf-linker will not do.
#[derive(Debug)]
enum Unusable {
    NotFound,
    WontRun {
        path: PathBuf,
        detail: String,
    },
    WrongVersion {
        path: PathBuf,
        version: String,
    },
    NoSharedLlvm {
        path: PathBuf,
    },
    LlvmMissing {
        path: PathBuf,
        soname: String,
    },
    LlvmMismatch {
        path: PathBuf,
        soname: String,
        wanted: u32,
    },
}

impl fmt::Display for Unusable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotFound => write!(f, "not found in PATH or $CARGO_HOME/bin"),
            Self::WontRun { path, detail } => {
                write!(f, "{} does not run ({detail})", path.display())
            }
            Self::WrongVersion { path, version } => {
                write!(f, "{} is `{version}`, not 0.13.x", path.display())
            }
            Self::NoSharedLlvm { path } => write!(
                f,
                "{} links no shared libLLVM, so its LLVM version cannot be checked",
                path.display()
            ),
            Self::LlvmMissing { path, soname } => {
                write!(f, "{} cannot find its {soname}", path.display())
            }
            Self::LlvmMismatch {
                path,
                soname,
                wanted,
            } => write!(
                f,
                "{} links {soname}, but rustc uses LLVM {wanted}",
                path.display()
            ),
        }
    }
}

/// Checks that `path` runs, is 0.13.x, and links the LLVM major rustc uses.
fn inspect(path: &Path, wanted_major: u32) -> Result<Found, Unusable> {
    let wont_run = |detail: String| Unusable::WontRun {
        path: path.to_path_buf(),
        detail,
    };
    // rustup points LD_LIBRARY_PATH at the sysroot for its children, which
    // would hide a dangling RUNPATH; check the binary as a shell would run it.
    let output = Command::new(path)
        .arg("--version")
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .map_err(|err| wont_run(err.to_string()))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let first = stderr.lines().next().unwrap_or_default().trim().to_owned();
        return Err(wont_run(format!("{}: {first}", output.status)));
    }
    let version = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    if !is_wanted_version(&version) {
        return Err(Unusable::WrongVersion {
            path: path.to_path_buf(),
            version,
        });
    }
    // ldd fails on static binaries; that leaves no libLLVM line either way.
    let ldd = Command::new("ldd")
        .arg(path)
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .map_err(|err| wont_run(format!("ldd: {err}")))?;
    let linked =
        linked_llvm(&String::from_utf8_lossy(&ldd.stdout)).ok_or(Unusable::NoSharedLlvm {
            path: path.to_path_buf(),
        })?;
    if !linked.resolved {
        return Err(Unusable::LlvmMissing {
            path: path.to_path_buf(),
            soname: linked.soname,
        });
    }
    match llvm_major_from_lib_name(&linked.soname) {
        Some(major) if major == wanted_major => Ok(Found {
            version,
            llvm_major: major,
        }),
        _ => Err(Unusable::LlvmMismatch {
            path: path.to_path_buf(),
            soname: linked.soname,
            wanted: wanted_major,
        }),
    }
}

/// `bpf-linker 0.13.0` (what `--version` prints) is what we want.
fn is_wanted_version(version_line: &str) -> bool {
    version_line
        .strip_prefix("bpf-linker 0.13.")
        .is_some_and(|patch| {
            patch
                .split(['-', '+'])
                .next()
                .is_some_and(|p| p.parse::<u32>().is_ok())
        })
}

#[derive(Debug, PartialEq, Eq)]
struct LinkedLlvm {
    soname: String,
    /// false when ldd says `not found`.
    resolved: bool,
}

/// Finds the libLLVM line of `ldd` output, e.g.
/// `libLLVM.so.22.1-rust-1.95.0-stable => /x/lib/libLLVM.so.22.1-rust-1.95.0-stable (0x..)`.
fn linked_llvm(ldd_output: &str) -> Option<LinkedLlvm> {
    ldd_output.lines().find_map(|line| {
        let (soname, target) = line.trim().split_once(" => ")?;
        soname.starts_with("libLLVM").then(|| LinkedLlvm {
            soname: soname.to_owned(),
            resolved: !target.trim().starts_with("not found"),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_line_for_libllvm_found_and_missing() {
        let found = "\tlinux-vdso.so.1 (0x00007ffd)\n\
            \tlibLLVM.so.22.1-rust-1.95.0-stable => /x/lib/libLLVM.so.22.1-rust-1.95.0-stable (0x7f06)\n\
            \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x7f06)\n";
        assert_eq!(
            linked_llvm(found),
            Some(LinkedLlvm {
                soname: "libLLVM.so.22.1-rust-1.95.0-stable".into(),
                resolved: true
            })
        );
        let missing = "\tlibLLVM-21.so => not found\n\tlibc.so.6 => /lib/libc.so.6 (0x1)\n";
        assert_eq!(
            linked_llvm(missing),
            Some(LinkedLlvm {
                soname: "libLLVM-21.so".into(),
                resolved: false
            })
        );
        assert_eq!(linked_llvm("\tnot a dynamic executable\n"), None);
    }

    #[test]
    fn only_0_13_versions_are_wanted() {
        assert!(is_wanted_version("bpf-linker 0.13.0"));
        assert!(is_wanted_version("bpf-linker 0.13.12"));
        assert!(!is_wanted_version("bpf-linker 0.9.15"));
        assert!(!is_wanted_version("bpf-linker 0.14.0"));
        assert!(!is_wanted_version("bpf-linker 0.130.0"));
        assert!(!is_wanted_version(""));
    }

    /// A stand-in bpf-linker: a shell script, so it links no libLLVM.
    ///
    /// A child `sh` writes it: had this process written it, a test on
    /// another thread forking meanwhile would hold the write descriptor until
    /// its exec, and running the script then fails with ETXTBSY.
    fn fake_linker(name: &str, script: &str) -> PathBuf {
        use std::io::Write as _;
        use std::process::{Command, Stdio};
        let dir = std::env::temp_dir().join(format!("xtask-linker-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let path = dir.join("bpf-linker");
        let mut writer = Command::new("sh")
            .args(["-c", "cat > \"$1\" && chmod 755 \"$1\"", "sh"])
            .arg(&path)
            .stdin(Stdio::piped())
            .spawn()
            .expect("spawn sh");
        let mut stdin = writer.stdin.take().expect("piped stdin");
        stdin
            .write_all(format!("#!/bin/sh\n{script}\n").as_bytes())
            .expect("write");
        drop(stdin);
        assert!(writer.wait().expect("wait").success(), "writing {path:?}");
        path
    }

    fn inspect_fake(name: &str, script: &str) -> Result<Found, Unusable> {
        let path = fake_linker(name, script);
        let verdict = inspect(&path, 22);
        let dir = path.parent().expect("has a dir");
        std::fs::remove_dir_all(dir).expect("cleanup");
        verdict
    }

    #[test]
    fn a_linker_that_fails_to_run_is_unusable_with_its_error() {
        let verdict = inspect_fake(
            "fails",
            "echo 'error while loading shared libraries' >&2; exit 127",
        );
        let Err(reason @ Unusable::WontRun { .. }) = verdict else {
            panic!("expected WontRun, got {:?}", verdict.err());
        };
        assert!(
            reason
                .to_string()
                .contains("error while loading shared libraries"),
            "{reason}"
        );
    }

    #[test]
    fn another_version_is_unusable() {
        let verdict = inspect_fake("old", "echo bpf-linker 0.9.13");
        assert!(
            matches!(&verdict, Err(Unusable::WrongVersion { version, .. }) if version == "bpf-linker 0.9.13"),
            "{:?}",
            verdict.err()
        );
    }

    #[test]
    fn a_linker_without_shared_libllvm_cannot_be_vouched_for() {
        let verdict = inspect_fake("static", "echo bpf-linker 0.13.0");
        assert!(
            matches!(verdict, Err(Unusable::NoSharedLlvm { .. })),
            "{:?}",
            verdict.err()
        );
    }
}
