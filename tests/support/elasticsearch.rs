//! An Elasticsearch/OpenSearch test double: an in-process HTTP server on a loopback port,
//! stateful (indices of JSON documents with versions and a refresh point, index settings,
//! delete-by-query tasks), stopped on drop. It answers the calls Tombstone makes, in the
//! shapes the reference documentation gives (Elasticsearch 8.x REST APIs; OpenSearch 2.x
//! answers the same):
//!
//! - `GET /` — https://www.elastic.co/guide/en/elasticsearch/reference/current/rest-api-root.html
//!   (`version.number`; OpenSearch adds `version.distribution: "opensearch"`,
//!   https://opensearch.org/docs/latest/api-reference/)
//! - `_count` — https://www.elastic.co/guide/en/elasticsearch/reference/current/search-count.html
//! - `_search` with `size: 0`, `track_total_hits` and the `max` and `missing` aggregations —
//!   https://www.elastic.co/guide/en/elasticsearch/reference/current/search-aggregations-metrics-max-aggregation.html,
//!   .../search-aggregations-bucket-missing-aggregation.html, .../search-your-data.html#track-total-hits
//!   (without `track_total_hits: true` the total stops at 10,000 with relation `gte`)
//! - queries `match_all`, `term`, `range` (`lt`/`lte`/`gt`/`gte`, `format`), `bool`
//!   (`filter`/`must`/`must_not`/`should`) — .../query-dsl-term-query.html,
//!   .../query-dsl-range-query.html, .../query-dsl-bool-query.html; `term` here is exact, as
//!   on a `keyword` field (the double does not analyse `text` fields)
//! - `_delete_by_query?wait_for_completion=false&conflicts=proceed&slices=auto` → `{"task":
//!   "<node>:<n>"}`; the task deletes the documents of the snapshot taken at submission whose
//!   version is unchanged, counting the others as `version_conflicts` —
//!   https://www.elastic.co/guide/en/elasticsearch/reference/current/docs-delete-by-query.html
//! - `GET _tasks/<id>`: `completed: false` while running, then `completed: true` and
//!   `response: {total, deleted, version_conflicts, failures, …}`; an unknown id is 404
//!   `resource_not_found_exception` — .../tasks.html
//! - `GET _tasks?actions=*/delete/byquery&detailed=true&group_by=parents`: the running tasks
//!   by id, each with `headers` (the submission's `X-Opaque-Id`) and a `description` that
//!   names the indices only, as both real nodes answer (seen on OpenSearch 2.19.1 and
//!   Elasticsearch 7.17.29) — .../tasks.html
//! - `POST .tasks/_refresh`, `POST .tasks/_search`: see below; 404 before any result is
//!   stored, as a real node answers while `.tasks` does not exist
//! - `DELETE .tasks/_doc/<id>`: the stored result of a finished task goes (404 `not_found`
//!   for a running or unknown task), and `GET _tasks/<id>` is 404 after, as on a real node
//! - `_refresh` (documents indexed without `refresh=true` are searchable only after it) —
//!   .../indices-refresh.html
//! - `DELETE /<index>` (wildcards refused, as with `action.destructive_requires_name: true`,
//!   the 8.x default) — .../indices-delete-index.html
//! - `GET`/`PUT /<index>/_settings` with `index.blocks.write` — .../index-modules-blocks.html
//! - `GET _cat/indices/<pattern>?format=json&h=…` (values are strings) — .../cat-indices.html
//! - `GET _cat/aliases` and `GET _data_stream`: none (the double has neither) —
//!   .../cat-alias.html, .../data-stream-apis.html
//! - `PUT /<index>/_doc/<id>`, `POST /_bulk` (index actions), `PUT /<index>` — for seeding
//! - errors: `{"error": {"root_cause": [...], "type", "reason"}, "status"}`; 401
//!   `security_exception` with `WWW-Authenticate` when credentials are required and wrong.
//!
//! Where the real OpenSearch 2.19.1 and Elasticsearch 7.17.29 nodes (`support::opensearch`,
//! the same REST calls; both alike in all of these) were seen to differ from this double; the
//! double is not corrected for these yet, so a test that depends on one of them belongs on the
//! real nodes:
//!
//! - Dynamic mapping: a real node maps an unmapped string as analysed `text` with a `keyword`
//!   sub-field (`ignore_above: 256`); here strings are exact. [`EsClient::create_index`]
//!   installs a dynamic template mapping strings to `keyword`, which no real default has:
//!   scenarios seeded through it never meet the `text` case (the analysed-field refusal is
//!   tested on the real node without it).
//! - `wait_for_completion=false` stores each finished delete-by-query task as a document of
//!   the `.tasks` index; the double keeps the result with the task (`stored_task_results`
//!   counts them), answers `DELETE .tasks/_doc/<id>` alike, and searches them for
//!   `POST .tasks/_search` by `task.action` and `task.start_time_in_millis` only (the
//!   driver's search; `task.headers` is `enabled: false` in the real mapping of both, so the
//!   driver matches the `X-Opaque-Id` in the hits). `GET _tasks/<id>` of an unknown task is
//!   404 `resource_not_found_exception` on both.
//! - A task cancelled from outside: OpenSearch 2.19 completes it with
//!   `response.canceled: "by user request"` and the count so far in `response.deleted`;
//!   Elasticsearch 7.17, cancelled while it waits out its `requests_per_second` throttle,
//!   completes it with no `response` but an `error` (`search_phase_execution_exception`
//!   caused by `task_cancelled_exception`), the count so far only in `task.status.deleted`
//!   and `task.status.canceled`. The double answers a cancel the OpenSearch way and, as its
//!   tasks run no batches before they complete, with nothing deleted.
//! - A real task deletes in batches (1,000 by default) and, throttled, waits between them,
//!   so it can be met mid-way (`task.status.deleted` > 0, `completed: false`); the double's
//!   tasks do everything at the poll that completes them.
//! - Documents a task deleted stay searchable until the next refresh: a delete-by-query
//!   submitted right after meets them again and counts them as version conflicts. The
//!   double removes them at once.
//! - Version conflicts: a document updated while a real task runs (after the task's scroll
//!   read it) is counted in `version_conflicts` and left, as the double's snapshot does.
//! - `DELETE /<pattern>` with a wildcard is accepted by OpenSearch 2.x and Elasticsearch 7.x
//!   (their default is `action.destructive_requires_name: false`); the double refuses it, as
//!   Elasticsearch 8.x does by default.
//! - Indices created with the default one replica are `yellow` on a single node, and writes
//!   answer `_shards: {total: 2, successful: 1}`.
//!
//! Faults are injected per request path: any status (401, 429, 5xx, …), version conflicts and
//! bulk failures inside the next delete-by-query task(s) (the rejected documents stay, the
//! rest of the batch is deleted, and the task stops), how many polls a task stays running,
//! and a node restart that loses every running task (`lose_running_tasks`: a real node can
//! be restarted, but not between two polls of a test on demand, so this stays here).

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::Response;
use chrono::{DateTime, NaiveDate, Utc};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

const NODE: &str = "oTUltX4IQMOUUVeiohTt8A";

/// What the double presents itself as, and what credentials it requires.
#[derive(Clone, Debug)]
pub struct Options {
    pub opensearch: bool,
    pub version: String,
    /// `Authorization` header values accepted (empty: no security).
    pub accept: Vec<String>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            opensearch: false,
            version: "8.13.0".into(),
            accept: Vec::new(),
        }
    }
}

