//! Grafana Loki through its HTTP API.
//!
//! Loki deletes by itself: the operator submits a delete request (`POST /loki/api/v1/delete`
//! with a LogQL `query` and `start`/`end` in unix seconds), Loki answers 204 without an id,
//! lists the request as `received` during its cancel period and as `processed` once its
//! compactor has run it. The backend finds its request by listing and matching query, start
//! and end, keeps the request id and times (never the query, which may hold an identifier)
//! in the cursor, and polls until `processed`.
//!
//! What a real Loki does that shapes this module:
//! - **`processed` is not "gone".** The compactor only deletes from chunks already flushed
//!   and indexed in the store it works on; lines still served by the ingesters (pushed in the
//!   last hours, whatever their timestamp) survive a processed request. So an erasure checks
//!   with a log query after `processed`, and while lines remain it submits again after
//!   [`LokiConfig::resubmit_after`]; a sweep counts what is left after processing and
//!   reports only what went.
//! - **Long queries are expensive.** The query frontend splits every query into
//!   `split_queries_by_interval` pieces (30 min by default): a metric count over 400 days is
//!   ~19,000 sub-queries. So:
//!   - the range searched for a subject starts where the store's own record says older lines
//!     are gone: the processed delete requests of the target's sweeps (the selector alone,
//!     chained from 2001 without a gap), or of this subject's own erasures (the same query),
//!     cover everything up to their last `end`; lines older
//!     than that, less [`LATE_LINES_SECONDS`] for lines pushed late or still in ingesters
//!     when the request ran, cannot be there. With the policy's sweeps running, that is the
//!     policy's retention plus at most one sweep period plus the margin. Without such a
//!     record the search goes back [`LOOKBACK_SECONDS`]; nothing is skipped on a guess;
//!   - Verify (and the erasure's own check) use log queries with `limit=1`, newest window
//!     first, and stop at the first line found; Find and the counts use
//!     `sum(count_over_time(…))` one 30-day window at a time (Loki's `max_query_length` is
//!     721h);
//!   - every scan runs within the step's time budget and resumes from its cursor;
//!   - a count that found nothing in a window is the store's evidence that the window is
//!     empty: the check after processing starts at the oldest window that had lines.
//! - **Sweeps don't redo the past.** A sweep's request starts at the end of the chain of
//!   processed requests its own query already has (less the late-lines margin), not in 2001.
//! - **Requests can vanish** (cancelled by someone, lost): a request no longer listed is
//!   submitted again, at most [`MAX_LOST`] times (counted in the cursor), then the target
//!   fails with reason `DeleteRequestLost`.
//!
//! Here: the DataStore's settings, the [`Backend`] entry points and target validation. The
//! other files: `transport` (HTTP, error answers, the deletion-mode check), `requests` (the
//! delete-request API and the store's record of processed requests), `scan` (counting and
//! finding lines with the query API, window by window), `cursor` (where a job stands),
//! `sweep` and `erasure`, and `batch` (many subjects in one pass: a chunk of members under one
//! line filter, counted per member, deleted by one request); `logql` builds the queries.

mod batch;
pub mod cursor;
pub mod driver;
mod erasure;
pub mod logql;
mod requests;
mod scan;
mod sweep;
mod transport;

use std::time::Duration;

use async_trait::async_trait;

use super::driver::StoreBackend;
use super::http::{self, HttpAuth, HttpStore};
use super::template;
use super::{
    BatchJob, BatchStep, Cancel, Error, Limits, Step, StepBudget, SubjectJob, SubjectStep, SweepJob,
};
use crate::api::retentionpolicy::Target;
use crate::api::StoreKind;
pub use cursor::Cursor;
use transport::DELETION_DISABLED;

