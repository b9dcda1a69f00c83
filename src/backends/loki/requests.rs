//! Loki's delete-request API (`/loki/api/v1/delete`): listing, submitting a request or
//! reusing a pending one, polling it (and submitting again one Loki lost); and the store's
//! own record of processed requests, which bounds what later searches and sweeps cover.

use std::time::Duration;

use chrono::Utc;

use super::cursor::{Cursor, Stage};
use super::{
    LokiBackend, CLOCK_SLACK_SECONDS, DELETE_START, LATE_LINES_SECONDS, LOOKBACK_SECONDS, MAX_LOST,
};
use crate::backends::{Error, StepBudget, SubjectAction};

/// One entry of `GET /loki/api/v1/delete`.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct DeleteRequest {
    pub request_id: String,
    pub start_time: i64,
    pub end_time: i64,
    pub query: String,
    /// `received`, `processed`, or `N% Complete` for a request Loki split in shards.
    pub status: String,
    pub created_at: f64,
}

impl DeleteRequest {
    fn processed(&self) -> bool {
        self.status == "processed"
    }
}

/// How a pending request must match to be reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Reuse {
    /// The same query over exactly the same range (sweeps: the range is fixed by the cutoff
    /// and the store's record).
    Exact,
    /// The same query from the same start (erasures: they cover everything up to the moment
    /// they are submitted, so only their end differs; what is newer is checked afterwards).
    SameStart,
}

/// What to do before submitting a delete request.
#[derive(Debug, PartialEq)]
enum Plan {
    /// A pending request is what we would submit: wait for it.
    Reuse(String),
    /// A processed request covers the range and nothing matching is left.
    AlreadyDone,
    Submit,
}

/// Decides whether a new delete request for `query` over [start, end] is needed;
/// `remaining`: lines counted in the range.
fn plan_submission(
    requests: &[DeleteRequest],
    query: &str,
    start: i64,
    end: i64,
    remaining: u64,
    reuse: Reuse,
) -> Plan {
    let same = requests.iter().filter(|r| r.query == query);
    if let Some(pending) = same
        .clone()
        .filter(|r| !r.processed())
        .filter(|r| match reuse {
            Reuse::Exact => r.start_time == start && r.end_time == end,
            Reuse::SameStart => r.start_time == start && r.end_time <= end,
        })
        .max_by(|a, b| a.created_at.total_cmp(&b.created_at))
    {
        return Plan::Reuse(pending.request_id.clone());
    }
    let covering = |r: &&DeleteRequest| r.start_time <= start && r.end_time >= end;
    if remaining == 0 && same.clone().filter(covering).any(DeleteRequest::processed) {
        return Plan::AlreadyDone;
    }
    Plan::Submit
}

/// How far the processed requests for `query` cover time without a gap from
/// [`DELETE_START`]: the store's own record that matching lines older than this are gone
/// (but for late lines). None without such a chain. A sweep's record.
pub(super) fn covered_until(requests: &[DeleteRequest], query: &str) -> Option<i64> {
    chained(requests, |q| q == query, |_, _| false)
}

/// How far the store's record covers the lines of `query`, a query under `selector` (a
/// subject's, or a sweep's with held subjects' filters), as far back as any search looks:
/// the processed requests of the selector (they took every line of it) and of the query
/// itself, without a gap from [`DELETE_START`] or from a request that reached
/// [`LOOKBACK_SECONDS`] back from the moment it was submitted (its end, less the clock
/// slack): no later search starts further back than that. Requests with a line filter cover
/// the range their count searched, not all time from 2001: a real Loki (3.x) splits such a
/// request into one per day (`delete_max_interval`) and processes 70 of them a compaction
/// (`delete_batch_size`), oldest first; one from 2001 was some 9,000.
pub(super) fn searched_until(
    requests: &[DeleteRequest],
    selector: &str,
    query: &str,
) -> Option<i64> {
    chained(
        requests,
        |q| q == selector || q == query,
        |start, end| {
            start.saturating_add(LOOKBACK_SECONDS) <= end.saturating_add(CLOCK_SLACK_SECONDS)
        },
    )
}