impl Options {
    pub fn basic(username: &str, password: &str) -> String {
        format!(
            "Basic {}",
            super::base64(format!("{username}:{password}").as_bytes())
        )
    }

    pub fn api_key(encoded: &str) -> String {
        format!("ApiKey {encoded}")
    }
}

#[derive(Clone, Debug)]
struct Doc {
    source: Value,
    version: u64,
    /// Searchable (indexed with refresh, or refreshed since).
    visible: bool,
}

#[derive(Clone, Debug, Default)]
struct Index {
    docs: BTreeMap<String, Doc>,
    write_block: bool,
    /// Field types given at creation (`mappings.properties`), by dotted path.
    mapped: BTreeMap<String, String>,
}

/// The dotted paths and types of a `properties` mapping.
fn flatten_properties(properties: &Value, prefix: &str, out: &mut BTreeMap<String, String>) {
    for (name, spec) in properties.as_object().into_iter().flatten() {
        let path = format!("{prefix}{name}");
        if let Some(t) = spec.get("type").and_then(Value::as_str) {
            out.insert(path.clone(), t.to_string());
        }
        for (sub, sub_spec) in spec
            .get("fields")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
        {
            if let Some(t) = sub_spec.get("type").and_then(Value::as_str) {
                out.insert(format!("{path}.{sub}"), t.to_string());
            }
        }
        if let Some(inner) = spec.get("properties") {
            flatten_properties(inner, &format!("{path}."), out);
        }
    }
}

#[derive(Clone, Debug)]
struct Task {
    index_pattern: String,
    /// (index, id, version) of the matching documents when the task started.
    snapshot: Vec<(String, String, u64)>,
    running_polls: u32,
    conflicts: u64,
    failures: u64,
    response: Option<Value>,
    start_ms: i64,
    /// The `X-Opaque-Id` header of the submission, if it had one.
    opaque_id: Option<String>,
    /// Gone from the store: a node restarted while it ran, or its stored result
    /// (`.tasks/_doc/<id>`) was deleted. `GET _tasks/<id>` answers 404.
    gone: bool,
}

/// One request as the double received it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    /// Percent-decoded path.
    pub path: String,
    pub query: BTreeMap<String, String>,
    pub body: String,
}

#[derive(Debug)]
struct Fault {
    path_contains: String,
    status: u16,
    times: u32,
}

#[derive(Default)]
struct State {
    indices: BTreeMap<String, Index>,
    tasks: BTreeMap<String, Task>,
    next_task: u64,
    next_id: u64,
    running_polls: u32,
    conflicts_next_task: u64,
    failures_next_task: u64,
    /// How many tasks after the next one fail the same way.
    failing_tasks_after: u32,
    faults: VecDeque<Fault>,
    /// Documents a concurrent writer indexes (not yet searchable) right after the next
    /// request whose path contains the key: (path part, index, id, source).
    writes_after: Vec<(String, String, String, Value)>,
    requests: Vec<Recorded>,
    /// Tasks cancelled through `_tasks/<id>/_cancel`.
    cancelled_tasks: usize,
}

pub struct EsDouble {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: CancellationToken,
}

impl Drop for EsDouble {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

type Answer = (StatusCode, Value);

fn error(status: u16, kind: &str, reason: &str) -> Answer {
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        json!({"error": {"root_cause": [{"type": kind, "reason": reason}], "type": kind, "reason": reason}, "status": status}),
    )
}

impl EsDouble {
    pub async fn start() -> EsDouble {
        Self::start_with(Options::default()).await
    }

    pub async fn start_with(options: Options) -> EsDouble {
        let state = Arc::new(Mutex::new(State {
            running_polls: 1,
            ..Default::default()
        }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port");
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let app_state = state.clone();
        let app = axum::Router::new().fallback(move |request: Request| {
            let state = app_state.clone();
            let options = options.clone();
            async move { handle(state, options, request).await }
        });
        let stopped = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { stopped.cancelled().await })
                .await;
        });
        EsDouble { addr, state, stop }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Indexes documents, searchable at once (as with `refresh=true`).
    pub fn seed(&self, index: &str, docs: &[(&str, Value)]) {
        let mut state = self.state();
        let idx = state.indices.entry(index.to_string()).or_default();
        for (id, source) in docs {
            put_doc(idx, id, source.clone(), true);
        }
    }

    /// Indexes a document that is not searchable until the next refresh of its index.
    pub fn seed_unrefreshed(&self, index: &str, id: &str, source: Value) {
        let mut state = self.state();
        let idx = state.indices.entry(index.to_string()).or_default();
        put_doc(idx, id, source, false);
    }

    /// Rewrites a document (its version goes up), as a concurrent writer would.
    pub fn update(&self, index: &str, id: &str, source: Value) {
        let mut state = self.state();
        let idx = state.indices.entry(index.to_string()).or_default();
        put_doc(idx, id, source, true);
    }

    pub fn indices(&self) -> Vec<String> {
        self.state().indices.keys().cloned().collect()
    }

    /// Ids of the documents in an index (searchable or not), sorted.
    pub fn ids(&self, index: &str) -> Vec<String> {
        self.state()
            .indices
            .get(index)
            .map(|i| i.docs.keys().cloned().collect())
            .unwrap_or_default()
    }

    pub fn write_blocked(&self, index: &str) -> bool {
        self.state()
            .indices
            .get(index)
            .is_some_and(|i| i.write_block)
    }

    pub fn set_write_block(&self, index: &str, on: bool) {
        if let Some(i) = self.state().indices.get_mut(index) {
            i.write_block = on;
        }
    }

    /// The next `times` requests whose path contains `path_contains` answer `status`.
    pub fn fail(&self, path_contains: &str, status: u16, times: u32) {
        self.state().faults.push_back(Fault {
            path_contains: path_contains.into(),
            status,
            times,
        });
    }

    /// Right after the next request whose path contains `path_contains` is answered, a
    /// concurrent writer indexes a document (not yet searchable; refused by a write block).
    pub fn write_during_next(&self, path_contains: &str, index: &str, id: &str, source: Value) {
        self.state()
            .writes_after
            .push((path_contains.into(), index.into(), id.into(), source));
    }

    /// How many polls a new task answers `completed: false` before it completes.
    pub fn set_running_polls(&self, polls: u32) {
        self.state().running_polls = polls;
    }

    /// Every task still running completes at its next poll.
    pub fn complete_tasks(&self) {
        let mut state = self.state();
        state.running_polls = 0;
        state.tasks.values_mut().for_each(|t| t.running_polls = 0);
    }

    /// The next task finds `n` of its documents changed (version conflicts): they stay.
    pub fn inject_version_conflicts(&self, n: u64) {
        self.state().conflicts_next_task = n;
    }

    /// The next task's first bulk request fails for `n` documents and the task aborts.
    pub fn inject_task_failures(&self, n: u64) {
        self.state().failures_next_task = n;
    }

    /// The next `tasks` tasks each fail for `n` documents, as [`inject_task_failures`].
    pub fn inject_failing_tasks(&self, tasks: u32, n: u64) {
        let mut state = self.state();
        state.failures_next_task = n;
        state.failing_tasks_after = tasks.saturating_sub(1);
    }

