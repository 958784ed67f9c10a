//! A single-producer single-consumer ring of byte frames in a shared-memory [`Region`], for one
//! direction of one worker ("a lane"): each ring has exactly one writing process, so a process
//! killed at any instant can never leave another writer's frame half-made.
//!
//! ```text
//!   offset 0     Header (RING_HEADER bytes): magic, capacity, the two positions, the wait words
//!   RING_HEADER  data: `capacity` bytes (a power of two), frames back to back
//!   frame        [len: u32][check: u32 = len ^ FRAME_CHECK][payload][padding to 8 bytes]
//!   pad frame    [PAD: u32][PAD ^ FRAME_CHECK]: skip to the start of the data area
//! ```
//!
//! Positions (`write`, `read`) count bytes since the start and never wrap (u64); the offset of a
//! position is `pos % capacity`. A frame never straddles the end of the data area: when it does
//! not fit before the end, the producer writes a pad frame and starts over at offset 0. A frame
//! is at most half the capacity, so it always fits once the ring drains.
//!
//! ## Memory ordering
//!
//! The producer writes a frame's bytes, then stores `write` with Release; the consumer loads
//! `write` with Acquire before reading the bytes (pairs: the frame's bytes are visible). The
//! consumer copies a frame out, then stores `read` with Release; the producer loads `read` with
//! Acquire before overwriting that space (pairs: the consumer is done with those bytes).
//!
//! ## Waiting (an eventcount on a futex)
//!
//! A consumer with nothing to read reads `data_seq`, announces itself in `consumer_waiting`,
//! re-checks `write`, and sleeps on `data_seq` only if the value it read is still there. The
//! producer, after publishing, bumps `data_seq` and wakes if `consumer_waiting` is set. Either
//! the consumer sees the frame or the producer sees the waiter (a Dekker pair): the announce, the
//! re-check, the publish and the waiter check are all read-modify-writes (`swap`, `fetch_add(0)`),
//! which read the latest value in each word's modification order, so the argument holds with
//! acquire/release synchronization alone, not only under a total SeqCst order (and loom, which
//! models SeqCst loads as acquire loads, can check it). A bump between the consumer's read of
//! `data_seq` and its sleep makes the futex return at once. Space for the producer works the same
//! way with `space_seq` and `producer_waiting`.
//!
//! A frame header is validated before use: a damaged one is an error ([`PopError::Damaged`]),
//! never a crash or a hang, even if the other side wrote garbage.

use std::sync::Arc;
use std::time::{Duration, Instant};

// An end's holder flag and position live in this process's memory only, and no loom model
// involves them: std's atomics always, whatever `crate::sync` is.
use std::sync::atomic as local;

use super::futex;
#[cfg(not(loom))]
use super::region::Region;
use crate::sync::{AtomicU32, AtomicU64, Ordering};

/// Bytes before the data area.
pub const RING_HEADER: usize = 512;
const MAGIC: u64 = 0x5049_5045_464c_4f57; // "PIPEFLOW"
const FRAME_HEADER: u64 = 8;
const FRAME_CHECK: u32 = 0x9E37_79B9;
const PAD: u32 = u32::MAX;
/// The longest a wait sleeps before re-checking (and, for callers, before checking deadlines).
const MAX_SLEEP: Duration = Duration::from_millis(100);

#[repr(C)]
struct Header {
    magic: u64,
    capacity: u64,
    _pad0: [u64; 14],
    /// Producer position (bytes since the start): written by the producer only.
    write: AtomicU64,
    _pad1: [u64; 15],
    /// Consumer position: written by the consumer only.
    read: AtomicU64,
    _pad2: [u64; 15],
    /// Bumped after every publish; the consumer's futex word.
    data_seq: AtomicU32,
    /// 1 while the consumer is about to sleep or sleeping on `data_seq`.
    consumer_waiting: AtomicU32,
    /// Bumped after every consume; the producer's futex word.
    space_seq: AtomicU32,
    /// 1 while the producer is about to sleep or sleeping on `space_seq`.
    producer_waiting: AtomicU32,
    /// 1 once the producer closed its end (after its last publish).
    writer_closed: AtomicU32,
    /// 1 once the consumer closed its end.
    reader_closed: AtomicU32,
}

const _: () = assert!(std::mem::size_of::<Header>() <= RING_HEADER);

