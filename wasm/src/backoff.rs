//! Reconnect timing and relay URLs: pure functions, so they are tested
//! natively; the browser supplies the randomness.

/// The wait in milliseconds before retry number `failures` (1-based):
/// exponential from `min_ms`, capped at `max_ms`, then "equal jitter"
/// (uniform in the upper half, from `random` in `[0, 1)`), so tabs that lost
/// the relay together do not all return at the same instant.
pub fn backoff_ms(failures: u32, min_ms: u32, max_ms: u32, random: f64) -> u32 {
    let exp = failures.saturating_sub(1).min(30);
    let base = u64::from(min_ms.max(1))
        .saturating_mul(1 << exp)
        .min(u64::from(max_ms.max(1)));
    let half = base / 2;
    let jitter = (base as f64 * 0.5 * random.clamp(0.0, 1.0)) as u64;
    u32::try_from((half + jitter).min(base)).unwrap_or(u32::MAX)
}

/// `url` with `token=` added to its query (percent-encoded), as the relay
/// reads it; browsers cannot set an `Authorization` header on a WebSocket.
pub fn with_token(url: &str, token: Option<&str>) -> String {
    let Some(token) = token.filter(|t| !t.is_empty()) else {
        return url.to_owned();
    };
    let mut encoded = String::with_capacity(token.len());
    for b in token.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            encoded.push(char::from(b));
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    let (base, fragment) = match url.find('#') {
        Some(i) => url.split_at(i),
        None => (url, ""),
    };
    let mut base = base.to_owned();
    // `ws://host:port` has an empty path; the request line needs `/`.
    let authority = base.find("://").map_or(0, |i| i + 3);
    let path = base[authority..]
        .find(['/', '?'])
        .map_or(base.len(), |i| authority + i);
    if !base[path..].starts_with('/') {
        base.insert(path, '/');
    }
    let sep = if base.contains('?') { '&' } else { '?' };
    format!("{base}{sep}token={encoded}{fragment}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        assert_eq!(backoff_ms(1, 500, 30_000, 0.0), 250);
        assert_eq!(backoff_ms(1, 500, 30_000, 0.999_999), 499);
        assert_eq!(backoff_ms(2, 500, 30_000, 0.0), 500);
        assert_eq!(backoff_ms(3, 500, 30_000, 0.0), 1_000);
        for failures in 1..200 {
            for random in [0.0, 0.3, 0.99] {
                let wait = backoff_ms(failures, 500, 30_000, random);
                assert!((250..=30_000).contains(&wait), "{failures}: {wait}");
            }
        }
        assert_eq!(backoff_ms(100, 500, 30_000, 0.0), 15_000);
        assert_ne!(
            backoff_ms(5, 500, 30_000, 0.1),
            backoff_ms(5, 500, 30_000, 0.9),
            "no jitter"
        );
    }

    #[test]
    fn token_goes_in_the_query() {
        assert_eq!(with_token("ws://h:1", None), "ws://h:1");
        assert_eq!(with_token("ws://h:1", Some("")), "ws://h:1");
        assert_eq!(with_token("ws://h:1", Some("t")), "ws://h:1/?token=t");
        assert_eq!(
            with_token("wss://h/x", Some("a.b_c")),
            "wss://h/x?token=a.b_c"
        );
        assert_eq!(
            with_token("ws://h/?a=1", Some("a+b/c")),
            "ws://h/?a=1&token=a%2Bb%2Fc"
        );
        assert_eq!(with_token("ws://h?a=1", Some("t")), "ws://h/?a=1&token=t");
    }
}
