//! A work-stealing thread pool on crossbeam-deque.
//!
//! ```text
//!   spawn() from outside ──► Injector (global FIFO) ──┐
//!   spawn() from a task  ──► the worker's own deque   ├─► worker: pop local, else take one job
//!                               (LIFO, stealable)      │   from the injector, else steal from a
//!                                                      ┘   sibling, else sleep (see `sleep`)
//! ```
//!
//! Threads are started on demand, when a job is posted and no worker is idle, up to `max_threads`,
//! and retire after `keep_alive` without work. That makes the pool safe for long blocking tasks
//! (a pipeline stage worker that waits on a channel for its whole life): a posted job never waits
//! for a blocked one unless `max_threads` are all busy. If the OS refuses the thread a job needs
//! (no idle worker to take it), [`Pool::try_spawn`] takes the job back and says so, rather than
//! leave it queued behind jobs that may wait for it. A panicking job is caught and reported on
//! stderr; its thread goes on.

use std::cell::RefCell;
use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crossbeam_deque::{Injector, Steal, Stealer, Worker};

use crate::gate::Gate;
use crate::sleep::{Posted, Sleep, Woken};
use crate::sync::lock;

/// A unit of work for the pool.
pub type Job = Box<dyn FnOnce() + Send + 'static>;

/// Why [`Pool::try_spawn`] did not take a job (the job is dropped, never run).
#[derive(Debug)]
pub enum SpawnError {
    /// The pool is shutting down.
    ShutDown,
    /// No worker was idle, and the OS refused a new thread.
    NoThread(io::Error),
}

// A job's claim, decided once: the thread that runs it, or `try_spawn` taking it back.
const QUEUED: u8 = 0;
const TAKEN: u8 = 1;
const REVOKED: u8 = 2;

/// A snapshot of the pool's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStats {
    /// Worker threads alive.
    pub threads: usize,
    /// Of those, how many wait for work.
    pub idle: usize,
    /// Jobs running now.
    pub running: usize,
}

struct Shared {
    injector: Injector<Job>,
    /// One slot per started thread; `None` once that thread exited.
    stealers: RwLock<Vec<Option<Stealer<Job>>>>,
    sleep: Sleep,
    /// Spawns in flight, and closed by `shutdown` (the channel's close gate, reused): a spawn
    /// that got past it finishes posting its job before shutdown lets the workers go, so a job
    /// `spawn` accepted always runs.
    spawning: Gate,
    keep_alive: Duration,
    /// Jobs running now (statistics only: Relaxed is enough, nothing is published through it).
    running: AtomicUsize,
    handles: Mutex<Vec<JoinHandle<()>>>,
    /// Set in a forked child: the pool must never be touched or dropped there.
    abandoned: AtomicBool,
    /// Tests: how many more thread starts fail (as when the OS is out of threads or memory).
    #[cfg(test)]
    failing_starts: AtomicUsize,
}

thread_local! {
    /// The pool this thread works for (by address) and its local deque.
    static LOCAL: RefCell<Option<(usize, Worker<Job>)>> = const { RefCell::new(None) };
}

/// A work-stealing pool. Dropping it starts shutdown without waiting; [`Pool::shutdown`] waits.
pub struct Pool {
    shared: Arc<Shared>,
}

impl Pool {
    /// A pool of at most `max_threads` threads that retire after `keep_alive` idle.
    pub fn new(max_threads: usize, keep_alive: Duration) -> Self {
        Pool {
            shared: Arc::new(Shared {
                injector: Injector::new(),
                stealers: RwLock::new(Vec::new()),
                sleep: Sleep::new(max_threads),
                spawning: Gate::new(),
                keep_alive,
                running: AtomicUsize::new(0),
                handles: Mutex::new(Vec::new()),
                abandoned: AtomicBool::new(false),
                #[cfg(test)]
                failing_starts: AtomicUsize::new(0),
            }),
        }
    }

    /// Runs `job` on the pool. From a task of this pool it goes to the worker's own deque.
    /// Returns false (and drops the job) if the pool is shutting down, or if the job needed a
    /// new thread and none could be started (see [`Pool::try_spawn`]).
    pub fn spawn(&self, job: Job) -> bool {
        self.try_spawn(job).is_ok()
    }

