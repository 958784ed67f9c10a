//! `pipeflow._core.Word`: a shared word in which a worker process keeps the index of the item
//! it runs, so that the parent can name the item if the worker dies.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};

use pyo3::prelude::*;
use pyo3::types::PyList;

use pipeflow_core::shm::SharedWord;

use crate::errors::{bad_index, dup_fd, os_error};

/// One ``int`` (64-bit) in shared memory: a worker process stores the index of the item it
/// is about to run, and the parent reads it if the worker dies.
///
/// It reads and writes as a one-item sequence (``w[0]``), so the engine's per-item loops can
/// use it as the slot where they note the item in hand. The creator passes ``fd`` to the
/// other process, which maps it with ``Word.open(fd)``.
///
/// Example:
///     >>> from pipeflow._core import Word
///     >>> w = Word()
///     >>> [abs(v) for v in w.track([-1, -2, -3])]
///     [1, 2, 3]
///     >>> w[0]  # the index of the last item run
///     2
#[pyclass(frozen, name = "Word", module = "pipeflow._core")]
pub struct PyWord {
    inner: SharedWord,
}

fn check_index(index: isize) -> PyResult<()> {
    if index == 0 || index == -1 {
        Ok(())
    } else {
        Err(bad_index("a Word has one item: w[0]"))
    }
}

#[pymethods]
impl PyWord {
    #[new]
    fn new() -> PyResult<Self> {
        Ok(PyWord {
            inner: SharedWord::create().map_err(os_error)?,
        })
    }

    /// Maps a word created by another process from its memfd (duplicated, not taken).
    #[staticmethod]
    fn open(fd: i32) -> PyResult<Self> {
        Ok(PyWord {
            inner: SharedWord::from_fd(dup_fd(fd)?).map_err(os_error)?,
        })
    }

    /// The memfd's descriptor, to pass to the other process.
    #[getter]
    fn fd(&self) -> i32 {
        self.inner.fd().as_raw_fd()
    }

    fn __len__(&self) -> usize {
        1
    }

    fn __getitem__(&self, index: isize) -> PyResult<i64> {
        check_index(index)?;
        Ok(self.inner.get())
    }

    fn __setitem__(&self, index: isize, value: i64) -> PyResult<()> {
        check_index(index)?;
        self.inner.set(value);
        Ok(())
    }

    /// An iterator over ``values`` that stores each item's index in the word as it yields it.
    ///
    /// After ``[f(v) for v in w.track(values)]`` raised, ``w[0]`` is the index of the item
    /// that raised: ``map`` at a comprehension's speed (the interpreter calls ``f`` without
    /// building an argument tuple, which a call from here would). By index: it stops at the
    /// list's end, even if the list changes meanwhile.
    fn track(slf: Bound<'_, Self>, values: Bound<'_, PyList>) -> PyTracked {
        PyTracked {
            word: slf.unbind(),
            values: values.unbind(),
            next: AtomicUsize::new(0),
        }
    }

    fn __repr__(&self) -> String {
        format!("Word(fd={}, value={})", self.fd(), self.inner.get())
    }
}

/// The iterator :meth:`Word.track` returns.
#[pyclass(frozen, name = "Tracked", module = "pipeflow._core")]
pub struct PyTracked {
    word: Py<PyWord>,
    values: Py<PyList>,
    /// The index of the next item. Relaxed is enough: it orders nothing else, and an iterator
    /// is advanced by one thread at a time (two threads sharing one would at worst see an item
    /// twice, as with any unlocked iterator; never an index out of range: `get_item` checks).
    next: AtomicUsize,
}

#[pymethods]
impl PyTracked {
    fn __iter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }

    fn __next__<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyAny>> {
        let values = self.values.bind(py);
        // By index, not by a list iterator: the list may change; this stops at its end.
        let i = self.next.load(Ordering::Relaxed);
        let value = values.get_item(i).ok()?;
        self.next.store(i + 1, Ordering::Relaxed);
        self.word.get().inner.set(i as i64);
        Some(value)
    }
}
