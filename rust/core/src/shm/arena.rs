//! The shared-memory arena: blocks of one memfd that several processes allocate, share and free,
//! so that large buffers (numpy arrays) cross between processes without being copied through a
//! ring or a pipe.
//!
//! Layout of the memfd:
//!
//! ```text
//! page 0      header: magic, sizes, a robust process-shared mutex, the allocator's counters
//! page 1..    slots: one 32-byte record per block that may be live (its life: generation, state
//!             and references in one word; owner; place)
//!             extents: the free extents of the data area, sorted, merged (under the mutex)
//! data_off..  the data area: blocks of whole pages
//! ```
//!
//! The arena wires together one concept per module:
//!
//! - `robust_mutex`: the mutex in the header, which allocation and freeing take.
//! - `extents`: the free list of the data area, first fit, merged on free.
//! - `life`: a block's slot, its life (`WRITING`, `SHARED`, free) and references; a stale
//!   descriptor changes nothing.
//! - `page_cache`: whether a freed block's pages go back to the OS (the cache limit), and
//!   returning or prefaulting pages.
//! - `stream_copy`: the copy into a block that bypasses the cache.
//!
//! The last `decref` frees the block: under the mutex, its extent goes back to the free list,
//! and its pages are returned to the OS unless the cache keeps them (see `page_cache`).
//!
//! A process killed at any instant cannot wedge the arena: the mutex is robust (the next locker
//! is told the owner died) and the free list is then rebuilt from the slots, which are the truth.
//! A killed process can at worst leak the blocks it held references to; those go with the memfd
//! when every process has unmapped it. Descriptors read from messages are validated (`check`):
//! a damaged one is an error, never an access outside the arena.

use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use super::extents::{Extent, Extents};
use super::life::{Slot, FREE, WRITING};
use super::page_cache;
use super::robust_mutex::{Acquired, MutexGuard, RobustMutex};
use super::stream_copy;
use super::Region;

const MAGIC: u64 = 0x7069_7065_6172_656e; // "pipearen"
/// The allocation unit: blocks are whole pages, so that freeing one returns all of its memory.
pub const PAGE: usize = 4096;
const LOCK_TIMEOUT_NS: i64 = 1_000_000_000;

/// A block, or a byte range inside one, as named in messages: `start` and `len` are offsets in
/// the data area; `slot` and `gen` say which allocation of the slot it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Desc {
    pub slot: u32,
    pub gen: u32,
    pub start: u64,
    pub len: u64,
}

#[repr(C)]
struct Header {
    magic: u64,
    nslots: u64,
    data_off: u64,
    data_len: u64,
    // Read and written only through `Locked`, under `lock`.
    guarded: Guarded,
    lock: RobustMutex,
    // How many bytes of freed blocks may stay resident for reuse (see `set_cache_limit`).
    cache_limit: AtomicU64,
    // The next owner tag to hand out (see `new_tag`); 0 is the creator's and is never handed out.
    next_tag: AtomicU32,
    // How many last references were dropped without the mutex (see `decref`): the next locker
    // frees those blocks.
    unfreed: AtomicU32,
}

/// The allocator's counters, guarded by the header's mutex: `Locked` hands out `&mut` to this
/// part of the header alone, never to the mutex or the atomics beside it, which other threads
/// and processes use meanwhile.
#[repr(C)]
struct Guarded {
    live: u64,
    nextents: u64,
    hint: u64,
}

/// What the arena holds now (see [`Arena::stats`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stats {
    /// Bytes in live blocks.
    pub live_bytes: u64,
    /// Live blocks.
    pub blocks: u64,
    /// Bytes of the memfd backed by memory (header and slot pages included).
    pub resident_bytes: u64,
}

/// A shared-memory arena (see the module docs).
pub struct Arena {
    region: Region,
    nslots: usize,
    data_off: usize,
    data_len: usize,
}

fn round_up(n: usize, to: usize) -> usize {
    n.div_ceil(to) * to
}

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_owned())
}

/// The mutex held: access to the allocator's state. Unlocks on drop (the guard's).
struct Locked<'a> {
    arena: &'a Arena,
    guard: MutexGuard<'a>,
}

