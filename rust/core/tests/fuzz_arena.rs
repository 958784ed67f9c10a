//! Fuzzing the shared-memory arena where bytes from elsewhere reach it: the block descriptors
//! of messages, as the Python side hands them over (`Arena.adopt`, `Arena.borrow` and
//! `Block.keep`, then the block's drop: `adopt`, `check`, `hold`, `decref` here), the header
//! that `Arena::open` checks, and the slot records a descriptor is checked against.
//!
//! Descriptors are checked against a model of the live blocks: a descriptor passes exactly
//! when it lies inside a live allocation it names, a stale one changes nothing, no two blocks
//! overlap, and once every reference is dropped the free list is whole again. Whatever the
//! bytes, every call returns: no panic, no access outside the mapping, no allocation sized by
//! a field, no hang. Budget: see `fuzz_common` (`PROPTEST_CASES`).
#![cfg(all(not(loom), target_os = "linux"))]

mod fuzz_common;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};

use fuzz_common::{fuzz, watched};
use pipeflow_core::shm::{Arena, Desc, PAGE};
use proptest::collection::vec;
use proptest::prelude::*;

// The arena's layout (arena.rs, life.rs): these tests write where a peer would.
const MAGIC: u64 = 0x7069_7065_6172_656e;
const SLOT: u64 = 32;
const SLOT_OFF: u64 = 16;
const SLOT_LEN: u64 = 24;

/// The arena's memfd, to write into as another process would.
fn peer(arena: &Arena) -> File {
    File::from(arena.fd().try_clone_to_owned().expect("dup"))
}

fn u64_at(file: &File, at: u64) -> u64 {
    let mut b = [0u8; 8];
    file.read_exact_at(&mut b, at).expect("pread");
    u64::from_le_bytes(b)
}

#[test]
fn layout_is_known() {
    let arena = Arena::create(4 * PAGE, 3).unwrap();
    let d = arena.alloc(PAGE + 1, 1).unwrap();
    let file = peer(&arena);
    assert_eq!(u64_at(&file, 0), MAGIC);
    assert_eq!(u64_at(&file, 8), 3);
    assert_eq!(u64_at(&file, 24), 4 * PAGE as u64);
    let len = file.metadata().unwrap().len();
    assert_eq!(u64_at(&file, 16), len - 4 * PAGE as u64, "data_off");
    assert_eq!(u64_at(&file, 16), data_off(3));
    let slot = PAGE as u64 + u64::from(d.slot) * SLOT;
    assert_eq!(u64_at(&file, slot + SLOT_OFF), d.start);
    assert_eq!(u64_at(&file, slot + SLOT_LEN), 2 * PAGE as u64);
}

/// Where the data area starts for `nslots` slots (the arena's `layout`), in wrapping
/// arithmetic: the value a header would need to look consistent with an absurd `nslots`.
fn data_off(nslots: u64) -> u64 {
    let page = PAGE as u64;
    let up = |n: u64, to: u64| n.wrapping_add(to - 1) / to * to;
    let extents = page.wrapping_add(up(nslots.wrapping_mul(SLOT), 64));
    up(
        extents.wrapping_add(nslots.wrapping_add(1).wrapping_mul(16)),
        page,
    )
}

/// A header field as damage may leave it: right, near, consistent with the others, or absurd.
#[derive(Clone, Debug)]
enum Field {
    Kept,
    Small(u16),
    /// 2^k, or 2^k plus a little: where products of a slot count overflow.
    Pow {
        k: u8,
        plus: u8,
    },
    Raw(u64),
}

impl Field {
    fn value(&self, kept: u64) -> u64 {
        match *self {
            Field::Kept => kept,
            Field::Small(n) => u64::from(n),
            Field::Pow { k, plus } => (1u64 << (k % 64)).wrapping_add(u64::from(plus % 4)),
            Field::Raw(n) => n,
        }
    }
}

fn field() -> impl Strategy<Value = Field> {
    prop_oneof![
        3 => Just(Field::Kept),
        2 => any::<u16>().prop_map(Field::Small),
        3 => (any::<u8>(), any::<u8>()).prop_map(|(k, plus)| Field::Pow { k, plus }),
        1 => any::<u64>().prop_map(Field::Raw),
    ]
}

/// A header: the arena's own sizes, then each field as damage left it. `consistent`: data_off
/// and data_len made to agree with the (damaged) slot count and the memfd's length, as the
/// checks of `open` expect, so that the slot count itself is what is tested.
#[derive(Clone, Debug)]
struct Header {
    pages: u16,
    nslots: u16,
    magic: bool,
    fields: [Field; 3],
    consistent: bool,
}

