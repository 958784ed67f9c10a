//! Fuzzing the shared-memory ring where another process's bytes reach it: the header that
//! `Ring::open` checks, and the frames a consumer decodes (and the positions either end reads)
//! after a peer wrote garbage. Whatever the bytes, every call returns (an error or a frame no
//! longer than `max_frame`): no panic, no access outside the data area, no allocation beyond
//! the ring's size, no hang. Without damage, the frames come out as they went in.
//!
//! The bytes are written through the memfd itself (`pwrite`), as a peer process would write
//! through its mapping. Budget: see `fuzz_common` (`PROPTEST_CASES`).
#![cfg(all(not(loom), target_os = "linux"))]

mod fuzz_common;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use fuzz_common::{fuzz, watched};
use pipeflow_core::shm::{PopError, PushError, Region, Ring, RING_HEADER};
use proptest::collection::vec;
use proptest::prelude::*;

// The ring's header layout (ring.rs): these tests write where a peer would. `layout_is_known`
// checks the offsets against a real ring, so that a change of layout fails loudly here.
const MAGIC: u64 = 0x5049_5045_464c_4f57;
const AT_CAPACITY: u64 = 8;
const AT_WRITE: u64 = 128;
const AT_READ: u64 = 256;
const AT_FLAGS: u64 = 384; // data_seq, consumer_waiting, space_seq, producer_waiting, closed x2
const FRAME_CHECK: u32 = 0x9E37_79B9;
const PAD: u32 = u32::MAX;

/// The memfd of `region`, to write into as a peer would.
fn peer(region: &Region) -> File {
    File::from(region.fd().try_clone_to_owned().expect("dup"))
}

fn u64_at(file: &File, at: u64) -> u64 {
    let mut b = [0u8; 8];
    file.read_exact_at(&mut b, at).expect("pread");
    u64::from_le_bytes(b)
}

#[test]
fn layout_is_known() {
    let ring = Ring::create("fuzz", 256).unwrap();
    let file = peer(ring.region());
    assert_eq!(u64_at(&file, 0), MAGIC);
    assert_eq!(u64_at(&file, AT_CAPACITY), 256);
    ring.producer().unwrap().push(&[7; 5], None).unwrap();
    assert_eq!(u64_at(&file, AT_WRITE), 16);
    ring.consumer().unwrap().pop(&mut Vec::new(), None).unwrap();
    assert_eq!(u64_at(&file, AT_READ), 16);
    ring.close_write();
    let mut flags = [0u8; 24];
    file.read_exact_at(&mut flags, AT_FLAGS).unwrap();
    assert_eq!(flags[16], 1, "writer_closed");
    let mut head = [0u8; 8];
    file.read_exact_at(&mut head, RING_HEADER as u64).unwrap();
    assert_eq!(head[..4], 5u32.to_le_bytes());
    assert_eq!(head[4..], (5 ^ FRAME_CHECK).to_le_bytes());
}

/// A position as a peer may leave it: sane, unaligned, past the other end, or absurd.
#[derive(Clone, Debug)]
enum Position {
    /// A multiple of 8 in the first few laps of a small ring.
    Aligned(u16),
    /// Any small position, aligned or not.
    Any(u16),
    /// `other` (the other end's position in the header) plus this.
    Near(i16),
    /// `back` bytes before the end of lap `lap` of the ring: where frames wrap.
    LapEnd {
        lap: u8,
        back: u8,
    },
    /// Close to the end of the u64 range.
    Top(u8),
    Raw(u64),
}

impl Position {
    /// The position, given the other end's and the ring's capacity (as its header says).
    fn at(&self, other: u64, cap: u64) -> u64 {
        match *self {
            Position::Aligned(n) => u64::from(n) * 8,
            Position::Any(n) => u64::from(n),
            Position::Near(d) => other.wrapping_add_signed(i64::from(d)),
            Position::LapEnd { lap, back } => (u64::from(lap) + 1)
                .wrapping_mul(cap)
                .wrapping_sub(u64::from(back % 64)),
            Position::Top(n) => u64::MAX - u64::from(n),
            Position::Raw(n) => n,
        }
    }
}

fn position() -> impl Strategy<Value = Position> {
    prop_oneof![
        3 => any::<u16>().prop_map(Position::Aligned),
        2 => any::<u16>().prop_map(Position::Any),
        3 => any::<i16>().prop_map(Position::Near),
        3 => (any::<u8>(), any::<u8>()).prop_map(|(lap, back)| Position::LapEnd { lap, back }),
        1 => any::<u8>().prop_map(Position::Top),
        1 => any::<u64>().prop_map(Position::Raw),
    ]
}

