//! Stress tests of the channel and the pool under real threads: many producers and consumers,
//! close racing with blocked threads, drop accounting, select over several channels, and a pool
//! fed from many threads (and from its own jobs) while threads retire and restart.
//!
//! Sized by `SCALE`: 1 keeps `cargo test --release` to a few seconds on two cores; raise it for a
//! longer soak. A hang is reported as a failure by a watchdog instead of blocking the run.
#![cfg(not(loom))]

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use pipeflow_core::{
    select_recv, Channel, Pool, RecvError, SelectError, SendError, TryRecvError, TrySendError,
};

/// Multiplies every iteration count below.
const SCALE: usize = 1;
/// Values each producer sends in the many-to-many tests.
const PER_PRODUCER: usize = 20_000 * SCALE;
/// Rounds of the close-racing tests.
const CLOSE_ROUNDS: usize = 500 * SCALE;
/// How long any group of threads may take before the test calls it a hang (generous: on two
/// oversubscribed cores the rendezvous tests run several times slower next to the others).
const WATCHDOG: Duration = Duration::from_secs(60 * SCALE as u64);

/// Joins every handle, failing the test if they are not all done within `WATCHDOG`.
fn join_all<T>(handles: Vec<JoinHandle<T>>, what: &str) -> Vec<T> {
    let deadline = Instant::now() + WATCHDOG;
    while !handles.iter().all(JoinHandle::is_finished) {
        assert!(
            Instant::now() < deadline,
            "{what}: {} of {} threads still blocked after {WATCHDOG:?}",
            handles.iter().filter(|h| !h.is_finished()).count(),
            handles.len()
        );
        thread::sleep(Duration::from_millis(1));
    }
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// One counter per value: checks "received exactly once".
struct Seen(Vec<AtomicU8>);

impl Seen {
    fn new(n: usize) -> Self {
        Seen((0..n).map(|_| AtomicU8::new(0)).collect())
    }

    fn mark(&self, v: usize) {
        let before = self.0[v].fetch_add(1, Ordering::Relaxed);
        assert_eq!(before, 0, "value {v} received twice");
    }

    /// Every value in `expected` seen once, no other value seen.
    fn assert_exactly(&self, expected: impl Fn(usize) -> bool) {
        for (v, c) in self.0.iter().enumerate() {
            let c = c.load(Ordering::Relaxed);
            if expected(v) {
                assert_eq!(c, 1, "value {v} was sent but received {c} times");
            } else {
                assert_eq!(c, 0, "value {v} was never sent successfully but received");
            }
        }
    }
}

fn in_ms(ms: u64) -> Option<Instant> {
    Some(Instant::now() + Duration::from_millis(ms))
}

// ------------------------------------------------------------------------------------------------
// Many producers, many consumers
// ------------------------------------------------------------------------------------------------

/// 8 producers and 8 consumers. Half the producers block without a deadline, the other half send
/// with short deadlines and retry with the value a timeout hands back; half the consumers block,
/// the other half poll with `try_recv` and short-deadline `recv`s. Every value arrives once.
fn many_to_many(capacity: usize) {
    const PRODUCERS: usize = 8;
    const CONSUMERS: usize = 8;
    let total = PRODUCERS * PER_PRODUCER;
    let ch = Arc::new(Channel::<usize>::new(capacity));
    let seen = Arc::new(Seen::new(total));

    let consumers: Vec<_> = (0..CONSUMERS)
        .map(|c| {
            let (ch, seen) = (Arc::clone(&ch), Arc::clone(&seen));
            thread::spawn(move || {
                let mut n = 0usize;
                loop {
                    let got = if c % 2 == 0 {
                        ch.recv(None)
                    } else {
                        match ch.try_recv() {
                            Ok(v) => Ok(v),
                            Err(TryRecvError::Closed) => Err(RecvError::Closed),
                            Err(TryRecvError::Empty) => ch.recv(in_ms(1)),
                        }
                    };
                    match got {
                        Ok(v) => {
                            seen.mark(v);
                            n += 1;
                        }
                        Err(RecvError::Timeout) => {}
                        Err(RecvError::Closed) => return n,
                    }
                }
            })
        })
        .collect();

    let producers: Vec<_> = (0..PRODUCERS)
        .map(|p| {
            let ch = Arc::clone(&ch);
            thread::spawn(move || {
                for i in 0..PER_PRODUCER {
                    let mut v = p * PER_PRODUCER + i;
                    if p % 2 == 0 {
                        ch.send(v, None).unwrap();
                        continue;
                    }
                    loop {
                        match ch.send(v, in_ms(1)) {
                            Ok(()) => break,
                            Err(SendError::Timeout(back)) => {
                                assert_eq!(back, p * PER_PRODUCER + i);
                                v = back;
                            }
                            Err(SendError::Closed(_)) => panic!("closed while producing"),
                        }
                    }
                }
            })
        })
        .collect();

    join_all(producers, "producers");
    assert!(ch.close());
    let counts = join_all(consumers, "consumers");
    assert_eq!(counts.iter().sum::<usize>(), total);
    seen.assert_exactly(|_| true);
    assert!(ch.is_empty());
}

#[test]
fn many_to_many_rendezvous() {
    many_to_many(0);
}

#[test]
fn many_to_many_capacity_1() {
    many_to_many(1);
}

#[test]
fn many_to_many_capacity_64() {
    many_to_many(64);
}

// ------------------------------------------------------------------------------------------------
// Close racing with blocked senders and receivers
// ------------------------------------------------------------------------------------------------

/// Per round: 4 senders send until refused, 4 receivers receive until the end, and the channel is
/// closed at a random-ish moment (often while senders wait on a full buffer and receivers on an
/// empty one). Every thread wakes, every accepted value is received exactly once, and every
/// refused value comes back.
fn close_races(capacity: usize) {
    const SENDERS: usize = 4;
    const RECEIVERS: usize = 4;
    const MAX_PER_SENDER: usize = 1 << 16;
    for round in 0..CLOSE_ROUNDS {
        let ch = Arc::new(Channel::<usize>::new(capacity));
        let seen = Arc::new(Seen::new(SENDERS * MAX_PER_SENDER));
        let senders: Vec<_> = (0..SENDERS)
            .map(|s| {
                let ch = Arc::clone(&ch);
                thread::spawn(move || {
                    let mut accepted = Vec::new();
                    for i in 0..MAX_PER_SENDER {
                        let v = s * MAX_PER_SENDER + i;
                        match ch.send(v, None) {
                            Ok(()) => accepted.push(v),
                            Err(SendError::Closed(back)) => {
                                assert_eq!(back, v);
                                // Closed stays closed.
                                assert_eq!(ch.try_send(v), Err(TrySendError::Closed(v)));
                                return accepted;
                            }
                            Err(SendError::Timeout(_)) => unreachable!("no deadline"),
                        }
                    }
                    panic!("the channel was never closed");
                })
            })
            .collect();
        // Fewer receivers in some rounds, so that senders pile up on a full buffer.
        let receivers: Vec<_> = (0..RECEIVERS - round % 2 * 3)
            .map(|_| {
                let (ch, seen) = (Arc::clone(&ch), Arc::clone(&seen));
                thread::spawn(move || {
                    while let Ok(v) = ch.recv(None) {
                        seen.mark(v);
                    }
                    assert_eq!(ch.recv(None), Err(RecvError::Closed));
                })
            })
            .collect();
        // Let the threads get going (and block), for a varying while.
        let pause = Duration::from_micros((round % 7) as u64 * 50);
        thread::sleep(pause);
        assert!(ch.close());
        let accepted: Vec<usize> = join_all(senders, "senders after close")
            .into_iter()
            .flatten()
            .collect();
        join_all(receivers, "receivers after close");
        let mut sent = vec![false; SENDERS * MAX_PER_SENDER];
        for v in accepted {
            sent[v] = true;
        }
        seen.assert_exactly(|v| sent[v]);
    }
}

#[test]
fn close_races_blocked_threads_rendezvous() {
    close_races(0);
}

#[test]
fn close_races_blocked_threads_capacity_1() {
    close_races(1);
}

#[test]
fn close_races_blocked_threads_capacity_8() {
    close_races(8);
}

/// Close wakes threads blocked on both sides at once: senders on a full buffer and receivers on
/// another, empty channel, with no deadline. Repeated, so that the close lands before, during and
/// after the threads start blocking.
#[test]
fn close_wakes_every_blocked_thread() {
    for round in 0..CLOSE_ROUNDS {
        let full = Arc::new(Channel::<usize>::new(1));
        full.send(0, None).unwrap();
        let empty = Arc::new(Channel::<usize>::new(1));
        let mut handles: Vec<JoinHandle<()>> = Vec::new();
        for i in 0..4 {
            let f = Arc::clone(&full);
            handles.push(thread::spawn(move || {
                assert_eq!(f.send(i + 1, None), Err(SendError::Closed(i + 1)));
            }));
            let e = Arc::clone(&empty);
            handles.push(thread::spawn(move || {
                assert_eq!(e.recv(None), Err(RecvError::Closed));
            }));
        }
        if round % 3 != 0 {
            thread::sleep(Duration::from_micros(round as u64 % 5 * 100));
        }
        full.close();
        empty.close();
        join_all(handles, "blocked threads after close");
        assert_eq!(full.recv(None), Ok(0));
        assert_eq!(full.recv(None), Err(RecvError::Closed));
    }
}

// ------------------------------------------------------------------------------------------------
// Drop accounting
// ------------------------------------------------------------------------------------------------

/// A value that counts its drops, per value.
struct Tracked {
    id: usize,
    drops: Arc<Vec<AtomicUsize>>,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.drops[self.id].fetch_add(1, Ordering::SeqCst);
    }
}

