//! The pages of an arena's memfd: which freed blocks keep theirs (the cache), returning pages
//! to the OS (`FALLOC_FL_PUNCH_HOLE`), and faulting them in ahead of a write.
//!
//! When a block is freed, its pages are returned to the OS unless the freed blocks that stay
//! resident are within the cache limit. Reusing resident pages matters: a fresh page of shared
//! memory costs a fault and zeroing, ~6 µs (a 4 MiB block: 6 ms to fill, against 0.5 ms for
//! resident pages). The owner of the arena raises the limit while work runs and sets it to 0 and
//! `trim`s when it stops, so that idle, the arena holds only live blocks.
//!
//! Invariants: the cache is measured, not counted: it is what the memfd has resident beyond the
//! live blocks and the metadata (at most the header, slot and extent pages), checked at each
//! free. A limit of 0 returns every freed block's pages at once. A punched range reads as zeros
//! afterwards; only ranges nobody uses are punched (a block being freed, a free extent).

use std::os::fd::{AsRawFd, BorrowedFd};

/// `madvise` advice: populate (prefault) page tables writable (Linux 5.14). Named here so that
/// the crate builds with libc versions that lack it; older kernels refuse it (a no-op for us).
const MADV_POPULATE_WRITE: libc::c_int = 23;

/// Bytes of the memfd `fd` backed by memory.
pub(crate) fn resident(fd: BorrowedFd<'_>) -> u64 {
    // SAFETY: `stat` is a plain C struct, filled by fstat.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat on our own descriptor writes into `st`, which lives for the call.
    unsafe { libc::fstat(fd.as_raw_fd(), &mut st) };
    st.st_blocks as u64 * 512
}

/// Whether a block just freed returns its pages to the OS: the cache limit is 0, or what is
/// resident beyond the `live` blocks and the `meta` bytes of metadata (the cache) exceeds it.
/// (The memfd's residency is only measured when there is a limit.)
pub(crate) fn returns_pages(fd: BorrowedFd<'_>, limit: u64, live: u64, meta: u64) -> bool {
    limit == 0 || resident(fd).saturating_sub(live + meta) > limit
}

/// Returns the pages of `[at, at + len)` of the memfd `fd` to the OS.
///
/// # Safety
/// Nobody uses the contents of the range (they read as zeros afterwards).
pub(crate) unsafe fn punch(fd: BorrowedFd<'_>, at: u64, len: u64) {
    // SAFETY: fallocate on a descriptor the caller lends; it only drops the pages' contents,
    // which nobody uses (the caller's contract).
    unsafe {
        libc::fallocate(
            fd.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            at as libc::off_t,
            len as libc::off_t,
        );
    }
}

/// Maps the pages of `[from, from + len)` writable in this process in one call, instead of a
/// fault per page as they are first written (`MADV_POPULATE_WRITE`; a no-op where it is
/// missing).
///
/// # Safety
/// `[from, from + len)` is a page-aligned range of a shared writable mapping of this process.
pub(crate) unsafe fn populate(from: usize, len: usize) {
    // SAFETY: a page range inside one of our own mappings (the caller's contract); populating
    // only faults pages in, leaving their contents as they are.
    unsafe { libc::madvise(from as *mut libc::c_void, len, MADV_POPULATE_WRITE) };
}

#[cfg(test)]
mod tests {
    use crate::shm::arena::tests::fill;
    use crate::shm::{Arena, PAGE};

    #[test]
    fn freed_pages_stay_resident_within_the_cache_limit_until_trimmed() {
        let arena = Arena::create(64 * PAGE, 8).unwrap();
        let base = arena.stats().resident_bytes;
        arena.set_cache_limit(4 * PAGE as u64);
        let a = arena.alloc(4 * PAGE, 1).unwrap();
        fill(&arena, &a, 3);
        arena.decref(&a);
        assert_eq!(
            arena.stats().resident_bytes,
            base + 4 * PAGE as u64,
            "kept for reuse"
        );
        let b = arena.alloc(4 * PAGE, 1).unwrap();
        assert_eq!(b.start, a.start, "the resident pages are reused first");
        let c = arena.alloc(4 * PAGE, 1).unwrap();
        fill(&arena, &b, 1);
        fill(&arena, &c, 1);
        arena.decref(&b);
        arena.decref(&c); // over the limit: returned at once
        assert_eq!(arena.stats().resident_bytes, base + 4 * PAGE as u64);
        arena.trim();
        assert_eq!(arena.stats().resident_bytes, base);
        arena.set_cache_limit(0);
        let d = arena.alloc(PAGE, 1).unwrap();
        arena.populate(d.start, d.len);
        assert_eq!(arena.stats().resident_bytes, base + PAGE as u64);
        arena.decref(&d);
        assert_eq!(arena.stats().resident_bytes, base);
    }
}
