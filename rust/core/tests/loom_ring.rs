//! Loom models of the shared-memory ring's protocol: the positions, the frame bytes (each a loom
//! cell, so a read racing a write is reported), and the futex eventcounts (a missed wake shows
//! up as a deadlock). Run with
//! `RUSTFLAGS="--cfg loom" cargo test -p pipeflow-core --test loom_ring --release`.
#![cfg(all(loom, target_os = "linux"))]

use loom::thread;
use pipeflow_core::shm::{PopError, PushError, Ring};

fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    b.preemption_bound = Some(3);
    b.check(f);
}

fn frame(tag: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| tag.wrapping_mul(31).wrapping_add(i as u8))
        .collect()
}

/// Three frames through a 64-byte ring: the first two fill it, so the producer must wait for
/// space, and the third wraps to offset 0. The consumer may start first and wait for data.
#[test]
fn frames_cross_intact_through_waits_and_wrap_around() {
    model(|| {
        let (producer, consumer) = Ring::loom_pair(64);
        let t = thread::spawn(move || {
            let mut tx = producer.producer().unwrap();
            for tag in 0..3u8 {
                tx.push(&frame(tag, 20), None).unwrap();
            }
            producer.close_write();
        });
        let mut rx = consumer.consumer().unwrap();
        let mut out = Vec::new();
        for tag in 0..3u8 {
            rx.pop(&mut out, None).unwrap();
            assert_eq!(out, frame(tag, 20));
        }
        assert_eq!(rx.pop(&mut out, None), Err(PopError::Closed));
        t.join().unwrap();
    });
}

/// A frame that does not fit before the end goes after a pad frame, at offset 0.
#[test]
fn a_pad_frame_is_skipped() {
    model(|| {
        let (producer, consumer) = Ring::loom_pair(64);
        let t = thread::spawn(move || {
            let mut tx = producer.producer().unwrap();
            tx.push(&frame(1, 12), None).unwrap(); // stride 24: 0..24
            tx.push(&frame(2, 12), None).unwrap(); // 24..48
            tx.push(&frame(3, 12), None).unwrap(); // 16 left: pad, then 0..24
        });
        let mut rx = consumer.consumer().unwrap();
        let mut out = Vec::new();
        for tag in 1..=3u8 {
            rx.pop(&mut out, None).unwrap();
            assert_eq!(out, frame(tag, 12));
        }
        t.join().unwrap();
    });
}

/// The consumer closing its end wakes a producer blocked on a full ring, which then fails.
#[test]
fn close_read_wakes_a_blocked_producer() {
    model(|| {
        let (producer, consumer) = Ring::loom_pair(64);
        producer
            .producer()
            .unwrap()
            .push(&frame(0, 24), None)
            .unwrap();
        producer
            .producer()
            .unwrap()
            .push(&frame(1, 24), None)
            .unwrap();
        let t = thread::spawn(move || producer.producer().unwrap().push(&frame(2, 24), None));
        consumer.close_read();
        assert_eq!(t.join().unwrap(), Err(PushError::Closed));
    });
}