fn chained(
    requests: &[DeleteRequest],
    of: impl Fn(&str) -> bool,
    starts_chain: impl Fn(i64, i64) -> bool,
) -> Option<i64> {
    let mut done: Vec<(i64, i64)> = requests
        .iter()
        .filter(|r| of(&r.query) && r.processed())
        .map(|r| (r.start_time, r.end_time))
        .collect();
    done.sort_unstable();
    let mut covered: Option<i64> = None;
    // In order of start: a request extends the chain if it starts within it; past a gap,
    // only a request that starts a chain of its own can (none later joins the old one).
    for (start, end) in done {
        if start <= covered.unwrap_or(DELETE_START) || starts_chain(start, end) {
            covered = Some(covered.map_or(end, |c| c.max(end)));
        }
    }
    covered
}

/// Where a search for lines matching under `selector` may start at `now`: past the store's
/// record (less the late-lines margin), never further back than [`LOOKBACK_SECONDS`].
pub(super) fn search_from(covered: Option<i64>, now: i64) -> i64 {
    let floor = now.saturating_sub(LOOKBACK_SECONDS).max(DELETE_START);
    covered
        .map(|c| c.saturating_sub(LATE_LINES_SECONDS))
        .map_or(floor, |c| c.max(floor))
        .min(now)
}

/// Where a subject's job (one subject, or a batch's chunk of subjects) starts at `now`: a
/// count from where the store's record of `selector` and `query` lets the search start
/// ([`searched_until`], [`search_from`]) to a little past now. An erasure's request covers
/// that same range, up to a little before now (Loki refuses deletes in the future): what is
/// older is no search's.
pub(super) fn subject_cursor(
    requests: &[DeleteRequest],
    selector: &str,
    query: &str,
    action: SubjectAction,
    now: i64,
) -> Cursor {
    let from = search_from(searched_until(requests, selector, query), now);
    let search_end = now.saturating_add(CLOCK_SLACK_SECONDS);
    let delete_end = now.saturating_sub(CLOCK_SLACK_SECONDS);
    let mut c = match action {
        SubjectAction::Erase => Cursor::counting(from.min(delete_end), delete_end, from),
        SubjectAction::Find | SubjectAction::Verify => Cursor::counting(from, search_end, from),
    };
    c.at = Some(search_end);
    c
}

/// Where a sweep's request starts: at the end of its own chain of processed requests (less
/// the late-lines margin), or in 2001.
pub(super) fn sweep_start(covered: Option<i64>) -> i64 {
    covered
        .map(|c| c.saturating_sub(LATE_LINES_SECONDS))
        .unwrap_or(DELETE_START)
        .max(DELETE_START)
}

/// The request a cursor stands for: by id, or (the id not yet known) by query and range.
fn find_request<'a>(
    requests: &'a [DeleteRequest],
    cursor: &Cursor,
    query: &str,
) -> Option<&'a DeleteRequest> {
    match &cursor.id {
        Some(id) => requests.iter().find(|r| &r.request_id == id),
        None => requests
            .iter()
            .filter(|r| {
                r.query == query && r.start_time == cursor.start && r.end_time == cursor.end
            })
            .max_by(|a, b| a.created_at.total_cmp(&b.created_at)),
    }
}

/// How long to wait before polling a request of this age: soon at first, then less often
/// (Loki's cancel period defaults to 24h).
pub(super) fn poll_after(age_seconds: f64) -> Duration {
    Duration::from_secs_f64((age_seconds / 4.0).clamp(1.0, 300.0))
}

/// Parses `GET /loki/api/v1/delete`. Times may be numbers or strings, seconds with a fraction.
fn parse_delete_list(body: &str) -> Result<Vec<DeleteRequest>, Error> {
    let bad = || Error::Store("GET /loki/api/v1/delete: unexpected answer (not a list)".into());
    let value: serde_json::Value = serde_json::from_str(body).map_err(|_| bad())?;
    let items = match value {
        serde_json::Value::Null => return Ok(Vec::new()),
        serde_json::Value::Array(items) => items,
        _ => return Err(bad()),
    };
    let number = |v: Option<&serde_json::Value>| -> Option<f64> {
        match v? {
            serde_json::Value::Number(n) => n.as_f64(),
            serde_json::Value::String(s) => s.parse().ok(),
            _ => None,
        }
    };
    items
        .iter()
        .map(|item| {
            let text = |k: &str| item.get(k).and_then(|v| v.as_str()).map(str::to_string);
            let parsed = || {
                Some(DeleteRequest {
                    request_id: text("request_id")?,
                    start_time: number(item.get("start_time"))?.floor() as i64,
                    end_time: number(item.get("end_time"))?.floor() as i64,
                    query: text("query")?,
                    status: text("status").unwrap_or_default(),
                    created_at: number(item.get("created_at")).unwrap_or(0.0),
                })
            };
            parsed().ok_or_else(bad)
        })
        .collect()
}