/// Why a push did not happen.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum PushError {
    /// No room before the deadline.
    Full,
    /// The frame is longer than half the ring.
    TooLarge,
    /// The consumer closed its end.
    Closed,
    /// A position in the shared header is one the consumer could not have reached, or the
    /// producer's own was changed by someone else: the ring cannot be trusted any more.
    Damaged,
}

/// Why a pop returned nothing.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum PopError {
    /// Nothing arrived before the deadline.
    Empty,
    /// The producer closed its end and everything was read.
    Closed,
    /// A frame header or position is inconsistent (or the consumer's own position was changed
    /// by someone else): the ring cannot be trusted any more.
    Damaged,
}

/// A ring laid out in a region, as this process sees it. It hands out its two ends as handles,
/// one holder at a time each ([`Ring::producer`], [`Ring::consumer`]), so that threads of this
/// process cannot race on one end. Every `Ring` of this process over the same memfd shares the
/// same two ends (a registry keyed by the memfd's identity), so opening a ring twice does not
/// make a second producer either. Across processes the rule is the protocol's: one process
/// produces and one consumes (e.g. the parent pushes, the child maps the ring with
/// [`Ring::open`] and pops); a second process on one end is seen as damage where it can be
/// (a shared position that its end's owner did not write), never trusted.
pub struct Ring {
    #[cfg(not(loom))]
    region: Region,
    #[cfg(loom)]
    mem: Arc<LoomMemory>,
    capacity: u64,
    ends: Arc<Ends>,
}

/// The two ends of one ring in this process (see [`Ring`]).
struct Ends {
    writer: End,
    reader: End,
}

impl Ends {
    fn at(write: u64, read: u64) -> Arc<Ends> {
        Arc::new(Ends {
            writer: End::at(write),
            reader: End::at(read),
        })
    }
}

/// A memfd's identity (device, inode), and the ends of a live `Ring` of this process over it.
#[cfg(not(loom))]
type EndsEntry = ((u64, u64), std::sync::Weak<Ends>);

/// This process's rings, by memfd identity.
#[cfg(not(loom))]
static ENDS: std::sync::Mutex<Vec<EndsEntry>> = std::sync::Mutex::new(Vec::new());

/// The ends of the memfd `id`: those of a live `Ring` of this process over it, or new ones at
/// `positions()` (read only when there are none; its error is passed on).
#[cfg(not(loom))]
fn ends_of(
    id: (u64, u64),
    positions: impl FnOnce() -> std::io::Result<(u64, u64)>,
) -> std::io::Result<Arc<Ends>> {
    // Poisoning is ignored: the list is whole between any two of its operations.
    let mut all = ENDS.lock().unwrap_or_else(|p| p.into_inner());
    all.retain(|(_, ends)| ends.strong_count() > 0);
    if let Some(ends) = all
        .iter()
        .find(|(key, _)| *key == id)
        .and_then(|(_, ends)| ends.upgrade())
    {
        return Ok(ends);
    }
    let (write, read) = positions()?;
    let ends = Ends::at(write, read);
    all.push((id, Arc::downgrade(&ends)));
    Ok(ends)
}

/// The highest position an end starts from: 2^63 bytes, which take 29 years at 10 GB/s, so
/// that no position arithmetic (a position plus a ring's length) can overflow.
#[cfg(not(loom))]
const MAX_START: u64 = 1 << 63;

/// Whether `write` and `read` are positions the two ends of a ring of `capacity` bytes could
/// have reached: multiples of 8 (every frame's stride is one), the reader behind the writer by
/// at most the ring's length, and far from overflowing. An end only goes on from positions that
/// pass: an unaligned one would put a frame header across the end of the data area.
#[cfg(not(loom))]
fn reachable(write: u64, read: u64, capacity: u64) -> bool {
    write % 8 == 0
        && read % 8 == 0
        && read <= write
        && write - read <= capacity
        && write < MAX_START
}

/// Under loom: the ring's memory on the heap, each data byte a loom cell (so that loom reports
/// any read of a byte that races with its write).
#[cfg(loom)]
pub struct LoomMemory {
    header: Header,
    data: Vec<loom::cell::UnsafeCell<u8>>,
}

// SAFETY: shared between the model's threads like the real region is between processes; every
// access to a data cell goes through loom, which reports any that race.
#[cfg(loom)]
unsafe impl Sync for LoomMemory {}
// SAFETY: as for Sync.
#[cfg(loom)]
unsafe impl Send for LoomMemory {}