/// The start of every first delete request: Loki wants 10-digit unix seconds (so not 0);
/// nothing in a log store predates 2001-09-09.
pub const DELETE_START: i64 = 1_000_000_000;
/// How far back a search goes when the store has no record of older lines being gone.
pub const LOOKBACK_SECONDS: i64 = 400 * 86_400;
/// One query's range: 30 days, under Loki's default `max_query_length` (721h).
pub const WINDOW_SECONDS: i64 = 30 * 86_400;
/// Lines older than a processed request's end may still arrive or survive it: pushed late
/// (Loki accepts lines up to `reject_old_samples_max_age`, one week by default) or still in
/// the ingesters when the request ran. Searches and sweeps reach back this far past the
/// store's record.
pub const LATE_LINES_SECONDS: i64 = 7 * 86_400;
/// Loki refuses deletes whose end is in the future: a little slack for clock skew.
const CLOCK_SLACK_SECONDS: i64 = 2;
/// How often a request that Loki no longer lists is submitted again before giving up.
pub const MAX_LOST: u32 = 3;
/// How long after a processed request an erasure that still finds lines submits again, by
/// default: the ingesters' `max_chunk_age` (2h), by when they have flushed the lines.
pub const DEFAULT_RESUBMIT_AFTER: Duration = Duration::from_secs(2 * 3600);

/// How to reach one Loki, resolved from a DataStore and its Secret.
#[derive(Clone, Debug, PartialEq)]
pub struct LokiConfig {
    /// Base URL, e.g. `http://host:3100`.
    pub url: String,
    /// Sent as `X-Scope-OrgID` on every request (multi-tenant Loki).
    pub tenant: Option<String>,
    pub auth: HttpAuth,
    /// How long an erasure waits, after a processed request left lines in place (still in
    /// the ingesters), before it submits again.
    pub resubmit_after: Duration,
}

pub struct LokiBackend {
    config: LokiConfig,
    http: HttpStore,
}

impl LokiBackend {
    pub fn new(config: LokiConfig, limits: Limits) -> Self {
        Self {
            http: HttpStore::new(config.auth.clone(), limits),
            config,
        }
    }
}

/// The target's stream selector, checked.
fn selector(target: &Target) -> Result<logql::Selector, Error> {
    let loki =
        <driver::LokiDriver as super::driver::StoreDriver>::selector(target).ok_or_else(|| {
            Error::InvalidSpec(format!(
                "target {}: needs a loki selector for a loki store",
                target.name
            ))
        })?;
    let selector = logql::parse_selector(&loki.selector).map_err(|e| {
        Error::InvalidSpec(format!(
            "target {}: loki.selector is not a LogQL stream selector: {e}",
            target.name
        ))
    })?;
    if selector.matchers.is_empty() {
        return Err(Error::InvalidSpec(format!(
            "target {}: loki.selector {{}} selects every stream and is never allowed",
            target.name
        )));
    }
    if !selector.is_selective() && !target.allow_match_all {
        return Err(Error::InvalidSpec(format!(
            "target {}: loki.selector {} names no streams (it needs a label=\"value\" or label=~\"a|b\" matcher) and would select nearly every stream; set allowMatchAll: true if that is really meant",
            target.name, loki.selector
        )));
    }
    Ok(selector)
}

#[async_trait]
impl StoreBackend for LokiBackend {
    const KIND: StoreKind = StoreKind::Loki;
    type Cursor = Cursor;

    fn legacy_cursor(text: &str) -> Option<Cursor> {
        Cursor::legacy(text)
    }

    fn describe_wait(cursor: &Cursor) -> Option<String> {
        cursor::describe_wait(cursor)
    }

