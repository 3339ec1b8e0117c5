//! Column values: what a register holds, and how it maps onto automerge.

use automerge::ScalarValue;

/// A column value. Registers hold one of these; counter columns read as
/// [`Value::Int`] and text columns as [`Value::String`].
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// No value.
    Null,
    /// A boolean.
    Bool(bool),
    /// A signed 64-bit integer.
    Int(i64),
    /// A 64-bit float.
    Float(f64),
    /// UTF-8 text (a plain register; see [`ColumnKind::Text`](super::ColumnKind::Text)
    /// for collaborative text).
    String(String),
    /// Raw bytes.
    Bytes(Vec<u8>),
    /// Milliseconds since the Unix epoch.
    Timestamp(i64),
}

impl Value {
    pub(crate) fn to_scalar(&self) -> ScalarValue {
        match self {
            Value::Null => ScalarValue::Null,
            Value::Bool(b) => ScalarValue::Boolean(*b),
            Value::Int(i) => ScalarValue::Int(*i),
            Value::Float(f) => ScalarValue::F64(*f),
            Value::String(s) => ScalarValue::Str(s.as_str().into()),
            Value::Bytes(b) => ScalarValue::Bytes(b.clone()),
            Value::Timestamp(t) => ScalarValue::Timestamp(*t),
        }
    }

    /// The value of an automerge scalar, if it is one a column can hold
    /// (counters read as their current total).
    pub(crate) fn from_scalar(s: &ScalarValue) -> Option<Value> {
        Some(match s {
            ScalarValue::Null => Value::Null,
            ScalarValue::Boolean(b) => Value::Bool(*b),
            ScalarValue::Int(i) => Value::Int(*i),
            ScalarValue::Uint(u) => Value::Int(i64::try_from(*u).ok()?),
            ScalarValue::F64(f) => Value::Float(*f),
            ScalarValue::Str(s) => Value::String(s.to_string()),
            ScalarValue::Bytes(b) => Value::Bytes(b.clone()),
            ScalarValue::Timestamp(t) => Value::Timestamp(*t),
            ScalarValue::Counter(c) => Value::Int(i64::from(c)),
            _ => return None,
        })
    }

    /// The integer, if this is one.
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }

    /// The text, if this is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// The boolean, if this is one.
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }
}

impl From<bool> for Value {
    fn from(b: bool) -> Self {
        Value::Bool(b)
    }
}
impl From<i64> for Value {
    fn from(i: i64) -> Self {
        Value::Int(i)
    }
}
impl From<i32> for Value {
    fn from(i: i32) -> Self {
        Value::Int(i.into())
    }
}
impl From<f64> for Value {
    fn from(f: f64) -> Self {
        Value::Float(f)
    }
}
impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::String(s.to_owned())
    }
}
impl From<String> for Value {
    fn from(s: String) -> Self {
        Value::String(s)
    }
}
impl From<Vec<u8>> for Value {
    fn from(b: Vec<u8>) -> Self {
        Value::Bytes(b)
    }
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::Null => f.write_str("null"),
            Value::Bool(b) => write!(f, "{b}"),
            Value::Int(i) => write!(f, "{i}"),
            Value::Float(x) => write!(f, "{x}"),
            Value::String(s) => write!(f, "{s:?}"),
            Value::Bytes(b) => write!(f, "0x{}", hex::encode(b)),
            Value::Timestamp(t) => write!(f, "@{t}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_round_trips_through_automerge() {
        for v in [
            Value::Null,
            Value::Bool(true),
            Value::Int(-7),
            Value::Float(1.5),
            Value::String("x".into()),
            Value::Bytes(vec![0, 255]),
            Value::Timestamp(1_700_000_000_000),
        ] {
            assert_eq!(Value::from_scalar(&v.to_scalar()), Some(v));
        }
    }
}
