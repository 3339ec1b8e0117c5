//! The browser driver: owns the repo, writes its commits to IndexedDB,
//! carries its outputs to the WebSocket and its events to JS callbacks.
//!
//! ```text
//! JS call / socket event ──> repo input ──> pump: flush (commit to the mirror,
//!                                                  batch queued)
//!                                           outputs tagged with the batch ──> gate
//! writer task: queued batches ──> one IndexedDB transaction (strict) ──> durable
//!                                           gate releases, in order:
//!                                             Send ──> socket
//!                                             events ──> callbacks (next microtask)
//! ```
//!
//! Everything runs on the page's one thread; the driver sits in an
//! `Rc<RefCell<_>>` and JS callbacks are only ever called with it released,
//! so a callback may call back into `Tandem`.

use std::cell::RefCell;
use std::rc::{Rc, Weak};

use js_sys::{Function, Promise};
use tandem_engine::{
    ConnectionId, Direction, DocumentId, Event, Output, Repo, RepoConfig, ShareAll,
};
use wasm_bindgen::prelude::*;
use web_sys::IdbDatabase;

use crate::backoff::{backoff_ms, with_token};
use crate::error::{Error, js_message};
use crate::gate::OutputGate;
use crate::idb;
use crate::js;
use crate::lock::{self, StoreLock};
use crate::socket::{Socket, SocketEvent};
use crate::storage::{BrowserStorage, Pending};

#[wasm_bindgen]
extern "C" {
    #[wasm_bindgen(js_name = setTimeout)]
    fn set_timeout(handler: &JsValue, ms: u32) -> JsValue;
    #[wasm_bindgen(js_name = clearTimeout)]
    fn clear_timeout(handle: &JsValue);
    #[wasm_bindgen(js_namespace = console, js_name = error)]
    fn console_error(message: &str, detail: &JsValue);
}

/// A pending `setTimeout`, cleared when dropped.
#[derive(Debug)]
struct Timer(JsValue);

impl Timer {
    /// Run `f` once after `ms` milliseconds (unless dropped before).
    fn once(ms: u32, f: impl FnOnce() + 'static) -> Self {
        // A cancelled timer's closure is never called and stays allocated:
        // a few bytes per goOffline or reconnect, not per message.
        Self(set_timeout(&Closure::once_into_js(f), ms))
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        clear_timeout(&self.0);
    }
}

/// A promise resolved after `ms` milliseconds.
async fn sleep(ms: u32) {
    let promise = Promise::new(&mut |resolve, _| {
        set_timeout(&resolve, ms);
    });
    let _ = wasm_bindgen_futures::JsFuture::from(promise).await;
}

fn now_ms() -> u64 {
    js_sys::Date::now() as u64
}

/// Where the connection to the relay stands.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum LinkState {
    /// Not connected and not trying.
    Offline,
    /// Connecting, or waiting for the relay's handshake.
    Connecting { attempt: u32 },
    /// The handshake completed; documents sync.
    Online { peer_id: String },
    /// The last attempt failed; retrying after a backoff.
    Waiting {
        failures: u32,
        retry_in_ms: u32,
        error: String,
    },
}

impl LinkState {
    pub(crate) fn to_js(&self, with_type: bool) -> JsValue {
        let mut fields: Vec<(&str, JsValue)> = Vec::new();
        if with_type {
            fields.push(("type", "connection".into()));
        }
        match self {
            LinkState::Offline => fields.push(("state", "offline".into())),
            LinkState::Connecting { attempt } => {
                fields.push(("state", "connecting".into()));
                fields.push(("attempt", (*attempt).into()));
            }
            LinkState::Online { peer_id } => {
                fields.push(("state", "online".into()));
                fields.push(("peerId", peer_id.as_str().into()));
            }
            LinkState::Waiting {
                failures,
                retry_in_ms,
                error,
            } => {
                fields.push(("state", "waiting".into()));
                fields.push(("failures", (*failures).into()));
                fields.push(("retryInMs", (*retry_in_ms).into()));
                fields.push(("error", error.as_str().into()));
            }
        }
        js::object(&fields)
    }
}