/// The capacity word of a header, relative to the region it is in.
#[derive(Clone, Debug)]
enum Capacity {
    /// The largest power of two that fits (what `Ring::create` writes).
    Fits,
    /// A power of two, fitting or not.
    Pow(u8),
    Raw(u64),
}

/// The two positions of a header.
#[derive(Clone, Debug)]
enum Positions {
    /// The reader behind the writer by at most a ring's length: `lag` bytes, or `lag` times 8
    /// if `aligned` (what a live ring shows, when the writer's is a multiple of 8).
    Behind {
        write: Position,
        lag: u16,
        aligned: bool,
    },
    /// Each anywhere.
    Each { write: Position, read: Position },
}

impl Positions {
    fn at(&self, cap: u64) -> (u64, u64) {
        match self {
            Positions::Behind {
                write,
                lag,
                aligned,
            } => {
                let write = write.at(0, cap);
                let lag = match aligned {
                    true => 8 * (u64::from(*lag) % (cap / 8 + 1)),
                    false => u64::from(*lag) % cap.saturating_add(1),
                };
                (write, write.saturating_sub(lag))
            }
            Positions::Each { write, read } => {
                let write = write.at(0, cap);
                (write, read.at(write, cap))
            }
        }
    }
}

fn positions() -> impl Strategy<Value = Positions> {
    // Mostly positions a live ring shows, so that most headers get past `open`.
    let sane = prop_oneof![
        any::<u16>().prop_map(Position::Aligned),
        (any::<u8>(), 0u8..8).prop_map(|(lap, k)| Position::LapEnd { lap, back: 8 * k }),
    ];
    let behind = |write, lag, aligned| Positions::Behind {
        write,
        lag,
        aligned,
    };
    prop_oneof![
        4 => (sane, any::<u16>()).prop_map(move |(write, lag)| behind(write, lag, true)),
        1 => (position(), any::<u16>(), any::<bool>())
            .prop_map(move |(write, lag, aligned)| behind(write, lag, aligned)),
        1 => (position(), position()).prop_map(|(write, read)| Positions::Each { write, read }),
    ]
}

/// Header bytes, as a peer may have left them.
#[derive(Clone, Debug)]
struct Header {
    magic: Option<u64>,
    capacity: Capacity,
    positions: Positions,
    flags: [u32; 6],
}

fn header() -> impl Strategy<Value = Header> {
    let magic = prop_oneof![8 => Just(None), 1 => any::<u64>().prop_map(Some)];
    let capacity = prop_oneof![
        6 => Just(Capacity::Fits),
        2 => (0u8..64).prop_map(Capacity::Pow),
        1 => any::<u64>().prop_map(Capacity::Raw),
    ];
    let flag = prop_oneof![4 => 0u32..2, 1 => any::<u32>()];
    let flags = [(); 6].map(|()| flag.clone());
    (magic, capacity, positions(), flags).prop_map(|(magic, capacity, positions, flags)| Header {
        magic,
        capacity,
        positions,
        flags,
    })
}

/// One thing done with a ring's ends.
#[derive(Clone, Debug)]
enum Op {
    /// A frame of this many bytes (it may be too large).
    Push(u16),
    Pop,
    CloseWrite,
    CloseRead,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => any::<u16>().prop_map(Op::Push),
        4 => Just(Op::Pop),
        1 => Just(Op::CloseWrite),
        1 => Just(Op::CloseRead),
    ]
}

/// Runs `ops` on `ring` (no wait longer than "now"): how many calls were made. Checks that no
/// frame comes out longer than `max_frame`.
fn drive(ring: &Ring, ops: &[Op]) -> u64 {
    let mut out = Vec::new();
    for op in ops {
        match *op {
            Op::Push(n) => {
                // Up to twice the longest frame: some too large.
                let payload = vec![0xA5; usize::from(n) % (2 * ring.max_frame() + 2)];
                if let Some(mut tx) = ring.producer() {
                    let pushed = tx.push(&payload, Some(Instant::now()));
                    if payload.len() > ring.max_frame() {
                        assert_eq!(pushed, Err(PushError::TooLarge));
                    }
                }
            }
            Op::Pop => {
                if let Some(mut rx) = ring.consumer() {
                    if rx.pop(&mut out, Some(Instant::now())).is_ok() {
                        assert!(out.len() <= ring.max_frame(), "{} bytes", out.len());
                    }
                }
            }
            Op::CloseWrite => ring.close_write(),
            Op::CloseRead => ring.close_read(),
        }
    }
    ops.len() as u64
}

