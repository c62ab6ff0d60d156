//! Reading a whole BPF hash map with `BPF_MAP_LOOKUP_BATCH`: one `bpf()`
//! call per chunk of entries; deleting many keys with
//! `BPF_MAP_DELETE_BATCH`. aya 0.14 iterates with two calls per entry
//! (next key, then lookup) and has no batch operations; the routed poll
//! reads `FLOWS` whole every `poll_interval`, where at thousands of flows
//! those calls were a third of the agent's CPU (docs/bench/notes-issue-17.md).
//!
//! Like the iterator, a batch read is not a snapshot: entries inserted or
//! removed meanwhile may be missed or seen, each entry is read whole.

use std::borrow::{Borrow, BorrowMut};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use aya::Pod;
use aya::maps::{HashMap, IterableMap, MapData, MapError};

/// `BPF_MAP_LOOKUP_BATCH` (include/uapi/linux/bpf.h).
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// `BPF_MAP_DELETE_BATCH`.
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// Entries asked for per call; grown when one hash bucket holds more.
const FIRST_CHUNK: usize = 256;
/// A bucket larger than this would be a broken map, not a full one.
const MAX_CHUNK: usize = 1 << 16;

#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("cannot read the map in batches (BPF_MAP_LOOKUP_BATCH)")]
    Lookup(#[source] io::Error),
    #[error("cannot delete map entries in batches (BPF_MAP_DELETE_BATCH)")]
    Delete(#[source] io::Error),
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

/// Reads every entry of a hash map, in batches, into buffers it keeps:
/// once they have grown to the map's size, a read allocates nothing (the
/// routed poll reads `FLOWS` whole ten times a second). Falls back to the
/// entry-by-entry iterator where the kernel has no batch lookup for the map
/// (`EINVAL`, `ENOTSUPP`).
pub struct BatchReader<K, V> {
    keys: Vec<K>,
    values: Vec<V>,
    /// Entries of the last read: the first `len` of `keys` and `values`.
    len: usize,
}

impl<K: Pod, V: Pod> Default for BatchReader<K, V> {
    fn default() -> Self {
        Self {
            keys: Vec::new(),
            values: Vec::new(),
            len: 0,
        }
    }
}

impl<K: Pod, V: Pod> BatchReader<K, V> {
    /// Reads the whole map; its entries stay here until the next read. On
    /// an error, no entry is left.
    pub fn read<T: Borrow<MapData>>(
        &mut self,
        map: &HashMap<T, K, V>,
    ) -> Result<usize, BatchError> {
        self.len = 0;
        let fd = map.map().fd().as_fd();
        let read = match self.read_batches(fd) {
            Err(BatchError::Lookup(e)) if unsupported(&e) => self.iterate(map),
            other => other,
        };
        if read.is_err() {
            self.len = 0;
        }
        read
    }

    /// The entries of the last read.
    pub fn entries(&self) -> impl Iterator<Item = (K, V)> + '_ {
        let (keys, values) = (&self.keys[..self.len], &self.values[..self.len]);
        keys.iter().copied().zip(values.iter().copied())
    }

    fn iterate<T: Borrow<MapData>>(&mut self, map: &HashMap<T, K, V>) -> Result<usize, BatchError> {
        // aya's iterator skips keys removed between their read and their lookup.
        for entry in map.iter() {
            let (key, value) = entry.map_err(BatchError::Iterate)?;
            self.push(key, value);
        }
        Ok(self.len)
    }

    fn push(&mut self, key: K, value: V) {
        self.room_for(1);
        self.keys[self.len] = key;
        self.values[self.len] = value;
        self.len += 1;
    }

    /// Grows the buffers (zeroed) to hold `more` entries after `len`.
    fn room_for(&mut self, more: usize) {
        let want = self.len + more;
        if self.keys.len() < want {
            self.keys.resize(want, zeroed());
            self.values.resize(want, zeroed());
        }
    }

    fn read_batches(&mut self, fd: BorrowedFd<'_>) -> Result<usize, BatchError> {
        // As many as the buffers hold (the largest read so far and one chunk
        // more, so bounded by the map's size): one call while the map holds
        // no more than then.
        let mut chunk = self.keys.len().clamp(FIRST_CHUNK, MAX_CHUNK);
        // The hash table's cursor is a bucket index (u32); 0 before the first call.
        let mut cursor: Option<u64> = None;
        loop {
            self.room_for(chunk);
            let mut next = 0u64;
            let mut attr = BatchAttr {
                in_batch: cursor.as_ref().map_or(0, |c| std::ptr::from_ref(c) as u64),
                out_batch: std::ptr::from_mut(&mut next) as u64,
                keys: self.keys[self.len..].as_mut_ptr() as u64,
                values: self.values[self.len..].as_mut_ptr() as u64,
                count: u32::try_from(chunk).unwrap_or(u32::MAX),
                map_fd: fd.as_raw_fd() as u32,
                ..BatchAttr::default()
            };
            // SAFETY: `keys` and `values` have room for `count` elements of
            // the map's key and value sizes after `len` (aya checked them
            // against K and V when the map was typed); `next` and `cursor`
            // outlive the call.
            let err = unsafe { bpf_batch(BPF_MAP_LOOKUP_BATCH, &mut attr) }.err();
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
            self.len += (attr.count as usize).min(chunk);
            // ENOENT: the last bucket was read (its entries still returned).
            if err.is_some() {
                return Ok(self.len);
            }
            cursor = Some(next);
        }
    }
}

/// Deletes `keys` from a hash map, many per `bpf()` call (the routed poll
/// removes every finished flow at once, where two calls per flow were a
/// visible share of the agent's time). A key no longer in the map is
/// skipped. Falls back to a call per key where the kernel has no batch
/// delete.
pub fn delete_all<T: BorrowMut<MapData>, K: Pod, V: Pod>(
    map: &mut HashMap<T, K, V>,
    keys: &[K],
) -> Result<(), BatchError> {
    let mut rest = keys;
    while !rest.is_empty() {
        let mut attr = BatchAttr {
            keys: rest.as_ptr() as u64,
            count: u32::try_from(rest.len()).unwrap_or(u32::MAX),
            map_fd: map.map().fd().as_fd().as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        // SAFETY: `keys` holds `count` keys of the map's key size (aya
        // checked it against K when the map was typed).
        let Err(e) = (unsafe { bpf_batch(BPF_MAP_DELETE_BATCH, &mut attr) }) else {
            return Ok(());
        };
        // `count` says how many keys were deleted before the one that failed.
        let done = (attr.count as usize).min(rest.len());
        match e.raw_os_error() {
            Some(libc::ENOENT) => rest = rest.get(done + 1..).unwrap_or_default(),
            _ if done == 0 && unsupported(&e) => {
                for key in rest {
                    let _ = map.remove(key);
                }
                return Ok(());
            }
            _ => return Err(BatchError::Delete(e)),
        }
    }
    Ok(())
}

/// Runs the batch command `cmd` on `attr` (`attr.count` is updated).
///
/// # Safety
///
/// Every pointer in `attr` must be valid for the command: `keys` (and
/// `values`) for `count` elements of the map's key (and value) sizes,
/// `in_batch` and `out_batch` null or valid for the map's cursor.
unsafe fn bpf_batch(cmd: libc::c_long, attr: &mut BatchAttr) -> io::Result<()> {
    // SAFETY: `BatchAttr` is the `batch` member of `union bpf_attr`; the
    // caller vouches for the pointers in it.
    unsafe { crate::sys_bpf::bpf(cmd, attr) }
}

fn unsupported(e: &io::Error) -> bool {
    // 524: ENOTSUPP, the kernel-internal code bpf() returns for map types
    // without the operation.
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::EOPNOTSUPP | 524)
    )
}

fn zeroed<T: Pod>() -> T {
    // SAFETY: `Pod` types are plain data for which all-zero bytes are valid.
    unsafe { std::mem::zeroed() }
}