/// How to reach the relay and how to retry.
#[derive(Clone, Debug)]
pub(crate) struct NetConfig {
    pub(crate) url: String,
    pub(crate) token: Option<String>,
    pub(crate) backoff_min_ms: u32,
    pub(crate) backoff_max_ms: u32,
    pub(crate) connect_timeout_ms: u32,
}

#[derive(Debug)]
enum Link {
    Idle,
    Open {
        socket: Socket,
        connection: ConnectionId,
        /// The handshake completed.
        ready: bool,
        /// Fires if the handshake has not completed in time.
        _deadline: Timer,
    },
}

#[derive(Debug)]
struct Net {
    config: Option<NetConfig>,
    want_online: bool,
    link: Link,
    failures: u32,
    retry: Option<Timer>,
    next_connection: u64,
    state: LinkState,
}

#[derive(Debug, Default)]
struct Writer {
    /// A task is writing (or about to).
    running: bool,
    /// Batches whose write failed, retried with the next ones.
    failed: Option<Pending>,
    failures: u32,
}

/// The state behind a `Tandem` object.
pub(crate) struct Driver {
    pub(crate) repo: Repo<BrowserStorage>,
    storage: BrowserStorage,
    db: Option<IdbDatabase>,
    /// Held while the store is open (one `Tandem` per store).
    lock: Option<StoreLock>,
    gate: OutputGate<Output>,
    writer: Writer,
    /// `whenPersisted` promises: resolved once this batch is durable.
    waiters: Vec<(u64, Function)>,
    listeners: Vec<(u32, Function)>,
    next_listener: u32,
    notices: Vec<JsValue>,
    notifying: bool,
    net: Net,
    pub(crate) closed: bool,
    this: Weak<RefCell<Driver>>,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("repo", &self.repo)
            .field("persistent", &self.db.is_some())
            .field("held_outputs", &self.gate.held())
            .field("durable", &self.gate.durable())
            .field("state", &self.net.state)
            .finish_non_exhaustive()
    }
}

pub(crate) type Shared = Rc<RefCell<Driver>>;

impl Driver {
    /// A driver over `storage` (already loaded), persisting to `db` if given.
    pub(crate) fn start(
        storage: BrowserStorage,
        db: Option<IdbDatabase>,
        lock: Option<StoreLock>,
        config: RepoConfig,
    ) -> Result<Shared, Error> {
        let repo = Repo::open(storage.clone(), config, ShareAll)?;
        let shared = Rc::new_cyclic(|this| {
            RefCell::new(Driver {
                repo,
                storage,
                db,
                lock,
                gate: OutputGate::new(),
                writer: Writer::default(),
                waiters: Vec::new(),
                listeners: Vec::new(),
                next_listener: 1,
                notices: Vec::new(),
                notifying: false,
                net: Net {
                    config: None,
                    want_online: false,
                    link: Link::Idle,
                    failures: 0,
                    retry: None,
                    next_connection: 0,
                    state: LinkState::Offline,
                },
                closed: false,
                this: this.clone(),
            })
        });
        // Opening may have committed the store's id: write it.
        shared.borrow_mut().pump();
        Ok(shared)
    }

    // ---- the pump ------------------------------------------------------

    /// After any input: flush, gate the outputs, release what is durable,
    /// and make sure the writer runs. Bounded: routing an output can feed
    /// the repo (a closed socket), which the next round picks up.
    pub(crate) fn pump(&mut self) {
        for _ in 0..8 {
            if let Err(e) = self.repo.flush() {
                self.notice_error(format!("local commit failed: {e}"), None);
            }
            let tag = self.storage.committed();
            let mut moved = 0;
            while let Some(output) = self.repo.poll_output() {
                self.gate.push(tag, output);
                moved += 1;
            }
            let mut routed = 0;
            while let Some(output) = self.gate.pop_ready() {
                self.route(output);
                routed += 1;
            }
            if moved == 0 && routed == 0 {
                break;
            }
        }
        self.start_writer();
    }

