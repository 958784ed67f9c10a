//! Loom model checks of the core's own protocols: the close gate of a channel (`gate`) and the
//! sleep/wake protocol of the pool (`sleep`), each driven the way `channel.rs` / `pool.rs` drive
//! them, with mock buffers and queues in place of crossbeam's.
//!
//! Run with `make test-loom`, i.e.
//! `RUSTFLAGS="--cfg loom" cargo test -p pipeflow-core --test loom --release --target-dir target/loom`.
//! Each model explores every interleaving (and every weak-memory outcome loom models) up to its
//! preemption bound.
#![cfg(loom)]

use std::collections::VecDeque;
use std::time::Duration;

use loom::model::Builder;
use loom::sync::atomic::{AtomicU32, Ordering};
use loom::sync::{Arc, Mutex};
use loom::thread::{self, JoinHandle};

use pipeflow_core::gate::Gate;
use pipeflow_core::sleep::{Posted, Sleep, Woken};

/// Runs `f` under loom with at most `preemptions` preemptions per execution (None: exhaustive).
/// The bounds keep `make test-loom` well under a minute; most bugs need only two or three
/// preemptions to show (loom's docs), and every model here fails at its bound when the protocol
/// it checks is broken (checked by hand by weakening orderings or removing steps).
fn check<F>(preemptions: Option<usize>, f: F)
where
    F: Fn() + Sync + Send + 'static,
{
    let mut b = Builder::new();
    b.preemption_bound = preemptions;
    b.check(f);
}

// ------------------------------------------------------------------------------------------------
// The close gate
// ------------------------------------------------------------------------------------------------

/// What a mock receive returned.
#[derive(Debug, PartialEq, Eq)]
enum Recv {
    Value(u32),
    Empty,
    Closed,
}

/// A buffer the gate can be put in front of.
trait Buffer: Send + Sync + 'static {
    fn push(&self, sender: usize, v: u32);
    fn pop(&self) -> Option<u32>;
}

/// A channel as `channel.rs` builds it: a gate in front of a buffer that has no close of its own.
struct MockChannel<B> {
    gate: Gate,
    buf: B,
}

impl<B: Buffer> MockChannel<B> {
    /// `Channel::send`: a send that finds the gate closed fails and hands its value back.
    fn send(&self, sender: usize, v: u32) -> Result<(), u32> {
        if !self.gate.begin_send() {
            return Err(v);
        }
        self.buf.push(sender, v);
        self.gate.end_send();
        Ok(())
    }

    /// `Channel::try_recv`: empty buffer, then "closed with nobody in flight", then one more look.
    fn try_recv(&self) -> Recv {
        if let Some(v) = self.buf.pop() {
            return Recv::Value(v);
        }
        if self.gate.is_final() {
            return match self.buf.pop() {
                Some(v) => Recv::Value(v),
                None => Recv::Closed,
            };
        }
        Recv::Empty
    }

    /// `Channel::recv` without blocking: spin (yielding to loom) until closed and drained.
    fn drain(&self) -> Vec<u32> {
        let mut got = Vec::new();
        loop {
            match self.try_recv() {
                Recv::Value(v) => got.push(v),
                Recv::Closed => return got,
                Recv::Empty => thread::yield_now(),
            }
        }
    }
}

/// The mock buffer of the brief: a loom mutex around a deque (linearizable, like crossbeam's).
#[derive(Default)]
struct LockedBuf(Mutex<VecDeque<u32>>);

impl Buffer for LockedBuf {
    fn push(&self, _sender: usize, v: u32) {
        self.0.lock().unwrap().push_back(v);
    }
    fn pop(&self) -> Option<u32> {
        self.0.lock().unwrap().pop_front()
    }
}

/// A buffer with no synchronization of its own: one slot per sender (or per job), written and
/// read with Relaxed atomics (0 = empty). The only happens-before edge from a push to a later look
/// is then the protocol's own (the gate's Release `end_send` / Acquire `is_final`, the sleep
/// epoch's Release store / Acquire load), so this checks those orderings, which the mutex of
/// `LockedBuf` would paper over. (Weakening either to Relaxed makes the models that use this
/// buffer fail: checked by hand.)
struct RelaxedSlots([AtomicU32; 2]);

