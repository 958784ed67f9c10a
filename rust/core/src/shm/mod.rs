//! Shared memory between processes: memfd-backed mappings, futex wait/wake, the frame ring,
//! a shared word, and the arena of blocks for large buffers.
//!
//! Raw pointers live in this module alone. Linux only (memfd and futex). Under `--cfg loom`
//! the ring runs over heap memory with loom's atomics and cells, and the futex is modelled
//! with a loom mutex and condvar, so that loom checks the ring's protocol itself.
//!
//! The arena is built from one concept per module: `robust_mutex` (the lock in its header),
//! `extents` (its free list), `life` (a block's slot and life word), `page_cache` (which freed
//! pages go back to the OS) and `stream_copy` (the copy into a block); `arena` wires them.

#[cfg(not(loom))]
mod arena;
#[cfg(not(loom))]
mod extents;
mod futex;
#[cfg(not(loom))]
mod life;
#[cfg(not(loom))]
mod page_cache;
#[cfg(not(loom))]
mod region;
mod ring;
#[cfg(not(loom))]
mod robust_mutex;
#[cfg(not(loom))]
mod stream_copy;
#[cfg(not(loom))]
mod word;

#[cfg(not(loom))]
pub use arena::{Arena, Desc, Stats, PAGE};
#[cfg(not(loom))]
pub use region::Region;
pub use ring::{Consumer, PopError, Producer, PushError, Ring, RING_HEADER};
#[cfg(not(loom))]
pub use word::SharedWord;