#[cfg(loom)]
impl Ring {
    /// Two views of one new ring of `capacity` data bytes (a power of
    /// two, at least 64), for loom models.
    pub fn loom_pair(capacity: u64) -> (Ring, Ring) {
        assert!(capacity.is_power_of_two() && capacity >= 64);
        let header = Header {
            magic: MAGIC,
            capacity,
            _pad0: [0; 14],
            write: AtomicU64::new(0),
            _pad1: [0; 15],
            read: AtomicU64::new(0),
            _pad2: [0; 15],
            data_seq: AtomicU32::new(0),
            consumer_waiting: AtomicU32::new(0),
            space_seq: AtomicU32::new(0),
            producer_waiting: AtomicU32::new(0),
            writer_closed: AtomicU32::new(0),
            reader_closed: AtomicU32::new(0),
        };
        let data = (0..capacity)
            .map(|_| loom::cell::UnsafeCell::new(0))
            .collect();
        let mem = Arc::new(LoomMemory { header, data });
        let ends = Ends::at(0, 0);
        let other = Ring {
            mem: Arc::clone(&mem),
            capacity,
            ends: Arc::clone(&ends),
        };
        (
            Ring {
                mem,
                capacity,
                ends,
            },
            other,
        )
    }

    fn header(&self) -> &Header {
        &self.mem.header
    }

    fn store(&self, off: u64, bytes: &[u8]) {
        for (cell, b) in self.mem.data[off as usize..].iter().zip(bytes) {
            // SAFETY: loom checks that no other access to this byte races with this write.
            cell.with_mut(|p| unsafe { *p = *b });
        }
    }

    fn load(&self, off: u64, out: &mut [u8]) {
        for (cell, b) in self.mem.data[off as usize..].iter().zip(out.iter_mut()) {
            // SAFETY: loom checks that no write to this byte races with this read.
            *b = cell.with(|p| unsafe { *p });
        }
    }
}

#[cfg(not(loom))]
impl Ring {
    /// A new ring in a memfd of its own, `name`d in /proc/PID/fd, with `size` data bytes
    /// rounded down to a power of two (at least 64).
    pub fn create(name: &str, size: usize) -> std::io::Result<Ring> {
        if size < 64 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "a ring needs at least 64 data bytes",
            ));
        }
        let len = RING_HEADER.checked_add(size).ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "ring too large")
        })?;
        let region = Region::create(name, len)?;
        let capacity = 1u64 << (63 - (size as u64).leading_zeros());
        // SAFETY: the region is page-aligned and at least RING_HEADER bytes, so the header
        // fits, aligned; it was made just above and its descriptor has not left this function,
        // so nobody else maps it: plain writes are exclusive.
        unsafe {
            let h = region.as_ptr().cast::<Header>();
            std::ptr::addr_of_mut!((*h).capacity).write(capacity);
            std::ptr::addr_of_mut!((*h).magic).write(MAGIC);
        }
        let ends = ends_of(region.id(), || Ok((0, 0)))?;
        Ok(Ring {
            region,
            capacity,
            ends,
        })
    }

    /// Opens a ring another process laid out in `region`.
    pub fn open(region: Region) -> std::io::Result<Ring> {
        let bad =
            |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
        if region.len() < RING_HEADER + 64 {
            return Err(bad("region too small for a ring"));
        }
        // SAFETY: as in `create`, the header fits and is aligned; magic and capacity are written
        // once before the region is shared and never again, so plain reads see them.
        let (magic, capacity) = unsafe {
            let h = region.as_ptr().cast::<Header>();
            (
                std::ptr::addr_of!((*h).magic).read(),
                std::ptr::addr_of!((*h).capacity).read(),
            )
        };
        if magic != MAGIC {
            return Err(bad("not a pipeflow ring"));
        }
        if !capacity.is_power_of_two()
            || capacity < 64
            || capacity as usize > region.len() - RING_HEADER
        {
            return Err(bad("ring capacity does not match the region"));
        }
        // SAFETY: as above, the header fits and is aligned; its positions are atomics.
        let h = unsafe { &*region.as_ptr().cast::<Header>() };
        // Each end starts where the ring's last user of that end left it (0 for a fresh ring),
        // unless a `Ring` of this process already holds the ends of this memfd. `read` first:
        // the consumer may move it meanwhile, but never past the `write` loaded after it.
        let ends = ends_of(region.id(), || {
            let read = h.read.load(Ordering::Acquire);
            let write = h.write.load(Ordering::Acquire);
            if !reachable(write, read, capacity) {
                return Err(bad(
                    "the ring's positions are ones no ring could reach (damaged)",
                ));
            }
            Ok((write, read))
        })?;
        Ok(Ring {
            region,
            capacity,
            ends,
        })
    }

    /// The region, to hand its descriptor to the other process.
    pub fn region(&self) -> &Region {
        &self.region
    }

    fn header(&self) -> &Header {
        // SAFETY: the header lies at the start of the live, aligned mapping (checked in
        // create/open); its shared fields are atomics and the rest is never written after setup.
        unsafe { &*self.region.as_ptr().cast::<Header>() }
    }

    fn data(&self) -> *mut u8 {
        // SAFETY: RING_HEADER + capacity <= region length (checked in create/open).
        unsafe { self.region.as_ptr().add(RING_HEADER) }
    }

    /// Copies `bytes` into the data area at `off`. The caller guarantees the range lies in the
    /// data area and that the protocol gives it exclusive use of that range now.
    fn store(&self, off: u64, bytes: &[u8]) {
        assert!(off as usize + bytes.len() <= self.capacity as usize);
        // SAFETY: the range lies inside the data area (asserted), and by the ring protocol it
        // is free space owned by this producer until it publishes (see `push`).
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.data().add(off as usize),
                bytes.len(),
            );
        }
    }

    /// Copies from the data area at `off` into `out`, under the same guarantees as `store`.
    fn load(&self, off: u64, out: &mut [u8]) {
        assert!(off as usize + out.len() <= self.capacity as usize);
        // SAFETY: the range lies inside the data area (asserted), and by the ring protocol it
        // holds a published frame that the producer does not touch until `read` passes it.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.data().add(off as usize),
                out.as_mut_ptr(),
                out.len(),
            );
        }
    }
}

