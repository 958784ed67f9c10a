//! The extension module `pipeflow._core`: thin pyo3 glue over `pipeflow-core`, one file per
//! exposed concept. Each binding method has one shape: extract Python values while attached,
//! detach from the interpreter for anything that may block, convert the result back.
//!
//! The doc comments of the `#[pyclass]`, `#[pymethods]` and `#[pyfunction]` items are the Python
//! docstrings (what `help()` shows), written for Python readers (Google style, Sphinx roles);
//! `python/pipeflow/_core.pyi` repeats them for type checkers and the API reference, and
//! `tests/test_exports.py` checks that the two agree.

mod arena;
mod blocking;
mod channel;
mod errors;
mod pool;
mod ring;
mod word;

use pyo3::prelude::*;

/// pipeflow's Rust core: channels, the work-stealing pool, the shared-memory ring, word and arena.
#[pymodule(gil_used = false)]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<channel::PyChannel>()?;
    m.add_function(wrap_pyfunction!(channel::select, m)?)?;
    m.add_class::<pool::PyPool>()?;
    m.add_class::<ring::PyRing>()?;
    m.add_class::<word::PyWord>()?;
    m.add_class::<word::PyTracked>()?;
    m.add_class::<arena::PyArena>()?;
    m.add_class::<arena::PyBlock>()?;
    Ok(())
}