/// Values sent by racing producers into a small buffer, some sends timing out, some refused by
/// the close, some `try_send`s finding the buffer full; some values received, the rest left in
/// the buffer when the channel is dropped. Every value is dropped exactly once, whichever way it
/// went: handed back by a failed send, received, or dropped with the channel.
fn drop_accounting(capacity: usize) {
    const PRODUCERS: usize = 4;
    let per = 500 * SCALE;
    let n = PRODUCERS * per;
    for round in 0..4 * SCALE as u64 {
        let drops: Arc<Vec<AtomicUsize>> = Arc::new((0..n).map(|_| AtomicUsize::new(0)).collect());
        let ch = Arc::new(Channel::<Tracked>::new(capacity));
        let outcomes = Arc::new([
            AtomicUsize::new(0), // accepted
            AtomicUsize::new(0), // timed out (handed back)
            AtomicUsize::new(0), // refused: closed (handed back)
            AtomicUsize::new(0), // try_send: full (handed back)
        ]);
        let producers: Vec<_> = (0..PRODUCERS)
            .map(|p| {
                let (ch, drops, outcomes) =
                    (Arc::clone(&ch), Arc::clone(&drops), Arc::clone(&outcomes));
                thread::spawn(move || {
                    for i in 0..per {
                        let id = p * per + i;
                        let v = Tracked {
                            id,
                            drops: Arc::clone(&drops),
                        };
                        let k = match (id % 3, p % 2) {
                            (0, _) => match ch.try_send(v) {
                                Ok(()) => 0,
                                Err(TrySendError::Full(back)) => {
                                    assert_eq!(back.id, id);
                                    3
                                }
                                Err(TrySendError::Closed(back)) => {
                                    assert_eq!(back.id, id);
                                    2
                                }
                            },
                            _ => {
                                let deadline = if p % 2 == 0 { in_ms(1) } else { None };
                                match ch.send(v, deadline) {
                                    Ok(()) => 0,
                                    Err(SendError::Timeout(back)) => {
                                        assert_eq!(back.id, id);
                                        1
                                    }
                                    Err(SendError::Closed(back)) => {
                                        assert_eq!(back.id, id);
                                        2
                                    }
                                }
                            }
                        };
                        outcomes[k].fetch_add(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        // One consumer takes some values, slowly enough that the buffer fills up.
        let consumer = {
            let ch = Arc::clone(&ch);
            thread::spawn(move || {
                let mut got = 0usize;
                for _ in 0..n / 4 {
                    match ch.recv(in_ms(2)) {
                        Ok(v) => {
                            drop(v);
                            got += 1;
                        }
                        Err(RecvError::Timeout) => {}
                        Err(RecvError::Closed) => break,
                    }
                    if got % 16 == 0 {
                        thread::yield_now();
                    }
                }
                got
            })
        };
        // Close while producers are still at it (later in later rounds).
        thread::sleep(Duration::from_millis(2 + round % 4 * 3));
        ch.close();
        join_all(producers, "producers");
        let received = join_all(vec![consumer], "consumer")[0];
        // Take a few more after the close, then drop the channel with the rest inside.
        let mut after = 0;
        while after < 3 {
            match ch.try_recv() {
                Ok(_) => after += 1,
                Err(_) => break,
            }
        }
        let left = ch.len();
        let accepted = outcomes[0].load(Ordering::SeqCst);
        assert_eq!(
            received + after + left,
            accepted,
            "accepted values unaccounted for"
        );
        assert_eq!(
            outcomes
                .iter()
                .map(|c| c.load(Ordering::SeqCst))
                .sum::<usize>(),
            n
        );
        let before_drop: usize = drops.iter().map(|d| d.load(Ordering::SeqCst)).sum();
        assert_eq!(
            before_drop,
            n - left,
            "only the buffered values are still alive"
        );
        drop(Arc::into_inner(ch).expect("no other owner left"));
        for (id, d) in drops.iter().enumerate() {
            assert_eq!(
                d.load(Ordering::SeqCst),
                1,
                "value {id} dropped a wrong number of times"
            );
        }
    }
}

#[test]
fn every_value_dropped_once_rendezvous() {
    drop_accounting(0);
}

#[test]
fn every_value_dropped_once_capacity_16() {
    drop_accounting(16);
}

// ------------------------------------------------------------------------------------------------
// select_recv
// ------------------------------------------------------------------------------------------------

/// 4 channels of different capacities, 2 producers each, 4 consumers selecting over all of them
/// (half without a deadline, half with short ones). Each channel is closed by its last producer,
/// so channels end at different times and selects must skip the drained ones. Every value once.
#[test]
fn select_many_producers_every_value_once() {
    const CHANNELS: usize = 4;
    const PER_CHANNEL: usize = 2;
    const CONSUMERS: usize = 4;
    let per = PER_PRODUCER / 2;
    let total = CHANNELS * PER_CHANNEL * per;
    let caps = [0, 1, 8, 64];
    let chans: Arc<Vec<Channel<usize>>> = Arc::new(caps.iter().map(|&c| Channel::new(c)).collect());
    let left: Arc<Vec<AtomicUsize>> = Arc::new(
        (0..CHANNELS)
            .map(|_| AtomicUsize::new(PER_CHANNEL))
            .collect(),
    );
    let seen = Arc::new(Seen::new(total));

    let consumers: Vec<_> = (0..CONSUMERS)
        .map(|c| {
            let (chans, seen) = (Arc::clone(&chans), Arc::clone(&seen));
            thread::spawn(move || {
                let refs: Vec<&Channel<usize>> = chans.iter().collect();
                let mut n = 0usize;
                loop {
                    let deadline = if c % 2 == 0 { None } else { in_ms(1) };
                    match select_recv(&refs, deadline) {
                        Ok((i, v)) => {
                            assert_eq!(v / (PER_CHANNEL * per), i, "value from the wrong channel");
                            seen.mark(v);
                            n += 1;
                        }
                        Err(SelectError::Timeout) => {}
                        Err(SelectError::AllClosed) => return n,
                    }
                }
            })
        })
        .collect();

    let producers: Vec<_> = (0..CHANNELS * PER_CHANNEL)
        .map(|p| {
            let (chans, left) = (Arc::clone(&chans), Arc::clone(&left));
            thread::spawn(move || {
                let ch = p / PER_CHANNEL;
                for i in 0..per {
                    chans[ch].send(p * per + i, None).unwrap();
                }
                if left[ch].fetch_sub(1, Ordering::AcqRel) == 1 {
                    assert!(chans[ch].close());
                }
            })
        })
        .collect();

    join_all(producers, "producers");
    let counts = join_all(consumers, "selecting consumers");
    assert_eq!(counts.iter().sum::<usize>(), total);
    seen.assert_exactly(|_| true);
}

/// A select with no deadline on channels that all close while it waits (or just before it
/// registers): it must return AllClosed, never wait forever. Regression test for a select that
/// re-read `is_closed()` between its look and its wait, and so could skip the close signal of a
/// channel closed in between.
#[test]
fn select_sees_closes_that_race_with_it() {
    let rounds = 20 * CLOSE_ROUNDS;
    let chans: Arc<Vec<[Channel<u32>; 2]>> = Arc::new(
        (0..rounds)
            .map(|_| [Channel::new(0), Channel::new(1)])
            .collect(),
    );
    // Rounds the selector has started and finished.
    let started = Arc::new(AtomicUsize::new(0));
    let finished = Arc::new(AtomicUsize::new(0));
    let selector = {
        let (chans, started, finished) = (
            Arc::clone(&chans),
            Arc::clone(&started),
            Arc::clone(&finished),
        );
        thread::spawn(move || {
            for pair in chans.iter() {
                started.fetch_add(1, Ordering::SeqCst);
                assert_eq!(
                    select_recv(&[&pair[0], &pair[1]], None),
                    Err(SelectError::AllClosed)
                );
                finished.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    let wait_for = |counter: &AtomicUsize, n: usize| {
        let deadline = Instant::now() + WATCHDOG;
        while counter.load(Ordering::SeqCst) < n {
            assert!(!selector.is_finished(), "the selector thread panicked");
            assert!(
                Instant::now() < deadline,
                "round {}: select_recv(None) still waiting after every channel closed",
                n - 1
            );
            thread::yield_now();
        }
    };
    for (i, pair) in chans.iter().enumerate() {
        wait_for(&started, i + 1);
        for _ in 0..(i % 64) {
            std::hint::spin_loop();
        }
        pair[0].close();
        pair[1].close();
        wait_for(&finished, i + 1);
    }
    join_all(vec![selector], "select after close");
}

// ------------------------------------------------------------------------------------------------
// Pool
// ------------------------------------------------------------------------------------------------

/// 4 threads submit jobs at once; every fourth job submits two nested jobs (to the worker's own
/// deque, stolen by the others). A short keep-alive makes threads retire and restart during the
/// run. Every job runs exactly once, and shutdown leaves no thread.
#[test]
fn pool_many_submitters_nested_jobs_run_once() {
    const SUBMITTERS: usize = 4;
    let per = PER_PRODUCER;
    let top = SUBMITTERS * per;
    // Top-level job t has nested jobs top + 2t and top + 2t + 1 if t % 4 == 0.
    let total = top * 3;
    let expected = move |id: usize| id < top || (id - top) / 2 % 4 == 0;
    let expected_count = (0..total).filter(|&id| expected(id)).count();

    let pool = Arc::new(Pool::new(8, Duration::from_millis(1)));
    let seen = Arc::new(Seen::new(total));
    let done = Arc::new(AtomicUsize::new(0));
    let (tx, rx) = mpsc::channel::<()>();

    let submitters: Vec<_> = (0..SUBMITTERS)
        .map(|s| {
            let (pool, seen, done, tx) = (
                Arc::clone(&pool),
                Arc::clone(&seen),
                Arc::clone(&done),
                tx.clone(),
            );
            thread::spawn(move || {
                for i in 0..per {
                    let t = s * per + i;
                    let (pool2, seen, done, tx) = (
                        Arc::clone(&pool),
                        Arc::clone(&seen),
                        Arc::clone(&done),
                        tx.clone(),
                    );
                    let job = move || {
                        if t % 4 == 0 {
                            for k in 0..2 {
                                let id = top + 2 * t + k;
                                let (seen, done, tx) =
                                    (Arc::clone(&seen), Arc::clone(&done), tx.clone());
                                assert!(pool2.spawn(Box::new(move || {
                                    seen.mark(id);
                                    finish(&done, expected_count, &tx);
                                })));
                            }
                        }
                        seen.mark(t);
                        finish(&done, expected_count, &tx);
                    };
                    assert!(pool.spawn(Box::new(job)));
                }
            })
        })
        .collect();
    drop(tx);

    join_all(submitters, "submitters");
    rx.recv_timeout(WATCHDOG).expect("not every job ran");
    seen.assert_exactly(expected);
    assert!(pool.stats().threads <= 8);
    assert!(pool.shutdown(WATCHDOG));
    let stats = pool.stats();
    assert_eq!((stats.threads, stats.idle, stats.running), (0, 0, 0));
    assert!(!pool.spawn(Box::new(|| {})));
}

/// Counts a finished job; the last one signals.
fn finish(done: &AtomicUsize, expected: usize, tx: &mpsc::Sender<()>) {
    if done.fetch_add(1, Ordering::SeqCst) + 1 == expected {
        let _ = tx.send(());
    }
}

/// Spawns racing shutdown, with threads that retire at once (keep-alive 0) or stay: a job
/// `spawn` accepted has run by the time `shutdown` returns true, a refused one never runs, and
/// no thread is left. Regression test for a spawn that passed its "shut down?" check just before
/// the shutdown and posted its job after the last worker had left (the job never ran).
#[test]
fn pool_spawn_racing_shutdown_runs_every_accepted_job() {
    for round in 0..CLOSE_ROUNDS {
        let keep_alive = if round % 2 == 0 {
            Duration::ZERO
        } else {
            Duration::from_secs(1)
        };
        let pool = Arc::new(Pool::new(2, keep_alive));
        let ran = Arc::new(AtomicUsize::new(0));
        let go = Arc::new(AtomicBool::new(false));
        let spawners: Vec<_> = (0..2)
            .map(|_| {
                let (pool, ran, go) = (Arc::clone(&pool), Arc::clone(&ran), Arc::clone(&go));
                thread::spawn(move || {
                    while !go.load(Ordering::SeqCst) {
                        std::hint::spin_loop();
                    }
                    let mut accepted = 0usize;
                    loop {
                        let ran = Arc::clone(&ran);
                        if !pool.spawn(Box::new(move || {
                            ran.fetch_add(1, Ordering::SeqCst);
                        })) {
                            return accepted;
                        }
                        accepted += 1;
                    }
                })
            })
            .collect();
        go.store(true, Ordering::SeqCst);
        thread::sleep(Duration::from_micros(round as u64 % 4 * 100));
        assert!(pool.shutdown(WATCHDOG));
        let ran_at_shutdown = ran.load(Ordering::SeqCst);
        let accepted: usize = join_all(spawners, "spawners").into_iter().sum();
        assert_eq!(
            ran_at_shutdown, accepted,
            "accepted jobs that had not run at shutdown"
        );
        assert_eq!(pool.stats().threads, 0);
    }
}