    /// A node restart: every task still running is forgotten without finishing (nothing
    /// more deleted) and `GET _tasks/<id>` answers 404 for it, as a real node does.
    pub fn lose_running_tasks(&self) {
        for t in self.state().tasks.values_mut() {
            if t.response.is_none() {
                t.gone = true;
            }
        }
    }

    /// Finished tasks whose stored result (the `.tasks` document) is still there.
    pub fn stored_task_results(&self) -> usize {
        self.state()
            .tasks
            .values()
            .filter(|t| t.response.is_some() && !t.gone)
            .count()
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state().requests.clone()
    }

    pub fn clear_requests(&self) {
        self.state().requests.clear();
    }

    /// Tasks submitted so far.
    pub fn task_count(&self) -> usize {
        self.state().tasks.len()
    }

    pub fn cancelled_tasks(&self) -> usize {
        self.state().cancelled_tasks
    }
}

fn put_doc(index: &mut Index, id: &str, source: Value, visible: bool) {
    let version = index.docs.get(id).map_or(1, |d| d.version + 1);
    index.docs.insert(
        id.to_string(),
        Doc {
            source,
            version,
            visible,
        },
    );
}

fn percent_decode(s: &str) -> String {
    url::form_urlencoded::parse(format!("x={}", s.replace('+', "%2B")).as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

async fn handle(state: Arc<Mutex<State>>, options: Options, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, 64 << 20)
        .await
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let segments: Vec<String> = parts
        .uri
        .path()
        .split('/')
        .filter(|s| !s.is_empty())
        .map(percent_decode)
        .collect();
    let query: BTreeMap<String, String> = parts
        .uri
        .query()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default();
    let path = format!("/{}", segments.join("/"));
    let (status, value) = {
        let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
        state.requests.push(Recorded {
            method: parts.method.to_string(),
            path: path.clone(),
            query: query.clone(),
            body: body.clone(),
        });
        let answered = answer(
            &mut state,
            &options,
            &parts.method,
            &parts.headers,
            &segments,
            &path,
            &query,
            &body,
        );
        if let Some(i) = state.writes_after.iter().position(|w| path.contains(&w.0)) {
            let (_, index, id, source) = state.writes_after.remove(i);
            let idx = state.indices.entry(index).or_default();
            if !idx.write_block {
                put_doc(idx, &id, source, false);
            }
        }
        answered
    };
    let mut response = Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("X-elastic-product", "Elasticsearch");
    if status == StatusCode::UNAUTHORIZED {
        response = response.header(
            "WWW-Authenticate",
            "Basic realm=\"security\" charset=\"UTF-8\"",
        );
    }
    response
        .body(Body::from(value.to_string()))
        .unwrap_or_default()
}

#[allow(clippy::too_many_arguments)]
fn answer(
    state: &mut State,
    options: &Options,
    method: &Method,
    headers: &HeaderMap,
    segments: &[String],
    path: &str,
    query: &BTreeMap<String, String>,
    body: &str,
) -> Answer {
    if !options.accept.is_empty() {
        let given = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if given.is_empty() {
            return error(
                401,
                "security_exception",
                &format!("missing authentication credentials for REST request [{path}]"),
            );
        }
        if !options.accept.iter().any(|a| a == given) {
            return error(
                401,
                "security_exception",
                &format!("unable to authenticate user for REST request [{path}]"),
            );
        }
    }
    if let Some(fault) = state
        .faults
        .iter_mut()
        .find(|f| f.times > 0 && path.contains(&f.path_contains))
    {
        fault.times -= 1;
        let status = fault.status;
        state.faults.retain(|f| f.times > 0);
        return match status {
            401 => error(401, "security_exception", "unable to authenticate user"),
            403 => error(403, "security_exception", "action is unauthorized for user"),
            429 => error(
                429,
                "es_rejected_execution_exception",
                "rejected execution of coordinating operation",
            ),
            503 => error(
                503,
                "cluster_block_exception",
                "blocked by: [SERVICE_UNAVAILABLE/1/state not recovered / initialized];",
            ),
            s => error(s, "exception", "injected failure"),
        };
    }
    let body: Value = if body.trim().is_empty() {
        Value::Null
    } else if segments.last().is_some_and(|s| s == "_bulk") {
        Value::String(body.to_string())
    } else {
        match serde_json::from_str(body) {
            Ok(v) => v,
            Err(e) => {
                return error(
                    400,
                    "parse_exception",
                    &format!("request body is not JSON: {e}"),
                )
            }
        }
    };
    let seg: Vec<&str> = segments.iter().map(String::as_str).collect();
    let m = method.as_str();
    match (m, seg.as_slice()) {
        ("GET", []) => root(options),
        ("POST", ["_bulk"]) => bulk(state, None, &body, query),
        ("POST" | "PUT", [index, "_bulk"]) => bulk(state, Some(index), &body, query),
        ("GET", ["_tasks"]) => list_tasks(state, query),
        ("GET", ["_tasks", id]) => task(state, id),
        ("GET" | "POST", [".tasks", "_refresh"]) if stored_results(state) > 0 => (
            StatusCode::OK,
            json!({"_shards": {"total": 1, "successful": 1, "failed": 0}}),
        ),
        ("GET" | "POST", [".tasks", "_search"]) if stored_results(state) > 0 => {
            search_stored_tasks(state, &body)
        }
        ("DELETE", [".tasks", "_doc", id]) => forget_task(state, id),
        ("POST", ["_tasks", id, "_cancel"]) => cancel_task(state, id),
        ("GET", ["_cat", "indices"]) => cat_indices(state, "*", query),
        ("GET", ["_cat", "indices", pattern]) => cat_indices(state, pattern, query),
        // The double has no aliases and no data streams.
        ("GET", ["_cat", "aliases"]) => (StatusCode::OK, json!([])),
        ("GET", ["_data_stream"]) => (StatusCode::OK, json!({"data_streams": []})),
        ("GET" | "POST", [pattern, "_refresh"]) => match resolve(state, pattern, query) {
            Ok(names) => {
                for n in &names {
                    if let Some(i) = state.indices.get_mut(n) {
                        i.docs.values_mut().for_each(|d| d.visible = true);
                    }
                }
                (
                    StatusCode::OK,
                    json!({"_shards": {"total": names.len() * 2, "successful": names.len(), "failed": 0}}),
                )
            }
            Err(e) => e,
        },
        ("GET" | "POST", [pattern, "_count"]) => count(state, pattern, query, &body),
        ("GET" | "POST", [pattern, "_search"]) => search(state, pattern, query, &body),
        ("POST", [pattern, "_delete_by_query"]) => {
            let opaque_id = headers
                .get("x-opaque-id")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            delete_by_query(state, pattern, query, &body, opaque_id)
        }
        ("GET", [index, "_settings"]) => get_settings(state, index),
        ("GET", [pattern, "_mapping", "field", fields]) => {
            field_mapping(state, pattern, fields, query)
        }
        ("PUT", [index, "_settings"]) => put_settings(state, index, &body),
        ("PUT" | "POST", [index, "_doc", id]) | ("PUT" | "POST", [index, "_create", id]) => {
            index_doc(state, index, Some(id), body, query)
        }
        ("POST", [index, "_doc"]) => index_doc(state, index, None, body, query),
        ("PUT", [index]) => {
            if state.indices.contains_key(*index) {
                error(
                    400,
                    "resource_already_exists_exception",
                    &format!("index [{index}] already exists"),
                )
            } else {
                let mut created = Index::default();
                if let Some(p) = body.pointer("/mappings/properties") {
                    flatten_properties(p, "", &mut created.mapped);
                }
                state.indices.insert(index.to_string(), created);
                (
                    StatusCode::OK,
                    json!({"acknowledged": true, "shards_acknowledged": true, "index": index}),
                )
            }
        }
        ("DELETE", [index]) => {
            if index.contains('*') || index.contains(',') || *index == "_all" {
                return error(
                    400,
                    "illegal_argument_exception",
                    "Wildcard expressions or all indices are not allowed",
                );
            }
            if state.indices.remove(*index).is_some() {
                (StatusCode::OK, json!({"acknowledged": true}))
            } else {
                error(
                    404,
                    "index_not_found_exception",
                    &format!("no such index [{index}]"),
                )
            }
        }
        _ => error(
            400,
            "illegal_argument_exception",
            &format!("no handler found for uri [{path}] and method [{m}]"),
        ),
    }
}

fn root(options: &Options) -> Answer {
    let mut version = json!({
        "number": options.version, "build_type": "docker", "build_hash": "0000000",
        "build_date": "2024-03-22T03:35:46.757803203Z", "build_snapshot": false,
        "lucene_version": "9.10.0", "minimum_wire_compatibility_version": "7.17.0",
        "minimum_index_compatibility_version": "7.0.0"
    });
    if options.opensearch {
        version["distribution"] = json!("opensearch");
    } else {
        version["build_flavor"] = json!("default");
    }
    (
        StatusCode::OK,
        json!({
            "name": "node-1", "cluster_name": "double", "cluster_uuid": "kB0pM8vKQTyRLo1rr8XxKA",
            "version": version,
            "tagline": if options.opensearch { "The OpenSearch Project: https://opensearch.org/" } else { "You Know, for Search" }
        }),
    )
}

fn glob(pattern: &str, text: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == text,
        Some((head, rest)) => {
            let Some(tail) = text.strip_prefix(head) else {
                return false;
            };
            (0..=tail.len())
                .filter(|&i| tail.is_char_boundary(i))
                .any(|i| glob(rest, &tail[i..]))
        }
    }
}

