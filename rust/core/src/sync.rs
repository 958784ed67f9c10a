//! The synchronization primitives the core's own protocols use: std's normally, loom's under
//! `--cfg loom`, so that the same code is model-checked (the shim idea of crossbeam-epoch's
//! `primitive` module).

use std::time::Duration;

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
#[cfg(loom)]
pub(crate) use loom::sync::{Condvar, Mutex, MutexGuard};

#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::{Condvar, Mutex, MutexGuard};

/// Locks a mutex, ignoring poisoning: every critical section in the core leaves the state
/// consistent before anything in it can panic, so a poisoned lock holds valid data.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// Waits on `cv` for at most `dur`, ignoring poisoning. Returns the guard and whether the wait
/// timed out. `m` must be the mutex `guard` locks (the loom version re-locks it).
#[cfg(not(loom))]
pub(crate) fn wait_timeout<'a, T>(
    cv: &Condvar,
    _m: &'a Mutex<T>,
    guard: MutexGuard<'a, T>,
    dur: Duration,
) -> (MutexGuard<'a, T>, bool) {
    match cv.wait_timeout(guard, dur) {
        Ok((g, t)) => (g, t.timed_out()),
        Err(p) => {
            let (g, t) = p.into_inner();
            (g, t.timed_out())
        }
    }
}

/// Loom 0.7's `Condvar::wait_timeout` never times out (it is `wait`), which would leave the
/// timeout paths unchecked. This models the two extremes instead: a zero `dur` times out at once,
/// as std's does (unlock, re-lock, report a timeout; loom explores every interleaving at the
/// re-lock, so a notification may land before it), and any other `dur` is "forever" (a plain
/// wait). Only the model checker sees this; the std build above is unchanged.
#[cfg(loom)]
pub(crate) fn wait_timeout<'a, T>(
    cv: &Condvar,
    m: &'a Mutex<T>,
    guard: MutexGuard<'a, T>,
    dur: Duration,
) -> (MutexGuard<'a, T>, bool) {
    if dur.is_zero() {
        drop(guard);
        (lock(m), true)
    } else {
        match cv.wait(guard) {
            Ok(g) => (g, false),
            Err(p) => (p.into_inner(), false),
        }
    }
}
