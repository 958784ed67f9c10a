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

use std::time::{Duration, Instant};

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
}

/// Why a pop returned nothing.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum PopError {
    /// Nothing arrived before the deadline.
    Empty,
    /// The producer closed its end and everything was read.
    Closed,
    /// A frame header or position is inconsistent: the ring cannot be trusted any more.
    Damaged,
}

/// One end's view of a ring laid out in a region. Use one `Ring` as the producer and another
/// (possibly in another process) as the consumer; never two producers or two consumers.
pub struct Ring {
    #[cfg(not(loom))]
    region: Region,
    #[cfg(loom)]
    mem: std::sync::Arc<LoomMemory>,
    capacity: u64,
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
    /// A producer end and a consumer end of a new ring of `capacity` data bytes (a power of
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
        let mem = std::sync::Arc::new(LoomMemory { header, data });
        let other = Ring {
            mem: std::sync::Arc::clone(&mem),
            capacity,
        };
        (Ring { mem, capacity }, other)
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
    /// Lays out a new ring over `region`, whose data area is the rest of the region rounded
    /// down to a power of two.
    pub fn create(region: Region) -> std::io::Result<Ring> {
        let avail = region.len().saturating_sub(RING_HEADER);
        if avail < 64 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "region too small",
            ));
        }
        let capacity = 1u64 << (63 - (avail as u64).leading_zeros());
        // SAFETY: the region is page-aligned and at least RING_HEADER bytes, so the header
        // fits, aligned; nobody else uses this fresh region yet, so plain writes are exclusive.
        unsafe {
            let h = region.as_ptr().cast::<Header>();
            std::ptr::addr_of_mut!((*h).capacity).write(capacity);
            std::ptr::addr_of_mut!((*h).magic).write(MAGIC);
        }
        Ok(Ring { region, capacity })
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
        Ok(Ring { region, capacity })
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

    // ------------------------------------------------------------------ producer

    /// Appends one frame, waiting for room until `deadline` (None: forever).
    pub fn push(&self, payload: &[u8], deadline: Option<Instant>) -> Result<(), PushError> {
        if payload.len() > self.max_frame() {
            return Err(PushError::TooLarge);
        }
        let h = self.header();
        let stride = FRAME_HEADER + round8(payload.len() as u64);
        let w = h.write.load(Ordering::Relaxed); // only this producer writes it
        let offset = w % self.capacity;
        let pad = if offset + stride > self.capacity {
            self.capacity - offset
        } else {
            0
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
            let r = h.read.load(Ordering::Acquire);
            if self.capacity - (w - r) >= pad + stride {
                break;
            }
            h.producer_waiting.swap(1, Ordering::SeqCst);
            if self.capacity - (w - h.read.fetch_add(0, Ordering::SeqCst)) >= pad + stride {
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
            self.write_frame_header(at % self.capacity, PAD);
            at += pad;
        }
        let off = at % self.capacity;
        self.write_frame_header(off, payload.len() as u32);
        // [off + 8, off + 8 + len) lies inside the data area (the frame does not straddle the
        // end), and it is free space: the consumer's `read` is past it (checked above with
        // Acquire), so no one reads it until we publish below.
        self.store(off + FRAME_HEADER, payload);
        self.publish(at + stride);
        Ok(())
    }

    fn write_frame_header(&self, off: u64, len: u32) {
        // `off` is 8-aligned and < capacity, so 8 bytes fit; the space is free (see `push`).
        self.store(off, &frame_header(len));
    }

    fn publish(&self, new_write: u64) {
        let h = self.header();
        // An RMW (Release at least: pairs with the consumer's Acquire load of `write`), and one
        // half of the eventcount's Dekker pair with the waiter check below (see the module docs).
        h.write.swap(new_write, Ordering::SeqCst);
        signal(&h.data_seq, &h.consumer_waiting);
    }

    /// Closes the producer's end: the consumer reads what was pushed, then sees `Closed`.
    pub fn close_write(&self) {
        let h = self.header();
        h.writer_closed.store(1, Ordering::SeqCst);
        h.data_seq.fetch_add(1, Ordering::SeqCst);
        futex::wake_all(&h.data_seq);
    }

    // ------------------------------------------------------------------ consumer

    /// Takes one frame into `out` (replacing its contents), waiting until `deadline`.
    pub fn pop(&self, out: &mut Vec<u8>, deadline: Option<Instant>) -> Result<(), PopError> {
        let h = self.header();
        let mut r = h.read.load(Ordering::Relaxed); // only this consumer writes it
        loop {
            let seq = h.data_seq.load(Ordering::SeqCst);
            // Acquire: pairs with the producer's store of `write` (the frame's bytes are there).
            let w = h.write.load(Ordering::Acquire);
            if w != r {
                if w < r || w - r > self.capacity {
                    return Err(PopError::Damaged);
                }
                let off = r % self.capacity;
                let len = self.read_frame_header(off)?;
                if len == PAD {
                    r += self.capacity - off;
                    continue;
                }
                let stride = FRAME_HEADER + round8(u64::from(len));
                if u64::from(len) > self.max_frame() as u64
                    || off + stride > self.capacity
                    || w - r < stride
                {
                    return Err(PopError::Damaged);
                }
                // The frame lies inside the data area (checked just above) and was published
                // (Acquire load of `write`); the producer will not reuse it before `read` moves.
                out.clear();
                out.resize(len as usize, 0);
                self.load(off + FRAME_HEADER, out);
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

    /// Skipping pad frames advances `read` without a consume; store it when giving up.
    fn store_read(&self, r: u64) {
        let h = self.header();
        if h.read.load(Ordering::Relaxed) != r {
            self.consumed(r);
        }
    }

    fn consumed(&self, new_read: u64) {
        let h = self.header();
        // An RMW (Release at least: pairs with the producer's Acquire load of `read`), and one
        // half of the eventcount's Dekker pair with the waiter check below (see the module docs).
        h.read.swap(new_read, Ordering::SeqCst);
        signal(&h.space_seq, &h.producer_waiting);
    }

    /// Closes the consumer's end: pushes fail with `Closed` from now on.
    pub fn close_read(&self) {
        let h = self.header();
        h.reader_closed.store(1, Ordering::SeqCst);
        h.space_seq.fetch_add(1, Ordering::SeqCst);
        futex::wake_all(&h.space_seq);
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
    use std::sync::Arc;
    use std::thread;

    fn ring(data: usize) -> Ring {
        Ring::create(Region::create("pipeflow-test", RING_HEADER + data).unwrap()).unwrap()
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
        let mut out = Vec::new();
        for i in 0..1000u32 {
            let payload: Vec<u8> = (0..(i % 97) as u8).collect();
            producer.push(&payload, None).unwrap();
            consumer.pop(&mut out, None).unwrap();
            assert_eq!(out, payload);
        }
    }

    #[test]
    fn full_empty_too_large_and_close() {
        let r = ring(64);
        let mut out = Vec::new();
        assert_eq!(r.max_frame(), 24);
        assert_eq!(r.push(&[0; 25], None), Err(PushError::TooLarge));
        assert_eq!(r.pop(&mut out, soon()), Err(PopError::Empty));
        r.push(&[1; 24], None).unwrap();
        r.push(&[2; 24], None).unwrap();
        assert_eq!(r.push(&[3], soon()), Err(PushError::Full));
        r.close_write();
        r.pop(&mut out, None).unwrap();
        assert_eq!(out, [1; 24]);
        r.pop(&mut out, None).unwrap();
        assert_eq!(out, [2; 24]);
        assert_eq!(r.pop(&mut out, None), Err(PopError::Closed));
        r.close_read();
        assert_eq!(r.push(&[4], None), Err(PushError::Closed));
    }

    #[test]
    fn a_damaged_header_is_an_error() {
        let r = ring(64);
        r.push(b"hello", None).unwrap();
        // SAFETY: test-only; byte 4 is inside the data area (the first frame header check word).
        unsafe { *r.data().add(4) ^= 0xff };
        let mut out = Vec::new();
        assert_eq!(r.pop(&mut out, None), Err(PopError::Damaged));
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
            for i in 0..20_000u32 {
                p.push(&i.to_le_bytes(), None).unwrap();
            }
            p.close_write();
        });
        let mut out = Vec::new();
        let mut next = 0u32;
        while consumer.pop(&mut out, None).is_ok() {
            assert_eq!(out, next.to_le_bytes());
            next += 1;
        }
        assert_eq!(next, 20_000);
        t.join().unwrap();
    }
}
