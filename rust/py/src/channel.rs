//! `pipeflow.Channel` and `pipeflow.select`: the core channel holding Python objects.

use pyo3::prelude::*;
use pyo3::types::{PyBool, PyInt};

use pipeflow_core::{
    select_recv, Channel, RecvError, SelectError, SendError, TryRecvError, TrySendError,
};

use crate::blocking::{deadline, wait, Slice};
use crate::errors::{bad_argument, bad_type, channel_closed, send_on_closed, timed_out};

/// A bounded multi-producer multi-consumer channel with Go's rules.
///
/// ``capacity`` items are buffered (at most ``MAX_CAPACITY``); 0 makes a rendezvous channel
/// (each send waits for a receiver). The producer closes; receivers drain what was sent, then
/// see the end (``recv`` raises :class:`~pipeflow.ChannelClosed`, iteration stops). Sending on
/// a closed channel raises :class:`~pipeflow.ChannelClosed`. Every blocking call releases the
/// GIL and stays interruptible by Ctrl-C.
///
/// Example:
///     >>> import pipeflow as pf
///     >>> ch = pf.Channel(2)
///     >>> ch.send("a"); ch.send("b"); ch.close()
///     True
///     >>> list(ch)
///     ['a', 'b']
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

    /// The buffer size given at creation (0: a rendezvous channel).
    #[getter]
    fn capacity(&self) -> usize {
        self.inner.capacity()
    }

    /// True once ``close()`` was called (items sent before may still be buffered).
    #[getter]
    fn closed(&self) -> bool {
        self.inner.is_closed()
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }

    /// Sends ``item``, blocking while the channel is full.
    ///
    /// Args:
    ///     item: any Python object (the receiver gets this object, not a copy).
    ///     timeout: seconds to wait for room; None waits as long as it takes.
    ///
    /// Raises:
    ///     TimeoutError: the channel stayed full for ``timeout`` seconds.
    ///     ChannelClosed: the channel is closed, or was closed while this call waited.
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

    /// Sends ``item`` if the channel has room now, without blocking.
    ///
    /// Returns:
    ///     True if it was sent; False if the channel is full (at capacity 0: if no receiver waits).
    ///
    /// Raises:
    ///     ChannelClosed: the channel is closed.
    fn try_send(&self, py: Python<'_>, item: Py<PyAny>) -> PyResult<bool> {
        match self.inner.try_send(item) {
            Ok(()) => Ok(true),
            Err(TrySendError::Full(_)) => Ok(false),
            Err(TrySendError::Closed(_)) => Err(send_on_closed(py)),
        }
    }

    /// Receives the next item, blocking while the channel is empty.
    ///
    /// Args:
    ///     timeout: seconds to wait for an item; None waits as long as it takes.
    ///
    /// Returns:
    ///     The item, in the order items were sent (by one sender).
    ///
    /// Raises:
    ///     TimeoutError: the channel stayed empty for ``timeout`` seconds.
    ///     ChannelClosed: the channel is closed and every item sent before was received.
    #[pyo3(signature = (timeout = None))]
    fn recv(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Py<PyAny>> {
        match self.recv_inner(py, deadline(timeout)?)? {
            Ok(v) => Ok(v),
            Err(RecvError::Closed) => Err(channel_closed(py, "the channel is closed and drained")),
            Err(RecvError::Timeout) => Err(timed_out("recv timed out: the channel stayed empty")),
        }
    }

    /// Receives an item if one is buffered now, without blocking.
    ///
    /// Returns:
    ///     ``(True, item)``, or ``(False, None)`` if the channel is empty.
    ///
    /// Raises:
    ///     ChannelClosed: the channel is closed and drained.
    fn try_recv(&self, py: Python<'_>) -> PyResult<(bool, Option<Py<PyAny>>)> {
        match self.inner.try_recv() {
            Ok(v) => Ok((true, Some(v))),
            Err(TryRecvError::Empty) => Ok((false, None)),
            Err(TryRecvError::Closed) => {
                Err(channel_closed(py, "the channel is closed and drained"))
            }
        }
    }

    /// Closes the channel: receivers drain what was sent, then see the end.
    ///
    /// Every blocked sender wakes and raises :class:`~pipeflow.ChannelClosed`, as does every
    /// later send; every blocked receiver wakes. Closing again is allowed (Go's close panics).
    ///
    /// Returns:
    ///     True if this call closed the channel; False if it was closed already.
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

/// Receives from whichever channel has an item first (Go's ``select`` over receives).
///
/// Closed and drained channels are skipped; when every one is, it raises
/// :class:`~pipeflow.ChannelClosed`.
///
/// Args:
///     channels: the channels to receive from (at least one).
///     timeout: seconds to wait; None waits as long as it takes.
///
/// Returns:
///     ``(index, item)``: the channel's position in ``channels`` and the item it gave.
///
/// Raises:
///     TimeoutError: no channel had an item within ``timeout`` seconds.
///     ChannelClosed: every channel is closed and drained.
///
/// Example:
///     >>> import pipeflow as pf
///     >>> a, b = pf.Channel(1), pf.Channel(1)
///     >>> b.send("from b")
///     >>> pf.select([a, b])
///     (1, 'from b')
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