impl Ring {
    /// The longest payload a frame can carry.
    pub fn max_frame(&self) -> usize {
        (self.capacity / 2 - FRAME_HEADER) as usize
    }

    /// This process's producer end, or None while another thread of it holds it: a ring has
    /// one writer, and two pushing at once would race on the same bytes.
    pub fn producer(&self) -> Option<Producer<'_>> {
        let write = self.ends.writer.take()?;
        Some(Producer { ring: self, write })
    }

    /// This process's consumer end, or None while another thread of it holds it.
    pub fn consumer(&self) -> Option<Consumer<'_>> {
        let read = self.ends.reader.take()?;
        Some(Consumer { ring: self, read })
    }

    /// Closes the producer's end: the consumer reads what was pushed, then sees `Closed`. Any
    /// thread may close, also while another pushes or pops (it only stores a flag and wakes).
    pub fn close_write(&self) {
        let h = self.header();
        h.writer_closed.store(1, Ordering::SeqCst);
        h.data_seq.fetch_add(1, Ordering::SeqCst);
        futex::wake_all(&h.data_seq);
    }

    /// Closes the consumer's end: pushes fail with `Closed` from now on.
    pub fn close_read(&self) {
        let h = self.header();
        h.reader_closed.store(1, Ordering::SeqCst);
        h.space_seq.fetch_add(1, Ordering::SeqCst);
        futex::wake_all(&h.space_seq);
    }

    fn write_frame_header(&self, off: u64, len: u32) {
        // `off` is 8-aligned and < capacity, so 8 bytes fit; the space is free (see `push`).
        self.store(off, &frame_header(len));
    }

    fn read_frame_header(&self, off: u64) -> Result<u32, PopError> {
        // `off` < capacity and 8-aligned (positions only advance by multiples of 8), so 8 bytes
        // lie in the data area; the frame was published (see `pop`).
        let mut bytes = [0u8; 8];
        self.load(off, &mut bytes);
        let len = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        let check = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
        if check != len ^ FRAME_CHECK {
            return Err(PopError::Damaged);
        }
        Ok(len)
    }
}

/// One end's position, kept in this process: the handle that holds the end owns it. The copy in
/// the shared header is only published, never read back, so a peer that scribbles on it cannot
/// move this end.
struct End {
    /// True while a handle holds this end.
    taken: local::AtomicBool,
    /// The position, while no handle holds the end (a handle keeps its own copy).
    pos: local::AtomicU64,
}

impl End {
    fn at(pos: u64) -> End {
        End {
            taken: local::AtomicBool::new(false),
            pos: local::AtomicU64::new(pos),
        }
    }

