//! Retention sweep throughput on a real OpenSearch node, against one plain
//! `_delete_by_query` with `slices=auto` doing the same deletion on the same node, in the same
//! run, on the same data.
//!
//!     cargo bench --bench opensearch_sweep                  # 1,000,000 documents
//!     BENCH_DOCS=200000 cargo bench --bench opensearch_sweep
//!
//! Knobs: `BENCH_DOCS` (documents in each copy of the data, default 1000000), `BENCH_DAYS`
//! (daily indices, default 21). The documents are spread evenly over the days, one index per
//! day; the cutoff is the middle of the middle day, so half of them are expired: the older
//! days' indices entirely, the middle one by half.
//!
//! The data is bulk-loaded once into `bench-ts-*` and cloned (`_clone`, which shares the
//! segment files) into `bench-dbq-*`, so both sides start from identical indices. Tombstone
//! sweeps `bench-ts-*` through the backend, as the operator does (whole expired indices are
//! deleted whole, the rest by a `_delete_by_query` task it polls); the baseline is
//! `POST bench-dbq-*/_delete_by_query?slices=auto&conflicts=proceed` with the same range
//! query, waited for. Both must leave exactly the young documents.
//!
//! Needs Java and the launcher classpath (`eval "$(hack/setup.sh)"`, see
//! `tests/support/opensearch.rs`).

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use chrono::{DateTime, TimeDelta, Utc};
use futures::StreamExt;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use tombstone::api::retentionpolicy::Target;
use tombstone::backends::elasticsearch::{ElasticsearchBackend, ElasticsearchConfig};
use tombstone::backends::http::HttpAuth;
use tombstone::backends::{Backend, Limits, Next, StepBudget, SweepJob};

use support::opensearch::SearchNode;

const OURS: &str = "bench-ts-";
const BASELINE: &str = "bench-dbq-";
/// Documents per `_bulk` request, and requests in flight while loading.
const BULK_DOCS: usize = 5_000;
const BULK_CONCURRENCY: usize = 2;

fn knob(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(default)
}

struct Node {
    http: reqwest::Client,
    url: String,
}

impl Node {
    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut request = self
            .http
            .request(method.clone(), format!("{}/{path}", self.url));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        assert!(status.is_success(), "{method} {path}: {status}: {text}");
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }

    async fn count(&self, pattern: &str) -> u64 {
        self.call(reqwest::Method::POST, &format!("{pattern}/_refresh"), None)
            .await;
        self.call(reqwest::Method::GET, &format!("{pattern}/_count"), None)
            .await["count"]
            .as_u64()
            .expect("_count")
    }
}

/// The index of day `day` (0 is the oldest).
fn index(prefix: &str, base: DateTime<Utc>, day: usize) -> String {
    let date = base + TimeDelta::days(day as i64);
    format!("{prefix}{}", date.format("%Y.%m.%d"))
}

/// Bulk-loads `docs` documents spread evenly over `days` daily indices starting at `base`.
async fn load(node: &Node, base: DateTime<Utc>, docs: usize, days: usize) -> Duration {
    let started = Instant::now();
    for day in 0..days {
        node.call(
            reqwest::Method::PUT,
            &index(OURS, base, day),
            Some(json!({"settings": {
                "number_of_shards": 1, "number_of_replicas": 0, "refresh_interval": "-1"
            }, "mappings": {"properties": {
                "@timestamp": {"type": "date"}, "user": {"properties": {"id": {"type": "keyword"}}},
                "event": {"type": "keyword"}
            }}})),
        )
        .await;
    }
    let per_day = docs.div_ceil(days);
    let step_ms = (86_400_000 / per_day.max(1)) as i64;
    let batches: Vec<(usize, usize)> = (0..docs)
        .step_by(BULK_DOCS)
        .map(|start| (start, (start + BULK_DOCS).min(docs)))
        .collect();
    futures::stream::iter(batches)
        .map(|(start, end)| {
            let mut body = String::with_capacity((end - start) * 160);
            for i in start..end {
                let (day, n) = (i / per_day, i % per_day);
                let at = base + TimeDelta::days(day as i64) + TimeDelta::milliseconds(n as i64 * step_ms);
                body.push_str(&format!(
                    "{{\"index\":{{\"_index\":\"{}\"}}}}\n{{\"@timestamp\":\"{}\",\"user\":{{\"id\":\"u{}\"}},\"event\":\"email.delivered\"}}\n",
                    index(OURS, base, day),
                    at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                    i % 10_007
                ));
            }
            let request = node
                .http
                .post(format!("{}/_bulk", node.url))
                .header("content-type", "application/x-ndjson")
                .body(body);
            async move {
                let answer: Value = request
                    .send()
                    .await
                    .expect("_bulk")
                    .json()
                    .await
                    .expect("_bulk answer");
                assert_eq!(answer["errors"], json!(false), "_bulk reported errors");
            }
        })
        .buffer_unordered(BULK_CONCURRENCY)
        .for_each(|_| async {})
        .await;
    node.call(
        reqwest::Method::PUT,
        &format!("{OURS}*/_settings"),
        Some(json!({"index": {"refresh_interval": null}})),
    )
    .await;
    node.call(reqwest::Method::POST, &format!("{OURS}*/_refresh"), None)
        .await;
    started.elapsed()
}