/// The answer of polling a cursor's request.
pub(super) enum Polled {
    Pending(Duration),
    Processed,
}

impl LokiBackend {
    pub(super) async fn list_deletes(&self) -> Result<Vec<DeleteRequest>, Error> {
        let builder = self
            .request(reqwest::Method::GET, "/loki/api/v1/delete")
            .await?;
        // Never personal in the request, but the listing holds other requests' queries.
        let body = self.send("GET /loki/api/v1/delete", builder, true).await?;
        parse_delete_list(&body)
    }

    async fn submit(&self, query: &str, start: i64, end: i64, personal: bool) -> Result<(), Error> {
        let builder = self
            .request(reqwest::Method::POST, "/loki/api/v1/delete")
            .await?
            .query(&[
                ("query", query),
                ("start", &start.to_string()),
                ("end", &end.to_string()),
            ]);
        self.send("POST /loki/api/v1/delete", builder, personal)
            .await
            .map(|_| ())
    }

    /// Submits the cursor's request over [start, end] (or reuses a pending one, as `reuse`
    /// allows). True when nothing needs to be waited for (a processed request covers the
    /// range and nothing was counted in it).
    pub(super) async fn submit_or_reuse(
        &self,
        cursor: &mut Cursor,
        query: &str,
        reuse: Reuse,
        personal: bool,
        budget: &StepBudget,
    ) -> Result<bool, Error> {
        let requests = self.list_deletes().await?;
        cursor.id = None;
        match plan_submission(
            &requests,
            query,
            cursor.start,
            cursor.end,
            cursor.count,
            reuse,
        ) {
            Plan::AlreadyDone => return Ok(true),
            Plan::Reuse(id) => {
                if let Some(r) = requests.iter().find(|r| r.request_id == id) {
                    cursor.end = r.end_time;
                }
                cursor.id = Some(id);
            }
            Plan::Submit => {
                budget.may_act()?;
                self.submit(query, cursor.start, cursor.end, personal)
                    .await?;
                let requests = self.list_deletes().await?;
                cursor.id = find_request(&requests, cursor, query).map(|r| r.request_id.clone());
            }
        }
        cursor.stage = Stage::Waiting;
        Ok(false)
    }

