//! A deterministic in-memory network of repos, for convergence tests.
//!
//! A [`Network`] holds 2 to 5 (or more) [`Repo`]s ("nodes") and links between
//! pairs of them. Each link carries frames in two queues, one per direction;
//! one side of a link connected [`Direction::Outgoing`], the other
//! [`Direction::Incoming`], each with its own [`ConnectionId`]. Every choice
//! the network makes (which frame to deliver next, which fault to inject, how
//! far virtual time advances) comes from one seeded [`StdRng`], so a seed
//! replays the same schedule.
//!
//! Faults, each with its own probability ([`Faults`]):
//!
//! * **reorder**: deliver a random queued frame instead of the oldest;
//! * **duplicate**: deliver a frame but leave a copy queued;
//! * **drop**: discard a frame instead of delivering it;
//! * **disconnect**: tear a link down (both sides see `disconnect`, queued
//!   frames are discarded) and later **reconnect** it with fresh ids.
//!
//! An [`Output::Close`] from a repo tears its link down the same way.
//!
//! Automerge's sync protocol waits for an answer to the message it has in
//! flight, so a dropped frame stalls a document on that connection until the
//! connection is re-established. That matches WebSocket reality (losing a
//! frame means losing the connection), and is why [`Network::heal`] stops the
//! faults and reconnects every link before running to quiescence.
//!
//! The durable-ack rule: repos emit sync messages only from
//! [`Repo::flush`], so after delivering frames every step flushes every repo.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tandem_engine::automerge::{
    ActorId, AutoCommit, Automerge, AutomergeError, ChangeHash, ObjId, ObjType, ROOT, ReadDoc,
    ScalarValue, Value,
};
use tandem_engine::protocol::Message;
use tandem_engine::{
    ConnectionId, Direction, DocumentId, Event, MemoryStorage, Output, PeerId, Repo, RepoConfig,
    ServeOnRequest, ShareAll, Storage,
};

/// The storage every simulated repo runs on: shared, so a node can be
/// restarted on the same store.
pub type SimStorage = Arc<dyn Storage>;

/// A simulated repo.
pub type SimRepo = Repo<SimStorage>;

/// Steps [`Network::heal`] allows before declaring the network stuck.
pub const HEAL_MAX_STEPS: usize = 20_000;

/// Which share policy a node runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A client: [`ShareAll`], announces every document to every peer.
    Client,
    /// A server: [`ServeOnRequest`], serves what it is asked for.
    Server,
}

/// The shape of a network built by [`Network::build`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Topology {
    /// Node 0 is a [`Role::Server`]; every other node is a client linked to it.
    Star,
    /// Every pair of nodes linked; all clients.
    Mesh,
    /// Node `i` linked to node `i + 1` (and the last to the first); all clients.
    Ring,
}

/// Fault probabilities. All zero is a perfect network.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Faults {
    /// Per delivery: take a random queued frame rather than the oldest.
    pub reorder: f64,
    /// Per delivery: deliver the frame but keep a copy queued.
    pub duplicate: f64,
    /// Per delivery: discard the frame instead.
    pub drop: f64,
    /// Per step: tear down one random live link.
    pub disconnect: f64,
    /// Per step: bring back one random dead link, with fresh connection ids.
    pub reconnect: f64,
}

impl Faults {
    /// No faults at all.
    pub const NONE: Faults = Faults {
        reorder: 0.0,
        duplicate: 0.0,
        drop: 0.0,
        disconnect: 0.0,
        reconnect: 0.0,
    };

    /// A fairly hostile network that still gets work done between failures.
    pub const CHAOTIC: Faults = Faults {
        reorder: 0.2,
        duplicate: 0.05,
        drop: 0.05,
        disconnect: 0.03,
        reconnect: 0.3,
    };

    /// Whether any fault can happen.
    pub fn any(&self) -> bool {
        *self != Faults::NONE
    }
}