/// Copies every `bench-ts-*` index to `bench-dbq-*` with `_clone`.
async fn clone_all(node: &Node, base: DateTime<Utc>, days: usize) {
    let block = |on: bool| {
        let write = if on { json!(true) } else { Value::Null };
        json!({"index": {"blocks": {"write": write}}})
    };
    node.call(
        reqwest::Method::PUT,
        &format!("{OURS}*/_settings"),
        Some(block(true)),
    )
    .await;
    for day in 0..days {
        node.call(
            reqwest::Method::POST,
            &format!(
                "{}/_clone/{}?wait_for_active_shards=1",
                index(OURS, base, day),
                index(BASELINE, base, day)
            ),
            Some(json!({"settings": {"index.number_of_replicas": 0}})),
        )
        .await;
    }
    for prefix in [OURS, BASELINE] {
        node.call(
            reqwest::Method::PUT,
            &format!("{prefix}*/_settings"),
            Some(block(false)),
        )
        .await;
    }
    node.call(
        reqwest::Method::GET,
        "_cluster/health?wait_for_status=green&timeout=120s",
        None,
    )
    .await;
}

/// Tombstone's sweep of `bench-ts-*`, step after step as the engine runs them (a step waits
/// for the store's task within its budget; a `Wait` is honoured as the engine does).
async fn tombstone_sweep(node: &Node, cutoff: DateTime<Utc>) -> (Duration, u64, u32) {
    let backend = ElasticsearchBackend::new(
        ElasticsearchConfig {
            url: node.url.clone(),
            auth: HttpAuth::None,
            delete_requests_per_second: None,
        },
        Limits::default(),
    );
    let target: Target = serde_json::from_value(json!({
        "name": "events", "store": "search",
        "elasticsearch": {"index": format!("{OURS}*"), "timestampField": "@timestamp"}
    }))
    .expect("target");
    let job = SweepJob {
        target,
        retention: "10d".parse().expect("retention"),
        dry_run: false,
        cutoff,
        held: Default::default(),
    };
    let budget = StepBudget {
        max_time: Duration::from_secs(30),
        cancel: CancellationToken::new(),
        fence: Default::default(),
    };
    let started = Instant::now();
    let (mut deleted, mut steps) = (0, 0);
    let mut cursor: Option<String> = None;
    loop {
        let step = backend
            .sweep_step(&job, cursor.as_deref(), &budget)
            .await
            .expect("sweep step");
        assert!(step.failure.is_none(), "{:?}", step.failure);
        deleted += step.deleted;
        steps += 1;
        match step.next {
            Next::Done => return (started.elapsed(), deleted, steps),
            Next::Continue(c) => cursor = Some(c),
            Next::Wait {
                cursor: c,
                poll_after,
            } => {
                tokio::time::sleep(poll_after).await;
                cursor = Some(c);
            }
        }
    }
}