    /// Polls the cursor's request. One that Loki no longer lists (cancelled by someone,
    /// lost) is submitted again, up to [`MAX_LOST`] times, over [start, `end`].
    pub(super) async fn poll(
        &self,
        cursor: &mut Cursor,
        query: &str,
        end: i64,
        personal: bool,
        budget: &StepBudget,
    ) -> Result<Polled, Error> {
        let requests = self.list_deletes().await?;
        match find_request(&requests, cursor, query) {
            Some(r) if r.processed() => Ok(Polled::Processed),
            Some(r) => {
                let age = Utc::now().timestamp_millis() as f64 / 1000.0 - r.created_at;
                cursor.id = Some(r.request_id.clone());
                Ok(Polled::Pending(poll_after(age)))
            }
            None if cursor.lost >= MAX_LOST => Err(Error::DeleteRequestLost(format!(
                "Loki no longer lists the delete request{} (cancelled by someone, or lost), after submitting it {} times; check the compactor's delete-request store",
                cursor.id.as_deref().map(|id| format!(" {id}")).unwrap_or_default(),
                MAX_LOST + 1
            ))),
            None => {
                cursor.lost += 1;
                cursor.end = end;
                budget.may_act()?;
                self.submit(query, cursor.start, cursor.end, personal)
                    .await?;
                let requests = self.list_deletes().await?;
                // Found by query and range: the lost id must not match.
                cursor.id = None;
                cursor.id = find_request(&requests, cursor, query).map(|r| r.request_id.clone());
                Ok(Polled::Pending(poll_after(0.0)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backends::loki::fixtures::{request, waiting};
    use crate::backends::loki::scan::parse_vector_sum;

    #[test]
    fn submissions_reuse_only_the_request_the_spec_would_submit() {
        let q = r#"{app="mailer"}"#;
        let list = vec![
            request("old", q, DELETE_START, 100, "processed", 1.0),
            request("other", r#"{app="x"}"#, DELETE_START, 500, "received", 2.0),
        ];
        let exact = Reuse::Exact;
        assert_eq!(
            plan_submission(&list, q, DELETE_START, 200, 5, exact),
            Plan::Submit
        );
        let mut list2 = list.clone();
        list2.push(request("p1", q, DELETE_START, 200, "received", 3.0));
        list2.push(request("p2", q, DELETE_START, 200, "50% Complete", 4.0));
        assert_eq!(
            plan_submission(&list2, q, DELETE_START, 200, 5, exact),
            Plan::Reuse("p2".into())
        );
        // A pending request over another range is not what this sweep would submit: not
        // one that stops short, and not one that reaches further (a shorter retention's).
        assert_eq!(
            plan_submission(&list2, q, DELETE_START, 201, 5, exact),
            Plan::Submit
        );
        assert_eq!(
            plan_submission(&list2, q, DELETE_START, 199, 5, exact),
            Plan::Submit
        );
        assert_eq!(plan_submission(&list2, q, 150, 200, 5, exact), Plan::Submit);
        // An erasure reuses its own earlier request from the same start (only its end,
        // the moment it was submitted, differs), never a later one or another start.
        assert_eq!(
            plan_submission(&list2, q, DELETE_START, 300, 5, Reuse::SameStart),
            Plan::Reuse("p2".into())
        );
        assert_eq!(
            plan_submission(&list2, q, DELETE_START, 150, 5, Reuse::SameStart),
            Plan::Submit
        );
        let done = vec![request("d", q, DELETE_START, 300, "processed", 1.0)];
        assert_eq!(
            plan_submission(&done, q, DELETE_START, 200, 0, exact),
            Plan::AlreadyDone
        );
        // Lines still there (written late): a new request.
        assert_eq!(
            plan_submission(&done, q, DELETE_START, 200, 3, exact),
            Plan::Submit
        );
    }

    #[test]
    fn the_store_record_of_processed_requests_bounds_searches_and_sweeps() {
        let q = r#"{app="mailer"}"#;
        let day = 86_400;
        let t0 = DELETE_START + 1000 * day;
        let list = vec![
            request("a", q, DELETE_START, t0, "processed", 1.0),
            request("b", q, t0 - 7 * day, t0 + 10 * day, "processed", 2.0),
            // Pending: no evidence yet.
            request("c", q, t0 + 10 * day, t0 + 20 * day, "received", 3.0),
            // Another query (an erasure's, a held sweep's): not the selector's record.
            request(
                "d",
                &format!("{q} |~ \"x\""),
                DELETE_START,
                t0 + 30 * day,
                "processed",
                4.0,
            ),
        ];
        assert_eq!(covered_until(&list, q), Some(t0 + 10 * day));
        // A gap: nothing is known past it.
        let gap = vec![
            request("a", q, DELETE_START, t0, "processed", 1.0),
            request("b", q, t0 + 1, t0 + 10 * day, "processed", 2.0),
        ];
        assert_eq!(covered_until(&gap, q), Some(t0));
        // No chain from the start: no record at all.
        assert_eq!(covered_until(&list[1..], q), None);
        assert_eq!(covered_until(&[], q), None);

        // A subject's own erasures cover what they searched: a request over the whole
        // look-back before its submission starts a chain (no later search starts earlier),
        // one over less does not; a chain restarts past a gap only that way.
        let e = t0 + 500 * day;
        let searched = e + CLOCK_SLACK_SECONDS - LOOKBACK_SECONDS;
        let erasures = vec![
            request("short", q, e - 3 * day, e - 2 * day, "processed", 1.0),
            request("whole", q, searched, e, "processed", 2.0),
            request(
                "next",
                q,
                e - LATE_LINES_SECONDS,
                e + 5 * day,
                "processed",
                3.0,
            ),
        ];
        assert_eq!(searched_until(&erasures, "{}", q), Some(e + 5 * day));
        assert_eq!(searched_until(&erasures[..1], "{}", q), None);
        let narrower = vec![request("w", q, searched + 1, e, "processed", 1.0)];
        assert_eq!(searched_until(&narrower, "{}", q), None);
        assert_eq!(
            covered_until(&erasures, q),
            None,
            "a sweep's record still chains from 2001 only"
        );
        let restarted = vec![
            request("old", q, DELETE_START, t0, "processed", 1.0),
            request("whole", q, searched, e, "processed", 2.0),
        ];
        assert_eq!(searched_until(&restarted, "{}", q), Some(e));
        assert_eq!(covered_until(&restarted, q), Some(t0));
        // The selector's sweeps took every line of it, the subject's too: their record and
        // the subject's erasure from where it reached chain together.
        let subject = format!("{q} |~ \"x\"");
        let mixed = vec![
            request("sweep", q, DELETE_START, t0, "processed", 1.0),
            request(
                "erasure",
                &subject,
                t0 - LATE_LINES_SECONDS,
                e,
                "processed",
                2.0,
            ),
        ];
        assert_eq!(searched_until(&mixed, q, &subject), Some(e));
        assert_eq!(covered_until(&mixed, &subject), None);
        assert_eq!(covered_until(&mixed, q), Some(t0));

        let now = t0 + 40 * day;
        assert_eq!(
            search_from(Some(t0 + 10 * day), now),
            t0 + 10 * day - LATE_LINES_SECONDS
        );
        assert_eq!(search_from(None, now), now - LOOKBACK_SECONDS);
        assert_eq!(search_from(Some(DELETE_START), now), now - LOOKBACK_SECONDS);
        assert_eq!(
            search_from(Some(now + day), now),
            now + day - LATE_LINES_SECONDS
        );
        assert_eq!(search_from(Some(now + 9 * day), now), now);
        assert_eq!(search_from(None, DELETE_START + 5), DELETE_START);
        assert_eq!(sweep_start(None), DELETE_START);
        assert_eq!(sweep_start(Some(t0)), t0 - LATE_LINES_SECONDS);
        assert_eq!(sweep_start(Some(DELETE_START + 5)), DELETE_START);
    }

    #[test]
    fn requests_are_found_by_id_or_by_query_and_range() {
        let q = "{a=\"b\"}";
        let list = vec![
            request("r1", q, 10, 20, "received", 1.0),
            request("r2", q, 10, 20, "received", 2.0),
            request("r3", q, 10, 30, "received", 3.0),
        ];
        let mut c = waiting(None, 10, 20, 0);
        assert_eq!(find_request(&list, &c, q).unwrap().request_id, "r2");
        c.id = Some("r1".into());
        assert_eq!(find_request(&list, &c, q).unwrap().request_id, "r1");
        c.id = Some("gone".into());
        assert!(find_request(&list, &c, q).is_none());
    }

    #[test]
    fn listings_and_vectors_parse() {
        let body = r#"[{"request_id":"ab4aefd4","start_time":1795361077,"end_time":"1795361677.5","query":"{app=\"mailer\"} |= \"bob\"","status":"received","created_at":1795361677.652}]"#;
        let list = parse_delete_list(body).unwrap();
        assert_eq!(list[0].end_time, 1_795_361_677);
        assert_eq!(list[0].query, r#"{app="mailer"} |= "bob""#);
        assert!(parse_delete_list("null").unwrap().is_empty());
        assert!(parse_delete_list("{}").is_err());
        let v = r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1.5,"12"]}]}}"#;
        assert_eq!(parse_vector_sum(v).unwrap(), 12);
        let empty = r#"{"status":"success","data":{"resultType":"vector","result":[]}}"#;
        assert_eq!(parse_vector_sum(empty).unwrap(), 0);
    }
}
