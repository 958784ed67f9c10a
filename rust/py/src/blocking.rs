//! Blocking without holding the interpreter, and without deafness to Ctrl-C.
//!
//! A blocking call detaches from the interpreter (so other Python threads run) and waits in
//! slices of [`SLICE`]; between slices it re-attaches and runs the interpreter's signal handlers,
//! so that Ctrl-C in the main thread raises `KeyboardInterrupt` within about one slice.

use std::time::{Duration, Instant};

use pyo3::prelude::*;

use crate::errors::bad_argument;

/// The longest a blocking call in the main thread stays deaf to signals.
pub(crate) const SLICE: Duration = Duration::from_millis(50);
/// Other threads never receive Python's signals: they wait in long slices (an idle pipeline
/// then costs no CPU), re-checking only so that a wait never depends on one wake-up alone.
const OFF_MAIN_SLICE: Duration = Duration::from_secs(5);

/// True in the process's main thread, the only one where Python runs signal handlers.
fn in_main_thread() -> bool {
    // SAFETY: getpid and gettid take no arguments, touch no memory and cannot fail.
    unsafe { libc::getpid() == libc::gettid() }
}

/// The result of one slice of waiting.
pub(crate) enum Slice<S, R> {
    /// Finished with this result.
    Done(R),
    /// Not yet: wait again, carrying this state (e.g. the value being sent).
    Again(S),
}

/// Converts a Python `timeout` in seconds (None: forever) into a deadline.
pub(crate) fn deadline(timeout: Option<f64>) -> PyResult<Option<Instant>> {
    match timeout {
        None => Ok(None),
        Some(t) if t.is_nan() || t < 0.0 => Err(bad_argument(format!(
            "timeout must be a number of seconds >= 0 or None, got {t}"
        ))),
        // A timeout too large for an Instant is as good as none.
        Some(t) => Ok(Duration::try_from_secs_f64(t)
            .ok()
            .and_then(|d| Instant::now().checked_add(d))),
    }
}

/// Waits until `step` is done or `deadline` passes, detached, in slices with signal checks
/// between them (short slices in the main thread only). `step(state, until)` waits at most until `until`. Returns `Err(state)` if the
/// deadline passed, or the Python error a signal handler raised.
pub(crate) fn wait<S, R, F>(
    py: Python<'_>,
    deadline: Option<Instant>,
    mut state: S,
    step: F,
) -> PyResult<Result<R, S>>
where
    S: Send,
    R: Send,
    F: Fn(S, Instant) -> Slice<S, R> + Sync,
{
    let slice = if in_main_thread() {
        SLICE
    } else {
        OFF_MAIN_SLICE
    };
    loop {
        let slice_end = Instant::now() + slice;
        let (until, last) = match deadline {
            Some(d) if d <= slice_end => (d, true),
            _ => (slice_end, false),
        };
        match py.detach(|| step(state, until)) {
            Slice::Done(r) => return Ok(Ok(r)),
            Slice::Again(s) if last => return Ok(Err(s)),
            Slice::Again(s) => state = s,
        }
        py.check_signals()?;
    }
}
