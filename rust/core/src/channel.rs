//! A bounded MPMC channel with Go's rules, on crossbeam-channel.
//!
//! The buffer is a crossbeam `bounded(capacity)` channel (capacity 0: a rendezvous, each send
//! meets a receive). Close is the [`Gate`]: senders register with it, `close` sets its bit and
//! drops the only sender of a second, empty "closed" channel, which wakes every thread blocked in
//! a crossbeam select on it. Blocked operations therefore select on two things, the data operation
//! and the closed signal, so `close` wakes blocked senders (they fail) and blocked receivers (they
//! drain, then see the end).
//!
//! Every blocking operation takes an optional deadline, so that a caller can block in slices and
//! look for interrupts (Ctrl-C) between them.

use std::time::{Duration, Instant};

use crossbeam_channel::{self as cc, Select};

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::gate::Gate;
use crate::sync::{lock, Mutex};

/// The type of the closed signal: nothing is ever sent on it, it only disconnects.
enum Never {}

/// How long a receiver waits between looks when the channel is closed but a sender is still in
/// flight (a short, rare window: the sender is between its registration and its push).
const IN_FLIGHT_POLL: Duration = Duration::from_millis(1);

/// Why a blocking send did not happen. The value is handed back.
#[derive(Debug, PartialEq, Eq)]
pub enum SendError<T> {
    /// The channel is closed.
    Closed(T),
    /// The deadline passed first.
    Timeout(T),
}

/// Why a non-blocking send did not happen. The value is handed back.
#[derive(Debug, PartialEq, Eq)]
pub enum TrySendError<T> {
    /// The buffer is full (or, for a rendezvous, no receiver is waiting).
    Full(T),
    /// The channel is closed.
    Closed(T),
}

/// Why a blocking receive returned nothing.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum RecvError {
    /// The channel is closed and drained: nothing more will come.
    Closed,
    /// The deadline passed first.
    Timeout,
}

/// Why a non-blocking receive returned nothing.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum TryRecvError {
    /// Nothing is buffered now.
    Empty,
    /// The channel is closed and drained.
    Closed,
}

/// Why [`select_recv`] returned nothing.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum SelectError {
    /// Every channel is closed and drained.
    AllClosed,
    /// The deadline passed first.
    Timeout,
}

/// A bounded multi-producer multi-consumer channel with Go's close rules.
pub struct Channel<T> {
    tx: cc::Sender<T>,
    rx: cc::Receiver<T>,
    gate: Gate,
    /// Dropped by `close`: its receiver then reports "disconnected" to every select.
    closed_tx: Mutex<Option<cc::Sender<Never>>>,
    closed_rx: cc::Receiver<Never>,
    capacity: usize,
}

impl<T> Channel<T> {
    /// A channel that buffers up to `capacity` values; 0 makes every send wait for a receiver.
    pub fn new(capacity: usize) -> Self {
        let (tx, rx) = cc::bounded(capacity);
        let (closed_tx, closed_rx) = cc::bounded(0);
        Channel {
            tx,
            rx,
            gate: Gate::new(),
            closed_tx: Mutex::new(Some(closed_tx)),
            closed_rx,
            capacity,
        }
    }

    /// The buffer size given at creation.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// How many values are buffered now.
    pub fn len(&self) -> usize {
        self.rx.len()
    }

    /// True if nothing is buffered now.
    pub fn is_empty(&self) -> bool {
        self.rx.is_empty()
    }

    /// True once the channel is closed (values may still be buffered).
    pub fn is_closed(&self) -> bool {
        self.gate.is_closed()
    }

    /// Closes the channel. Returns true if this call closed it. Blocked senders fail with
    /// `Closed`; receivers drain what is buffered, then see `Closed`.
    pub fn close(&self) -> bool {
        let first = self.gate.close();
        if first {
            // Dropping the only sender of the closed signal wakes every select waiting on it.
            drop(lock(&self.closed_tx).take());
        }
        first
    }

    /// Sends without blocking.
    pub fn try_send(&self, value: T) -> Result<(), TrySendError<T>> {
        if !self.gate.begin_send() {
            return Err(TrySendError::Closed(value));
        }
        let res = self.tx.try_send(value).map_err(|e| match e {
            cc::TrySendError::Full(v) => TrySendError::Full(v),
            // We hold a receiver for the channel's whole life: it never disconnects.
            cc::TrySendError::Disconnected(v) => TrySendError::Closed(v),
        });
        self.gate.end_send();
        res
    }

    /// Sends, blocking while the buffer is full, until `deadline` (None: no deadline).
    pub fn send(&self, value: T, deadline: Option<Instant>) -> Result<(), SendError<T>> {
        if !self.gate.begin_send() {
            return Err(SendError::Closed(value));
        }
        let res = self.send_registered(value, deadline);
        self.gate.end_send();
        res
    }