/// The indices a multi-index expression names, in order of appearance.
fn resolve(
    state: &State,
    pattern: &str,
    query: &BTreeMap<String, String>,
) -> Result<Vec<String>, Answer> {
    let ignore_unavailable = query.get("ignore_unavailable").is_some_and(|v| v == "true");
    let mut names: Vec<String> = Vec::new();
    for part in pattern.split(',') {
        if let Some(excluded) = part.strip_prefix('-') {
            names.retain(|n| !glob(excluded, n));
        } else if part == "_all" || part.contains('*') {
            let p = if part == "_all" { "*" } else { part };
            for n in state
                .indices
                .keys()
                .filter(|n| glob(p, n) && !n.starts_with('.'))
            {
                if !names.contains(n) {
                    names.push(n.clone());
                }
            }
        } else if state.indices.contains_key(part) {
            if !names.iter().any(|n| n == part) {
                names.push(part.to_string());
            }
        } else if !ignore_unavailable {
            return Err(error(
                404,
                "index_not_found_exception",
                &format!("no such index [{part}]"),
            ));
        }
    }
    Ok(names)
}

fn cat_indices(state: &State, pattern: &str, query: &BTreeMap<String, String>) -> Answer {
    let names = match resolve(state, pattern, query) {
        Ok(n) => n,
        Err(e) => return e,
    };
    let columns: Vec<String> = query
        .get("h")
        .map(|h| h.split(',').map(str::to_string).collect())
        .unwrap_or_else(|| {
            [
                "health",
                "status",
                "index",
                "uuid",
                "pri",
                "rep",
                "docs.count",
                "docs.deleted",
                "store.size",
                "pri.store.size",
            ]
            .map(str::to_string)
            .to_vec()
        });
    let rows: Vec<Value> = names
        .iter()
        .map(|n| {
            let index = &state.indices[n];
            let visible = index.docs.values().filter(|d| d.visible).count();
            let all = json!({
                "health": "yellow", "status": "open", "index": n, "uuid": format!("uuid-{n}"),
                "pri": "1", "rep": "1", "docs.count": visible.to_string(), "docs.deleted": "0",
                "store.size": "1kb", "pri.store.size": "1kb"
            });
            let row: serde_json::Map<String, Value> = columns
                .iter()
                .filter_map(|c| all.get(c).map(|v| (c.clone(), v.clone())))
                .collect();
            Value::Object(row)
        })
        .collect();
    if query.get("format").map(String::as_str) == Some("json") {
        (StatusCode::OK, Value::Array(rows))
    } else {
        error(
            400,
            "illegal_argument_exception",
            "the double answers _cat only with format=json",
        )
    }
}

/// The values at a field path: a literal key first, then the dotted path; arrays are
/// flattened.
fn field_values<'a>(source: &'a Value, field: &str) -> Vec<&'a Value> {
    fn flatten<'a>(v: &'a Value, out: &mut Vec<&'a Value>) {
        match v {
            Value::Array(items) => items.iter().for_each(|i| flatten(i, out)),
            Value::Null => {}
            v => out.push(v),
        }
    }
    let mut out = Vec::new();
    // A `.keyword` multi-field holds the value of its parent field.
    if let Some(parent) = field.strip_suffix(".keyword") {
        if source.get(field).is_none() {
            let values = field_values(source, parent);
            if !values.is_empty() {
                return values;
            }
        }
    }
    if let Some(v) = source.get(field) {
        flatten(v, &mut out);
        return out;
    }
    if let Some((head, rest)) = field.split_once('.') {
        if let Some(inner) = source.get(head) {
            match inner {
                Value::Array(items) => {
                    for i in items {
                        out.extend(field_values(i, rest));
                    }
                }
                v => out.extend(field_values(v, rest)),
            }
        }
    }
    out
}

/// A date as epoch milliseconds: a number (epoch_millis), RFC 3339, or a plain date.
fn date_ms(v: &Value, format: Option<&str>) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) if format == Some("epoch_millis") => s.parse().ok(),
        Value::String(s) => DateTime::parse_from_rfc3339(s)
            .map(|d| d.with_timezone(&Utc).timestamp_millis() as f64)
            .ok()
            .or_else(|| {
                NaiveDate::parse_from_str(s, "%Y-%m-%d")
                    .ok()
                    .and_then(|d| d.and_hms_opt(0, 0, 0))
                    .map(|d| d.and_utc().timestamp_millis() as f64)
            }),
        _ => None,
    }
}

