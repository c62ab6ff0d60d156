//! What a package's postinst would do: accounts, directories, and telling
//! systemd. Done for a real install and for --root; printed for --destdir.

use std::path::Path;
use std::process::Command;

use anyhow::{Context as _, Result};

use super::layout::{LOG_DIR, Layout, OPERATORS_GROUP, Target, UNIT, USER};
use crate::cmd;

/// True when systemd is the running init (what sd_booted(3) checks).
pub fn systemd_running() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

/// `name` appears in the colon-separated database at `file` (passwd, group).
fn has_entry(file: &Path, name: &str) -> Result<bool> {
    match std::fs::read_to_string(file) {
        Ok(text) => Ok(text
            .lines()
            .any(|line| line.split(':').next() == Some(name))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", file.display())),
    }
}

fn user_exists(layout: &Layout, name: &str) -> Result<bool> {
    has_entry(&layout.on_disk(Path::new("/etc/passwd")), name)
}

fn group_exists(layout: &Layout, name: &str) -> Result<bool> {
    has_entry(&layout.on_disk(Path::new("/etc/group")), name)
}

/// `--root DIR` for the systemd tools when installing into an image.
fn root_arg(layout: &Layout) -> Option<String> {
    match &layout.target {
        Target::Image(dir) => Some(format!("--root={}", dir.display())),
        Target::System | Target::Stage(_) => None,
    }
}

/// Creates the tcpgate user and group and the operators' group from the
/// installed sysusers.d file; says which already existed.
pub fn ensure_accounts(layout: &Layout) -> Result<()> {
    let present = user_exists(layout, USER)? && group_exists(layout, OPERATORS_GROUP)?;
    if present {
        println!("install: accounts {USER}, {OPERATORS_GROUP} ... exist");
        return Ok(());
    }
    // systemd-sysusers takes config paths as given, also under --root.
    std::fs::create_dir_all(layout.on_disk(Path::new("/etc")))
        .context("cannot create the image's /etc")?;
    let mut sysusers = Command::new("systemd-sysusers");
    sysusers.args(root_arg(layout));
    sysusers.arg(layout.on_disk(&layout.sysusers()));
    cmd::run(&mut sysusers).context("systemd-sysusers is in Debian's systemd package")?;
    println!("install: accounts {USER}, {OPERATORS_GROUP} ... created");
    Ok(())
}

/// Creates /var/log/tcpgate (0750 tcpgate:tcpgate) from the installed
/// tmpfiles.d file, or puts its owner and mode back.
pub fn ensure_directories(layout: &Layout) -> Result<()> {
    let existed = layout.on_disk(Path::new(LOG_DIR)).is_dir();
    let mut tmpfiles = Command::new("systemd-tmpfiles");
    tmpfiles.args(root_arg(layout)).arg("--create");
    tmpfiles.arg(layout.on_disk(&layout.tmpfiles()));
    cmd::run(&mut tmpfiles).context("systemd-tmpfiles is in Debian's systemd package")?;
    let state = if existed {
        "exists (owner and mode checked)"
    } else {
        "created"
    };
    println!("install: {LOG_DIR} (0750 {USER}:{USER}) ... {state}");
    Ok(())
}

/// Removes the accounts (uninstall --purge). userdel removes the user's own
/// group only where login.defs says so, hence the check afterwards.
pub fn remove_accounts(layout: &Layout) -> Result<()> {
    let root: Vec<String> = match &layout.target {
        Target::Image(dir) => vec!["--root".to_owned(), dir.display().to_string()],
        Target::System | Target::Stage(_) => Vec::new(),
    };
    if user_exists(layout, USER)? {
        cmd::run(Command::new("userdel").args(&root).arg(USER))?;
        println!("uninstall: user {USER} ... removed");
    } else {
        println!("uninstall: user {USER} ... not present");
    }
    for group in [USER, OPERATORS_GROUP] {
        if group_exists(layout, group)? {
            cmd::run(Command::new("groupdel").args(&root).arg(group))?;
            println!("uninstall: group {group} ... removed");
        } else {
            println!("uninstall: group {group} ... not present");
        }
    }
    Ok(())
}

/// `systemctl daemon-reload`, when installing on a system run by systemd.
pub fn daemon_reload(layout: &Layout) -> Result<()> {
    if layout.target == Target::System && systemd_running() {
        cmd::run(Command::new("systemctl").arg("daemon-reload"))?;
    }
    Ok(())
}

/// The service is running on this system.
pub fn service_active(layout: &Layout) -> bool {
    layout.target == Target::System
        && systemd_running()
        && Command::new("systemctl")
            .args(["--quiet", "is-active", UNIT])
            .status()
            .is_ok_and(|status| status.success())
}

/// Stops and disables the service before its files go away.
pub fn stop_service(layout: &Layout) -> Result<()> {
    if layout.target != Target::System || !systemd_running() {
        return Ok(());
    }
    if !layout.on_disk(&layout.unit_dir().join(UNIT)).exists() {
        return Ok(());
    }
    cmd::run(Command::new("systemctl").args(["disable", "--now", UNIT]))
}

/// What a package built from a --destdir staging must do after unpacking.
pub fn postinst_steps(layout: &Layout) -> String {
    format!(
        "install: staged only; nothing was created outside the staging directory.\n\
         install: a package's postinst must run, as root:\n\
         \x20   systemd-sysusers {sysusers}      # users {USER}, group {OPERATORS_GROUP}\n\
         \x20   systemd-tmpfiles --create {tmpfiles}   # {LOG_DIR}, 0750 {USER}:{USER}\n\
         \x20   {bindir}/tcpgate firewall apply   # the guard table: drops the protected prefixes\n\
         \x20   systemctl daemon-reload\n\
         install: and may then run: systemctl enable --now {UNIT}\n\
         install: /etc/tcpgate/tcpgate.toml is a conffile: never overwrite an edited one.",
        sysusers = layout.sysusers().display(),
        tmpfiles = layout.tmpfiles().display(),
        bindir = layout.prefix.join("bin").display(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_matched_by_whole_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let passwd = dir.path().join("passwd");
        std::fs::write(
            &passwd,
            "tcpgate-operators:x:999:\nroot:x:0:0::/root:/bin/sh\n",
        )
        .expect("write");
        assert!(!has_entry(&passwd, "tcpgate").expect("read"));
        assert!(has_entry(&passwd, "tcpgate-operators").expect("read"));
        assert!(!has_entry(&dir.path().join("missing"), "root").expect("absent file"));
    }

    #[test]
    fn postinst_names_the_staged_snippets_by_their_system_paths() {
        let layout =
            Layout::new(Path::new("/usr"), Some(Path::new("/tmp/stage")), None).expect("valid");
        let text = postinst_steps(&layout);
        assert!(
            text.contains("systemd-sysusers /usr/lib/sysusers.d/tcpgate.conf"),
            "{text}"
        );
        assert!(
            text.contains("systemd-tmpfiles --create /usr/lib/tmpfiles.d/tcpgate.conf"),
            "{text}"
        );
        assert!(!text.contains("/tmp/stage"), "{text}");
    }
}
