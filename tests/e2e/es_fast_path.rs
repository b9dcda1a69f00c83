//! Issue 12, gap 4: the Elasticsearch whole-index path leaves nothing behind. The operator
//! names an index in its checkpoint before it blocks the index's writes, so the step that
//! resumes from that checkpoint (also after a crash) lifts the block unless it deletes the
//! index; and an index that takes writes for an alias is never deleted whole. Against the
//! real OpenSearch node of the harness.

use std::time::Duration;

use chrono::Utc;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use tombstone::backends::elasticsearch::{ElasticsearchBackend, ElasticsearchConfig};
use tombstone::backends::http::HttpAuth;
use tombstone::backends::{Backend, HeldSubjects, Limits, Next, Step, StepBudget, SweepJob};

use crate::support::opensearch::SearchNode;

fn budget() -> StepBudget {
    StepBudget {
        max_time: Duration::from_secs(10),
        cancel: CancellationToken::new(),
        fence: Default::default(),
    }
}

fn backend(node: &SearchNode) -> ElasticsearchBackend {
    ElasticsearchBackend::new(
        ElasticsearchConfig {
            url: node.url(),
            auth: HttpAuth::None,
            delete_requests_per_second: None,
        },
        Limits::default(),
    )
}

fn job(pattern: &str) -> SweepJob {
    SweepJob {
        target: serde_json::from_value(json!({"name": "events", "store": "search",
            "elasticsearch": {"index": pattern, "timestampField": "@timestamp"}}))
        .unwrap(),
        retention: "30d".parse().unwrap(),
        dry_run: false,
        cutoff: Utc::now() - chrono::Duration::days(30),
        held: HeldSubjects::default(),
    }
}

async fn step(backend: &ElasticsearchBackend, job: &SweepJob, cursor: Option<&str>) -> Step {
    let step = backend
        .sweep_step(job, cursor, &budget())
        .await
        .expect("sweep step");
    assert!(step.failure.is_none(), "{:?}", step.failure);
    step
}

