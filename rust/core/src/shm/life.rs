//! The life of an arena block: its slot record, and the one atomic word ([`Life`]) that holds
//! the block's generation, state and reference count.
//!
//! A block is named by a [`Desc`](super::Desc) (slot, generation, and a byte range inside the
//! block), which is what travels in messages. Its life:
//!
//! - `alloc` takes a free extent and a free slot under the mutex: state `WRITING`, one reference,
//!   owned by the allocating process's tag ([`Slot::publish`]).
//! - The holder of a reference may add one (`incref`) to put the block in a message. The block
//!   stays `WRITING` until a receiver takes it from a message and marks it `SHARED` (`share`):
//!   so the blocks of a dead writer that nobody took (being written, or in a message never read)
//!   are freed by `reclaim(owner)` when the parent sees the writer die.
//! - The last `decref` frees the block (under the mutex: see the arena).
//!
//! A stale descriptor (of a block freed since, whose slot may hold another block now) changes
//! nothing: a slot's generation, state and reference count share one atomic word, so `incref`,
//! `decref` and `share` check the generation in the same compare-exchange that makes their
//! change, and fail on a descriptor of an earlier allocation of the slot. (The generation has 32
//! bits: a descriptor 2^32 allocations of its slot old would pass again.)
//!
//! Invariants: a slot's place (`off`, `len`) and `owner` change only while its life is `FREE`,
//! under the arena's mutex, and are published by the Release store of the new life; a free slot's
//! life is changed only by allocation, under the mutex; the reference count never exceeds
//! [`MAX_REFS`], so it never carries into the state bits.

use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};

/// A slot's state: no block.
pub(crate) const FREE: u32 = 0;
/// A slot's state: a block its writer holds, not yet taken from a message by anyone else.
pub(crate) const WRITING: u32 = 1;
/// A slot's state: a block some receiver took (its writer's death does not free it).
pub(crate) const SHARED: u32 = 2;

/// The most references a block can have (the count's 30 bits).
pub(crate) const MAX_REFS: u32 = (1 << 30) - 1;

/// A slot's generation (bits 63..32), state (bits 31..30) and reference count (bits 29..0), in
/// one word so that a change checks all three at once.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct Life(u64);

impl Life {
    pub(crate) fn new(gen: u32, state: u32, refs: u32) -> Life {
        Life(u64::from(gen) << 32 | u64::from(state) << 30 | u64::from(refs))
    }
    pub(crate) fn gen(self) -> u32 {
        (self.0 >> 32) as u32
    }
    pub(crate) fn state(self) -> u32 {
        (self.0 >> 30) as u32 & 3
    }
    pub(crate) fn refs(self) -> u32 {
        self.0 as u32 & MAX_REFS
    }
    /// Live, and the allocation `gen`: what a descriptor must name before anything is done.
    pub(crate) fn is(self, gen: u32) -> bool {
        self.state() != FREE && self.gen() == gen && self.refs() > 0
    }
}

/// One block's record in the arena's slots array, in shared memory (32 bytes; see the arena's
/// layout). Every field is atomic: other processes read it meanwhile.
#[repr(C)]
pub(crate) struct Slot {
    /// The block's [`Life`]; every change of it is one atomic step.
    life: AtomicU64,
    /// The owner tag of the process that allocated the block (see `Arena::new_tag`).
    owner: AtomicU32,
    _pad: u32,
    /// The block's place in the data area: its offset and length.
    off: AtomicU64,
    len: AtomicU64,
}

const _: () = assert!(std::mem::size_of::<Slot>() == 32);

impl Slot {
    /// The life, Acquire: pairs with the Release of `alloc` (the place fields are set).
    pub(crate) fn life(&self) -> Life {
        Life(self.life.load(Ordering::Acquire))
    }

    /// The block's offset and length in the data area.
    pub(crate) fn place(&self) -> (u64, u64) {
        (
            self.off.load(Ordering::Relaxed),
            self.len.load(Ordering::Relaxed),
        )
    }

    /// The owner tag the block was allocated with.
    pub(crate) fn owner(&self) -> u32 {
        self.owner.load(Ordering::Relaxed)
    }

    /// Applies `change` to the life as one compare-exchange (retried if another process changed
    /// the word meanwhile); None, changing nothing, if `change` refuses the life it sees.
    fn update(&self, success: Ordering, change: impl Fn(Life) -> Option<Life>) -> Option<Life> {
        self.life
            .fetch_update(success, Ordering::Relaxed, |v| change(Life(v)).map(|l| l.0))
            .ok()
            .map(Life)
    }

