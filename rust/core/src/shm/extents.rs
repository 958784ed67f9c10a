//! The arena's extent allocator: the free extents of the data area, as an array in shared
//! memory (after the slots; see the arena's layout), first fit.
//!
//! Invariants, which hold whenever nobody holds the arena's mutex:
//!
//! - The extents are sorted by offset, each non-empty, never overlapping, and merged: no two
//!   are adjacent (a freed range is merged with its neighbours).
//! - Together with the allocated blocks they cover the data area exactly.
//! - There are at most `nslots + 1` of them (the gaps around at most `nslots` blocks), the
//!   array's capacity.
//!
//! The list is only read or written under the mutex, through [`Extents`], which a holder of the
//! mutex makes. After a process died holding the mutex, the list may be half-changed: it is
//! rebuilt from the live blocks ([`Extents::rebuild`]), which the slots record.

/// A range of the data area: `[off, off + len)`.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct Extent {
    pub(crate) off: u64,
    pub(crate) len: u64,
}

/// The free list, borrowed from shared memory for as long as the mutex is held.
pub(crate) struct Extents<'a> {
    ptr: *mut Extent,
    count: &'a mut u64,
    cap: usize,
}

impl<'a> Extents<'a> {
    /// The free list of the `*count` extents at `ptr`, in an array of `cap`.
    ///
    /// # Safety
    /// `ptr` is valid for `cap` extents, `*count <= cap`, and nothing else reads or writes the
    /// array or the count while the view lives (the arena's mutex is held).
    pub(crate) unsafe fn new(ptr: *mut Extent, count: &'a mut u64, cap: usize) -> Self {
        Extents { ptr, count, cap }
    }

    /// The free extents, sorted by offset.
    pub(crate) fn as_slice(&self) -> &[Extent] {
        // SAFETY: the first `count` entries of the array are the free list (see `new`).
        unsafe { std::slice::from_raw_parts(self.ptr, *self.count as usize) }
    }

    fn as_mut_slice(&mut self) -> &mut [Extent] {
        // SAFETY: as for `as_slice`; `&mut self` keeps this the only reference to the array.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, *self.count as usize) }
    }

    /// The free bytes, and how many extents hold them.
    pub(crate) fn total(&self) -> (u64, usize) {
        let ext = self.as_slice();
        (ext.iter().map(|e| e.len).sum(), ext.len())
    }

    fn insert_at(&mut self, at: usize, e: Extent) -> bool {
        let n = *self.count as usize;
        if n >= self.cap {
            return false; // cannot happen: there are at most nslots + 1 gaps between blocks
        }
        // SAFETY: `at <= n < cap`, the array's capacity; `copy` handles the overlap.
        unsafe {
            std::ptr::copy(self.ptr.add(at), self.ptr.add(at + 1), n - at);
            *self.ptr.add(at) = e;
        }
        *self.count = (n + 1) as u64;
        true
    }

    fn remove(&mut self, at: usize) {
        let n = *self.count as usize;
        // SAFETY: `at < n`; the tail moves down by one inside the array.
        unsafe { std::ptr::copy(self.ptr.add(at + 1), self.ptr.add(at), n - at - 1) };
        *self.count = (n - 1) as u64;
    }

    /// The first extent with room for `size` bytes.
    pub(crate) fn first_fit(&self, size: u64) -> Option<usize> {
        self.as_slice().iter().position(|e| e.len >= size)
    }

    /// Takes `size` bytes from the start of extent `at` (which has room: see `first_fit`);
    /// returns their offset.
    pub(crate) fn take(&mut self, at: usize, size: u64) -> u64 {
        let ext = &mut self.as_mut_slice()[at];
        let off = ext.off;
        ext.off += size;
        ext.len -= size;
        if ext.len == 0 {
            self.remove(at);
        }
        off
    }

    /// Puts `[off, off + len)` back in the free list, merged with its neighbours.
    pub(crate) fn free(&mut self, off: u64, len: u64) {
        let ext = self.as_mut_slice();
        let at = ext.partition_point(|e| e.off < off);
        let merge_prev = at > 0 && ext[at - 1].off + ext[at - 1].len == off;
        let merge_next = at < ext.len() && off + len == ext[at].off;
        match (merge_prev, merge_next) {
            (true, true) => {
                ext[at - 1].len += len + ext[at].len;
                self.remove(at);
            }
            (true, false) => ext[at - 1].len += len,
            (false, true) => {
                ext[at].off = off;
                ext[at].len += len;
            }
            (false, false) => {
                self.insert_at(at, Extent { off, len });
            }
        }
    }