/// A region of `len` bytes holding `head` and `data` after it, as `Ring::open` finds it.
fn scribbled(len: usize, head: &Header, data: &[u8]) -> Region {
    let region = Region::create("fuzz-ring", len).unwrap();
    let file = peer(&region);
    let room = len.saturating_sub(RING_HEADER) as u64;
    let capacity = match head.capacity {
        Capacity::Fits if room > 0 => 1u64 << (63 - room.leading_zeros()),
        Capacity::Fits => 64,
        Capacity::Pow(k) => 1u64 << k,
        Capacity::Raw(n) => n,
    };
    let (write, read) = head.positions.at(capacity);
    let mut bytes = vec![0u8; RING_HEADER];
    bytes[..8].copy_from_slice(&head.magic.unwrap_or(MAGIC).to_le_bytes());
    bytes[8..16].copy_from_slice(&capacity.to_le_bytes());
    bytes[128..136].copy_from_slice(&write.to_le_bytes());
    bytes[256..264].copy_from_slice(&read.to_le_bytes());
    for (i, f) in head.flags.iter().enumerate() {
        bytes[384 + 4 * i..388 + 4 * i].copy_from_slice(&f.to_le_bytes());
    }
    bytes.extend_from_slice(data);
    bytes.truncate(len);
    file.write_all_at(&bytes, 0).unwrap();
    region
}

/// The region's length: too small for a ring, a header and a power of two, or anything.
fn region_len() -> impl Strategy<Value = usize> {
    prop_oneof![
        1 => 1usize..RING_HEADER + 64,
        4 => (6u32..12).prop_map(|k| RING_HEADER + (1 << k)),
        2 => RING_HEADER + 64..RING_HEADER + 4096,
    ]
}

/// Data-area bytes: noise, or frame headers (valid checks, any lengths) among noise, so that
/// decoding gets past the check word and on to the length checks.
fn data_area() -> impl Strategy<Value = Vec<u8>> {
    let word = prop_oneof![
        2 => any::<u32>().prop_map(|len| [len, len ^ FRAME_CHECK]),
        1 => (0u32..64).prop_map(|len| [len, len ^ FRAME_CHECK]),
        1 => Just([PAD, PAD ^ FRAME_CHECK]),
        2 => any::<[u32; 2]>(),
    ];
    vec(word, 0..64).prop_map(|words| {
        words
            .iter()
            .flat_map(|[a, b]| a.to_le_bytes().into_iter().chain(b.to_le_bytes()))
            .collect()
    })
}

#[test]
fn any_header_opens_as_a_ring_or_is_refused() {
    let cases = (region_len(), header(), data_area(), vec(op(), 0..24));
    let rings = AtomicU64::new(0);
    fuzz("ring header", 3000, cases, |(len, head, data, ops)| {
        let ((opened, calls), largest) = watched(move || {
            let region = scribbled(len, &head, &data);
            match Ring::open(region) {
                Err(_) => (false, 1),
                Ok(ring) => {
                    assert!(ring.max_frame() < len, "max_frame {}", ring.max_frame());
                    (true, 1 + drive(&ring, &ops))
                }
            }
        });
        // The pops' buffers and the harness's own small allocations: nothing sized by a
        // length read from the region.
        prop_assert!(
            largest <= 2 * len + 4096,
            "an allocation of {largest} bytes"
        );
        rings.fetch_add(u64::from(opened), Ordering::Relaxed);
        Ok(calls)
    });
    println!(
        "fuzz ring header: {} headers opened as rings",
        rings.into_inner()
    );
}

/// What a peer does to a ring between pushes and pops.
#[derive(Clone, Debug)]
enum Damage {
    /// Flips bits of one data byte.
    Flip(u16, u8),
    /// Writes a frame header with a valid check word (any length) at an 8-aligned offset.
    Frame(u16, u32),
    /// Writes any word at a 4-aligned offset.
    Word(u16, u32),
    /// Moves the producer's published position (the consumer reads it).
    Write(Position),
    /// Moves the consumer's published position (the producer reads it).
    Read(Position),
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        (any::<u16>(), 1u8..).prop_map(|(at, x)| Damage::Flip(at, x)),
        (
            any::<u16>(),
            prop_oneof![0u32..256, any::<u32>(), Just(PAD)]
        )
            .prop_map(|(at, len)| Damage::Frame(at, len)),
        (any::<u16>(), any::<u32>()).prop_map(|(at, w)| Damage::Word(at, w)),
        position().prop_map(Damage::Write),
        position().prop_map(Damage::Read),
    ]
}

