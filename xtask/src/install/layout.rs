//! Where every installed file goes, as the running system sees it and as it
//! is written (under --destdir or --root).

use std::path::{Component, Path, PathBuf};

use anyhow::{Result, bail};

/// The agent's account and the operators' group (packaging/sysusers.d).
pub const USER: &str = "tcpgate";
pub const OPERATORS_GROUP: &str = "tcpgate-operators";
/// Fixed system paths: the binary's default config path, the unit's
/// LogsDirectory= and pin directory. They do not move with the prefix.
pub const CONFIG_DIR: &str = "/etc/tcpgate";
pub const CONFIG: &str = "/etc/tcpgate/tcpgate.toml";
pub const LOG_DIR: &str = "/var/log/tcpgate";
pub const PIN_DIR: &str = "/sys/fs/bpf/tcpgate";
pub const UNIT: &str = "tcpgate.service";
/// Mounts bpffs where PID 1 did not (a .mount unit is refused for it).
pub const BPFFS_UNIT: &str = "tcpgate-bpffs.service";

/// What kind of installation this is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The running system: files, accounts, directories, systemd reload.
    System,
    /// A system image or chroot at this directory: files, accounts and
    /// directories inside it, nothing on the running system.
    Image(PathBuf),
    /// Staging for a package at this directory: files only.
    Stage(PathBuf),
}

#[derive(Debug, Clone)]
pub struct Layout {
    pub target: Target,
    pub prefix: PathBuf,
}

impl Layout {
    pub fn new(prefix: &Path, destdir: Option<&Path>, root: Option<&Path>) -> Result<Layout> {
        if !prefix.is_absolute() {
            bail!(
                "--prefix must be an absolute path, not {}",
                prefix.display()
            );
        }
        let prefix = normalize(prefix);
        let absolute = |dir: &Path| -> Result<PathBuf> {
            let dir = if dir.is_absolute() {
                dir.to_path_buf()
            } else {
                std::env::current_dir()?.join(dir)
            };
            Ok(normalize(&dir))
        };
        let target = match (destdir, root) {
            (Some(_), Some(_)) => bail!("--destdir and --root exclude each other"),
            (Some(dir), None) => Target::Stage(absolute(dir)?),
            (None, Some(dir)) if absolute(dir)? == Path::new("/") => Target::System,
            (None, Some(dir)) => Target::Image(absolute(dir)?),
            (None, None) => Target::System,
        };
        Ok(Layout { target, prefix })
    }

    /// The directory everything is written under: `/` for the system.
    pub fn base(&self) -> &Path {
        match &self.target {
            Target::System => Path::new("/"),
            Target::Image(dir) | Target::Stage(dir) => dir,
        }
    }

    /// Where the file that the system sees at `path` is written.
    pub fn on_disk(&self, path: &Path) -> PathBuf {
        let relative = path.strip_prefix("/").unwrap_or(path);
        self.base().join(relative)
    }

    pub fn binary(&self) -> PathBuf {
        self.prefix.join("bin/tcpgate")
    }

    /// systemd reads units, sysusers.d and tmpfiles.d from /usr/lib and
    /// /usr/local/lib; any other prefix puts them under /etc instead.
    fn systemd_base(&self) -> PathBuf {
        if self.prefix == Path::new("/usr") || self.prefix == Path::new("/usr/local") {
            self.prefix.join("lib")
        } else {
            PathBuf::from("/etc")
        }
    }

    pub fn unit_dir(&self) -> PathBuf {
        self.systemd_base().join("systemd/system")
    }

    pub fn sysusers(&self) -> PathBuf {
        self.systemd_base().join("sysusers.d/tcpgate.conf")
    }

    pub fn tmpfiles(&self) -> PathBuf {
        self.systemd_base().join("tmpfiles.d/tcpgate.conf")
    }

    pub fn bash_completion(&self) -> PathBuf {
        self.prefix
            .join("share/bash-completion/completions/tcpgate")
    }

    /// Debian's zsh searches vendor-completions under /usr and
    /// site-functions under /usr/local.
    pub fn zsh_completion(&self) -> PathBuf {
        let dir = if self.prefix == Path::new("/usr") {
            "share/zsh/vendor-completions"
        } else {
            "share/zsh/site-functions"
        };
        self.prefix.join(dir).join("_tcpgate")
    }