/// What the network did, for assertions and failure messages.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Calls to [`Network::step`].
    pub steps: u64,
    /// Frames queued for sending.
    pub sent: u64,
    /// Frames handed to a repo's `receive`.
    pub delivered: u64,
    /// Frames discarded by the drop fault.
    pub dropped: u64,
    /// Frames delivered while a copy stayed queued.
    pub duplicated: u64,
    /// Frames delivered out of order.
    pub reordered: u64,
    /// Frames discarded because their link went down.
    pub discarded: u64,
    /// Links torn down by the disconnect fault.
    pub disconnects: u64,
    /// Links brought back by the reconnect fault.
    pub reconnects: u64,
    /// Links torn down because a repo closed its side.
    pub closes: u64,
}

/// Frames a node received, by protocol message type.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Message type name -> (frames, bytes).
    pub by_type: BTreeMap<String, (u64, u64)>,
}

impl Traffic {
    /// Frames and bytes of one message type.
    pub fn of(&self, type_name: &str) -> (u64, u64) {
        self.by_type.get(type_name).copied().unwrap_or((0, 0))
    }

    /// Bytes of `sync` and `request` frames (the ones that carry document data).
    pub fn sync_bytes(&self) -> u64 {
        self.of("sync").1 + self.of("request").1
    }

    /// Bytes of every frame.
    pub fn total_bytes(&self) -> u64 {
        self.by_type.values().map(|(_, b)| b).sum()
    }

    fn record(&mut self, frame: &[u8]) {
        let name = match Message::decode(frame) {
            Ok(m) => m.type_name().to_owned(),
            Err(_) => "undecodable".to_owned(),
        };
        let entry = self.by_type.entry(name).or_default();
        entry.0 += 1;
        entry.1 += frame.len() as u64;
    }
}

/// One repo in the network.
pub struct Node {
    /// Its name, also its peer id.
    pub name: String,
    /// Its policy.
    pub role: Role,
    repo: Option<SimRepo>,
    storage: SimStorage,
    config: RepoConfig,
    /// The automerge actor used for this node's edits (fixed, for determinism).
    actor: ActorId,
    /// Every event the repo produced, in order.
    pub events: Vec<Event>,
    /// Frames delivered to this node.
    pub received: Traffic,
    /// Every frame delivered to this node while the frame log is on, with
    /// the index of the node that sent it.
    pub frame_log: Vec<(usize, Vec<u8>)>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("name", &self.name)
            .field("role", &self.role)
            .field("repo", &self.repo)
            .field("events", &self.events.len())
            .finish_non_exhaustive()
    }
}

impl Node {
    fn repo(&mut self) -> &mut SimRepo {
        let name = &self.name;
        self.repo
            .as_mut()
            .unwrap_or_else(|| panic!("node {name} is shut down"))
    }
}

fn open_repo(storage: SimStorage, config: RepoConfig, role: Role) -> SimRepo {
    let repo = match role {
        Role::Client => Repo::open(storage, config, ShareAll),
        Role::Server => Repo::open(storage, config, ServeOnRequest),
    };
    repo.expect("open repo")
}

/// One end of a link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// The connecting end ([`Direction::Outgoing`]).
    A,
    /// The accepting end ([`Direction::Incoming`]).
    B,
}

/// A link between two nodes.
#[derive(Debug)]
pub struct Link {
    /// The connecting node.
    pub a: usize,
    /// The accepting node.
    pub b: usize,
    /// The connection ids on each side while the link is up.
    conn: Option<(ConnectionId, ConnectionId)>,
    /// Frames from `a` to `b`, oldest first.
    to_b: VecDeque<Vec<u8>>,
    /// Frames from `b` to `a`, oldest first.
    to_a: VecDeque<Vec<u8>>,
}

impl Link {
    /// Whether the link is connected.
    pub fn is_up(&self) -> bool {
        self.conn.is_some()
    }

    /// Frames in flight (both directions).
    pub fn in_flight(&self) -> usize {
        self.to_a.len() + self.to_b.len()
    }

    fn queue(&mut self, to: End) -> &mut VecDeque<Vec<u8>> {
        match to {
            End::A => &mut self.to_a,
            End::B => &mut self.to_b,
        }
    }
}

/// The deterministic simulated network. See the [module docs](self).
#[derive(Debug)]
pub struct Network {
    seed: u64,
    rng: StdRng,
    nodes: Vec<Node>,
    links: Vec<Link>,
    faults: Faults,
    now: u64,
    next_conn: u64,
    log_frames: bool,
    /// Counters.
    pub stats: Stats,
}