    /// Makes a free slot hold a new block at `[off, off + len)`, `WRITING` with one reference,
    /// owned by `owner`; returns its generation. Only under the arena's mutex.
    pub(crate) fn publish(&self, off: u64, len: u64, owner: u32) -> u32 {
        let gen = self.life().gen().wrapping_add(1);
        self.off.store(off, Ordering::Relaxed);
        self.len.store(len, Ordering::Relaxed);
        self.owner.store(owner, Ordering::Relaxed);
        // Release: whoever reads the new life (check, find, a rebuild) sees the fields above. A
        // plain store: the slot is free, and only allocation (under the mutex) changes a free
        // slot's life.
        self.life
            .store(Life::new(gen, WRITING, 1).0, Ordering::Release);
        gen
    }

    /// Adds a reference to allocation `gen`, whose caller holds one. False, changing nothing,
    /// for a stale generation or a block at `MAX_REFS`.
    pub(crate) fn incref(&self, gen: u32) -> bool {
        // Relaxed: the caller holds a reference, so the block cannot be freed meanwhile; the
        // message that carries the new reference orders everything else (ring: release/acquire).
        self.update(Ordering::Relaxed, |l| {
            (l.is(gen) && l.refs() < MAX_REFS).then(|| Life(l.0 + 1))
        })
        .is_some()
    }

    /// Adds a reference and marks the block `SHARED`, in one step. False, changing nothing, for
    /// a stale generation or a block at `MAX_REFS`.
    pub(crate) fn hold(&self, gen: u32) -> bool {
        // Release: as `share`; the new reference is the caller's own, so nothing else is
        // published through it.
        self.update(Ordering::Release, |l| {
            (l.is(gen) && l.refs() < MAX_REFS).then(|| Life::new(l.gen(), SHARED, l.refs() + 1))
        })
        .is_some()
    }

    /// Marks allocation `gen` `SHARED`. False for a stale generation.
    pub(crate) fn share(&self, gen: u32) -> bool {
        // Release: as the old state store; the block's bytes were written before it is shared.
        self.update(Ordering::Release, |l| {
            l.is(gen).then(|| Life::new(l.gen(), SHARED, l.refs()))
        })
        .is_some()
    }

    /// Drops a reference to allocation `gen`: None, changing nothing, for a stale generation;
    /// whether it was the last (the caller then frees the block) otherwise.
    pub(crate) fn decref(&self, gen: u32) -> Option<bool> {
        // Release, then Acquire on the last: every use of the block by any holder happens
        // before it is freed and reused (the same protocol as `Arc`).
        let before = self.update(Ordering::Release, |l| l.is(gen).then(|| Life(l.0 - 1)))?;
        let last = before.refs() == 1;
        if last {
            fence(Ordering::Acquire);
        }
        Some(last)
    }

    /// Marks allocation `gen` free, if it still is that allocation (and, with `only_writing`,
    /// still unshared or unreferenced); false, changing nothing, otherwise. Only under the
    /// arena's mutex, after reading the place fields.
    pub(crate) fn free(&self, gen: u32, only_writing: bool) -> bool {
        // Release: the place fields were read (by the caller) before the slot can be taken
        // again.
        self.update(Ordering::Release, |l| {
            let mine = l.state() != FREE && l.gen() == gen;
            let unshared = !only_writing || l.state() == WRITING || l.refs() == 0;
            (mine && unshared).then(|| Life::new(gen, FREE, 0))
        })
        .is_some()
    }

    /// Marks the slot free as it is, keeping its generation: a rebuild's verdict on a block with
    /// no reference left. Only under the arena's mutex.
    pub(crate) fn clear(&self, life: Life) {
        self.life
            .store(Life::new(life.gen(), FREE, 0).0, Ordering::Release);
    }

    /// Sets the life as it is (tests: a state a process left behind when it died).
    #[cfg(test)]
    pub(crate) fn set_life(&self, life: Life) {
        self.life.store(life.0, Ordering::Relaxed);
    }

