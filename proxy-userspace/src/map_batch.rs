//! Reading a whole BPF hash map with `BPF_MAP_LOOKUP_BATCH`: one `bpf()`
//! call per chunk of entries. aya 0.14 iterates with two calls per entry
//! (next key, then lookup) and has no batch operations; the routed poll
//! reads `FLOWS` whole every `poll_interval`, where at thousands of flows
//! those calls were a third of the agent's CPU (docs/bench/notes-issue-17.md).
//!
//! Like the iterator, a batch read is not a snapshot: entries inserted or
//! removed meanwhile may be missed or seen, each entry is read whole.

use std::borrow::Borrow;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use aya::Pod;
use aya::maps::{HashMap, IterableMap, MapData, MapError};

/// `BPF_MAP_LOOKUP_BATCH` (include/uapi/linux/bpf.h).
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// Entries asked for per call; grown when one hash bucket holds more.
const FIRST_CHUNK: usize = 256;
/// A bucket larger than this would be a broken map, not a full one.
const MAX_CHUNK: usize = 1 << 16;

#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("cannot read the map in batches (BPF_MAP_LOOKUP_BATCH)")]
    Lookup(#[source] io::Error),
    #[error("cannot read the map entry by entry")]
    Iterate(#[source] MapError),
}

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Every entry of a hash map. Falls back to the entry-by-entry iterator
/// where the kernel has no batch lookup for the map (`EINVAL`, `ENOTSUPP`).
pub fn entries<T: Borrow<MapData>, K: Pod, V: Pod>(
    map: &HashMap<T, K, V>,
) -> Result<Vec<(K, V)>, BatchError> {
    let fd = map.map().fd().as_fd();
    match read_all::<K, V>(fd) {
        Err(BatchError::Lookup(e)) if unsupported(&e) => iterate(map),
        other => other,
    }
}

fn unsupported(e: &io::Error) -> bool {
    // 524: ENOTSUPP, the kernel-internal code bpf() returns for map types
    // without the operation.
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::EOPNOTSUPP | 524)
    )
}

fn iterate<T: Borrow<MapData>, K: Pod, V: Pod>(
    map: &HashMap<T, K, V>,
) -> Result<Vec<(K, V)>, BatchError> {
    // aya's iterator skips keys removed between their read and their lookup.
    map.iter()
        .collect::<Result<_, _>>()
        .map_err(BatchError::Iterate)
}

fn read_all<K: Pod, V: Pod>(fd: BorrowedFd<'_>) -> Result<Vec<(K, V)>, BatchError> {
    let mut out = Vec::new();
    let mut chunk = FIRST_CHUNK;
    let mut keys: Vec<K> = Vec::new();
    let mut values: Vec<V> = Vec::new();
    // The hash table's cursor is a bucket index (u32); 0 before the first call.
    let mut cursor: Option<u64> = None;
    loop {
        keys.resize(chunk, zeroed());
        values.resize(chunk, zeroed());
        let mut next = 0u64;
        let mut attr = BatchAttr {
            in_batch: cursor.as_ref().map_or(0, |c| std::ptr::from_ref(c) as u64),
            out_batch: std::ptr::from_mut(&mut next) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: u32::try_from(chunk).unwrap_or(u32::MAX),
            map_fd: fd.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        // SAFETY: `attr` is a valid `batch` member of `union bpf_attr`, and
        // its size is passed; `keys` and `values` hold `count` elements of the
        // map's key and value sizes (aya checked them against K and V when
        // the map was typed); `next` and `cursor` outlive the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                std::ptr::from_mut(&mut attr),
                size_of::<BatchAttr>(),
            )
        };
        let err = (rc < 0).then(io::Error::last_os_error);
        match err.as_ref().and_then(io::Error::raw_os_error) {
            // A bucket holds more entries than asked for: ask for more.
            Some(libc::ENOSPC) if chunk < MAX_CHUNK => {
                chunk *= 2;
                continue;
            }
            None | Some(libc::ENOENT) => {}
            _ => {
                return Err(BatchError::Lookup(
                    err.unwrap_or_else(io::Error::last_os_error),
                ));
            }
        }
        let got = (attr.count as usize).min(chunk);
        out.extend(keys.drain(..got).zip(values.drain(..got)));
        // ENOENT: the last bucket was read (its entries still returned).
        if err.is_some() {
            return Ok(out);
        }
        cursor = Some(next);
    }
}

fn zeroed<T: Pod>() -> T {
    // SAFETY: `Pod` types are plain data for which all-zero bytes are valid.
    unsafe { std::mem::zeroed() }
}
