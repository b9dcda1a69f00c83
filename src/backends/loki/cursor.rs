//! Where a Loki job stands, kept in status between steps: the delete request's id and range,
//! the lines counted, and where a scan resumes. Never the query.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::MAX_LOST;
use crate::backends::chunks::BatchPosition;
use crate::backends::Error;

const CURSOR_PREFIX: &str = "loki:";

/// Where a job stands in a Loki cursor.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Stage {
    /// Waiting for the delete request to be processed (every cursor of earlier versions).
    #[default]
    Waiting,
    /// Counting the lines of the range before submitting (or, for Find, to report them):
    /// the windows between `from` and `at` are left.
    Counting,
    /// The request is processed: counting (sweeps) or looking for (erasures) what is left,
    /// between `from` and `at`.
    Checking,
    /// A processed request left lines in place: a new request is submitted at `until`.
    Resting,
}

fn is_waiting(stage: &Stage) -> bool {
    *stage == Stage::Waiting
}

fn is_zero<T: Default + PartialEq>(n: &T) -> bool {
    *n == T::default()
}

/// Where a job stands, kept in status: Loki's request id and its time range, the lines
/// counted before it was submitted, and where a scan in progress resumes. No query: it may
/// hold an identifier.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Cursor {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The delete request's range (for Find, the range counted).
    pub start: i64,
    pub end: i64,
    /// Lines counted in the range before submitting (partial while `Counting`).
    pub count: u64,
    #[serde(default, skip_serializing_if = "is_waiting")]
    pub stage: Stage,
    /// The oldest second a scan looks at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<i64>,
    /// A scan in progress: the windows older than this are left.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<i64>,
    /// The start of the oldest window the count found lines in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest: Option<i64>,
    /// Lines still there after processing (sweeps, partial while `Checking`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub left: u64,
    /// Requests submitted again because Loki no longer listed ours.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub lost: u32,
    /// `Resting`: when to submit again (unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<i64>,
    /// A batch of subjects: where it stands (the fields above are its chunk's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<BatchPosition>,
}

impl Cursor {
    /// A cursor as the previous version wrote it in status (`loki:{…}`).
    pub fn legacy(text: &str) -> Option<Cursor> {
        Self::decode(text).ok()
    }

    /// A count of (from, end] not yet started; the request will cover [start, end].
    pub fn counting(start: i64, end: i64, from: i64) -> Cursor {
        Cursor {
            id: None,
            start,
            end,
            count: 0,
            stage: Stage::Counting,
            from: Some(from),
            at: Some(end),
            oldest: None,
            left: 0,
            lost: 0,
            until: None,
            batch: None,
        }
    }

    pub fn encode(&self) -> String {
        format!(
            "{CURSOR_PREFIX}{}",
            serde_json::to_string(self).unwrap_or_default()
        )
    }

    pub fn decode(text: &str) -> Result<Cursor, Error> {
        text.strip_prefix(CURSOR_PREFIX)
            .and_then(|json| serde_json::from_str(json).ok())
            .ok_or_else(|| Error::Store("not a Loki cursor; the job starts over".into()))
    }

    pub(super) fn scan_from(&self) -> i64 {
        self.from.unwrap_or(self.start)
    }
}

/// What a Loki cursor waits for, for the target's status message (no identifier: request
/// ids and times only).
pub fn describe_wait(cursor: &Cursor) -> Option<String> {
    let time = |t: i64| {
        chrono::DateTime::from_timestamp(t, 0)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
            .unwrap_or_default()
    };
    let lost = if cursor.lost > 0 {
        format!(
            " (submitted again {} of {MAX_LOST} times: Loki no longer listed the earlier request)",
            cursor.lost
        )
    } else {
        String::new()
    };
    Some(match cursor.stage {
        Stage::Counting => "counting the matching lines in Loki".to_string(),
        Stage::Waiting => format!(
            "waiting for Loki to process delete request {}{lost}",
            cursor.id.as_deref().unwrap_or("(not yet listed)")
        ),
        Stage::Checking => "Loki processed the delete request; checking what is left".into(),
        Stage::Resting => format!(
            "LinesInIngesters: Loki processed the delete request but still returns matching lines (recent lines stay in its ingesters until flushed and indexed); a new request is submitted at {}",
            time(cursor.until.unwrap_or_default())
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backends::loki::fixtures::waiting;
    use crate::backends::loki::DELETE_START;

    #[test]
    fn cursors_of_the_previous_version_resume_waiting_and_waits_are_described() {
        let old = r#"loki:{"id":"ab4aefd4","start":1000000000,"end":1795361677,"count":3}"#;
        let c = Cursor::decode(old).unwrap();
        assert_eq!(
            (c.stage, c.id.as_deref(), c.count),
            (Stage::Waiting, Some("ab4aefd4"), 3)
        );
        assert_eq!((c.from, c.at, c.oldest, c.lost), (None, None, None, 0));
        assert!(describe_wait(&c).unwrap().contains("ab4aefd4"));
        let mut resting = c.clone();
        resting.stage = Stage::Resting;
        resting.until = Some(1_795_365_277);
        let text = resting.encode();
        assert_eq!(Cursor::decode(&text).unwrap(), resting);
        let note = describe_wait(&resting).unwrap();
        assert!(
            note.starts_with("LinesInIngesters") && note.contains("2026-11-22T16:34:37Z"),
            "{note}"
        );
    }

    #[test]
    fn the_adapter_resumes_the_previous_versions_cursor() {
        use crate::backends::driver::{decode_cursor, encode_cursor, Decoded};
        use crate::backends::loki::LokiBackend;
        let old = r#"loki:{"id":"ab4aefd4","start":1000000000,"end":1795361677,"count":3}"#;
        let Decoded::Resume { cursor, upgraded } = decode_cursor::<LokiBackend>(Some(old)) else {
            panic!("an old Loki cursor does not resume");
        };
        assert!(upgraded);
        assert_eq!(cursor, Cursor::decode(old).unwrap());
        let text = encode_cursor::<LokiBackend>(Some(&cursor));
        assert_eq!(
            text,
            r#"v1:loki:{"id":"ab4aefd4","start":1000000000,"end":1795361677,"count":3}"#
        );
        assert!(matches!(
            decode_cursor::<LokiBackend>(Some(r#"loki:{"start":"#)),
            Decoded::Restart(_)
        ));
    }

    #[test]
    fn cursors_round_trip_and_hold_no_query() {
        let c = waiting(Some("ab4aefd4"), DELETE_START, 1_795_361_677, 42);
        let text = c.encode();
        assert_eq!(
            text,
            r#"loki:{"id":"ab4aefd4","start":1000000000,"end":1795361677,"count":42}"#
        );
        assert_eq!(Cursor::decode(&text).unwrap(), c);
        assert_eq!(
            c.batch, None,
            "a cursor of one subject has no batch position"
        );
        // A batch's chunk: member ids and counts, still no query.
        let mut chunk = c.clone();
        chunk.batch = Some(BatchPosition {
            after: Some("hmac-sha256:0a".into()),
            upto: Some("hmac-sha256:0f".into()),
            counts: [("hmac-sha256:0c".to_string(), 4)].into(),
        });
        let text = chunk.encode();
        assert!(
            text.ends_with(
                r#""batch":{"a":"hmac-sha256:0a","u":"hmac-sha256:0f","c":{"hmac-sha256:0c":4}}}"#
            ),
            "{text}"
        );
        assert_eq!(Cursor::decode(&text).unwrap(), chunk);
        assert!(Cursor::decode("s3:{}").is_err());
        assert!(Cursor::decode("loki:{").is_err());
    }
}
