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

pub mod logql;

use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::Utc;
use serde::{Deserialize, Serialize};
use tokio::sync::OnceCell;

use super::http::{self, HttpAuth};
use super::identifier;
use super::template;
use super::{
    held_subject_locator, subject_locator, Backend, Cancel, Error, Limits, Next, Step, StepBudget,
    SubjectAction, SubjectJob, SubjectStep, SweepJob,
};
use crate::api::retentionpolicy::Target;
use crate::api::StoreKind;

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
/// How often a request that Loki no longer lists is submitted again before giving up.
pub const MAX_LOST: u32 = 3;
/// How long after a processed request an erasure that still finds lines submits again, by
/// default: the ingesters' `max_chunk_age` (2h), by when they have flushed the lines.
pub const DEFAULT_RESUBMIT_AFTER: Duration = Duration::from_secs(2 * 3600);
/// Loki refuses deletes whose end is in the future: a little slack for clock skew.
const CLOCK_SLACK_SECONDS: i64 = 2;
const CURSOR_PREFIX: &str = "loki:";
const DELETION_DISABLED: &str = "deletion is not available for this tenant";
/// The tenant of a single-tenant Loki (`auth_enabled: false`).
const SINGLE_TENANT: &str = "fake";
const FILTER_ONLY: &str = "filter-only";

/// `limits_config.deletion_mode` in the YAML of `GET /config` (the default of every tenant).
pub fn default_deletion_mode(config_yaml: &str) -> Option<String> {
    let value: serde_yaml::Value = serde_yaml::from_str(config_yaml).ok()?;
    value
        .get("limits_config")?
        .get("deletion_mode")?
        .as_str()
        .map(str::to_string)
}

/// The tenant's `deletion_mode` override in the YAML of `GET /runtime_config`.
pub fn runtime_deletion_mode(runtime_yaml: &str, tenant: &str) -> Option<String> {
    let value: serde_yaml::Value = serde_yaml::from_str(runtime_yaml).ok()?;
    value
        .get("overrides")?
        .get(tenant)?
        .get("deletion_mode")?
        .as_str()
        .map(str::to_string)
}

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
    limits: Limits,
    client: OnceCell<reqwest::Client>,
}

/// One entry of `GET /loki/api/v1/delete`.
#[derive(Clone, Debug, PartialEq)]
pub struct DeleteRequest {
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

/// Where a job stands in a Loki cursor.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
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
}

impl Cursor {
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

    fn scan_from(&self) -> i64 {
        self.from.unwrap_or(self.start)
    }
}

/// What a Loki cursor waits for, for the target's status message (no identifier: request
/// ids and times only). None for text that is not a Loki cursor.
pub fn describe_wait(text: &str) -> Option<String> {
    let cursor = Cursor::decode(text).ok()?;
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

/// How a pending request must match to be reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reuse {
    /// The same query over exactly the same range (sweeps: the range is fixed by the cutoff
    /// and the store's record).
    Exact,
    /// The same query from the same start (erasures: they cover everything up to the moment
    /// they are submitted, so only their end differs; what is newer is checked afterwards).
    SameStart,
}

/// What to do before submitting a delete request.
#[derive(Debug, PartialEq)]
pub enum Plan {
    /// A pending request is what we would submit: wait for it.
    Reuse(String),
    /// A processed request covers the range and nothing matching is left.
    AlreadyDone,
    Submit,
}