    /// Makes the free list the gaps around the `live` blocks in a data area of `end` bytes.
    pub(crate) fn rebuild(&mut self, mut live: Vec<Extent>, end: u64) {
        live.sort_by_key(|e| e.off);
        *self.count = 0;
        let mut at = 0u64;
        for e in live
            .iter()
            .chain(std::iter::once(&Extent { off: end, len: 0 }))
        {
            if e.off > at {
                let n = *self.count as usize;
                self.insert_at(
                    n,
                    Extent {
                        off: at,
                        len: e.off - at,
                    },
                );
            }
            at = at.max(e.off + e.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shm::{Arena, PAGE};

    #[test]
    fn freed_ranges_merge_with_their_neighbours() {
        let mut array = [Extent { off: 0, len: 0 }; 4];
        let mut count = 0;
        // SAFETY: a local array of 4 extents, of which none are in use yet; only this view uses it.
        let mut ext = unsafe { Extents::new(array.as_mut_ptr(), &mut count, 4) };
        ext.rebuild(
            vec![Extent { off: 40, len: 10 }, Extent { off: 10, len: 10 }],
            60,
        );
        let spans = |ext: &Extents<'_>| -> Vec<(u64, u64)> {
            ext.as_slice().iter().map(|e| (e.off, e.len)).collect()
        };
        assert_eq!(spans(&ext), vec![(0, 10), (20, 20), (50, 10)]);
        assert_eq!(ext.first_fit(15), Some(1));
        assert_eq!(ext.take(1, 15), 20);
        assert_eq!(spans(&ext), vec![(0, 10), (35, 5), (50, 10)]);
        ext.free(20, 15); // merges with the next
        ext.free(10, 10); // with both
        ext.free(40, 10); // with both again
        assert_eq!(spans(&ext), vec![(0, 60)]);
        assert_eq!(ext.total(), (60, 1));
    }

    #[test]
    fn blocks_are_pages_and_come_back_merged() {
        let arena = Arena::create(64 * PAGE, 16).unwrap();
        let a = arena.alloc(1, 7).unwrap();
        let b = arena.alloc(PAGE + 1, 7).unwrap();
        let c = arena.alloc(3 * PAGE, 7).unwrap();
        assert_eq!(
            (a.len, b.len, c.len),
            (PAGE as u64, 2 * PAGE as u64, 3 * PAGE as u64)
        );
        assert_eq!(arena.stats().live_bytes, 6 * PAGE as u64);
        assert_eq!(arena.stats().blocks, 3);
        arena.decref(&b);
        arena.decref(&a);
        assert_eq!(arena.free_extents().1, 2); // [0, 3 pages) and after c
        arena.decref(&c);
        assert_eq!(arena.free_extents(), (64 * PAGE as u64, 1));
        assert_eq!(arena.stats().live_bytes, 0);
    }

    #[test]
    fn a_full_arena_says_so_and_recovers() {
        let arena = Arena::create(4 * PAGE, 16).unwrap();
        let a = arena.alloc(3 * PAGE, 0).unwrap();
        assert!(arena.alloc(2 * PAGE, 0).is_none());
        let b = arena.alloc(PAGE, 0).unwrap();
        assert!(arena.alloc(1, 0).is_none());
        arena.decref(&a);
        assert!(arena.alloc(3 * PAGE, 0).is_some());
        arena.decref(&b);
    }

    #[test]
    fn running_out_of_slots_gives_the_extent_back() {
        let arena = Arena::create(16 * PAGE, 2).unwrap();
        let a = arena.alloc(1, 0).unwrap();
        let _b = arena.alloc(1, 0).unwrap();
        assert!(arena.alloc(1, 0).is_none());
        assert_eq!(arena.free_extents(), (14 * PAGE as u64, 1));
        arena.decref(&a);
        assert!(arena.alloc(1, 0).is_some());
    }
}
