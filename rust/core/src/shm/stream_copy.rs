//! A `memcpy` into shared memory that bypasses the cache for large copies: non-temporal
//! (streaming) stores on x86-64. An arena block is read by another process later, so filling
//! this core's cache with it (and reading its old lines first) is wasted work.
//!
//! Invariants: copies of fewer than [`NT_COPY_MIN`] bytes, and every copy on other targets, are
//! a plain `copy_nonoverlapping`. A streaming copy ends with a store fence, so that its stores
//! are ordered before whatever publishes the block afterwards (they are weakly ordered).

/// Copies of at least this many bytes bypass the cache (see [`copy`]).
pub(crate) const NT_COPY_MIN: usize = 256 << 10;

/// Copies `len` bytes from `src` to `dst`, with streaming stores when the copy is large.
///
/// # Safety
/// `src` valid for `len` bytes, `dst` for `len` writable bytes, no overlap.
pub(crate) unsafe fn copy(src: *const u8, dst: *mut u8, len: usize) {
    #[cfg(target_arch = "x86_64")]
    if len >= NT_COPY_MIN {
        // SAFETY: the caller's contract, passed on.
        unsafe { copy_streaming(src, dst, len) };
        return;
    }
    // SAFETY: the caller's contract.
    unsafe { std::ptr::copy_nonoverlapping(src, dst, len) };
}

/// `memcpy` with non-temporal (streaming) stores: SSE2, which every x86-64 has.
///
/// # Safety
/// `src` valid for `len` bytes, `dst` for `len` writable bytes, no overlap.
#[cfg(target_arch = "x86_64")]
unsafe fn copy_streaming(src: *const u8, dst: *mut u8, len: usize) {
    use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_sfence, _mm_stream_si128};
    let head = dst.align_offset(16).min(len);
    // SAFETY: the caller's contract; every access below stays within `[0, len)` of both
    // buffers, and the stores go to 16-byte aligned addresses (`dst + head` is aligned).
    unsafe {
        std::ptr::copy_nonoverlapping(src, dst, head);
        let mut i = head;
        while i + 64 <= len {
            let s = src.add(i).cast::<__m128i>();
            let d = dst.add(i).cast::<__m128i>();
            let (a, b) = (_mm_loadu_si128(s), _mm_loadu_si128(s.add(1)));
            let (c, e) = (_mm_loadu_si128(s.add(2)), _mm_loadu_si128(s.add(3)));
            _mm_stream_si128(d, a);
            _mm_stream_si128(d.add(1), b);
            _mm_stream_si128(d.add(2), c);
            _mm_stream_si128(d.add(3), e);
            i += 64;
        }
        std::ptr::copy_nonoverlapping(src.add(i), dst.add(i), len - i);
        // Streaming stores are weakly ordered: fence them before the block is published.
        _mm_sfence();
    }
}

#[cfg(test)]
mod tests {
    use super::NT_COPY_MIN;
    use crate::shm::Arena;

    #[test]
    fn writes_copy_every_byte_whatever_the_size_and_alignment() {
        let arena = Arena::create(1 << 21, 8).unwrap();
        let src: Vec<u8> = (0..(NT_COPY_MIN + 1000))
            .map(|i| (i * 7 + 3) as u8)
            .collect();
        for (offset, len) in [(0, 0), (3, 10), (0, NT_COPY_MIN), (5, NT_COPY_MIN + 995)] {
            let d = arena.alloc(len + 16, 1).unwrap();
            // SAFETY: a fresh block of at least len + 16 bytes; `src` has offset + len bytes.
            unsafe { arena.write(d.start + 1, src.as_ptr().add(offset), len) };
            // SAFETY: as above, read back.
            let out = unsafe { std::slice::from_raw_parts(arena.data_ptr(d.start + 1), len) };
            assert_eq!(out, &src[offset..offset + len], "offset {offset} len {len}");
            arena.decref(&d);
        }
    }
}