fn header() -> impl Strategy<Value = Header> {
    (
        1u16..32,
        1u16..64,
        prop_oneof![9 => Just(true), 1 => Just(false)],
        [field(), field(), field()],
        any::<bool>(),
    )
        .prop_map(|(pages, nslots, magic, fields, consistent)| Header {
            pages,
            nslots,
            magic,
            fields,
            consistent,
        })
}

#[test]
fn any_header_opens_as_an_arena_or_is_refused() {
    let opened = AtomicU64::new(0);
    fuzz("arena header", 3000, header(), |h| {
        let ((ok, calls), largest) = watched(move || {
            let arena = Arena::create(usize::from(h.pages) * PAGE, usize::from(h.nslots)).unwrap();
            let file = peer(&arena);
            let len = file.metadata().unwrap().len();
            let real = [
                u64::from(h.nslots),
                data_off(u64::from(h.nslots)),
                h.pages as u64 * 4096,
            ];
            let mut v = [0u64; 3];
            for (i, f) in h.fields.iter().enumerate() {
                v[i] = f.value(real[i]);
            }
            if h.consistent {
                v[1] = data_off(v[0]);
                v[2] = len.wrapping_sub(v[1]);
            }
            let magic = if h.magic { MAGIC } else { !MAGIC };
            let mut bytes = magic.to_le_bytes().to_vec();
            for x in v {
                bytes.extend_from_slice(&x.to_le_bytes());
            }
            file.write_all_at(&bytes, 0).unwrap();
            let Ok(other) = Arena::open(arena.fd().try_clone_to_owned().unwrap()) else {
                return (false, 1);
            };
            // What it took from the header fits the memfd: every slot and extent before the
            // data area, and the data area up to the end.
            let nslots = other.nslots() as u64;
            let data = other.data_len() as u64;
            assert!(
                data <= len,
                "a data area of {data} bytes in a memfd of {len}"
            );
            let meta = PAGE as u64 + nslots.checked_mul(SLOT + 16).expect("slots overflow");
            assert!(
                meta <= len - data,
                "{nslots} slots before {} bytes",
                len - data
            );
            // And it works: a walk over every slot, one block and back.
            assert_eq!(other.stats().blocks, 0);
            if let Some(d) = other.alloc(1, 1) {
                assert!(d.start + d.len <= data);
                assert!(other.check(&d).is_ok());
                assert!(other.decref(&d));
            }
            (true, 4)
        });
        prop_assert!(largest <= 1 << 16, "an allocation of {largest} bytes");
        opened.fetch_add(u64::from(ok), Ordering::Relaxed);
        Ok(calls)
    });
    println!("fuzz arena header: {} headers opened", opened.into_inner());
}

/// A live block as the model knows it: the descriptor `alloc` gave, its references, whether a
/// receiver took it (then `reclaim` leaves it), its writer's tag.
#[derive(Clone, Debug)]
struct Live {
    desc: Desc,
    refs: u32,
    shared: bool,
    owner: u32,
}

/// What the arena must hold: the live blocks, and descriptors of blocks freed since.
#[derive(Default)]
struct Model {
    live: Vec<Live>,
    stale: Vec<Desc>,
}

impl Model {
    /// Whether `d` names a live block and lies inside it: what `check` must say.
    fn valid(&self, d: &Desc) -> Option<usize> {
        self.live.iter().position(|b| {
            let end = d.start.checked_add(d.len);
            b.desc.slot == d.slot
                && b.desc.gen == d.gen
                && d.start >= b.desc.start
                && end.is_some_and(|e| e <= b.desc.start + b.desc.len)
        })
    }

    fn free(&mut self, i: usize) {
        let b = self.live.swap_remove(i);
        self.stale.push(b.desc);
    }
}

/// A descriptor from a message: one the model knows (a live or a stale block's), changed or
/// not, or any bytes.
#[derive(Clone, Debug)]
enum Pick {
    Live(u16, Change),
    Stale(u16, Change),
    Raw {
        slot: u32,
        gen: u32,
        start: u64,
        len: u64,
    },
}

/// How a known descriptor is changed.
#[derive(Clone, Debug)]
enum Change {
    Same,
    /// A byte range inside (or past) the block: `from` and `len` bytes of it.
    Range {
        from: u16,
        len: u16,
    },
    Slot(i8),
    Gen(i8),
    Start(i32),
    Len(i32),
    /// Start or length near the end of the u64 range.
    TopStart(u8),
    TopLen(u8),
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        3 => Just(Change::Same),
        4 => (any::<u16>(), any::<u16>()).prop_map(|(from, len)| Change::Range { from, len }),
        1 => any::<i8>().prop_map(Change::Slot),
        1 => any::<i8>().prop_map(Change::Gen),
        2 => any::<i32>().prop_map(Change::Start),
        2 => any::<i32>().prop_map(Change::Len),
        1 => any::<u8>().prop_map(Change::TopStart),
        1 => any::<u8>().prop_map(Change::TopLen),
    ]
}