impl Network {
    /// An empty network whose schedule is decided by `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            rng: StdRng::seed_from_u64(seed),
            nodes: Vec::new(),
            links: Vec::new(),
            faults: Faults::NONE,
            now: 1_000,
            next_conn: 1,
            log_frames: false,
            stats: Stats::default(),
        }
    }

    /// A network of `n` nodes on [`MemoryStorage`] in the given shape, every
    /// link connected, no faults yet.
    pub fn build(seed: u64, topology: Topology, n: usize) -> Self {
        assert!(n >= 2, "a network needs at least two nodes");
        let mut net = Self::new(seed);
        for i in 0..n {
            let role = if topology == Topology::Star && i == 0 {
                Role::Server
            } else {
                Role::Client
            };
            let name = match role {
                Role::Server => "server".to_owned(),
                Role::Client => format!("peer{i}"),
            };
            net.add_node(&name, role);
        }
        match topology {
            Topology::Star => {
                for i in 1..n {
                    net.add_link(i, 0);
                }
            }
            Topology::Mesh => {
                for i in 0..n {
                    for j in i + 1..n {
                        net.add_link(i, j);
                    }
                }
            }
            Topology::Ring => {
                for i in 0..n {
                    let j = (i + 1) % n;
                    if n == 2 && i == 1 {
                        break; // two nodes: one link, not two
                    }
                    net.add_link(i, j);
                }
            }
        }
        net
    }

    /// Add a node on a fresh [`MemoryStorage`]. Returns its index.
    pub fn add_node(&mut self, name: &str, role: Role) -> usize {
        let storage: SimStorage = Arc::new(MemoryStorage::new());
        self.add_node_with(name, role, storage, RepoConfig::new(PeerId::new(name)))
    }

    /// Add a node on the given storage and config. Returns its index.
    pub fn add_node_with(
        &mut self,
        name: &str,
        role: Role,
        storage: SimStorage,
        config: RepoConfig,
    ) -> usize {
        assert!(
            self.nodes.iter().all(|n| n.name != name),
            "node names must be unique: {name}"
        );
        let repo = open_repo(storage.clone(), config.clone(), role);
        self.nodes.push(Node {
            name: name.to_owned(),
            role,
            repo: Some(repo),
            storage,
            config,
            actor: ActorId::from(format!("actor-{name}").as_bytes()),
            events: Vec::new(),
            received: Traffic::default(),
            frame_log: Vec::new(),
        });
        self.nodes.len() - 1
    }

    /// Link node `a` (connecting) to node `b` (accepting) and connect it.
    /// Returns the link's index.
    pub fn add_link(&mut self, a: usize, b: usize) -> usize {
        assert!(a != b && a < self.nodes.len() && b < self.nodes.len());
        self.links.push(Link {
            a,
            b,
            conn: None,
            to_a: VecDeque::new(),
            to_b: VecDeque::new(),
        });
        let l = self.links.len() - 1;
        self.connect(l);
        l
    }

    // ---- accessors -------------------------------------------------------

    /// The seed this network was built with.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Virtual time in milliseconds.
    pub fn now(&self) -> u64 {
        self.now
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether there are no nodes.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// A node.
    pub fn node(&self, i: usize) -> &Node {
        &self.nodes[i]
    }

    /// A node's repo, to drive it directly (remember to [`flush`](Self::flush_all)).
    pub fn repo(&mut self, i: usize) -> &mut SimRepo {
        self.nodes[i].repo()
    }

    /// The links.
    pub fn links(&self) -> &[Link] {
        &self.links
    }

    /// The current fault probabilities.
    pub fn faults(&self) -> Faults {
        self.faults
    }

    /// Set the fault probabilities.
    pub fn set_faults(&mut self, faults: Faults) {
        for p in [
            faults.reorder,
            faults.duplicate,
            faults.drop,
            faults.disconnect,
            faults.reconnect,
        ] {
            assert!(
                (0.0..=1.0).contains(&p),
                "fault probability {p} out of range"
            );
        }
        self.faults = faults;
    }

    /// Record every delivered frame in the receiver's [`Node::frame_log`].
    pub fn set_frame_log(&mut self, on: bool) {
        self.log_frames = on;
    }

    /// Frames in flight on every link.
    pub fn in_flight(&self) -> usize {
        self.links.iter().map(Link::in_flight).sum()
    }

    /// Whether nothing is in flight and no repo has output waiting.
    pub fn is_quiescent(&self) -> bool {
        self.in_flight() == 0
    }

    // ---- documents -------------------------------------------------------

    /// Create a document on node `i` with an id drawn from the network's RNG
    /// (so runs are reproducible). It is empty until edited.
    pub fn create(&mut self, i: usize) -> DocumentId {
        let id = DocumentId::from_bytes(self.rng.random());
        self.nodes[i].repo().create_with_id(id).expect("create");
        id
    }

    /// Edit a document on node `i` as node `i`'s fixed actor.
    pub fn change<R>(
        &mut self,
        i: usize,
        doc: &DocumentId,
        f: impl FnOnce(&mut AutoCommit) -> Result<R, AutomergeError>,
    ) -> Result<R, tandem_engine::RepoError> {
        let node = &mut self.nodes[i];
        let actor = node.actor.clone();
        node.repo().change(doc, |d| {
            d.set_actor(actor);
            f(d)
        })
    }

    /// Ask node `i`'s peers for a document.
    pub fn request(&mut self, i: usize, doc: DocumentId) {
        self.nodes[i].repo().request(doc).expect("request");
    }

    /// Read a document on node `i`.
    pub fn view<R>(&mut self, i: usize, doc: &DocumentId, f: impl FnOnce(&Automerge) -> R) -> R {
        let name = self.nodes[i].name.clone();
        self.nodes[i]
            .repo()
            .view(doc, f)
            .unwrap_or_else(|e| panic!("view {doc} on {name}: {e}"))
    }

    /// Whether node `i` has a document with at least one change.
    pub fn has_content(&mut self, i: usize, doc: &DocumentId) -> bool {
        let repo = self.nodes[i].repo();
        repo.contains(doc).expect("contains") && !repo.heads(doc).expect("heads").is_empty()
    }

    /// The heads of a document on node `i` (empty if it does not have it).
    pub fn heads(&mut self, i: usize, doc: &DocumentId) -> Vec<ChangeHash> {
        let repo = self.nodes[i].repo();
        if !repo.contains(doc).expect("contains") {
            return Vec::new();
        }
        let mut h = repo.heads(doc).expect("heads");
        h.sort();
        h
    }

    /// The materialised value of a document on node `i`, see [`materialize`].
    pub fn materialize(&mut self, i: usize, doc: &DocumentId) -> String {
        self.view(i, doc, materialize)
    }

    /// Every document id any node has in storage, sorted.
    pub fn stored_documents(&mut self) -> Vec<DocumentId> {
        let mut all = Vec::new();
        for node in &mut self.nodes {
            all.extend(node.repo().document_ids().expect("document ids"));
        }
        all.sort();
        all.dedup();
        all
    }

    /// Panic unless every node holds every document in `docs`, durably, with
    /// the same heads and the same materialised value.
    pub fn assert_converged(&mut self, docs: &[DocumentId]) {
        let all: Vec<usize> = (0..self.nodes.len()).collect();
        self.assert_converged_on(&all, docs);
    }

    /// [`assert_converged`](Self::assert_converged) for some nodes only.
    pub fn assert_converged_on(&mut self, nodes: &[usize], docs: &[DocumentId]) {
        for doc in docs {
            let mut reference: Option<(String, Vec<ChangeHash>, String)> = None;
            for &i in nodes {
                let name = self.nodes[i].name.clone();
                let stored = self.nodes[i]
                    .repo()
                    .document_ids()
                    .expect("document ids")
                    .contains(doc);
                assert!(
                    stored,
                    "{name} does not hold document {doc} in storage (seed {}, {:?})",
                    self.seed, self.stats
                );
                let heads = self.heads(i, doc);
                let value = self.materialize(i, doc);
                match &reference {
                    None => reference = Some((name, heads, value)),
                    Some((ref_name, ref_heads, ref_value)) => {
                        assert_eq!(
                            &heads, ref_heads,
                            "heads of {doc} differ between {ref_name} and {name} (seed {})",
                            self.seed
                        );
                        assert_eq!(
                            &value, ref_value,
                            "value of {doc} differs between {ref_name} and {name} (seed {})",
                            self.seed
                        );
                    }
                }
            }
        }
    }

    /// Protocol errors every node has reported so far, as `(node, error)`.
    pub fn protocol_errors(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for node in &self.nodes {
            for e in &node.events {
                if let Event::ProtocolError { error, .. } = e {
                    out.push((node.name.clone(), error.clone()));
                }
            }
        }
        out
    }

    // ---- links -----------------------------------------------------------

    /// Bring link `l` up with fresh connection ids (no-op if it is up).
    pub fn connect(&mut self, l: usize) {
        if self.links[l].is_up() {
            return;
        }
        let (ca, cb) = (
            ConnectionId(self.next_conn),
            ConnectionId(self.next_conn + 1),
        );
        self.next_conn += 2;
        let (a, b) = (self.links[l].a, self.links[l].b);
        self.nodes[a]
            .repo()
            .connect(ca, Direction::Outgoing)
            .expect("connect a");
        self.nodes[b]
            .repo()
            .connect(cb, Direction::Incoming)
            .expect("connect b");
        self.links[l].conn = Some((ca, cb));
        self.pump_all();
    }

    /// Tear link `l` down: both sides see `disconnect`, frames in flight are
    /// lost. No-op if it is down.
    pub fn disconnect(&mut self, l: usize) {
        let link = &mut self.links[l];
        let Some((ca, cb)) = link.conn.take() else {
            return;
        };
        self.stats.discarded += (link.to_a.len() + link.to_b.len()) as u64;
        link.to_a.clear();
        link.to_b.clear();
        let (a, b) = (link.a, link.b);
        self.nodes[a].repo().disconnect(ca);
        self.nodes[b].repo().disconnect(cb);
        self.pump_all();
    }

    /// Put a frame on link `l` towards `to`, as if the other side sent it.
    pub fn inject(&mut self, l: usize, to: End, frame: Vec<u8>) {
        assert!(self.links[l].is_up(), "link {l} is down");
        self.links[l].queue(to).push_back(frame);
    }

    /// Restart node `i` on the same storage: its links go down, its repo is
    /// dropped and reopened (everything in memory is lost, storage is kept).
    /// Links stay down until [`connect`](Self::connect)ed or healed.
    pub fn restart(&mut self, i: usize) {
        self.restart_with(i, |s| s);
    }

    /// Like [`restart`](Self::restart), but `reopen` gets the old storage
    /// handle (the repo is already dropped) and returns the one to reopen on,
    /// e.g. a database file opened afresh.
    pub fn restart_with(&mut self, i: usize, reopen: impl FnOnce(SimStorage) -> SimStorage) {
        for l in 0..self.links.len() {
            if self.links[l].a == i || self.links[l].b == i {
                self.disconnect(l);
            }
        }
        let node = &mut self.nodes[i];
        if let Some(mut repo) = node.repo.take() {
            repo.flush().expect("flush before restart");
            node.events
                .extend(repo.drain_outputs().into_iter().filter_map(|o| match o {
                    Output::Event(e) => Some(e),
                    _ => None,
                }));
        }
        let placeholder: SimStorage = Arc::new(MemoryStorage::new());
        let old = std::mem::replace(&mut node.storage, placeholder);
        node.storage = reopen(old);
        node.repo = Some(open_repo(
            node.storage.clone(),
            node.config.clone(),
            node.role,
        ));
    }

    /// Find the link and end a node's connection id belongs to.
    fn find(&self, node: usize, conn: ConnectionId) -> Option<(usize, End)> {
        self.links.iter().enumerate().find_map(|(l, link)| {
            let (ca, cb) = link.conn?;
            if link.a == node && ca == conn {
                Some((l, End::A))
            } else if link.b == node && cb == conn {
                Some((l, End::B))
            } else {
                None
            }
        })
    }

    // ---- running ---------------------------------------------------------

    /// Carry out node `i`'s outputs. Returns whether there were any.
    fn pump(&mut self, i: usize) -> bool {
        let mut any = false;
        while let Some(out) = self.nodes[i].repo().poll_output() {
            any = true;
            match out {
                Output::Send { connection, frame } => {
                    // Frames for a connection the harness already tore down vanish.
                    if let Some((l, end)) = self.find(i, connection) {
                        let to = match end {
                            End::A => End::B,
                            End::B => End::A,
                        };
                        self.links[l].queue(to).push_back(frame);
                        self.stats.sent += 1;
                    }
                }
                Output::Close { connection, .. } => {
                    if let Some((l, _)) = self.find(i, connection) {
                        self.stats.closes += 1;
                        self.disconnect(l);
                    }
                }
                Output::Event(e) => self.nodes[i].events.push(e),
            }
        }
        any
    }

    fn pump_all(&mut self) {
        loop {
            let mut any = false;
            for i in 0..self.nodes.len() {
                if self.nodes[i].repo.is_some() {
                    any |= self.pump(i);
                }
            }
            if !any {
                break;
            }
        }
    }

    /// Flush every repo (durable group commit; this is where sync messages
    /// are generated) and carry out the outputs.
    pub fn flush_all(&mut self) {
        for i in 0..self.nodes.len() {
            let name = self.nodes[i].name.clone();
            if let Some(repo) = self.nodes[i].repo.as_mut() {
                repo.flush()
                    .unwrap_or_else(|e| panic!("flush on {name} failed: {e}"));
            }
        }
        self.pump_all();
    }

    /// Deliver one frame (or drop it). Returns false if nothing was in flight.
    fn deliver_one(&mut self) -> bool {
        let candidates: Vec<(usize, End)> = self
            .links
            .iter()
            .enumerate()
            .flat_map(|(l, link)| {
                [(End::A, link.to_a.len()), (End::B, link.to_b.len())]
                    .into_iter()
                    .filter(|(_, len)| *len > 0)
                    .map(move |(end, _)| (l, end))
            })
            .collect();
        if candidates.is_empty() {
            return false;
        }
        let (l, to) = candidates[self.rng.random_range(0..candidates.len())];
        let faults = self.faults;
        let len = self.links[l].queue(to).len();
        let index = if len > 1 && self.rng.random_bool(faults.reorder) {
            self.rng.random_range(0..len)
        } else {
            0
        };
        if self.rng.random_bool(faults.drop) {
            self.links[l].queue(to).remove(index);
            self.stats.dropped += 1;
            return true;
        }
        if index != 0 {
            self.stats.reordered += 1;
        }
        let frame = if self.rng.random_bool(faults.duplicate) {
            self.stats.duplicated += 1;
            self.links[l].queue(to)[index].clone()
        } else {
            self.links[l]
                .queue(to)
                .remove(index)
                .expect("index in range")
        };
        let (ca, cb) = self.links[l].conn.expect("queues of a down link are empty");
        let (node, conn, from) = match to {
            End::A => (self.links[l].a, ca, self.links[l].b),
            End::B => (self.links[l].b, cb, self.links[l].a),
        };
        self.stats.delivered += 1;
        self.nodes[node].received.record(&frame);
        if self.log_frames {
            self.nodes[node].frame_log.push((from, frame.clone()));
        }
        let now = self.now;
        let name = self.nodes[node].name.clone();
        self.nodes[node]
            .repo()
            .receive(now, conn, &frame)
            .unwrap_or_else(|e| panic!("{name} failed to receive on {conn}: {e}"));
        // The receiver may have closed the connection: act on it at once so
        // no further frame is delivered to a connection it has forgotten.
        self.pump_all();
        true
    }

    /// One step: advance virtual time, maybe inject a connection fault,
    /// deliver (or drop) a few frames, flush every repo, carry out outputs.
    pub fn step(&mut self) {
        self.stats.steps += 1;
        self.now += self.rng.random_range(1..=20);
        let faults = self.faults;
        if faults.disconnect > 0.0 && self.rng.random_bool(faults.disconnect) {
            let up: Vec<usize> = (0..self.links.len())
                .filter(|l| self.links[*l].is_up())
                .collect();
            if !up.is_empty() {
                let l = up[self.rng.random_range(0..up.len())];
                self.stats.disconnects += 1;
                self.disconnect(l);
            }
        }
        if faults.reconnect > 0.0 && self.rng.random_bool(faults.reconnect) {
            let down: Vec<usize> = (0..self.links.len())
                .filter(|l| !self.links[*l].is_up())
                .collect();
            if !down.is_empty() {
                let l = down[self.rng.random_range(0..down.len())];
                self.stats.reconnects += 1;
                self.connect(l);
            }
        }
        let deliveries = self.rng.random_range(1..=3);
        for _ in 0..deliveries {
            if !self.deliver_one() {
                break;
            }
        }
        self.flush_all();
    }

    /// Run `n` steps (faults included), whether or not anything is in flight.
    pub fn run(&mut self, n: usize) {
        for _ in 0..n {
            self.step();
        }
    }

    /// Flush, then step until nothing is in flight. Returns the steps taken.
    /// Panics if that takes more than `max_steps`.
    pub fn run_until_quiescent(&mut self, max_steps: usize) -> usize {
        self.flush_all();
        let mut steps = 0;
        while !self.is_quiescent() {
            if steps >= max_steps {
                let links: Vec<String> = self
                    .links
                    .iter()
                    .map(|l| {
                        format!(
                            "{}->{}: {} up={} (to_b {}, to_a {})",
                            self.nodes[l.a].name,
                            self.nodes[l.b].name,
                            l.in_flight(),
                            l.is_up(),
                            l.to_b.len(),
                            l.to_a.len()
                        )
                    })
                    .collect();
                panic!(
                    "network did not quiesce within {max_steps} steps (seed {}, faults {:?}); \
                     in flight per link: [{}]; stats {:?}",
                    self.seed,
                    self.faults,
                    links.join(", "),
                    self.stats
                );
            }
            self.step();
            steps += 1;
        }
        steps
    }

    /// Stop all faults, reconnect every link afresh, and run to quiescence
    /// (at most [`HEAL_MAX_STEPS`]). Panics if a protocol error happens
    /// while healing: on a perfect network there is no excuse for one.
    pub fn heal(&mut self) -> usize {
        self.faults = Faults::NONE;
        let before: Vec<usize> = self.nodes.iter().map(|n| n.events.len()).collect();
        for l in 0..self.links.len() {
            self.disconnect(l);
        }
        for l in 0..self.links.len() {
            self.connect(l);
        }
        let steps = self.run_until_quiescent(HEAL_MAX_STEPS);
        for (node, start) in self.nodes.iter().zip(before) {
            for e in &node.events[start..] {
                if matches!(
                    e,
                    Event::ProtocolError { .. }
                        | Event::AccessDenied { .. }
                        | Event::Quarantined { .. }
                ) {
                    panic!(
                        "{} reported {e:?} while healing on a perfect network (seed {})",
                        node.name, self.seed
                    );
                }
            }
        }
        steps
    }
}

