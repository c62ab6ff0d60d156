//! bpf-linker 0.13, built against the Rust toolchain's own libLLVM.
//!
//! rustc hands bpf-linker LLVM bitcode, so both must use the same LLVM major.
//! No prebuilt bpf-linker can be downloaded here, and Debian's LLVM is older
//! than rustc's, so we link it against the libLLVM shipped in the sysroot.

use std::fmt;
use std::fs;
use std::io::Read as _;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context as _, Result, anyhow};

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
    if bin_dir.join("bpf-linker").exists() {
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

/// The LLVM major in a libLLVM file name or SONAME, in any of the shapes
/// seen: `libLLVM.so.22.1-rust-1.95.0-stable`, `libLLVM-22-rust-1.95.0-stable.so`,
/// `libLLVM-17.so`, `libLLVM.so.18.1`.
pub fn llvm_major_from_lib_name(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("libLLVM")?;
    let rest = rest
        .strip_prefix(".so.")
        .or_else(|| rest.strip_prefix('-'))?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Makes `$CARGO_HOME/tcpgate-llvm/<rustc release>/lib` hold `libLLVM.so` and
/// the SONAME file, both links to the sysroot's libLLVM, and returns its
/// parent for LLVM_PREFIX. bpf-linker's RUNPATH will name this directory,
/// so it lives beside the installed binaries, not in /tmp.
fn llvm_prefix(host: &Host, rustc: &RustcInfo) -> Result<PathBuf> {
    let sysroot_lib = rustc.sysroot.join("lib");
    let libllvm = find_sysroot_libllvm(&sysroot_lib)?;
    let soname = libllvm
        .file_name()
        .and_then(|name| name.to_str())
        .context("libLLVM has a non-UTF-8 name")?
        .to_owned();
    if llvm_major_from_lib_name(&soname) != Some(rustc.llvm_major) {
        anyhow::bail!(
            "{} does not look like LLVM {}, which `rustc -vV` reports",
            libllvm.display(),
            rustc.llvm_major
        );
    }
    let prefix = host.cargo_home.join("tcpgate-llvm").join(&rustc.release);
    let lib = prefix.join("lib");
    fs::create_dir_all(&lib).with_context(|| format!("cannot create {}", lib.display()))?;
    for name in ["libLLVM.so", soname.as_str()] {
        ensure_symlink(&lib.join(name), &libllvm)?;
    }
    Ok(prefix)
}

/// The real libLLVM in the sysroot. Its file name is its SONAME; a
/// `libLLVM-*.so` beside it may be a linker script, so only ELF files count.
fn find_sysroot_libllvm(sysroot_lib: &Path) -> Result<PathBuf> {
    let entries = fs::read_dir(sysroot_lib)
        .with_context(|| format!("cannot list {}", sysroot_lib.display()))?;
    let mut candidates: Vec<PathBuf> = entries
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| {
                    name.starts_with("libLLVM.so.")
                        || (name.starts_with("libLLVM-") && name.ends_with(".so"))
                })
        })
        .filter(|path| is_elf(path))
        .collect();
    // Prefer the versioned `libLLVM.so.<ver>` shape, then by name, so the
    // choice does not depend on directory order.
    candidates.sort_by_key(|path| {
        (
            !path.to_string_lossy().contains("libLLVM.so."),
            path.clone(),
        )
    });
    candidates.into_iter().next().with_context(|| {
        format!(
            "no libLLVM shared library in {}; bpf-linker needs the one the Rust toolchain ships",
            sysroot_lib.display()
        )
    })
}

fn is_elf(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    fs::File::open(path)
        .and_then(|mut file| file.read_exact(&mut magic))
        .is_ok()
        && magic == *b"\x7fELF"
}

fn ensure_symlink(link: &Path, target: &Path) -> Result<()> {
    if fs::read_link(link).is_ok_and(|current| current == target) {
        return Ok(());
    }
    if link.symlink_metadata().is_ok() {
        fs::remove_file(link).with_context(|| format!("cannot replace {}", link.display()))?;
    }
    symlink(target, link)
        .with_context(|| format!("cannot link {} to {}", link.display(), target.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llvm_major_from_every_name_shape() {
        assert_eq!(
            llvm_major_from_lib_name("libLLVM.so.22.1-rust-1.95.0-stable"),
            Some(22)
        );
        assert_eq!(
            llvm_major_from_lib_name("libLLVM-22-rust-1.95.0-stable.so"),
            Some(22)
        );
        assert_eq!(llvm_major_from_lib_name("libLLVM-17.so"), Some(17));
        assert_eq!(llvm_major_from_lib_name("libLLVM.so.18.1"), Some(18));
        assert_eq!(llvm_major_from_lib_name("libLLVM.so"), None);
        assert_eq!(llvm_major_from_lib_name("libclang-17.so"), None);
    }

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

    #[test]
    fn sysroot_search_skips_linker_scripts_and_takes_the_elf_file() {
        let dir = std::env::temp_dir().join(format!("xtask-sysroot-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("mkdir");
        fs::write(
            dir.join("libLLVM-22-rust-1.95.0-stable.so"),
            "INPUT(libLLVM.so.22.1)\n",
        )
        .expect("write");
        fs::write(
            dir.join("libLLVM.so.22.1-rust-1.95.0-stable"),
            b"\x7fELF\x02\x01",
        )
        .expect("write");
        fs::write(dir.join("librustc_driver-1.so"), b"\x7fELF").expect("write");
        let found = find_sysroot_libllvm(&dir);
        let empty = tempdir_without_llvm(&dir);
        fs::remove_dir_all(&dir).expect("cleanup");
        assert_eq!(
            found.expect("found").file_name().and_then(|n| n.to_str()),
            Some("libLLVM.so.22.1-rust-1.95.0-stable")
        );
        assert!(
            empty
                .expect_err("none")
                .to_string()
                .contains("no libLLVM shared library")
        );
    }

    fn tempdir_without_llvm(base: &Path) -> Result<PathBuf> {
        let empty = base.join("empty");
        fs::create_dir_all(&empty).expect("mkdir");
        find_sysroot_libllvm(&empty)
    }

    #[test]
    fn ensure_symlink_replaces_a_stale_link_and_keeps_a_good_one() {
        let dir = std::env::temp_dir().join(format!("xtask-symlink-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("mkdir");
        let link = dir.join("libLLVM.so");
        symlink("/old/libLLVM.so.21", &link).expect("symlink");
        let target = Path::new("/new/libLLVM.so.22");
        let first = ensure_symlink(&link, target);
        let second = ensure_symlink(&link, target);
        let now = fs::read_link(&link);
        fs::remove_dir_all(&dir).expect("cleanup");
        first.expect("replaced");
        second.expect("kept");
        assert_eq!(now.expect("a link"), target);
    }
}