/// Runs a sweep to its end from `cursor`; returns the documents deleted.
async fn finish(backend: &ElasticsearchBackend, job: &SweepJob, mut cursor: Option<String>) -> u64 {
    let mut deleted = 0;
    for _ in 0..600 {
        let s = step(backend, job, cursor.as_deref()).await;
        deleted += s.deleted;
        match s.next {
            Next::Done => return deleted,
            Next::Continue(c) => cursor = Some(c),
            Next::Wait { cursor: c, .. } => {
                cursor = Some(c);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    panic!("the sweep did not finish");
}

async fn put(http: &reqwest::Client, url: String, body: Value) {
    let response = http.put(&url).json(&body).send().await.expect("PUT");
    assert!(
        response.status().is_success(),
        "PUT {url}: {}",
        response.text().await.unwrap_or_default()
    );
}

async fn seed(http: &reqwest::Client, node: &SearchNode, index: &str, days_old: &[i64]) {
    for (i, days) in days_old.iter().enumerate() {
        let at = (Utc::now() - chrono::Duration::days(*days)).to_rfc3339();
        put(
            http,
            format!("{}/{index}/_doc/{i}?refresh=true", node.url()),
            json!({"@timestamp": at}),
        )
        .await;
    }
}

/// `index.blocks.write` as the index's settings say it (None: not set).
async fn write_block(http: &reqwest::Client, node: &SearchNode, index: &str) -> Option<Value> {
    let settings: Value = http
        .get(format!("{}/{index}/_settings", node.url()))
        .send()
        .await
        .expect("GET _settings")
        .json()
        .await
        .expect("JSON");
    settings
        .pointer(&format!("/{index}/settings/index/blocks/write"))
        .cloned()
}

async fn exists(http: &reqwest::Client, node: &SearchNode, index: &str) -> bool {
    let status = http
        .head(format!("{}/{index}", node.url()))
        .send()
        .await
        .expect("HEAD index")
        .status();
    status.is_success()
}

#[tokio::test]
async fn a_block_left_by_a_crash_is_lifted_by_the_step_that_resumes() {
    let node = SearchNode::opensearch();
    let http = reqwest::Client::new();
    let prefix = node.index_prefix("crash-block");
    let index = format!("{prefix}-2020.01.01");
    seed(&http, node, &index, &[40, 50]).await;
    let backend = backend(node);
    let job = job(&format!("{prefix}-*"));

    // The first look finds every document expired: the index is named in the checkpoint
    // before its writes are blocked, and nothing is blocked yet.
    let first = step(&backend, &job, None).await;
    let Next::Continue(checkpoint) = first.next else {
        panic!("the step did not hand back a checkpoint before blocking: {first:?}");
    };
    assert!(checkpoint.contains(&index), "{checkpoint}");
    assert_eq!(write_block(&http, node, &index).await, None);

    // A young document is written; then the next step blocks the index's writes and the
    // operator is killed before it judges the index again.
    let young = (Utc::now() - chrono::Duration::days(1)).to_rfc3339();
    put(
        &http,
        format!("{}/{index}/_doc/young?refresh=true", node.url()),
        json!({"@timestamp": young}),
    )
    .await;
    put(
        &http,
        format!("{}/{index}/_settings", node.url()),
        json!({"index": {"blocks": {"write": true}}}),
    )
    .await;

    // The restarted operator resumes from the checkpoint: it judges again, keeps the index
    // (it holds a young document) and lifts its own block, leaving no setting behind.
    let deleted = finish(&backend, &job, Some(checkpoint)).await;
    assert_eq!(deleted, 2, "the two expired documents, by query");
    assert!(exists(&http, node, &index).await);
    assert_eq!(write_block(&http, node, &index).await, None, "block left");
    put(
        &http,
        format!("{}/{index}/_doc/after?refresh=true", node.url()),
        json!({"@timestamp": young}),
    )
    .await;
}

#[tokio::test]
async fn a_cancelled_sweep_lifts_the_block_its_checkpoint_names() {
    let node = SearchNode::opensearch();
    let http = reqwest::Client::new();
    let prefix = node.index_prefix("cancel-block");
    let index = format!("{prefix}-2020.01.01");
    seed(&http, node, &index, &[40]).await;
    let backend = backend(node);
    let job = job(&format!("{prefix}-*"));
    let Next::Continue(checkpoint) = step(&backend, &job, None).await.next else {
        panic!("no checkpoint before the block");
    };
    put(
        &http,
        format!("{}/{index}/_settings", node.url()),
        json!({"index": {"blocks": {"write": true}}}),
    )
    .await;
    // The policy changed (or was deleted) mid-sweep: its store-side work is cancelled.
    backend.cancel(&checkpoint).await.expect("cancel");
    assert_eq!(write_block(&http, node, &index).await, None, "block left");
    assert!(exists(&http, node, &index).await);
}

#[tokio::test]
async fn an_index_that_takes_writes_for_an_alias_is_never_deleted_whole() {
    let node = SearchNode::opensearch();
    let http = reqwest::Client::new();
    let prefix = node.index_prefix("write-alias");
    let (plain, written, only) = (
        format!("{prefix}-2020.01.01"),
        format!("{prefix}-2020.01.02"),
        format!("{prefix}-2020.01.03"),
    );
    for index in [&plain, &written, &only] {
        seed(&http, node, index, &[40, 50]).await;
    }
    // `written` is the marked write index of an alias over two indices; `only` is the only
    // (unmarked) index of another alias, which makes it the write index too.
    let actions = json!({"actions": [
        {"add": {"index": plain, "alias": format!("{prefix}-rw"), "is_write_index": false}},
        {"add": {"index": written, "alias": format!("{prefix}-rw"), "is_write_index": true}},
        {"add": {"index": only, "alias": format!("{prefix}-single")}},
    ]});
    let response = http
        .post(format!("{}/_aliases", node.url()))
        .json(&actions)
        .send()
        .await
        .expect("POST _aliases");
    assert!(response.status().is_success());

    let backend = backend(node);
    let job = job(&format!("{prefix}-*"));
    let deleted = finish(&backend, &job, None).await;

    assert_eq!(deleted, 6, "every expired document, one way or the other");
    assert!(!exists(&http, node, &plain).await, "deleted whole");
    for index in [&written, &only] {
        assert!(exists(&http, node, index).await, "{index} deleted whole");
        assert_eq!(write_block(&http, node, index).await, None, "{index}");
    }
}