/// One `_delete_by_query` over `bench-dbq-*`, submitted as a task and waited for.
async fn baseline(node: &Node, cutoff: DateTime<Utc>) -> (Duration, u64) {
    let started = Instant::now();
    let submitted = node
        .call(
            reqwest::Method::POST,
            &format!(
                "{BASELINE}*/_delete_by_query?slices=auto&conflicts=proceed&wait_for_completion=false"
            ),
            Some(json!({"query": {"range": {"@timestamp": {
                "lt": cutoff.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
            }}}})),
        )
        .await;
    let task = submitted["task"].as_str().expect("task id").to_string();
    loop {
        let state = node
            .call(reqwest::Method::GET, &format!("_tasks/{task}"), None)
            .await;
        if state["completed"] == json!(true) {
            let deleted = state["response"]["deleted"].as_u64().expect("deleted");
            return (started.elapsed(), deleted);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::main]
async fn main() {
    tombstone::install_crypto_provider();
    let docs = knob("BENCH_DOCS", 1_000_000);
    let days = knob("BENCH_DAYS", 21).max(2);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let search = SearchNode::start(support::opensearch::Distribution::OpenSearch);
    let node = Node {
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(900))
            .build()
            .expect("HTTP client"),
        url: search.url(),
    };
    let today = Utc::now()
        .date_naive()
        .and_hms_opt(0, 0, 0)
        .expect("midnight")
        .and_utc();
    let base = today - TimeDelta::days(days as i64 + 1);
    let per_day = docs.div_ceil(days);
    // The middle of the middle day: the older days expired, the middle one by half.
    let cutoff = base + TimeDelta::days((days / 2) as i64) + TimeDelta::hours(12);

    println!(
        "OpenSearch {} on {}: {docs} documents over {days} daily indices ({per_day} a day)",
        search.version(),
        node.url
    );
    let loading = load(&node, base, docs, days).await;
    println!(
        "  loaded in {:.1?} ({:.0} docs/s, _bulk of {BULK_DOCS}, {BULK_CONCURRENCY} in flight)",
        loading,
        docs as f64 / loading.as_secs_f64()
    );
    clone_all(&node, base, days).await;
    let total = node.count(&format!("{OURS}*")).await;
    assert_eq!(total, docs as u64);
    assert_eq!(node.count(&format!("{BASELINE}*")).await, total);
    let expired_docs = node
        .call(
            reqwest::Method::POST,
            &format!("{OURS}*/_count"),
            Some(json!({"query": {"range": {"@timestamp": {
                "lt": cutoff.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
            }}}})),
        )
        .await["count"]
        .as_u64()
        .expect("_count");
    println!("  expired: {expired_docs} of {total}; cutoff {cutoff}");

    let (base_time, base_deleted) = baseline(&node, cutoff).await;
    println!("  baseline _delete_by_query slices=auto: {base_deleted} deleted in {base_time:.2?}");
    let (ours_time, ours_deleted, steps) = tombstone_sweep(&node, cutoff).await;
    println!("  tombstone sweep: {ours_deleted} deleted in {ours_time:.2?} ({steps} steps)");

    assert_eq!(
        base_deleted, expired_docs,
        "the baseline deleted what expired"
    );
    assert_eq!(ours_deleted, expired_docs, "tombstone deleted what expired");
    let young = total - expired_docs;
    assert_eq!(node.count(&format!("{BASELINE}*")).await, young);
    assert_eq!(node.count(&format!("{OURS}*")).await, young);

    let rate = |d: Duration| expired_docs as f64 / d.as_secs_f64();
    println!();
    println!("summary ({cores} cores, OpenSearch {})", search.version());
    println!(
        "{:<40} {:>14} {:>14} {:>7}",
        "", "tombstone", "baseline", "ratio"
    );
    println!(
        "{:<40} {:>14} {:>14} {:>6.2}x",
        "sweep (vs _delete_by_query slices=auto)",
        format!("{:.0} docs/s", rate(ours_time)),
        format!("{:.0} docs/s", rate(base_time)),
        base_time.as_secs_f64() / ours_time.as_secs_f64()
    );
    search.stop_by_closing_stdin(Duration::from_secs(60));
}
