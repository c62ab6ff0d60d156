//! The kernel's eBPF run statistics, switched on for as long as a
//! [`RunStatsOn`] lives (`BPF_ENABLE_STATS`): unlike writing
//! `kernel.bpf_stats_enabled`, nothing is left on if the process dies,
//! and tests or bench runs holding one at the same time do not undo each
//! other.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};

/// `BPF_ENABLE_STATS` and `BPF_STATS_RUN_TIME` (include/uapi/linux/bpf.h).
const BPF_ENABLE_STATS: libc::c_long = 32;
const BPF_STATS_RUN_TIME: u32 = 0;

/// Run statistics are on while this lives.
#[derive(Debug)]
pub struct RunStatsOn {
    _fd: OwnedFd,
}

impl RunStatsOn {
    /// Switches them on (needs `CAP_SYS_ADMIN`).
    pub fn enable() -> io::Result<Self> {
        // The `enable_stats` member of `union bpf_attr`: one u32.
        let mut attr: u32 = BPF_STATS_RUN_TIME;
        // SAFETY: the attribute is the 4-byte member the command reads,
        // and its size is passed, so the kernel reads no further.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_ENABLE_STATS,
                std::ptr::from_mut(&mut attr),
                size_of::<u32>(),
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = i32::try_from(fd).map_err(|_| io::ErrorKind::InvalidData)?;
        // SAFETY: a descriptor the kernel just returned, owned by no one else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { _fd: fd })
    }
}
