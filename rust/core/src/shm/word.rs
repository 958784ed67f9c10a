//! A word of shared memory: one `i64` that one process writes and another reads after the
//! writer died. A worker process stores the index of the item it is about to run, so that the
//! parent can name the item that killed it.

use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicI64, Ordering};

use super::Region;

/// One `i64` in its own memfd page (see the module docs).
pub struct SharedWord {
    region: Region,
}

impl SharedWord {
    /// A new word, holding 0.
    pub fn create() -> io::Result<SharedWord> {
        Ok(SharedWord {
            region: Region::create("pipeflow-word", std::mem::size_of::<AtomicI64>())?,
        })
    }

    /// Maps a word another process created, from its memfd.
    pub fn from_fd(fd: OwnedFd) -> io::Result<SharedWord> {
        let region = Region::from_fd(fd)?;
        if region.len() < std::mem::size_of::<AtomicI64>() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "region too small for a word",
            ));
        }
        Ok(SharedWord { region })
    }

    /// The memfd, to hand to the other process.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.region.fd()
    }

    fn cell(&self) -> &AtomicI64 {
        // SAFETY: the mapping is page-aligned and at least 8 bytes long (checked in create and
        // from_fd), lives as long as `self`, and is only ever accessed as this atomic; every bit
        // pattern is a valid i64.
        unsafe { &*self.region.as_ptr().cast::<AtomicI64>() }
    }

    /// Stores `value`. Relaxed is enough: the reader looks only after the writer's process
    /// exited (or, in tests, after a join), and the kernel's exit and wait order every store
    /// of the dead process before the reader's load.
    pub fn set(&self, value: i64) {
        self.cell().store(value, Ordering::Relaxed);
    }

    /// The last value stored (see [`SharedWord::set`] for why Relaxed is enough).
    pub fn get(&self) -> i64 {
        self.cell().load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_word_is_shared_between_mappings() {
        let a = SharedWord::create().unwrap();
        let b = SharedWord::from_fd(a.fd().try_clone_to_owned().unwrap()).unwrap();
        assert_eq!(b.get(), 0);
        a.set(-1);
        assert_eq!(b.get(), -1);
        b.set(i64::MAX);
        assert_eq!(a.get(), i64::MAX);
    }

    #[test]
    fn a_word_outlives_a_killed_writer() {
        let word = SharedWord::create().unwrap();
        // SAFETY: the child only stores to the shared word and calls _exit; it touches no lock
        // or allocation the parent's other threads could hold at the fork.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            word.set(41);
            // SAFETY: ends the child at once, running no destructor or atexit handler.
            unsafe { libc::_exit(0) };
        }
        let mut status = 0;
        // SAFETY: waits for the child just forked; `status` lives for the call.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert_eq!(word.get(), 41);
    }
}
