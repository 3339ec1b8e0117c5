//! Helpers for the JS interop test: a WebSocket driver for the sans-IO repo
//! and a line-protocol wrapper around the Node scripts in `tests/js`.

pub mod node;
pub mod ws_shim;