    fn take(&self) -> Option<u64> {
        // Acquire on success pairs with the Release in `give_back`: a handle sees the position
        // the previous holder (maybe another thread) left.
        self.taken
            .compare_exchange(
                false,
                true,
                local::Ordering::Acquire,
                local::Ordering::Relaxed,
            )
            .ok()?;
        // Relaxed: ordered after the holder's store by the Acquire/Release pair on `taken`.
        Some(self.pos.load(local::Ordering::Relaxed))
    }

    fn give_back(&self, pos: u64) {
        self.pos.store(pos, local::Ordering::Relaxed);
        self.taken.store(false, local::Ordering::Release);
    }
}

/// The producer end of a [`Ring`] in this process (see [`Ring::producer`]); lets go when
/// dropped.
pub struct Producer<'a> {
    ring: &'a Ring,
    /// Bytes written since the start: this end's own position.
    write: u64,
}

impl Drop for Producer<'_> {
    fn drop(&mut self) {
        self.ring.ends.writer.give_back(self.write);
    }
}

impl Producer<'_> {
    /// Appends one frame, waiting for room until `deadline` (None: forever).
    pub fn push(&mut self, payload: &[u8], deadline: Option<Instant>) -> Result<(), PushError> {
        let ring = self.ring;
        if payload.len() > ring.max_frame() {
            return Err(PushError::TooLarge);
        }
        let h = ring.header();
        let cap = ring.capacity;
        let stride = FRAME_HEADER + round8(payload.len() as u64);
        let w = self.write;
        // Only this end publishes `write`: another value there means another producer (a second
        // process on this end) or a stray write. Relaxed: our own last store, or damage.
        if h.write.load(Ordering::Relaxed) != w {
            return Err(PushError::Damaged);
        }
        let offset = w % cap;
        let pad = if offset + stride > cap {
            cap - offset
        } else {
            0
        };
        // The room left, from the consumer's position; a position the consumer could not have
        // reached (ahead of ours, or a ring's length behind) means the header was overwritten.
        let room = |r: u64| {
            if r > w || w - r > cap {
                Err(PushError::Damaged)
            } else {
                Ok(cap - (w - r) >= pad + stride)
            }
        };
        loop {
            // The wait word first, then every condition (closed included): a close or a consume
            // after this read bumps the word, so the sleep below returns at once.
            let seq = h.space_seq.load(Ordering::SeqCst);
            if h.reader_closed.load(Ordering::Acquire) != 0 {
                return Err(PushError::Closed);
            }
            // Acquire: pairs with the consumer's Release store of `read` (it is done with the
            // bytes we are about to overwrite).
            if room(h.read.load(Ordering::Acquire))? {
                break;
            }
            h.producer_waiting.swap(1, Ordering::SeqCst);
            if room(h.read.fetch_add(0, Ordering::SeqCst))? {
                h.producer_waiting.store(0, Ordering::Relaxed);
                break;
            }
            let slept = sleep_until(&h.space_seq, seq, deadline);
            h.producer_waiting.store(0, Ordering::Relaxed);
            if !slept {
                return Err(PushError::Full);
            }
        }
        let mut at = w;
        if pad > 0 {
            ring.write_frame_header(at % cap, PAD);
            at += pad;
        }
        let off = at % cap;
        ring.write_frame_header(off, payload.len() as u32);
        // [off + 8, off + 8 + len) lies inside the data area (the frame does not straddle the
        // end), and it is free space: the consumer's `read` is past it (checked above with
        // Acquire), so no one reads it until we publish below.
        ring.store(off + FRAME_HEADER, payload);
        self.write = at + stride;
        // An RMW (Release at least: pairs with the consumer's Acquire load of `write`), and one
        // half of the eventcount's Dekker pair with the waiter check in `signal` (module docs).
        h.write.swap(self.write, Ordering::SeqCst);
        signal(&h.data_seq, &h.consumer_waiting);
        Ok(())
    }
}

/// The consumer end of a [`Ring`] in this process (see [`Ring::consumer`]); lets go when
/// dropped.
pub struct Consumer<'a> {
    ring: &'a Ring,
    /// Bytes consumed since the start: this end's own position.
    read: u64,
}

impl Drop for Consumer<'_> {
    fn drop(&mut self) {
        self.ring.ends.reader.give_back(self.read);
    }
}