/// A canonical text rendering of a whole document: every map key with all
/// its conflicting values, list elements, text content and counter values.
/// Two replicas with the same history render the same string.
pub fn materialize(doc: &Automerge) -> String {
    let mut out = String::new();
    render_object(doc, &ROOT, ObjType::Map, &mut out);
    out
}

fn render_object(doc: &Automerge, obj: &ObjId, kind: ObjType, out: &mut String) {
    match kind {
        ObjType::Map | ObjType::Table => {
            out.push('{');
            for key in doc.keys(obj) {
                let _ = write!(out, "{key:?}:");
                render_values(doc, doc.get_all(obj, key.as_str()), out);
                out.push(',');
            }
            out.push('}');
        }
        ObjType::List => {
            out.push('[');
            for i in 0..doc.length(obj) {
                render_values(doc, doc.get_all(obj, i), out);
                out.push(',');
            }
            out.push(']');
        }
        ObjType::Text => {
            let text = doc.text(obj).expect("text object");
            let _ = write!(out, "text{text:?}");
        }
    }
}

fn render_values(
    doc: &Automerge,
    values: Result<Vec<(Value<'_>, ObjId)>, AutomergeError>,
    out: &mut String,
) {
    let values = values.expect("get_all");
    if values.len() != 1 {
        out.push_str("conflict<");
    }
    for (v, id) in values {
        match v {
            Value::Object(kind) => render_object(doc, &id, kind, out),
            Value::Scalar(s) => match s.as_ref() {
                ScalarValue::Counter(c) => {
                    let _ = write!(out, "counter({c})");
                }
                other => {
                    let _ = write!(out, "{other:?}");
                }
            },
        }
        out.push(';');
    }
}
