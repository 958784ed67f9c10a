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
//! A block is named by a [`Desc`] (slot, generation, and a byte range inside the block), which is
//! what travels in messages. Its life:
//!
//! - `alloc` takes a free extent and a free slot under the mutex: state `WRITING`, one reference,
//!   owned by the allocating process's tag.
//! - The holder of a reference may add one (`incref`) to put the block in a message. The block
//!   stays `WRITING` until a receiver takes it from a message and marks it `SHARED` (`share`):
//!   so the blocks of a dead writer that nobody took (being written, or in a message never read)
//!   are freed by `reclaim(owner)` when the parent sees the writer die.
//! - The last `decref` frees the block: under the mutex, its extent goes back to the free list,
//!   and its pages are returned to the OS (`FALLOC_FL_PUNCH_HOLE`) unless the freed blocks that
//!   stay resident are within the cache limit. Reusing resident pages matters: a fresh page of
//!   shared memory costs a fault and zeroing, ~6 µs (a 4 MiB block: 6 ms to fill, against 0.5 ms
//!   for resident pages). The owner of the arena raises the limit while work runs and sets it to
//!   0 and `trim`s when it stops, so that idle, the arena holds only live blocks.
//!
//! A process killed at any instant cannot wedge the arena: the mutex is robust (the next locker
//! is told the owner died) and the free list is then rebuilt from the slots, which are the truth.
//! A killed process can at worst leak the blocks it held references to; those go with the memfd
//! when every process has unmapped it. Descriptors read from messages are validated (`check`):
//! a damaged one is an error, never an access outside the arena.
//!
//! A stale descriptor (of a block freed since, whose slot may hold another block now) changes
//! nothing: a slot's generation, state and reference count share one atomic word ([`Life`]), so
//! `incref`, `decref` and `share` check the generation in the same compare-exchange that makes
//! their change, and fail on a descriptor of an earlier allocation of the slot. (The generation
//! has 32 bits: a descriptor 2^32 allocations of its slot old would pass again.)

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};

use super::Region;

const MAGIC: u64 = 0x7069_7065_6172_656e; // "pipearen"
/// The allocation unit: blocks are whole pages, so that freeing one returns all of its memory.
pub const PAGE: usize = 4096;
const LOCK_TIMEOUT_NS: i64 = 1_000_000_000;

const FREE: u32 = 0;
const WRITING: u32 = 1;
const SHARED: u32 = 2;

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
    lock: libc::pthread_mutex_t,
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

#[repr(C)]
struct Slot {
    /// The block's [`Life`]; every change of it is one atomic step.
    life: AtomicU64,
    owner: AtomicU32,
    _pad: u32,
    off: AtomicU64,
    len: AtomicU64,
}

const _: () = assert!(std::mem::size_of::<Slot>() == 32);

/// A slot's generation (bits 63..32), state (bits 31..30) and reference count (bits 29..0), in
/// one word so that a change checks all three at once.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Life(u64);

/// The most references a block can have (the count's 30 bits).
const MAX_REFS: u32 = (1 << 30) - 1;

impl Life {
    fn new(gen: u32, state: u32, refs: u32) -> Life {
        Life(u64::from(gen) << 32 | u64::from(state) << 30 | u64::from(refs))
    }
    fn gen(self) -> u32 {
        (self.0 >> 32) as u32
    }
    fn state(self) -> u32 {
        (self.0 >> 30) as u32 & 3
    }
    fn refs(self) -> u32 {
        self.0 as u32 & MAX_REFS
    }
    /// Live, and the allocation `gen`: what a descriptor must name before anything is done.
    fn is(self, gen: u32) -> bool {
        self.state() != FREE && self.gen() == gen && self.refs() > 0
    }
}

impl Slot {
    /// The life, Acquire: pairs with the Release of `alloc` (the place fields are set).
    fn life(&self) -> Life {
        Life(self.life.load(Ordering::Acquire))
    }

