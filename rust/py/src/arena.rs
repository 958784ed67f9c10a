//! `pipeflow._core.Arena` and `Block`: the shared-memory arena for large buffers, and one
//! reference to a block of it, which exports the block's bytes through the buffer protocol (so
//! that numpy arrays can be views on it, keeping it alive through their base).

use std::collections::HashSet;
use std::ffi::{c_int, c_void};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use pyo3::buffer::PyBuffer;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use pipeflow_core::shm::{Arena, Desc};

use crate::errors::{bad_argument, bad_buffer, bad_descriptor, block_freed, dup_fd, os_error};

type DescTuple = (u32, u32, u64, u64);

fn to_tuple(d: &Desc) -> DescTuple {
    (d.slot, d.gen, d.start, d.len)
}

fn from_tuple(t: DescTuple) -> Desc {
    Desc {
        slot: t.0,
        gen: t.1,
        start: t.2,
        len: t.3,
    }
}

/// A shared-memory arena: blocks of one memfd that processes allocate, share and free.
///
/// Blocks are whole pages; the last reference to a block frees it and returns its pages to the
/// OS. A process killed at any instant cannot wedge the arena (its mutex is robust); the blocks
/// a dead writer had not shared are freed by :meth:`reclaim`. The creator passes ``fd`` to other
/// processes, which map it with ``Arena.open(fd)``.
///
/// Example:
///     >>> from pipeflow._core import Arena
///     >>> arena = Arena(1 << 20)
///     >>> block = arena.empty(10, 0)
///     >>> memoryview(block)[:3] = b"abc"
///     >>> bytes(arena.adopt(block.desc, incref=True))[:3]
///     b'abc'
///     >>> del block
///     >>> arena.stats()["blocks"]
///     0
#[pyclass(frozen, name = "Arena", module = "pipeflow._core")]
pub struct PyArena {
    inner: Arc<Arena>,
}

#[pymethods]
impl PyArena {
    #[new]
    #[pyo3(signature = (size, slots = 4096))]
    fn new(size: usize, slots: usize) -> PyResult<Self> {
        if size == 0 || slots == 0 || slots > 1 << 24 {
            return Err(bad_argument(format!(
                "an arena needs size > 0 and 0 < slots <= 16777216, got size={size} slots={slots}"
            )));
        }
        Ok(PyArena {
            inner: Arc::new(Arena::create(size, slots).map_err(os_error)?),
        })
    }

    /// Maps an arena created by another process from its memfd (duplicated, not taken).
    #[staticmethod]
    fn open(fd: i32) -> PyResult<Self> {
        Ok(PyArena {
            inner: Arc::new(Arena::open(dup_fd(fd)?).map_err(os_error)?),
        })
    }

    /// The memfd's descriptor, to pass to other processes.
    #[getter]
    fn fd(&self) -> i32 {
        self.inner.fd().as_raw_fd()
    }

    /// Bytes available for blocks.
    #[getter]
    fn size(&self) -> usize {
        self.inner.data_len()
    }

    /// How many blocks may be live at once.
    #[getter]
    fn slots(&self) -> usize {
        self.inner.nslots()
    }