impl Locked<'_> {
    fn counters(&mut self) -> &mut Guarded {
        // SAFETY: the guarded counters are only accessed under the mutex, which this guard
        // holds, and `&mut self` keeps this the only reference made from the guard. The pointer
        // goes to the field itself: no reference to the rest of the header is made.
        unsafe { &mut *std::ptr::addr_of_mut!((*self.arena.header_ptr()).guarded) }
    }

    fn extents(&mut self) -> Extents<'_> {
        let (ptr, cap) = (self.arena.extents_ptr(), self.arena.nslots + 1);
        let count = &mut self.counters().nextents;
        // SAFETY: the extents array has room for nslots + 1 entries (see `layout`), `nextents`
        // never exceeds that (checked where it grows), and it is only accessed under the mutex.
        unsafe { Extents::new(ptr, count, cap) }
    }

    /// Frees the block in `slot` if it is still allocation `gen` (and, for `reclaim`, with
    /// `only_writing`, still unshared or unreferenced): returns its pages to the OS, its extent
    /// to the free list.
    fn free_slot(&mut self, index: usize, gen: u32, only_writing: bool) {
        let slot = self.arena.slot(index);
        let (off, len) = slot.place();
        // Marked free first, in one compare-exchange against the lock-free changes (a receiver
        // sharing the block, a holder adding or dropping a reference), and only then are its
        // pages dropped: a block shared at the last moment keeps them. Nobody can take the slot
        // or the extent before the free below: allocation holds the mutex, as we do.
        if !slot.free(gen, only_writing) {
            return; // freed already (by a rebuild after a death), or shared meanwhile
        }
        self.counters().live -= len;
        let live = self.counters().live;
        let limit = self.arena.cache_limit().load(Ordering::Relaxed);
        // Resident beyond the live blocks and the metadata (at most `data_off`): the cache.
        let meta = self.arena.data_off as u64;
        if page_cache::returns_pages(self.arena.fd(), limit, live, meta) {
            self.arena.punch(off, len);
        }
        self.extents().free(off, len);
    }

    /// Frees the blocks whose last reference went without the mutex (see `decref`).
    fn sweep(&mut self) {
        for i in 0..self.arena.nslots {
            let life = self.arena.slot(i).life();
            if life.state() != FREE && life.refs() == 0 {
                self.free_slot(i, life.gen(), false);
            }
        }
    }

    /// Returns the pages of every free extent to the OS.
    fn trim(&mut self) {
        let arena = self.arena;
        for e in self.extents().as_slice() {
            arena.punch(e.off, e.len);
        }
    }

    /// Rebuilds the free list from the slots, after a process died holding the mutex: a block
    /// is live if its slot is not free and it still has a reference.
    fn rebuild(&mut self) {
        let mut live: Vec<Extent> = Vec::new();
        for i in 0..self.arena.nslots {
            let slot = self.arena.slot(i);
            let life = slot.life();
            if life.state() == FREE {
                continue;
            }
            let (off, len) = slot.place();
            if life.refs() == 0 {
                self.arena.punch(off, len);
                slot.clear(life);
                continue;
            }
            live.push(Extent { off, len });
        }
        self.counters().live = live.iter().map(|e| e.len).sum();
        let end = self.arena.data_len as u64;
        self.extents().rebuild(live, end);
    }
}