    /// Cancels a delete request still in its cancel period (`received`).
    async fn cancel_deletion(&self, cursor: Cursor) -> Result<Cancel, Error> {
        let Some(id) = cursor.id else {
            return Ok(Cancel::Nothing);
        };
        let what = "DELETE /loki/api/v1/delete";
        let builder = self
            .request(reqwest::Method::DELETE, "/loki/api/v1/delete")
            .await?
            .query(&[("request_id", id.as_str())]);
        let (status, _) = self.http.exchange(what, builder).await?;
        match status.as_u16() {
            // Loki deletes nothing before a request is processed.
            200..=299 => Ok(Cancel::Cancelled { deleted: 0 }),
            // Unknown, or already processed: past the point where Loki can cancel it.
            400 | 404 => Ok(Cancel::TooLate),
            _ => Err(http::status_error(what, status, "")),
        }
    }

    async fn probe_store(&self) -> Result<String, Error> {
        let builder = self
            .request(reqwest::Method::GET, "/loki/api/v1/status/buildinfo")
            .await?;
        let version = match self.send("GET buildinfo", builder, false).await {
            Ok(body) => serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| {
                    v.get("version")
                        .and_then(|v| v.as_str())
                        .map(str::to_string)
                })
                .unwrap_or_else(|| "(version unknown)".into()),
            // Older Lokis have no buildinfo; the delete API below is what matters.
            Err(Error::Store(_)) => "(version unknown)".into(),
            Err(e) => return Err(e),
        };
        // Proves credentials and tenant, and whether this tenant may delete: judged by the
        // answer's status (and Loki's own message for a refusal), never by an error's text.
        let what = "GET /loki/api/v1/delete";
        let listing = self
            .request(reqwest::Method::GET, "/loki/api/v1/delete")
            .await?;
        let (status, body) = self.http.exchange(what, listing).await?;
        let note = match status.as_u16() {
            200..=299 => String::new(),
            403 if body.contains(DELETION_DISABLED) => format!("; {DELETION_DISABLED}"),
            404 => "; no delete API at this URL (it must reach the compactor)".into(),
            // The listing holds other requests' queries: its text is not copied.
            _ => return Err(transport::error_for(what, status, &body, true)),
        };
        Ok(format!("loki {version}{note}"))
    }

    async fn sweep(
        &self,
        job: &SweepJob,
        cursor: Option<Cursor>,
        budget: &StepBudget,
    ) -> Result<Step<Cursor>, Error> {
        LokiBackend::sweep(self, job, cursor, budget).await
    }

    async fn subject(
        &self,
        job: &SubjectJob,
        cursor: Option<Cursor>,
        budget: &StepBudget,
    ) -> Result<SubjectStep<Cursor>, Error> {
        LokiBackend::subject(self, job, cursor, budget).await
    }

    const BATCHES: bool = true;

    async fn subjects(
        &self,
        job: &BatchJob,
        cursor: Option<Cursor>,
        budget: &StepBudget,
    ) -> Result<BatchStep<Cursor>, Error> {
        LokiBackend::subjects(self, job, cursor, budget).await
    }
}

/// Checks a loki target before anything runs (invariant 1: never outside the selector).
pub fn validate_target(target: &Target) -> Result<(), Error> {
    selector(target)?;
    let Some(subject) = target.subject.as_ref().and_then(|s| s.loki()) else {
        return Ok(());
    };
    match template::check_bounded(&subject.line_filter, template::Syntax::FreeText) {
        Err(m) => Err(Error::InvalidSpec(format!(
            "target {}: subject.loki.lineFilter {:?} {m}",
            target.name, subject.line_filter
        ))),
        Ok(names) if names.is_empty() => Err(Error::InvalidSpec(format!(
            "target {}: subject.loki.lineFilter names no identifier ({{email}}, {{userId}}, …): it would match the same lines for every subject",
            target.name
        ))),
        Ok(_) => Ok(()),
    }
}

/// Delete requests and cursors the tests are built from.
#[cfg(test)]
mod fixtures {
    use super::cursor::{Cursor, Stage};
    use super::requests::DeleteRequest;