fn matches(q: &Value, source: &Value) -> Result<bool, Answer> {
    let Some((kind, spec)) = q
        .as_object()
        .filter(|o| o.len() == 1)
        .and_then(|o| o.iter().next())
    else {
        return Err(error(
            400,
            "parsing_exception",
            "a query must be an object with one key",
        ));
    };
    match kind.as_str() {
        "match_all" => Ok(true),
        "term" => {
            let Some((field, v)) = spec
                .as_object()
                .filter(|o| o.len() == 1)
                .and_then(|o| o.iter().next())
            else {
                return Err(error(
                    400,
                    "parsing_exception",
                    "[term] query malformed, no start_object after query name",
                ));
            };
            let wanted = v.get("value").unwrap_or(v);
            if wanted.is_object() || wanted.is_array() {
                return Err(error(
                    400,
                    "parsing_exception",
                    "[term] query does not support objects or arrays as value",
                ));
            }
            // `case_insensitive` (Elasticsearch 7.10+, OpenSearch 1.0+; older Elasticsearch
            // answers 400 "[term] query does not support [case_insensitive]"): string values
            // compared without case. The double takes a JSON boolean only.
            let fold = match v.get("case_insensitive") {
                None => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => {
                    return Err(error(
                        400,
                        "parsing_exception",
                        "[term] query [case_insensitive] must be a boolean",
                    ))
                }
            };
            Ok(field_values(source, field).into_iter().any(|have| {
                have == wanted
                    || matches!((have, wanted), (Value::String(h), Value::String(w)) if fold && h.to_lowercase() == w.to_lowercase())
                    || matches!((have, wanted), (Value::Number(n), Value::String(w)) if w.parse::<f64>().ok() == n.as_f64())
            }))
        }
        "range" => {
            let Some((field, bounds)) = spec
                .as_object()
                .filter(|o| o.len() == 1)
                .and_then(|o| o.iter().next())
            else {
                return Err(error(400, "parsing_exception", "[range] query malformed"));
            };
            let format = bounds.get("format").and_then(Value::as_str);
            let mut checks = Vec::new();
            for (op, bound) in bounds.as_object().into_iter().flatten() {
                if op == "format" {
                    continue;
                }
                let Some(b) = date_ms(bound, format) else {
                    return Err(error(
                        400,
                        "parse_exception",
                        &format!("failed to parse date field [{bound}]"),
                    ));
                };
                match op.as_str() {
                    "lt" | "lte" | "gt" | "gte" => checks.push((op.clone(), b)),
                    _ => {
                        return Err(error(
                            400,
                            "parsing_exception",
                            &format!("[range] query does not support [{op}]"),
                        ))
                    }
                }
            }
            Ok(field_values(source, field)
                .into_iter()
                .filter_map(|v| date_ms(v, None))
                .any(|t| {
                    checks.iter().all(|(op, b)| match op.as_str() {
                        "lt" => t < *b,
                        "lte" => t <= *b,
                        "gt" => t > *b,
                        _ => t >= *b,
                    })
                }))
        }
        "bool" => {
            let list = |k: &str| -> Vec<Value> {
                match spec.get(k) {
                    Some(Value::Array(a)) => a.clone(),
                    Some(v) => vec![v.clone()],
                    None => vec![],
                }
            };
            for k in spec.as_object().into_iter().flatten().map(|(k, _)| k) {
                if ![
                    "filter",
                    "must",
                    "must_not",
                    "should",
                    "minimum_should_match",
                ]
                .contains(&k.as_str())
                {
                    return Err(error(
                        400,
                        "parsing_exception",
                        &format!("[bool] query does not support [{k}]"),
                    ));
                }
            }
            for q in list("filter").iter().chain(list("must").iter()) {
                if !matches(q, source)? {
                    return Ok(false);
                }
            }
            for q in list("must_not") {
                if matches(&q, source)? {
                    return Ok(false);
                }
            }
            let should = list("should");
            if !should.is_empty() && list("filter").is_empty() && list("must").is_empty() {
                for q in &should {
                    if matches(q, source)? {
                        return Ok(true);
                    }
                }
                return Ok(false);
            }
            Ok(true)
        }
        other => Err(error(
            400,
            "parsing_exception",
            &format!("unknown query [{other}]"),
        )),
    }
}

/// The searchable documents of the expression matching the body's query: (index, id, doc).
fn matching<'a>(
    state: &'a State,
    pattern: &str,
    query: &BTreeMap<String, String>,
    body: &Value,
) -> Result<Vec<(String, &'a String, &'a Doc)>, Answer> {
    let names = resolve(state, pattern, query)?;
    let q = body
        .get("query")
        .cloned()
        .unwrap_or(json!({"match_all": {}}));
    let mut out = Vec::new();
    for n in names {
        for (id, doc) in &state.indices[&n].docs {
            if doc.visible && matches(&q, &doc.source)? {
                out.push((n.clone(), id, doc));
            }
        }
    }
    Ok(out)
}

fn count(state: &State, pattern: &str, query: &BTreeMap<String, String>, body: &Value) -> Answer {
    match matching(state, pattern, query, body) {
        Ok(docs) => (
            StatusCode::OK,
            json!({"count": docs.len(), "_shards": {"total": 1, "successful": 1, "skipped": 0, "failed": 0}}),
        ),
        Err(e) => e,
    }
}