    /// Sets the place as it is (tests: a slot another process scribbled on).
    #[cfg(test)]
    pub(crate) fn set_place(&self, off: u64, len: u64) {
        self.off.store(off, Ordering::Relaxed);
        self.len.store(len, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shm::arena::tests::{all, fill};
    use crate::shm::{Arena, Desc, PAGE};

    #[test]
    fn the_three_fields_share_one_word_without_overlap() {
        let life = Life::new(u32::MAX, SHARED, MAX_REFS);
        assert_eq!(
            (life.gen(), life.state(), life.refs()),
            (u32::MAX, SHARED, MAX_REFS)
        );
        let life = Life::new(7, WRITING, 0);
        assert_eq!((life.gen(), life.state(), life.refs()), (7, WRITING, 0));
        assert!(!life.is(7), "a block without references is not live");
        assert!(Life::new(7, WRITING, 1).is(7));
        assert!(!Life::new(7, FREE, 1).is(7));
        assert!(!Life::new(7, SHARED, 1).is(8));
    }

    #[test]
    fn references_keep_a_block_until_the_last_goes() {
        let arena = Arena::create(8 * PAGE, 4).unwrap();
        let a = arena.alloc(PAGE, 1).unwrap();
        fill(&arena, &a, 9);
        arena.incref(&a);
        arena.decref(&a);
        assert!(arena.check(&a).is_ok());
        assert!(all(&arena, &a, 9));
        arena.decref(&a);
        assert!(arena.check(&a).is_err());
        // The pages went back to the OS: a new block there reads zeros.
        let b = arena.alloc(PAGE, 1).unwrap();
        assert_eq!(b.start, a.start);
        assert!(all(&arena, &b, 0));
        assert!(arena.check(&a).is_err(), "a stale descriptor stays stale");
    }

    #[test]
    fn a_stale_descriptor_changes_nothing_about_the_slots_next_block() {
        let arena = Arena::create(8 * PAGE, 1).unwrap(); // one slot: the next block reuses it
        let old = arena.alloc(PAGE, 5).unwrap();
        assert!(arena.decref(&old)); // freed
        let new = arena.alloc(PAGE, 5).unwrap();
        assert_eq!((new.slot, new.gen), (old.slot, old.gen + 1));
        // Each of these used to act on `new`: lower its count (freeing it under its holder),
        // raise it (leaking it), or mark it shared (keeping `reclaim` from freeing it).
        assert!(!arena.decref(&old));
        assert!(!arena.incref(&old));
        assert!(!arena.share(&old));
        assert!(arena.check(&old).is_err());
        assert!(arena.adopt(&old, true).is_err());
        let life = arena.slot(new.slot as usize).life();
        assert_eq!((life.state(), life.refs()), (WRITING, 1));
        // So `new`'s dead writer's block is still reclaimed, and freed exactly once.
        assert_eq!(arena.reclaim(5), 1);
        assert!(!arena.decref(&new));
        assert_eq!(arena.free_extents(), (8 * PAGE as u64, 1));
    }

    #[test]
    fn a_kept_borrowed_block_survives_its_writers_death() {
        let arena = Arena::create(8 * PAGE, 4).unwrap();
        let lent = arena.alloc(PAGE, 7).unwrap(); // writer 7 lends it, unshared
        assert!(arena.hold(&lent)); // a borrower keeps it
        assert_eq!(
            arena.reclaim(7),
            0,
            "reclaim freed a block another holder keeps"
        );
        assert!(arena.check(&lent).is_ok());
        let next = arena.alloc(PAGE, 1).unwrap();
        assert_ne!(
            next.start, lent.start,
            "the kept block's pages were handed out again"
        );
        assert!(arena.decref(&lent)); // the borrower's reference; the dead writer's is leaked
        assert!(arena.check(&lent).is_ok());
        let stale = Desc {
            gen: lent.gen + 1,
            ..lent
        };
        assert!(!arena.hold(&stale));
    }

    #[test]
    fn a_reference_count_at_its_limit_refuses_another() {
        let arena = Arena::create(4 * PAGE, 2).unwrap();
        let d = arena.alloc(PAGE, 1).unwrap();
        arena
            .slot(d.slot as usize)
            .set_life(Life::new(d.gen, SHARED, MAX_REFS));
        assert!(
            !arena.incref(&d),
            "the count would wrap into the state bits"
        );
        let life = arena.slot(d.slot as usize).life();
        assert_eq!(
            (life.gen(), life.state(), life.refs()),
            (d.gen, SHARED, MAX_REFS)
        );
    }

    #[test]
    fn reclaim_frees_only_a_dead_writers_unshared_blocks() {
        let arena = Arena::create(8 * PAGE, 8).unwrap();
        let writing = arena.alloc(PAGE, 5).unwrap();
        let shared = arena.alloc(PAGE, 5).unwrap();
        arena.share(&shared);
        let other = arena.alloc(PAGE, 6).unwrap();
        assert_eq!(arena.reclaim(5), 1);
        assert!(arena.check(&writing).is_err());
        assert!(arena.check(&shared).is_ok());
        assert!(arena.check(&other).is_ok());
    }
}
