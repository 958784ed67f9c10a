//! The one place where core outcomes become Python exceptions: every `PyErr` the binding raises
//! is made here, so that each message and exception type is written once. pipeflow's exception
//! classes are defined in Python (`pipeflow._errors`, so that they pickle across processes);
//! they are looked up once and cached.
//!
//! The core's error types are converted by functions, not `From` impls: both `PyErr` and the
//! core's types are foreign to this crate, and some conversions need what the operation was
//! given (a frame's length) or the interpreter (to look up `ChannelClosed`).

use std::os::fd::{BorrowedFd, OwnedFd};

use pyo3::exceptions::{
    PyBufferError, PyIndexError, PyOSError, PyRuntimeError, PyTimeoutError, PyTypeError,
    PyValueError,
};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyType;

use pipeflow_core::shm::{PopError, PushError};
use pipeflow_core::SpawnError;

static CHANNEL_CLOSED: PyOnceLock<Py<PyType>> = PyOnceLock::new();

/// `pipeflow.ChannelClosed(msg)`.
pub(crate) fn channel_closed(py: Python<'_>, msg: &str) -> PyErr {
    match CHANNEL_CLOSED.import(py, "pipeflow._errors", "ChannelClosed") {
        Ok(ty) => PyErr::from_type(ty.clone(), msg.to_owned()),
        Err(e) => e,
    }
}

/// `pipeflow.ChannelClosed` for a send on a closed channel.
pub(crate) fn send_on_closed(py: Python<'_>) -> PyErr {
    channel_closed(py, "send on a closed channel")
}

/// The builtin `TimeoutError(msg)`.
pub(crate) fn timed_out(msg: &str) -> PyErr {
    PyTimeoutError::new_err(msg.to_owned())
}

/// A `ValueError` for a bad argument, saying what to do.
pub(crate) fn bad_argument(msg: String) -> PyErr {
    PyValueError::new_err(msg)
}

/// A `TypeError` for an argument of the wrong type, saying what is expected.
pub(crate) fn bad_type(msg: String) -> PyErr {
    PyTypeError::new_err(msg)
}

/// A `BufferError` for a buffer that cannot be used (or exported) as asked.
pub(crate) fn bad_buffer(msg: &'static str) -> PyErr {
    PyBufferError::new_err(msg)
}

/// An `IndexError` for an index out of range.
pub(crate) fn bad_index(msg: &'static str) -> PyErr {
    PyIndexError::new_err(msg)
}

/// An `OSError` from an I/O error of the core.
pub(crate) fn os_error(e: std::io::Error) -> PyErr {
    PyOSError::new_err(e.to_string())
}

/// A `ValueError` for an arena block descriptor the core refused (`Arena::check`, `adopt`).
pub(crate) fn bad_descriptor(e: std::io::Error) -> PyErr {
    PyValueError::new_err(e.to_string())
}

/// A `ValueError` for `Block.keep()` on a borrowed block that was freed meanwhile.
pub(crate) fn block_freed() -> PyErr {
    PyValueError::new_err("the block is no longer live: its lender freed it before keep()")
}

/// The error for a second thread on one end: the ring hands each end to one holder at a time.
pub(crate) fn end_busy(what: &str) -> PyErr {
    PyRuntimeError::new_err(format!(
        "Ring.{what} is already running in another thread: a ring has one writer and one reader \
         (use it from one thread at a time for each end)"
    ))
}

/// A failed `Ring.push` of a frame of `len` bytes, on a ring whose frames are at most
/// `max_frame` bytes.
pub(crate) fn push_failed(py: Python<'_>, e: PushError, len: usize, max_frame: usize) -> PyErr {
    match e {
        PushError::Full => timed_out("push timed out: the ring stayed full"),
        PushError::TooLarge => PyValueError::new_err(format!(
            "a frame of {len} bytes exceeds the ring's max_frame of {max_frame}"
        )),
        PushError::Closed => channel_closed(py, "the ring's reader closed it"),
        PushError::Damaged => PyOSError::new_err(
            "the ring is damaged (the reader's position is one it could not have reached)",
        ),
    }
}

/// A failed `Ring.pop`.
pub(crate) fn pop_failed(py: Python<'_>, e: PopError) -> PyErr {
    match e {
        PopError::Empty => timed_out("pop timed out: the ring stayed empty"),
        PopError::Closed => channel_closed(py, "the ring's writer closed it"),
        PopError::Damaged => {
            PyOSError::new_err("the ring is damaged (a frame header failed its check)")
        }
    }
}

/// A job the pool refused (`Pool.submit`).
pub(crate) fn spawn_failed(e: SpawnError) -> PyErr {
    match e {
        SpawnError::ShutDown => {
            PyRuntimeError::new_err("the pipeflow pool is shut down; create a new Pool")
        }
        SpawnError::NoThread(e) => PyRuntimeError::new_err(format!(
            "pipeflow could not start a thread for a task ({e}): the system's limit on \
             threads or memory is reached; use fewer workers, or raise the limit"
        )),
    }
}

/// A duplicate of descriptor `fd`, which the caller keeps (the `open(fd)` of the shared-memory
/// types: a child process maps what its parent passed it).
pub(crate) fn dup_fd(fd: i32) -> PyResult<OwnedFd> {
    // SAFETY: `fd` is only borrowed for the duplication below; the caller keeps ownership.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    borrowed.try_clone_to_owned().map_err(os_error)
}
