//! The sleep/wake protocol of the pool: how idle workers wait without burning CPU, how a
//! submitter wakes one, and when the pool starts a thread or lets one retire.
//!
//! A submitter first makes its job visible (pushes it onto a deque), then calls
//! [`Sleep::job_posted`]. A worker that found nothing calls [`Sleep::sleep`] with the epoch it read
//! *before* it searched. The state lives under one mutex:
//!
//! ```text
//!   threads   workers alive (counted from the moment a spawn is decided)
//!   idle      workers waiting on the condvar
//!   wakeups   wake tokens handed out and not yet taken (wakeups <= idle)
//!   epoch     bumped by every job_posted
//!   shutdown  no more sleeping: idle workers exit once the queues are empty
//! ```
//!
//! No job is stranded: `job_posted` bumps `epoch` under the lock after the push. A worker whose
//! search missed the job either read the epoch before that bump (then under the lock it sees a
//! different epoch and searches again) or was already waiting (then `idle > wakeups` held and the
//! submitter gave it a token, or every idle worker already holds a token and will search). If no
//! worker is idle and fewer than `max_threads` exist, the submitter starts a new one, which is why
//! a blocked long-running task never starves the queue. The loom model in `tests/loom.rs` checks
//! the no-lost-wakeup property.

use std::time::Duration;

use crate::sync::{lock, wait_timeout, AtomicU64, Condvar, Mutex, Ordering};

#[derive(Debug, Default)]
struct State {
    threads: usize,
    idle: usize,
    wakeups: usize,
    shutdown: bool,
}

/// What a submitter must do after [`Sleep::job_posted`].
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Posted {
    /// An idle worker was woken, or every thread is busy at the limit: nothing to do.
    Done,
    /// Start one more worker thread (already counted in `threads`).
    Spawn,
}

/// What a worker does after [`Sleep::sleep`].
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Woken {
    /// Search for work again.
    Search,
    /// Leave the worker loop: idle past the keep-alive, or the pool is shutting down.
    Exit,
}

/// Counters read by [`Sleep::counts`].
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub struct Counts {
    /// Worker threads alive.
    pub threads: usize,
    /// Of those, how many wait for work.
    pub idle: usize,
}

/// The pool's sleep state: see the module docs.
#[derive(Debug)]
pub struct Sleep {
    state: Mutex<State>,
    /// Signalled with a wake token, or on shutdown.
    work: Condvar,
    /// Signalled when a worker exits (for a shutdown that waits).
    exited: Condvar,
    /// Bumped (under `state`'s lock) by every `job_posted`; read without the lock before a search.
    epoch: AtomicU64,
    max_threads: usize,
}

impl Sleep {
    /// Sleep state for a pool of at most `max_threads` threads (at least 1).
    pub fn new(max_threads: usize) -> Self {
        Sleep {
            state: Mutex::new(State::default()),
            work: Condvar::new(),
            exited: Condvar::new(),
            epoch: AtomicU64::new(0),
            max_threads: max_threads.max(1),
        }
    }

    /// The epoch to pass to [`Sleep::sleep`]; read it before searching for work.
    pub fn epoch(&self) -> u64 {
        // Acquire: pairs with the Release store in `job_posted`; reading a bumped epoch means the
        // push that preceded the bump is visible to the search that follows.
        self.epoch.load(Ordering::Acquire)
    }

    /// Called after a job was made visible. Wakes an idle worker or asks for a new thread.
    pub fn job_posted(&self) -> Posted {
        let mut st = lock(&self.state);
        // Release: see `epoch`. The store is under the lock, so bumps never race each other.
        let e = self.epoch.load(Ordering::Relaxed);
        self.epoch.store(e.wrapping_add(1), Ordering::Release);
        if st.idle > st.wakeups {
            st.wakeups += 1;
            self.work.notify_one();
            Posted::Done
        } else if st.threads < self.max_threads && !st.shutdown {
            st.threads += 1;
            Posted::Spawn
        } else {
            Posted::Done
        }
    }

    /// Undoes the count of a thread that [`Posted::Spawn`] asked for but could not be started.
    pub fn spawn_failed(&self) {
        let mut st = lock(&self.state);
        st.threads -= 1;
        self.exited.notify_all();
    }

    /// Waits for work. `seen_epoch` is what [`Sleep::epoch`] returned before the failed search.
    /// Returns `Exit` after `keep_alive` with no work, or at shutdown; the thread then no longer
    /// counts as alive.
    pub fn sleep(&self, seen_epoch: u64, keep_alive: Duration) -> Woken {
        let mut st = lock(&self.state);
        if self.epoch.load(Ordering::Relaxed) != seen_epoch {
            return Woken::Search;
        }
        if st.shutdown {
            return self.exit(st);
        }
        st.idle += 1;
        loop {
            // Through the shim: under loom a zero keep-alive times out at once (see `sync`).
            let (g, timeout) = wait_timeout(&self.work, &self.state, st, keep_alive);
            st = g;
            if st.wakeups > 0 {
                st.wakeups -= 1;
                st.idle -= 1;
                return Woken::Search;
            }
            if st.shutdown || timeout {
                st.idle -= 1;
                return self.exit(st);
            }
        }
    }

    fn exit(&self, mut st: crate::sync::MutexGuard<'_, State>) -> Woken {
        st.threads -= 1;
        self.exited.notify_all();
        Woken::Exit
    }

    /// Starts shutdown: idle workers exit, busy ones exit once they find no more work.
    pub fn shutdown(&self) {
        let mut st = lock(&self.state);
        st.shutdown = true;
        self.work.notify_all();
    }

    /// Waits until no worker is alive, or `timeout` passes. Returns true if none is alive.
    pub fn wait_all_exited(&self, timeout: Duration) -> bool {
        let mut st = lock(&self.state);
        let mut left = timeout;
        while st.threads > 0 {
            let started = std::time::Instant::now();
            st = wait_timeout(&self.exited, &self.state, st, left).0;
            let spent = started.elapsed();
            if spent >= left {
                return st.threads == 0;
            }
            left -= spent;
        }
        true
    }

    /// Threads alive and idle now.
    pub fn counts(&self) -> Counts {
        let st = lock(&self.state);
        Counts {
            threads: st.threads,
            idle: st.idle,
        }
    }
}