    pub fn fish_completion(&self) -> PathBuf {
        self.prefix
            .join("share/fish/vendor_completions.d/tcpgate.fish")
    }

    pub fn man1(&self) -> PathBuf {
        self.prefix.join("share/man/man1")
    }
}

/// Drops `.` and trailing slashes, so `/usr/local/` equals `/usr/local`.
fn normalize(path: &Path) -> PathBuf {
    path.components()
        .filter(|c| !matches!(c, Component::CurDir))
        .collect()
}

/// True for a man page that `tcpgate manpage` writes: `tcpgate.1` or
/// `tcpgate-<verb>.1`.
pub fn is_tcpgate_man_page(name: &str) -> bool {
    name == "tcpgate.1"
        || name
            .strip_prefix("tcpgate-")
            .and_then(|rest| rest.strip_suffix(".1"))
            .is_some_and(|verb| {
                !verb.is_empty()
                    && verb
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usr_local_keeps_systemd_files_under_the_prefix() {
        let layout = Layout::new(Path::new("/usr/local/"), None, None).expect("valid");
        assert_eq!(layout.target, Target::System);
        assert_eq!(layout.binary(), Path::new("/usr/local/bin/tcpgate"));
        assert_eq!(
            layout.unit_dir(),
            Path::new("/usr/local/lib/systemd/system")
        );
        assert_eq!(
            layout.sysusers(),
            Path::new("/usr/local/lib/sysusers.d/tcpgate.conf")
        );
        assert_eq!(
            layout.zsh_completion(),
            Path::new("/usr/local/share/zsh/site-functions/_tcpgate")
        );
    }

    #[test]
    fn other_prefixes_put_systemd_files_in_etc() {
        let layout = Layout::new(Path::new("/opt/tcpgate"), None, None).expect("valid");
        assert_eq!(layout.unit_dir(), Path::new("/etc/systemd/system"));
        assert_eq!(layout.tmpfiles(), Path::new("/etc/tmpfiles.d/tcpgate.conf"));
        assert_eq!(layout.binary(), Path::new("/opt/tcpgate/bin/tcpgate"));
    }

    #[test]
    fn usr_uses_debians_vendor_completion_dir() {
        let layout = Layout::new(Path::new("/usr"), None, None).expect("valid");
        assert_eq!(
            layout.zsh_completion(),
            Path::new("/usr/share/zsh/vendor-completions/_tcpgate")
        );
        assert_eq!(layout.unit_dir(), Path::new("/usr/lib/systemd/system"));
    }

    #[test]
    fn destdir_stages_every_path_under_it() {
        let layout =
            Layout::new(Path::new("/usr/local"), Some(Path::new("/tmp/stage")), None).expect("ok");
        assert_eq!(layout.target, Target::Stage(PathBuf::from("/tmp/stage")));
        assert_eq!(
            layout.on_disk(&layout.binary()),
            Path::new("/tmp/stage/usr/local/bin/tcpgate")
        );
        assert_eq!(
            layout.on_disk(Path::new(CONFIG)),
            Path::new("/tmp/stage/etc/tcpgate/tcpgate.toml")
        );
    }

    #[test]
    fn root_slash_is_the_system_and_bad_combinations_are_refused() {
        let system = Layout::new(Path::new("/usr/local"), None, Some(Path::new("/"))).expect("ok");
        assert_eq!(system.target, Target::System);
        assert!(Layout::new(Path::new("usr/local"), None, None).is_err());
        let both = Layout::new(
            Path::new("/usr/local"),
            Some(Path::new("/a")),
            Some(Path::new("/b")),
        );
        assert!(both.is_err());
    }

    #[test]
    fn man_page_names_are_recognised_exactly() {
        for name in ["tcpgate.1", "tcpgate-run.1", "tcpgate-check-config.1"] {
            assert!(is_tcpgate_man_page(name), "{name}");
        }
        for name in [
            "tcpgate-.1",
            "tcpgated.1",
            "tcpgate-run.1.gz",
            "other.1",
            "tcpgate-X.1",
        ] {
            assert!(!is_tcpgate_man_page(name), "{name}");
        }
    }
}