fn pick() -> impl Strategy<Value = Pick> {
    prop_oneof![
        6 => (any::<u16>(), change()).prop_map(|(i, c)| Pick::Live(i, c)),
        2 => (any::<u16>(), change()).prop_map(|(i, c)| Pick::Stale(i, c)),
        1 => (0u32..16, any::<u32>(), any::<u64>(), any::<u64>())
            .prop_map(|(slot, gen, start, len)| Pick::Raw { slot, gen, start, len }),
        1 => any::<(u32, u32, u64, u64)>()
            .prop_map(|(slot, gen, start, len)| Pick::Raw { slot, gen, start, len }),
    ]
}

impl Pick {
    fn desc(&self, model: &Model) -> Desc {
        let known = |list: &[Desc], i: u16, c: &Change| {
            if list.is_empty() {
                return Desc {
                    slot: 0,
                    gen: 1,
                    start: 0,
                    len: 1,
                };
            }
            let d = list[usize::from(i) % list.len()];
            match *c {
                Change::Same => d,
                Change::Range { from, len } => Desc {
                    start: d.start + u64::from(from) % (d.len + 8),
                    len: u64::from(len) % (d.len + 8),
                    ..d
                },
                Change::Slot(k) => Desc {
                    slot: d.slot.wrapping_add_signed(k.into()),
                    ..d
                },
                Change::Gen(k) => Desc {
                    gen: d.gen.wrapping_add_signed(k.into()),
                    ..d
                },
                Change::Start(k) => Desc {
                    start: d.start.wrapping_add_signed(k.into()),
                    ..d
                },
                Change::Len(k) => Desc {
                    len: d.len.wrapping_add_signed(k.into()),
                    ..d
                },
                Change::TopStart(k) => Desc {
                    start: u64::MAX - u64::from(k),
                    ..d
                },
                Change::TopLen(k) => Desc {
                    len: u64::MAX - u64::from(k),
                    ..d
                },
            }
        };
        match self {
            Pick::Live(i, c) => {
                let live: Vec<Desc> = model.live.iter().map(|b| b.desc).collect();
                known(&live, *i, c)
            }
            Pick::Stale(i, c) => known(&model.stale, *i, c),
            &Pick::Raw {
                slot,
                gen,
                start,
                len,
            } => Desc {
                slot,
                gen,
                start,
                len,
            },
        }
    }
}

/// One call, as the Python side makes it.
#[derive(Clone, Debug)]
enum Op {
    /// `Arena.empty` / `put`: a new block of `pages` pages (less a few bytes), for writer `owner`.
    Alloc { pages: u8, owner: u8 },
    /// `Arena.adopt(desc, incref)`: a message's descriptor taken.
    Adopt(Pick, bool),
    /// `Arena.borrow(desc)`, and `Block.keep()` if `keep`.
    Borrow(Pick, bool),
    /// A `Block` holding a reference goes (the model's block `which`).
    Drop(u16),
    /// A `Block` whose block was freed since goes: nothing changes.
    DropStale(u16),
    /// The parent saw writer `owner` die.
    Reclaim(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (1u8..4, 1u8..4).prop_map(|(pages, owner)| Op::Alloc { pages, owner }),
        4 => (pick(), any::<bool>()).prop_map(|(p, incref)| Op::Adopt(p, incref)),
        4 => (pick(), any::<bool>()).prop_map(|(p, keep)| Op::Borrow(p, keep)),
        2 => any::<u16>().prop_map(Op::Drop),
        1 => any::<u16>().prop_map(Op::DropStale),
        1 => (1u8..4).prop_map(Op::Reclaim),
    ]
}

