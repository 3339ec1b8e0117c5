//! Answering a peer about a document that is not in memory from its stored
//! bytes, without loading it.
//!
//! A new replica catching up on a table asks for every row document with a
//! request and acknowledges every answer. Served through automerge, each
//! row is loaded for the request (to save it whole into the answer) and,
//! once evicted, again for the acknowledgement: loading was 45% of the
//! serving side's time in a 100,000-row catch-up. Yet when the document is
//! stored as one saved document (or a whole history of change chunks), its
//! heads are in the chunk headers, and both steps are decided by the sync
//! state and those heads alone:
//!
//! - [`receive`]: a message without changes whose heads are ours (an
//!   acknowledgement) or empty (a peer that has nothing: a request) leaves
//!   the sync state exactly as automerge's `receive_sync_message` would.
//! - [`generate`]: for a peer that has nothing and understands the second
//!   message format, automerge sends the whole saved document; the stored
//!   bytes are that. For a peer in step, or one that has not answered yet,
//!   automerge sends nothing; for a peer whose last sync point is our heads
//!   (a reconnect in step, with the sync states kept), a message with our
//!   heads and an empty Bloom filter, built here exactly as automerge does.
//!   Everything else is left to automerge. The last two cases need only the
//!   heads, so they also spare automerge's work for loaded documents (a
//!   replica's acknowledgements).
//!
//! The whole-document answer differs from automerge's in two ways, neither
//! of which the protocol depends on. It carries no `have` (automerge sends
//! a Bloom filter of every change, which takes the change graph to build):
//! a peer then sends only the changes it is asked for, and a peer that had
//! nothing has nothing to send. And it records only the heads as sent,
//! where automerge records every change: should the peer ask again before
//! acknowledging, a change may be sent twice, which automerge ignores.
//! The tests hold both functions to automerge's own results.

use automerge::ChangeHash;
use automerge::sync::{self, BloomFilter, Capability, ChunkList, MessageFlags, MessageVersion};

/// Apply `message` to `state` as automerge would for a document whose heads
/// are `ours` (sorted, as automerge gives them), if the message has no
/// changes and names either our heads or none. Returns `false`, with
/// `state` untouched, for any other message.
pub(crate) fn receive(
    state: &mut sync::State,
    message: &sync::Message,
    ours: &[ChangeHash],
) -> bool {
    if !message.changes.is_empty() || !(message.heads.is_empty() || message.heads == ours) {
        return false;
    }
    state.in_flight = false;
    super::receive::take_flags(state, message.flags);
    // Every hash we sent is one of our changes, so our heads or an
    // ancestor of them: a peer that has our heads has them all. A peer
    // with no heads has lost its data (or never had any): start over.
    state.sent_hashes.clear();
    state.last_sent_heads = message.heads.clone();
    state.shared_heads = message.heads.clone();
    state.their_have = Some(message.have.clone());
    state.their_heads = Some(message.heads.clone());
    state.their_need = Some(message.need.clone());
    true
}