impl Consumer<'_> {
    /// Takes one frame into `out` (replacing its contents), waiting until `deadline`.
    pub fn pop(&mut self, out: &mut Vec<u8>, deadline: Option<Instant>) -> Result<(), PopError> {
        let ring = self.ring;
        let h = ring.header();
        let cap = ring.capacity;
        let mut r = self.read;
        // Only this end publishes `read` (see `push`).
        if h.read.load(Ordering::Relaxed) != r {
            return Err(PopError::Damaged);
        }
        loop {
            let seq = h.data_seq.load(Ordering::SeqCst);
            // Acquire: pairs with the producer's store of `write` (the frame's bytes are there).
            let w = h.write.load(Ordering::Acquire);
            if w != r {
                if w < r || w - r > cap {
                    return Err(PopError::Damaged);
                }
                let off = r % cap;
                let len = ring.read_frame_header(off)?;
                if len == PAD {
                    r += cap - off;
                    continue;
                }
                let stride = FRAME_HEADER + round8(u64::from(len));
                if u64::from(len) > ring.max_frame() as u64 || off + stride > cap || w - r < stride
                {
                    return Err(PopError::Damaged);
                }
                // The frame lies inside the data area (checked just above) and was published
                // (Acquire load of `write`); the producer will not reuse it before `read` moves.
                out.clear();
                out.resize(len as usize, 0);
                ring.load(off + FRAME_HEADER, out);
                self.consumed(r + stride);
                return Ok(());
            }
            if h.writer_closed.load(Ordering::SeqCst) != 0 && h.write.load(Ordering::SeqCst) == r {
                self.store_read(r);
                return Err(PopError::Closed);
            }
            h.consumer_waiting.swap(1, Ordering::SeqCst);
            if h.write.fetch_add(0, Ordering::SeqCst) != r {
                h.consumer_waiting.store(0, Ordering::Relaxed);
                continue;
            }
            let slept = sleep_until(&h.data_seq, seq, deadline);
            h.consumer_waiting.store(0, Ordering::Relaxed);
            if !slept {
                self.store_read(r);
                return Err(PopError::Empty);
            }
        }
    }

    /// Skipping pad frames advances the position without a consume; store it when giving up.
    fn store_read(&mut self, r: u64) {
        if self.read != r {
            self.consumed(r);
        }
    }

    fn consumed(&mut self, new_read: u64) {
        let h = self.ring.header();
        self.read = new_read;
        // An RMW (Release at least: pairs with the producer's Acquire load of `read`), and one
        // half of the eventcount's Dekker pair with the waiter check below (see the module docs).
        h.read.swap(new_read, Ordering::SeqCst);
        signal(&h.space_seq, &h.producer_waiting);
    }
}

/// The waker's half of an eventcount: bump the wait word, and wake if the other side announced
/// that it waits (an RMW read: the latest value, see the module docs).
fn signal(seq: &AtomicU32, waiting: &AtomicU32) {
    seq.fetch_add(1, Ordering::SeqCst);
    if waiting.fetch_add(0, Ordering::SeqCst) != 0 {
        futex::wake_all(seq);
    }
}

fn round8(n: u64) -> u64 {
    (n + 7) & !7
}

fn frame_header(len: u32) -> [u8; 8] {
    let mut b = [0u8; 8];
    b[..4].copy_from_slice(&len.to_le_bytes());
    b[4..].copy_from_slice(&(len ^ FRAME_CHECK).to_le_bytes());
    b
}

