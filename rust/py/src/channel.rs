//! `pipeflow.Channel` and `pipeflow.select`: the core channel holding Python objects.

use pyo3::prelude::*;
use pyo3::types::{PyBool, PyInt};

use pipeflow_core::{
    select_recv, Channel, RecvError, SelectError, SendError, TryRecvError, TrySendError,
};

use crate::blocking::{deadline, wait, Slice};
use crate::errors::{bad_argument, bad_type, channel_closed, send_on_closed, timed_out};

/// A bounded channel of Python objects with Go's rules (see the Python docs in `_core.pyi`).
#[pyclass(frozen, name = "Channel", module = "pipeflow")]
pub struct PyChannel {
    inner: Channel<Py<PyAny>>,
}

#[pymethods]
impl PyChannel {
    /// The largest capacity: the buffer is allocated whole when the channel is made.
    #[classattr]
    const MAX_CAPACITY: usize = 1 << 20;

    #[new]
    #[pyo3(signature = (capacity = Capacity(0)), text_signature = "(capacity=0)")]
    fn new(capacity: Capacity) -> PyResult<Self> {
        let capacity = capacity.0;
        let capacity = usize::try_from(capacity)
            .ok()
            .filter(|&c| c <= Self::MAX_CAPACITY)
            .ok_or_else(|| {
                bad_argument(format!(
                    "capacity must be from 0 (a rendezvous channel) to {}, got {capacity}",
                    Self::MAX_CAPACITY
                ))
            })?;
        Ok(PyChannel {
            inner: Channel::new(capacity),
        })
    }

    #[getter]
    fn capacity(&self) -> usize {
        self.inner.capacity()
    }

    #[getter]
    fn closed(&self) -> bool {
        self.inner.is_closed()
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }

    #[pyo3(signature = (item, timeout = None))]
    fn send(&self, py: Python<'_>, item: Py<PyAny>, timeout: Option<f64>) -> PyResult<()> {
        // Checked first: a bad timeout is an error also when the send would not wait.
        let until = deadline(timeout)?;
        let item = match self.inner.try_send(item) {
            Ok(()) => return Ok(()),
            Err(TrySendError::Closed(_)) => return Err(send_on_closed(py)),
            Err(TrySendError::Full(item)) => item,
        };
        let ch = &self.inner;
        let sent = wait(py, until, item, |item, until| {
            match ch.send(item, Some(until)) {
                Ok(()) => Slice::Done(Ok(())),
                Err(SendError::Closed(item)) => Slice::Done(Err(item)),
                Err(SendError::Timeout(item)) => Slice::Again(item),
            }
        })?;
        match sent {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_closed)) => Err(send_on_closed(py)),
            Err(_timed_out) => Err(timed_out("send timed out: the channel stayed full")),
        }
    }

    fn try_send(&self, py: Python<'_>, item: Py<PyAny>) -> PyResult<bool> {
        match self.inner.try_send(item) {
            Ok(()) => Ok(true),
            Err(TrySendError::Full(_)) => Ok(false),
            Err(TrySendError::Closed(_)) => Err(send_on_closed(py)),
        }
    }

    #[pyo3(signature = (timeout = None))]
    fn recv(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Py<PyAny>> {
        match self.recv_inner(py, deadline(timeout)?)? {
            Ok(v) => Ok(v),
            Err(RecvError::Closed) => Err(channel_closed(py, "the channel is closed and drained")),
            Err(RecvError::Timeout) => Err(timed_out("recv timed out: the channel stayed empty")),
        }
    }

    fn try_recv(&self, py: Python<'_>) -> PyResult<(bool, Option<Py<PyAny>>)> {
        match self.inner.try_recv() {
            Ok(v) => Ok((true, Some(v))),
            Err(TryRecvError::Empty) => Ok((false, None)),
            Err(TryRecvError::Closed) => {
                Err(channel_closed(py, "the channel is closed and drained"))
            }
        }
    }

    fn close(&self) -> bool {
        self.inner.close()
    }

    fn __iter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        match self.recv_inner(py, None)? {
            Ok(v) => Ok(Some(v)),
            Err(_) => Ok(None),
        }
    }

    fn __repr__(&self) -> String {
        format!(
            "Channel(capacity={}, len={}, closed={})",
            self.inner.capacity(),
            self.inner.len(),
            if self.inner.is_closed() {
                "True"
            } else {
                "False"
            }
        )
    }
}

impl PyChannel {
    /// Receives: first without detaching, then blocking in slices.
    fn recv_inner(
        &self,
        py: Python<'_>,
        until: Option<std::time::Instant>,
    ) -> PyResult<Result<Py<PyAny>, RecvError>> {
        match self.inner.try_recv() {
            Ok(v) => return Ok(Ok(v)),
            Err(TryRecvError::Closed) => return Ok(Err(RecvError::Closed)),
            Err(TryRecvError::Empty) => {}
        }
        let ch = &self.inner;
        let got = wait(py, until, (), |(), until| match ch.recv(Some(until)) {
            Ok(v) => Slice::Done(Ok(v)),
            Err(RecvError::Closed) => Slice::Done(Err(RecvError::Closed)),
            Err(RecvError::Timeout) => Slice::Again(()),
        })?;
        Ok(got.unwrap_or(Err(RecvError::Timeout)))
    }
}

/// Receives from whichever channel is ready first: returns `(index, item)`.
#[pyfunction]
#[pyo3(signature = (channels, timeout = None))]
pub fn select(
    py: Python<'_>,
    channels: Vec<Py<PyChannel>>,
    timeout: Option<f64>,
) -> PyResult<(usize, Py<PyAny>)> {
    if channels.is_empty() {
        return Err(bad_argument(
            "select needs at least one channel (an empty select would block forever)".into(),
        ));
    }
    let until = deadline(timeout)?;
    let refs: Vec<&Channel<Py<PyAny>>> = channels.iter().map(|c| &c.get().inner).collect();
    if let Ok(hit) = select_recv(&refs, Some(std::time::Instant::now())) {
        return Ok(hit);
    }
    let got = wait(py, until, (), |(), until| {
        match select_recv(&refs, Some(until)) {
            Ok(hit) => Slice::Done(Ok(hit)),
            Err(SelectError::AllClosed) => Slice::Done(Err(())),
            Err(SelectError::Timeout) => Slice::Again(()),
        }
    })?;
    match got {
        Ok(Ok(hit)) => Ok(hit),
        Ok(Err(())) => Err(channel_closed(py, "every channel is closed and drained")),
        Err(()) => Err(timed_out("select timed out: no channel was ready")),
    }
}

/// A channel's capacity as given: an int (not a bool); one too large for an i64 is kept as -1,
/// out of range like any negative one.
struct Capacity(i64);

impl<'py> FromPyObject<'_, 'py> for Capacity {
    type Error = PyErr;

    fn extract(ob: Borrowed<'_, 'py, PyAny>) -> PyResult<Self> {
        if !ob.is_instance_of::<PyBool>() {
            if let Ok(c) = ob.extract::<i64>() {
                return Ok(Capacity(c));
            }
            if ob.is_instance_of::<PyInt>() {
                return Ok(Capacity(-1));
            }
        }
        Err(bad_type(format!(
            "capacity must be an int from 0 (a rendezvous channel) to {}, got {}",
            PyChannel::MAX_CAPACITY,
            ob.repr().map_or_else(|_| "?".into(), |r| r.to_string())
        )))
    }
}