/// What automerge's `generate_sync_message` does for a document whose heads
/// are `ours` (sorted, not empty), if that is decided without the document:
/// `Some(None)` when it sends nothing, `Some(Some(message))` when it sends a
/// message without changes (exactly automerge's) or, given the document's
/// `saved` bytes, the whole document (the differences are in the module's
/// documentation); `None` when only automerge can tell, and `state` is then
/// untouched.
pub(crate) fn generate(
    state: &mut sync::State,
    ours: &[ChangeHash],
    saved: Option<&[u8]>,
) -> Option<Option<sync::Message>> {
    if ours.is_empty() || state.needs_reset {
        return None;
    }
    let within = |hashes: &[ChangeHash]| hashes.iter().all(|h| ours.contains(h));
    // A peer whose last sync point we do not have is told to reset: knowing
    // that takes the change graph, unless the point is among our heads.
    if let Some(first) = state.their_have.as_ref().and_then(|h| h.first())
        && !within(&first.last_sync)
    {
        return None;
    }
    // Automerge stays silent once it has told the peer our heads, while
    // that message is unanswered or while it has nothing to send a peer in
    // step with us (or one it does not take changes from).
    let responded = state.have_responded && state.last_sent_heads == ours;
    if responded && state.in_flight {
        return Some(None);
    }
    let v2 = state
        .their_capabilities
        .as_ref()
        .is_some_and(|c| c.contains(&Capability::MessageV2));
    // Whether the message carries the whole document (a peer that has
    // nothing); otherwise it carries no changes, or only automerge knows.
    let whole = match (&state.their_have, &state.their_need) {
        (Some(have), Some(need)) if !state.peer_read_only => {
            if state.their_heads.as_deref() == Some(&[]) && v2 {
                true
            } else {
                // Changes are due if the peer needs some or its sync points
                // fall short of our heads.
                let mut points: Vec<ChangeHash> = have
                    .iter()
                    .flat_map(|h| h.last_sync.iter().copied())
                    .collect();
                points.sort();
                points.dedup();
                if !(need.is_empty() && (have.is_empty() || points == ours)) {
                    return None;
                }
                false
            }
        }
        // A read-only peer is sent no changes; nor is one not heard from.
        _ => false,
    };
    let in_step = state.their_heads.as_deref() == Some(ours) || state.read_only;
    if !whole && responded && in_step {
        return Some(None);
    }
    let (changes, have, version) = if whole {
        (
            ChunkList::from(saved?.to_vec()),
            Vec::new(),
            MessageVersion::V2,
        )
    } else {
        // Our need (what their heads depend on that we lack: nothing, when
        // we have their heads) and our have (a Bloom filter of our changes
        // since the shared heads: none, when those are ours).
        let need_nothing = state.read_only || state.their_heads.as_deref().is_none_or(within);
        if !need_nothing || state.shared_heads != ours {
            return None;
        }
        let have = sync::Have {
            last_sync: ours.to_vec(),
            bloom: BloomFilter::from_hashes(std::iter::empty::<ChangeHash>()),
        };
        let version = if v2 {
            MessageVersion::V2
        } else {
            MessageVersion::V1
        };
        (ChunkList::from(Vec::<Vec<u8>>::new()), vec![have], version)
    };
    state.have_responded = true;
    state.last_sent_heads = ours.to_vec();
    if whole {
        state.sent_hashes.extend(ours.iter().copied());
    }
    state.in_flight = true;
    let mut flags = MessageFlags::new();
    flags.set(MessageFlags::SUPPORTS_SYNC_RESET);
    if state.read_only {
        flags.set(MessageFlags::READ_ONLY);
    }
    Some(Some(sync::Message {
        heads: ours.to_vec(),
        need: Vec::new(),
        have,
        changes,
        flags: Some(flags),
        version,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::sync::SyncDoc;
    use automerge::transaction::Transactable;
    use automerge::{ActorId, AutoCommit, ROOT};
    use proptest::prelude::*;
    use proptest::test_runner::TestRunner;
    use std::cell::RefCell;

    #[derive(Debug, Clone)]
    enum Step {
        /// The serving side (`0`) or the peer (`1`) writes.
        Edit(usize, u8),
        /// One side generates a message, delivered (`true`) or lost.
        Send(usize, bool),
        /// The peer is replaced by a new one that has nothing.
        Fresh,
        /// Both sides reconnect, keeping their documents and what a sync
        /// state persists (the shared heads), as Tandem stores them.
        Reconnect,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            2 => (0..2usize, any::<u8>()).prop_map(|(p, v)| Step::Edit(p, v)),
            6 => (0..2usize, prop::bool::weighted(0.7)).prop_map(|(p, ok)| Step::Send(p, ok)),
            1 => Just(Step::Fresh),
            2 => Just(Step::Reconnect),
        ]
    }

    fn new_state(read_only: bool) -> sync::State {
        if read_only {
            sync::State::new_read_only()
        } else {
            sync::State::new()
        }
    }

    /// Counts of the cases the functions decided, so the test can tell it
    /// exercised them.
    #[derive(Default)]
    struct Seen {
        received: usize,
        silent: usize,
        empty: usize,
        whole: usize,
    }

    /// The serving side's document, state and a peer, exchanging messages;
    /// at every step of the serving side, the two functions are checked
    /// against automerge on the same state, and automerge's result is kept.
    struct Exchange {
        ours: AutoCommit,
        state: sync::State,
        read_only: bool,
        peer: AutoCommit,
        peer_state: sync::State,
        seen: Seen,
    }

    impl Exchange {
        fn step(&mut self, step: Step) {
            match step {
                Step::Edit(p, v) => {
                    let doc = if p == 0 {
                        &mut self.ours
                    } else {
                        &mut self.peer
                    };
                    let key = if v % 2 == 0 { "a" } else { "b" };
                    doc.put(ROOT, key, i64::from(v)).unwrap();
                    doc.commit();
                }
                Step::Send(0, delivered) => {
                    if let Some(m) = self.server_sends()
                        && delivered
                    {
                        self.peer
                            .sync()
                            .receive_sync_message(&mut self.peer_state, m)
                            .unwrap();
                    }
                }
                Step::Send(_, delivered) => {
                    let m = self.peer.sync().generate_sync_message(&mut self.peer_state);
                    if let Some(m) = m
                        && delivered
                    {
                        self.server_receives(m);
                    }
                }
                Step::Fresh => {
                    self.peer = AutoCommit::new().with_actor(ActorId::random());
                    self.peer_state = sync::State::new();
                    self.state = new_state(self.read_only);
                }
                Step::Reconnect => {
                    self.peer_state = sync::State::decode(&self.peer_state.encode()).unwrap();
                    self.state = sync::State::decode(&self.state.encode()).unwrap();
                    self.state.read_only = self.read_only;
                }
            }
        }

        fn server_receives(&mut self, message: sync::Message) {
            let heads = self.ours.get_heads();
            let before = self.state.clone();
            let mut candidate = self.state.clone();
            let decided = receive(&mut candidate, &message, &heads);
            self.ours
                .sync()
                .receive_sync_message(&mut self.state, message)
                .unwrap();
            if decided {
                self.seen.received += 1;
                assert_eq!(candidate, self.state, "receive differs from automerge");
            } else {
                assert_eq!(candidate, before, "an undecided receive changed the state");
            }
        }

        fn server_sends(&mut self) -> Option<sync::Message> {
            let heads = self.ours.get_heads();
            let saved = self.ours.save();
            let before = self.state.clone();
            let mut candidate = self.state.clone();
            let decided = if heads.is_empty() {
                None
            } else {
                generate(&mut candidate, &heads, Some(&saved))
            };
            // Without the saved bytes, the same decision but for the whole
            // document, which is then left to automerge.
            let mut without = self.state.clone();
            let decided_without = if heads.is_empty() {
                None
            } else {
                generate(&mut without, &heads, None)
            };
            let reference = self.ours.sync().generate_sync_message(&mut self.state);
            match &decided {
                Some(Some(m)) if !m.changes.is_empty() => {
                    assert!(
                        decided_without.is_none(),
                        "a whole document without its bytes"
                    );
                    assert_eq!(without, before);
                }
                _ => {
                    assert_eq!(decided_without, decided);
                    assert_eq!(without, candidate);
                }
            }
            match decided {
                None => assert_eq!(candidate, before, "an undecided generate changed the state"),
                Some(None) => {
                    self.seen.silent += 1;
                    assert!(reference.is_none(), "automerge sends {reference:?}");
                    assert_eq!(candidate, self.state);
                }
                Some(Some(m)) if m.changes.is_empty() => {
                    self.seen.empty += 1;
                    assert_eq!(Some(&m), reference.as_ref(), "not automerge's message");
                    assert_eq!(candidate, self.state);
                }
                Some(Some(m)) => {
                    self.seen.whole += 1;
                    let a = reference.clone().expect("automerge sends a message too");
                    assert_eq!(m.heads, a.heads);
                    assert_eq!(m.need, a.need);
                    assert_eq!(m.changes, a.changes, "not the saved document");
                    assert_eq!(m.flags, a.flags);
                    assert_eq!(m.version, a.version);
                    assert!(m.have.is_empty());
                    // The state is automerge's, but for the hashes recorded
                    // as sent: the heads, of every change automerge records.
                    assert!(candidate.sent_hashes.is_subset(&self.state.sent_hashes));
                    let mut rest = candidate.clone();
                    rest.sent_hashes.clone_from(&self.state.sent_hashes);
                    assert_eq!(rest, self.state);
                    // The message decodes as it was built.
                    let decoded = sync::Message::decode(&m.clone().encode()).unwrap();
                    assert_eq!(decoded, m);
                }
            }
            reference
        }
    }

    /// On random histories, peers (new ones included), lost messages and
    /// read-only states, whatever the two functions decide is what automerge
    /// does, but for the documented differences; and they do decide each
    /// kind of case.
    #[test]
    fn decisions_match_automerge() {
        let mut runner = TestRunner::new(ProptestConfig::with_cases(300));
        let totals = RefCell::new(Seen::default());
        let cases = (
            prop::bool::weighted(0.5),
            prop::collection::vec(step(), 1..80),
        );
        runner
            .run(&cases, |(read_only, steps)| {
                let mut x = Exchange {
                    ours: AutoCommit::new().with_actor(ActorId::from(vec![1; 16])),
                    state: new_state(read_only),
                    read_only,
                    peer: AutoCommit::new().with_actor(ActorId::from(vec![2; 16])),
                    peer_state: sync::State::new(),
                    seen: Seen::default(),
                };
                x.ours.put(ROOT, "a", 0).unwrap();
                x.ours.commit();
                for step in steps {
                    x.step(step);
                }
                let mut totals = totals.borrow_mut();
                totals.received += x.seen.received;
                totals.silent += x.seen.silent;
                totals.empty += x.seen.empty;
                totals.whole += x.seen.whole;
                Ok(())
            })
            .unwrap();
        let totals = totals.into_inner();
        assert!(
            totals.received > 100,
            "{} receives decided",
            totals.received
        );
        assert!(totals.silent > 100, "{} silences decided", totals.silent);
        assert!(
            totals.empty > 20,
            "{} messages without changes",
            totals.empty
        );
        assert!(totals.whole > 100, "{} whole documents sent", totals.whole);
    }

    /// A new peer catching up from the serving side's stored bytes alone:
    /// request, whole document, acknowledgement, then silence; both end with
    /// the same document, and every step was decided without automerge.
    #[test]
    fn a_new_peer_catches_up_from_the_saved_bytes_alone() {
        let mut ours = AutoCommit::new();
        for i in 0..5 {
            ours.put(ROOT, "n", i).unwrap();
            ours.commit();
        }
        let heads = ours.get_heads();
        let saved = ours.save();
        let mut state = sync::State::new();

        let mut peer = AutoCommit::new();
        let mut peer_state = sync::State::new();
        let request = peer.sync().generate_sync_message(&mut peer_state).unwrap();
        assert!(receive(&mut state, &request, &heads), "the request");
        let answer = generate(&mut state, &heads, Some(&saved))
            .expect("decided")
            .expect("the whole document");
        peer.sync()
            .receive_sync_message(&mut peer_state, answer)
            .unwrap();
        assert_eq!(peer.get_heads(), heads);
        // The peer's acknowledgement is decided from its heads alone, and is
        // exactly automerge's.
        let mut by_hand = peer_state.clone();
        let decided = generate(&mut by_hand, &heads, None).expect("decided");
        let ack = peer
            .sync()
            .generate_sync_message(&mut peer_state)
            .expect("an acknowledgement");
        assert_eq!(decided.as_ref(), Some(&ack));
        assert_eq!(by_hand, peer_state);
        assert!(ack.changes.is_empty(), "the peer sends nothing back");
        assert!(receive(&mut state, &ack, &heads), "the acknowledgement");
        assert_eq!(generate(&mut state, &heads, Some(&saved)), Some(None));
        assert!(peer.sync().generate_sync_message(&mut peer_state).is_none());
        assert_eq!(state.shared_heads, heads);
    }
}
