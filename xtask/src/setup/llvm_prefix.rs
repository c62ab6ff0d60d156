//! A stable LLVM_PREFIX for building bpf-linker against the libLLVM that the
//! Rust toolchain ships in its sysroot.

use std::fs;
use std::io::Read as _;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};

use super::toolchain::RustcInfo;
use crate::host::Host;

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
pub fn llvm_prefix(host: &Host, rustc: &RustcInfo) -> Result<PathBuf> {
    let sysroot_lib = rustc.sysroot.join("lib");
    let libllvm = find_sysroot_libllvm(&sysroot_lib)?;
    let soname = libllvm
        .file_name()
        .and_then(|name| name.to_str())
        .context("libLLVM has a non-UTF-8 name")?
        .to_owned();
    if llvm_major_from_lib_name(&soname) != Some(rustc.llvm_major) {
        bail!(
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

    /// A scratch directory laid out like a toolchain sysroot's `lib/`.
    fn fake_sysroot(tag: &str) -> PathBuf {
        let root = std::env::temp_dir().join(format!("xtask-{tag}-{}", std::process::id()));
        let lib = root.join("sysroot/lib");
        fs::create_dir_all(&lib).expect("mkdir");
        // rustup ships this linker script beside the real library.
        fs::write(
            lib.join("libLLVM-22-rust-1.95.0-stable.so"),
            "INPUT(libLLVM.so.22.1-rust-1.95.0-stable)\n",
        )
        .expect("write");
        fs::write(
            lib.join("libLLVM.so.22.1-rust-1.95.0-stable"),
            b"\x7fELF\x02\x01",
        )
        .expect("write");
        fs::write(lib.join("librustc_driver-1.so"), b"\x7fELF").expect("write");
        root
    }

    fn rustc_info(sysroot: PathBuf, llvm_major: u32) -> RustcInfo {
        RustcInfo {
            release: "1.95.0".into(),
            host: "x86_64-unknown-linux-gnu".into(),
            llvm_version: format!("{llvm_major}.1.2"),
            llvm_major,
            sysroot,
        }
    }

    fn host_with_cargo_home(cargo_home: PathBuf) -> Host {
        Host {
            cargo_home,
            toolchain: "stable".into(),
            child_path: "/usr/bin".into(),
            workspace: PathBuf::from("/nonexistent"),
            is_root: false,
        }
    }

    #[test]
    fn sysroot_search_skips_linker_scripts_and_takes_the_elf_file() {
        let root = fake_sysroot("search");
        let found = find_sysroot_libllvm(&root.join("sysroot/lib"));
        let empty = find_sysroot_libllvm(&root);
        fs::remove_dir_all(&root).expect("cleanup");
        assert_eq!(
            found.expect("found").file_name().and_then(|n| n.to_str()),
            Some("libLLVM.so.22.1-rust-1.95.0-stable")
        );
        let err = empty.expect_err("no libLLVM at the top");
        assert!(
            err.to_string().contains("no libLLVM shared library"),
            "{err}"
        );
    }

    #[test]
    fn prefix_holds_both_names_linked_to_the_sysroot_library() {
        let root = fake_sysroot("prefix");
        let host = host_with_cargo_home(root.join("cargo-home"));
        let made = llvm_prefix(&host, &rustc_info(root.join("sysroot"), 22));
        let lib = root.join("cargo-home/tcpgate-llvm/1.95.0/lib");
        let links = ["libLLVM.so", "libLLVM.so.22.1-rust-1.95.0-stable"]
            .map(|name| fs::read_link(lib.join(name)).ok());
        fs::remove_dir_all(&root).expect("cleanup");
        assert_eq!(
            made.expect("made"),
            root.join("cargo-home/tcpgate-llvm/1.95.0")
        );
        let real = root.join("sysroot/lib/libLLVM.so.22.1-rust-1.95.0-stable");
        assert_eq!(links, [Some(real.clone()), Some(real)]);
    }

    #[test]
    fn prefix_refuses_a_library_of_another_llvm_major() {
        let root = fake_sysroot("mismatch");
        let host = host_with_cargo_home(root.join("cargo-home"));
        let made = llvm_prefix(&host, &rustc_info(root.join("sysroot"), 23));
        fs::remove_dir_all(&root).expect("cleanup");
        let err = made.expect_err("22 is not 23");
        assert!(
            err.to_string().contains("does not look like LLVM 23"),
            "{err}"
        );
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
