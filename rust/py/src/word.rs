//! `pipeflow._core.Word`: a shared word in which a worker process keeps the index of the item
//! it runs, so that the parent can name the item if the worker dies.

use std::os::fd::AsRawFd;

use pyo3::exceptions::PyIndexError;
use pyo3::prelude::*;
use pyo3::types::PyList;

use pipeflow_core::shm::SharedWord;

use crate::errors::{dup_fd, os_error};

/// One shared `i64` (see `_core.pyi`). It reads and writes as a one-item sequence (`w[0]`), so
/// the engine's per-item loops can use it as the slot where they note the item in hand.
#[pyclass(frozen, name = "Word", module = "pipeflow._core")]
pub struct PyWord {
    inner: SharedWord,
}

fn check_index(index: isize) -> PyResult<()> {
    if index == 0 || index == -1 {
        Ok(())
    } else {
        Err(PyIndexError::new_err("a Word has one item: w[0]"))
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

    /// Maps a word another process created, from its memfd (the descriptor is duplicated).
    #[staticmethod]
    fn open(fd: i32) -> PyResult<Self> {
        Ok(PyWord {
            inner: SharedWord::from_fd(dup_fd(fd)?).map_err(os_error)?,
        })
    }

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

    /// `[fn(v) for v in values]`, storing each item's index in the word before calling `fn`;
    /// when `fn` raises, the word holds the index of the item that raised.
    fn map<'py>(
        &self,
        py: Python<'py>,
        func: &Bound<'py, PyAny>,
        values: &Bound<'py, PyList>,
    ) -> PyResult<Bound<'py, PyList>> {
        let out = PyList::empty(py);
        let mut i = 0;
        // By index, not by iterator: `func` may change the list; this stops at its end.
        while i < values.len() {
            let value = values.get_item(i)?;
            self.inner.set(i as i64);
            out.append(func.call1((value,))?)?;
            i += 1;
        }
        Ok(out)
    }

    fn __repr__(&self) -> String {
        format!("Word(fd={}, value={})", self.fd(), self.inner.get())
    }
}
