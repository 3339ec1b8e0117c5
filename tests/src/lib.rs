//! Shared helpers for the workspace tests.

pub mod sim;
