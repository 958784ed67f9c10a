//! futex wait/wake on a 32-bit word in shared memory (not FUTEX_PRIVATE: the waiter and the
//! waker may be different processes).

use std::time::Duration;

use crate::sync::AtomicU32;

/// Sleeps while `*word == expected`, at most `timeout`. Returns on a wake, a timeout, a signal,
/// or at once if the word already differs: callers re-check their condition in a loop.
#[cfg(not(loom))]
pub(crate) fn wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
    };
    // SAFETY: FUTEX_WAIT reads the aligned u32 behind `word` (valid for the call, as a
    // reference) and `ts` (a valid timespec on our stack); it writes nothing.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
        );
    }
}

/// Wakes every waiter on `word`.
#[cfg(not(loom))]
pub(crate) fn wake_all(word: &AtomicU32) {
    // SAFETY: FUTEX_WAKE only uses the address of `word` as a key; it reads no memory.
    unsafe {
        libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, i32::MAX);
    }
}

#[cfg(loom)]
loom::lazy_static! {
    /// The kernel's futex table, modelled: one lock and one queue for every word.
    static ref TABLE: (crate::sync::Mutex<()>, crate::sync::Condvar) =
        (crate::sync::Mutex::new(()), crate::sync::Condvar::new());
}

/// The futex model: the value check and the sleep are atomic with respect to `wake_all` (both
/// hold the table lock), as in the kernel. The timeout is ignored ("forever"), so a missed wake
/// shows up as a deadlock that loom reports.
#[cfg(loom)]
pub(crate) fn wait(word: &AtomicU32, expected: u32, _timeout: Duration) {
    let guard = crate::sync::lock(&TABLE.0);
    // An RMW reads the latest value, as the kernel's check does.
    if word.fetch_add(0, crate::sync::Ordering::SeqCst) == expected {
        drop(TABLE.1.wait(guard));
    }
}

/// Wakes every waiter (see the model above).
#[cfg(loom)]
pub(crate) fn wake_all(_word: &AtomicU32) {
    let _guard = crate::sync::lock(&TABLE.0);
    TABLE.1.notify_all();
}