    /// [`Pool::spawn`], saying why a job was not taken. A job is taken back when no worker was
    /// idle and a new thread could not be started: left queued, it would wait for a running job
    /// to end, and a pipeline's jobs wait for each other (a stage worker for its input).
    pub fn try_spawn(&self, job: Job) -> Result<(), SpawnError> {
        if self.is_abandoned() || !self.shared.spawning.begin_send() {
            return Err(SpawnError::ShutDown);
        }
        let _in_flight = InFlight(&self.shared.spawning);
        let claim = Arc::new(AtomicU8::new(QUEUED));
        let job: Job = {
            let claim = Arc::clone(&claim);
            Box::new(move || {
                // Relaxed: the claim only picks one winner between this thread and a revoking
                // `try_spawn`; the job itself reached this thread through the deque, which
                // synchronizes. A revoked job is dropped here without running.
                if claim
                    .compare_exchange(QUEUED, TAKEN, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
                {
                    job();
                }
            })
        };
        let id = Arc::as_ptr(&self.shared) as usize;
        let job = LOCAL.with(|l| match &*l.borrow() {
            Some((pool, local)) if *pool == id => {
                local.push(job);
                None
            }
            _ => Some(job),
        });
        if let Some(job) = job {
            self.shared.injector.push(job);
        }
        if self.shared.sleep.job_posted() == Posted::Spawn {
            if let Err(e) = self.start_thread() {
                // Unless a worker that came free took it meanwhile, take it back.
                if claim
                    .compare_exchange(QUEUED, REVOKED, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
                {
                    return Err(SpawnError::NoThread(e));
                }
            }
        }
        Ok(())
    }

    fn start_thread(&self) -> io::Result<()> {
        let local = Worker::new_lifo();
        let slot = {
            let mut st = self
                .shared
                .stealers
                .write()
                .unwrap_or_else(|p| p.into_inner());
            match st.iter().position(Option::is_none) {
                Some(free) => {
                    st[free] = Some(local.stealer());
                    free
                }
                None => {
                    st.push(Some(local.stealer()));
                    st.len() - 1
                }
            }
        };
        let shared = Arc::clone(&self.shared);
        #[cfg(test)]
        let refused = self
            .shared
            .failing_starts
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok();
        #[cfg(not(test))]
        let refused = false;
        let started = if refused {
            Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                "refused by the test (as when the OS is out of threads)",
            ))
        } else {
            thread::Builder::new()
                .name(format!("pipeflow-pool-{slot}"))
                .spawn(move || worker_main(shared, local, slot))
        };
        let mut handles = lock(&self.shared.handles);
        handles.retain(|h| !h.is_finished());
        match started {
            Ok(h) => {
                handles.push(h);
                Ok(())
            }
            Err(e) => {
                self.shared
                    .stealers
                    .write()
                    .unwrap_or_else(|p| p.into_inner())[slot] = None;
                self.shared.sleep.spawn_failed();
                Err(e)
            }
        }
    }

    /// Counters: threads alive, idle, jobs running.
    pub fn stats(&self) -> PoolStats {
        if self.is_abandoned() {
            return PoolStats {
                threads: 0,
                idle: 0,
                running: 0,
            };
        }
        let c = self.shared.sleep.counts();
        PoolStats {
            threads: c.threads,
            idle: c.idle,
            running: self.shared.running.load(Ordering::Relaxed),
        }
    }

    /// Stops accepting jobs, lets the queued ones run, and waits up to `timeout` for every
    /// thread to exit. Returns true if all exited (and were joined).
    pub fn shutdown(&self, timeout: Duration) -> bool {
        if self.is_abandoned() {
            return true;
        }
        // Refuse new spawns, then wait out those already past the gate (a push and a short
        // critical section each): without this, a spawn that checked before the shutdown could
        // post its job after the last worker left, and the accepted job would never run.
        self.shared.spawning.close();
        while !self.shared.spawning.is_final() {
            thread::yield_now();
        }
        self.shared.sleep.shutdown();
        let all = self.shared.sleep.wait_all_exited(timeout);
        if all {
            let handles = std::mem::take(&mut *lock(&self.shared.handles));
            for h in handles {
                let _ = h.join();
            }
        }
        all
    }

    /// Forgets the pool without touching its state. For a child after `fork()`: the threads do
    /// not exist there and their locks may be held forever, so nothing may be joined or dropped.
    /// Later calls to `spawn` return false and dropping the pool does nothing.
    pub fn abandon(&self) {
        // Relaxed: only the thread that called abandon (the forked child's only thread) reads it.
        self.shared.abandoned.store(true, Ordering::Relaxed);
    }

    fn is_abandoned(&self) -> bool {
        self.shared.abandoned.load(Ordering::Relaxed)
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        if self.is_abandoned() {
            // Leak one reference so that `Shared` (its locks, join handles, queued jobs) is
            // never dropped in the child.
            std::mem::forget(Arc::clone(&self.shared));
        } else {
            self.shared.sleep.shutdown();
        }
    }
}

