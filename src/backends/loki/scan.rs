//! Counting and finding a query's lines with Loki's query API, one window (at most
//! [`WINDOW_SECONDS`]) at a time, within the step's time and resumable from the cursor.

use std::time::Instant;

use super::cursor::Cursor;
use super::{logql, LokiBackend, WINDOW_SECONDS};
use crate::backends::Error;

/// The total of a `sum(…)` instant query: no series means nothing matched.
pub(super) fn parse_vector_sum(body: &str) -> Result<u64, Error> {
    let bad = || Error::Store("GET /loki/api/v1/query: unexpected answer".into());
    let value: serde_json::Value = serde_json::from_str(body).map_err(|_| bad())?;
    let result = value
        .pointer("/data/result")
        .and_then(|r| r.as_array())
        .ok_or_else(bad)?;
    let mut total = 0u64;
    for sample in result {
        let n: f64 = sample
            .pointer("/value/1")
            .and_then(|v| v.as_str())
            .and_then(|s| s.parse().ok())
            .ok_or_else(bad)?;
        total += n.max(0.0).round() as u64;
    }
    Ok(total)
}

/// Whether a `query_range` answer holds any line.
fn parse_has_lines(body: &str) -> Result<bool, Error> {
    let bad = || Error::Store("GET /loki/api/v1/query_range: unexpected answer".into());
    let value: serde_json::Value = serde_json::from_str(body).map_err(|_| bad())?;
    let result = value
        .pointer("/data/result")
        .and_then(|r| r.as_array())
        .ok_or_else(bad)?;
    Ok(result.iter().any(|stream| {
        stream
            .get("values")
            .and_then(|v| v.as_array())
            .is_some_and(|v| !v.is_empty())
    }))
}

/// The answer of a search for one line.
pub(super) enum Scan {
    /// A line (the newest there is, from where the scan stood).
    Found,
    Empty,
    /// The step's time is up; the cursor says where to resume.
    Paused,
}

impl LokiBackend {
    /// `sum(count_over_time(…))` over (at - range, at]: one query, `range` at most a window.
    pub(super) async fn count_window(
        &self,
        log_query: &str,
        at: i64,
        range: i64,
        personal: bool,
    ) -> Result<u64, Error> {
        let query = logql::count_query(log_query, range);
        let builder = self
            .request(reqwest::Method::GET, "/loki/api/v1/query")
            .await?
            .query(&[("query", query.as_str()), ("time", &at.to_string())]);
        let body = self
            .send("GET /loki/api/v1/query", builder, personal)
            .await?;
        parse_vector_sum(&body)
    }

    /// Counts the lines of `log_query` window by window from the cursor's `at` back to its
    /// `from`, into `left` (`checking`) or `count` (remembering the oldest window with
    /// lines). True once the range is done; false when the deadline came first (the cursor
    /// says where to resume). At least one window per call.
    pub(super) async fn count_scan(
        &self,
        log_query: &str,
        cursor: &mut Cursor,
        checking: bool,
        deadline: Instant,
        personal: bool,
    ) -> Result<bool, Error> {
        let from = cursor.scan_from();
        let mut at = cursor.at.unwrap_or(cursor.end);
        let mut first = true;
        while at > from {
            if !first && Instant::now() >= deadline {
                cursor.at = Some(at);
                return Ok(false);
            }
            first = false;
            let range = WINDOW_SECONDS.min(at.saturating_sub(from));
            let n = self.count_window(log_query, at, range, personal).await?;
            if checking {
                cursor.left = cursor.left.saturating_add(n);
            } else {
                cursor.count = cursor.count.saturating_add(n);
                if n > 0 {
                    cursor.oldest = Some(at.saturating_sub(range));
                }
            }
            at = at.saturating_sub(range);
        }
        cursor.at = Some(at);
        Ok(true)
    }

    /// Looks for one line of `log_query` from the cursor's `at` back to its `from`, newest
    /// window first, with log queries of `limit=1` (Loki stops at the first line found).
    pub(super) async fn find_scan(
        &self,
        log_query: &str,
        cursor: &mut Cursor,
        deadline: Instant,
    ) -> Result<Scan, Error> {
        let from = cursor.scan_from();
        let mut at = cursor.at.unwrap_or(cursor.end);
        let mut first = true;
        while at > from {
            if !first && Instant::now() >= deadline {
                cursor.at = Some(at);
                return Ok(Scan::Paused);
            }
            first = false;
            let range = WINDOW_SECONDS.min(at.saturating_sub(from));
            let builder = self
                .request(reqwest::Method::GET, "/loki/api/v1/query_range")
                .await?
                .query(&[
                    ("query", log_query),
                    ("start", &at.saturating_sub(range).to_string()),
                    // `end` is exclusive; the window is (at - range, at] as for counts.
                    ("end", &at.saturating_add(1).to_string()),
                    ("limit", "1"),
                    ("direction", "backward"),
                ]);
            let body = self
                .send("GET /loki/api/v1/query_range", builder, true)
                .await?;
            if parse_has_lines(&body)? {
                cursor.at = Some(at);
                return Ok(Scan::Found);
            }
            at = at.saturating_sub(range);
        }
        cursor.at = Some(at);
        Ok(Scan::Empty)
    }
}
