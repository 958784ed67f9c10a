//! The arena's own tests: allocation wired to the slots and the free list, descriptors,
//! owner tags, the mutex's timeout and a dead holder, and several mappings and threads at once.
//! (Each concept's own tests are in its module.) `fill` and `all` serve those modules too.

use super::*;
use crate::shm::life::Life;

pub(crate) fn fill(arena: &Arena, d: &Desc, byte: u8) {
    // SAFETY: `d` is a live block of `d.len` bytes that this test holds.
    unsafe { std::ptr::write_bytes(arena.data_ptr(d.start), byte, d.len as usize) };
}

pub(crate) fn all(arena: &Arena, d: &Desc, byte: u8) -> bool {
    // SAFETY: as in `fill`.
    let s = unsafe { std::slice::from_raw_parts(arena.data_ptr(d.start), d.len as usize) };
    s.iter().all(|&b| b == byte)
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
fn a_header_whose_slot_count_overflows_the_layout_is_refused() {
    // Found by fuzzing (tests/fuzz_arena.rs): 2^60 slots wrap the layout's arithmetic around
    // to the data offset of one slot, so a header claiming them passed `open`, and the first
    // walk over the slots (`stats`) read far outside the mapping.
    let arena = Arena::create(PAGE, 1).unwrap();
    let wrapped = 1u64 << 60;
    // SAFETY: the header's `nslots` field, written once here as a damaged peer would; no
    // other thread uses this arena.
    unsafe { (*arena.header_ptr()).nslots = wrapped };
    let err = Arena::open(arena.fd().try_clone_to_owned().unwrap()).err();
    assert_eq!(err.map(|e| e.kind()), Some(io::ErrorKind::InvalidData));
    assert_eq!(Arena::layout(1 << 60), None);
    assert_eq!(Arena::layout(usize::MAX / 16), None);
    // SAFETY: as above.
    unsafe { (*arena.header_ptr()).nslots = 1 };
    assert!(Arena::open(arena.fd().try_clone_to_owned().unwrap()).is_ok());
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
fn a_damaged_slot_lets_no_descriptor_outside_the_data_area() {
    // Found by fuzzing (tests/fuzz_arena.rs): a slot whose place another process overwrote
    // (here a block of 32 pages in an arena of 4) passed descriptors reaching past the data
    // area, which a `Block` would then have exported as its buffer.
    let arena = Arena::create(4 * PAGE, 4).unwrap();
    let d = arena.alloc(PAGE, 1).unwrap();
    let slot = arena.slot(d.slot as usize);
    let past = Desc {
        len: 4 * PAGE as u64 + 1,
        ..d
    };
    for (off, len) in [
        (0, 32 * PAGE as u64),
        (u64::MAX - 10, 20),
        (8 * PAGE as u64, 1),
    ] {
        slot.set_place(off, len);
        let desc = Desc { start: off, ..past };
        for desc in [desc, past] {
            assert!(
                arena.check(&desc).is_err(),
                "{desc:?} passed with a place of {off}+{len}"
            );
            assert!(arena.adopt(&desc, true).is_err());
        }
    }
    slot.set_place(d.start, d.len);
    assert!(arena.check(&d).is_ok());
    assert!(arena.decref(&d));
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
fn a_holder_killed_with_the_mutex_does_not_wedge_the_arena() {
    let arena = Arena::create(32 * PAGE, 8).unwrap();
    let kept = arena.alloc(PAGE, 1).unwrap();
    let dropped = arena.alloc(PAGE, 1).unwrap();
    // A block whose last reference went while its dropper died before freeing it.
    arena
        .slot(dropped.slot as usize)
        .set_life(Life::new(dropped.gen, WRITING, 0));
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