impl Arena {
    /// A new arena with `data_len` bytes for blocks (rounded up to pages) and room for `nslots`
    /// live blocks. The memfd is sparse: memory is used only by live blocks.
    pub fn create(data_len: usize, nslots: usize) -> io::Result<Arena> {
        if data_len == 0 || nslots == 0 || nslots > (u32::MAX as usize) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "bad arena size",
            ));
        }
        let data_len = data_len
            .checked_next_multiple_of(PAGE)
            .ok_or_else(|| invalid("arena size too large"))?;
        let data_off = Self::layout(nslots).ok_or_else(|| invalid("arena too large"))?;
        let total = data_off
            .checked_add(data_len)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "arena too large"))?;
        let region = Region::create("pipeflow-arena", total)?;
        let arena = Arena {
            region,
            nslots,
            data_off,
            data_len,
        };
        // SAFETY: the region is fresh, zero-filled, at least one page long and not yet shared:
        // nothing else accesses the header while it is written, and the mutex is initialised
        // once, here.
        unsafe {
            let h = arena.region.as_ptr().cast::<Header>();
            (*h).magic = MAGIC;
            (*h).nslots = nslots as u64;
            (*h).data_off = data_off as u64;
            (*h).data_len = data_len as u64;
            (*h).guarded = Guarded {
                live: 0,
                nextents: 1,
                hint: 0,
            };
            *arena.extents_ptr() = Extent {
                off: 0,
                len: data_len as u64,
            };
            arena.mutex().init()?;
        }
        Ok(arena)
    }

    /// Maps an arena another process created, from its memfd; checks its header.
    pub fn open(fd: OwnedFd) -> io::Result<Arena> {
        let region = Region::from_fd(fd)?;
        if region.len() < 2 * PAGE {
            return Err(invalid("not an arena: too small"));
        }
        // SAFETY: the region is at least a page long and page-aligned; these fields are written
        // once by the creator before the memfd is handed to anyone.
        let (magic, nslots, data_off, data_len) = unsafe {
            let h = region.as_ptr().cast::<Header>();
            ((*h).magic, (*h).nslots, (*h).data_off, (*h).data_len)
        };
        let (nslots, data_off, data_len) = (nslots as usize, data_off as usize, data_len as usize);
        // The slot count first bounded (descriptors name slots with a u32), and the layout
        // computed without wrapping: an absurd count whose layout wrapped around to the
        // header's `data_off` would have every slot past the first few outside the mapping.
        if magic != MAGIC
            || nslots == 0
            || nslots > u32::MAX as usize
            || Self::layout(nslots) != Some(data_off)
            || data_off.checked_add(data_len) != Some(region.len())
        {
            return Err(invalid("not an arena: bad header"));
        }
        Ok(Arena {
            region,
            nslots,
            data_off,
            data_len,
        })
    }

    /// Where the data area starts, for `nslots` slots; None if that overflows.
    fn layout(nslots: usize) -> Option<usize> {
        let slots = nslots
            .checked_mul(std::mem::size_of::<Slot>())?
            .checked_next_multiple_of(64)?;
        let extents = nslots
            .checked_add(1)?
            .checked_mul(std::mem::size_of::<Extent>())?;
        PAGE.checked_add(slots)?
            .checked_add(extents)?
            .checked_next_multiple_of(PAGE)
    }

    /// The memfd, to hand to a child process.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.region.fd()
    }

    /// Bytes available for blocks.
    pub fn data_len(&self) -> usize {
        self.data_len
    }

    /// How many blocks may be live at once.
    pub fn nslots(&self) -> usize {
        self.nslots
    }

    fn header_ptr(&self) -> *mut Header {
        self.region.as_ptr().cast::<Header>()
    }

    fn mutex(&self) -> &RobustMutex {
        // SAFETY: the header is at the start of the mapping, which outlives `self`; the mutex
        // is only ever used through `RobustMutex` (an `UnsafeCell`), and the reference covers
        // that field alone.
        unsafe { &*std::ptr::addr_of!((*self.header_ptr()).lock) }
    }

    fn cache_limit(&self) -> &AtomicU64 {
        // SAFETY: the header is at the start of the mapping, which outlives `self`; the field
        // is only ever used atomically, and the reference covers it alone.
        unsafe { &*std::ptr::addr_of!((*self.header_ptr()).cache_limit) }
    }

    fn next_tag(&self) -> &AtomicU32 {
        // SAFETY: as for `cache_limit`.
        unsafe { &*std::ptr::addr_of!((*self.header_ptr()).next_tag) }
    }

    fn unfreed(&self) -> &AtomicU32 {
        // SAFETY: as for `cache_limit`.
        unsafe { &*std::ptr::addr_of!((*self.header_ptr()).unfreed) }
    }

    pub(crate) fn slot(&self, index: usize) -> &Slot {
        // A real check, also in release builds: the public functions that take a slot index
        // (`incref`, `decref`, ...) are safe, so an index out of range must panic, not read
        // outside the slots array.
        assert!(index < self.nslots, "arena slot {index} out of range");
        // SAFETY: slot `index < nslots` lies inside the slots array (see `layout`), which is
        // 32-byte aligned in the mapping and accessed only through atomics; all-zero bytes and
        // every other bit pattern are valid for these atomics.
        unsafe {
            &*self
                .region
                .as_ptr()
                .add(PAGE + index * std::mem::size_of::<Slot>())
                .cast::<Slot>()
        }
    }

    fn extents_ptr(&self) -> *mut Extent {
        let off = PAGE + round_up(self.nslots * std::mem::size_of::<Slot>(), 64);
        // SAFETY: inside the mapping (see `layout`); 16-byte aligned since `off` is.
        unsafe { self.region.as_ptr().add(off).cast::<Extent>() }
    }

    /// The address of byte `start` of the data area (`start <= data_len`).
    pub fn data_ptr(&self, start: u64) -> *mut u8 {
        assert!(start as usize <= self.data_len);
        // SAFETY: in bounds of the mapping, by the assertion and the layout.
        unsafe { self.region.as_ptr().add(self.data_off + start as usize) }
    }

    /// Whether `[ptr, ptr + len)` lies in this mapping's data area; its start offset if so.
    pub fn offset_of(&self, ptr: *const u8, len: usize) -> Option<u64> {
        let base = self.data_ptr(0) as usize;
        let p = ptr as usize;
        if p >= base && p.checked_add(len)? <= base + self.data_len {
            Some((p - base) as u64)
        } else {
            None
        }
    }

    /// How many bytes of freed blocks may stay resident (in the whole arena, for every process)
    /// so that new blocks reuse their pages; 0 returns every freed block's pages at once.
    pub fn set_cache_limit(&self, bytes: u64) {
        // Relaxed: a hint read under the mutex; a free that still sees the old limit only
        // keeps or returns one block's pages.
        self.cache_limit().store(bytes, Ordering::Relaxed);
    }

    /// A new owner tag, unique among every process that maps this arena: the tag a new writer
    /// (a worker process) allocates its blocks with, so that `reclaim` after its death frees only
    /// its blocks, also when workers start workers of their own (a nested pipeline). Never 0,
    /// the creator's tag.
    pub fn new_tag(&self) -> u32 {
        loop {
            // Relaxed: the read-modify-write alone makes each tag unique; no other memory is
            // published through the counter. It starts at 0 in a fresh memfd (zero-filled), and
            // 0 is skipped, also after the counter wraps.
            let tag = self.next_tag().fetch_add(1, Ordering::Relaxed);
            if tag != 0 {
                return tag;
            }
        }
    }

    /// Returns the pages of every free block to the OS (the cache emptied).
    pub fn trim(&self) {
        if let Some(mut locked) = self.lock() {
            locked.trim();
        }
    }

    /// Maps the pages of `[start, start + len)` writable in this process in one call, instead
    /// of a fault per page as they are first written (`MADV_POPULATE_WRITE`, Linux 5.14; a no-op
    /// where it is missing).
    pub fn populate(&self, start: u64, len: u64) {
        let base = self.data_ptr(0) as usize;
        let from = (base + start as usize) & !(PAGE - 1);
        let to = round_up(base + (start + len) as usize, PAGE).min(base + self.data_len);
        if to > from {
            // SAFETY: a page range inside our own mapping (shared, writable).
            unsafe { page_cache::populate(from, to - from) };
        }
    }

    /// Copies `len` bytes from `src` (outside the arena) to byte `start` of the data area, with
    /// non-temporal stores on x86-64 for large copies: the block is read by another process
    /// later, so filling the cache with it (and reading its old lines first) is wasted work.
    ///
    /// # Safety
    /// `src` must be valid for `len` bytes, and `[start, start + len)` must be a range of a
    /// block the caller alone writes; the two must not overlap.
    pub unsafe fn write(&self, start: u64, src: *const u8, len: usize) {
        assert!(start as usize + len <= self.data_len);
        let dst = self.data_ptr(start);
        // SAFETY: the caller's contract, passed on.
        unsafe { stream_copy::copy(src, dst, len) };
    }

    fn punch(&self, off: u64, len: u64) {
        // SAFETY: our own memfd, inside the data area; it only drops the pages' contents (they
        // read as zeros afterwards), which nobody uses: the block is being freed.
        unsafe { page_cache::punch(self.region.fd(), self.data_off as u64 + off, len) };
    }

    /// Takes the mutex, waiting at most a second (`None` then: the caller falls back). After a
    /// holder died, the free list is rebuilt before use.
    fn lock(&self) -> Option<Locked<'_>> {
        match self.mutex().lock(LOCK_TIMEOUT_NS)? {
            Acquired::Clean(guard) => {
                let mut locked = Locked { arena: self, guard };
                // Acquire: pairs with the Release of the `decref` that counted its block (its
                // count of 0 is visible to the sweep).
                if self.unfreed().swap(0, Ordering::Acquire) > 0 {
                    locked.sweep();
                }
                Some(locked)
            }
            Acquired::OwnerDied(guard) => {
                let mut locked = Locked { arena: self, guard };
                locked.rebuild();
                locked.guard.mark_consistent();
                Some(locked)
            }
        }
    }

    /// A new block of at least `len` bytes, with one reference, owned by `owner` until it is
    /// shared; `None` when the arena has no room (or its mutex could not be had within a
    /// second): the caller then sends the bytes another way.
    pub fn alloc(&self, len: usize, owner: u32) -> Option<Desc> {
        // Checked: a length near usize::MAX must not round up to a small block.
        let size = len.max(1).checked_next_multiple_of(PAGE)? as u64;
        let mut locked = self.lock()?;
        let at = locked.extents().first_fit(size)?;
        let nslots = self.nslots;
        let hint = locked.counters().hint as usize;
        let index = (0..nslots)
            .map(|i| (hint + i) % nslots)
            .find(|&i| self.slot(i).life().state() == FREE)?;
        let off = locked.extents().take(at, size);
        locked.counters().hint = ((index + 1) % nslots) as u64;
        locked.counters().live += size;
        let gen = self.slot(index).publish(off, size, owner);
        Some(Desc {
            slot: index as u32,
            gen,
            start: off,
            len: size,
        })
    }

    /// Checks that `desc` names a live block and lies inside it (a descriptor from a message),
    /// and so inside the data area, whatever the bytes of the descriptor or of the slot.
    pub fn check(&self, desc: &Desc) -> io::Result<()> {
        if desc.slot as usize >= self.nslots {
            return Err(invalid("bad block descriptor: no such slot"));
        }
        let slot = self.slot(desc.slot as usize);
        if !slot.life().is(desc.gen) {
            return Err(invalid("bad block descriptor: the block is not live"));
        }
        let (off, len) = slot.place();
        // The slot's place is checked too: the slots are shared memory, and one that another
        // process scribbled on must not let a descriptor reach outside the data area.
        let block_end = off.checked_add(len).filter(|&e| e <= self.data_len as u64);
        let Some(block_end) = block_end else {
            return Err(invalid("bad block descriptor: its slot is damaged"));
        };
        let end = desc.start.checked_add(desc.len);
        if desc.start < off || end.is_none_or(|e| e > block_end) {
            return Err(invalid("bad block descriptor: outside its block"));
        }
        Ok(())
    }

    /// Takes a block from a message: checks `desc` (see [`Arena::check`]), adds a reference if
    /// `incref` (else the message's is taken over), and marks the block shared (see
    /// [`Arena::share`]), all under the mutex: `reclaim` (the writer died) frees a block either
    /// before, and then this fails, or never; without the mutex, a block freed between the
    /// check and the mark would come back to life over the next allocation.
    pub fn adopt(&self, desc: &Desc, incref: bool) -> io::Result<()> {
        // Without the mutex (a holder stopped, not dead, for a second): as before it existed.
        let _locked = self.lock();
        self.check(desc)?;
        if incref && !self.incref(desc) {
            return Err(invalid("bad block descriptor: too many references"));
        }
        if !self.share(desc) {
            return Err(invalid("bad block descriptor: the block is not live"));
        }
        Ok(())
    }

    /// Adds a reference to a block the caller holds one to (for a message, or a second holder).
    /// False, changing nothing, for a stale descriptor (the block was freed; its slot may hold
    /// another now), or a block at `MAX_REFS`.
    pub fn incref(&self, desc: &Desc) -> bool {
        self.slot(desc.slot as usize).incref(desc.gen)
    }

    /// Adds a reference for a new holder that is not the block's writer (a process that
    /// borrowed the block and keeps it) and marks the block shared, in one step: `reclaim` must
    /// not free it when its writer dies, since this holder still uses it. False, changing
    /// nothing, for a stale descriptor or a block at `MAX_REFS`.
    pub fn hold(&self, desc: &Desc) -> bool {
        self.slot(desc.slot as usize).hold(desc.gen)
    }

    /// Marks a block the caller holds as shared: a receiver took it from a message, so that
    /// `reclaim` leaves it alone when its writer dies. False for a stale descriptor.
    pub fn share(&self, desc: &Desc) -> bool {
        self.slot(desc.slot as usize).share(desc.gen)
    }

    /// Drops a reference; the last one frees the block. False, changing nothing, for a stale
    /// descriptor.
    pub fn decref(&self, desc: &Desc) -> bool {
        let Some(last) = self.slot(desc.slot as usize).decref(desc.gen) else {
            return false;
        };
        if last {
            if let Some(mut locked) = self.lock() {
                locked.free_slot(desc.slot as usize, desc.gen, false);
            } else {
                // Without the mutex (a holder stopped, not dead, for a second), the block stays
                // allocated with a count of 0 (nothing can add a reference now): the next
                // locker frees it. Release: pairs with that locker's Acquire swap.
                self.unfreed().fetch_add(1, Ordering::Release);
            }
        }
        true
    }

    /// Finds the live block that holds `[ptr, ptr + len)` (a buffer the caller keeps alive):
    /// a descriptor of that range, adding no reference.
    pub fn find(&self, ptr: *const u8, len: usize) -> Option<Desc> {
        let start = self.offset_of(ptr, len)?;
        (0..self.nslots).find_map(|i| {
            let slot = self.slot(i);
            let life = slot.life();
            if life.state() == FREE {
                return None;
            }
            let (off, size) = slot.place();
            if start < off || start + len as u64 > off + size {
                return None;
            }
            Some(Desc {
                slot: i as u32,
                gen: life.gen(),
                start,
                len: len as u64,
            })
        })
    }

    /// Frees the blocks a dead process `owner` was writing (never shared, so nobody else holds
    /// them); returns how many.
    pub fn reclaim(&self, owner: u32) -> usize {
        let Some(mut locked) = self.lock() else {
            return 0;
        };
        let mut n = 0;
        for i in 0..self.nslots {
            let slot = self.slot(i);
            let life = slot.life();
            if life.state() == WRITING && slot.owner() == owner {
                locked.free_slot(i, life.gen(), true);
                n += 1;
            }
        }
        n
    }

    /// Live bytes and blocks, and the memfd's resident bytes.
    pub fn stats(&self) -> Stats {
        let (live_bytes, blocks) = match self.lock() {
            Some(mut locked) => {
                let blocks = (0..self.nslots)
                    .filter(|&i| self.slot(i).life().state() != FREE)
                    .count() as u64;
                (locked.counters().live, blocks)
            }
            None => (u64::MAX, u64::MAX),
        };
        Stats {
            live_bytes,
            blocks,
            resident_bytes: page_cache::resident(self.region.fd()),
        }
    }

    /// The free extents' total and count (tests: the free list is whole again).
    pub fn free_extents(&self) -> (u64, usize) {
        match self.lock() {
            Some(mut locked) => locked.extents().total(),
            None => (0, 0),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
