//! Where a batch of subjects stands, for drivers that work its members in chunks taken in
//! the order of their ids (digests, never an identifier): positions that hold for any
//! subset of the members the batch started with.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::BatchMember;

/// Where a batch stands, in a driver's cursor.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct BatchPosition {
    /// Every member whose id sorts up to this one is done.
    #[serde(rename = "a", default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
    /// The chunk under way holds the members after `after` up to this id.
    #[serde(rename = "u", default, skip_serializing_if = "Option::is_none")]
    pub upto: Option<String>,
    /// Erase: the records of each member of the chunk, counted before its deletion was
    /// submitted and reported once (by member id; zero counts are left out).
    #[serde(rename = "c", default, skip_serializing_if = "BTreeMap::is_empty")]
    pub counts: BTreeMap<String, u64>,
}

impl BatchPosition {
    /// Whether every id is one a batch could have (a digest such as `hmac-sha256:<hex>`): a
    /// cursor is read back from status.
    pub fn is_valid(&self) -> bool {
        let valid = |id: &String| {
            !id.is_empty()
                && id.len() <= 200
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_:.+/=".contains(&b))
        };
        self.after
            .iter()
            .chain(&self.upto)
            .chain(self.counts.keys())
            .all(valid)
    }

    /// Whether `member` comes after the members done.
    pub fn later(&self, member: &BatchMember) -> bool {
        self.after.as_deref().is_none_or(|a| member.id.as_str() > a)
    }

    /// Whether `member` is in the chunk under way.
    pub fn in_chunk(&self, member: &BatchMember) -> bool {
        self.later(member)
            && self
                .upto
                .as_deref()
                .is_some_and(|u| member.id.as_str() <= u)
    }

    /// The counts of a chunk's members by id (zero counts left out).
    pub fn counts_of<'a>(
        members: impl IntoIterator<Item = (&'a BatchMember, u64)>,
    ) -> BTreeMap<String, u64> {
        members
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .map(|(m, n)| (m.id.clone(), n))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: &str) -> BatchMember {
        BatchMember {
            id: id.into(),
            identifiers: BTreeMap::new(),
        }
    }

    #[test]
    fn positions_hold_for_any_subset_and_refuse_what_they_never_hold() {
        let p = BatchPosition {
            after: Some("hmac-sha256:b".into()),
            upto: Some("hmac-sha256:d".into()),
            counts: BatchPosition::counts_of([
                (&member("hmac-sha256:c"), 2),
                (&member("hmac-sha256:d"), 0),
            ]),
        };
        assert_eq!(p.counts, BTreeMap::from([("hmac-sha256:c".to_string(), 2)]));
        let seen: Vec<(bool, bool)> = [
            "hmac-sha256:a",
            "hmac-sha256:b",
            "hmac-sha256:c",
            "hmac-sha256:d",
            "hmac-sha256:e",
        ]
        .iter()
        .map(|id| (p.later(&member(id)), p.in_chunk(&member(id))))
        .collect();
        assert_eq!(
            seen,
            [
                (false, false),
                (false, false),
                (true, true),
                (true, true),
                (true, false)
            ]
        );
        assert!(p.is_valid());
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(
            json,
            r#"{"a":"hmac-sha256:b","u":"hmac-sha256:d","c":{"hmac-sha256:c":2}}"#
        );
        assert_eq!(serde_json::from_str::<BatchPosition>(&json).unwrap(), p);
        for bad in [r#"{"a":"a b"}"#, r#"{"u":""}"#, r#"{"c":{"x\ny":1}}"#] {
            let read: BatchPosition = serde_json::from_str(bad).unwrap();
            assert!(!read.is_valid(), "{bad}");
        }
        assert!(
            !BatchPosition::default().in_chunk(&member("x")),
            "no chunk under way"
        );
    }
}
