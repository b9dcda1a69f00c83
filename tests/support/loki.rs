//! A stateful Grafana Loki test double on loopback: it stores pushed lines per tenant and
//! stream, answers log and metric queries over them, and runs delete requests through their
//! lifecycle, so that a query after a processed deletion really returns less.
//!
//! It follows, for the parts the operator uses:
//! - the Loki HTTP API reference, <https://grafana.com/docs/loki/latest/reference/loki-http-api/>:
//!   `POST /loki/api/v1/push` (JSON), `GET /loki/api/v1/query` (instant; here the metric
//!   queries `count_over_time` and `sum(count_over_time(…))`), `GET /loki/api/v1/query_range`
//!   (log queries: `start` inclusive, `end` exclusive, `limit` default 100, `direction` default
//!   backward), `GET /loki/api/v1/status/buildinfo`, and the compactor's
//!   `POST|PUT|GET|DELETE /loki/api/v1/delete`;
//! - "Log entry deletion", <https://grafana.com/docs/loki/latest/operations/storage/logs-deletion/>:
//!   a request is cancellable while `received` and processed after the cancel period;
//! - what a real Loki 2.8 answered when this double was written: 204 with no body and
//!   no id on POST, the listing's fields (times in seconds, `created_at` a float), the status
//!   codes and bodies of errors, `{}` accepted, 401 `no org id`, 403 `deletion is not
//!   available for this tenant`, deleted lines still returned until `processed`;
//! - Loki's `pkg/compactor/deletion/request_handler.go` for the validation of `start`/`end`
//!   (10-digit unix seconds or RFC 3339, no deletes in the future);
//! - LogQL (<https://grafana.com/docs/loki/latest/query/log_queries/>): stream selectors with
//!   `= != =~ !~` (label regexes fully anchored), line filters `|= != |~ !~` (regexes match
//!   anywhere in the line), strings as Go string literals; regexes in RE2 syntax, of which
//!   this double implements the subset it needs (literals, escapes, `.`, classes, `\d\w\s\b`,
//!   groups, alternation, `* + ? {n,m}`, `^ $`, the case-insensitive flag `(?i)` / `(?i:…)` on
//!   literal letters) and answers 400 to anything else.
//!
//! It is no more lenient than the real Loki 2.8 server the project ran against (see the
//! README's Loki section):
//! - the compactor runs on its own schedule (every `compaction_interval`, 1 s here): a
//!   request is processed at the first cycle after its cancel period, not at once (applied
//!   lazily: whenever the double handles a request it first runs the cycles that are due);
//! - a processed request leaves in place the lines that arrived less than `ingester_window`
//!   (2 s here) before the cycle ran, whatever their timestamps: on a real Loki they are
//!   still in the ingesters (`query_ingesters_within`, hours by default), where the
//!   compactor does not reach; queries still return them;
//! - the query frontend splits every query by `split_queries_by_interval` (30 m) and the
//!   double counts the sub-queries ([`LokiDouble::sub_queries`]): a metric query costs its
//!   range divided by the interval; a log query stops at the first piece (newest first for
//!   `direction=backward`) that fills its `limit`;
//! - a query whose range exceeds `max_query_length` (721h) is refused with 400, and so is a
//!   query (or a delete request's query) of 5,120 bytes or more, as Loki's LogQL parser does;
//! - `end` in the future is refused (400 `deletes in the future are not allowed`);
//! - as a real Loki 3.8 does, a delete request with a line filter is split into pieces of
//!   `delete_max_interval` (24 h), and a compaction cycle processes at most
//!   `delete_batch_size` (70) pieces of all requests, oldest first: a request over years
//!   takes many cycles, and is listed as `N% Complete` meanwhile.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde_json::{json, Value};

pub type Labels = BTreeMap<String, String>;

/// How the double authenticates requests (as a gateway in front of Loki would).
#[derive(Clone, Debug)]
pub enum Auth {
    Bearer(String),
    Basic(String, String),
}

/// A delete request as the compactor keeps it.
#[derive(Clone, Debug)]
pub struct DeleteRequest {
    pub request_id: String,
    pub query: String,
    /// Milliseconds, as Loki keeps them.
    pub start_ms: i64,
    pub end_ms: i64,
    pub status: String,
    pub created_at: f64,
    /// The pieces Loki split it into (milliseconds, each processed on its own), and which of
    /// them a compaction cycle has processed.
    pub shards: Vec<(i64, i64, bool)>,
}

/// One request the double received: method, path, decoded query parameters, tenant.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub params: Vec<(String, String)>,
    pub tenant: Option<String>,
}

#[derive(Clone, Debug)]
struct Fault {
    method: Option<Method>,
    path_prefix: String,
    status: u16,
    body: String,
    /// Matching requests let through before the fault starts.
    after: u32,
    remaining: u32,
}

#[derive(Default)]
struct Tenant {
    /// Lines: (timestamp ns, text, when it arrived in seconds).
    streams: BTreeMap<Labels, Vec<Line>>,
    /// Lines a processed delete request hid in `filter-only` mode: still stored, no longer
    /// returned by queries.
    hidden: BTreeMap<Labels, Vec<Line>>,
    deletes: Vec<DeleteRequest>,
}

type Line = (i64, String, f64);

struct Inner {
    multi_tenant: bool,
    auth: Option<Auth>,
    cancel_period: Duration,
    /// When the double started: compaction cycles run at multiples of the interval since.
    started: f64,
    compaction_interval: Duration,
    /// The last compaction cycle run (seconds since the epoch).
    last_cycle: f64,
    /// Shards processed per cycle (`compactor.delete_batch_size`).
    delete_batch_size: usize,
    /// A request with a line filter is split into pieces this long (`delete_max_interval`).
    delete_max_interval: Duration,
    ingester_window: Duration,
    split_interval: Duration,
    max_query_length: Duration,
    sub_queries: u64,
    deletion_disabled: Vec<String>,
    /// Tenants whose runtime override sets `deletion_mode: filter-only`.
    filter_only: Vec<String>,
    tenants: HashMap<String, Tenant>,
    faults: Vec<Fault>,
    seen: Vec<Seen>,
    next_id: u64,
}

