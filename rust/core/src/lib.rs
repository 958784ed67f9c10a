//! # pipeflow-core
//!
//! The concurrency core of pipeflow, free of pyo3 so that `cargo test` and loom can check it
//! without linking Python. The binding crate (`rust/py`) is thin glue over these types.
//!
//! - [`Channel`]: a bounded multi-producer multi-consumer channel with Go's rules. Capacity 0 is a
//!   rendezvous; the producer closes; receivers drain what was sent and then see the end; a send on
//!   a closed channel fails and hands the value back.
//! - [`select_recv`]: receive from whichever of several channels is ready first.
//! - [`Pool`]: a work-stealing thread pool (crossbeam-deque: a global injector, a deque per worker,
//!   stealing). Threads are started on demand up to a limit and retire after an idle keep-alive,
//!   so long-running blocking tasks (pipeline stage workers) never starve each other.
//!
//! The lock-free and lock-based protocols of our own, the close gate of a channel ([`gate`]) and
//! the sleep/wake protocol of the pool ([`sleep`]), are model-checked with loom
//! (`RUSTFLAGS="--cfg loom" cargo test -p pipeflow-core --test loom --release`).

mod sync;

pub mod gate;
pub mod sleep;

#[cfg(not(loom))]
mod channel;
#[cfg(not(loom))]
mod pool;
#[cfg(target_os = "linux")]
pub mod shm;

#[cfg(not(loom))]
pub use channel::{
    select_recv, Channel, RecvError, SelectError, SendError, TryRecvError, TrySendError,
};
#[cfg(not(loom))]
pub use pool::{Job, Pool, PoolStats, SpawnError};
