//! Types shared by every kind: durations, timestamps, conditions and Secret references.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, SecondsFormat, TimeZone, Utc};
use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The pattern the CRD schema enforces on every duration, so bad values are refused by the
/// API server rather than discovered at run time: at least 1 of its unit (`0d` is a typo, not
/// "delete everything now") and at most ten digits. Every duration field (retention,
/// schedule.every) must be at least 1s. The upper bounds of each field are checked by the
/// reconciler ([`Duration::check`]), which also catches objects stored under an older, looser
/// schema: parsing is lenient so such objects can still be read and reported.
pub const DURATION_PATTERN: &str = "^[1-9][0-9]{0,9}(s|m|h|d|w)$";

/// The longest retention period: 100 years (of 365.25 days). Also keeps every date computed
/// from it far inside what date arithmetic can represent.
pub const MAX_RETENTION: Duration = Duration::from_secs(36_525 * 86_400);

/// The longest sweep interval (`schedule.every`): one year.
pub const MAX_INTERVAL: Duration = Duration::from_secs(366 * 86_400);

/// A duration written as a number and one unit: `90s`, `15m`, `12h`, `30d`, `2w`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Duration(std::time::Duration);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid duration {0:?}: expected a number and one unit of s, m, h, d, w (e.g. 30d)")]
pub struct InvalidDuration(pub String);

impl Duration {
    pub const fn from_secs(secs: u64) -> Self {
        Self(std::time::Duration::from_secs(secs))
    }
    /// Checks that the duration is at least 1s and at most `max`; `what` names the field.
    pub fn check(&self, what: &str, max: Duration) -> Result<(), String> {
        if self.as_secs() == 0 {
            return Err(format!(
                "{what} is zero: it must be at least 1 of its unit (e.g. 30d)"
            ));
        }
        if *self > max {
            return Err(format!("{what} {self} is longer than the maximum of {max}"));
        }
        Ok(())
    }
    pub fn as_std(&self) -> std::time::Duration {
        self.0
    }
    pub fn as_secs(&self) -> u64 {
        self.0.as_secs()
    }
    /// As a chrono duration, saturating at the largest one chrono can represent (never
    /// panics). Add it to a date with `checked_add_signed` / `checked_sub_signed`.
    pub fn as_chrono(&self) -> chrono::Duration {
        i64::try_from(self.0.as_secs())
            .ok()
            .and_then(chrono::Duration::try_seconds)
            .unwrap_or(chrono::Duration::MAX)
    }
}

impl FromStr for Duration {
    type Err = InvalidDuration;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || InvalidDuration(s.to_string());
        let unit = s.chars().last().ok_or_else(bad)?;
        let digits = &s[..s.len() - unit.len_utf8()];
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        // Lenient on size: a number too large for u64 saturates rather than fail, so an
        // object stored under an older schema still deserializes and the reconciler can
        // report it as invalid (see `check`) instead of never seeing it.
        let n: u64 = digits.parse().unwrap_or(u64::MAX);
        let factor = match unit {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            'w' => 7 * 86_400,
            _ => return Err(bad()),
        };
        Ok(Self::from_secs(n.saturating_mul(factor)))
    }
}

impl fmt::Display for Duration {
    /// Prints the largest unit that divides the duration exactly, so `30d` stays `30d`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.0.as_secs();
        for (unit, factor) in [("w", 7 * 86_400), ("d", 86_400), ("h", 3600), ("m", 60)] {
            if secs > 0 && secs.is_multiple_of(factor) {
                return write!(f, "{}{}", secs / factor, unit);
            }
        }
        write!(f, "{secs}s")
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for Duration {
    fn inline_schema() -> bool {
        true
    }
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({"type": "string", "pattern": DURATION_PATTERN})
    }
}

/// An RFC 3339 instant, always written in UTC with whole seconds so status stays stable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(pub DateTime<Utc>);

