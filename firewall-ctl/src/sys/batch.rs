//! `BPF_MAP_*_BATCH` through the raw bpf(2) syscall.
//!
//! Written by hand because aya 0.14 exposes no batch operations. Used for the
//! CIDR tries (up to 16,384 entries a slot, where one syscall per key would
//! dominate a commit) and for the controller benchmark's floor. The exact-peer
//! tables need none of it: they are written in place through mmap.
//! Only the `batch` member of `union bpf_attr` is declared; the kernel
//! zero-extends a short attr.

use std::{
    io,
    mem::size_of,
    os::fd::{AsRawFd, BorrowedFd},
};

use aya::Pod;

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

#[repr(C, align(8))]
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

fn sys_bpf(cmd: libc::c_long, attr: &mut BatchAttr) -> io::Result<()> {
    // The caller's key/value pointers point to live buffers of `count` items.
    crate::sys::sys_bpf(cmd, attr).map(|_| ())
}

/// Chunk size for batch calls: large enough that syscall overhead vanishes,
/// small enough that one failure leaves little to report.
pub const CHUNK: usize = 4096;

/// Insert or overwrite `keys[i] -> values[i]`, in chunks. On error, returns how
/// many entries were written before it.
pub fn update<K: Pod, V: Pod>(
    map: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> Result<(), (usize, io::Error)> {
    assert_eq!(keys.len(), values.len());
    let mut done = 0;
    for (k, v) in keys.chunks(CHUNK).zip(values.chunks(CHUNK)) {
        let mut a = BatchAttr {
            keys: k.as_ptr() as u64,
            values: v.as_ptr() as u64,
            count: k.len() as u32,
            map_fd: map.as_raw_fd() as u32,
            ..Default::default()
        };
        if let Err(e) = sys_bpf(BPF_MAP_UPDATE_BATCH, &mut a) {
            return Err((done + a.count as usize, e));
        }
        done += k.len();
    }
    Ok(())
}

/// Delete `keys`; a key that is already gone is not an error.
pub fn delete<K: Pod>(map: BorrowedFd<'_>, keys: &[K]) -> io::Result<()> {
    for k in keys.chunks(CHUNK) {
        let mut a = BatchAttr {
            keys: k.as_ptr() as u64,
            count: k.len() as u32,
            map_fd: map.as_raw_fd() as u32,
            ..Default::default()
        };
        match sys_bpf(BPF_MAP_DELETE_BATCH, &mut a) {
            Ok(()) => {}
            // The batch stops at the first missing key: delete the rest one by one.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                for key in &k[a.count as usize..] {
                    let mut one = BatchAttr {
                        keys: key as *const K as u64,
                        count: 1,
                        map_fd: map.as_raw_fd() as u32,
                        ..Default::default()
                    };
                    match sys_bpf(BPF_MAP_DELETE_BATCH, &mut one) {
                        Ok(()) => {}
                        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                        Err(e) => return Err(e),
                    }
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Read every entry of a hash or LPM map, `limit` entries at most (a bound on
/// what we read from the kernel: a map larger than expected is an error).
pub fn dump<K: Pod + Default, V: Pod + Default>(
    map: BorrowedFd<'_>,
    limit: usize,
) -> io::Result<Vec<(K, V)>> {
    let mut out = Vec::new();
    for_each(map, limit, |k: &K, v: &V| out.push((*k, *v)))?;
    Ok(out)
}

/// Call `f` on every entry of a hash or LPM map, a chunk at a time, so a
/// large map is walked without holding it all; at most `limit` entries
/// (more is an error, returned after `f` saw the first `limit` or so).
///
/// A hash map is walked bucket by bucket: an entry present for the whole
/// walk is seen; one added or removed meanwhile may or may not be.
pub fn for_each<K: Pod + Default, V: Pod + Default>(
    map: BorrowedFd<'_>,
    limit: usize,
    mut f: impl FnMut(&K, &V),
) -> io::Result<usize> {
    let mut seen = 0usize;
    let mut keys = vec![K::default(); CHUNK];
    let mut vals = vec![V::default(); CHUNK];
    // Opaque cursor: a u32 bucket for hash maps, a whole key for the generic
    // implementation (LPM tries), so size it for both.
    let mut cursor = vec![0u8; size_of::<K>().max(8)];
    let mut first = true;
    loop {
        let mut a = BatchAttr {
            in_batch: if first { 0 } else { cursor.as_mut_ptr() as u64 },
            out_batch: cursor.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: vals.as_mut_ptr() as u64,
            count: CHUNK as u32,
            map_fd: map.as_raw_fd() as u32,
            ..Default::default()
        };
        first = false;
        let res = sys_bpf(BPF_MAP_LOOKUP_BATCH, &mut a);
        let n = (a.count as usize).min(CHUNK); // valid even with ENOENT (the last chunk)
        for (k, v) in keys[..n].iter().zip(&vals[..n]) {
            f(k, v);
        }
        seen += n;
        if seen > limit {
            return Err(io::Error::other(format!(
                "map holds more than {limit} entries"
            )));
        }
        match res {
            Ok(()) => continue,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(seen),
            Err(e) => return Err(e),
        }
    }
}
