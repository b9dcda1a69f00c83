//! Grafana Loki through its HTTP API.
//!
//! Loki deletes by itself: the operator submits a delete request (`POST /loki/api/v1/delete`
//! with a LogQL `query` and `start`/`end` in unix seconds), Loki answers 204 without an id,
//! lists the request as `received` during its cancel period and as `processed` once its
//! compactor has removed the lines. The backend finds its request by listing and matching
//! query, start and end, keeps the request id and times (never the query, which may hold an
//! identifier) in the cursor, and polls until `processed`.
//!
//! - Retention: one delete request per sweep for `{selector}` over [2001-09-09, cutoff].
//!   A pending request for the same query that already reaches the cutoff is reused, so
//!   retries and restarts do not pile up duplicates.
//! - Erasure: `{selector} |~ "<exact pattern>"` (see `logql.rs` for why not `|=`) over
//!   [2001-09-09, now]. Find and Verify count with metric queries.
//!
//! Counts: Loki does not say how many lines a delete request removed. The backend counts the
//! matching lines with `sum(count_over_time(…))` right before submitting and reports that
//! number once the request is processed; a dry run reports the same count. Counting is bounded
//! to the last `LOOKBACK_SECONDS` (queried in windows of `WINDOW_SECONDS`, under Loki's default
//! `max_query_length` of 721h): older lines are deleted by the request all the same, but
//! neither counted nor seen by Verify.

pub mod logql;

use std::time::Duration;

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

/// The start of every delete request: Loki wants 10-digit unix seconds (so not 0); nothing in
/// a log store predates 2001-09-09.
pub const DELETE_START: i64 = 1_000_000_000;
/// How far back Find, Verify and the sweep's count look.
pub const LOOKBACK_SECONDS: i64 = 400 * 86_400;
/// One metric query's range: 30 days, under Loki's default `max_query_length` (721h).
pub const WINDOW_SECONDS: i64 = 30 * 86_400;
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

/// Where a submitted deletion stands, kept in status: Loki's request id, its time range and
/// the lines counted before it was submitted. No query: it may hold an identifier.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Cursor {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub start: i64,
    pub end: i64,
    pub count: u64,
}

impl Cursor {
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
}

/// What to do before submitting a delete request.
#[derive(Debug, PartialEq)]
pub enum Plan {
    /// A pending request already covers the range: wait for it.
    Reuse(String),
    /// A processed request covers the range and nothing matching is left.
    AlreadyDone,
    Submit,
}