impl RelaxedSlots {
    fn new() -> Self {
        RelaxedSlots([AtomicU32::new(0), AtomicU32::new(0)])
    }
}

impl Buffer for RelaxedSlots {
    fn push(&self, sender: usize, v: u32) {
        self.0[sender].store(v, Ordering::Relaxed);
    }
    fn pop(&self) -> Option<u32> {
        for slot in &self.0 {
            // A plain load may see a stale 0 (that is the point); the CAS only claims the value
            // against another taker.
            let v = slot.load(Ordering::Relaxed);
            if v != 0
                && slot
                    .compare_exchange(v, 0, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
            {
                return Some(v);
            }
        }
        None
    }
}

/// Sender `id` sends `values` in order; returns those accepted. A refused value comes back
/// unchanged, and once one is refused every later one is too (the gate stays closed).
fn sender<B: Buffer>(ch: Arc<MockChannel<B>>, id: usize, values: Vec<u32>) -> JoinHandle<Vec<u32>> {
    thread::spawn(move || {
        let mut accepted = Vec::new();
        let mut refused = false;
        for v in values {
            match ch.send(id, v) {
                Ok(()) => {
                    assert!(
                        !refused,
                        "a send succeeded after one failed on a closed gate"
                    );
                    accepted.push(v);
                }
                Err(back) => {
                    assert_eq!(back, v, "a failed send must hand its value back");
                    refused = true;
                }
            }
        }
        accepted
    })
}

/// Senders (one value list each), one closer, and the receiver on the model's main thread.
/// Every accepted value is received exactly once, nothing else is, and the receiver ends only
/// after the close.
fn gate_model<B: Buffer>(buf: B, per_sender: &[&[u32]]) {
    let ch = Arc::new(MockChannel {
        gate: Gate::new(),
        buf,
    });
    let senders: Vec<_> = per_sender
        .iter()
        .enumerate()
        .map(|(id, vs)| sender(Arc::clone(&ch), id, vs.to_vec()))
        .collect();
    let closer = {
        let ch = Arc::clone(&ch);
        thread::spawn(move || assert!(ch.gate.close(), "the only close() must be the first"))
    };

    let mut got = ch.drain();
    // The receiver only ends on "closed, none in flight": close must have happened.
    assert!(ch.gate.is_closed());

    let mut accepted: Vec<u32> = senders
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    closer.join().unwrap();
    assert!(
        !ch.gate.close(),
        "a second close() reports the gate closed already"
    );
    // Once final, the gate stays so: later sends fail and nothing more shows up.
    assert_eq!(ch.send(0, 99), Err(99));
    assert_eq!(ch.try_recv(), Recv::Closed);

    got.sort_unstable();
    accepted.sort_unstable();
    assert_eq!(got, accepted, "received != accepted");
}

#[test]
fn gate_one_sender_two_values() {
    check(Some(3), || gate_model(LockedBuf::default(), &[&[1, 2]]));
}

#[test]
fn gate_two_senders() {
    check(Some(2), || gate_model(LockedBuf::default(), &[&[1], &[2]]));
}

#[test]
fn gate_orders_a_buffer_without_synchronization() {
    check(Some(2), || gate_model(RelaxedSlots::new(), &[&[1], &[2]]));
}

#[test]
fn gate_second_receiver_takes_some() {
    // A second receiver that looks twice without waiting (`try_recv`) races the draining one:
    // together they get every accepted value once, and Closed comes only after close().
    check(Some(2), || {
        let ch = Arc::new(MockChannel {
            gate: Gate::new(),
            buf: LockedBuf::default(),
        });
        let s = sender(Arc::clone(&ch), 0, vec![1, 2]);
        let other = {
            let ch = Arc::clone(&ch);
            thread::spawn(move || {
                let mut got = Vec::new();
                for _ in 0..2 {
                    match ch.try_recv() {
                        Recv::Value(v) => got.push(v),
                        Recv::Empty => {}
                        Recv::Closed => assert!(ch.gate.is_closed()),
                    }
                }
                got
            })
        };
        assert!(ch.gate.close());
        let mut got = ch.drain();
        got.extend(other.join().unwrap());
        let mut accepted = s.join().unwrap();
        got.sort_unstable();
        accepted.sort_unstable();
        assert_eq!(got, accepted);
    });
}

// ------------------------------------------------------------------------------------------------
// The sleep/wake protocol
// ------------------------------------------------------------------------------------------------

/// Longer than any model runs: under loom a non-zero timed wait is a plain wait (see `sync.rs`).
const FOREVER: Duration = Duration::from_secs(3600);

/// A pool reduced to its protocol: a mock job queue, the sleep state, and the spawn gate, driven
/// like `pool.rs` drives them. Jobs are numbered from 1 (job `j` goes to slot `j - 1` of a
/// `RelaxedSlots` queue).
struct MockPool<Q> {
    sleep: Sleep,
    /// The job queue (stands for the injector and the deques).
    queue: Q,
    /// Jobs taken by workers.
    taken: Mutex<Vec<u32>>,
    /// Worker threads started (joined by `shutdown`).
    workers: Mutex<Vec<JoinHandle<()>>>,
    /// `Pool::spawning`: spawns in flight, closed by shutdown.
    spawning: Gate,
    keep_alive: Duration,
    max_threads: usize,
}

impl<Q: Buffer> MockPool<Q> {
    fn new(queue: Q, max_threads: usize, keep_alive: Duration) -> Arc<Self> {
        Arc::new(MockPool {
            sleep: Sleep::new(max_threads),
            queue,
            taken: Mutex::new(Vec::new()),
            workers: Mutex::new(Vec::new()),
            spawning: Gate::new(),
            keep_alive,
            max_threads,
        })
    }

