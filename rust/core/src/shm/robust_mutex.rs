//! A robust, process-shared mutex: a `pthread_mutex_t` in shared memory
//! (`PTHREAD_PROCESS_SHARED`, `PTHREAD_MUTEX_ROBUST`) that any process mapping it may lock.
//!
//! Invariants:
//!
//! - The mutex is initialised once, by the creator of the memory, before the memory is shared
//!   ([`RobustMutex::init`]); it is only ever used through this type afterwards.
//! - It is held exactly while a [`MutexGuard`] lives; dropping the guard unlocks it.
//! - A process killed while holding it cannot wedge the others: the kernel hands the mutex to
//!   the next locker with `EOWNERDEAD` ([`Acquired::OwnerDied`]). That locker must make the
//!   guarded state consistent again, then call [`MutexGuard::mark_consistent`] before it unlocks;
//!   a guard dropped without it leaves the mutex unrecoverable (every later lock fails).
//! - A lock waits at most its timeout, so that a holder that is alive but stopped (a process
//!   suspended for a long time) makes the callers fall back instead of hanging.

use std::cell::UnsafeCell;
use std::io;
use std::marker::PhantomData;

/// A robust process-shared mutex, laid out as a bare `pthread_mutex_t` in shared memory.
#[repr(transparent)]
pub(crate) struct RobustMutex(UnsafeCell<libc::pthread_mutex_t>);

// SAFETY: a pthread mutex is made to be locked and unlocked by many threads (and, being
// process-shared, processes) at once; this type touches it only through the pthread calls.
unsafe impl Sync for RobustMutex {}

/// How a lock was acquired.
pub(crate) enum Acquired<'a> {
    /// The mutex was free, or its holder unlocked it: the guarded state is consistent.
    Clean(MutexGuard<'a>),
    /// Its holder died holding it: repair the guarded state, then
    /// [`MutexGuard::mark_consistent`].
    OwnerDied(MutexGuard<'a>),
}

/// The mutex held. Unlocks on drop, in the thread that locked it (it is not `Send`: a pthread
/// mutex is unlocked by its owner only).
pub(crate) struct MutexGuard<'a> {
    mutex: &'a RobustMutex,
    _not_send: PhantomData<*const ()>,
}

impl RobustMutex {
    /// Initialises the mutex, robust and process-shared.
    ///
    /// # Safety
    /// The mutex lies in memory that nothing else uses yet (fresh, not yet shared), and it is
    /// initialised once.
    pub(crate) unsafe fn init(&self) -> io::Result<()> {
        // SAFETY: the attribute is a local, initialised by `pthread_mutexattr_init` before use;
        // the mutex is not in use by anyone (the caller's contract).
        unsafe {
            let mut attr: libc::pthread_mutexattr_t = std::mem::zeroed();
            let mut rc = libc::pthread_mutexattr_init(&mut attr);
            rc |= libc::pthread_mutexattr_setpshared(&mut attr, libc::PTHREAD_PROCESS_SHARED);
            rc |= libc::pthread_mutexattr_setrobust(&mut attr, libc::PTHREAD_MUTEX_ROBUST);
            rc |= libc::pthread_mutex_init(self.0.get(), &attr);
            libc::pthread_mutexattr_destroy(&mut attr);
            if rc != 0 {
                return Err(io::Error::other("could not initialise the arena's mutex"));
            }
        }
        Ok(())
    }

    /// Takes the mutex, waiting at most `timeout_ns` nanoseconds (`None` then, as for any other
    /// failure: the caller falls back).
    pub(crate) fn lock(&self, timeout_ns: i64) -> Option<Acquired<'_>> {
        // SAFETY: `ts` is a plain C struct, filled by clock_gettime.
        let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
        // SAFETY: clock_gettime writes into `ts`, which lives for the call.
        unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
        let ns = ts.tv_nsec as i64 + timeout_ns;
        ts.tv_sec += (ns / 1_000_000_000) as libc::time_t;
        ts.tv_nsec = (ns % 1_000_000_000) as _;
        // SAFETY: the mutex was initialised by `init` (robust, process-shared) and lives in the
        // mapping for as long as `self`.
        let rc = unsafe { libc::pthread_mutex_timedlock(self.0.get(), &ts) };
        match rc {
            0 => Some(Acquired::Clean(self.held())),
            libc::EOWNERDEAD => Some(Acquired::OwnerDied(self.held())),
            _ => None,
        }
    }

    fn held(&self) -> MutexGuard<'_> {
        MutexGuard {
            mutex: self,
            _not_send: PhantomData,
        }
    }
}

impl MutexGuard<'_> {
    /// Marks the mutex consistent again, after its previous holder died: call it once the
    /// guarded state has been repaired.
    pub(crate) fn mark_consistent(&self) {
        // SAFETY: we hold the mutex (EOWNERDEAD hands it over) and the caller made its state
        // consistent.
        unsafe { libc::pthread_mutex_consistent(self.mutex.0.get()) };
    }
}

impl Drop for MutexGuard<'_> {
    fn drop(&mut self) {
        // SAFETY: this guard exists only while this thread holds the mutex (see `lock`).
        unsafe {
            libc::pthread_mutex_unlock(self.mutex.0.get());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shm::Region;

    /// A mutex in a fresh shared mapping, which a forked child shares.
    fn shared_mutex(region: &Region) -> &RobustMutex {
        // SAFETY: the region is fresh, page-aligned and large enough for a mutex; it is only
        // used as this mutex, through `&RobustMutex` (an `UnsafeCell`), for the region's life.
        let mutex = unsafe { &*region.as_ptr().cast::<RobustMutex>() };
        // SAFETY: fresh memory, initialised once, before the child is forked.
        unsafe { mutex.init() }.unwrap();
        mutex
    }

    #[test]
    fn a_lock_held_elsewhere_times_out() {
        let region = Region::create("pipeflow-test-mutex", 4096).unwrap();
        let mutex = shared_mutex(&region);
        let held = std::sync::Barrier::new(2);
        let done = std::sync::Barrier::new(2);
        std::thread::scope(|s| {
            s.spawn(|| {
                let guard = mutex.lock(1_000_000_000);
                held.wait();
                done.wait();
                drop(guard);
            });
            held.wait();
            assert!(mutex.lock(10_000_000).is_none(), "locked twice");
            done.wait();
        });
        assert!(matches!(mutex.lock(0), Some(Acquired::Clean(_))));
    }

    #[test]
    fn the_next_locker_after_a_dead_holder_is_told_and_recovers() {
        let region = Region::create("pipeflow-test-mutex", 4096).unwrap();
        let mutex = shared_mutex(&region);
        // SAFETY: the child only takes the mutex and exits, touching nothing the parent's other
        // test threads could hold at the fork.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            std::mem::forget(mutex.lock(1_000_000_000));
            // SAFETY: ends the child at once, holding the mutex.
            unsafe { libc::_exit(0) };
        }
        let mut status = 0;
        // SAFETY: waits for the child just forked; `status` lives for the call.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        match mutex.lock(1_000_000_000) {
            Some(Acquired::OwnerDied(guard)) => guard.mark_consistent(),
            _ => panic!("the dead holder's lock was not reported"),
        }
        assert!(matches!(
            mutex.lock(1_000_000_000),
            Some(Acquired::Clean(_))
        ));
    }
}
