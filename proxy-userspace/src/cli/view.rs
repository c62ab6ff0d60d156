//! Formatting shared by the operator commands (`sessions`, `grants`,
//! `revoke`): addresses from map records, sizes, rates and durations.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The default pin directory when neither `--pin-dir` nor the
/// configuration file says otherwise.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/tcpgate";

/// The pin directory: `--pin-dir`, else `[agent] pin_dir` from the
/// configuration file, else the default. An unreadable configuration (an
/// operator without access to it) falls back to the default with a note.
pub fn pin_dir(explicit: Option<&Path>, config: &Path, command: &str) -> PathBuf {
    if let Some(dir) = explicit {
        return dir.to_owned();
    }
    if !config.exists() {
        return PathBuf::from(DEFAULT_PIN_DIR);
    }
    match crate::config::Config::load(config) {
        Ok(config) => config.agent.pin_dir,
        Err(e) => {
            eprintln!(
                "tcpgate {command}: note: using {DEFAULT_PIN_DIR} because the configuration cannot be used ({e}); give --pin-dir to choose"
            );
            PathBuf::from(DEFAULT_PIN_DIR)
        }
    }
}

/// A 16-byte map address and a port.
#[must_use]
pub fn socket_addr(addr: [u8; 16], port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V6(Ipv6Addr::from(addr)).to_canonical(), port)
}

/// A time in nanoseconds since the epoch (0: none).
#[must_use]
pub fn unix_ns(ns: u64) -> Option<SystemTime> {
    (ns != 0).then(|| UNIX_EPOCH + Duration::from_nanos(ns))
}

/// Milliseconds since the epoch, for JSON.
#[must_use]
pub fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// `1.5 MiB`, `312 B`.
#[must_use]
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    #[allow(clippy::cast_precision_loss, reason = "display only")]
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// A byte rate per second, as bits per second (`12.3 Mbit/s`).
#[must_use]
pub fn rate(bytes_per_second: f64) -> String {
    let bits = bytes_per_second * 8.0;
    if bits < 1000.0 {
        return format!("{bits:.0} bit/s");
    }
    let (value, unit) = if bits < 1e6 {
        (bits / 1e3, "kbit/s")
    } else if bits < 1e9 {
        (bits / 1e6, "Mbit/s")
    } else {
        (bits / 1e9, "Gbit/s")
    };
    format!("{value:.1} {unit}")
}

/// `2h05m`, `4m10s`, `12s`.
#[must_use]
pub fn duration(d: Duration) -> String {
    let secs = d.as_secs();
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m{:02}s", secs / 60, secs % 60),
        3600..86400 => format!("{}h{:02}m", secs / 3600, (secs % 3600) / 60),
        _ => format!("{}d{:02}h", secs / 86400, (secs % 86400) / 3600),
    }
}

/// Clears the terminal for `--watch` when stdout is one.
pub fn clear_screen() {
    use std::io::IsTerminal as _;
    if std::io::stdout().is_terminal() {
        print!("\x1b[H\x1b[2J");
    }
}

/// Columns, a line under the header, no other borders: easy to read and
/// to `grep`.
const STYLE: comfy_table::TableStyle = comfy_table::TableStyle::new()
    .header_separator(comfy_table::LineStyle::none().fill('─').junction('─'));

/// A table in the style every operator command uses.
#[must_use]
pub fn table(header: &[&str]) -> comfy_table::Table {
    let mut table = comfy_table::Table::new();
    table.load_style(STYLE).set_header(header.iter().copied());
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_units() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(3 * 1024 * 1024 * 1024), "3.0 GiB");
        assert_eq!(rate(125.0), "1.0 kbit/s");
        assert_eq!(rate(0.0), "0 bit/s");
        assert_eq!(duration(Duration::from_secs(250)), "4m10s");
        assert_eq!(duration(Duration::from_secs(7500)), "2h05m");
        let v4 = proxy_common::addr::v4_mapped([192, 0, 2, 10]);
        assert_eq!(socket_addr(v4, 5432).to_string(), "192.0.2.10:5432");
    }
}