    /// The core of `Pool::spawn`: make the job visible, then post it; start a worker if asked.
    fn post(this: &Arc<Self>, job: u32) {
        this.queue.push(job as usize - 1, job);
        if this.sleep.job_posted() == Posted::Spawn {
            assert!(this.sleep.counts().threads <= this.max_threads);
            let me = Arc::clone(this);
            let h = thread::spawn(move || me.worker());
            this.workers.lock().unwrap().push(h);
        }
    }

    /// `Pool::spawn` with its gate: returns whether the job was accepted.
    fn spawn(this: &Arc<Self>, job: u32) -> bool {
        if !this.spawning.begin_send() {
            return false;
        }
        Self::post(this, job);
        this.spawning.end_send();
        true
    }

    /// `Pool::shutdown`: close the gate, wait out spawns in flight, shut the sleep state down,
    /// wait for every worker to exit (loom reports a deadlock if one never does), join them.
    fn shutdown(&self) {
        self.spawning.close();
        while !self.spawning.is_final() {
            thread::yield_now();
        }
        self.sleep.shutdown();
        assert!(self.sleep.wait_all_exited(FOREVER));
        let handles = std::mem::take(&mut *self.workers.lock().unwrap());
        for h in handles {
            h.join().unwrap();
        }
        let c = self.sleep.counts();
        assert_eq!((c.threads, c.idle), (0, 0));
    }

    /// `worker_main`: read the epoch, search, sleep if nothing was found.
    fn worker(&self) {
        // (No other lock in this loop: one would add happens-before edges the pool does not have.)
        loop {
            let epoch = self.sleep.epoch();
            if let Some(job) = self.queue.pop() {
                self.taken.lock().unwrap().push(job);
                continue;
            }
            if self.sleep.sleep(epoch, self.keep_alive) == Woken::Exit {
                return;
            }
        }
    }