/// Ends a spawn's registration with the gate, also if the spawn unwinds.
struct InFlight<'a>(&'a Gate);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.end_send();
    }
}

fn worker_main(shared: Arc<Shared>, local: Worker<Job>, slot: usize) {
    let id = Arc::as_ptr(&shared) as usize;
    LOCAL.with(|l| *l.borrow_mut() = Some((id, local)));
    loop {
        let epoch = shared.sleep.epoch();
        if let Some(job) = find_job(&shared, slot) {
            shared.running.fetch_add(1, Ordering::Relaxed);
            if catch_unwind(AssertUnwindSafe(job)).is_err() {
                eprintln!("pipeflow: a pool job panicked; the pool goes on");
            }
            shared.running.fetch_sub(1, Ordering::Relaxed);
            continue;
        }
        if shared.sleep.sleep(epoch, shared.keep_alive) == Woken::Exit {
            break;
        }
    }
    shared.stealers.write().unwrap_or_else(|p| p.into_inner())[slot] = None;
    LOCAL.with(|l| *l.borrow_mut() = None);
}

fn find_job(shared: &Shared, slot: usize) -> Option<Job> {
    let local_job = LOCAL.with(|l| l.borrow().as_ref().and_then(|(_, w)| w.pop()));
    if local_job.is_some() {
        return local_job;
    }
    // One job at a time from the injector, never a batch: a batch steal moves the other jobs
    // into this thread's deque, out of sight of threads searching at that instant (between the
    // injector's head moving and the deque's back being published; a preemption there makes the
    // instant long). Such a searcher sleeps, and if this thread then blocks in its job (a
    // pipeline's feeder or stage worker blocks for the whole run), the jobs it holds never
    // start: the run waits forever for a stage that has no worker.
    loop {
        match shared.injector.steal() {
            Steal::Success(job) => return Some(job),
            Steal::Retry => continue,
            Steal::Empty => break,
        }
    }
    let stealers = shared.stealers.read().unwrap_or_else(|p| p.into_inner());
    let n = stealers.len();
    loop {
        let mut retry = false;
        for k in 1..=n {
            if let Some(s) = &stealers[(slot + k) % n] {
                match s.steal() {
                    Steal::Success(job) => return Some(job),
                    Steal::Retry => retry = true,
                    Steal::Empty => {}
                }
            }
        }
        if !retry {
            return None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;
    use std::sync::mpsc;

    #[test]
    fn runs_every_job_once() {
        let pool = Pool::new(4, Duration::from_secs(1));
        let sum = Arc::new(AtomicU64::new(0));
        let (tx, rx) = mpsc::channel();
        for i in 1..=1000u64 {
            let (sum, tx) = (Arc::clone(&sum), tx.clone());
            assert!(pool.spawn(Box::new(move || {
                sum.fetch_add(i, Ordering::SeqCst);
                tx.send(()).unwrap();
            })));
        }
        for _ in 0..1000 {
            rx.recv().unwrap();
        }
        assert_eq!(sum.load(Ordering::SeqCst), 500_500);
        assert!(pool.stats().threads <= 4);
        assert!(pool.shutdown(Duration::from_secs(5)));
        assert_eq!(pool.stats().threads, 0);
    }

    #[test]
    fn blocked_tasks_do_not_starve_later_ones() {
        // Each task waits for the next one to start: needs as many threads as tasks.
        let pool = Arc::new(Pool::new(64, Duration::from_secs(1)));
        let n = 16;
        let chans: Vec<_> = (0..=n).map(|_| mpsc::channel::<()>()).collect();
        let (txs, rxs): (Vec<_>, Vec<_>) = chans.into_iter().unzip();
        let mut rxs = rxs.into_iter();
        let first = rxs.next().unwrap();
        for (i, rx) in rxs.enumerate() {
            let tx = txs[i].clone();
            pool.spawn(Box::new(move || {
                tx.send(()).unwrap();
                rx.recv().unwrap();
            }));
        }
        first.recv().unwrap();
        txs[n].send(()).unwrap();
        assert!(pool.shutdown(Duration::from_secs(5)));
    }

    #[test]
    fn jobs_posted_together_all_start_while_the_first_ones_block() {
        // A pipeline's tasks (feeder, stage workers) are posted together and each blocks for the
        // whole run: every one must start, also when idle threads wake and search at once. A
        // thread that took several jobs from the injector in one steal would hold the others in
        // its own deque, out of sight of the threads searching meanwhile, while it blocks in the
        // first: those would never start.
        let pool = Pool::new(64, Duration::from_secs(10));
        let k = 6;
        // Busy threads on every core, so that the pool's threads are preempted anywhere,
        // also in the middle of taking a job.
        let spin = Arc::new(AtomicBool::new(true));
        let spinners: Vec<_> = (0..4)
            .map(|_| {
                let spin = Arc::clone(&spin);
                thread::spawn(move || {
                    while spin.load(Ordering::Relaxed) {
                        std::hint::spin_loop();
                    }
                })
            })
            .collect();
        for round in 0..2000 {
            let (started_tx, started_rx) = mpsc::channel::<()>();
            let (release_tx, release_rx) = mpsc::channel::<()>();
            let release_rx = Arc::new(Mutex::new(release_rx));
            for _ in 0..k {
                let (started, release) = (started_tx.clone(), Arc::clone(&release_rx));
                assert!(pool.spawn(Box::new(move || {
                    started.send(()).unwrap();
                    // Blocks until released (a timeout only so that a failure cannot hang).
                    let _ = lock(&release).recv_timeout(Duration::from_secs(5));
                })));
            }
            for i in 0..k {
                assert!(
                    started_rx.recv_timeout(Duration::from_secs(2)).is_ok(),
                    "round {round}: only {i} of {k} jobs started"
                );
            }
            for _ in 0..k {
                release_tx.send(()).unwrap();
            }
        }
        spin.store(false, Ordering::Relaxed);
        for s in spinners {
            s.join().unwrap();
        }
        assert!(pool.shutdown(Duration::from_secs(10)));
    }

    #[test]
    fn nested_spawns_go_local_and_are_stolen() {
        let pool = Arc::new(Pool::new(4, Duration::from_secs(1)));
        let (tx, rx) = mpsc::channel();
        let p2 = Arc::clone(&pool);
        pool.spawn(Box::new(move || {
            for i in 0..100 {
                let tx = tx.clone();
                p2.spawn(Box::new(move || tx.send(i).unwrap()));
            }
        }));
        let mut got: Vec<i32> = (0..100).map(|_| rx.recv().unwrap()).collect();
        got.sort();
        assert_eq!(got, (0..100).collect::<Vec<_>>());
        assert!(pool.shutdown(Duration::from_secs(5)));
    }

    #[test]
    fn idle_threads_retire_after_keep_alive() {
        let pool = Pool::new(4, Duration::from_millis(20));
        let (tx, rx) = mpsc::channel();
        pool.spawn(Box::new(move || tx.send(()).unwrap()));
        rx.recv().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while pool.stats().threads > 0 && std::time::Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(pool.stats().threads, 0);
        // And the pool starts a thread again when work comes.
        let (tx, rx) = mpsc::channel();
        pool.spawn(Box::new(move || tx.send(()).unwrap()));
        rx.recv().unwrap();
    }

    #[test]
    fn a_panicking_job_does_not_kill_the_pool() {
        let pool = Pool::new(1, Duration::from_secs(1));
        pool.spawn(Box::new(|| panic!("boom (expected by this test)")));
        let (tx, rx) = mpsc::channel();
        pool.spawn(Box::new(move || tx.send(1).unwrap()));
        assert_eq!(rx.recv().unwrap(), 1);
    }

    #[test]
    fn a_job_that_gets_no_thread_is_taken_back_not_left_queued() {
        let pool = Pool::new(4, Duration::from_secs(1));
        let (hold_tx, hold_rx) = mpsc::channel::<()>();
        let (started_tx, started_rx) = mpsc::channel();
        // One worker, busy until told: the next job needs a new thread.
        assert!(pool.spawn(Box::new(move || {
            started_tx.send(()).unwrap();
            hold_rx.recv().unwrap();
        })));
        started_rx.recv().unwrap();
        pool.shared.failing_starts.store(1, Ordering::Relaxed);
        let ran = Arc::new(AtomicBool::new(false));
        let ran2 = Arc::clone(&ran);
        let refused = pool.try_spawn(Box::new(move || ran2.store(true, Ordering::SeqCst)));
        assert!(matches!(refused, Err(SpawnError::NoThread(_))));
        // The busy worker comes free: the job it might find in the queue must not run.
        hold_tx.send(()).unwrap();
        let (tx, rx) = mpsc::channel();
        assert!(pool
            .try_spawn(Box::new(move || tx.send(()).unwrap()))
            .is_ok());
        rx.recv().unwrap();
        assert!(pool.shutdown(Duration::from_secs(5)));
        assert!(!ran.load(Ordering::SeqCst));
        assert_eq!(pool.stats().threads, 0);
    }

    #[test]
    fn shutdown_refuses_new_jobs() {
        let pool = Pool::new(2, Duration::from_secs(1));
        assert!(pool.shutdown(Duration::from_secs(1)));
        assert!(!pool.spawn(Box::new(|| {})));
    }
}