    fn route(&mut self, output: Output) {
        match output {
            Output::Send { connection, frame } => {
                if let Link::Open {
                    socket,
                    connection: c,
                    ..
                } = &self.net.link
                    && *c == connection
                {
                    socket.send(&frame);
                }
            }
            Output::Close { connection, reason } => {
                if self.link_is(connection) {
                    self.drop_link(reason.unwrap_or_else(|| "closed by the protocol".into()));
                }
            }
            Output::Event(Event::PeerConnected(peer)) => {
                if let Link::Open {
                    connection, ready, ..
                } = &mut self.net.link
                    && *connection == peer.connection
                {
                    *ready = true;
                    self.net.failures = 0;
                    self.set_state(LinkState::Online {
                        peer_id: peer.peer_id.to_string(),
                    });
                }
            }
            Output::Event(Event::Committed(event)) => self.notice(js::change_event(&event)),
            Output::Event(Event::DocumentUnavailable { document, peer_id }) => {
                self.notice(js::object(&[
                    ("type", "unavailable".into()),
                    ("documentId", document.to_string().into()),
                    ("peerId", peer_id.as_str().into()),
                ]));
            }
            Output::Event(Event::ProtocolError { error, .. }) => {
                self.notice_error(format!("protocol: {error}"), None);
            }
            Output::Event(Event::Quarantined { document, reason }) => {
                self.notice_error(format!("document quarantined: {reason}"), Some(document));
            }
            Output::Event(Event::AccessDenied {
                document, reason, ..
            }) => self.notice_error(format!("access denied: {reason}"), Some(document)),
            Output::Event(_) => {}
        }
    }

    // ---- persistence ---------------------------------------------------

    fn start_writer(&mut self) {
        // Not running means nothing is in flight or waiting for a retry, so
        // batches past the durable one are still queued in the storage.
        if self.writer.running || self.storage.committed() <= self.gate.durable() {
            return;
        }
        self.writer.running = true;
        if let Some(this) = self.this.upgrade() {
            wasm_bindgen_futures::spawn_local(write_loop(this));
        }
    }

    /// Everything committed so far is durable: resolve waiting promises.
    fn durable(&mut self, upto: u64) {
        self.gate.mark_durable(upto);
        let durable = self.gate.durable();
        self.waiters.retain(|(needs, resolve)| {
            if *needs <= durable {
                let _ = resolve.call0(&JsValue::NULL);
                false
            } else {
                true
            }
        });
    }

    /// A promise resolved once everything committed so far is in IndexedDB.
    pub(crate) fn when_persisted(&mut self) -> Promise {
        let needs = self.storage.committed();
        if needs <= self.gate.durable() {
            return Promise::resolve(&JsValue::UNDEFINED);
        }
        let mut resolver = None;
        let promise = Promise::new(&mut |resolve, _| resolver = Some(resolve));
        if let Some(resolve) = resolver {
            self.waiters.push((needs, resolve));
        }
        promise
    }

    /// Close the IndexedDB database and release the store's lock.
    pub(crate) fn close_store(&mut self) {
        if let Some(db) = self.db.take() {
            db.close();
        }
        self.lock = None;
    }

    // ---- events to JS --------------------------------------------------

    pub(crate) fn subscribe(&mut self, callback: Function) -> u32 {
        let id = self.next_listener;
        self.next_listener += 1;
        self.listeners.push((id, callback));
        id
    }

    pub(crate) fn unsubscribe(&mut self, id: u32) -> bool {
        let before = self.listeners.len();
        self.listeners.retain(|(i, _)| *i != id);
        self.listeners.len() != before
    }

    fn notice(&mut self, event: JsValue) {
        self.notices.push(event);
        if !self.notifying {
            self.notifying = true;
            if let Some(this) = self.this.upgrade() {
                wasm_bindgen_futures::spawn_local(notify(this));
            }
        }
    }

    fn notice_error(&mut self, message: String, document: Option<DocumentId>) {
        let mut fields = vec![("type", "error".into()), ("message", message.into())];
        if let Some(doc) = document {
            fields.push(("documentId", doc.to_string().into()));
        }
        self.notice(js::object(&fields));
    }

    fn set_state(&mut self, state: LinkState) {
        if self.net.state != state {
            self.net.state = state;
            let event = self.net.state.to_js(true);
            self.notice(event);
        }
    }

    pub(crate) fn state(&self) -> &LinkState {
        &self.net.state
    }