/// Sleeps on `word` while it holds `seen`, at most until `deadline`, in naps of at most
/// `MAX_SLEEP`. Returns false if the deadline had passed.
fn sleep_until(word: &AtomicU32, seen: u32, deadline: Option<Instant>) -> bool {
    let nap = match deadline {
        None => MAX_SLEEP,
        Some(d) => {
            let left = d.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            left.min(MAX_SLEEP)
        }
    };
    futex::wait(word, seen, nap);
    true
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::thread;

    fn ring(data: usize) -> Ring {
        Ring::create("pipeflow-test", data).unwrap()
    }

    fn reopen(r: &Ring) -> Ring {
        let fd = r.region().fd().try_clone_to_owned().unwrap();
        Ring::open(Region::from_fd(fd).unwrap()).unwrap()
    }

    fn soon() -> Option<Instant> {
        Some(Instant::now() + Duration::from_millis(20))
    }

    #[test]
    fn frames_round_trip_in_order_with_wrap_around() {
        let producer = ring(256);
        let consumer = reopen(&producer);
        let (mut tx, mut rx) = (producer.producer().unwrap(), consumer.consumer().unwrap());
        let mut out = Vec::new();
        for i in 0..1000u32 {
            let payload: Vec<u8> = (0..(i % 97) as u8).collect();
            tx.push(&payload, None).unwrap();
            rx.pop(&mut out, None).unwrap();
            assert_eq!(out, payload);
        }
    }

    #[test]
    fn full_empty_too_large_and_close() {
        let r = ring(64);
        let (mut tx, mut rx) = (r.producer().unwrap(), r.consumer().unwrap());
        let mut out = Vec::new();
        assert_eq!(r.max_frame(), 24);
        assert_eq!(tx.push(&[0; 25], None), Err(PushError::TooLarge));
        assert_eq!(rx.pop(&mut out, soon()), Err(PopError::Empty));
        tx.push(&[1; 24], None).unwrap();
        tx.push(&[2; 24], None).unwrap();
        assert_eq!(tx.push(&[3], soon()), Err(PushError::Full));
        r.close_write();
        rx.pop(&mut out, None).unwrap();
        assert_eq!(out, [1; 24]);
        rx.pop(&mut out, None).unwrap();
        assert_eq!(out, [2; 24]);
        assert_eq!(rx.pop(&mut out, None), Err(PopError::Closed));
        r.close_read();
        assert_eq!(tx.push(&[4], None), Err(PushError::Closed));
    }

    #[test]
    fn each_end_has_one_holder_at_a_time_and_keeps_its_position() {
        let r = ring(256);
        let mut tx = r.producer().unwrap();
        assert!(
            r.producer().is_none(),
            "a second producer while the first is held"
        );
        tx.push(b"one", None).unwrap();
        drop(tx);
        // The next holder (here another thread) goes on from where the last one stopped.
        thread::scope(|s| {
            s.spawn(|| r.producer().unwrap().push(b"two", None).unwrap());
        });
        let mut rx = r.consumer().unwrap();
        assert!(r.consumer().is_none());
        let mut out = Vec::new();
        rx.pop(&mut out, None).unwrap();
        assert_eq!(out, b"one");
        drop(rx);
        r.consumer().unwrap().pop(&mut out, None).unwrap();
        assert_eq!(out, b"two");
        // A ring opened later starts each end where the shared header says.
        let again = reopen(&r);
        again.producer().unwrap().push(b"three", None).unwrap();
        again.consumer().unwrap().pop(&mut out, None).unwrap();
        assert_eq!(out, b"three");
    }

    #[test]
    fn a_damaged_header_is_an_error() {
        let r = ring(64);
        r.producer().unwrap().push(b"hello", None).unwrap();
        // SAFETY: test-only; byte 4 is inside the data area (the first frame header check word).
        unsafe { *r.data().add(4) ^= 0xff };
        let mut out = Vec::new();
        assert_eq!(
            r.consumer().unwrap().pop(&mut out, None),
            Err(PopError::Damaged)
        );
    }

    #[test]
    fn a_consumer_position_out_of_reach_is_an_error_for_the_producer() {
        let r = ring(128);
        let mut tx = r.producer().unwrap();
        tx.push(&[1; 40], None).unwrap(); // write = 48
                                          // A peer scribbles on the consumer's shared position: ahead of the producer, or
                                          // further behind than the ring is long. The producer neither panics nor overwrites.
        for bad in [1000u64, 49, u64::MAX] {
            r.header().read.store(bad, Ordering::SeqCst);
            let pushed = tx.push(&[2; 8], soon());
            assert_eq!(pushed, Err(PushError::Damaged), "read = {bad}");
        }
        r.header().read.store(0, Ordering::SeqCst);
        tx.push(&[3; 8], None).unwrap(); // a sane position again: the ring works
        assert_eq!(tx.write, 64);
    }

    #[test]
    fn a_position_that_its_end_did_not_publish_is_damage() {
        // Another producer (a second process on this end) moved `write`: this producer refuses
        // to go on from a position that is not its own, and the consumer sees the damage.
        let r = ring(128);
        let mut tx = r.producer().unwrap();
        tx.push(&[1; 8], None).unwrap(); // write = 16
        r.header().write.store(32, Ordering::SeqCst);
        assert_eq!(tx.push(&[2; 8], None), Err(PushError::Damaged));
        r.header().write.store(7, Ordering::SeqCst);
        let mut out = Vec::new();
        let mut rx = r.consumer().unwrap();
        assert_eq!(rx.pop(&mut out, None), Err(PopError::Damaged));
        // Another consumer moved `read`.
        let r = ring(128);
        r.producer().unwrap().push(&[1; 8], None).unwrap();
        r.header().read.store(16, Ordering::SeqCst);
        let popped = r.consumer().unwrap().pop(&mut out, soon());
        assert_eq!(popped, Err(PopError::Damaged));
    }

    #[test]
    fn rings_of_one_memfd_in_a_process_share_their_ends() {
        let first = ring(256);
        let second = reopen(&first); // opened before anything was pushed
        first.producer().unwrap().push(b"one", None).unwrap();
        first.producer().unwrap().push(b"two", None).unwrap();
        // The second object goes on from where the first's producer stopped: nothing is lost.
        second.producer().unwrap().push(b"three", None).unwrap();
        let mut out = Vec::new();
        let mut rx = first.consumer().unwrap();
        for want in [&b"one"[..], b"two", b"three"] {
            rx.pop(&mut out, None).unwrap();
            assert_eq!(out, want);
        }
        assert_eq!(rx.pop(&mut out, soon()), Err(PopError::Empty));
        // And one holder per end across both objects: no second producer or consumer.
        let tx = first.producer().unwrap();
        assert!(second.producer().is_none());
        assert!(
            second.consumer().is_none(),
            "rx still holds the consumer end"
        );
        drop(rx);
        assert!(second.consumer().is_some());
        // Once every object of a memfd is gone, its entry goes: a ring made later is new.
        drop(tx);
        drop((first, second));
        let third = ring(256);
        assert!(third.producer().is_some() && third.consumer().is_some());
    }

    #[test]
    fn open_refuses_positions_no_ring_could_reach() {
        // Found by fuzzing (tests/fuzz_ring.rs): a header whose `write` was unaligned (here 4
        // bytes before the end of the data area) made the first push write a pad frame header
        // across the end, and the store's bounds assertion panicked.
        let cap = 128u64;
        for (write, read) in [
            (cap - 4, 0),                 // unaligned
            (16, 12),                     // unaligned reader
            (8, 16),                      // the reader ahead of the writer
            (3 * cap, cap - 8),           // the writer more than a ring ahead
            (u64::MAX - 7, u64::MAX - 7), // about to overflow
        ] {
            let r = ring(cap as usize);
            r.header().write.store(write, Ordering::SeqCst);
            r.header().read.store(read, Ordering::SeqCst);
            let fd = r.region().fd().try_clone_to_owned().unwrap();
            drop(r); // no `Ring` of this process holds the ends: `open` reads the header
            let err = Ring::open(Region::from_fd(fd).unwrap()).err();
            let err = err.unwrap_or_else(|| panic!("opened at write {write}, read {read}"));
            assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
        }
        // Positions a ring does reach, a lap and more along, open and go on.
        let r = ring(cap as usize);
        r.header().write.store(5 * cap + 8, Ordering::SeqCst);
        r.header().read.store(5 * cap - 16, Ordering::SeqCst);
        let fd = r.region().fd().try_clone_to_owned().unwrap();
        drop(r);
        let again = Ring::open(Region::from_fd(fd).unwrap()).unwrap();
        let mut tx = again.producer().unwrap();
        tx.push(&[9; 40], soon()).unwrap();
        assert_eq!(tx.write, 5 * cap + 8 + 48);
    }

    #[test]
    fn open_rejects_a_foreign_region() {
        let region = Region::create("not-a-ring", 4096).unwrap();
        assert!(Ring::open(region).is_err());
    }

    #[test]
    fn blocked_ends_wake_each_other_across_threads() {
        let producer = Arc::new(ring(128));
        let consumer = reopen(&producer);
        let p = Arc::clone(&producer);
        let t = thread::spawn(move || {
            let mut tx = p.producer().unwrap();
            for i in 0..20_000u32 {
                tx.push(&i.to_le_bytes(), None).unwrap();
            }
            p.close_write();
        });
        let mut rx = consumer.consumer().unwrap();
        let mut out = Vec::new();
        let mut next = 0u32;
        while rx.pop(&mut out, None).is_ok() {
            assert_eq!(out, next.to_le_bytes());
            next += 1;
        }
        assert_eq!(next, 20_000);
        t.join().unwrap();
    }
}
