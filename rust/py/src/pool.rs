//! `pipeflow._core.Pool`: the work-stealing pool running Python callables. A job attaches to the
//! interpreter only while its callable runs.

use std::time::Duration;

use pyo3::prelude::*;

use pipeflow_core::Pool;

use crate::blocking::{deadline, wait, Slice};
use crate::errors::{bad_argument, spawn_failed};

/// The work-stealing pool that runs every thread stage and group task.
///
/// Threads start on demand, up to ``max_threads``, and retire after ``keep_alive`` idle
/// seconds. A job holds the GIL only while its Python code runs.
#[pyclass(frozen, name = "Pool", module = "pipeflow._core")]
pub struct PyPool {
    inner: Pool,
}

#[pymethods]
impl PyPool {
    #[new]
    #[pyo3(signature = (max_threads = 1024, keep_alive = 10.0))]
    fn new(max_threads: i64, keep_alive: f64) -> PyResult<Self> {
        let max_threads = usize::try_from(max_threads)
            .ok()
            .filter(|&n| n >= 1)
            .ok_or_else(|| bad_argument(format!("max_threads must be >= 1, got {max_threads}")))?;
        let keep_alive = Duration::try_from_secs_f64(keep_alive).map_err(|_| {
            bad_argument(format!("keep_alive must be seconds >= 0, got {keep_alive}"))
        })?;
        Ok(PyPool {
            inner: Pool::new(max_threads, keep_alive),
        })
    }

    /// Runs ``func()`` on a pool thread; its exceptions go to ``sys.unraisablehook`` (wrap the
    /// callable to capture them, as ``Group`` does).
    ///
    /// Raises:
    ///     RuntimeError: the pool is shut down, or ``func`` needed a new thread and the OS
    ///         refused one (``func`` then never runs).
    fn submit(&self, func: Py<PyAny>) -> PyResult<()> {
        let job = Box::new(move || {
            Python::attach(|py| {
                if let Err(e) = func.call0(py) {
                    e.write_unraisable(py, Some(func.bind(py)));
                }
                drop(func);
            })
        });
        self.inner.try_spawn(job).map_err(spawn_failed)
    }

    /// Stops accepting jobs, runs the queued ones, and waits up to ``timeout`` seconds (None:
    /// no limit) for every thread to exit; True if all exited.
    #[pyo3(signature = (timeout = None))]
    fn shutdown(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
        let until = deadline(timeout)?;
        let pool = &self.inner;
        let done = wait(py, until, (), |(), until| {
            let left = until.saturating_duration_since(std::time::Instant::now());
            if pool.shutdown(left) {
                Slice::Done(())
            } else {
                Slice::Again(())
            }
        })?;
        Ok(done.is_ok())
    }

    /// After ``os.fork()``, in the child: forgets this pool without touching its state (its
    /// threads do not exist in the child, and their locks may be held forever).
    fn _abandon_after_fork(&self) {
        self.inner.abandon();
    }

    /// Threads alive.
    #[getter]
    fn threads(&self) -> usize {
        self.inner.stats().threads
    }

    /// Threads waiting for work.
    #[getter]
    fn idle(&self) -> usize {
        self.inner.stats().idle
    }

    /// Jobs running now.
    #[getter]
    fn running(&self) -> usize {
        self.inner.stats().running
    }

    fn __repr__(&self) -> String {
        let s = self.inner.stats();
        format!(
            "Pool(threads={}, idle={}, running={})",
            s.threads, s.idle, s.running
        )
    }
}
