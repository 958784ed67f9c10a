//! What the fuzz tests (`fuzz_ring`, `fuzz_arena`) share: the budget, a watchdog that turns a
//! hang into a failure, a meter of the largest allocation a case makes, and the tally of
//! executions each test prints.
//!
//! The budget is proptest's case count: each test's own default (a few seconds in `cargo test
//! --release`), or `PROPTEST_CASES` for every test (`make soak`). The seed is fixed per run and
//! printed with any failure, so that `PROPTEST_RNG_SEED=<seed>` replays it alone (proptest
//! reads both variables).
#![allow(dead_code)] // each test binary uses part of it

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::fmt::Debug;
use std::sync::mpsc;
use std::time::Duration;

use proptest::strategy::Strategy;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestError, TestRunner};

/// How long one case may run before it counts as a hang: every operation the cases make waits
/// at most until "now", so a case takes microseconds; this is for a loop that never ends.
const HANG: Duration = Duration::from_secs(30);

/// The system allocator, noting the largest request made by each thread.
pub struct Meter;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    // `try_with`: nothing to note while the thread's locals are being torn down.
    let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
}

// SAFETY: every call is passed to `System` unchanged; noting a size touches a thread-local
// `Cell` only (const-initialised, no destructor: it never allocates).
unsafe impl GlobalAlloc for Meter {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller's contract for `alloc`, passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as for `alloc`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: as for `alloc`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static METER: Meter = Meter;

/// Runs `case` on a thread of its own: its result and the largest allocation it made. A case
/// still running after `HANG` fails the test (its thread is left behind: the run fails anyway);
/// a panic in it is passed on as it is, for proptest to report and shrink.
pub fn watched<T: Send + 'static>(case: impl FnOnce() -> T + Send + 'static) -> (T, usize) {
    let (tx, rx) = mpsc::channel();
    let thread = std::thread::spawn(move || {
        let out = case();
        let _ = tx.send(LARGEST.with(Cell::get));
        out
    });
    match rx.recv_timeout(HANG) {
        Ok(largest) => (thread.join().expect("the case ended"), largest),
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("a hang: the case ran for {HANG:?}"),
        Err(mpsc::RecvTimeoutError::Disconnected) => match thread.join() {
            Err(panic) => std::panic::resume_unwind(panic),
            Ok(_) => unreachable!("the case ended without a word"),
        },
    }
}

/// Runs `test` over `default_cases` inputs of `strategy` (or `PROPTEST_CASES`); `test` returns
/// how many times it called the code under test. Prints the tally (`--nocapture` shows it);
/// panics with the smallest failing input and the seed that replays it.
pub fn fuzz<S>(
    name: &str,
    default_cases: u32,
    strategy: S,
    test: impl Fn(S::Value) -> Result<u64, TestCaseError>,
) where
    S: Strategy,
    S::Value: Debug,
{
    let mut config = Config::default(); // PROPTEST_* from the environment
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = default_cases;
    }
    let seed = match config.rng_seed {
        RngSeed::Fixed(seed) => seed,
        RngSeed::Random => {
            // A seed of our own, so that a failure can say which it was.
            let seed = std::collections::hash_map::RandomState::new();
            std::hash::BuildHasher::hash_one(&seed, name)
        }
    };
    config.rng_seed = RngSeed::Fixed(seed);
    config.failure_persistence = None; // the seed replays a failure instead
    let cases = config.cases;
    let runs = std::sync::atomic::AtomicU64::new(0);
    let executions = std::sync::atomic::AtomicU64::new(0);
    let mut runner = TestRunner::new(config);
    let result = runner.run(&strategy, |input| {
        let n = test(input)?;
        runs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        executions.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    });
    let (runs, executions) = (runs.into_inner(), executions.into_inner());
    match result {
        Ok(()) => {
            println!("fuzz {name}: {runs} cases of {cases}, {executions} executions (seed {seed})")
        }
        Err(TestError::Fail(why, input)) => panic!(
            "fuzz {name}: {why}\nsmallest failing input: {input:#?}\n\
             replay: PROPTEST_RNG_SEED={seed} PROPTEST_CASES={cases}"
        ),
        Err(TestError::Abort(why)) => panic!("fuzz {name}: aborted: {why} (seed {seed})"),
    }
}
