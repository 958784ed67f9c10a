//! The close gate of a channel: Go's "the producer closes" rule on top of a buffer that has no
//! close of its own.
//!
//! crossbeam-channel disconnects only when every `Sender` is dropped; Go's `close` is an explicit
//! act after which receivers drain what was sent and then see the end, and senders fail. The gate
//! is one atomic word:
//!
//! ```text
//!   bit 0      CLOSED: close() has happened
//!   bits 1..   the number of senders between begin_send() and end_send() ("in flight")
//! ```
//!
//! A sender registers (`begin_send`, +2) before it touches the buffer and deregisters after
//! (`end_send`, -2). Registration fails if CLOSED is already set. A receiver that finds the buffer
//! empty may conclude "closed and drained" only when it reads the word as exactly `CLOSED` (closed,
//! nobody in flight) and then finds the buffer empty once more.
//!
//! ## Why no accepted item is lost
//!
//! Every update is a read-modify-write of the one word, so they form one modification order. A
//! receiver that reads `CLOSED` (count 0) reads the result of an RMW that comes after every
//! successful sender's `end_send` (their increments preceded the close, or registration would have
//! failed, and the count returned to 0). `end_send` is a Release RMW and the receiver's load is
//! Acquire; later RMWs continue the release sequence, so each such sender's push into the buffer
//! happens-before the receiver's second look at the buffer, which therefore sees the item (or
//! another receiver took it). The loom model in `tests/loom.rs` checks this.

use crate::sync::{AtomicUsize, Ordering};

/// Bit 0 of the gate word: the channel is closed.
const CLOSED: usize = 1;
/// One sender in flight, counted above the CLOSED bit.
const ONE_SENDER: usize = 2;

/// The close state of a channel: a CLOSED bit and a count of senders in flight.
#[derive(Debug, Default)]
pub struct Gate {
    /// `CLOSED` bit | in-flight senders * `ONE_SENDER`.
    word: AtomicUsize,
}

impl Gate {
    /// A new, open gate.
    pub fn new() -> Self {
        Gate {
            word: AtomicUsize::new(0),
        }
    }

    /// Registers a sender. Returns false (and registers nothing) if the gate is closed.
    pub fn begin_send(&self) -> bool {
        // A plain look first, so that senders retrying on a closed gate never touch the count
        // (a waiter for `is_final` could otherwise be kept waiting by their brief increments).
        if self.word.load(Ordering::Acquire) & CLOSED != 0 {
            return false;
        }
        // AcqRel: the Acquire half orders this sender after a close it fails against (nothing to
        // publish then); the Release half is not needed for correctness but costs nothing on RMWs.
        let prev = self.word.fetch_add(ONE_SENDER, Ordering::AcqRel);
        if prev & CLOSED != 0 {
            self.word.fetch_sub(ONE_SENDER, Ordering::AcqRel);
            return false;
        }
        true
    }

    /// Deregisters a sender registered by a successful [`Gate::begin_send`].
    pub fn end_send(&self) {
        // Release: pairs with the Acquire load in `is_final`, so the push this sender
        // made into the buffer is visible to a receiver that then reads "closed, none in flight".
        self.word.fetch_sub(ONE_SENDER, Ordering::Release);
    }

    /// Closes the gate. Returns true if this call closed it, false if it was closed already.
    pub fn close(&self) -> bool {
        // AcqRel: one total order with the senders' RMWs on the same word is what matters.
        self.word.fetch_or(CLOSED, Ordering::AcqRel) & CLOSED == 0
    }

    /// True once [`Gate::close`] has happened.
    pub fn is_closed(&self) -> bool {
        self.word.load(Ordering::Acquire) & CLOSED != 0
    }

    /// True if the gate is closed and no sender is in flight: a receiver that now finds the buffer
    /// empty has seen everything that will ever be sent.
    pub fn is_final(&self) -> bool {
        // Acquire: pairs with the Release in `end_send` (see the module docs).
        self.word.load(Ordering::Acquire) == CLOSED
    }
}
