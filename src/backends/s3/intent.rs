//! Write-ahead intents that keep a sweep's and an erasure's counts exact when a step's
//! checkpoint is lost.
//!
//! Before each counted `DeleteObjects` batch of a sweep or an erasure (key-prefix objects,
//! older archive versions holding records; each weighed by what it counts for) the driver
//! writes a small object under a
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

/// Where every run's intents are.
pub const INTENTS: &str = ".tombstone/intents/";

/// Intents last modified longer ago than this belong to runs abandoned long ago (the Redis
/// ledger's expiry): removed by the next job that finishes in the bucket.
pub const ABANDONED_AFTER: chrono::Duration = chrono::Duration::days(7);

/// Listing pages of intents (1,000 each) a finished job looks through for abandoned ones.
pub const ABANDONED_PAGES: usize = 10;

/// Whether `key` is one of the operator's own objects.
pub fn is_reserved(key: &str) -> bool {
    key.starts_with(PREFIX)
}

/// The prefix of one run's intents.
pub fn run_prefix(run: &str) -> String {
    format!("{INTENTS}{run}/")
}

/// The key of a run's intent number `seq` (zero-padded, so listings sort by number).
pub fn key(run: &str, seq: u64) -> String {
    format!("{}{seq:020}", run_prefix(run))
}

/// The sequence number of an intent key of `run`, if it is one.
pub fn seq_of(run: &str, key: &str) -> Option<u64> {
    key.strip_prefix(&run_prefix(run))?.parse().ok()
}

/// The longest common prefix of `a` and `b` (on a char boundary).
pub fn common_prefix(a: &str, b: &str) -> String {
    a.chars()
        .zip(b.chars())
        .take_while(|(x, y)| x == y)
        .map(|(x, _)| x)
        .collect()
}

/// A listing marker after which `key` is listed (a listing starts after its marker): the
/// key without its last character, which sorts before it; `None` (from the start) for a
/// one-character key.
pub fn listed_before(key: &str) -> Option<String> {
    let mut chars = key.chars();
    chars.next_back()?;
    Some(chars.as_str().to_string()).filter(|k| !k.is_empty())
}

/// One batch: (key, version id) pairs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Intent {
    #[serde(rename = "o")]
    pub objects: Vec<(String, Option<String>)>,
    /// What each object counts for once gone, in the order of `objects` (an erasure counts
    /// an older archive version by the subject's records in it); empty: 1 each.
    #[serde(rename = "w", default, skip_serializing_if = "Vec::is_empty")]
    pub weights: Vec<u64>,
    /// A batch's: for each object, in the order of `objects`, the members it counts for
    /// once gone (by [`crate::backends::BatchMember::id`], a digest) and how much.
    #[serde(rename = "a", default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<Vec<(String, u64)>>,
    /// A batch's archive rewrite rather than a deletion: its one object is the archive,
    /// and it was written when the archive's current version records this intent
    /// ([`Intent::marker`]) among the runs that dropped records from it.
    #[serde(rename = "x", default, skip_serializing_if = "std::ops::Not::not")]
    pub rewrite: bool,
}

impl Intent {
    /// What the `i`-th object counts for once gone.
    pub fn weight(&self, i: usize) -> u64 {
        if self.weights.is_empty() {
            1
        } else {
            self.weights.get(i).copied().unwrap_or(0)
        }
    }

    /// The name a rewrite under intent `seq` of `run` records in the archive it writes.
    pub fn marker(run: &str, seq: u64) -> String {
        format!("{run}.{seq}")
    }

    /// Adds what the objects marked `gone` count for to each member's total (by id).
    pub fn attribute(&self, gone: &[bool], totals: &mut std::collections::BTreeMap<String, u64>) {
        for (counts, gone) in self.members.iter().zip(gone) {
            if *gone {
                for (id, n) in counts {
                    let total = totals.entry(id.clone()).or_default();
                    *total = total.saturating_add(*n);
                }
            }
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        // Serialising strings cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(body: &[u8]) -> Option<Self> {
        serde_json::from_slice(body).ok()
    }
}

/// Where a sweep's or an erasure's intents stand, as its cursor carries them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
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
            ..Intent::default()
        };
        assert_eq!(Intent::decode(&i.encode()), Some(i.clone()));
        assert_eq!((i.weight(0), i.weight(1)), (1, 1));
        let weighed = Intent {
            weights: vec![3, 7],
            ..i
        };
        assert_eq!(Intent::decode(&weighed.encode()), Some(weighed.clone()));
        assert_eq!(
            (weighed.weight(0), weighed.weight(1), weighed.weight(2)),
            (3, 7, 0)
        );
        assert_eq!(Intent::decode(b"not json"), None);
        // A batch's intent: per object, the members it counts for.
        let batch = Intent {
            objects: vec![("logs/a".into(), Some("v1".into())), ("u/b".into(), None)],
            members: vec![
                vec![("m1".into(), 3), ("m2".into(), 1)],
                vec![("m2".into(), 1)],
            ],
            ..Intent::default()
        };
        let read = Intent::decode(&batch.encode()).unwrap();
        assert_eq!(read, batch);
        let mut totals = std::collections::BTreeMap::new();
        read.attribute(&[true, false], &mut totals);
        read.attribute(&[false, true], &mut totals);
        assert_eq!(totals, [("m1".into(), 3), ("m2".into(), 2)].into());
        assert_eq!(Intent::marker("0a1b", 7), "0a1b.7");
        // An intent the single path wrote reads as one with no members.
        assert_eq!(
            Intent::decode(br#"{"o":[["k",null]]}"#).map(|i| (i.members.len(), i.rewrite)),
            Some((0, false))
        );
        assert!(key("0a1b", 9) < key("0a1b", 10));
        assert_eq!(seq_of("0a1b", &key("0a1b", 42)), Some(42));
        assert_eq!(seq_of("0a1b", &key("ffff", 42)), None);
        assert_eq!(seq_of("0a1b", ".tombstone/intents/0a1b/x"), None);
        assert!(is_reserved(&key("0a1b", 0)));
        assert!(!is_reserved("logs/.tombstone/x"));
    }

    #[test]
    fn a_batch_is_listed_from_just_before_its_first_key() {
        assert_eq!(common_prefix("logs/2026/a", "logs/2027/b"), "logs/202");
        assert_eq!(common_prefix("ü/a", "ü/b"), "ü/");
        assert_eq!(common_prefix("a", "b"), "");
        assert_eq!(listed_before("logs/a").as_deref(), Some("logs/"));
        assert_eq!(listed_before("logs/ü").as_deref(), Some("logs/"));
        assert!(listed_before("logs/a").unwrap().as_str() < "logs/a");
        assert_eq!(listed_before("a"), None);
        assert_eq!(listed_before(""), None);
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
