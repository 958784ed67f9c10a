//! The shared-memory ring between real processes: a forked producer, every byte checked, and a
//! producer killed mid-stream (SIGKILL) that must not wedge or corrupt the ring.
#![cfg(all(target_os = "linux", not(loom)))]

mod common;

use std::time::{Duration, Instant};

use pipeflow_core::shm::{PopError, Ring};

use common::{fork_child, wait_status};

/// Messages sent by the forked producer.
const MESSAGES: u32 = 200_000;

fn payload(i: u32) -> Vec<u8> {
    let len = (i % 61) as usize + 4;
    let mut v = Vec::with_capacity(len);
    v.extend_from_slice(&i.to_le_bytes());
    v.extend((4..len).map(|k| (i as usize).wrapping_mul(31).wrapping_add(k) as u8));
    v
}

#[test]
fn every_byte_crosses_from_a_forked_producer() {
    let ring = Ring::create("pipeflow-fork", 4096).unwrap();
    let pid = fork_child(|| {
        let mut tx = ring.producer().unwrap();
        for i in 0..MESSAGES {
            if tx.push(&payload(i), None).is_err() {
                return 1;
            }
        }
        ring.close_write();
        0
    });
    let mut rx = ring.consumer().unwrap();
    let mut out = Vec::new();
    let mut next = 0u32;
    loop {
        match rx.pop(&mut out, Some(Instant::now() + Duration::from_secs(30))) {
            Ok(()) => {
                assert_eq!(out, payload(next), "message {next}");
                next += 1;
            }
            Err(PopError::Closed) => break,
            Err(e) => panic!("pop failed after {next} messages: {e:?}"),
        }
    }
    assert_eq!(next, MESSAGES);
    let status = wait_status(pid);
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
}

#[test]
fn a_producer_killed_mid_stream_leaves_a_readable_ring() {
    for round in 0..20 {
        let ring = Ring::create("pipeflow-kill", 1024).unwrap();
        let pid = fork_child(|| {
            let mut tx = ring.producer().unwrap();
            let mut i = 0u32;
            loop {
                let _ = tx.push(&payload(i), None);
                i = i.wrapping_add(1);
            }
        });
        let mut rx = ring.consumer().unwrap();
        let mut out = Vec::new();
        let mut next = 0u32;
        // Read for a while, then kill the producer at an arbitrary instant.
        let kill_after = 500 + round * 97;
        while next < kill_after {
            rx.pop(&mut out, Some(Instant::now() + Duration::from_secs(30)))
                .unwrap();
            assert_eq!(out, payload(next));
            next += 1;
        }
        // SAFETY: kills our own child.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let status = wait_status(pid);
        assert!(libc::WIFSIGNALED(status));
        // Whatever was published is intact; then the ring is just empty, never damaged or stuck.
        loop {
            match rx.pop(&mut out, Some(Instant::now() + Duration::from_millis(50))) {
                Ok(()) => {
                    assert_eq!(out, payload(next));
                    next += 1;
                }
                Err(PopError::Empty) => break,
                Err(e) => panic!("round {round}: {e:?} after the producer died"),
            }
        }
    }
}
