//! Holding the engine's outputs until the commits they may depend on are
//! durable in IndexedDB.
//!
//! The engine generates sync messages (which advertise our heads) only after
//! `Storage::commit` returns, but in a browser that return means "in the
//! mirror", not "on disk" (see [`crate::storage`]). So every output taken
//! from the engine is tagged with the number of the last batch committed at
//! that moment, and released, in order, once that batch is durable. Outputs
//! tagged with an already-durable number (a handshake, a frame relayed
//! without new changes) pass at once. Order is kept across the whole queue,
//! so frames on one connection never overtake each other.

use std::collections::VecDeque;

/// A FIFO of outputs, each released once its batch is durable.
#[derive(Debug)]
pub struct OutputGate<T> {
    held: VecDeque<(u64, T)>,
    durable: u64,
}

impl<T> Default for OutputGate<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> OutputGate<T> {
    /// A gate where nothing is committed yet.
    pub fn new() -> Self {
        Self {
            held: VecDeque::new(),
            durable: 0,
        }
    }

    /// Queue `item`, which must wait until batch `needs` is durable.
    pub fn push(&mut self, needs: u64, item: T) {
        self.held.push_back((needs, item));
    }

    /// Batches up to `upto` are durable now.
    pub fn mark_durable(&mut self, upto: u64) {
        self.durable = self.durable.max(upto);
    }

    /// The last durable batch.
    pub fn durable(&self) -> u64 {
        self.durable
    }

    /// The next output that may leave, if the head of the queue is durable.
    pub fn pop_ready(&mut self) -> Option<T> {
        match self.held.front() {
            Some((needs, _)) if *needs <= self.durable => self.held.pop_front().map(|(_, t)| t),
            _ => None,
        }
    }

    /// How many outputs wait.
    pub fn held(&self) -> usize {
        self.held.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(gate: &mut OutputGate<&'static str>) -> Vec<&'static str> {
        std::iter::from_fn(|| gate.pop_ready()).collect()
    }

    #[test]
    fn nothing_leaves_before_its_batch_is_durable() {
        let mut gate = OutputGate::new();
        gate.push(0, "join");
        gate.push(1, "sync after batch 1");
        gate.push(1, "another after batch 1");
        gate.push(2, "sync after batch 2");
        assert_eq!(drain(&mut gate), vec!["join"]);
        gate.mark_durable(1);
        assert_eq!(
            drain(&mut gate),
            vec!["sync after batch 1", "another after batch 1"]
        );
        assert_eq!(gate.held(), 1);
        gate.mark_durable(2);
        assert_eq!(drain(&mut gate), vec!["sync after batch 2"]);
        assert_eq!(gate.held(), 0);
    }

    #[test]
    fn order_is_kept_even_for_outputs_that_need_nothing() {
        let mut gate = OutputGate::new();
        gate.push(3, "sync");
        gate.push(0, "ephemeral");
        assert_eq!(drain(&mut gate), Vec::<&str>::new());
        gate.mark_durable(3);
        assert_eq!(drain(&mut gate), vec!["sync", "ephemeral"]);
    }

    #[test]
    fn durability_never_goes_back() {
        let mut gate: OutputGate<()> = OutputGate::new();
        gate.mark_durable(5);
        gate.mark_durable(2);
        assert_eq!(gate.durable(), 5);
    }
}
