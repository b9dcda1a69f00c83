//! Write-ahead intents that keep a sweep's counts exact when a step's checkpoint is lost.
//!
//! Before each `DeleteObjects` batch of a sweep the driver writes a small object under a
//! reserved prefix that sweeps never select, `.tombstone/intents/<run>/<seq>`, listing the
//! batch's keys and version ids. The checkpoint carries the run and the next sequence number:
//! intents below it belong to batches status already counts and are removed; intents at or
//! above it were written by a step whose outcome was lost, and what of them is gone (HEAD
//! answers 404) was deleted by that batch and is counted then. The intent holds object keys,
//! which may be personal data: it lives only in the bucket that holds those objects, and only
//! until the count it backs is checkpointed.

use serde::{Deserialize, Serialize};

/// Every intent is under this prefix; listings never return such keys to a sweep or erasure.
pub const PREFIX: &str = ".tombstone/";

/// Whether `key` is one of the operator's own objects.
pub fn is_reserved(key: &str) -> bool {
    key.starts_with(PREFIX)
}

/// The prefix of one run's intents.
pub fn run_prefix(run: &str) -> String {
    format!("{PREFIX}intents/{run}/")
}

/// The key of a run's intent number `seq` (zero-padded, so listings sort by number).
pub fn key(run: &str, seq: u64) -> String {
    format!("{}{seq:020}", run_prefix(run))
}

/// The sequence number of an intent key of `run`, if it is one.
pub fn seq_of(run: &str, key: &str) -> Option<u64> {
    key.strip_prefix(&run_prefix(run))?.parse().ok()
}

/// One batch: (key, version id) pairs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Intent {
    #[serde(rename = "o")]
    pub objects: Vec<(String, Option<String>)>,
}

impl Intent {
    pub fn encode(&self) -> Vec<u8> {
        // Serialising strings cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(body: &[u8]) -> Option<Self> {
        serde_json::from_slice(body).ok()
    }
}

/// Where a sweep's intents stand, as its cursor carries them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Journal {
    #[serde(rename = "r")]
    pub run: String,
    /// The next intent's number: intents below it back counts already checkpointed.
    #[serde(rename = "q", default)]
    pub seq: u64,
    /// Every page is done and every lost batch counted: the next step only removes the
    /// intents.
    #[serde(rename = "z", default, skip_serializing_if = "std::ops::Not::not")]
    pub settled: bool,
}

impl Journal {
    /// The next intent number, checked (a run never writes 2^64 intents; saturating keeps
    /// a hostile cursor from panicking the operator).
    pub fn take_seq(&mut self) -> u64 {
        let seq = self.seq;
        self.seq = self.seq.saturating_add(1);
        seq
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intents_round_trip_and_sort_by_number() {
        let i = Intent {
            objects: vec![
                ("logs/a\nb".into(), Some("v1".into())),
                ("logs/c".into(), None),
            ],
        };
        assert_eq!(Intent::decode(&i.encode()), Some(i));
        assert_eq!(Intent::decode(b"not json"), None);
        assert!(key("0a1b", 9) < key("0a1b", 10));
        assert_eq!(seq_of("0a1b", &key("0a1b", 42)), Some(42));
        assert_eq!(seq_of("0a1b", &key("ffff", 42)), None);
        assert_eq!(seq_of("0a1b", ".tombstone/intents/0a1b/x"), None);
        assert!(is_reserved(&key("0a1b", 0)));
        assert!(!is_reserved("logs/.tombstone/x"));
    }

    #[test]
    fn sequence_numbers_never_overflow() {
        let mut j = Journal {
            run: "0a1b".into(),
            seq: u64::MAX,
            settled: false,
        };
        assert_eq!(j.take_seq(), u64::MAX);
        assert_eq!(j.seq, u64::MAX);
        let mut j = Journal::default();
        assert_eq!((j.take_seq(), j.take_seq(), j.seq), (0, 1, 2));
    }
}
