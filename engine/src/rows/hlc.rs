//! Hybrid logical clock: the timestamps that order register writes.
//!
//! A timestamp is (wall-clock milliseconds, counter, replica). A replica's
//! clock never goes backwards, and a write always gets a timestamp above
//! every timestamp it has seen in the row, so a write that causally follows
//! another always orders after it, even when wall clocks disagree. Ties
//! between replicas break by replica id, so every replica orders any two
//! writes the same way.

/// When a register write (or a delete) happened, totally ordered. Its text
/// form (`Display`, `FromStr`), `<millis>.<counter>@<replica>`, is the
/// message of the change that made the write.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp {
    /// Wall-clock milliseconds since the Unix epoch (or later, if the clock
    /// had to move past a timestamp it saw).
    pub millis: u64,
    /// Orders writes within one millisecond.
    pub counter: u32,
    /// The writing replica (its storage id): breaks ties.
    pub replica: String,
}

impl std::fmt::Display for Timestamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}@{}", self.millis, self.counter, self.replica)
    }
}

/// A string that is not `<millis>.<counter>@<replica>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseTimestampError;

impl std::fmt::Display for ParseTimestampError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("expected a timestamp as <millis>.<counter>@<replica>")
    }
}

impl std::error::Error for ParseTimestampError {}

impl std::str::FromStr for Timestamp {
    type Err = ParseTimestampError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (clock, replica) = s.split_once('@').ok_or(ParseTimestampError)?;
        let (millis, counter) = clock.split_once('.').ok_or(ParseTimestampError)?;
        let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
        if !digits(millis) || !digits(counter) || replica.is_empty() {
            return Err(ParseTimestampError);
        }
        Ok(Timestamp {
            millis: millis.parse().map_err(|_| ParseTimestampError)?,
            counter: counter.parse().map_err(|_| ParseTimestampError)?,
            replica: replica.to_owned(),
        })
    }
}

/// A replica's hybrid logical clock.
#[derive(Clone, Debug, Default)]
pub struct HybridClock {
    millis: u64,
    counter: u32,
}

impl HybridClock {
    /// The next timestamp at wall-clock time `now`, above both everything
    /// this clock issued and `seen` (the latest timestamp the writer observed).
    pub fn tick(&mut self, now: u64, seen: Option<&Timestamp>, replica: &str) -> Timestamp {
        let (seen_millis, seen_counter) = seen.map_or((0, 0), |t| (t.millis, t.counter));
        let floor = (self.millis, self.counter).max((seen_millis, seen_counter));
        (self.millis, self.counter) = if now > floor.0 {
            (now, 0)
        } else if floor.1 == u32::MAX {
            (floor.0 + 1, 0)
        } else {
            (floor.0, floor.1 + 1)
        };
        Timestamp {
            millis: self.millis,
            counter: self.counter,
            replica: replica.to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_goes_backwards_and_passes_what_it_saw() {
        let mut c = HybridClock::default();
        let a = c.tick(100, None, "a");
        let b = c.tick(90, None, "a"); // wall clock stepped back
        assert!(b > a);
        let far = Timestamp {
            millis: 5_000,
            counter: 3,
            replica: "z".into(),
        };
        let d = c.tick(100, Some(&far), "a");
        assert!(d > far, "{d} must order after {far}");
        assert_eq!((d.millis, d.counter), (5_000, 4));
        let e = c.tick(6_000, None, "a");
        assert_eq!((e.millis, e.counter), (6_000, 0));
    }

    #[test]
    fn text_form_round_trips_and_rejects_other_messages() {
        let t = Timestamp {
            millis: 1_700_000_000_123,
            counter: 7,
            replica: "3vQB7B6MrGQZaxCuFg4oh".into(),
        };
        assert_eq!(t.to_string().parse::<Timestamp>(), Ok(t));
        for bad in ["", "fix typo", "12@a", "1.x@a", "1.2@", ".2@a", "-1.2@a"] {
            assert!(bad.parse::<Timestamp>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn ties_break_by_replica() {
        let mut a = HybridClock::default();
        let mut b = HybridClock::default();
        assert!(a.tick(7, None, "a") < b.tick(7, None, "b"));
    }
}