fn search(state: &State, pattern: &str, query: &BTreeMap<String, String>, body: &Value) -> Answer {
    let docs = match matching(state, pattern, query, body) {
        Ok(d) => d,
        Err(e) => return e,
    };
    let total = docs.len();
    let (value, relation) =
        if body.get("track_total_hits") == Some(&Value::Bool(true)) || total <= 10_000 {
            (total, "eq")
        } else {
            (10_000, "gte")
        };
    let size = body.get("size").and_then(Value::as_u64).unwrap_or(10) as usize;
    let hits: Vec<Value> = docs
        .iter()
        .take(size)
        .map(|(index, id, doc)| json!({"_index": index, "_id": id, "_score": 1.0, "_source": doc.source}))
        .collect();
    let mut aggregations = serde_json::Map::new();
    for (name, agg) in body
        .get("aggs")
        .or_else(|| body.get("aggregations"))
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
    {
        if let Some(field) = agg.pointer("/max/field").and_then(Value::as_str) {
            let max = docs
                .iter()
                .flat_map(|(_, _, d)| field_values(&d.source, field))
                .filter_map(|v| date_ms(v, None))
                .fold(None, |m: Option<f64>, t| Some(m.map_or(t, |m| m.max(t))));
            let mut out = json!({"value": max});
            if let Some(m) = max {
                if let Some(t) = DateTime::from_timestamp_millis(m as i64) {
                    out["value_as_string"] =
                        json!(t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
                }
            }
            aggregations.insert(name.clone(), out);
        } else if let Some(field) = agg.pointer("/min/field").and_then(Value::as_str) {
            let min = docs
                .iter()
                .flat_map(|(_, _, d)| field_values(&d.source, field))
                .filter_map(|v| date_ms(v, None))
                .fold(None, |m: Option<f64>, t| Some(m.map_or(t, |m| m.min(t))));
            let mut out = json!({"value": min});
            if let Some(m) = min {
                if let Some(t) = DateTime::from_timestamp_millis(m as i64) {
                    out["value_as_string"] =
                        json!(t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
                }
            }
            aggregations.insert(name.clone(), out);
        } else if let Some(field) = agg.pointer("/missing/field").and_then(Value::as_str) {
            let n = docs
                .iter()
                .filter(|(_, _, d)| field_values(&d.source, field).is_empty())
                .count();
            aggregations.insert(name.clone(), json!({"doc_count": n}));
        } else {
            return error(
                400,
                "parsing_exception",
                &format!("the double knows only max, min and missing aggregations, not {agg}"),
            );
        }
    }
    let mut answer = json!({
        "took": 1, "timed_out": false,
        "_shards": {"total": 1, "successful": 1, "skipped": 0, "failed": 0},
        "hits": {"total": {"value": value, "relation": relation}, "max_score": null, "hits": hits}
    });
    if !aggregations.is_empty() {
        answer["aggregations"] = Value::Object(aggregations);
    }
    (StatusCode::OK, answer)
}

fn delete_by_query(
    state: &mut State,
    pattern: &str,
    query: &BTreeMap<String, String>,
    body: &Value,
    opaque_id: Option<String>,
) -> Answer {
    if body.get("query").is_none() {
        return error(
            400,
            "action_request_validation_exception",
            "Validation Failed: 1: query is missing;",
        );
    }
    let snapshot: Vec<(String, String, u64)> = match matching(state, pattern, query, body) {
        Ok(docs) => docs
            .into_iter()
            .map(|(i, id, d)| (i, id.clone(), d.version))
            .collect(),
        Err(e) => return e,
    };
    state.next_task += 1;
    let id = format!("{NODE}:{}", 1000 + state.next_task);
    let task = Task {
        index_pattern: pattern.to_string(),
        snapshot,
        running_polls: state.running_polls,
        conflicts: std::mem::take(&mut state.conflicts_next_task),
        failures: std::mem::take(&mut state.failures_next_task),
        response: None,
        start_ms: Utc::now().timestamp_millis(),
        opaque_id,
        gone: false,
    };
    if task.failures > 0 && state.failing_tasks_after > 0 {
        state.failing_tasks_after -= 1;
        state.failures_next_task = task.failures;
    }
    let proceed = query.get("conflicts").map(String::as_str) == Some("proceed");
    state.tasks.insert(id.clone(), task);
    if query.get("wait_for_completion").map(String::as_str) != Some("false") {
        // Synchronous: run to the end now and answer with the response itself.
        let response = finish(state, &id, proceed);
        return (StatusCode::OK, response);
    }
    (StatusCode::OK, json!({"task": id}))
}

/// Runs a task to its end: documents unchanged since the snapshot are deleted.
fn finish(state: &mut State, id: &str, proceed: bool) -> Value {
    let Some(task) = state.tasks.get(id).cloned() else {
        return Value::Null;
    };
    let (mut deleted, mut conflicts) = (0u64, 0u64);
    let mut failures = Vec::new();
    let mut injected_conflicts = task.conflicts;
    if task.failures > 0 {
        // One bulk request: its first items are rejected, the others go; then the task stops.
        for (i, (index, doc_id, version)) in task.snapshot.iter().enumerate() {
            if i < task.failures as usize {
                failures.push(json!({"index": index, "id": doc_id, "cause": {"type": "es_rejected_execution_exception",
                    "reason": format!("rejected execution of delete of [{doc_id}]")}, "status": 429}));
            } else if let Some(idx) = state.indices.get_mut(index) {
                if idx.docs.get(doc_id).is_some_and(|d| d.version == *version) {
                    idx.docs.remove(doc_id);
                    deleted += 1;
                }
            }
        }
    } else {
        for (index, doc_id, version) in &task.snapshot {
            let Some(idx) = state.indices.get_mut(index) else {
                conflicts += 1;
                continue;
            };
            if idx.write_block {
                failures.push(json!({"index": index, "id": doc_id, "cause": {"type": "cluster_block_exception",
                    "reason": format!("index [{index}] blocked by: [FORBIDDEN/8/index write (api)];")}, "status": 403}));
                continue;
            }
            let unchanged = idx.docs.get(doc_id).is_some_and(|d| d.version == *version);
            if injected_conflicts > 0 || !unchanged {
                injected_conflicts = injected_conflicts.saturating_sub(1);
                conflicts += 1;
                if !proceed {
                    failures.push(json!({"index": index, "id": doc_id, "cause": {"type": "version_conflict_engine_exception",
                        "reason": format!("[{doc_id}]: version conflict")}, "status": 409}));
                    break;
                }
                continue;
            }
            idx.docs.remove(doc_id);
            deleted += 1;
        }
    }
    let took = (Utc::now().timestamp_millis() - task.start_ms).max(0);
    let response = json!({
        "took": took, "timed_out": false, "total": task.snapshot.len(), "deleted": deleted,
        "batches": 1, "version_conflicts": conflicts, "noops": 0,
        "retries": {"bulk": 0, "search": 0}, "throttled_millis": 0, "requests_per_second": -1.0,
        "throttled_until_millis": 0, "failures": failures
    });
    if let Some(t) = state.tasks.get_mut(id) {
        t.response = Some(response.clone());
    }
    response
}

fn task(state: &mut State, id: &str) -> Answer {
    let Some(t) = state.tasks.get_mut(id).filter(|t| !t.gone) else {
        return error(
            404,
            "resource_not_found_exception",
            &format!("task [{id}] isn't running and hasn't stored its results"),
        );
    };
    if t.response.is_none() && t.running_polls > 0 {
        t.running_polls -= 1;
        let running = task_info(id, t, 0);
        return (StatusCode::OK, json!({"completed": false, "task": running}));
    }
    if t.response.is_none() {
        finish(state, id, true);
    }
    let t = &state.tasks[id];
    let response = t.response.clone().unwrap_or(Value::Null);
    let deleted = response.get("deleted").and_then(Value::as_u64).unwrap_or(0);
    (
        StatusCode::OK,
        json!({"completed": true, "task": task_info(id, t, deleted), "response": response}),
    )
}

/// A task as `_tasks` shows it (and `.tasks` stores it): the description names the indices,
/// not the query (as on OpenSearch 2.19 and Elasticsearch 7.17); the headers hold the
/// submission's `X-Opaque-Id`.
fn task_info(id: &str, t: &Task, deleted: u64) -> Value {
    let headers = match &t.opaque_id {
        Some(o) => json!({"X-Opaque-Id": o}),
        None => json!({}),
    };
    json!({
        "node": NODE, "id": id.rsplit(':').next().and_then(|n| n.parse::<u64>().ok()).unwrap_or(0),
        "type": "transport", "action": "indices:data/write/delete/byquery",
        "status": {"total": t.snapshot.len(), "updated": 0, "created": 0, "deleted": deleted, "batches": 1,
                    "version_conflicts": 0, "noops": 0, "retries": {"bulk": 0, "search": 0},
                    "throttled_millis": 0, "requests_per_second": -1.0, "throttled_until_millis": 0},
        "description": format!("delete-by-query [{}]", t.index_pattern),
        "start_time_in_millis": t.start_ms,
        "running_time_in_nanos": 1_000_000, "cancellable": true, "cancelled": false, "headers": headers
    })
}

/// Finished tasks whose result is stored (the documents of `.tasks`; the index exists once
/// the first is stored: before, `.tasks/_search` is 404 `index_not_found_exception`).
fn stored_results(state: &State) -> usize {
    state
        .tasks
        .values()
        .filter(|t| t.response.is_some() && !t.gone)
        .count()
}

/// `GET _tasks?actions=*/delete/byquery&detailed=true&group_by=parents`: the running tasks
/// (the double's tasks have no slices, so every one is a parent), by id.
fn list_tasks(state: &State, query: &BTreeMap<String, String>) -> Answer {
    if query.get("group_by").map(String::as_str) != Some("parents")
        || query.get("detailed").map(String::as_str) != Some("true")
    {
        return error(
            400,
            "illegal_argument_exception",
            "the double lists tasks only with detailed=true&group_by=parents",
        );
    }
    let tasks: serde_json::Map<String, Value> = state
        .tasks
        .iter()
        .filter(|(_, t)| t.response.is_none() && !t.gone)
        .map(|(id, t)| (id.clone(), task_info(id, t, 0)))
        .collect();
    (StatusCode::OK, json!({"tasks": tasks}))
}

/// `POST .tasks/_search` as the driver sends it: a `term` on `task.action` and a `range`
/// (`gte`) on `task.start_time_in_millis` in a bool filter, sorted by start time, node and
/// id, `size` and `search_after`. `headers` are stored, not indexed (`enabled: false` in the
/// real mapping): a query on them is refused here, where a real node would match nothing.
fn search_stored_tasks(state: &State, body: &Value) -> Answer {
    let filters = body
        .pointer("/query/bool/filter")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let (mut action, mut since) = (None, i64::MIN);
    for f in &filters {
        if let Some(a) = f.pointer("/term/task.action").and_then(Value::as_str) {
            action = Some(a.to_string());
        } else if let Some(gte) = f
            .pointer("/range/task.start_time_in_millis/gte")
            .and_then(Value::as_i64)
        {
            since = gte;
        } else {
            return error(
                400,
                "parsing_exception",
                &format!("the double searches .tasks only by task.action and task.start_time_in_millis, not {f}"),
            );
        }
    }
    let size = body.get("size").and_then(Value::as_u64).unwrap_or(10) as usize;
    let after = body
        .get("search_after")
        .and_then(Value::as_array)
        .and_then(|a| Some((a.first()?.as_i64()?, a.get(2)?.as_u64()?)));
    let mut hits: Vec<(i64, u64, Value)> = state
        .tasks
        .iter()
        .filter(|(_, t)| t.response.is_some() && !t.gone)
        .filter(|_| {
            action
                .as_deref()
                .is_none_or(|a| a == "indices:data/write/delete/byquery")
        })
        .filter(|(_, t)| t.start_ms >= since)
        .map(|(id, t)| {
            let deleted = t
                .response
                .as_ref()
                .and_then(|r| r.get("deleted"))
                .and_then(Value::as_u64)
                .unwrap_or(0);
            let info = task_info(id, t, deleted);
            let n = info["id"].as_u64().unwrap_or(0);
            let hit = json!({"_index": ".tasks", "_id": id, "_score": null,
                "_source": {"completed": true, "task": info, "response": t.response},
                "sort": [t.start_ms, NODE, n]});
            (t.start_ms, n, hit)
        })
        .filter(|(ms, n, _)| after.is_none_or(|a| (*ms, *n) > a))
        .collect();
    hits.sort_by_key(|(ms, n, _)| (*ms, *n));
    let total = hits.len();
    let page: Vec<Value> = hits.into_iter().take(size).map(|(_, _, h)| h).collect();
    (
        StatusCode::OK,
        json!({"took": 1, "timed_out": false,
            "_shards": {"total": 1, "successful": 1, "skipped": 0, "failed": 0},
            "hits": {"total": {"value": total, "relation": "eq"}, "max_score": null, "hits": page}}),
    )
}

/// `DELETE .tasks/_doc/<id>`: the stored result of a finished task goes, and the task with it
/// (`GET _tasks/<id>` is 404 after). A running or unknown task has no document: 404
/// `not_found`, as a real node answers a missing document.
fn forget_task(state: &mut State, id: &str) -> Answer {
    match state.tasks.get_mut(id) {
        Some(t) if t.response.is_some() && !t.gone => {
            t.gone = true;
            (
                StatusCode::OK,
                json!({"_index": ".tasks", "_id": id, "result": "deleted"}),
            )
        }
        _ => (
            StatusCode::NOT_FOUND,
            json!({"_index": ".tasks", "_id": id, "result": "not_found"}),
        ),
    }
}

/// `POST _tasks/<id>/_cancel`: a running delete-by-query stops before its next batch; here
/// none has run yet, so nothing is deleted. A finished or unknown task cannot be cancelled.
/// https://www.elastic.co/guide/en/elasticsearch/reference/current/tasks.html#task-cancellation
fn cancel_task(state: &mut State, id: &str) -> Answer {
    match state.tasks.get_mut(id) {
        Some(t) if t.response.is_none() && !t.gone => {
            t.response = Some(json!({
                "took": 1, "timed_out": false, "total": t.snapshot.len(), "deleted": 0,
                "batches": 0, "version_conflicts": 0, "noops": 0, "failures": [],
                "canceled": "by user request"
            }));
            state.cancelled_tasks += 1;
            let node_task = json!({"node": NODE, "action": "indices:data/write/delete/byquery", "cancelled": true});
            (
                StatusCode::OK,
                json!({"nodes": {NODE: {"tasks": {id: node_task}}}}),
            )
        }
        _ => error(
            404,
            "resource_not_found_exception",
            &format!("task [{id}] is not running"),
        ),
    }
}

/// `GET <index>/_mapping/field/<fields>`: explicit mappings as given at creation; a field
/// only seen in documents is reported as dynamically mapped `keyword` for strings (as under
/// a dynamic template mapping strings to keyword), `long`/`float` for numbers.
/// https://www.elastic.co/guide/en/elasticsearch/reference/current/indices-get-field-mapping.html
fn field_mapping(
    state: &State,
    pattern: &str,
    fields: &str,
    query: &BTreeMap<String, String>,
) -> Answer {
    let names = match resolve(state, pattern, query) {
        Ok(n) => n,
        Err(e) => return e,
    };
    let mut out = serde_json::Map::new();
    for n in names {
        let index = &state.indices[&n];
        let mut mappings = serde_json::Map::new();
        for field in fields.split(',') {
            let kind = index.mapped.get(field).cloned().or_else(|| {
                index.docs.values().find_map(|d| {
                    field_values(&d.source, field).first().map(|v| match v {
                        Value::Number(x) if x.is_f64() => "float".to_string(),
                        Value::Number(_) => "long".to_string(),
                        Value::Bool(_) => "boolean".to_string(),
                        _ => "keyword".to_string(),
                    })
                })
            });
            if let Some(kind) = kind {
                let leaf = field.rsplit('.').next().unwrap_or(field);
                mappings.insert(
                    field.to_string(),
                    json!({"full_name": field, "mapping": {leaf: {"type": kind}}}),
                );
            }
        }
        out.insert(n.clone(), json!({"mappings": mappings}));
    }
    (StatusCode::OK, Value::Object(out))
}

fn get_settings(state: &State, index: &str) -> Answer {
    let Some(i) = state.indices.get(index) else {
        return error(
            404,
            "index_not_found_exception",
            &format!("no such index [{index}]"),
        );
    };
    let mut settings = json!({"number_of_shards": "1", "number_of_replicas": "1", "provided_name": index, "uuid": format!("uuid-{index}")});
    if i.write_block {
        settings["blocks"] = json!({"write": "true"});
    }
    (
        StatusCode::OK,
        json!({index: {"settings": {"index": settings}}}),
    )
}

fn put_settings(state: &mut State, index: &str, body: &Value) -> Answer {
    if index.contains('*') {
        return error(
            400,
            "illegal_argument_exception",
            "the double changes settings of one index at a time",
        );
    }
    let Some(i) = state.indices.get_mut(index) else {
        return error(
            404,
            "index_not_found_exception",
            &format!("no such index [{index}]"),
        );
    };
    let value = body
        .pointer("/index/blocks/write")
        .or_else(|| body.get("index.blocks.write"))
        .or_else(|| body.pointer("/index.blocks.write"));
    match value {
        Some(Value::Bool(b)) => i.write_block = *b,
        Some(Value::String(s)) => i.write_block = s == "true",
        Some(Value::Null) => i.write_block = false,
        _ => {
            return error(
                400,
                "illegal_argument_exception",
                "the double knows only index.blocks.write",
            )
        }
    }
    (StatusCode::OK, json!({"acknowledged": true}))
}

fn index_doc(
    state: &mut State,
    index: &str,
    id: Option<&&str>,
    body: Value,
    query: &BTreeMap<String, String>,
) -> Answer {
    if !body.is_object() {
        return error(400, "mapper_parsing_exception", "failed to parse");
    }
    let refresh = matches!(
        query.get("refresh").map(String::as_str),
        Some("true" | "" | "wait_for")
    );
    state.next_id += 1;
    let id = id
        .map(|s| s.to_string())
        .unwrap_or_else(|| format!("auto-{}", state.next_id));
    let idx = state.indices.entry(index.to_string()).or_default();
    if idx.write_block {
        return error(
            403,
            "cluster_block_exception",
            &format!("index [{index}] blocked by: [FORBIDDEN/8/index write (api)];"),
        );
    }
    let created = !idx.docs.contains_key(&id);
    put_doc(idx, &id, body, refresh);
    let version = idx.docs[&id].version;
    (
        if created {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        },
        json!({"_index": index, "_id": id, "_version": version, "result": if created { "created" } else { "updated" }}),
    )
}

fn bulk(
    state: &mut State,
    default_index: Option<&str>,
    body: &Value,
    query: &BTreeMap<String, String>,
) -> Answer {
    let text = body.as_str().unwrap_or("");
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let mut items = Vec::new();
    let mut errors = false;
    while let Some(action) = lines.next() {
        let Ok(action) = serde_json::from_str::<Value>(action) else {
            return error(
                400,
                "illegal_argument_exception",
                "Malformed action/metadata line",
            );
        };
        let Some((op, meta)) = action.as_object().and_then(|o| o.iter().next()) else {
            return error(
                400,
                "illegal_argument_exception",
                "Malformed action/metadata line",
            );
        };
        if op != "index" && op != "create" {
            return error(
                400,
                "illegal_argument_exception",
                "the double knows only index and create bulk actions",
            );
        }
        let index = meta
            .get("_index")
            .and_then(Value::as_str)
            .or(default_index)
            .unwrap_or("")
            .to_string();
        let source = lines
            .next()
            .and_then(|l| serde_json::from_str::<Value>(l).ok())
            .unwrap_or(Value::Null);
        let id = meta.get("_id").and_then(Value::as_str);
        let (status, answer) = index_doc(state, &index, id.as_ref(), source, query);
        errors |= !status.is_success();
        items.push(json!({op.clone(): {"status": status.as_u16(), "_index": index, "_id": answer.get("_id"), "error": answer.get("error")}}));
    }
    (
        StatusCode::OK,
        json!({"took": 1, "errors": errors, "items": items}),
    )
}

/// A small client speaking the same API, for seeding and reading a store in tests that run
/// against the double or, opt-in, against a real server.
pub struct EsClient {
    pub url: String,
    pub authorization: Option<String>,
    http: reqwest::Client,
}

impl EsClient {
    pub fn new(url: &str, authorization: Option<String>) -> EsClient {
        EsClient {
            url: url.trim_end_matches('/').to_string(),
            authorization,
            http: reqwest::Client::new(),
        }
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<String>,
        ndjson: bool,
    ) -> (u16, Value) {
        let mut r = self.http.request(method, format!("{}{path}", self.url));
        if let Some(a) = &self.authorization {
            r = r.header("Authorization", a);
        }
        if let Some(b) = body {
            r = r
                .header(
                    "content-type",
                    if ndjson {
                        "application/x-ndjson"
                    } else {
                        "application/json"
                    },
                )
                .body(b);
        }
        let response = r.send().await.expect("the store answers");
        let status = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// Any request with an optional JSON body; returns the status and answer.
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        self.send(method, path, body.map(|b| b.to_string()), false)
            .await
    }

    /// `POST /_bulk` of an NDJSON body as given (any actions); returns the status and answer.
    pub async fn bulk_raw(&self, ndjson: String) -> (u16, Value) {
        self.send(reqwest::Method::POST, "/_bulk", Some(ndjson), true)
            .await
    }

    /// Sends a JSON body with PUT; returns the status and answer.
    pub async fn put_json(&self, path: &str, body: Value) -> (u16, Value) {
        self.send(reqwest::Method::PUT, path, Some(body.to_string()), false)
            .await
    }

    /// Creates an index whose string fields are `keyword` (as a real deployment should map
    /// identifier fields), and the timestamp field `@timestamp` a `date`.
    pub async fn create_index(&self, index: &str) {
        let mapping = json!({"mappings": {
            "dynamic_templates": [{"strings": {"match_mapping_type": "string", "mapping": {"type": "keyword"}}}],
            "properties": {"@timestamp": {"type": "date"}}
        }});
        let (status, answer) = self
            .send(
                reqwest::Method::PUT,
                &format!("/{index}"),
                Some(mapping.to_string()),
                false,
            )
            .await;
        assert!(status < 300, "create index {index}: {status} {answer}");
    }

    /// Indexes documents with `_bulk?refresh=true`.
    pub async fn bulk(&self, index: &str, docs: &[(&str, Value)]) {
        let mut body = String::new();
        for (id, doc) in docs {
            body.push_str(&json!({"index": {"_index": index, "_id": id}}).to_string());
            body.push('\n');
            body.push_str(&doc.to_string());
            body.push('\n');
        }
        let (status, answer) = self
            .send(
                reqwest::Method::POST,
                "/_bulk?refresh=true",
                Some(body),
                true,
            )
            .await;
        assert!(
            status < 300 && answer["errors"] == json!(false),
            "bulk: {status} {answer}"
        );
    }

    /// Ids of the documents of an index (after a refresh), sorted.
    pub async fn ids(&self, index: &str) -> Vec<String> {
        self.send(
            reqwest::Method::POST,
            &format!("/{index}/_refresh?ignore_unavailable=true"),
            None,
            false,
        )
        .await;
        let (status, answer) = self
            .send(
                reqwest::Method::POST,
                &format!("/{index}/_search?ignore_unavailable=true"),
                Some(json!({"size": 10000, "query": {"match_all": {}}}).to_string()),
                false,
            )
            .await;
        if status == 404 {
            return Vec::new();
        }
        let mut ids: Vec<String> = answer
            .pointer("/hits/hits")
            .and_then(Value::as_array)
            .map(|h| {
                h.iter()
                    .filter_map(|d| d["_id"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        ids.sort();
        ids
    }

    /// Whether the index exists.
    pub async fn exists(&self, index: &str) -> bool {
        let (status, _) = self
            .send(
                reqwest::Method::GET,
                &format!("/{index}/_settings"),
                None,
                false,
            )
            .await;
        status == 200
    }

    pub async fn delete_index(&self, index: &str) {
        self.send(reqwest::Method::DELETE, &format!("/{index}"), None, false)
            .await;
    }
}