impl Timestamp {
    pub fn now() -> Self {
        Self::truncate(Utc::now())
    }
    /// Drops sub-second precision: what is written to status must compare equal after a
    /// round trip through the API server.
    pub fn truncate(t: DateTime<Utc>) -> Self {
        Self(Utc.timestamp_opt(t.timestamp(), 0).single().unwrap_or(t))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.to_rfc3339_opts(SecondsFormat::Secs, true))
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        DateTime::parse_from_rfc3339(&s)
            .map(|t| Timestamp(t.with_timezone(&Utc)))
            .map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for Timestamp {
    fn inline_schema() -> bool {
        true
    }
    fn schema_name() -> Cow<'static, str> {
        "Timestamp".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({"type": "string", "format": "date-time"})
    }
}

/// A key of a Secret in the same namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    #[schemars(length(min = 1))]
    pub name: String,
    #[schemars(length(min = 1))]
    pub key: String,
}

/// A whole Secret in the same namespace; which keys are read is documented per field.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretRef {
    #[schemars(length(min = 1))]
    pub name: String,
}

/// What kind of failure an error is: it alone decides what the operator does next (retry
/// with back-off, fail the target, or wait for a person). Shown in status next to the
/// failure's reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ErrorCategory {
    /// May clear by itself (the store unreachable or failing, leadership lost): retried with
    /// back-off, resuming where the failed step left off.
    Transient,
    /// The spec (or how the store is set up) cannot run as written: permanent until someone
    /// edits it. Not retried with back-off.
    InvalidSpec,
    /// The store said no (credentials, a missing bucket, a task of its own that failed):
    /// retried with back-off, as someone may fix it where the operator cannot see.
    Refused,
    /// The operator cannot safely go on without a person (copies it cannot parse remain, a
    /// deletion the store ran was lost or cancelled by someone else): waits and says so in a
    /// condition.
    NeedsAttention,
}

impl ErrorCategory {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCategory::Transient => "Transient",
            ErrorCategory::InvalidSpec => "InvalidSpec",
            ErrorCategory::Refused => "Refused",
            ErrorCategory::NeedsAttention => "NeedsAttention",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ConditionStatus {
    True,
    False,
    Unknown,
}

/// A standard Kubernetes condition (metav1.Condition).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    pub status: ConditionStatus,
    pub reason: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    pub last_transition_time: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// What a reconciler wants a condition to say; turned into a [`Condition`] by
/// [`set_condition`], which keeps `lastTransitionTime` unless the status flips.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredCondition {
    pub type_: &'static str,
    pub status: ConditionStatus,
    pub reason: &'static str,
    pub message: String,
}

impl DesiredCondition {
    pub fn new(
        type_: &'static str,
        status: bool,
        reason: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Self {
            type_,
            status: if status {
                ConditionStatus::True
            } else {
                ConditionStatus::False
            },
            reason,
            message: message.into(),
        }
    }
    pub fn unknown(type_: &'static str, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            type_,
            status: ConditionStatus::Unknown,
            reason,
            message: message.into(),
        }
    }
}

/// Merges desired conditions into the existing list. `lastTransitionTime` changes only when
/// a condition's status changes, so re-computing status does not churn timestamps.
pub fn merge_conditions(
    existing: &[Condition],
    desired: Vec<DesiredCondition>,
    generation: Option<i64>,
    now: Timestamp,
) -> Vec<Condition> {
    desired
        .into_iter()
        .map(|d| {
            let previous = existing.iter().find(|c| c.type_ == d.type_);
            let last_transition_time = match previous {
                Some(p) if p.status == d.status => p.last_transition_time,
                _ => now,
            };
            Condition {
                type_: d.type_.to_string(),
                status: d.status,
                reason: d.reason.to_string(),
                message: d.message,
                last_transition_time,
                observed_generation: generation,
            }
        })
        .collect()
}

pub fn find_condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    find_condition(conditions, type_).is_some_and(|c| c.status == ConditionStatus::True)
}