fn scribble(ring: &Ring, cap: u64, damage: &Damage) {
    let file = peer(ring.region());
    let data = RING_HEADER as u64;
    match damage {
        Damage::Flip(at, x) => {
            let at = data + u64::from(*at) % cap;
            let mut b = [0u8];
            file.read_exact_at(&mut b, at).unwrap();
            file.write_all_at(&[b[0] ^ x], at).unwrap();
        }
        Damage::Frame(at, len) => {
            let at = data + (u64::from(*at) * 8) % cap;
            let mut b = [0u8; 8];
            b[..4].copy_from_slice(&len.to_le_bytes());
            b[4..].copy_from_slice(&(len ^ FRAME_CHECK).to_le_bytes());
            file.write_all_at(&b, at).unwrap();
        }
        Damage::Word(at, w) => {
            let at = data + (u64::from(*at) * 4) % cap;
            file.write_all_at(&w.to_le_bytes(), at).unwrap();
        }
        Damage::Write(p) => {
            let read = u64_at(&file, AT_READ);
            file.write_all_at(&p.at(read, cap).to_le_bytes(), AT_WRITE)
                .unwrap();
        }
        Damage::Read(p) => {
            let write = u64_at(&file, AT_WRITE);
            file.write_all_at(&p.at(write, cap).to_le_bytes(), AT_READ)
                .unwrap();
        }
    }
}

/// A ring with traffic, then a peer's damage, then the consumer drains and the producer pushes.
#[derive(Clone, Debug)]
struct Traffic {
    /// The data area's size, 2^k.
    log_cap: u32,
    /// Frames pushed and popped first, to move the positions along (wrap-around included).
    before: Vec<u16>,
    /// Frames pushed then left in the ring for the consumer.
    frames: Vec<u16>,
    damage: Vec<Damage>,
    /// Frames pushed after the drain.
    after: Vec<u16>,
}

fn traffic() -> impl Strategy<Value = Traffic> {
    (
        6u32..11,
        vec(any::<u16>(), 0..12),
        vec(any::<u16>(), 0..8),
        prop_oneof![1 => Just(Vec::new()), 4 => vec(damage(), 1..4)],
        vec(any::<u16>(), 0..4),
    )
        .prop_map(|(log_cap, before, frames, damage, after)| Traffic {
            log_cap,
            before,
            frames,
            damage,
            after,
        })
}

fn payload(n: u16, max: usize, salt: usize) -> Vec<u8> {
    let len = usize::from(n) % (max + 1);
    (0..len).map(|i| (i * 31 + salt) as u8).collect()
}

#[test]
fn frames_decode_or_fail_cleanly_after_a_peer_scribbles() {
    fuzz("ring frames", 3000, traffic(), |t| {
        let (calls, largest) = watched(move || {
            let cap = 1u64 << t.log_cap;
            let ring = Ring::create("fuzz-ring", cap as usize).unwrap();
            let max = ring.max_frame();
            let (mut calls, mut out) = (0u64, Vec::new());
            {
                let (mut tx, mut rx) = (ring.producer().unwrap(), ring.consumer().unwrap());
                for (i, &n) in t.before.iter().enumerate() {
                    let p = payload(n, max, i);
                    tx.push(&p, None).unwrap();
                    rx.pop(&mut out, None).unwrap();
                    assert_eq!(out, p);
                    calls += 2;
                }
            }
            // As many frames as fit (a full ring only times out).
            let mut sent = Vec::new();
            let mut tx = ring.producer().unwrap();
            for (i, &n) in t.frames.iter().enumerate() {
                let p = payload(n, max, i + 100);
                calls += 1;
                if tx.push(&p, Some(Instant::now())).is_ok() {
                    sent.push(p);
                }
            }
            drop(tx);
            for d in &t.damage {
                scribble(&ring, cap, d);
            }
            // The consumer drains: each frame is whole, until an error; a ring of `cap`
            // bytes holds at most cap / 8 frames, so more pops than that would be a loop.
            let mut rx = ring.consumer().unwrap();
            let mut got = Vec::new();
            let end = loop {
                calls += 1;
                match rx.pop(&mut out, Some(Instant::now())) {
                    Ok(()) => {
                        assert!(out.len() <= max, "a frame of {} bytes", out.len());
                        got.push(out.clone());
                        assert!(got.len() as u64 <= cap / 8, "more frames than fit");
                    }
                    Err(e) => break e,
                }
            };
            drop(rx);
            if t.damage.is_empty() {
                assert_eq!(got, sent, "an undamaged ring changed its frames");
                assert_eq!(end, PopError::Empty);
            }
            let mut tx = ring.producer().unwrap();
            for (i, &n) in t.after.iter().enumerate() {
                calls += 1;
                let pushed = tx.push(&payload(n, max, i), Some(Instant::now()));
                if t.damage.is_empty() {
                    assert_eq!(pushed, Ok(()), "an undamaged, drained ring refused a frame");
                    let mut rx = ring.consumer().unwrap();
                    rx.pop(&mut out, None).unwrap();
                }
            }
            calls
        });
        // The frames kept to compare (at most cap / 8 of them) and the pops' buffer.
        prop_assert!(
            largest <= (16 << t.log_cap) + 4096,
            "an allocation of {largest} bytes"
        );
        Ok(calls)
    });
}
