//! What the crash child (`src/bin/crash_child.rs`) and the crash test
//! (`tests/crash.rs`) must agree on.

/// The padding string stored under `"{key}-pad"`: `len` bytes derived from
/// the key's value, so a wrong or truncated value is detected.
pub fn pad(value: u64, len: usize) -> String {
    let alphabet = b"abcdefghijklmnopqrstuvwxyz0123456789";
    (0..len)
        .map(|i| {
            alphabet[(value as usize).wrapping_mul(7).wrapping_add(i) % alphabet.len()] as char
        })
        .collect()
}
