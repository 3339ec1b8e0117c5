//! Shared helpers for the workspace tests.

pub mod crash;
pub mod sim;
