//! The one place where core outcomes become Python exceptions. pipeflow's exception classes are
//! defined in Python (`pipeflow._errors`, so that they pickle across processes); they are looked
//! up once and cached.

use std::os::fd::{BorrowedFd, OwnedFd};

use pyo3::exceptions::{PyOSError, PyTimeoutError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyType;

static CHANNEL_CLOSED: PyOnceLock<Py<PyType>> = PyOnceLock::new();

/// `pipeflow.ChannelClosed(msg)`.
pub(crate) fn channel_closed(py: Python<'_>, msg: &str) -> PyErr {
    match CHANNEL_CLOSED.import(py, "pipeflow._errors", "ChannelClosed") {
        Ok(ty) => PyErr::from_type(ty.clone(), msg.to_owned()),
        Err(e) => e,
    }
}

/// The builtin `TimeoutError(msg)`.
pub(crate) fn timed_out(msg: &str) -> PyErr {
    PyTimeoutError::new_err(msg.to_owned())
}

/// A `ValueError` for a bad argument, saying what to do.
pub(crate) fn bad_argument(msg: String) -> PyErr {
    PyValueError::new_err(msg)
}

/// An `OSError` from an I/O error of the core.
pub(crate) fn os_error(e: std::io::Error) -> PyErr {
    PyOSError::new_err(e.to_string())
}

/// A duplicate of descriptor `fd`, which the caller keeps (the `open(fd)` of the shared-memory
/// types: a child process maps what its parent passed it).
pub(crate) fn dup_fd(fd: i32) -> PyResult<OwnedFd> {
    // SAFETY: `fd` is only borrowed for the duplication below; the caller keeps ownership.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    borrowed.try_clone_to_owned().map_err(os_error)
}
