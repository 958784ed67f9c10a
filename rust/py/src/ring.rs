//! `pipeflow._core.Ring`: the shared-memory frame ring, one direction of one lane between two
//! processes. The engine's process stages are built on it; it is exposed for them and for tests.

use std::os::fd::AsRawFd;
use std::time::Instant;

use pyo3::prelude::*;
use pyo3::types::PyBytes;

use pipeflow_core::shm::{PopError, PushError, Region, Ring};

use crate::blocking::{deadline, wait, Slice};
use crate::errors::{bad_argument, dup_fd, end_busy, os_error, pop_failed, push_failed};

/// One direction of one lane between two processes: a single-producer single-consumer ring
/// of byte frames in an anonymous memfd (nothing in /dev/shm to leak).
///
/// The creator passes ``fd`` to the other process (``pass_fds``), which maps it with
/// ``Ring.open(fd)``. Blocking calls wait on a futex without holding the GIL, and stay
/// interruptible by Ctrl-C.
///
/// Example:
///     >>> from pipeflow._core import Ring
///     >>> r = Ring(4096)
///     >>> r.push(b"hello")
///     >>> r.pop()
///     b'hello'
#[pyclass(frozen, name = "Ring", module = "pipeflow._core")]
pub struct PyRing {
    inner: Ring,
}

#[pymethods]
impl PyRing {
    #[new]
    #[pyo3(signature = (size = 1_048_576))]
    fn new(size: usize) -> PyResult<Self> {
        if size < 64 {
            return Err(bad_argument(format!(
                "size must be >= 64 bytes, got {size}"
            )));
        }
        Ok(PyRing {
            inner: Ring::create("pipeflow-ring", size).map_err(os_error)?,
        })
    }

    /// Maps a ring created by another process from its memfd (duplicated, not taken).
    #[staticmethod]
    fn open(fd: i32) -> PyResult<Self> {
        let region = Region::from_fd(dup_fd(fd)?).map_err(os_error)?;
        Ok(PyRing {
            inner: Ring::open(region).map_err(os_error)?,
        })
    }

    /// The memfd's descriptor, to pass to the other process (``pass_fds``).
    #[getter]
    fn fd(&self) -> i32 {
        self.inner.region().fd().as_raw_fd()
    }

    /// The longest frame, in bytes (half the ring).
    #[getter]
    fn max_frame(&self) -> usize {
        self.inner.max_frame()
    }

    /// Appends a frame, waiting for room (``TimeoutError`` after ``timeout`` seconds).
    ///
    /// Raises:
    ///     ChannelClosed: the reader closed the ring.
    ///     ValueError: the frame is longer than ``max_frame``.
    ///     OSError: the reader's position is damaged.
    ///     RuntimeError: another thread is pushing.
    #[pyo3(signature = (data, timeout = None))]
    fn push(&self, py: Python<'_>, data: &[u8], timeout: Option<f64>) -> PyResult<()> {
        let deadline = deadline(timeout)?;
        let ring = &self.inner;
        let mut writer = ring.producer().ok_or_else(|| end_busy("push"))?;
        let result = match writer.push(data, Some(Instant::now())) {
            Err(PushError::Full) => {
                let owned = data.to_vec();
                let waited = wait(py, deadline, &mut writer, |writer, until| {
                    match writer.push(&owned, Some(until)) {
                        Err(PushError::Full) => Slice::Again(writer),
                        other => Slice::Done(other),
                    }
                })?;
                waited.unwrap_or(Err(PushError::Full))
            }
            other => other,
        };
        result.map_err(|e| push_failed(py, e, data.len(), ring.max_frame()))
    }

    /// Takes the next frame, waiting for one (``TimeoutError`` after ``timeout`` seconds).
    ///
    /// A writer killed before it closed looks like one that is slow: wait with a timeout and
    /// check the writer process (the engine watches its workers).
    ///
    /// Raises:
    ///     ChannelClosed: the writer closed the ring and everything was read.
    ///     OSError: a frame header is damaged.
    ///     RuntimeError: another thread is popping.
    #[pyo3(signature = (timeout = None))]
    fn pop<'py>(&self, py: Python<'py>, timeout: Option<f64>) -> PyResult<Bound<'py, PyBytes>> {
        let deadline = deadline(timeout)?;
        let ring = &self.inner;
        let mut reader = ring.consumer().ok_or_else(|| end_busy("pop"))?;
        let mut out = Vec::new();
        let mut result = reader.pop(&mut out, Some(Instant::now()));
        if result == Err(PopError::Empty) {
            let waited = wait(
                py,
                deadline,
                (&mut reader, out),
                |(reader, mut out), until| match reader.pop(&mut out, Some(until)) {
                    Err(PopError::Empty) => Slice::Again((reader, out)),
                    other => Slice::Done((other, out)),
                },
            )?;
            (result, out) = match waited {
                Ok(done) => done,
                Err((_, out)) => (Err(PopError::Empty), out),
            };
        }
        match result {
            Ok(()) => Ok(PyBytes::new(py, &out)),
            Err(e) => Err(pop_failed(py, e)),
        }
    }

    /// The producer's close: the reader drains, then sees the end.
    fn close_write(&self) {
        self.inner.close_write();
    }

    /// The consumer's close: pushes fail from now on.
    fn close_read(&self) {
        self.inner.close_read();
    }

    fn __repr__(&self) -> String {
        format!("Ring(fd={}, max_frame={})", self.fd(), self.max_frame())
    }
}
