//! Shared memory between processes: memfd-backed mappings, futex wait/wake, and the frame ring.
//!
//! Raw pointers live in this module alone. Linux only (memfd and futex).

mod futex;
mod region;
mod ring;

pub use region::Region;
pub use ring::{PopError, PushError, Ring, RING_HEADER};
