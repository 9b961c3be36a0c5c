//! Kubernetes `metav1.Time` semantics: UTC, RFC 3339, second precision on the wire.

use std::fmt;

use jiff::Timestamp;
use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A point in time, printed like Kubernetes' `metav1.Time` ("2026-06-15T09:30:12Z").
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Time(Timestamp);

impl Time {
    pub fn now() -> Self {
        Time(Timestamp::now())
    }

    pub fn from_unix_millis(ms: i64) -> Self {
        Time(Timestamp::from_millisecond(ms).unwrap_or(Timestamp::UNIX_EPOCH))
    }

    pub fn unix_millis(&self) -> i64 {
        self.0.as_millisecond()
    }

    pub fn unix_nanos(&self) -> i64 {
        self.0.as_nanosecond() as i64
    }

    /// Whole seconds since the epoch, the precision the API shows.
    pub fn unix_seconds(&self) -> i64 {
        self.0.as_second()
    }
}

impl fmt::Display for Time {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Truncate to seconds like metav1.Time does.
        let secs = Timestamp::from_second(self.0.as_second()).unwrap_or(self.0);
        write!(f, "{secs}")
    }
}

impl Serialize for Time {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Time {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse::<Timestamp>()
            .map(Time)
            .map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for Time {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Time".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({ "type": "string", "format": "date-time" })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prints_second_precision_utc() {
        let t = Time::from_unix_millis(1_781_515_812_345);
        assert_eq!(
            serde_json::to_string(&t).unwrap(),
            "\"2026-06-15T09:30:12Z\""
        );
    }

    #[test]
    fn parses_offsets_and_fractions() {
        let t: Time = serde_json::from_str("\"2026-06-15T11:30:12.5+02:00\"").unwrap();
        assert_eq!(t.to_string(), "2026-06-15T09:30:12Z");
    }
}
