//! `cargo xtask uninstall`: removes what install added. The config and the
//! audit log stay (and so do the accounts that own the log) unless --purge.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use clap::Args;

use super::files::{self, report};
use super::layout::{BPFFS_UNIT, CONFIG_DIR, LOG_DIR, Layout, PIN_DIR, Target, UNIT};
use super::{TargetArgs, system};
use crate::host::Host;

#[derive(Args, Debug)]
pub struct UninstallArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Also remove /etc/tcpgate, the audit log in /var/log/tcpgate, and the
    /// tcpgate user and groups.
    #[arg(long)]
    pub purge: bool,
}

pub fn run(host: &Host, args: &UninstallArgs) -> Result<()> {
    let layout = args.target.layout()?;
    super::require_root_for(&layout, host, "uninstall")?;
    system::stop_service(&layout)?;
    super::guard::remove(&layout, &layout.on_disk(&layout.binary()))?;

    let mut paths = vec![
        layout.binary(),
        layout.unit_dir().join(UNIT),
        layout.unit_dir().join(BPFFS_UNIT),
        layout.sysusers(),
        layout.tmpfiles(),
        layout.bash_completion(),
        layout.zsh_completion(),
        layout.fish_completion(),
    ];
    paths.extend(installed_man_pages(&layout)?);
    for path in &paths {
        let outcome = files::remove(&layout.on_disk(path))?;
        report("uninstall", path, outcome);
    }
    if layout.target == Target::System {
        remove_empty_pin_dir()?;
    }

    if args.purge {
        for dir in [CONFIG_DIR, LOG_DIR] {
            let outcome = files::remove_tree(&layout.on_disk(Path::new(dir)))?;
            report("uninstall", Path::new(dir), outcome);
        }
        if !matches!(layout.target, Target::Stage(_)) {
            system::remove_accounts(&layout)?;
        }
    } else {
        println!(
            "uninstall: kept {CONFIG_DIR} (config), {LOG_DIR} (audit log) and the tcpgate \
             accounts that own it; `cargo xtask uninstall --purge` removes them too"
        );
    }
    system::daemon_reload(&layout)?;
    Ok(())
}

/// The man pages install wrote: `tcpgate.1` and `tcpgate-<verb>.1`, as the
/// system sees them.
pub fn installed_man_pages(layout: &Layout) -> Result<Vec<PathBuf>> {
    let dir = layout.on_disk(&layout.man1());
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot list {}", dir.display())),
    };
    let mut pages = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
        if let Some(name) = entry.file_name().to_str()
            && super::layout::is_tcpgate_man_page(name)
        {
            pages.push(layout.man1().join(name));
        }
    }
    pages.sort();
    Ok(pages)
}

/// The unit creates the pin directory; the stopped agent removes its pins
/// but cannot remove the directory (bpffs is root's). Never touch pins a
/// running or crashed agent left: only an empty directory goes.
fn remove_empty_pin_dir() -> Result<()> {
    let dir = Path::new(PIN_DIR);
    match std::fs::remove_dir(dir) {
        Ok(()) => report("uninstall", dir, files::Outcome::Removed),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) if e.kind() == std::io::ErrorKind::DirectoryNotEmpty => println!(
            "uninstall: {PIN_DIR} ... kept: it still holds pins (an agent running outside \
             systemd, or [agent] keep_pins); remove them with `rm -r {PIN_DIR}` once unused"
        ),
        Err(e) => return Err(e).with_context(|| format!("cannot remove {}", dir.display())),
    }
    Ok(())
}