    pub(super) fn request(
        id: &str,
        query: &str,
        start: i64,
        end: i64,
        status: &str,
        at: f64,
    ) -> DeleteRequest {
        DeleteRequest {
            request_id: id.into(),
            start_time: start,
            end_time: end,
            query: query.into(),
            status: status.into(),
            created_at: at,
        }
    }

    pub(super) fn waiting(id: Option<&str>, start: i64, end: i64, count: u64) -> Cursor {
        Cursor {
            id: id.map(str::to_string),
            stage: Stage::Waiting,
            from: None,
            at: None,
            count,
            ..Cursor::counting(start, end, start)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(selector: &str, filter: Option<&str>, all: bool) -> Target {
        let mut t =
            serde_json::json!({"name": "logs", "store": "loki", "loki": {"selector": selector}});
        if let Some(f) = filter {
            t["subject"] = serde_json::json!({"loki": {"lineFilter": f}});
        }
        if all {
            t["allowMatchAll"] = true.into();
        }
        serde_json::from_value(t).unwrap()
    }

    #[test]
    fn targets_are_validated() {
        assert!(validate_target(&target(r#"{app="mailer"}"#, Some("{email}"), false)).is_ok());
        assert!(
            validate_target(&target(r#"{app="mailer"}"#, Some("user={userId} "), false)).is_ok()
        );
        for (sel, filter, all) in [
            ("{}", None, true),
            (r#"{app=~".+"}"#, None, false),
            (r#"{app="mailer"} |= "x""#, None, false),
            (r#"{app="mailer""#, None, false),
            (r#"{app="mailer"}"#, Some("bob"), false),
            (r#"{app="mailer"}"#, Some("{email"), false),
        ] {
            let e = validate_target(&target(sel, filter, all)).unwrap_err();
            assert_eq!(e.reason(), "InvalidSpec", "{sel} {filter:?}");
        }
        assert!(validate_target(&target(r#"{app=~".+"}"#, None, true)).is_ok());
    }

    #[test]
    fn selectors_must_name_streams_whatever_their_spelling() {
        for sel in [
            r#"{app="mailer"}"#,
            r#"{app=~"mailer|billing"}"#,
            r#"{app="mailer", env!="dev"}"#,
            r#"{app=~".+", namespace="shop"}"#,
        ] {
            assert!(validate_target(&target(sel, None, false)).is_ok(), "{sel}");
        }
        for sel in [
            r#"{app=~".*"}"#,
            r#"{app=~".+"}"#,
            r#"{app!=""}"#,
            r#"{app!~"x"}"#,
            r#"{app=""}"#,
            r#"{app=~"m.*"}"#,
            r#"{app=~"mailer|.*"}"#,
            r#"{app=~".+", env!="dev"}"#,
        ] {
            let e = validate_target(&target(sel, None, false)).unwrap_err();
            assert!(e.to_string().contains("allowMatchAll"), "{sel}: {e}");
        }
    }

    #[test]
    fn a_bare_line_filter_is_refused_unless_the_identifier_delimits_itself() {
        let sel = r#"{app="mailer"}"#;
        for ok in [
            "{email}",
            "uid={userId} ",
            "\"to\":\"{email}\"",
            "\"user\":\"{userId}\"",
        ] {
            assert!(
                validate_target(&target(sel, Some(ok), false)).is_ok(),
                "{ok}"
            );
        }
        for bad in [
            "{userId}",
            " {userId} ",
            "={userId} ",
            "uid={userId}",
            "{userId} logged in",
        ] {
            let e = validate_target(&target(sel, Some(bad), false)).unwrap_err();
            assert_eq!(e.reason(), "InvalidSpec");
            let m = e.to_string();
            assert!(
                m.contains("lineFilter") && m.contains("{userId}"),
                "{bad}: {m}"
            );
        }
        let m = validate_target(&target(sel, Some("{userId}"), false))
            .unwrap_err()
            .to_string();
        assert!(m.contains("uid={userId} ") && m.contains("email"), "{m}");
    }
}