    fn send_registered(&self, value: T, deadline: Option<Instant>) -> Result<(), SendError<T>> {
        let value = match self.tx.try_send(value) {
            Ok(()) => return Ok(()),
            Err(cc::TrySendError::Full(v)) | Err(cc::TrySendError::Disconnected(v)) => v,
        };
        let mut sel = Select::new();
        let send_op = sel.send(&self.tx);
        sel.recv(&self.closed_rx);
        let oper = match deadline {
            None => sel.select(),
            Some(d) => match sel.select_deadline(d) {
                Ok(op) => op,
                Err(_) => return Err(SendError::Timeout(value)),
            },
        };
        if oper.index() == send_op {
            oper.send(&self.tx, value)
                .map_err(|e| SendError::Closed(e.into_inner()))
        } else {
            let _ = oper.recv(&self.closed_rx);
            Err(SendError::Closed(value))
        }
    }

    /// Receives without blocking.
    pub fn try_recv(&self) -> Result<T, TryRecvError> {
        match self.rx.try_recv() {
            Ok(v) => Ok(v),
            Err(_) if self.gate.is_final() => {
                // Closed with nobody in flight: one more look sees every accepted value.
                self.rx.try_recv().map_err(|_| TryRecvError::Closed)
            }
            Err(_) => Err(TryRecvError::Empty),
        }
    }

    /// Receives, blocking while the channel is empty and open, until `deadline`.
    pub fn recv(&self, deadline: Option<Instant>) -> Result<T, RecvError> {
        loop {
            match self.try_recv() {
                Ok(v) => return Ok(v),
                Err(TryRecvError::Closed) => return Err(RecvError::Closed),
                Err(TryRecvError::Empty) => {}
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(RecvError::Timeout);
            }
            if self.gate.is_closed() {
                // Closed, but a sender is still in flight: wait briefly for its push.
                let until = soonest(deadline, Instant::now() + IN_FLIGHT_POLL);
                if let Ok(v) = self.rx.recv_deadline(until) {
                    return Ok(v);
                }
                continue;
            }
            let mut sel = Select::new();
            let recv_op = sel.recv(&self.rx);
            sel.recv(&self.closed_rx);
            let oper = match deadline {
                None => sel.select(),
                Some(d) => match sel.select_deadline(d) {
                    Ok(op) => op,
                    Err(_) => return Err(RecvError::Timeout),
                },
            };
            if oper.index() == recv_op {
                if let Ok(v) = oper.recv(&self.rx) {
                    return Ok(v);
                }
            } else {
                let _ = oper.recv(&self.closed_rx);
            }
        }
    }
}

fn soonest(deadline: Option<Instant>, other: Instant) -> Instant {
    match deadline {
        Some(d) if d < other => d,
        _ => other,
    }
}

/// Where the next [`select_recv`] starts looking.
static SELECT_ROTATION: AtomicUsize = AtomicUsize::new(0);