    // ---- the network ---------------------------------------------------

    fn link_is(&self, connection: ConnectionId) -> bool {
        matches!(&self.net.link, Link::Open { connection: c, .. } if *c == connection)
    }

    /// The connection whose handshake completed, if any.
    pub(crate) fn ready_connection(&self) -> Option<ConnectionId> {
        match &self.net.link {
            Link::Open {
                connection,
                ready: true,
                ..
            } => Some(*connection),
            _ => None,
        }
    }

    /// Set the relay and go online now. Fails if the browser refuses the URL.
    pub(crate) fn connect(&mut self, config: NetConfig) -> Result<(), Error> {
        self.teardown();
        let url = config.url.clone();
        self.net.config = Some(config);
        self.net.want_online = true;
        self.net.failures = 0;
        if let Err(reason) = self.start_connect() {
            self.net.want_online = false;
            self.set_state(LinkState::Offline);
            return Err(Error::Connect { url, reason });
        }
        Ok(())
    }

    pub(crate) fn go_online(&mut self) {
        if self.net.want_online || self.net.config.is_none() {
            return;
        }
        self.net.want_online = true;
        self.net.failures = 0;
        if let Err(reason) = self.start_connect() {
            self.schedule_retry(reason);
        }
    }

    pub(crate) fn go_offline(&mut self) {
        self.net.want_online = false;
        self.teardown();
        self.set_state(LinkState::Offline);
    }

    /// Close the socket (if any) and cancel a pending retry.
    fn teardown(&mut self) {
        self.net.retry = None;
        if let Link::Open { connection, .. } = std::mem::replace(&mut self.net.link, Link::Idle) {
            // Dropping the socket closes it; the repo persists what the
            // sync states learned.
            self.repo.disconnect(connection);
        }
    }

    fn start_connect(&mut self) -> Result<(), String> {
        self.net.retry = None;
        let Some(config) = self.net.config.clone() else {
            return Err("no relay URL".into());
        };
        self.net.next_connection += 1;
        let connection = ConnectionId(self.net.next_connection);
        let this = self.this.clone();
        let handler = move |event: SocketEvent| on_socket_event(&this, connection, event);
        let socket = Socket::open(&with_token(&config.url, config.token.as_deref()), handler)
            .map_err(|e| js_message(&e))?;
        let this = self.this.clone();
        let deadline = Timer::once(config.connect_timeout_ms, move || {
            with_driver(&this, |d| {
                if matches!(&d.net.link, Link::Open { connection: c, ready: false, .. } if *c == connection)
                {
                    d.drop_link("connect timed out".into());
                }
            });
        });
        self.net.link = Link::Open {
            socket,
            connection,
            ready: false,
            _deadline: deadline,
        };
        self.set_state(LinkState::Connecting {
            attempt: self.net.failures + 1,
        });
        Ok(())
    }

    /// The socket is gone: forget it and retry later (if online).
    fn drop_link(&mut self, reason: String) {
        if let Link::Open { connection, .. } = std::mem::replace(&mut self.net.link, Link::Idle) {
            self.repo.disconnect(connection);
        }
        self.schedule_retry(reason);
    }

    fn schedule_retry(&mut self, error: String) {
        if !self.net.want_online {
            self.net.retry = None;
            self.set_state(LinkState::Offline);
            return;
        }
        let Some(config) = &self.net.config else {
            return;
        };
        self.net.failures = self.net.failures.saturating_add(1);
        let wait = backoff_ms(
            self.net.failures,
            config.backoff_min_ms,
            config.backoff_max_ms,
            js_sys::Math::random(),
        );
        let this = self.this.clone();
        self.net.retry = Some(Timer::once(wait, move || {
            with_driver(&this, |d| {
                d.net.retry = None;
                if d.net.want_online
                    && matches!(d.net.link, Link::Idle)
                    && let Err(reason) = d.start_connect()
                {
                    d.schedule_retry(reason);
                }
            });
        }));
        self.set_state(LinkState::Waiting {
            failures: self.net.failures,
            retry_in_ms: wait,
            error,
        });
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // Detach and close the socket before the repo goes.
        self.net.link = Link::Idle;
        self.net.retry = None;
        if let Some(db) = self.db.take() {
            db.close();
        }
    }
}