    fn check_taken(&self, expected: &[u32]) {
        let mut taken = self.taken.lock().unwrap().clone();
        taken.sort_unstable();
        assert_eq!(taken, expected, "every posted job is taken exactly once");
        assert_eq!(self.queue.pop(), None);
    }
}

/// One worker (started by the first job), one more job posted from another thread while the
/// worker searches or sleeps. No lost wakeup: the second job is taken. Idle workers never retire
/// here (keep-alive "forever"), so the only way out is shutdown, which must also wake the sleeper.
fn no_lost_wakeup<Q: Buffer>(queue: Q) {
    let pool = MockPool::new(queue, 1, FOREVER);
    MockPool::post(&pool, 1);
    let submitter = {
        let pool = Arc::clone(&pool);
        thread::spawn(move || MockPool::post(&pool, 2))
    };
    submitter.join().unwrap();
    pool.shutdown();
    pool.check_taken(&[1, 2]);
}

#[test]
fn sleep_no_lost_wakeup() {
    check(None, || no_lost_wakeup(LockedBuf::default()));
}

/// The same with a queue that does not synchronize: a worker that reads the bumped epoch must see
/// the job pushed before the bump (Acquire/Release on the epoch).
#[test]
fn sleep_epoch_orders_a_queue_without_synchronization() {
    check(None, || no_lost_wakeup(RelaxedSlots::new()));
}

/// Two jobs posted concurrently (one from the main thread) into a pool of up to two workers that
/// has none yet: every job is taken once, and wake tokens and spawns add up (one or two workers
/// get started, never more).
#[test]
fn sleep_two_submitters_two_workers() {
    check(Some(2), || {
        let pool = MockPool::new(LockedBuf::default(), 2, FOREVER);
        let submitter = {
            let pool = Arc::clone(&pool);
            thread::spawn(move || MockPool::post(&pool, 1))
        };
        MockPool::post(&pool, 2);
        submitter.join().unwrap();
        let started = pool.workers.lock().unwrap().len();
        assert!((1..=2).contains(&started));
        pool.shutdown();
        pool.check_taken(&[1, 2]);
    });
}

/// Keep-alive zero: a worker that finds nothing may retire at any moment (the timeout path of
/// `Sleep::sleep`), racing with a job being posted. The job is still taken: either the worker
/// gets a wake token before it retires, or the submitter sees no idle worker and starts a new one.
#[test]
fn sleep_retiring_worker_does_not_strand_a_job() {
    check(None, || {
        let pool = MockPool::new(LockedBuf::default(), 1, Duration::ZERO);
        MockPool::post(&pool, 1);
        let submitter = {
            let pool = Arc::clone(&pool);
            thread::spawn(move || MockPool::post(&pool, 2))
        };
        submitter.join().unwrap();
        // No shutdown yet: every worker retires on its own, and by then both jobs are taken.
        assert!(pool.sleep.wait_all_exited(FOREVER));
        pool.check_taken(&[1, 2]);
        pool.shutdown();
    });
}

/// Shutdown racing with a worker that is running, searching or asleep: the worker exits (else
/// `wait_all_exited` waits forever and loom reports a deadlock), after taking the job posted
/// before the shutdown.
#[test]
fn sleep_shutdown_wakes_a_sleeping_worker() {
    check(None, || {
        let pool = MockPool::new(LockedBuf::default(), 1, FOREVER);
        MockPool::post(&pool, 1);
        pool.shutdown();
        pool.check_taken(&[1]);
    });
}

/// `Pool::spawn` racing with `Pool::shutdown` (spawn gate + sleep state): a job the spawn
/// accepted is always taken before shutdown finishes, whether the worker retires, sleeps, or has
/// to be started; a refused job is never queued. (Without the gate, i.e. with a plain "is the
/// pool shut down?" check before the push, this model fails: the job is posted after the last
/// worker left.)
#[test]
fn pool_spawn_racing_shutdown_runs_every_accepted_job() {
    check(Some(4), || {
        let pool = MockPool::new(LockedBuf::default(), 1, Duration::ZERO);
        assert!(MockPool::spawn(&pool, 1));
        let spawner = {
            let pool = Arc::clone(&pool);
            thread::spawn(move || MockPool::spawn(&pool, 2))
        };
        pool.shutdown();
        let accepted = spawner.join().unwrap();
        pool.check_taken(if accepted { &[1, 2] } else { &[1] });
        assert!(!MockPool::spawn(&pool, 3));
    });
}