type Shared = Arc<Mutex<Inner>>;

/// The double; stopped on drop.
pub struct LokiDouble {
    url: String,
    state: Shared,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for LokiDouble {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The tenant of a single-tenant Loki (`auth_enabled: false`).
pub const SINGLE_TENANT: &str = "fake";

pub fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64
}

fn now_secs_f64() -> f64 {
    now_ns() as f64 / 1e9
}

impl LokiDouble {
    /// Single-tenant, no auth, a cancel period of 1 s.
    pub async fn start() -> LokiDouble {
        Self::start_with(false, None).await
    }

    /// `multi_tenant`: `X-Scope-OrgID` required (`auth_enabled: true`).
    pub async fn start_with(multi_tenant: bool, auth: Option<Auth>) -> LokiDouble {
        let state = Arc::new(Mutex::new(Inner {
            multi_tenant,
            auth,
            cancel_period: Duration::from_secs(1),
            started: now_secs_f64(),
            compaction_interval: Duration::from_secs(1),
            last_cycle: 0.0,
            delete_batch_size: 70,
            delete_max_interval: Duration::from_secs(24 * 3600),
            ingester_window: Duration::from_secs(2),
            split_interval: Duration::from_secs(30 * 60),
            max_query_length: Duration::from_secs(721 * 3600),
            sub_queries: 0,
            deletion_disabled: Vec::new(),
            filter_only: Vec::new(),
            tenants: HashMap::new(),
            faults: Vec::new(),
            seen: Vec::new(),
            next_id: 1,
        }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port");
        let url = format!("http://{}", listener.local_addr().unwrap());
        let app = Router::new().fallback(handle).with_state(state.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        LokiDouble { url, state, task }
    }

    pub fn url(&self) -> String {
        self.url.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How long requests stay `received` (Loki's `delete_request_cancel_period`).
    pub fn set_cancel_period(&self, period: Duration) {
        self.lock().cancel_period = period;
    }

    /// How often the compactor runs (`compactor.compaction_interval`).
    pub fn set_compaction_interval(&self, interval: Duration) {
        self.lock().compaction_interval = interval;
    }

    /// How many shards a compaction cycle processes (`compactor.delete_batch_size`).
    pub fn set_delete_batch_size(&self, shards: usize) {
        self.lock().delete_batch_size = shards;
    }

    /// Lines that arrived less than this before a compaction cycle are still in the
    /// ingesters: a processed request leaves them in place.
    pub fn set_ingester_window(&self, window: Duration) {
        self.lock().ingester_window = window;
    }

    /// The query frontend's `split_queries_by_interval`.
    pub fn set_split_interval(&self, interval: Duration) {
        self.lock().split_interval = interval;
    }

    /// Sub-queries run so far (every query split by the split interval).
    pub fn sub_queries(&self) -> u64 {
        self.lock().sub_queries
    }

    /// The tenant's `deletion_mode` becomes `disabled`.
    pub fn disable_deletion(&self, tenant: &str) {
        self.lock().deletion_disabled.push(tenant.to_string());
    }

    /// The tenant's `deletion_mode` becomes `filter-only` (a runtime override, shown by
    /// `GET /runtime_config`): processed delete requests hide lines from queries and keep
    /// them in storage ([`LokiDouble::lines`] still returns them).
    pub fn set_filter_only(&self, tenant: &str) {
        self.lock().filter_only.push(tenant.to_string());
    }

    /// The next `times` requests whose path starts with `path_prefix` (and of `method`, if
    /// given) are answered with `status` and `body`.
    pub fn fail_next(
        &self,
        method: Option<Method>,
        path_prefix: &str,
        status: u16,
        body: &str,
        times: u32,
    ) {
        self.fail_later(method, path_prefix, 0, status, body, times);
    }

    /// As `fail_next`, after letting `after` matching requests through.
    pub fn fail_later(
        &self,
        method: Option<Method>,
        path_prefix: &str,
        after: u32,
        status: u16,
        body: &str,
        times: u32,
    ) {
        self.lock().faults.push(Fault {
            method,
            path_prefix: path_prefix.to_string(),
            status,
            body: body.to_string(),
            after,
            remaining: times,
        });
    }

    /// Stores lines directly (as if pushed just now: they are in the ingesters for
    /// `ingester_window`), timestamps in nanoseconds.
    pub fn push(&self, tenant: &str, labels: &[(&str, &str)], lines: &[(i64, &str)]) {
        self.push_arrived(tenant, labels, lines, now_secs_f64());
    }

    /// Stores lines that arrived long ago: flushed and indexed, where delete requests
    /// reach them (old data in a store).
    pub fn push_flushed(&self, tenant: &str, labels: &[(&str, &str)], lines: &[(i64, &str)]) {
        self.push_arrived(tenant, labels, lines, 0.0);
    }

    fn push_arrived(
        &self,
        tenant: &str,
        labels: &[(&str, &str)],
        lines: &[(i64, &str)],
        arrived: f64,
    ) {
        let labels: Labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut inner = self.lock();
        let stream = inner
            .tenants
            .entry(tenant.to_string())
            .or_default()
            .streams
            .entry(labels)
            .or_default();
        stream.extend(lines.iter().map(|(t, l)| (*t, l.to_string(), arrived)));
        stream.sort_by_key(|(t, _, _)| *t);
    }

    /// Every stored line of a tenant (processing due deletions first), as (labels, line):
    /// what is in storage, lines hidden in `filter-only` mode included.
    pub fn lines(&self, tenant: &str) -> Vec<(Labels, String)> {
        let mut inner = self.lock();
        process_due(&mut inner);
        inner
            .tenants
            .get(tenant)
            .map(|t| {
                t.streams
                    .iter()
                    .chain(t.hidden.iter())
                    .flat_map(|(l, v)| v.iter().map(move |(_, line, _)| (l.clone(), line.clone())))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn delete_requests(&self, tenant: &str) -> Vec<DeleteRequest> {
        let mut inner = self.lock();
        process_due(&mut inner);
        inner
            .tenants
            .get(tenant)
            .map(|t| t.deletes.clone())
            .unwrap_or_default()
    }

    /// Every request received so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.lock().seen.clone()
    }
}

// ---------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------

fn text(status: u16, body: impl Into<String>) -> Response {
    let mut body: String = body.into();
    if !body.is_empty() && status >= 400 {
        // Go's http.Error appends a newline.
        body.push('\n');
    }
    (StatusCode::from_u16(status).unwrap(), body).into_response()
}

fn json_response(value: Value) -> Response {
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        value.to_string(),
    )
        .into_response()
}

fn authorized(auth: &Option<Auth>, headers: &HeaderMap) -> bool {
    let Some(auth) = auth else { return true };
    let given = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    match auth {
        Auth::Bearer(token) => given == format!("Bearer {token}"),
        Auth::Basic(user, password) => {
            given
                == format!(
                    "Basic {}",
                    super::base64(format!("{user}:{password}").as_bytes())
                )
        }
    }
}

async fn handle(State(state): State<Shared>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, 64 << 20)
        .await
        .unwrap_or_default();
    let params: Vec<(String, String)> = parts
        .uri
        .query()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default();
    let tenant_header = parts
        .headers
        .get("x-scope-orgid")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let path = parts.uri.path().to_string();
    let mut inner = state.lock().unwrap_or_else(|p| p.into_inner());
    inner.seen.push(Seen {
        method: parts.method.to_string(),
        path: path.clone(),
        params: params.clone(),
        tenant: tenant_header.clone(),
    });
    if let Some(fault) = inner.faults.iter_mut().find(|f| {
        f.remaining > 0
            && path.starts_with(&f.path_prefix)
            && f.method.as_ref().is_none_or(|m| m == parts.method)
    }) {
        if fault.after > 0 {
            fault.after -= 1;
        } else {
            fault.remaining -= 1;
            return text(fault.status, fault.body.clone());
        }
    }
    if !authorized(&inner.auth, &parts.headers) {
        return text(401, "Unauthorized");
    }
    // Served by every Loki component, for no tenant in particular (as Loki's own `/config`
    // and `/runtime_config`): the defaults, then the per-tenant overrides.
    if parts.method == Method::GET && path == "/config" {
        return text(
            200,
            "auth_enabled: false\nlimits_config:\n  retention_period: 0s\n  deletion_mode: filter-and-delete\ncompactor:\n  retention_enabled: true\n",
        );
    }
    if parts.method == Method::GET && path == "/runtime_config" {
        let mut overrides = String::new();
        for (tenant, mode) in inner
            .deletion_disabled
            .iter()
            .map(|t| (t, "disabled"))
            .chain(inner.filter_only.iter().map(|t| (t, "filter-only")))
        {
            overrides.push_str(&format!("  {tenant:?}:\n    deletion_mode: {mode}\n"));
        }
        return text(
            200,
            if overrides.is_empty() {
                "overrides: {}\n".to_string()
            } else {
                format!("overrides:\n{overrides}")
            },
        );
    }
    if path == "/loki/api/v1/status/buildinfo" {
        return json_response(json!({
            "version": "2.8.0", "revision": "test-double", "branch": "HEAD",
            "buildUser": "", "buildDate": "", "goVersion": ""
        }));
    }
    let tenant = match (&tenant_header, inner.multi_tenant) {
        (Some(t), true) => t.clone(),
        (None, true) => return text(401, "no org id"),
        (_, false) => SINGLE_TENANT.to_string(),
    };
    process_due(&mut inner);
    let param = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    match (parts.method.clone(), path.as_str()) {
        (Method::POST, "/loki/api/v1/push") => push(&mut inner, &tenant, &body),
        (Method::GET, "/loki/api/v1/query_range") => query_range(&mut inner, &tenant, &param),
        (Method::GET, "/loki/api/v1/query") => instant_query(&mut inner, &tenant, &param),
        (m, "/loki/api/v1/delete") => {
            if inner.deletion_disabled.contains(&tenant) {
                return text(403, "deletion is not available for this tenant");
            }
            match m {
                Method::POST | Method::PUT => add_delete(&mut inner, &tenant, &param),
                Method::GET => list_deletes(&inner, &tenant),
                Method::DELETE => cancel_delete(&mut inner, &tenant, &param),
                _ => text(405, "method not allowed"),
            }
        }
        _ => text(404, "404 page not found"),
    }
}

fn push(inner: &mut Inner, tenant: &str, body: &[u8]) -> Response {
    let Ok(value) = serde_json::from_slice::<Value>(body) else {
        return text(400, "invalid push request");
    };
    let Some(streams) = value.get("streams").and_then(Value::as_array) else {
        return text(400, "invalid push request");
    };
    for s in streams {
        let labels: Labels = s
            .get("stream")
            .and_then(Value::as_object)
            .map(|o| {
                o.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                    .collect()
            })
            .unwrap_or_default();
        if labels.is_empty() {
            return text(400, "error at least one label pair is required per stream");
        }
        let stored = inner
            .tenants
            .entry(tenant.to_string())
            .or_default()
            .streams
            .entry(labels)
            .or_default();
        for v in s
            .get("values")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let ts = v
                .get(0)
                .and_then(Value::as_str)
                .and_then(|t| t.parse::<i64>().ok());
            let line = v.get(1).and_then(Value::as_str);
            match (ts, line) {
                (Some(ts), Some(line)) => stored.push((ts, line.to_string(), now_secs_f64())),
                _ => return text(400, "invalid push request"),
            }
        }
        stored.sort_by_key(|(t, _, _)| *t);
    }
    StatusCode::NO_CONTENT.into_response()
}

/// A query-API time: RFC 3339, unix nanoseconds, or (fractional) unix seconds.
fn query_time(text: &str) -> Option<i64> {
    if text.contains('T') {
        return chrono::DateTime::parse_from_rfc3339(text)
            .ok()
            .and_then(|t| t.timestamp_nanos_opt());
    }
    let n: f64 = text.parse().ok()?;
    if text.len() > 13 && !text.contains('.') {
        return text.parse().ok();
    }
    Some((n * 1e9) as i64)
}

/// 400 when a query's range is longer than `max_query_length`, as Loki answers.
fn too_long(inner: &Inner, range_ns: i64) -> Option<Response> {
    let limit = inner.max_query_length.as_nanos() as i64;
    (range_ns > limit).then(|| {
        let hours = |ns: i64| format!("{}h0m0s", ns / 3_600_000_000_000);
        text(
            400,
            format!(
                "the query time range exceeds the limit (query length: {}, limit: {})",
                hours(range_ns),
                hours(limit)
            ),
        )
    })
}

fn query_range(
    inner: &mut Inner,
    tenant: &str,
    param: &dyn Fn(&str) -> Option<String>,
) -> Response {
    let Some(q) = param("query") else {
        return text(400, "query not set");
    };
    let expr = match parse_log_query(&q) {
        Ok(e) => e,
        Err(e) => return text(400, format!("parse error: {e}")),
    };
    let end = param("end")
        .and_then(|t| query_time(&t))
        .unwrap_or_else(now_ns);
    let start = param("start")
        .and_then(|t| query_time(&t))
        .unwrap_or(end - 3_600_000_000_000);
    let limit: usize = param("limit").and_then(|l| l.parse().ok()).unwrap_or(100);
    let forward = param("direction").as_deref() == Some("forward");
    if let Some(refused) = too_long(inner, end - start) {
        return refused;
    }
    let mut entries: Vec<(i64, &Labels, &str)> = inner
        .tenants
        .get(tenant)
        .into_iter()
        .flat_map(|t| t.streams.iter())
        .filter(|(labels, _)| expr.selects(labels))
        .flat_map(|(labels, lines)| {
            lines
                .iter()
                .map(move |(ts, l, _)| (*ts, labels, l.as_str()))
        })
        .filter(|(ts, _, line)| *ts >= start && *ts < end && expr.keeps(line))
        .collect();
    entries.sort_by_key(|(ts, _, _)| *ts);
    if !forward {
        entries.reverse();
    }
    entries.truncate(limit);
    // The frontend runs the pieces in the query's direction and stops once `limit` lines
    // are in: count the pieces up to the one holding the last line kept.
    let split = (inner.split_interval.as_nanos() as i64).max(1);
    let pieces = |from: i64, to: i64| ((to - from).max(0) + split - 1) / split;
    let run = match (entries.len() >= limit, entries.last()) {
        (true, Some((ts, _, _))) if forward => pieces(start, *ts + 1),
        (true, Some((ts, _, _))) => pieces(*ts, end),
        _ => pieces(start, end),
    };
    let run = run.max(1) as u64;
    inner.sub_queries += run;
    let mut by_stream: BTreeMap<&Labels, Vec<Value>> = BTreeMap::new();
    for (ts, labels, line) in entries {
        by_stream
            .entry(labels)
            .or_default()
            .push(json!([ts.to_string(), line]));
    }
    let result: Vec<Value> = by_stream
        .into_iter()
        .map(|(labels, values)| json!({"stream": labels, "values": values}))
        .collect();
    json_response(
        json!({"status": "success", "data": {"resultType": "streams", "result": result, "stats": {}}}),
    )
}

fn instant_query(
    inner: &mut Inner,
    tenant: &str,
    param: &dyn Fn(&str) -> Option<String>,
) -> Response {
    let Some(q) = param("query") else {
        return text(400, "query not set");
    };
    let (sum, expr, range) = match parse_metric_query(&q) {
        Ok(m) => m,
        Err(e) => return text(400, format!("parse error: {e}")),
    };
    let at = param("time")
        .and_then(|t| query_time(&t))
        .unwrap_or_else(now_ns);
    if let Some(refused) = too_long(inner, range) {
        return refused;
    }
    let split = (inner.split_interval.as_nanos() as i64).max(1);
    inner.sub_queries += ((range + split - 1) / split).max(1) as u64;
    let counts: Vec<(&Labels, usize)> = inner
        .tenants
        .get(tenant)
        .into_iter()
        .flat_map(|t| t.streams.iter())
        .filter(|(labels, _)| expr.selects(labels))
        .map(|(labels, lines)| {
            let n = lines
                .iter()
                .filter(|(ts, l, _)| *ts > at - range && *ts <= at && expr.keeps(l))
                .count();
            (labels, n)
        })
        .filter(|(_, n)| *n > 0)
        .collect();
    let seconds = at as f64 / 1e9;
    let result: Vec<Value> = if sum {
        let total: usize = counts.iter().map(|(_, n)| n).sum();
        if counts.is_empty() {
            vec![]
        } else {
            vec![json!({"metric": {}, "value": [seconds, total.to_string()]})]
        }
    } else {
        counts
            .iter()
            .map(|(l, n)| json!({"metric": l, "value": [seconds, n.to_string()]}))
            .collect()
    };
    json_response(
        json!({"status": "success", "data": {"resultType": "vector", "result": result, "stats": {}}}),
    )
}

/// `start`/`end` of a delete request: RFC 3339, or unix seconds of exactly 10 digits.
fn delete_time(text: &str) -> Option<i64> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(text) {
        return Some(t.timestamp_millis());
    }
    if text.len() != 10 {
        return None;
    }
    text.parse::<i64>().ok().map(|s| s * 1000)
}

fn add_delete(inner: &mut Inner, tenant: &str, param: &dyn Fn(&str) -> Option<String>) -> Response {
    let query = param("query").unwrap_or_default();
    if query.is_empty() {
        return text(400, "query not set");
    }
    let Ok(expr) = parse_log_query(&query) else {
        return text(400, "invalid query expression");
    };
    let Some(start) = param("start").filter(|s| !s.is_empty()) else {
        return text(400, "start time not set");
    };
    let Some(start) = delete_time(&start) else {
        return text(
            400,
            "invalid start time: require unix seconds or RFC3339 format",
        );
    };
    let now_ms = now_ns() / 1_000_000;
    let end = match param("end").filter(|s| !s.is_empty()) {
        None => now_ms,
        Some(e) => match delete_time(&e) {
            Some(e) => e,
            None => {
                return text(
                    400,
                    "invalid end time: require unix seconds or RFC3339 format",
                )
            }
        },
    };
    if end > now_ms {
        return text(400, "deletes in the future are not allowed");
    }
    if start > end {
        return text(400, "start time can't be greater than end time");
    }
    if !expr.filters.is_empty() && end - start < 1000 {
        return text(
            400,
            "difference between start time and end time must be at least one second",
        );
    }
    // Loki 3 splits a request with a line filter into pieces of `delete_max_interval`,
    // each overlapping the next by its end (`util.ForInterval`, end not inclusive).
    let piece = i64::try_from(inner.delete_max_interval.as_millis()).unwrap_or(i64::MAX);
    let mut shards = Vec::new();
    if expr.filters.is_empty() || piece <= 0 || end - start <= piece {
        shards.push((start, end, false));
    } else {
        let mut at = start;
        while at < end {
            let to = (at + piece).min(end);
            shards.push((at, to, false));
            at = to;
        }
    }
    let id = format!("{:08x}", inner.next_id.wrapping_mul(0x9e37_79b9) as u32);
    inner.next_id += 1;
    inner
        .tenants
        .entry(tenant.to_string())
        .or_default()
        .deletes
        .push(DeleteRequest {
            request_id: id,
            query,
            start_ms: start,
            end_ms: end,
            status: "received".into(),
            created_at: (now_secs_f64() * 1000.0).round() / 1000.0,
            shards,
        });
    StatusCode::NO_CONTENT.into_response()
}

fn seconds_json(ms: i64) -> Value {
    if ms % 1000 == 0 {
        json!(ms / 1000)
    } else {
        json!(ms as f64 / 1000.0)
    }
}

fn list_deletes(inner: &Inner, tenant: &str) -> Response {
    let mut list: Vec<&DeleteRequest> = inner
        .tenants
        .get(tenant)
        .map(|t| t.deletes.iter().collect())
        .unwrap_or_default();
    list.sort_by(|a, b| a.created_at.total_cmp(&b.created_at));
    let items: Vec<Value> = list
        .iter()
        .map(|r| {
            json!({
                "request_id": r.request_id,
                "start_time": seconds_json(r.start_ms),
                "end_time": seconds_json(r.end_ms),
                "query": r.query,
                "status": r.status,
                "created_at": r.created_at,
            })
        })
        .collect();
    json_response(Value::Array(items))
}

fn cancel_delete(
    inner: &mut Inner,
    tenant: &str,
    param: &dyn Fn(&str) -> Option<String>,
) -> Response {
    let id = param("request_id").unwrap_or_default();
    let Some(t) = inner.tenants.get_mut(tenant) else {
        return text(404, "could not find delete request with given id");
    };
    let Some(i) = t.deletes.iter().position(|r| r.request_id == id) else {
        return text(404, "could not find delete request with given id");
    };
    if t.deletes[i].status != "received" {
        return text(
            400,
            "deletion of request which is in process or already processed is not allowed",
        );
    }
    t.deletes.remove(i);
    StatusCode::NO_CONTENT.into_response()
}

/// The compactor's work, cycle by cycle since the last one run: each cycle takes up to
/// `delete_batch_size` shards of the requests past their cancel period (of every tenant,
/// oldest shard first, as Loki sorts them by start) and deletes their lines, except those
/// that arrived within the ingester window before that cycle. A request is `processed` once
/// all its shards are, `N% Complete` before. (Loki also waits a minute past the cancel
/// period; the double does not, which changes only when, not what.)
fn process_due(inner: &mut Inner) {
    let now = now_secs_f64();
    let period = inner.cancel_period.as_secs_f64();
    let interval = inner.compaction_interval.as_secs_f64().max(0.001);
    let window = inner.ingester_window.as_secs_f64();
    let batch = inner.delete_batch_size.max(1);
    // The first cycle after the last one run.
    let mut at = inner.started
        + ((inner.last_cycle.max(inner.started) - inner.started) / interval).floor() * interval
        + interval;
    while at <= now {
        inner.last_cycle = at;
        // (start, tenant, request, shard) of every shard due by this cycle.
        let mut due: Vec<(i64, String, usize, usize)> = Vec::new();
        let mut waiting = false;
        for (name, tenant) in &inner.tenants {
            for (i, r) in tenant.deletes.iter().enumerate() {
                if r.status == "processed" {
                    continue;
                }
                waiting = true;
                if r.created_at + period > at {
                    continue;
                }
                for (k, (start, _, done)) in r.shards.iter().enumerate() {
                    if !done {
                        due.push((*start, name.clone(), i, k));
                    }
                }
            }
        }
        if !waiting {
            // Nothing to do: the cycles up to now ran empty.
            inner.last_cycle = now;
            break;
        }
        due.sort();
        due.truncate(batch);
        for (_, name, i, k) in due {
            let filter_only = inner.filter_only.contains(&name);
            let Some(tenant) = inner.tenants.get_mut(&name) else {
                continue;
            };
            let Some(request) = tenant.deletes.get_mut(i) else {
                continue;
            };
            let Some(shard) = request.shards.get_mut(k) else {
                continue;
            };
            shard.2 = true;
            let (from, to) = (shard.0 * 1_000_000, shard.1 * 1_000_000);
            let Ok(expr) = parse_log_query(&request.query) else {
                continue;
            };
            for (labels, lines) in tenant.streams.iter_mut() {
                if expr.selects(labels) {
                    let (gone, kept): (Vec<_>, Vec<_>) = std::mem::take(lines)
                        .into_iter()
                        .partition(|(ts, l, arrived)| {
                            *ts >= from && *ts <= to && expr.keeps(l) && *arrived <= at - window
                        });
                    *lines = kept;
                    if filter_only {
                        tenant
                            .hidden
                            .entry(labels.clone())
                            .or_default()
                            .extend(gone);
                    }
                }
            }
            tenant.streams.retain(|_, lines| !lines.is_empty());
        }
        for tenant in inner.tenants.values_mut() {
            for r in tenant.deletes.iter_mut() {
                let done = r.shards.iter().filter(|s| s.2).count();
                r.status = match done {
                    0 => "received".into(),
                    d if d == r.shards.len() => "processed".into(),
                    d => format!("{}% Complete", d * 100 / r.shards.len()),
                };
            }
        }
        at += interval;
    }
}

// ---------------------------------------------------------------------------------------
// LogQL
// ---------------------------------------------------------------------------------------

#[derive(Debug)]
enum MatchOp {
    Eq,
    Neq,
    Re(Regex),
    Nre(Regex),
}

#[derive(Debug)]
enum Filter {
    Contains(String),
    NotContains(String),
    Matches(Regex),
    NotMatches(Regex),
}

/// A log query: a stream selector and line filters.
#[derive(Debug)]
pub struct LogQuery {
    matchers: Vec<(String, MatchOp, String)>,
    filters: Vec<Filter>,
}

impl LogQuery {
    pub fn selects(&self, labels: &Labels) -> bool {
        self.matchers.iter().all(|(name, op, value)| {
            let v = labels.get(name).map(String::as_str).unwrap_or("");
            match op {
                MatchOp::Eq => v == value,
                MatchOp::Neq => v != value,
                MatchOp::Re(re) => re.full_match(v),
                MatchOp::Nre(re) => !re.full_match(v),
            }
        })
    }

    pub fn keeps(&self, line: &str) -> bool {
        self.filters.iter().all(|f| match f {
            Filter::Contains(s) => line.contains(s.as_str()),
            Filter::NotContains(s) => !line.contains(s.as_str()),
            Filter::Matches(re) => re.find(line),
            Filter::NotMatches(re) => !re.find(line),
        })
    }
}

struct Lexer {
    chars: Vec<char>,
    at: usize,
}

impl Lexer {
    fn new(text: &str) -> Self {
        Lexer {
            chars: text.chars().collect(),
            at: 0,
        }
    }
    fn ws(&mut self) {
        while self.chars.get(self.at).is_some_and(|c| c.is_whitespace()) {
            self.at += 1;
        }
    }
    fn eat(&mut self, s: &str) -> bool {
        self.ws();
        let n = s.chars().count();
        if self.chars.len() >= self.at + n
            && self.chars[self.at..self.at + n]
                .iter()
                .copied()
                .eq(s.chars())
        {
            self.at += n;
            true
        } else {
            false
        }
    }
    fn done(&mut self) -> bool {
        self.ws();
        self.at == self.chars.len()
    }
    fn ident(&mut self) -> Result<String, String> {
        self.ws();
        let start = self.at;
        while self
            .chars
            .get(self.at)
            .is_some_and(|c| c.is_ascii_alphanumeric() || *c == '_')
        {
            self.at += 1;
        }
        if start == self.at {
            return Err("expected an identifier".into());
        }
        Ok(self.chars[start..self.at].iter().collect())
    }
    /// A Go string literal.
    fn string(&mut self) -> Result<String, String> {
        self.ws();
        let quote = self.chars.get(self.at).copied();
        self.at += 1;
        let mut out = String::new();
        match quote {
            Some('`') => loop {
                match self.chars.get(self.at).copied() {
                    Some('`') => {
                        self.at += 1;
                        return Ok(out);
                    }
                    Some(c) => {
                        out.push(c);
                        self.at += 1
                    }
                    None => return Err("unterminated string".into()),
                }
            },
            Some('"') => loop {
                let c = self.chars.get(self.at).copied();
                self.at += 1;
                match c {
                    Some('"') => return Ok(out),
                    Some('\\') => {
                        let e = self.chars.get(self.at).copied();
                        self.at += 1;
                        let hex = |lx: &mut Lexer, n: usize| -> Result<char, String> {
                            let s: String = lx.chars.iter().skip(lx.at).take(n).collect();
                            lx.at += n;
                            u32::from_str_radix(&s, 16)
                                .ok()
                                .filter(|_| s.len() == n)
                                .and_then(char::from_u32)
                                .ok_or_else(|| "invalid escape".to_string())
                        };
                        out.push(match e {
                            Some('n') => '\n',
                            Some('t') => '\t',
                            Some('r') => '\r',
                            Some('a') => '\x07',
                            Some('b') => '\x08',
                            Some('f') => '\x0c',
                            Some('v') => '\x0b',
                            Some('\\') => '\\',
                            Some('"') => '"',
                            Some('x') => hex(self, 2)?,
                            Some('u') => hex(self, 4)?,
                            Some('U') => hex(self, 8)?,
                            _ => return Err("invalid escape in string".into()),
                        });
                    }
                    Some('\n') | None => return Err("unterminated string".into()),
                    Some(c) => out.push(c),
                }
            },
            _ => Err("expected a string".into()),
        }
    }
}

fn parse_log_expr(lx: &mut Lexer) -> Result<LogQuery, String> {
    if !lx.eat("{") {
        return Err("expected '{'".into());
    }
    let mut matchers = Vec::new();
    if !lx.eat("}") {
        loop {
            let name = lx.ident()?;
            let op = if lx.eat("=~") {
                "=~"
            } else if lx.eat("!~") {
                "!~"
            } else if lx.eat("!=") {
                "!="
            } else if lx.eat("=") {
                "="
            } else {
                return Err("expected a matcher operator".into());
            };
            let value = lx.string()?;
            let op = match op {
                "=" => MatchOp::Eq,
                "!=" => MatchOp::Neq,
                "=~" => MatchOp::Re(Regex::new(&value)?),
                _ => MatchOp::Nre(Regex::new(&value)?),
            };
            matchers.push((name, op, value));
            if lx.eat(",") {
                continue;
            }
            if lx.eat("}") {
                break;
            }
            return Err("expected ',' or '}'".into());
        }
    }
    let mut filters = Vec::new();
    loop {
        let f = if lx.eat("|=") {
            Filter::Contains(lx.string()?)
        } else if lx.eat("!=") {
            Filter::NotContains(lx.string()?)
        } else if lx.eat("|~") {
            Filter::Matches(Regex::new(&lx.string()?)?)
        } else if lx.eat("!~") {
            Filter::NotMatches(Regex::new(&lx.string()?)?)
        } else {
            break;
        };
        filters.push(f);
    }
    Ok(LogQuery { matchers, filters })
}

/// Loki's LogQL parser refuses a query of this many bytes or more (`maxInputSize` in its
/// `pkg/logql/syntax/parser.go`), whatever the API it came through: queries answer 400
/// `parse error : input size too long (N > 5120)`, delete requests 400 `invalid query
/// expression`.
pub const MAX_QUERY_BYTES: usize = 5120;

fn check_size(text: &str) -> Result<(), String> {
    if text.len() >= MAX_QUERY_BYTES {
        return Err(format!(
            "input size too long ({} > {MAX_QUERY_BYTES})",
            text.len()
        ));
    }
    Ok(())
}

pub fn parse_log_query(text: &str) -> Result<LogQuery, String> {
    check_size(text)?;
    let mut lx = Lexer::new(text);
    let q = parse_log_expr(&mut lx)?;
    if !lx.done() {
        return Err("unexpected text after the log query".into());
    }
    Ok(q)
}

fn duration_ns(text: &str) -> Option<i64> {
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let n: i64 = text[..split].parse().ok()?;
    let unit = match &text[split..] {
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        "m" => 60_000_000_000,
        "h" => 3_600_000_000_000,
        "d" => 86_400_000_000_000,
        "w" => 604_800_000_000_000,
        _ => return None,
    };
    Some(n * unit)
}

/// `sum(count_over_time(LOG [D]))` or `count_over_time(LOG [D])`: (summed?, LOG, D in ns).
pub fn parse_metric_query(text: &str) -> Result<(bool, LogQuery, i64), String> {
    check_size(text)?;
    let mut lx = Lexer::new(text);
    let sum = lx.eat("sum") && {
        if !lx.eat("(") {
            return Err("expected '('".into());
        }
        true
    };
    if !lx.eat("count_over_time") || !lx.eat("(") {
        return Err("only count_over_time metric queries are supported by the double".into());
    }
    let expr = parse_log_expr(&mut lx)?;
    if !lx.eat("[") {
        return Err("expected a range".into());
    }
    lx.ws();
    let start = lx.at;
    while lx
        .chars
        .get(lx.at)
        .is_some_and(|c| c.is_ascii_alphanumeric())
    {
        lx.at += 1;
    }
    let d: String = lx.chars[start..lx.at].iter().collect();
    let range = duration_ns(&d).ok_or("invalid range")?;
    if !lx.eat("]") || !lx.eat(")") || (sum && !lx.eat(")")) || !lx.done() {
        return Err("malformed metric query".into());
    }
    Ok((sum, expr, range))
}

// ---------------------------------------------------------------------------------------
// A small RE2-subset regex engine (backtracking)
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Node {
    Lit(char),
    Any,
    Class(bool, Vec<(char, char)>),
    Start,
    End,
    WordBoundary(bool),
    Group(Vec<Vec<Node>>),
    Repeat(Box<Node>, usize, Option<usize>),
}

#[derive(Debug)]
pub struct Regex {
    alts: Vec<Vec<Node>>,
}

const DIGIT: &[(char, char)] = &[('0', '9')];
const WORDC: &[(char, char)] = &[('0', '9'), ('A', 'Z'), ('a', 'z'), ('_', '_')];
const SPACE: &[(char, char)] = &[('\t', '\n'), ('\x0c', '\r'), (' ', ' ')];

fn is_word(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

impl Regex {
    pub fn new(pattern: &str) -> Result<Regex, String> {
        let chars: Vec<char> = pattern.chars().collect();
        let mut at = 0;
        let alts = parse_alts(&chars, &mut at, false)?;
        if at != chars.len() {
            return Err("unbalanced ')' in regex".into());
        }
        Ok(Regex { alts })
    }

    /// Anywhere in `s` (a line filter).
    pub fn find(&self, s: &str) -> bool {
        let chars: Vec<char> = s.chars().collect();
        let group = [Node::Group(self.alts.clone())];
        (0..=chars.len()).any(|i| match_seq(&group, &chars, i, &mut |_| true))
    }

    /// All of `s` (a label matcher).
    pub fn full_match(&self, s: &str) -> bool {
        let chars: Vec<char> = s.chars().collect();
        let group = [Node::Group(self.alts.clone())];
        match_seq(&group, &chars, 0, &mut |j| j == chars.len())
    }
}

/// `fold`: inside `(?i)` / `(?i:…)`, letters match in either case.
fn parse_alts(p: &[char], at: &mut usize, mut fold: bool) -> Result<Vec<Vec<Node>>, String> {
    let mut alts = vec![Vec::new()];
    while let Some(&c) = p.get(*at) {
        *at += 1;
        let node = match c {
            '|' => {
                alts.push(Vec::new());
                continue;
            }
            ')' => {
                *at -= 1;
                break;
            }
            '(' => {
                let mut inner_fold = fold;
                if p.get(*at) == Some(&'?') {
                    // Of the flags, the double knows `i` only: `(?i)` to the end of the
                    // group, `(?i:…)` for the group.
                    match (p.get(*at + 1), p.get(*at + 2)) {
                        (Some(':'), _) => *at += 2,
                        (Some('i'), Some(')')) => {
                            *at += 3;
                            fold = true;
                            continue;
                        }
                        (Some('i'), Some(':')) => {
                            *at += 3;
                            inner_fold = true;
                        }
                        _ => {
                            return Err(
                                "regex flags other than i are not supported by the double".into()
                            )
                        }
                    }
                }
                let inner = parse_alts(p, at, inner_fold)?;
                if p.get(*at) != Some(&')') {
                    return Err("missing ')' in regex".into());
                }
                *at += 1;
                Node::Group(inner)
            }
            '.' => Node::Any,
            '^' => Node::Start,
            '$' => Node::End,
            '[' => parse_class(p, at)?,
            '\\' => parse_escape(p, at)?,
            '*' | '+' | '?' | '{' => {
                let last = alts.last_mut().unwrap();
                let Some(prev) = last.pop() else {
                    return Err("missing argument to repetition operator".into());
                };
                let (min, max) = match c {
                    '*' => (0, None),
                    '+' => (1, None),
                    '?' => (0, Some(1)),
                    _ => {
                        let close = p[*at..].iter().position(|&c| c == '}').ok_or("bad {")? + *at;
                        let body: String = p[*at..close].iter().collect();
                        *at = close + 1;
                        let mut it = body.splitn(2, ',');
                        let min: usize = it.next().unwrap_or("").parse().map_err(|_| "bad {")?;
                        let max = match it.next() {
                            None => Some(min),
                            Some("") => None,
                            Some(m) => Some(m.parse().map_err(|_| "bad {")?),
                        };
                        (min, max)
                    }
                };
                // A lazy `?` suffix changes nothing for match / no match.
                if p.get(*at) == Some(&'?') {
                    *at += 1;
                }
                last.push(Node::Repeat(Box::new(prev), min, max));
                continue;
            }
            c if fold && c.to_lowercase().ne(c.to_uppercase()) => {
                let mut ranges: Vec<(char, char)> = c.to_lowercase().map(|l| (l, l)).collect();
                ranges.extend(c.to_uppercase().map(|u| (u, u)));
                Node::Class(false, ranges)
            }
            c => Node::Lit(c),
        };
        alts.last_mut().unwrap().push(node);
    }
    Ok(alts)
}

fn parse_escape(p: &[char], at: &mut usize) -> Result<Node, String> {
    let c = *p.get(*at).ok_or("trailing backslash")?;
    *at += 1;
    Ok(match c {
        'd' => Node::Class(false, DIGIT.to_vec()),
        'D' => Node::Class(true, DIGIT.to_vec()),
        'w' => Node::Class(false, WORDC.to_vec()),
        'W' => Node::Class(true, WORDC.to_vec()),
        's' => Node::Class(false, SPACE.to_vec()),
        'S' => Node::Class(true, SPACE.to_vec()),
        'b' => Node::WordBoundary(true),
        'B' => Node::WordBoundary(false),
        'n' => Node::Lit('\n'),
        't' => Node::Lit('\t'),
        'r' => Node::Lit('\r'),
        c if c.is_ascii_punctuation() => Node::Lit(c),
        c => return Err(format!("invalid escape \\{c} in regex")),
    })
}

fn parse_class(p: &[char], at: &mut usize) -> Result<Node, String> {
    let negated = p.get(*at) == Some(&'^');
    if negated {
        *at += 1;
    }
    let mut items = Vec::new();
    let mut first = true;
    loop {
        let c = *p.get(*at).ok_or("missing ']' in regex")?;
        *at += 1;
        if c == ']' && !first {
            break;
        }
        first = false;
        let lo = if c == '\\' {
            match parse_escape(p, at)? {
                Node::Lit(l) => l,
                Node::Class(false, ranges) => {
                    items.extend(ranges);
                    continue;
                }
                _ => return Err("unsupported escape in class".into()),
            }
        } else {
            c
        };
        if p.get(*at) == Some(&'-') && p.get(*at + 1).is_some_and(|&c| c != ']') {
            let hi = p[*at + 1];
            *at += 2;
            items.push((lo, hi));
        } else {
            items.push((lo, lo));
        }
    }
    Ok(Node::Class(negated, items))
}

fn match_seq(nodes: &[Node], s: &[char], i: usize, k: &mut dyn FnMut(usize) -> bool) -> bool {
    let Some((first, rest)) = nodes.split_first() else {
        return k(i);
    };
    match first {
        Node::Group(alts) => alts
            .iter()
            .any(|alt| match_seq(alt, s, i, &mut |j| match_seq(rest, s, j, k))),
        Node::Repeat(node, min, max) => match_repeat(node, *min, *max, 0, rest, s, i, k),
        atom => match step(atom, s, i) {
            Some(j) => match_seq(rest, s, j, k),
            None => false,
        },
    }
}

#[allow(clippy::too_many_arguments)]
fn match_repeat(
    node: &Node,
    min: usize,
    max: Option<usize>,
    count: usize,
    rest: &[Node],
    s: &[char],
    i: usize,
    k: &mut dyn FnMut(usize) -> bool,
) -> bool {
    if max.is_none_or(|m| count < m)
        && match_seq(std::slice::from_ref(node), s, i, &mut |j| {
            j != i && match_repeat(node, min, max, count + 1, rest, s, j, k)
        })
    {
        return true;
    }
    count >= min && match_seq(rest, s, i, k)
}

fn step(atom: &Node, s: &[char], i: usize) -> Option<usize> {
    let c = s.get(i).copied();
    match atom {
        Node::Lit(l) => (c == Some(*l)).then_some(i + 1),
        Node::Any => c.filter(|&c| c != '\n').map(|_| i + 1),
        Node::Class(neg, ranges) => c
            .filter(|&c| ranges.iter().any(|&(lo, hi)| lo <= c && c <= hi) != *neg)
            .map(|_| i + 1),
        Node::Start => (i == 0).then_some(i),
        Node::End => (i == s.len()).then_some(i),
        Node::WordBoundary(want) => {
            let before = i > 0 && is_word(s[i - 1]);
            let after = c.is_some_and(is_word);
            ((before != after) == *want).then_some(i)
        }
        Node::Group(_) | Node::Repeat(..) => unreachable!("handled by match_seq"),
    }
}
