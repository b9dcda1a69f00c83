//! Where a sweep or an erasure resumes, as stored in status (`v1:elasticsearch:` and its
//! JSON; `es:` and the same JSON in the previous version).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::indices::valid_index_name;
use super::task::{valid_marker, valid_task_id};
pub use crate::backends::chunks::BatchPosition;
use crate::backends::Error;

/// Where a sweep or an erasure resumes. Holds index names, task ids and counts, never a
/// query: queries of erasures carry identifiers, and the cursor is stored in status.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Cursor {
    /// Sweep, fast path: the last index judged (indices are taken in name order).
    #[serde(rename = "a", default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
    /// Sweep: the fast path is over.
    #[serde(rename = "q", default, skip_serializing_if = "std::ops::Not::not")]
    pub by_query: bool,
    /// Sweep, fast path: the index whose writes the operator blocks (named here, and
    /// checkpointed, before the block is set) to judge it again. The next step lifts the
    /// block unless it deletes the index, also when it resumes after a crash.
    #[serde(rename = "b", default, skip_serializing_if = "Option::is_none")]
    pub blocking: Option<String>,
    /// The name of the next submission (sent as its `X-Opaque-Id`), checkpointed by a step
    /// of its own before the task is submitted: a step that resumes with a marker and no
    /// task looks for the task by it (running or finished) and adopts it rather than
    /// submitting another, so what a submission whose step was lost deletes is counted.
    #[serde(rename = "m", default, skip_serializing_if = "Option::is_none")]
    pub marker: Option<String>,
    /// The delete-by-query task being polled.
    #[serde(rename = "t", default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    /// Polls of the task so far (for the back-off).
    #[serde(rename = "p", default, skip_serializing_if = "is_zero")]
    pub polls: u32,
    /// Consecutive polls that failed for a transient reason.
    #[serde(rename = "e", default, skip_serializing_if = "is_zero")]
    pub errors: u32,
    /// Tasks of this deletion that ended badly and were submitted again (see [`settle`]).
    #[serde(rename = "n", default, skip_serializing_if = "is_zero")]
    pub attempts: u32,
    /// Erasure: documents deleted by the finished tasks of this erasure, reported when it
    /// is done. (A sweep reports each task's count in the step that reads it.)
    #[serde(rename = "d", default, skip_serializing_if = "is_zero_u64")]
    pub deleted: u64,
    /// A finished task whose stored result (`.tasks/_doc/<id>`) is deleted by the next step:
    /// only after its count is checkpointed, so a crash in between cannot lose the count.
    #[serde(rename = "x", default, skip_serializing_if = "Option::is_none")]
    pub clean: Option<String>,
    /// The deletion is over: the next step only cleans up and finishes.
    #[serde(rename = "s", default, skip_serializing_if = "std::ops::Not::not")]
    pub settled: bool,
    /// A batch of subjects: where it stands (the fields above are its chunk's deletion).
    #[serde(rename = "B", default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<BatchPosition>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

fn is_zero_u64(n: &u64) -> bool {
    *n == 0
}

/// How the previous version wrote a cursor in status.
const LEGACY_PREFIX: &str = "es:";

impl Cursor {
    /// A cursor as the previous version wrote it in status (`es:{…}`); not yet checked
    /// ([`Cursor::validate`] is, before a step or a cancellation uses it).
    pub fn legacy(text: &str) -> Option<Self> {
        text.strip_prefix(LEGACY_PREFIX)
            .and_then(|json| serde_json::from_str(json).ok())
    }

    /// Refuses what a cursor the steps write never holds: it is read back from status,
    /// where anyone with access can write, and its names go into request paths.
    pub fn validate(&self) -> Result<(), Error> {
        if let Some(index) = &self.blocking {
            if !valid_index_name(index) {
                return Err(Error::InvalidSpec(format!(
                    "unreadable Elasticsearch index name {index:?} in cursor"
                )));
            }
        }
        if let Some(marker) = &self.marker {
            if !valid_marker(marker) {
                return Err(Error::InvalidSpec(format!(
                    "unreadable Elasticsearch submission marker {marker:?} in cursor"
                )));
            }
        }
        if let Some(batch) = &self.batch {
            if !batch.is_valid() {
                return Err(Error::InvalidSpec(
                    "unreadable batch member id in an Elasticsearch cursor".into(),
                ));
            }
        }
        for task in [&self.task, &self.clean].into_iter().flatten() {
            if !valid_task_id(task) {
                return Err(Error::InvalidSpec(format!(
                    "unreadable Elasticsearch task id {task:?} in cursor"
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backends::elasticsearch::task::{poll_delay, valid_task_id};
    use serde_json::json;

    #[test]
    fn a_cursor_names_one_concrete_index_to_unblock() {
        let cursor = Cursor {
            blocking: Some("events-2020.01.01".into()),
            ..Cursor::default()
        };
        assert!(cursor.validate().is_ok());
        for bad in ["", "events-*", "a,b", "_all", "-x", "..", "a/b", "a b"] {
            assert!(!valid_index_name(bad), "{bad:?}");
            let read: Cursor = serde_json::from_value(json!({"b": bad})).unwrap();
            assert!(read.validate().is_err(), "{bad:?}");
        }
        assert!(valid_index_name(".ds-metrics-000001"));
    }

    #[test]
    fn cursors_round_trip_and_refuse_what_they_never_hold() {
        let c = Cursor {
            after: Some("logs-2026.01.01".into()),
            by_query: true,
            blocking: None,
            marker: Some("tombstone-1767225600000-0123456789abcdef".into()),
            task: Some("oTUltX4IQMOUUVeiohTt8A:12345".into()),
            polls: 3,
            errors: 1,
            attempts: 2,
            deleted: 7,
            clean: Some("oTUltX4IQMOUUVeiohTt8A:12344".into()),
            settled: true,
            batch: Some(BatchPosition {
                after: Some("hmac-sha256:0a".into()),
                upto: Some("hmac-sha256:ff".into()),
                counts: [("hmac-sha256:0b".to_string(), 3)].into(),
            }),
        };
        let json = serde_json::to_string(&c).unwrap();
        let read: Cursor = serde_json::from_str(&json).unwrap();
        assert_eq!(read, c);
        assert!(read.validate().is_ok());
        assert_eq!(Cursor::legacy(&format!("es:{json}")), Some(c));
        assert_eq!(serde_json::to_string(&Cursor::default()).unwrap(), "{}");
        assert_eq!(Cursor::legacy("s3:{}"), None);
        for bad in [
            r#"{"x":"_all"}"#,
            r#"{"t":"../../_all"}"#,
            r#"{"m":"x\r\nAuthorization: y"}"#,
            r#"{"B":{"a":"a b"}}"#,
            r#"{"B":{"c":{"":1}}}"#,
        ] {
            let read: Cursor = serde_json::from_str(bad).unwrap();
            assert!(read.validate().is_err(), "{bad}");
            assert!(Cursor::legacy(&format!("es:{bad}"))
                .unwrap()
                .validate()
                .is_err());
        }
        assert!(valid_task_id("node_1-x:7"));
        assert!(!valid_task_id("node:"));
        assert!(!valid_task_id("node/x:1"));
        assert_eq!(poll_delay(0).as_secs(), 1);
        assert_eq!(poll_delay(10).as_secs(), 30);
    }
}