    /// A descriptor for the bytes of a contiguous byte buffer (``PickleBuffer.raw()``),
    /// carrying one reference for a message.
    ///
    /// The block holding them if they live in this arena already, else a new block they are
    /// copied into (the GIL released); ``None`` when the arena has no room. A block in ``lent``
    /// (``(slot, gen)`` pairs: blocks the receiver of the message holds itself) gets no
    /// reference: the receiver adds one when it takes the message.
    #[pyo3(signature = (buffer, owner, lent = None))]
    fn put(
        &self,
        py: Python<'_>,
        buffer: &Bound<'_, PyAny>,
        owner: u32,
        lent: Option<HashSet<(u32, u32)>>,
    ) -> PyResult<Option<DescTuple>> {
        let buf = PyBuffer::<u8>::get(buffer)?;
        if !buf.is_c_contiguous() {
            return Err(bad_buffer("put() needs a contiguous byte buffer"));
        }
        let (src, len) = (buf.buf_ptr() as usize, buf.len_bytes());
        if let Some(d) = self.inner.find(src as *const u8, len) {
            let lent = lent.is_some_and(|l| l.contains(&(d.slot, d.gen)));
            // A block the buffer's owner holds cannot be freed meanwhile, so the incref fails
            // only at the reference limit: the bytes are then copied into a block of their own.
            if lent || self.inner.incref(&d) {
                return Ok(Some(to_tuple(&d)));
            }
        }
        let Some(d) = self.inner.alloc(len, owner) else {
            return Ok(None);
        };
        let inner = &self.inner;
        py.detach(|| {
            inner.populate(d.start, len as u64);
            // SAFETY: `src` is the exported buffer of `len` bytes, kept alive (and its export
            // pinned) by `buf` for this call; the block is fresh, at least `len` bytes, and only
            // this call knows of it; they cannot overlap (the source is outside the block).
            unsafe { inner.write(d.start, src as *const u8, len) };
        });
        drop(buf);
        Ok(Some((d.slot, d.gen, d.start, len as u64)))
    }

    /// A :class:`Block` holding the reference ``desc`` carried (or a new one with ``incref``:
    /// the message keeps its own); the block is shared from now on (see :meth:`reclaim`).
    ///
    /// Raises:
    ///     ValueError: ``desc`` names no live block.
    #[pyo3(signature = (desc, incref = false))]
    fn adopt(&self, desc: DescTuple, incref: bool) -> PyResult<PyBlock> {
        let d = from_tuple(desc);
        self.inner.adopt(&d, incref).map_err(bad_descriptor)?;
        Ok(PyBlock::new(&self.inner, d, true))
    }

    /// A :class:`Block` that holds no reference (the sender of the message keeps the block
    /// alive until it has the answer), unless :meth:`Block.keep` takes one.
    ///
    /// Raises:
    ///     ValueError: ``desc`` names no live block.
    fn borrow(&self, desc: DescTuple) -> PyResult<PyBlock> {
        let d = from_tuple(desc);
        self.inner.check(&d).map_err(bad_descriptor)?;
        Ok(PyBlock::new(&self.inner, d, false))
    }

    /// A new block of ``nbytes``, or ``None`` when the arena has no room. Its bytes are
    /// arbitrary (a reused block holds what was there), as ``np.empty``'s are.
    fn empty(&self, py: Python<'_>, nbytes: usize, owner: u32) -> Option<PyBlock> {
        let d = self.inner.alloc(nbytes, owner)?;
        let inner = &self.inner;
        py.detach(|| inner.populate(d.start, nbytes as u64));
        Some(PyBlock::new(
            &self.inner,
            Desc {
                len: nbytes as u64,
                ..d
            },
            true,
        ))
    }

    /// How many bytes of freed blocks may stay resident so that new blocks reuse their pages
    /// (a fresh page of shared memory costs a fault and zeroing); 0 returns them at once.
    fn set_cache_limit(&self, nbytes: u64) {
        self.inner.set_cache_limit(nbytes);
    }

    /// Returns the pages of every free block to the OS.
    fn trim(&self, py: Python<'_>) {
        let inner = Arc::clone(&self.inner);
        py.detach(move || inner.trim());
    }

    /// A new owner tag for a writer process, unique among every process that maps this
    /// arena (never 0, the creator's).
    fn new_tag(&self) -> u32 {
        self.inner.new_tag()
    }

    /// Frees the unshared blocks of a dead process tagged ``owner``; returns how many.
    fn reclaim(&self, py: Python<'_>, owner: u32) -> usize {
        let inner = Arc::clone(&self.inner);
        py.detach(move || inner.reclaim(owner))
    }

    /// ``live_bytes``, ``blocks`` and ``resident_bytes`` (memory the memfd holds).
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let inner = Arc::clone(&self.inner);
        let s = py.detach(move || inner.stats());
        let d = PyDict::new(py);
        d.set_item("live_bytes", s.live_bytes)?;
        d.set_item("blocks", s.blocks)?;
        d.set_item("resident_bytes", s.resident_bytes)?;
        Ok(d)
    }
}