/// Decides whether a new delete request is needed. `min_end`: how far a listed request must
/// reach to count as covering (the cutoff for sweeps; anything for an erasure, which Verify
/// checks anyway).
pub fn plan_submission(
    requests: &[DeleteRequest],
    query: &str,
    start: i64,
    min_end: i64,
    remaining: u64,
) -> Plan {
    let covering = requests
        .iter()
        .filter(|r| r.query == query && r.start_time <= start && r.end_time >= min_end);
    if let Some(pending) = covering
        .clone()
        .filter(|r| !r.processed())
        .max_by(|a, b| a.created_at.total_cmp(&b.created_at))
    {
        return Plan::Reuse(pending.request_id.clone());
    }
    if remaining == 0 && covering.clone().any(DeleteRequest::processed) {
        return Plan::AlreadyDone;
    }
    Plan::Submit
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

    /// `sum(count_over_time(…))` over (from, to], one window at a time.
    async fn count(
        &self,
        log_query: &str,
        from: i64,
        to: i64,
        personal: bool,
    ) -> Result<u64, Error> {
        let mut total = 0;
        let mut at = to;
        while at > from {
            let range = WINDOW_SECONDS.min(at - from);
            let query = logql::count_query(log_query, range);
            let builder = self
                .request(reqwest::Method::GET, "/loki/api/v1/query")
                .await?
                .query(&[("query", query.as_str()), ("time", &at.to_string())]);
            let body = self
                .send("GET /loki/api/v1/query", builder, personal)
                .await?;
            total += parse_vector_sum(&body)?;
            at -= range;
        }
        Ok(total)
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

    /// Counts, then submits (or reuses) a delete request for `query` over [start, end].
    /// Returns None when nothing needs to be waited for, else the cursor to poll.
    async fn delete(
        &self,
        query: &str,
        start: i64,
        end: i64,
        min_end: i64,
        count: u64,
        personal: bool,
    ) -> Result<Option<Cursor>, Error> {
        let requests = self.list_deletes().await?;
        let mut cursor = Cursor {
            id: None,
            start,
            end,
            count,
        };
        match plan_submission(&requests, query, start, min_end, count) {
            Plan::AlreadyDone => return Ok(None),
            Plan::Reuse(id) => {
                if let Some(r) = requests.iter().find(|r| r.request_id == id) {
                    cursor.start = r.start_time;
                    cursor.end = r.end_time;
                }
                cursor.id = Some(id);
            }
            Plan::Submit => {
                self.submit(query, start, end, personal).await?;
                let requests = self.list_deletes().await?;
                cursor.id = find_request(&requests, &cursor, query).map(|r| r.request_id.clone());
            }
        }
        Ok(Some(cursor))
    }

    /// Polls the request of `cursor`: None once processed, else the cursor and when to poll.
    async fn poll(
        &self,
        mut cursor: Cursor,
        query: &str,
    ) -> Result<Option<(Cursor, Duration)>, Error> {
        let requests = self.list_deletes().await?;
        let Some(request) = find_request(&requests, &cursor, query) else {
            return Err(Error::Store(format!(
                "the delete request{} is no longer listed by Loki (cancelled?)",
                cursor
                    .id
                    .as_deref()
                    .map(|id| format!(" {id}"))
                    .unwrap_or_default()
            )));
        };
        if request.processed() {
            return Ok(None);
        }
        let age = Utc::now().timestamp_millis() as f64 / 1000.0 - request.created_at;
        cursor.id = Some(request.request_id.clone());
        Ok(Some((cursor, poll_after(age))))
    }

    async fn sweep(&self, job: &SweepJob, cursor: Option<&str>) -> Result<Step, Error> {
        let held = held_filters(job)?;
        // With held subjects the query carries identifiers: it is personal.
        let personal = !held.is_empty();
        let query = format!("{}{held}", selector(&job.target)?.render());
        let mut step = Step::default();
        if let Some(text) = cursor {
            let cursor = Cursor::decode(text)?;
            let count = cursor.count;
            match self.poll(cursor, &query).await? {
                Some((cursor, wait)) => {
                    step.next = Next::Wait {
                        cursor: cursor.encode(),
                        poll_after: wait,
                    }
                }
                // Counted once, when Loki has really deleted.
                None => (step.scanned, step.deleted) = (count, count),
            }
            return Ok(step);
        }
        let end = job.cutoff.timestamp();
        if end <= DELETE_START {
            return Ok(step);
        }
        let count = self
            .count(
                &query,
                (end - LOOKBACK_SECONDS).max(DELETE_START),
                end,
                personal,
            )
            .await?;
        if job.dry_run {
            (step.scanned, step.deleted) = (count, count);
            return Ok(step);
        }
        self.check_deletion_mode().await?;
        match self
            .delete(&query, DELETE_START, end, end, count, personal)
            .await?
        {
            None => (step.scanned, step.deleted) = (count, count),
            Some(cursor) => {
                step.next = Next::Wait {
                    cursor: cursor.encode(),
                    poll_after: poll_after(0.0),
                }
            }
        }
        Ok(step)
    }

    async fn subject(&self, job: &SubjectJob, cursor: Option<&str>) -> Result<SubjectStep, Error> {
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
        let now = Utc::now().timestamp() - CLOCK_SLACK_SECONDS;
        if job.action != SubjectAction::Find {
            // Erasing would only hide the lines, and Verify would then see none of them.
            self.check_deletion_mode().await?;
        }
        match (job.action, cursor) {
            (SubjectAction::Find | SubjectAction::Verify, _) => {
                step.count = self
                    .count(&query, now - LOOKBACK_SECONDS, now, true)
                    .await?;
            }
            (SubjectAction::Erase, Some(text)) => {
                let cursor = Cursor::decode(text)?;
                let count = cursor.count;
                match self.poll(cursor, &query).await? {
                    Some((cursor, wait)) => {
                        step.next = Next::Wait {
                            cursor: cursor.encode(),
                            poll_after: wait,
                        }
                    }
                    None => step.count = count,
                }
            }
            (SubjectAction::Erase, None) => {
                let count = self
                    .count(&query, now - LOOKBACK_SECONDS, now, true)
                    .await?;
                match self
                    .delete(&query, DELETE_START, now, 0, count, true)
                    .await?
                {
                    None => step.count = count,
                    Some(cursor) => {
                        step.next = Next::Wait {
                            cursor: cursor.encode(),
                            poll_after: poll_after(0.0),
                        }
                    }
                }
            }
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
            200..=299 => Ok(Cancel::Cancelled),
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
        _budget: &StepBudget,
    ) -> Result<Step, Error> {
        self.sweep(job, cursor).await
    }

    async fn subject_step(
        &self,
        job: &SubjectJob,
        cursor: Option<&str>,
        _budget: &StepBudget,
    ) -> Result<SubjectStep, Error> {
        self.subject(job, cursor).await
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
    fn submissions_reuse_pending_requests_and_skip_done_ranges() {
        let q = r#"{app="mailer"}"#;
        let list = vec![
            request("old", q, DELETE_START, 100, "processed", 1.0),
            request("other", r#"{app="x"}"#, DELETE_START, 500, "received", 2.0),
        ];
        assert_eq!(
            plan_submission(&list, q, DELETE_START, 200, 5),
            Plan::Submit
        );
        let mut list2 = list.clone();
        list2.push(request("p1", q, DELETE_START, 200, "received", 3.0));
        list2.push(request("p2", q, DELETE_START, 200, "50% Complete", 4.0));
        assert_eq!(
            plan_submission(&list2, q, DELETE_START, 200, 5),
            Plan::Reuse("p2".into())
        );
        // A pending request that stops short of the cutoff does not cover it.
        assert_eq!(
            plan_submission(&list2, q, DELETE_START, 201, 5),
            Plan::Submit
        );
        let done = vec![request("d", q, DELETE_START, 300, "processed", 1.0)];
        assert_eq!(
            plan_submission(&done, q, DELETE_START, 200, 0),
            Plan::AlreadyDone
        );
        // Lines still there (written late): a new request.
        assert_eq!(
            plan_submission(&done, q, DELETE_START, 200, 3),
            Plan::Submit
        );
    }

    #[test]
    fn requests_are_found_by_id_or_by_query_and_range() {
        let q = "{a=\"b\"}";
        let list = vec![
            request("r1", q, 10, 20, "received", 1.0),
            request("r2", q, 10, 20, "received", 2.0),
            request("r3", q, 10, 30, "received", 3.0),
        ];
        let mut c = Cursor {
            id: None,
            start: 10,
            end: 20,
            count: 0,
        };
        assert_eq!(find_request(&list, &c, q).unwrap().request_id, "r2");
        c.id = Some("r1".into());
        assert_eq!(find_request(&list, &c, q).unwrap().request_id, "r1");
        c.id = Some("gone".into());
        assert!(find_request(&list, &c, q).is_none());
    }

    #[test]
    fn cursors_round_trip_and_hold_no_query() {
        let c = Cursor {
            id: Some("ab4aefd4".into()),
            start: DELETE_START,
            end: 1_795_361_677,
            count: 42,
        };
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