/// Deserializes a store-kind section (an externally tagged enum flattened into its parent,
/// such as a DataStore's `redis`) from the parent's keys: the section when exactly one store
/// kind's key is there (and not `null`), None when none or several are (the schema refuses
/// both; an object stored before it is refused by validation instead of making its whole
/// list unreadable).
/// A section that is there but malformed is an error, as any malformed field is.
pub(crate) fn one_kind<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    let fields = serde_json::Map::<String, serde_json::Value>::deserialize(deserializer)?;
    let mut kinds = fields
        .into_iter()
        // A section written as `null` (the schema let it be, before) is no section.
        .filter(|(key, value)| {
            !value.is_null() && super::StoreKind::ALL.iter().any(|k| k.as_str() == key)
        });
    match (kinds.next(), kinds.next()) {
        (Some(one), None) => {
            serde_json::from_value(serde_json::Value::Object([one].into_iter().collect()))
                .map(Some)
                .map_err(serde::de::Error::custom)
        }
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_every_unit() {
        assert_eq!("90s".parse::<Duration>().unwrap().as_secs(), 90);
        assert_eq!("15m".parse::<Duration>().unwrap().as_secs(), 900);
        assert_eq!("12h".parse::<Duration>().unwrap().as_secs(), 43_200);
        assert_eq!("30d".parse::<Duration>().unwrap().as_secs(), 2_592_000);
        assert_eq!("2w".parse::<Duration>().unwrap().as_secs(), 1_209_600);
    }

    #[test]
    fn durations_reject_what_the_schema_rejects() {
        for bad in ["", "30", "d", "30 days", "30D", "-1d", "1.5h", "3dd", "1y"] {
            assert!(bad.parse::<Duration>().is_err(), "{bad} must be rejected");
        }
    }

    #[test]
    fn durations_parse_leniently_and_are_checked_strictly() {
        // Values an older schema let through still parse (saturating), so the object can be
        // read and reported invalid rather than break the watch.
        let huge: Duration = "99999999999999999999w".parse().unwrap();
        assert_eq!(huge.as_secs(), u64::MAX);
        let old: Duration = "1000000000w".parse().unwrap();
        assert_eq!(old.as_secs(), 604_800_000_000_000);
        assert!(huge.as_chrono() > chrono::Duration::zero());
        for (d, ok) in [
            ("0d", false),
            ("0s", false),
            ("1s", true),
            ("36525d", true),
            ("36526d", false),
            ("5217w", true),
            ("5218w", false),
            ("1000000000w", false),
            ("99999999999999999999w", false),
        ] {
            let d: Duration = d.parse().unwrap();
            assert_eq!(d.check("retention", MAX_RETENTION).is_ok(), ok, "{d}");
        }
        assert!("0d"
            .parse::<Duration>()
            .unwrap()
            .check("retention", MAX_RETENTION)
            .unwrap_err()
            .contains("at least 1"));
        assert!("367d"
            .parse::<Duration>()
            .unwrap()
            .check("schedule.every", MAX_INTERVAL)
            .is_err());
    }

    #[test]
    fn durations_print_canonically() {
        assert_eq!("720h".parse::<Duration>().unwrap().to_string(), "30d");
        assert_eq!("90s".parse::<Duration>().unwrap().to_string(), "90s");
        assert_eq!("0s".parse::<Duration>().unwrap().to_string(), "0s");
    }

    #[test]
    fn timestamps_round_trip_at_second_precision() {
        let t: Timestamp = serde_json::from_str("\"2026-11-20T09:00:00.123+01:00\"").unwrap();
        assert_eq!(
            serde_json::to_string(&Timestamp::truncate(t.0)).unwrap(),
            "\"2026-11-20T08:00:00Z\""
        );
    }

    #[test]
    fn transition_time_changes_only_on_status_flip() {
        let t0 = Timestamp::truncate(Utc.timestamp_opt(1_000, 0).unwrap());
        let t1 = Timestamp::truncate(Utc.timestamp_opt(2_000, 0).unwrap());
        let first = merge_conditions(
            &[],
            vec![DesiredCondition::new("Ready", true, "Connected", "a")],
            Some(1),
            t0,
        );
        let same = merge_conditions(
            &first,
            vec![DesiredCondition::new("Ready", true, "Connected", "b")],
            Some(2),
            t1,
        );
        assert_eq!(same[0].last_transition_time, t0);
        assert_eq!(same[0].message, "b");
        let flipped = merge_conditions(
            &same,
            vec![DesiredCondition::new("Ready", false, "Unreachable", "c")],
            Some(2),
            t1,
        );
        assert_eq!(flipped[0].last_transition_time, t1);
    }
}
