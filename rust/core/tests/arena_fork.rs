//! The arena between real processes: forked writers allocate blocks, fill them and hand them to
//! the parent through a ring, which checks every byte and frees them; a writer SIGKILLed at a
//! random instant (maybe holding the arena's mutex, maybe mid-write) must not wedge the arena,
//! corrupt the other writers' blocks, or leak what the parent reclaims.
#![cfg(all(target_os = "linux", not(loom)))]

mod common;

use std::time::{Duration, Instant};

use pipeflow_core::shm::{Arena, Desc, PopError, Ring, PAGE};

use common::{fork_child, wait_status};

const BLOCKS: u32 = 3000;

fn encode(d: &Desc, byte: u8) -> Vec<u8> {
    let mut v = Vec::with_capacity(25);
    v.extend_from_slice(&d.slot.to_le_bytes());
    v.extend_from_slice(&d.gen.to_le_bytes());
    v.extend_from_slice(&d.start.to_le_bytes());
    v.extend_from_slice(&d.len.to_le_bytes());
    v.push(byte);
    v
}

fn decode(v: &[u8]) -> (Desc, u8) {
    let u32_at = |i: usize| u32::from_le_bytes(v[i..i + 4].try_into().unwrap());
    let u64_at = |i: usize| u64::from_le_bytes(v[i..i + 8].try_into().unwrap());
    let d = Desc {
        slot: u32_at(0),
        gen: u32_at(4),
        start: u64_at(8),
        len: u64_at(16),
    };
    (d, v[24])
}

/// A writer: allocates blocks of varying size, fills each with its byte, shares it into `ring`.
fn writer(arena: &Arena, ring: &Ring, owner: u32) -> i32 {
    let mut tx = ring.producer().unwrap();
    for i in 0..BLOCKS {
        let len = (i as usize % 7) * PAGE + 100;
        let deadline = Instant::now() + Duration::from_secs(20);
        let d = loop {
            if let Some(d) = arena.alloc(len, owner) {
                break d;
            }
            if Instant::now() > deadline {
                return 2;
            }
            std::thread::yield_now(); // full: the parent frees as it reads
        };
        let byte = (owner as u8).wrapping_mul(31).wrapping_add(i as u8) | 1;
        // SAFETY: `d` is a block this process just allocated and alone holds.
        unsafe { std::ptr::write_bytes(arena.data_ptr(d.start), byte, d.len as usize) };
        arena.share(&d);
        if tx.push(&encode(&d, byte), None).is_err() {
            return 1;
        }
    }
    ring.close_write();
    0
}

#[test]
fn blocks_cross_from_forked_writers_and_a_killed_one_leaks_nothing() {
    let arena = Arena::create(64 * PAGE, 32).unwrap();
    let rings: Vec<Ring> = (0..3)
        .map(|_| Ring::create("arena-test", 4096).unwrap())
        .collect();
    let pids: Vec<libc::pid_t> = (0..3)
        .map(|w| fork_child(|| writer(&arena, &rings[w], w as u32 + 1)))
        .collect();
    // Writer 3 is killed after a moment, at whatever it is doing.
    std::thread::sleep(Duration::from_millis(20));
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(pids[2], libc::SIGKILL) };
    let mut seen = [0u32; 3];
    let mut done = [false; 3];
    let mut killed_reaped = false;
    let mut out = Vec::new();
    let until = Instant::now() + Duration::from_secs(60);
    // Round-robin: a writer waits for room that only the reader's frees make.
    while !done.iter().all(|&d| d) {
        assert!(Instant::now() < until, "stuck: seen {seen:?}");
        for (w, ring) in rings.iter().enumerate() {
            if done[w] {
                continue;
            }
            let deadline = Some(Instant::now() + Duration::from_millis(1));
            match ring.consumer().unwrap().pop(&mut out, deadline) {
                Ok(()) => {
                    let (d, byte) = decode(&out);
                    arena.check(&d).unwrap();
                    // SAFETY: the writer shared the block and handed its reference over.
                    let s = unsafe {
                        std::slice::from_raw_parts(arena.data_ptr(d.start), d.len as usize)
                    };
                    assert!(s.iter().all(|&b| b == byte), "writer {w}: a damaged block");
                    arena.decref(&d);
                    seen[w] += 1;
                }
                Err(PopError::Closed) => done[w] = true,
                Err(PopError::Empty) if w == 2 && killed_reaped => done[w] = true,
                Err(PopError::Empty) => {}
                Err(e) => panic!("writer {w}: {e:?}"),
            }
            if w == 2 && !killed_reaped {
                let mut status = 0;
                // SAFETY: polls our own child without blocking.
                killed_reaped =
                    unsafe { libc::waitpid(pids[2], &mut status, libc::WNOHANG) } == pids[2];
            }
        }
    }
    assert_eq!(wait_status(pids[0]), 0);
    assert_eq!(wait_status(pids[1]), 0);
    assert_eq!(&seen[..2], &[BLOCKS, BLOCKS]);
    // What the killed writer had allocated but not shared is reclaimed; everything else was
    // freed by the reader, so the free list is whole again.
    arena.reclaim(3);
    assert_eq!(arena.stats().live_bytes, 0, "seen {seen:?}");
    assert_eq!(arena.free_extents(), (64 * PAGE as u64, 1));
}