    /// Applies `change` to the life as one compare-exchange (retried if another process changed
    /// the word meanwhile); None, changing nothing, if `change` refuses the life it sees.
    fn update(&self, success: Ordering, change: impl Fn(Life) -> Option<Life>) -> Option<Life> {
        self.life
            .fetch_update(success, Ordering::Relaxed, |v| change(Life(v)).map(|l| l.0))
            .ok()
            .map(Life)
    }
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Extent {
    off: u64,
    len: u64,
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

/// The mutex held: access to the allocator's state. Unlocks on drop.
struct Locked<'a> {
    arena: &'a Arena,
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        // SAFETY: this guard exists only while this thread holds the mutex (see `lock`).
        unsafe {
            libc::pthread_mutex_unlock(self.arena.mutex());
        }
    }
}

impl Locked<'_> {
    fn counters(&mut self) -> &mut Guarded {
        // SAFETY: the guarded counters are only accessed under the mutex, which this guard
        // holds, and `&mut self` keeps this the only reference made from the guard. The pointer
        // goes to the field itself: no reference to the rest of the header is made.
        unsafe { &mut *std::ptr::addr_of_mut!((*self.arena.header_ptr()).guarded) }
    }

    fn extents(&mut self) -> &mut [Extent] {
        let n = self.counters().nextents as usize;
        // SAFETY: the extents array has room for nslots + 1 entries (see `layout`), `nextents`
        // never exceeds that (checked where it grows), and it is only accessed under the mutex.
        unsafe { std::slice::from_raw_parts_mut(self.arena.extents_ptr(), n) }
    }

    fn push_extent_at(&mut self, at: usize, e: Extent) -> bool {
        let n = self.counters().nextents as usize;
        if n > self.arena.nslots {
            return false; // cannot happen: there are at most nslots + 1 gaps between blocks
        }
        let ptr = self.arena.extents_ptr();
        // SAFETY: `at <= n < nslots + 1`, the array's capacity; `copy` handles the overlap.
        unsafe {
            std::ptr::copy(ptr.add(at), ptr.add(at + 1), n - at);
            *ptr.add(at) = e;
        }
        self.counters().nextents = (n + 1) as u64;
        true
    }

    fn remove_extent(&mut self, at: usize) {
        let n = self.counters().nextents as usize;
        let ptr = self.arena.extents_ptr();
        // SAFETY: `at < n`; the tail moves down by one inside the array.
        unsafe { std::ptr::copy(ptr.add(at + 1), ptr.add(at), n - at - 1) };
        self.counters().nextents = (n - 1) as u64;
    }

    /// Puts `[off, off + len)` back in the free list, merged with its neighbours.
    fn insert_free(&mut self, off: u64, len: u64) {
        let ext = self.extents();
        let at = ext.partition_point(|e| e.off < off);
        let merge_prev = at > 0 && ext[at - 1].off + ext[at - 1].len == off;
        let merge_next = at < ext.len() && off + len == ext[at].off;
        match (merge_prev, merge_next) {
            (true, true) => {
                ext[at - 1].len += len + ext[at].len;
                self.remove_extent(at);
            }
            (true, false) => ext[at - 1].len += len,
            (false, true) => {
                ext[at].off = off;
                ext[at].len += len;
            }
            (false, false) => {
                self.push_extent_at(at, Extent { off, len });
            }
        }
    }

    /// Frees the block in `slot` if it is still allocation `gen` (and, for `reclaim`, with
    /// `only_writing`, still unshared or unreferenced): returns its pages to the OS, its extent
    /// to the free list.
    fn free_slot(&mut self, index: usize, gen: u32, only_writing: bool) {
        let slot = self.arena.slot(index);
        let (off, len) = (
            slot.off.load(Ordering::Relaxed),
            slot.len.load(Ordering::Relaxed),
        );
        // Marked free first, in one compare-exchange against the lock-free changes (a receiver
        // sharing the block, a holder adding or dropping a reference), and only then are its
        // pages dropped: a block shared at the last moment keeps them. Nobody can take the slot
        // or the extent before `insert_free` below: allocation holds the mutex, as we do.
        // Release: the place fields were read above, before the slot can be taken again.
        let freed = slot.update(Ordering::Release, |l| {
            let mine = l.state() != FREE && l.gen() == gen;
            let unshared = !only_writing || l.state() == WRITING || l.refs() == 0;
            (mine && unshared).then(|| Life::new(gen, FREE, 0))
        });
        if freed.is_none() {
            return; // freed already (by a rebuild after a death), or shared meanwhile
        }
        self.counters().live -= len;
        let live = self.counters().live;
        let limit = self.arena.cache_limit().load(Ordering::Relaxed);
        // Resident beyond the live blocks and the metadata (at most `data_off`): the cache.
        let meta = self.arena.data_off as u64;
        if limit == 0 || self.arena.resident().saturating_sub(live + meta) > limit {
            self.arena.punch(off, len);
        }
        self.insert_free(off, len);
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
        for i in 0..self.counters().nextents as usize {
            let e = self.extents()[i];
            self.arena.punch(e.off, e.len);
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
            let (off, len) = (
                slot.off.load(Ordering::Relaxed),
                slot.len.load(Ordering::Relaxed),
            );
            if life.refs() == 0 {
                self.arena.punch(off, len);
                slot.life
                    .store(Life::new(life.gen(), FREE, 0).0, Ordering::Release);
                continue;
            }
            live.push(Extent { off, len });
        }
        live.sort_by_key(|e| e.off);
        self.counters().nextents = 0;
        self.counters().live = live.iter().map(|e| e.len).sum();
        let mut at = 0u64;
        let end = self.arena.data_len as u64;
        for e in live
            .iter()
            .chain(std::iter::once(&Extent { off: end, len: 0 }))
        {
            if e.off > at {
                let n = self.counters().nextents as usize;
                self.push_extent_at(
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
        let data_off = Self::layout(nslots);
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
        // nothing else accesses the header while it is written.
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
            let mut attr: libc::pthread_mutexattr_t = std::mem::zeroed();
            let mut rc = libc::pthread_mutexattr_init(&mut attr);
            rc |= libc::pthread_mutexattr_setpshared(&mut attr, libc::PTHREAD_PROCESS_SHARED);
            rc |= libc::pthread_mutexattr_setrobust(&mut attr, libc::PTHREAD_MUTEX_ROBUST);
            rc |= libc::pthread_mutex_init(arena.mutex(), &attr);
            libc::pthread_mutexattr_destroy(&mut attr);
            if rc != 0 {
                return Err(io::Error::other("could not initialise the arena's mutex"));
            }
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
        if magic != MAGIC
            || nslots == 0
            || data_off != Self::layout(nslots)
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

    /// Where the data area starts, for `nslots` slots.
    fn layout(nslots: usize) -> usize {
        let extents_off = PAGE + round_up(nslots * std::mem::size_of::<Slot>(), 64);
        round_up(
            extents_off + (nslots + 1) * std::mem::size_of::<Extent>(),
            PAGE,
        )
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

    fn mutex(&self) -> *mut libc::pthread_mutex_t {
        // SAFETY: the header is at the start of the mapping, which outlives `self`; no
        // reference is made, only the field's address.
        unsafe { std::ptr::addr_of_mut!((*self.header_ptr()).lock) }
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

    fn slot(&self, index: usize) -> &Slot {
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

    /// Bytes of the memfd backed by memory.
    fn resident(&self) -> u64 {
        // SAFETY: `stat` is a plain C struct, filled by fstat.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstat on our own descriptor writes into `st`, which lives for the call.
        unsafe { libc::fstat(self.region.fd().as_raw_fd(), &mut st) };
        st.st_blocks as u64 * 512
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
            // SAFETY: a page range inside our own mapping; populating only faults pages in,
            // leaving their contents as they are.
            unsafe { libc::madvise(from as *mut libc::c_void, to - from, 23) };
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
        #[cfg(target_arch = "x86_64")]
        if len >= NT_COPY_MIN {
            // SAFETY: the caller's contract, passed on.
            unsafe { copy_streaming(src, dst, len) };
            return;
        }
        // SAFETY: the caller's contract.
        unsafe { std::ptr::copy_nonoverlapping(src, dst, len) };
    }

    fn punch(&self, off: u64, len: u64) {
        // SAFETY: fallocate on our own memfd, inside the data area; it only drops the pages'
        // contents (they read as zeros afterwards), which nobody uses: the block is being freed.
        unsafe {
            libc::fallocate(
                self.region.fd().as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                (self.data_off as u64 + off) as libc::off_t,
                len as libc::off_t,
            );
        }
    }

    /// Takes the mutex, waiting at most a second (`None` then: the caller falls back). After a
    /// holder died, the free list is rebuilt before use.
    fn lock(&self) -> Option<Locked<'_>> {
        // SAFETY: `ts` is a plain C struct, filled by clock_gettime.
        let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
        // SAFETY: clock_gettime writes into `ts`, which lives for the call.
        unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
        let ns = ts.tv_nsec as i64 + LOCK_TIMEOUT_NS;
        ts.tv_sec += (ns / 1_000_000_000) as libc::time_t;
        ts.tv_nsec = (ns % 1_000_000_000) as _;
        // SAFETY: the mutex was initialised by `create` (robust, process-shared) and lives in
        // the mapping for as long as `self`.
        let rc = unsafe { libc::pthread_mutex_timedlock(self.mutex(), &ts) };
        match rc {
            0 => {
                let mut locked = Locked { arena: self };
                // Acquire: pairs with the Release of the `decref` that counted its block (its
                // count of 0 is visible to the sweep).
                if self.unfreed().swap(0, Ordering::Acquire) > 0 {
                    locked.sweep();
                }
                Some(locked)
            }
            libc::EOWNERDEAD => {
                let mut locked = Locked { arena: self };
                locked.rebuild();
                // SAFETY: we hold the mutex (EOWNERDEAD hands it over) and made its state
                // consistent just above.
                unsafe { libc::pthread_mutex_consistent(self.mutex()) };
                Some(locked)
            }
            _ => None,
        }
    }

    /// A new block of at least `len` bytes, with one reference, owned by `owner` until it is
    /// shared; `None` when the arena has no room (or its mutex could not be had within a
    /// second): the caller then sends the bytes another way.
    pub fn alloc(&self, len: usize, owner: u32) -> Option<Desc> {
        // Checked: a length near usize::MAX must not round up to a small block.
        let size = len.max(1).checked_next_multiple_of(PAGE)? as u64;
        let mut locked = self.lock()?;
        let at = locked.extents().iter().position(|e| e.len >= size)?;
        let nslots = self.nslots;
        let hint = locked.counters().hint as usize;
        let index = (0..nslots)
            .map(|i| (hint + i) % nslots)
            .find(|&i| self.slot(i).life().state() == FREE)?;
        let ext = &mut locked.extents()[at];
        let off = ext.off;
        ext.off += size;
        ext.len -= size;
        if ext.len == 0 {
            locked.remove_extent(at);
        }
        locked.counters().hint = ((index + 1) % nslots) as u64;
        locked.counters().live += size;
        let slot = self.slot(index);
        let gen = slot.life().gen().wrapping_add(1);
        slot.off.store(off, Ordering::Relaxed);
        slot.len.store(size, Ordering::Relaxed);
        slot.owner.store(owner, Ordering::Relaxed);
        // Release: whoever reads the new life (check, find, a rebuild) sees the fields above. A
        // plain store: the slot is free, and only allocation (under the mutex) changes a free
        // slot's life.
        slot.life
            .store(Life::new(gen, WRITING, 1).0, Ordering::Release);
        Some(Desc {
            slot: index as u32,
            gen,
            start: off,
            len: size,
        })
    }

    /// Checks that `desc` names a live block and lies inside it (a descriptor from a message).
    pub fn check(&self, desc: &Desc) -> io::Result<()> {
        if desc.slot as usize >= self.nslots {
            return Err(invalid("bad block descriptor: no such slot"));
        }
        let slot = self.slot(desc.slot as usize);
        if !slot.life().is(desc.gen) {
            return Err(invalid("bad block descriptor: the block is not live"));
        }
        let (off, len) = (
            slot.off.load(Ordering::Relaxed),
            slot.len.load(Ordering::Relaxed),
        );
        let end = desc.start.checked_add(desc.len);
        if desc.start < off || end.is_none_or(|e| e > off + len) {
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
        let slot = self.slot(desc.slot as usize);
        // Relaxed: the caller holds a reference, so the block cannot be freed meanwhile; the
        // message that carries the new reference orders everything else (ring: release/acquire).
        slot.update(Ordering::Relaxed, |l| {
            (l.is(desc.gen) && l.refs() < MAX_REFS).then(|| Life(l.0 + 1))
        })
        .is_some()
    }

    /// Adds a reference for a new holder that is not the block's writer (a process that
    /// borrowed the block and keeps it) and marks the block shared, in one step: `reclaim` must
    /// not free it when its writer dies, since this holder still uses it. False, changing
    /// nothing, for a stale descriptor or a block at `MAX_REFS`.
    pub fn hold(&self, desc: &Desc) -> bool {
        let slot = self.slot(desc.slot as usize);
        // Release: as `share`; the new reference is the caller's own, so nothing else is
        // published through it.
        slot.update(Ordering::Release, |l| {
            (l.is(desc.gen) && l.refs() < MAX_REFS)
                .then(|| Life::new(l.gen(), SHARED, l.refs() + 1))
        })
        .is_some()
    }

    /// Marks a block the caller holds as shared: a receiver took it from a message, so that
    /// `reclaim` leaves it alone when its writer dies. False for a stale descriptor.
    pub fn share(&self, desc: &Desc) -> bool {
        // Release: as the old state store; the block's bytes were written before it is shared.
        self.slot(desc.slot as usize)
            .update(Ordering::Release, |l| {
                l.is(desc.gen).then(|| Life::new(l.gen(), SHARED, l.refs()))
            })
            .is_some()
    }

    /// Drops a reference; the last one frees the block. False, changing nothing, for a stale
    /// descriptor.
    pub fn decref(&self, desc: &Desc) -> bool {
        let slot = self.slot(desc.slot as usize);
        // Release, then Acquire on the last: every use of the block by any holder happens
        // before it is freed and reused (the same protocol as `Arc`).
        let Some(before) =
            slot.update(Ordering::Release, |l| l.is(desc.gen).then(|| Life(l.0 - 1)))
        else {
            return false;
        };
        if before.refs() == 1 {
            fence(Ordering::Acquire);
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
            let (off, size) = (
                slot.off.load(Ordering::Relaxed),
                slot.len.load(Ordering::Relaxed),
            );
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
            if life.state() == WRITING && slot.owner.load(Ordering::Relaxed) == owner {
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
            resident_bytes: self.resident(),
        }
    }

    /// The free extents' total and count (tests: the free list is whole again).
    pub fn free_extents(&self) -> (u64, usize) {
        match self.lock() {
            Some(mut locked) => {
                let ext = locked.extents();
                (ext.iter().map(|e| e.len).sum(), ext.len())
            }
            None => (0, 0),
        }
    }
}

/// Copies of at least this many bytes bypass the cache (see [`Arena::write`]).
const NT_COPY_MIN: usize = 256 << 10;

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
    use super::*;

    fn fill(arena: &Arena, d: &Desc, byte: u8) {
        // SAFETY: `d` is a live block of `d.len` bytes that this test holds.
        unsafe { std::ptr::write_bytes(arena.data_ptr(d.start), byte, d.len as usize) };
    }

    fn all(arena: &Arena, d: &Desc, byte: u8) -> bool {
        // SAFETY: as in `fill`.
        let s = unsafe { std::slice::from_raw_parts(arena.data_ptr(d.start), d.len as usize) };
        s.iter().all(|&b| b == byte)
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

    #[test]
    fn references_keep_a_block_until_the_last_goes() {
        let arena = Arena::create(8 * PAGE, 4).unwrap();
        let a = arena.alloc(PAGE, 1).unwrap();
        fill(&arena, &a, 9);
        arena.incref(&a);
        arena.decref(&a);
        assert!(arena.check(&a).is_ok());
        assert!(all(&arena, &a, 9));
        arena.decref(&a);
        assert!(arena.check(&a).is_err());
        // The pages went back to the OS: a new block there reads zeros.
        let b = arena.alloc(PAGE, 1).unwrap();
        assert_eq!(b.start, a.start);
        assert!(all(&arena, &b, 0));
        assert!(arena.check(&a).is_err(), "a stale descriptor stays stale");
    }

    #[test]
    fn a_block_is_adopted_or_reclaimed_never_both() {
        let arena = std::sync::Arc::new(Arena::create(8 * PAGE, 8).unwrap());
        for _ in 0..2000 {
            let tag = arena.new_tag();
            let d = arena.alloc(PAGE, tag).unwrap(); // in a message from a writer that died
            let taker = {
                let arena = std::sync::Arc::clone(&arena);
                std::thread::spawn(move || arena.adopt(&d, false).is_ok())
            };
            let reclaimed = arena.reclaim(tag);
            let adopted = taker.join().unwrap();
            assert_ne!(
                adopted,
                reclaimed == 1,
                "adopted {adopted}, reclaimed {reclaimed}"
            );
            if adopted {
                arena.decref(&d);
            }
            assert_eq!(arena.stats().blocks, 0);
            assert_eq!(arena.free_extents(), (8 * PAGE as u64, 1));
        }
    }

    #[test]
    fn sizes_that_overflow_are_refused_not_wrapped() {
        let arena = Arena::create(4 * PAGE, 4).unwrap();
        assert!(arena.alloc(usize::MAX - 100, 1).is_none());
        assert!(Arena::create(usize::MAX - 100, 4).is_err());
    }

    #[test]
    #[should_panic(expected = "out of range")]
    fn a_slot_index_out_of_range_panics_in_release_too() {
        let arena = Arena::create(4 * PAGE, 4).unwrap();
        let d = Desc {
            slot: 1_000_000,
            gen: 1,
            start: 0,
            len: 1,
        };
        arena.incref(&d);
    }

    #[test]
    fn tags_are_unique_across_every_mapping_and_never_the_creators() {
        let arena = Arena::create(4 * PAGE, 4).unwrap();
        let other = Arena::open(arena.fd().try_clone_to_owned().unwrap()).unwrap();
        let tags: Vec<u32> = (0..6)
            .map(|i| {
                if i % 2 == 0 {
                    arena.new_tag()
                } else {
                    other.new_tag()
                }
            })
            .collect();
        assert_eq!(tags, vec![1, 2, 3, 4, 5, 6]);
        // After a wrap, 0 (the creator's) is skipped.
        arena.next_tag().store(u32::MAX, Ordering::Relaxed);
        assert_eq!((other.new_tag(), arena.new_tag()), (u32::MAX, 1));
    }

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

    #[test]
    fn descriptors_are_checked() {
        let arena = Arena::create(8 * PAGE, 4).unwrap();
        let a = arena.alloc(2 * PAGE, 1).unwrap();
        assert!(arena.check(&a).is_ok());
        let inner = Desc {
            start: a.start + 10,
            len: 100,
            ..a
        };
        assert!(arena.check(&inner).is_ok());
        for bad in [
            Desc { slot: 99, ..a },
            Desc {
                gen: a.gen + 1,
                ..a
            },
            Desc {
                len: a.len + 1,
                ..a
            },
            Desc {
                start: u64::MAX,
                len: 2,
                ..a
            },
        ] {
            assert!(arena.check(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn find_names_the_block_of_an_address() {
        let arena = Arena::create(8 * PAGE, 4).unwrap();
        let _a = arena.alloc(PAGE, 1).unwrap();
        let b = arena.alloc(2 * PAGE, 1).unwrap();
        let p = arena.data_ptr(b.start + 100);
        let d = arena.find(p, 50).unwrap();
        arena.incref(&d);
        assert_eq!(
            (d.slot, d.gen, d.start, d.len),
            (b.slot, b.gen, b.start + 100, 50)
        );
        arena.decref(&d);
        assert!(arena.check(&b).is_ok());
        let outside = [0u8; 4];
        assert!(arena.find(outside.as_ptr(), 4).is_none());
    }

    #[test]
    fn a_stale_descriptor_changes_nothing_about_the_slots_next_block() {
        let arena = Arena::create(8 * PAGE, 1).unwrap(); // one slot: the next block reuses it
        let old = arena.alloc(PAGE, 5).unwrap();
        assert!(arena.decref(&old)); // freed
        let new = arena.alloc(PAGE, 5).unwrap();
        assert_eq!((new.slot, new.gen), (old.slot, old.gen + 1));
        // Each of these used to act on `new`: lower its count (freeing it under its holder),
        // raise it (leaking it), or mark it shared (keeping `reclaim` from freeing it).
        assert!(!arena.decref(&old));
        assert!(!arena.incref(&old));
        assert!(!arena.share(&old));
        assert!(arena.check(&old).is_err());
        assert!(arena.adopt(&old, true).is_err());
        let life = arena.slot(new.slot as usize).life();
        assert_eq!((life.state(), life.refs()), (WRITING, 1));
        // So `new`'s dead writer's block is still reclaimed, and freed exactly once.
        assert_eq!(arena.reclaim(5), 1);
        assert!(!arena.decref(&new));
        assert_eq!(arena.free_extents(), (8 * PAGE as u64, 1));
    }

    #[test]
    fn a_kept_borrowed_block_survives_its_writers_death() {
        let arena = Arena::create(8 * PAGE, 4).unwrap();
        let lent = arena.alloc(PAGE, 7).unwrap(); // writer 7 lends it, unshared
        assert!(arena.hold(&lent)); // a borrower keeps it
        assert_eq!(
            arena.reclaim(7),
            0,
            "reclaim freed a block another holder keeps"
        );
        assert!(arena.check(&lent).is_ok());
        let next = arena.alloc(PAGE, 1).unwrap();
        assert_ne!(
            next.start, lent.start,
            "the kept block's pages were handed out again"
        );
        assert!(arena.decref(&lent)); // the borrower's reference; the dead writer's is leaked
        assert!(arena.check(&lent).is_ok());
        let stale = Desc {
            gen: lent.gen + 1,
            ..lent
        };
        assert!(!arena.hold(&stale));
    }

    #[test]
    fn a_last_reference_dropped_while_the_mutex_is_held_is_freed_by_the_next_locker() {
        let arena = Arena::create(8 * PAGE, 4).unwrap();
        let d = arena.alloc(PAGE, 1).unwrap();
        let held = std::sync::Barrier::new(2);
        std::thread::scope(|s| {
            s.spawn(|| {
                let locked = arena.lock().unwrap();
                held.wait();
                // Longer than a locker waits (LOCK_TIMEOUT_NS): the decref gives up.
                std::thread::sleep(std::time::Duration::from_millis(1300));
                drop(locked);
            });
            held.wait();
            assert!(arena.decref(&d));
        });
        assert!(
            arena.check(&d).is_err(),
            "a block with no reference is not live"
        );
        // The next locker (here `stats`) frees it: before, it stayed allocated for good.
        let stats = arena.stats();
        assert_eq!((stats.live_bytes, stats.blocks), (0, 0));
        assert_eq!(arena.free_extents(), (8 * PAGE as u64, 1));
    }

    #[test]
    fn a_reference_count_at_its_limit_refuses_another() {
        let arena = Arena::create(4 * PAGE, 2).unwrap();
        let d = arena.alloc(PAGE, 1).unwrap();
        arena
            .slot(d.slot as usize)
            .life
            .store(Life::new(d.gen, SHARED, MAX_REFS).0, Ordering::Relaxed);
        assert!(
            !arena.incref(&d),
            "the count would wrap into the state bits"
        );
        let life = arena.slot(d.slot as usize).life();
        assert_eq!(
            (life.gen(), life.state(), life.refs()),
            (d.gen, SHARED, MAX_REFS)
        );
    }

    #[test]
    fn reclaim_frees_only_a_dead_writers_unshared_blocks() {
        let arena = Arena::create(8 * PAGE, 8).unwrap();
        let writing = arena.alloc(PAGE, 5).unwrap();
        let shared = arena.alloc(PAGE, 5).unwrap();
        arena.share(&shared);
        let other = arena.alloc(PAGE, 6).unwrap();
        assert_eq!(arena.reclaim(5), 1);
        assert!(arena.check(&writing).is_err());
        assert!(arena.check(&shared).is_ok());
        assert!(arena.check(&other).is_ok());
    }

    #[test]
    fn a_holder_killed_with_the_mutex_does_not_wedge_the_arena() {
        let arena = Arena::create(32 * PAGE, 8).unwrap();
        let kept = arena.alloc(PAGE, 1).unwrap();
        let dropped = arena.alloc(PAGE, 1).unwrap();
        // A block whose last reference went while its dropper died before freeing it.
        arena
            .slot(dropped.slot as usize)
            .life
            .store(Life::new(dropped.gen, WRITING, 0).0, Ordering::Relaxed);
        // SAFETY: the child only takes the arena's mutex and exits, touching nothing the
        // parent's other test threads could hold at the fork.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            std::mem::forget(arena.lock());
            // SAFETY: ends the child at once, holding the mutex.
            unsafe { libc::_exit(0) };
        }
        let mut status = 0;
        // SAFETY: waits for the child just forked; `status` lives for the call.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        // The next locker is told, rebuilds the free list from the slots, and goes on.
        let stats = arena.stats();
        assert_eq!((stats.live_bytes, stats.blocks), (PAGE as u64, 1));
        assert!(arena.check(&kept).is_ok());
        assert_eq!(arena.free_extents(), (31 * PAGE as u64, 1));
        arena.decref(&kept);
        assert_eq!(arena.free_extents(), (32 * PAGE as u64, 1));
    }

    #[test]
    fn another_process_maps_the_same_blocks() {
        let arena = Arena::create(8 * PAGE, 4).unwrap();
        let other = Arena::open(arena.fd().try_clone_to_owned().unwrap()).unwrap();
        let a = other.alloc(PAGE, 3).unwrap();
        fill(&other, &a, 7);
        assert!(arena.check(&a).is_ok());
        assert!(all(&arena, &a, 7));
        arena.decref(&a);
        assert!(other.check(&a).is_err());
    }

    #[test]
    fn threads_allocate_share_and_free_without_losing_a_page() {
        let arena = Arena::create(256 * PAGE, 64).unwrap();
        std::thread::scope(|s| {
            for t in 0..4u8 {
                let arena = &arena;
                s.spawn(move || {
                    for i in 0..2000usize {
                        let Some(d) = arena.alloc((i % 5) * PAGE + 1, t as u32) else {
                            continue;
                        };
                        fill(arena, &d, t + 1);
                        arena.incref(&d);
                        assert!(all(arena, &d, t + 1));
                        arena.decref(&d);
                        arena.decref(&d);
                    }
                });
            }
        });
        assert_eq!(arena.free_extents(), (256 * PAGE as u64, 1));
        assert_eq!(arena.stats().live_bytes, 0);
    }
}
