//! What a closed session's audit line says about the bytes it moved, and
//! by which path, checked against what the test sent.

use anyhow::{Context, Result, ensure};
use serde_json::Value;

use crate::fixture::{COPY_FIRST_BUDGET, DataPath};

fn field(event: &Value, name: &str) -> Result<u64> {
    event[name]
        .as_u64()
        .with_context(|| format!("audit event lacks {name}: {event}"))
}

/// On the eBPF path every byte must have gone through the verdict program
/// (its map counters) and none through user space; on the user-space path
/// the reverse. A copy-first session is one or the other, as its audit
/// line says.
pub fn assert_bytes(path: DataPath, event: &Value, up: u64, down: u64) -> Result<()> {
    assert_bytes_with(path, event, up, down, false)
}

/// The bytes a closed session moved, from its audit line: in the kernel
/// (the eBPF session map's counters), copied by the agent, and of those
/// the ones the verdict program handed over under backpressure.
/// (Only a session the kernel carried has the last.)
struct Moved {
    kernel: (u64, u64),
    user: (u64, u64),
    handed: (u64, u64),
}

impl Moved {
    fn of(event: &Value) -> Result<Self> {
        let pair = |up: &str, down: &str| -> Result<(u64, u64)> {
            Ok((field(event, up)?, field(event, down)?))
        };
        let handed = if event["datapath"] == "userspace" {
            (0, 0)
        } else {
            pair("backpressure_bytes_up", "backpressure_bytes_down")?
        };
        Ok(Self {
            kernel: pair("kernel_bytes_up", "kernel_bytes_down")?,
            user: pair("userspace_bytes_up", "userspace_bytes_down")?,
            handed,
        })
    }

    /// Bytes the agent copied that the verdict program did not hand over:
    /// those of the copy before the splice.
    fn copied_first(&self) -> Option<u64> {
        let up = self.user.0.checked_sub(self.handed.0)?;
        let down = self.user.1.checked_sub(self.handed.1)?;
        Some(up + down)
    }
}

/// [`assert_bytes`] for transfers whose receiver may be slower than the
/// sender: on the kernel path the agent then copies part of the stream
/// under backpressure, and every byte it copied must be one the verdict
/// program handed over (`userspace == backpressure`, from the map), or,
/// on the copy-first path, one of the copy before the splice.
pub fn assert_bytes_with(
    path: DataPath,
    event: &Value,
    up: u64,
    down: u64,
    backpressure: bool,
) -> Result<()> {
    ensure!(field(event, "bytes_up")? == up, "bytes_up: {event}");
    ensure!(field(event, "bytes_down")? == down, "bytes_down: {event}");
    ensure!(path.may_say(&event["datapath"]), "datapath: {event}");
    let moved = Moved::of(event)?;
    if event["datapath"] == "userspace" {
        ensure!(
            moved.kernel == (0, 0) && moved.user == (up, down),
            "user-space path moved bytes in the kernel: {event}"
        );
        return Ok(());
    }
    let copied_first = moved.copied_first().with_context(|| {
        format!("the map counts more bytes handed over than the agent copied: {event}")
    })?;
    if path == DataPath::CopyFirst {
        ensure!(
            copied_first >= COPY_FIRST_BUDGET,
            "spliced before the agent copied its budget: {event}"
        );
    } else {
        ensure!(
            copied_first == 0,
            "the agent copied bytes the verdict program did not hand over under backpressure: {event}"
        );
    }
    ensure!(
        backpressure || moved.handed == (0, 0),
        "user space copied payload handed over under backpressure on the kernel path: {event}"
    );
    let (kernel, user) = (moved.kernel, moved.user);
    ensure!(
        (kernel.0 + user.0, kernel.1 + user.1) == (up, down),
        "kernel byte counters (from the eBPF session map) do not add up: {event}"
    );
    // On the copy-first path the copy may have carried everything: a
    // session can end right after spending its budget.
    if path == DataPath::Ebpf {
        ensure!(
            up == 0 || kernel.0 > 0,
            "nothing went up through the kernel: {event}"
        );
        ensure!(
            down == 0 || kernel.1 > 0,
            "nothing went down through the kernel: {event}"
        );
    }
    Ok(())
}