/// Runs `op` on `arena` and the model, checking that they agree.
fn step(arena: &Arena, model: &mut Model, op: &Op) {
    match op {
        Op::Alloc { pages, owner } => {
            let len = usize::from(*pages) * PAGE - usize::from(*pages);
            let Some(d) = arena.alloc(len, u32::from(*owner)) else {
                return; // full, or out of slots
            };
            assert_eq!(d.len, u64::from(*pages) * PAGE as u64);
            assert!(d.start + d.len <= arena.data_len() as u64, "{d:?} outside");
            for b in &model.live {
                let (a, z) = (b.desc.start, b.desc.start + b.desc.len);
                assert!(d.start + d.len <= a || d.start >= z, "{d:?} overlaps {b:?}");
            }
            let owner = u32::from(*owner);
            model.live.push(Live {
                desc: d,
                refs: 1,
                shared: false,
                owner,
            });
        }
        Op::Adopt(pick, incref) => {
            let d = pick.desc(model);
            let taken = arena.adopt(&d, *incref);
            let want = model.valid(&d);
            assert_eq!(taken.is_ok(), want.is_some(), "adopt {d:?}: {taken:?}");
            if let Some(i) = want {
                // The message's reference is taken over, or (incref) another one added.
                model.live[i].shared = true;
                model.live[i].refs += u32::from(*incref);
            }
        }
        Op::Borrow(pick, keep) => {
            let d = pick.desc(model);
            let checked = arena.check(&d);
            let want = model.valid(&d);
            assert_eq!(checked.is_ok(), want.is_some(), "check {d:?}: {checked:?}");
            if let (Some(i), true) = (want, *keep) {
                assert!(arena.hold(&d), "keep of a checked descriptor {d:?}");
                model.live[i].shared = true;
                model.live[i].refs += 1;
            }
        }
        Op::Drop(which) => {
            if model.live.is_empty() {
                return;
            }
            let i = usize::from(*which) % model.live.len();
            assert!(arena.decref(&model.live[i].desc));
            model.live[i].refs -= 1;
            if model.live[i].refs == 0 {
                model.free(i);
            }
        }
        Op::DropStale(which) => {
            if model.stale.is_empty() {
                return;
            }
            let d = model.stale[usize::from(*which) % model.stale.len()];
            if model
                .live
                .iter()
                .any(|b| (b.desc.slot, b.desc.gen) == (d.slot, d.gen))
            {
                return; // cannot be: a slot's generations only grow
            }
            assert!(!arena.decref(&d), "a stale {d:?} dropped a reference");
        }
        Op::Reclaim(owner) => {
            let owner = u32::from(*owner);
            let n = arena.reclaim(owner);
            let dead: Vec<usize> = (0..model.live.len())
                .rev()
                .filter(|&i| model.live[i].owner == owner && !model.live[i].shared)
                .collect();
            assert_eq!(n, dead.len(), "reclaim({owner})");
            for i in dead {
                model.free(i);
            }
        }
    }
}

#[test]
fn descriptors_pass_exactly_when_they_name_a_live_block() {
    let cases = (4u8..32, 1u8..8, vec(op(), 1..48));
    fuzz("arena descriptors", 2000, cases, |(pages, nslots, ops)| {
        let (calls, largest) = watched(move || {
            let arena = Arena::create(usize::from(pages) * PAGE, usize::from(nslots)).unwrap();
            let mut model = Model::default();
            for op in &ops {
                step(&arena, &mut model, op);
            }
            let blocks = arena.stats().blocks;
            assert_eq!(blocks, model.live.len() as u64, "live blocks");
            for b in std::mem::take(&mut model.live) {
                for _ in 0..b.refs {
                    assert!(arena.decref(&b.desc));
                }
            }
            let whole = (u64::from(pages) * PAGE as u64, 1);
            assert_eq!(
                arena.free_extents(),
                whole,
                "the free list once all is dropped"
            );
            ops.len() as u64
        });
        prop_assert!(largest <= 1 << 16, "an allocation of {largest} bytes");
        Ok(calls)
    });
}

/// A slot record another process scribbled on: its place (offset, length) in the data area.
#[derive(Clone, Debug)]
struct Scribble {
    off: Field,
    len: Field,
    /// The descriptor then checked: inside the claimed place, or anything.
    pick: Pick,
}

#[test]
fn a_descriptor_that_passes_never_reaches_outside_the_data_area() {
    let cases = (
        4u8..16,
        field(),
        field(),
        pick(),
        any::<u16>(),
        any::<u16>(),
    );
    fuzz(
        "arena slots",
        2000,
        cases,
        |(pages, off, len, pick, from, n)| {
            let s = Scribble { off, len, pick };
            let (calls, _) = watched(move || {
                let arena = Arena::create(usize::from(pages) * PAGE, 4).unwrap();
                let d = arena.alloc(PAGE, 1).unwrap();
                let file = peer(&arena);
                let slot = PAGE as u64 + u64::from(d.slot) * SLOT;
                let place = (s.off.value(d.start), s.len.value(d.len));
                file.write_all_at(&place.0.to_le_bytes(), slot + SLOT_OFF)
                    .unwrap();
                file.write_all_at(&place.1.to_le_bytes(), slot + SLOT_LEN)
                    .unwrap();
                // Inside the place the slot now claims, or any descriptor.
                let inside = Desc {
                    start: place.0.wrapping_add(u64::from(from)),
                    len: u64::from(n),
                    ..d
                };
                let model = Model {
                    live: vec![Live {
                        desc: d,
                        refs: 1,
                        shared: false,
                        owner: 1,
                    }],
                    stale: Vec::new(),
                };
                let data = arena.data_len() as u64;
                for desc in [inside, s.pick.desc(&model), d] {
                    if arena.check(&desc).is_ok() {
                        let end = desc.start.checked_add(desc.len);
                        assert!(
                            end.is_some_and(|e| e <= data),
                            "{desc:?} passed, place {place:?}"
                        );
                    }
                }
                3
            });
            Ok(calls)
        },
    );
}
