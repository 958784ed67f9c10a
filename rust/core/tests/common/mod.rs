//! Helpers shared by the multi-process integration tests (`shm_fork`, `arena_fork`).

/// Forks; the child runs `child` and exits with its return value (0 ok). Returns the pid.
pub fn fork_child(child: impl FnOnce() -> i32) -> libc::pid_t {
    // SAFETY: the children of these tests only use shared memory (rings, the arena's robust
    // mutex, futexes) and leave with _exit, skipping destructors: they take no lock another
    // thread of the test process could hold at the fork.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let code = child();
        // SAFETY: _exit ends the child at once; nothing of the parent's state is touched.
        unsafe { libc::_exit(code) };
    }
    pid
}

/// Waits for our child `pid`; its raw wait status.
pub fn wait_status(pid: libc::pid_t) -> i32 {
    let mut status = 0;
    // SAFETY: waits for our own child; `status` outlives the call.
    let r = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(r, pid);
    status
}