/// Receives from whichever of `channels` has a value first, returning its index and the value.
/// Channels that are closed and drained are skipped; when all are, the result is `AllClosed`.
pub fn select_recv<T>(
    channels: &[&Channel<T>],
    deadline: Option<Instant>,
) -> Result<(usize, T), SelectError> {
    let n = channels.len();
    loop {
        let mut any_open = false;
        let mut any_in_flight = false;
        // Per channel: was it open when we looked? Its close signal is watched below.
        let mut was_open = vec![false; n];
        // Look from a rotating start, so that when several channels are ready each gets its
        // turn (Go picks among ready cases at random). Relaxed: only spreads the starts.
        let start = SELECT_ROTATION.fetch_add(1, Ordering::Relaxed);
        for k in 0..n {
            let i = (start + k) % n;
            match channels[i].try_recv() {
                Ok(v) => return Ok((i, v)),
                Err(TryRecvError::Closed) => {}
                Err(TryRecvError::Empty) => {
                    let closed = channels[i].is_closed();
                    any_open = true;
                    any_in_flight |= closed;
                    was_open[i] = !closed;
                }
            }
        }
        if !any_open {
            return Err(SelectError::AllClosed);
        }
        let now = Instant::now();
        if deadline.is_some_and(|d| now >= d) {
            return Err(SelectError::Timeout);
        }
        // Wait for any data or close signal; (index, is_data) for each registered operation.
        let mut sel = Select::new();
        let mut ops = Vec::with_capacity(channels.len() * 2);
        for (i, ch) in channels.iter().enumerate() {
            sel.recv(&ch.rx);
            ops.push((i, true));
            // Decided by what the look above saw, not by a second `is_closed()`: a channel that
            // closes in between must still be watched (its signal then fires at once), or a
            // select with no deadline would wait forever on a buffer nobody will fill.
            if was_open[i] {
                sel.recv(&ch.closed_rx);
                ops.push((i, false));
            }
        }
        let until = if any_in_flight {
            Some(soonest(deadline, now + IN_FLIGHT_POLL))
        } else {
            deadline
        };
        let oper = match until {
            None => sel.select(),
            Some(d) => match sel.select_deadline(d) {
                Ok(op) => op,
                Err(_) => continue,
            },
        };
        let (i, is_data) = ops[oper.index()];
        if is_data {
            if let Ok(v) = oper.recv(&channels[i].rx) {
                return Ok((i, v));
            }
        } else {
            let _ = oper.recv(&channels[i].closed_rx);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::thread;

    fn soon(ms: u64) -> Option<Instant> {
        Some(Instant::now() + Duration::from_millis(ms))
    }

    #[test]
    fn buffered_send_then_recv_in_order() {
        let ch = Channel::new(3);
        for i in 0..3 {
            ch.send(i, None).unwrap();
        }
        assert_eq!(ch.len(), 3);
        assert_eq!(ch.try_send(9), Err(TrySendError::Full(9)));
        assert_eq!(
            (0..3).map(|_| ch.recv(None).unwrap()).collect::<Vec<_>>(),
            [0, 1, 2]
        );
        assert_eq!(ch.try_recv(), Err(TryRecvError::Empty));
    }

    #[test]
    fn close_drains_then_ends_and_rejects_sends() {
        let ch = Channel::new(4);
        ch.send(1, None).unwrap();
        ch.send(2, None).unwrap();
        assert!(ch.close());
        assert!(!ch.close());
        assert_eq!(ch.send(3, None), Err(SendError::Closed(3)));
        assert_eq!(ch.try_send(4), Err(TrySendError::Closed(4)));
        assert_eq!(ch.recv(None), Ok(1));
        assert_eq!(ch.try_recv(), Ok(2));
        assert_eq!(ch.recv(None), Err(RecvError::Closed));
        assert_eq!(ch.try_recv(), Err(TryRecvError::Closed));
    }

    #[test]
    fn timeouts_hand_the_value_back() {
        let ch = Channel::new(1);
        ch.send(1, None).unwrap();
        assert_eq!(ch.send(2, soon(10)), Err(SendError::Timeout(2)));
        ch.recv(None).unwrap();
        assert_eq!(ch.recv(soon(10)), Err(RecvError::Timeout));
    }

    #[test]
    fn rendezvous_needs_a_receiver() {
        let ch = Arc::new(Channel::new(0));
        assert_eq!(ch.try_send(1), Err(TrySendError::Full(1)));
        let c2 = Arc::clone(&ch);
        let t = thread::spawn(move || c2.recv(None));
        ch.send(7, None).unwrap();
        assert_eq!(t.join().unwrap(), Ok(7));
    }

    #[test]
    fn close_wakes_blocked_sender_and_receiver() {
        let full = Arc::new(Channel::new(1));
        full.send(0, None).unwrap();
        let empty = Arc::new(Channel::<i32>::new(1));
        let (f2, e2) = (Arc::clone(&full), Arc::clone(&empty));
        let s = thread::spawn(move || f2.send(1, None));
        let r = thread::spawn(move || e2.recv(None));
        thread::sleep(Duration::from_millis(20));
        full.close();
        empty.close();
        assert_eq!(s.join().unwrap(), Err(SendError::Closed(1)));
        assert_eq!(r.join().unwrap(), Err(RecvError::Closed));
        assert_eq!(full.recv(None), Ok(0));
    }

    #[test]
    fn select_picks_the_ready_channel_and_skips_closed_ones() {
        let a = Channel::new(1);
        let b = Channel::new(1);
        a.close();
        b.send(5, None).unwrap();
        assert_eq!(select_recv(&[&a, &b], None), Ok((1, 5)));
        assert_eq!(select_recv(&[&a, &b], soon(10)), Err(SelectError::Timeout));
        b.close();
        assert_eq!(select_recv(&[&a, &b], None), Err(SelectError::AllClosed));
    }

    #[test]
    fn select_wakes_on_a_later_send() {
        let chans: Arc<Vec<Channel<u32>>> = Arc::new((0..3).map(|_| Channel::new(0)).collect());
        let c2 = Arc::clone(&chans);
        let t = thread::spawn(move || {
            let refs: Vec<&Channel<u32>> = c2.iter().collect();
            select_recv(&refs, None)
        });
        thread::sleep(Duration::from_millis(10));
        chans[2].send(42, None).unwrap();
        assert_eq!(t.join().unwrap(), Ok((2, 42)));
    }
}