/// Run `f` on the driver behind `this`, then pump, unless it is gone or busy
/// (never the case for browser events, which arrive on an empty stack).
fn with_driver(this: &Weak<RefCell<Driver>>, f: impl FnOnce(&mut Driver)) {
    let Some(shared) = this.upgrade() else {
        return;
    };
    let Ok(mut driver) = shared.try_borrow_mut() else {
        console_error("tandem: event dropped: the store was busy", &JsValue::NULL);
        return;
    };
    if driver.closed {
        return;
    }
    f(&mut driver);
    driver.pump();
}

fn on_socket_event(this: &Weak<RefCell<Driver>>, connection: ConnectionId, event: SocketEvent) {
    with_driver(this, |d| {
        if !d.link_is(connection) {
            return; // an event of a socket already replaced
        }
        match event {
            SocketEvent::Open => {
                if let Err(e) = d.repo.connect(connection, Direction::Outgoing) {
                    d.drop_link(e.to_string());
                }
            }
            SocketEvent::Message(frame) => {
                if let Err(e) = d.repo.receive(now_ms(), connection, &frame) {
                    d.notice_error(format!("frame not handled: {e}"), None);
                }
            }
            SocketEvent::Closed { code, reason } => {
                let text = match (code, reason.is_empty()) {
                    (1006, _) => "connection failed or lost".to_owned(),
                    (_, true) => format!("closed by the relay (code {code})"),
                    (_, false) => format!("closed by the relay (code {code}: {reason})"),
                };
                d.drop_link(text);
            }
        }
    });
}

/// Write queued batches to IndexedDB until none is left, releasing the gate
/// after each. A failed write is retried (with the batches queued since)
/// after a backoff; until it succeeds nothing that depends on it leaves.
async fn write_loop(shared: Shared) {
    loop {
        let (job, db) = {
            let mut d = shared.borrow_mut();
            let mut job = d.writer.failed.take();
            if let Some(more) = d.storage.take_pending() {
                match &mut job {
                    Some(j) => j.extend(more),
                    None => job = Some(more),
                }
            }
            let Some(job) = job else {
                d.writer.running = false;
                return;
            };
            (job, d.db.clone())
        };
        let result = match &db {
            Some(db) => idb::write(db, &job).await,
            None => Ok(()),
        };
        let retry_in = {
            let mut d = shared.borrow_mut();
            match result {
                Ok(()) => {
                    d.writer.failures = 0;
                    d.durable(job.upto);
                    d.pump();
                    None
                }
                Err(e) => {
                    d.writer.failures = d.writer.failures.saturating_add(1);
                    let wait = backoff_ms(d.writer.failures, 100, 5_000, js_sys::Math::random());
                    d.notice_error(
                        format!("{e}; nothing of it was sent to peers; retrying in {wait} ms"),
                        None,
                    );
                    d.writer.failed = Some(job);
                    Some(wait)
                }
            }
        };
        if let Some(wait) = retry_in {
            sleep(wait).await;
        }
    }
}

/// Deliver queued events to the listeners, with the driver released.
async fn notify(shared: Shared) {
    let (events, listeners) = {
        let mut d = shared.borrow_mut();
        d.notifying = false;
        let listeners: Vec<Function> = d.listeners.iter().map(|(_, f)| f.clone()).collect();
        (std::mem::take(&mut d.notices), listeners)
    };
    for event in &events {
        for listener in &listeners {
            if let Err(e) = listener.call1(&JsValue::NULL, event) {
                console_error("tandem: an event listener threw", &e);
            }
        }
    }
}

/// Lock the store `name`, open its IndexedDB database and load it.
pub(crate) async fn open_persistent(
    name: &str,
) -> Result<(BrowserStorage, IdbDatabase, Option<StoreLock>), Error> {
    let lock = lock::acquire(name).await?;
    let db = idb::open(name).await?;
    let entries = match idb::load(&db).await {
        Ok(entries) => entries,
        Err(e) => {
            db.close();
            return Err(e);
        }
    };
    Ok((BrowserStorage::from_entries(entries)?, db, lock))
}
