//! The browser's WebSocket, reduced to what the driver needs: binary frames
//! in and out, one handler for open, message and close.

use js_sys::{ArrayBuffer, Uint8Array};
use wasm_bindgen::prelude::Closure;
use wasm_bindgen::{JsCast, JsValue};
use web_sys::{BinaryType, CloseEvent, Event, MessageEvent, WebSocket};

/// What the socket reports.
#[derive(Debug)]
pub(crate) enum SocketEvent {
    /// The connection is open.
    Open,
    /// A message arrived (text messages as their UTF-8 bytes: not part of
    /// the protocol, the engine answers them with an error).
    Message(Vec<u8>),
    /// The connection closed or could not be made.
    Closed {
        /// The close code (1006: no close frame, e.g. the server is down).
        code: u16,
        /// The reason the peer gave, if any.
        reason: String,
    },
}

/// An open or opening WebSocket. Dropping it detaches the handlers and
/// closes the connection, so no event of an old socket reaches the driver.
pub(crate) struct Socket {
    ws: WebSocket,
    _on_open: Closure<dyn FnMut(Event)>,
    _on_message: Closure<dyn FnMut(MessageEvent)>,
    _on_close: Closure<dyn FnMut(CloseEvent)>,
}

impl std::fmt::Debug for Socket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Socket")
            .field("url", &self.ws.url())
            .field("ready_state", &self.ws.ready_state())
            .finish()
    }
}

impl Socket {
    /// Start connecting to `url`; `handler` gets every event.
    pub(crate) fn open(
        url: &str,
        handler: impl Fn(SocketEvent) + Clone + 'static,
    ) -> Result<Self, JsValue> {
        let ws = WebSocket::new(url)?;
        ws.set_binary_type(BinaryType::Arraybuffer);
        let on_open = Closure::<dyn FnMut(Event)>::new({
            let handler = handler.clone();
            move |_| handler(SocketEvent::Open)
        });
        let on_message = Closure::<dyn FnMut(MessageEvent)>::new({
            let handler = handler.clone();
            move |event: MessageEvent| {
                let data = event.data();
                let bytes = if let Some(buffer) = data.dyn_ref::<ArrayBuffer>() {
                    Uint8Array::new(buffer).to_vec()
                } else if let Some(text) = data.as_string() {
                    text.into_bytes()
                } else {
                    return;
                };
                handler(SocketEvent::Message(bytes));
            }
        });
        let on_close = Closure::<dyn FnMut(CloseEvent)>::new(move |event: CloseEvent| {
            handler(SocketEvent::Closed {
                code: event.code(),
                reason: event.reason(),
            })
        });
        ws.set_onopen(Some(on_open.as_ref().unchecked_ref()));
        ws.set_onmessage(Some(on_message.as_ref().unchecked_ref()));
        // An `error` event is always followed by `close`, which says more.
        ws.set_onclose(Some(on_close.as_ref().unchecked_ref()));
        Ok(Self {
            ws,
            _on_open: on_open,
            _on_message: on_message,
            _on_close: on_close,
        })
    }

    /// Send one binary frame; `false` if the socket is not open.
    pub(crate) fn send(&self, frame: &[u8]) -> bool {
        self.ws.ready_state() == WebSocket::OPEN && self.ws.send_with_u8_array(frame).is_ok()
    }
}

impl Drop for Socket {
    fn drop(&mut self) {
        self.ws.set_onopen(None);
        self.ws.set_onmessage(None);
        self.ws.set_onclose(None);
        if matches!(
            self.ws.ready_state(),
            WebSocket::CONNECTING | WebSocket::OPEN
        ) {
            let _ = self.ws.close_with_code(1000);
        }
    }
}