/// One reference to a block of an :class:`Arena`; its bytes through the buffer protocol
/// (writable), so that a numpy array can be a view on it, keeping it alive through its base.
/// The reference goes when this object does.
#[pyclass(frozen, name = "Block", module = "pipeflow._core")]
pub struct PyBlock {
    arena: Arc<Arena>,
    desc: Desc,
    // Whether this object holds a reference (see `borrow` and `keep`). Relaxed: only ever
    // changed under the GIL (keep is a method call), read in drop, also under the GIL.
    owned: AtomicBool,
    // The process that made this object: a copy of it in a forked child holds no reference (the
    // parent's object does), so only this process may drop one.
    pid: u32,
}

impl PyBlock {
    fn new(arena: &Arc<Arena>, desc: Desc, owned: bool) -> Self {
        PyBlock {
            arena: Arc::clone(arena),
            desc,
            owned: AtomicBool::new(owned),
            pid: std::process::id(),
        }
    }
}

#[pymethods]
impl PyBlock {
    /// Takes a reference of its own, for a borrowed block still in use (nothing to do if it
    /// holds one already).
    ///
    /// Raises:
    ///     ValueError: the block was freed meanwhile (its lender dropped it).
    fn keep(&self) -> PyResult<()> {
        // Claimed first, so that two callers cannot both add a reference.
        if self.owned.swap(true, Ordering::Relaxed) {
            return Ok(());
        }
        // `hold`, not `incref`: the block is shared from now on, so that its writer's death
        // (a process stage of a nested pipeline lends its own blocks) does not free it.
        if !self.arena.hold(&self.desc) {
            self.owned.store(false, Ordering::Relaxed);
            return Err(block_freed());
        }
        Ok(())
    }

    /// Whether this object holds a reference (not :meth:`Arena.borrow`-ed, or kept).
    #[getter]
    fn owned(&self) -> bool {
        self.owned.load(Ordering::Relaxed)
    }

    /// ``(slot, gen, start, len)``, to name the block in a message.
    #[getter]
    fn desc(&self) -> DescTuple {
        to_tuple(&self.desc)
    }

    fn __len__(&self) -> usize {
        self.desc.len as usize
    }

    fn __repr__(&self) -> String {
        format!("<pipeflow Block of {} bytes>", self.desc.len)
    }

    /// # Safety
    /// Called by Python with a valid `view` to fill.
    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        if view.is_null() {
            return Err(bad_buffer("a null Py_buffer"));
        }
        let (ptr, len) = {
            let b = slf.get();
            (b.arena.data_ptr(b.desc.start), b.desc.len as isize)
        };
        // SAFETY: `view` is a valid Py_buffer to fill (Python's contract for bf_getbuffer). The
        // exported memory is the block's byte range inside the arena's mapping, which stays
        // mapped and allocated while `obj` (this block, one reference) lives; the shape and
        // strides point into the view itself, as Python allows for one-dimensional buffers.
        unsafe {
            (*view).obj = slf.into_any().into_ptr();
            (*view).buf = ptr.cast::<c_void>();
            (*view).len = len;
            (*view).readonly = 0;
            (*view).itemsize = 1;
            (*view).format = if flags & ffi::PyBUF_FORMAT == ffi::PyBUF_FORMAT {
                c"B".as_ptr().cast_mut()
            } else {
                std::ptr::null_mut()
            };
            (*view).ndim = 1;
            (*view).shape = if flags & ffi::PyBUF_ND == ffi::PyBUF_ND {
                &mut (*view).len
            } else {
                std::ptr::null_mut()
            };
            (*view).strides = if flags & ffi::PyBUF_STRIDES == ffi::PyBUF_STRIDES {
                &mut (*view).itemsize
            } else {
                std::ptr::null_mut()
            };
            (*view).suboffsets = std::ptr::null_mut();
            (*view).internal = std::ptr::null_mut();
        }
        Ok(())
    }
}

impl Drop for PyBlock {
    fn drop(&mut self) {
        if *self.owned.get_mut() && std::process::id() == self.pid {
            self.arena.decref(&self.desc);
        }
    }
}