/// Decides whether a new delete request for `query` over [start, end] is needed;
/// `remaining`: lines counted in the range.
pub fn plan_submission(
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
/// (but for late lines). None without such a chain.
pub fn covered_until(requests: &[DeleteRequest], query: &str) -> Option<i64> {
    let mut done: Vec<(i64, i64)> = requests
        .iter()
        .filter(|r| r.query == query && r.processed())
        .map(|r| (r.start_time, r.end_time))
        .collect();
    done.sort_unstable();
    let mut covered: Option<i64> = None;
    for (start, end) in done {
        let reach = covered.unwrap_or(DELETE_START);
        if start > reach {
            break;
        }
        covered = Some(covered.map_or(end, |c| c.max(end)));
    }
    covered
}

/// Where a search for lines matching under `selector` may start at `now`: past the store's
/// record (less the late-lines margin), never further back than [`LOOKBACK_SECONDS`].
pub fn search_from(covered: Option<i64>, now: i64) -> i64 {
    let floor = now.saturating_sub(LOOKBACK_SECONDS).max(DELETE_START);
    covered
        .map(|c| c.saturating_sub(LATE_LINES_SECONDS))
        .map_or(floor, |c| c.max(floor))
        .min(now)
}

/// Where a sweep's request starts: at the end of its own chain of processed requests (less
/// the late-lines margin), or in 2001.
pub fn sweep_start(covered: Option<i64>) -> i64 {
    covered
        .map(|c| c.saturating_sub(LATE_LINES_SECONDS))
        .unwrap_or(DELETE_START)
        .max(DELETE_START)
}

/// The request a cursor stands for: by id, or (the id not yet known) by query and range.
pub fn find_request<'a>(
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
pub fn poll_after(age_seconds: f64) -> Duration {
    Duration::from_secs_f64((age_seconds / 4.0).clamp(1.0, 300.0))
}

/// Parses `GET /loki/api/v1/delete`. Times may be numbers or strings, seconds with a fraction.
pub fn parse_delete_list(body: &str) -> Result<Vec<DeleteRequest>, Error> {
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

/// The total of a `sum(…)` instant query: no series means nothing matched.
pub fn parse_vector_sum(body: &str) -> Result<u64, Error> {
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
pub fn parse_has_lines(body: &str) -> Result<bool, Error> {
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

/// The answer of polling a cursor's request.
enum Polled {
    Pending(Duration),
    Processed,
}

/// The answer of a search for one line.
enum Scan {
    /// A line (the newest there is, from where the scan stood).
    Found,
    Empty,
    /// The step's time is up; the cursor says where to resume.
    Paused,
}

/// The longest a job waits on Loki before looking again.
const MAX_POLL: Duration = Duration::from_secs(300);

impl LokiBackend {
    pub fn new(config: LokiConfig, limits: Limits) -> Self {
        Self {
            config,
            limits,
            client: OnceCell::new(),
        }
    }

    async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
    ) -> Result<reqwest::RequestBuilder, Error> {
        let client = self
            .client
            .get_or_try_init(|| async { http::client() })
            .await?;
        let base = url::Url::parse(&self.config.url)
            .map_err(|e| Error::InvalidSpec(format!("invalid Loki url: {e}")))?;
        let url = format!("{}{path}", base.as_str().trim_end_matches('/'));
        let mut builder = client.request(method, url);
        if let Some(tenant) = &self.config.tenant {
            builder = builder.header("X-Scope-OrgID", tenant);
        }
        Ok(self.config.auth.apply(builder))
    }

    /// Sends a request and returns the body of a success. `personal`: the request carries an
    /// identifier, so the store's error text (which may echo the query) is not copied.
    async fn send(
        &self,
        what: &str,
        builder: reqwest::RequestBuilder,
        personal: bool,
    ) -> Result<String, Error> {
        self.limits.acquire(1).await;
        let response = builder
            .send()
            .await
            .map_err(|e| http::transport_error(what, &e))?;
        let status = response.status();
        let body = response
            .text()
            .await
            .map_err(|e| http::transport_error(what, &e))?;
        if status.is_success() {
            return Ok(body);
        }
        Err(error_for(what, status, &body, personal))
    }

    /// The body of a GET on an administrative path, or None when Loki does not serve it
    /// here (404, or refused by a gateway in front of it).
    async fn get_admin(&self, path: &str) -> Result<Option<String>, Error> {
        let builder = self.request(reqwest::Method::GET, path).await?;
        self.limits.acquire(1).await;
        let what = format!("GET {path}");
        let response = builder
            .send()
            .await
            .map_err(|e| http::transport_error(&what, &e))?;
        let status = response.status();
        let body = response
            .text()
            .await
            .map_err(|e| http::transport_error(&what, &e))?;
        match status.as_u16() {
            200..=299 => Ok(Some(body)),
            403..=405 => Ok(None),
            _ => Err(error_for(&what, status, &body, false)),
        }
    }

    /// The tenant's `deletion_mode` as Loki reports it: its override in `GET /runtime_config`,
    /// else `limits_config.deletion_mode` in `GET /config`. None when Loki does not expose
    /// either (then it cannot be detected; the README says how to check by hand).
    pub async fn deletion_mode(&self) -> Result<Option<String>, Error> {
        let tenant = self.config.tenant.as_deref().unwrap_or(SINGLE_TENANT);
        if let Some(body) = self.get_admin("/runtime_config").await? {
            if let Some(mode) = runtime_deletion_mode(&body, tenant) {
                return Ok(Some(mode));
            }
        }
        Ok(self
            .get_admin("/config")
            .await?
            .and_then(|body| default_deletion_mode(&body)))
    }

    /// Refuses to delete where Loki would only hide lines (`filter-only`).
    async fn check_deletion_mode(&self) -> Result<(), Error> {
        match self.deletion_mode().await?.as_deref() {
            Some(FILTER_ONLY) => Err(Error::DeletionModeFilterOnly(format!(
                "Loki's deletion_mode for tenant {} is {FILTER_ONLY}: deleted lines are only hidden from queries and stay in storage, so nothing is deleted and nothing could be verified; set limits_config.deletion_mode (or the tenant's runtime override) to filter-and-delete",
                self.config.tenant.as_deref().unwrap_or(SINGLE_TENANT)
            ))),
            _ => Ok(()),
        }
    }

    /// `sum(count_over_time(…))` over (at - range, at]: one query, `range` at most a window.
    async fn count_window(
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
    async fn count_scan(
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
    async fn find_scan(
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

    async fn list_deletes(&self) -> Result<Vec<DeleteRequest>, Error> {
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
    async fn submit_or_reuse(
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
    async fn poll(
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

    async fn sweep(
        &self,
        job: &SweepJob,
        cursor: Option<&str>,
        budget: &StepBudget,
    ) -> Result<Step, Error> {
        let held = held_filters(job)?;
        // With held subjects the query carries identifiers: it is personal.
        let personal = !held.is_empty();
        let query = format!("{}{held}", selector(&job.target)?.render());
        let deadline = Instant::now() + budget.max_time;
        let mut step = Step::default();
        let mut c = match cursor {
            Some(text) => Cursor::decode(text)?,
            None => {
                let end = job.cutoff.timestamp();
                // Not the past again: from where this query's processed requests reach.
                let start = sweep_start(covered_until(&self.list_deletes().await?, &query));
                if end <= start {
                    return Ok(step);
                }
                Cursor::counting(start, end, end.saturating_sub(LOOKBACK_SECONDS).max(start))
            }
        };
        loop {
            match c.stage {
                Stage::Counting => {
                    if !self
                        .count_scan(&query, &mut c, false, deadline, personal)
                        .await?
                    {
                        step.next = Next::Continue(c.encode());
                        return Ok(step);
                    }
                    if job.dry_run {
                        (step.scanned, step.deleted) = (c.count, c.count);
                        return Ok(step);
                    }
                    self.check_deletion_mode().await?;
                    if self
                        .submit_or_reuse(&mut c, &query, Reuse::Exact, personal, budget)
                        .await?
                    {
                        (step.scanned, step.deleted) = (c.count, c.count);
                        return Ok(step);
                    }
                    step.next = Next::Wait {
                        cursor: c.encode(),
                        poll_after: poll_after(0.0),
                    };
                    return Ok(step);
                }
                Stage::Waiting => {
                    let end = c.end;
                    match self.poll(&mut c, &query, end, personal, budget).await? {
                        Polled::Pending(wait) => {
                            step.next = Next::Wait {
                                cursor: c.encode(),
                                poll_after: wait,
                            };
                            return Ok(step);
                        }
                        Polled::Processed => {
                            // Count what is left where lines were: only what went is reported.
                            c.stage = Stage::Checking;
                            c.from = Some(c.oldest.unwrap_or(c.end));
                            c.at = Some(c.end);
                            c.left = 0;
                        }
                    }
                }
                Stage::Checking => {
                    if !self
                        .count_scan(&query, &mut c, true, deadline, personal)
                        .await?
                    {
                        step.next = Next::Continue(c.encode());
                        return Ok(step);
                    }
                    step.scanned = c.count;
                    step.deleted = c.count.saturating_sub(c.left);
                    return Ok(step);
                }
                Stage::Resting => return Ok(step),
            }
        }
    }

    async fn subject(
        &self,
        job: &SubjectJob,
        cursor: Option<&str>,
        budget: &StepBudget,
    ) -> Result<SubjectStep, Error> {
        let selector = selector(&job.target)?;
        let locator = subject_locator(&job.target, StoreKind::Loki, |s| s.loki.as_ref())?;
        let mut step = SubjectStep {
            count: 0,
            blocked: 0,
            malformed: 0,
            ran: false,
            skipped: Vec::new(),
            next: Next::Done,
            failure: None,
        };
        let filled = match identifier::fill(&locator.line_filter, &job.identifiers) {
            Ok(filled) => filled,
            Err(template::Error::MissingIdentifier(name)) => {
                step.skipped.push(format!("lineFilter needs {{{name}}}"));
                return Ok(step);
            }
            Err(template::Error::Malformed) => {
                return Err(Error::InvalidSpec(format!(
                    "target {}: subject.loki.lineFilter is not a valid template",
                    job.target.name
                )))
            }
        };
        // A value the line filter cannot tell apart from other text fails the target: it is
        // neither run (it would take other people's lines) nor skipped (and reported erased).
        filled.check_distinctive().map_err(|e| {
            Error::IdentifierNotDistinctive(format!(
                "target {}: subject.loki.lineFilter: {e}; nothing was sent to Loki",
                job.target.name
            ))
        })?;
        step.ran = true;
        // Find, erase and verify send this same query.
        let query = format!("{} {}", selector.render(), logql::subject_filter(&filled));
        let deadline = Instant::now() + budget.max_time;
        let now = Utc::now().timestamp();
        // Searches reach a little past now (clock skew); deletes may not.
        let search_end = now.saturating_add(CLOCK_SLACK_SECONDS);
        let delete_end = now.saturating_sub(CLOCK_SLACK_SECONDS);
        if job.action != SubjectAction::Find {
            // Erasing would only hide the lines, and Verify would then see none of them.
            self.check_deletion_mode().await?;
        }
        let resumed = match cursor.map(Cursor::decode).transpose()? {
            // A scan's cursor resumes only the same kind of scan (a failed Erase keeps its
            // cursor, and the retry may be a Verify).
            Some(c) if job.action == SubjectAction::Erase => Some(c),
            Some(c) if job.action == SubjectAction::Find && c.stage == Stage::Counting => Some(c),
            Some(c) if job.action == SubjectAction::Verify && c.stage == Stage::Checking => {
                Some(c).filter(|c| c.id.is_none())
            }
            _ => None,
        };
        let mut c = match resumed {
            Some(c) => c,
            None => {
                // The store's record bounds the range searched: the target's processed sweeps
                // (its selector), or this subject's own processed erasures (this query).
                let requests = self.list_deletes().await?;
                let covered = covered_until(&requests, &selector.render())
                    .max(covered_until(&requests, &query));
                let from = search_from(covered, now);
                let mut c = match job.action {
                    SubjectAction::Erase => Cursor::counting(DELETE_START, delete_end, from),
                    _ => Cursor::counting(from, search_end, from),
                };
                c.at = Some(search_end);
                if job.action == SubjectAction::Verify {
                    c.stage = Stage::Checking;
                }
                c
            }
        };
        let pause = |c: &Cursor| Next::Continue(c.encode());
        match job.action {
            SubjectAction::Find => {
                if self
                    .count_scan(&query, &mut c, false, deadline, true)
                    .await?
                {
                    step.count = c.count;
                } else {
                    step.next = pause(&c);
                }
            }
            SubjectAction::Verify => match self.find_scan(&query, &mut c, deadline).await? {
                // Stopped at the first line: at least one remains (counting them all would
                // cost the scan this avoids).
                Scan::Found => step.count = 1,
                Scan::Empty => step.count = 0,
                Scan::Paused => step.next = pause(&c),
            },
            SubjectAction::Erase => loop {
                match c.stage {
                    Stage::Counting => {
                        if !self
                            .count_scan(&query, &mut c, false, deadline, true)
                            .await?
                        {
                            step.next = pause(&c);
                            break;
                        }
                        if self
                            .submit_or_reuse(&mut c, &query, Reuse::SameStart, true, budget)
                            .await?
                        {
                            step.count = c.count;
                            break;
                        }
                        step.next = Next::Wait {
                            cursor: c.encode(),
                            poll_after: poll_after(0.0),
                        };
                        break;
                    }
                    Stage::Waiting => {
                        match self.poll(&mut c, &query, delete_end, true, budget).await? {
                            Polled::Pending(wait) => {
                                step.next = Next::Wait {
                                    cursor: c.encode(),
                                    poll_after: wait,
                                };
                                break;
                            }
                            Polled::Processed => {
                                // Processed is not gone: look again where lines were.
                                c.stage = Stage::Checking;
                                c.from = Some(c.oldest.unwrap_or(search_end).min(search_end));
                                c.at = Some(search_end);
                            }
                        }
                    }
                    Stage::Checking => match self.find_scan(&query, &mut c, deadline).await? {
                        Scan::Paused => {
                            step.next = pause(&c);
                            break;
                        }
                        Scan::Empty => {
                            step.count = c.count;
                            break;
                        }
                        Scan::Found => {
                            let after = self.config.resubmit_after;
                            c.stage = Stage::Resting;
                            c.until = Some(now.saturating_add(after.as_secs() as i64));
                            step.next = Next::Wait {
                                cursor: c.encode(),
                                poll_after: after.min(MAX_POLL),
                            };
                            break;
                        }
                    },
                    Stage::Resting => {
                        let until = c.until.unwrap_or(now);
                        if now < until {
                            step.next = Next::Wait {
                                cursor: c.encode(),
                                poll_after: Duration::from_secs(
                                    until.saturating_sub(now).max(1) as u64
                                )
                                .min(MAX_POLL),
                            };
                            break;
                        }
                        // Again, up to now: the lines have had time to reach the store.
                        c.end = delete_end;
                        c.until = None;
                        if self
                            .submit_or_reuse(&mut c, &query, Reuse::SameStart, true, budget)
                            .await?
                        {
                            step.count = c.count;
                            break;
                        }
                        step.next = Next::Wait {
                            cursor: c.encode(),
                            poll_after: poll_after(0.0),
                        };
                        break;
                    }
                }
            },
        }
        Ok(step)
    }
}

/// The negative line filters that keep every held subject's lines out of a sweep's delete
/// request: `!~` with the same exact pattern an erasure of that subject selects with (empty
/// without held subjects).
fn held_filters(job: &SweepJob) -> Result<String, Error> {
    if job.held.is_empty() {
        return Ok(String::new());
    }
    let locator = held_subject_locator(&job.target, StoreKind::Loki, |s| s.loki.as_ref())?;
    let filled =
        job.held
            .expand_all("subject.loki.lineFilter", &locator.line_filter, |t, ids| {
                identifier::fill(t, ids).map(|f| vec![f])
            })?;
    Ok(filled
        .iter()
        .map(|f| format!(" !~ {}", logql::quote(&f.re2_pattern())))
        .collect())
}

/// Maps a failed answer. Known Loki messages are named (deletion disabled, missing tenant);
/// for `personal` requests no other body text is copied.
pub fn error_for(what: &str, status: reqwest::StatusCode, body: &str, personal: bool) -> Error {
    if status.as_u16() == 403 && body.contains(DELETION_DISABLED) {
        return Error::Store(format!(
            "{what}: HTTP 403: Loki refuses deletion ({DELETION_DISABLED}): run the compactor with retention_enabled: true and set limits_config.deletion_mode to filter-and-delete for this tenant"
        ));
    }
    if status.as_u16() == 401 && body.contains("no org id") {
        return Error::AuthenticationFailed(format!(
            "{what}: HTTP 401: no org id: this Loki is multi-tenant, set spec.loki.tenant on the DataStore"
        ));
    }
    let body = if personal {
        "(Loki's message is not shown: it may echo an identifier)"
    } else {
        body
    };
    http::status_error(what, status, body)
}

/// The target's stream selector, checked.
fn selector(target: &Target) -> Result<logql::Selector, Error> {
    let loki = target.loki.as_ref().ok_or_else(|| {
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
impl Backend for LokiBackend {
    fn kind(&self) -> StoreKind {
        StoreKind::Loki
    }

    /// Cancels a delete request still in its cancel period (`received`).
    async fn cancel(&self, cursor: &str) -> Result<Cancel, Error> {
        let Some(id) = Cursor::decode(cursor).ok().and_then(|c| c.id) else {
            return Ok(Cancel::Nothing);
        };
        let what = "DELETE /loki/api/v1/delete";
        let builder = self
            .request(reqwest::Method::DELETE, "/loki/api/v1/delete")
            .await?
            .query(&[("request_id", id.as_str())]);
        self.limits.acquire(1).await;
        let response = builder
            .send()
            .await
            .map_err(|e| http::transport_error(what, &e))?;
        match response.status().as_u16() {
            // Loki deletes nothing before a request is processed.
            200..=299 => Ok(Cancel::Cancelled { deleted: 0 }),
            // Unknown, or already processed: past the point where Loki can cancel it.
            400 | 404 => Ok(Cancel::TooLate),
            _ => Err(http::status_error(what, response.status(), "")),
        }
    }

    async fn probe(&self) -> Result<String, Error> {
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
        // Proves credentials and tenant, and whether this tenant may delete.
        let note = match self.list_deletes().await {
            Ok(_) => String::new(),
            Err(Error::Store(m)) if m.contains(DELETION_DISABLED) => {
                format!("; {DELETION_DISABLED}")
            }
            Err(Error::Store(m)) if m.contains("HTTP 404") => {
                "; no delete API at this URL (it must reach the compactor)".into()
            }
            Err(e) => return Err(e),
        };
        Ok(format!("loki {version}{note}"))
    }

    async fn sweep_step(
        &self,
        job: &SweepJob,
        cursor: Option<&str>,
        budget: &StepBudget,
    ) -> Result<Step, Error> {
        self.sweep(job, cursor, budget).await
    }

    async fn subject_step(
        &self,
        job: &SubjectJob,
        cursor: Option<&str>,
        budget: &StepBudget,
    ) -> Result<SubjectStep, Error> {
        self.subject(job, cursor, budget).await
    }
}

/// Checks a loki target before anything runs (invariant 1: never outside the selector).
pub fn validate_target(target: &Target) -> Result<(), Error> {
    selector(target)?;
    let Some(subject) = target.subject.as_ref().and_then(|s| s.loki.as_ref()) else {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn request(
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

    fn waiting(id: Option<&str>, start: i64, end: i64, count: u64) -> Cursor {
        Cursor {
            id: id.map(str::to_string),
            stage: Stage::Waiting,
            from: None,
            at: None,
            count,
            ..Cursor::counting(start, end, start)
        }
    }

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
    fn cursors_of_the_previous_version_resume_waiting_and_waits_are_described() {
        let old = r#"loki:{"id":"ab4aefd4","start":1000000000,"end":1795361677,"count":3}"#;
        let c = Cursor::decode(old).unwrap();
        assert_eq!(
            (c.stage, c.id.as_deref(), c.count),
            (Stage::Waiting, Some("ab4aefd4"), 3)
        );
        assert_eq!((c.from, c.at, c.oldest, c.lost), (None, None, None, 0));
        assert!(describe_wait(old).unwrap().contains("ab4aefd4"));
        let mut resting = c.clone();
        resting.stage = Stage::Resting;
        resting.until = Some(1_795_365_277);
        let text = resting.encode();
        assert_eq!(Cursor::decode(&text).unwrap(), resting);
        let note = describe_wait(&text).unwrap();
        assert!(
            note.starts_with("LinesInIngesters") && note.contains("2026-11-22T16:34:37Z"),
            "{note}"
        );
        assert_eq!(describe_wait("s3:{}"), None);
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
    fn cursors_round_trip_and_hold_no_query() {
        let c = waiting(Some("ab4aefd4"), DELETE_START, 1_795_361_677, 42);
        let text = c.encode();
        assert_eq!(
            text,
            r#"loki:{"id":"ab4aefd4","start":1000000000,"end":1795361677,"count":42}"#
        );
        assert_eq!(Cursor::decode(&text).unwrap(), c);
        assert!(Cursor::decode("s3:{}").is_err());
        assert!(Cursor::decode("loki:{").is_err());
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

    #[test]
    fn errors_name_deletion_disabled_and_never_copy_personal_bodies() {
        let s = |c| reqwest::StatusCode::from_u16(c).unwrap();
        let e = error_for("POST", s(403), DELETION_DISABLED, true);
        assert_eq!(e.reason(), "StoreError");
        assert!(e.to_string().contains("deletion_mode"));
        let e = error_for("POST", s(400), "parse error near \"bob@example.com\"", true);
        assert!(!e.to_string().contains("bob"), "{e}");
        assert_eq!(
            error_for("GET", s(429), "slow down", false).reason(),
            "Unreachable"
        );
        assert_eq!(
            error_for("GET", s(401), "no org id", false).reason(),
            "AuthenticationFailed"
        );
        assert_eq!(poll_after(0.0), Duration::from_secs(1));
        assert_eq!(poll_after(1e9), Duration::from_secs(300));
    }

    #[test]
    fn the_deletion_mode_is_read_from_the_tenant_override_or_the_default() {
        let config = "auth_enabled: true\nlimits_config:\n  retention_period: 0s\n  deletion_mode: filter-and-delete\n";
        assert_eq!(
            default_deletion_mode(config).as_deref(),
            Some("filter-and-delete")
        );
        assert_eq!(default_deletion_mode("server: {}\n"), None);
        assert_eq!(default_deletion_mode("not: [yaml"), None);
        let runtime = "overrides:\n  shop:\n    deletion_mode: filter-only\n  \"fake\":\n    deletion_mode: disabled\n";
        assert_eq!(
            runtime_deletion_mode(runtime, "shop").as_deref(),
            Some("filter-only")
        );
        assert_eq!(
            runtime_deletion_mode(runtime, "fake").as_deref(),
            Some("disabled")
        );
        assert_eq!(runtime_deletion_mode(runtime, "other"), None);
        assert_eq!(runtime_deletion_mode("overrides: {}\n", "shop"), None);
    }
}
