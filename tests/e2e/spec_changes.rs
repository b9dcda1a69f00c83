//! A policy changed, suspended or deleted while its store still deletes for the old spec:
//! the store's own deletion (a Loki delete request in its cancel period, a running
//! delete-by-query task on the real OpenSearch node) is cancelled, and never adopted by the
//! next sweep; where the store can no longer stop it, the policy's status and a Warning Event
//! say so. A deleted policy goes through its finalizer, which a store that is gone does not
//! block.

use std::time::Duration;

use axum::http::Method;
use kube::api::{Api, DeleteParams};
use kube::ResourceExt;
use serde_json::{json, Value};

use tombstone::api::{DataStore, RetentionPolicy};

use crate::fixtures::*;
use crate::support::loki::{now_ns, LokiDouble, SINGLE_TENANT};
use crate::support::opensearch::SearchNode;

const FINALIZER: &str = "tombstone.dev/store-deletions";
const HOUR_NS: i64 = 3_600_000_000_000;

async fn loki_store(client: &kube::Client, ns: &str, url: &str) {
    create::<DataStore>(
        client,
        ns,
        json!({"apiVersion": "tombstone.dev/v1alpha1", "kind": "DataStore",
               "metadata": {"name": "logs"}, "spec": {"loki": {"url": url}}}),
    )
    .await;
}

/// The first target's cursor, when it holds a store-side deletion.
fn cursor(p: &RetentionPolicy) -> Option<String> {
    p.status.as_ref()?.targets.first()?.cursor.clone()
}

/// A policy `mailer` (retention 1h) over three lines two hours old, waiting on its delete
/// request in a long cancel period; a line of another app beside them. Returns the request id.
async fn loki_waiting(
    client: &kube::Client,
    ns: &str,
    double: &LokiDouble,
) -> (String, RetentionPolicy) {
    double.set_cancel_period(Duration::from_secs(600));
    let old = now_ns() - 2 * HOUR_NS;
    double.push(
        SINGLE_TENANT,
        &[("app", "mailer")],
        &[(old, "a"), (old + 1, "b"), (old + 2, "c")],
    );
    double.push(SINGLE_TENANT, &[("app", "other")], &[(old, "sentinel")]);
    loki_store(client, ns, &double.url()).await;
    create::<RetentionPolicy>(
        client,
        ns,
        policy_json(
            "mailer",
            "1h",
            json!([{"name": "logs", "store": "logs", "loki": {"selector": "{app=\"mailer\"}"}}]),
        ),
    )
    .await;
    let waiting = wait_policy(
        client,
        ns,
        "mailer",
        "a cursor holding the delete request",
        Duration::from_secs(60),
        |p| cursor(p).is_some_and(|c| c.starts_with("v1:loki:")),
    )
    .await;
    let requests = double.delete_requests(SINGLE_TENANT);
    assert_eq!(requests.len(), 1, "{requests:?}");
    assert_eq!(requests[0].status, "received");
    assert!(
        waiting.finalizers().iter().any(|f| f == FINALIZER),
        "a policy on Loki carries the finalizer before its request runs: {:?}",
        waiting.finalizers()
    );
    (requests[0].request_id.clone(), waiting)
}

/// Waits until the policy observed the edit and its old cursor is gone.
async fn wait_edit_observed(client: &kube::Client, ns: &str, old: &str) -> RetentionPolicy {
    wait_policy(
        client,
        ns,
        "mailer",
        "the edit observed and the old cursor dropped",
        Duration::from_secs(60),
        |p| {
            p.status.as_ref().is_some_and(|s| {
                s.observed_generation == p.metadata.generation && p.metadata.generation > Some(1)
            }) && cursor(p).as_deref() != Some(old)
        },
    )
    .await
}

async fn loki_edit_cancels(prefix: &str, edit: Value) -> (kube::Client, String, LokiDouble) {
    let (client, ns) = setup(prefix).await;
    let double = LokiDouble::start().await;
    let operator = TestOperator::start(&ns).await;
    let (id, waiting) = loki_waiting(&client, &ns, &double).await;
    patch_spec::<RetentionPolicy>(&client, &ns, "mailer", edit).await;
    let edited = wait_edit_observed(&client, &ns, &cursor(&waiting).unwrap_or_default()).await;
    wait_event(&client, &ns, "mailer", |(t, r, n)| {
        t == "Normal" && r == "StoreDeletionCancelled" && n.contains("target logs")
    })
    .await;
    assert!(
        double
            .delete_requests(SINGLE_TENANT)
            .iter()
            .all(|r| r.request_id != id),
        "the request for the old spec was cancelled: {:?}",
        double.delete_requests(SINGLE_TENANT)
    );
    assert_eq!(
        double.lines(SINGLE_TENANT).len(),
        4,
        "no line deleted for the old spec"
    );
    let message = &edited.status.unwrap().targets[0].message;
    assert!(!message.contains("NotCancel"), "{message}");
    operator.stop().await;
    (client, ns, double)
}

#[tokio::test]
async fn a_lengthened_retention_cancels_the_loki_request_of_the_old_one() {
    let (_, _, double) = loki_edit_cancels("spec-loki-retention", json!({"retention": "1d"})).await;
    // What the new spec submits (if anything) reaches no line it keeps.
    let cutoff_ms = (now_ns() - 23 * HOUR_NS) / 1_000_000;
    for r in double.delete_requests(SINGLE_TENANT) {
        assert!(r.end_ms <= cutoff_ms, "{r:?}");
    }
}

#[tokio::test]
async fn suspending_a_policy_cancels_its_loki_request() {
    let (client, ns, double) =
        loki_edit_cancels("spec-loki-suspend", json!({"suspend": true})).await;
    assert!(double.delete_requests(SINGLE_TENANT).is_empty());
    let p = get_policy(&client, &ns, "mailer").await;
    assert_eq!(cursor(&p), None);
}

#[tokio::test]
async fn switching_to_dry_run_cancels_the_loki_request_and_deletes_nothing() {
    let (client, ns, double) = loki_edit_cancels("spec-loki-dryrun", json!({"dryRun": true})).await;
    let operator = TestOperator::start(&ns).await;
    let done = wait_sweep_completed(&client, &ns, "mailer", None).await;
    let last = done.status.unwrap().last_sweep.unwrap();
    assert_eq!(last.deleted, 3, "would delete the three");
    assert!(double.delete_requests(SINGLE_TENANT).is_empty());
    assert_eq!(double.lines(SINGLE_TENANT).len(), 4);
    operator.stop().await;
}

#[tokio::test]
async fn a_loki_request_past_its_cancel_period_is_said_in_status_and_an_event() {
    let (client, ns) = setup("spec-loki-late").await;
    let double = LokiDouble::start().await;
    let operator = TestOperator::start(&ns).await;
    let (_, waiting) = loki_waiting(&client, &ns, &double).await;
    // Loki answers a cancel of a request it has processed (or that left its cancel period)
    // with 404, as for an unknown id.
    double.fail_next(
        Some(Method::DELETE),
        "/loki/api/v1/delete",
        404,
        "could not find delete request with given id",
        1,
    );
    patch_spec::<RetentionPolicy>(&client, &ns, "mailer", json!({"retention": "1d"})).await;
    let edited = wait_edit_observed(&client, &ns, &cursor(&waiting).unwrap_or_default()).await;
    let message = edited.status.unwrap().targets[0].message.clone();
    assert!(
        message.starts_with("StoreDeletionNotCancellable: target logs: the sweep restarted"),
        "{message}"
    );
    wait_event(&client, &ns, "mailer", |(t, r, _)| {
        t == "Warning" && r == "StoreDeletionNotCancellable"
    })
    .await;
    operator.stop().await;
}

#[tokio::test]
async fn deleting_a_policy_cancels_its_loki_request_through_the_finalizer() {
    let (client, ns) = setup("spec-loki-delete").await;
    let double = LokiDouble::start().await;
    let operator = TestOperator::start(&ns).await;
    let (id, _) = loki_waiting(&client, &ns, &double).await;
    let api: Api<RetentionPolicy> = Api::namespaced(client.clone(), &ns);
    api.delete("mailer", &DeleteParams::default())
        .await
        .expect("delete");
    wait_event(&client, &ns, "mailer", |(t, r, _)| {
        t == "Normal" && r == "StoreDeletionCancelled"
    })
    .await;
    crate::support::wait_for("the policy gone", Duration::from_secs(30), || {
        let api = api.clone();
        async move { api.get_opt("mailer").await.ok().filter(Option::is_none) }
    })
    .await;
    assert!(double
        .delete_requests(SINGLE_TENANT)
        .iter()
        .all(|r| r.request_id != id));
    assert_eq!(double.lines(SINGLE_TENANT).len(), 4);
    operator.stop().await;
}

#[tokio::test]
async fn a_store_that_is_gone_releases_the_finalizer_with_a_warning() {
    let (client, ns) = setup("spec-loki-gone").await;
    let double = LokiDouble::start().await;
    let operator = TestOperator::start(&ns).await;
    let (_, _) = loki_waiting(&client, &ns, &double).await;
    // The operator stops (its checkpoint keeps the cursor); meanwhile the store's DataStore
    // and then the policy are deleted.
    operator.stop().await;
    Api::<DataStore>::namespaced(client.clone(), &ns)
        .delete("logs", &DeleteParams::default())
        .await
        .expect("delete store");
    let api: Api<RetentionPolicy> = Api::namespaced(client.clone(), &ns);
    api.delete("mailer", &DeleteParams::default())
        .await
        .expect("delete");
    let terminating = api.get("mailer").await.expect("kept by its finalizer");
    assert!(terminating.metadata.deletion_timestamp.is_some());
    let operator = TestOperator::start(&ns).await;
    crate::support::wait_for("the policy gone", Duration::from_secs(30), || {
        let api = api.clone();
        async move { api.get_opt("mailer").await.ok().filter(Option::is_none) }
    })
    .await;
    wait_event(&client, &ns, "mailer", |(t, r, n)| {
        t == "Warning" && r == "StoreDeletionNotCancelled" && n.contains("StoreNotFound")
    })
    .await;
    wait_event(&client, &ns, "mailer", |(t, r, _)| {
        t == "Warning" && r == "FinalizerReleased"
    })
    .await;
    operator.stop().await;
}

#[tokio::test]
async fn a_store_that_refuses_the_cancel_holds_the_finalizer_only_for_a_while() {
    let (client, ns) = setup("spec-loki-refuses").await;
    let double = LokiDouble::start().await;
    let operator = TestOperator::start(&ns).await;
    let (id, _) = loki_waiting(&client, &ns, &double).await;
    let cancels = || {
        double
            .seen()
            .iter()
            .filter(|s| s.method == "DELETE" && s.path == "/loki/api/v1/delete")
            .count()
    };
    double.fail_next(
        Some(Method::DELETE),
        "/loki/api/v1/delete",
        503,
        "compactor unavailable",
        10_000,
    );
    let api: Api<RetentionPolicy> = Api::namespaced(client.clone(), &ns);
    api.delete("mailer", &DeleteParams::default())
        .await
        .expect("delete");
    let deleted_at = tokio::time::Instant::now();
    crate::support::wait_for("a refused cancel", Duration::from_secs(20), || {
        let n = cancels();
        async move { (n > 0).then_some(()) }
    })
    .await;
    assert!(
        api.get_opt("mailer").await.expect("get").is_some(),
        "kept while the store may still be asked"
    );
    crate::support::wait_for("the policy gone", Duration::from_secs(120), || {
        let api = api.clone();
        async move { api.get_opt("mailer").await.ok().filter(Option::is_none) }
    })
    .await;
    let waited = deleted_at.elapsed();
    assert!(
        waited >= Duration::from_secs(50) && cancels() > 1,
        "released after {waited:?} and {} attempts",
        cancels()
    );
    wait_event(&client, &ns, "mailer", |(t, r, n)| {
        t == "Warning" && r == "StoreDeletionNotCancelled" && n.contains("Unreachable")
    })
    .await;
    wait_event(&client, &ns, "mailer", |(t, r, _)| {
        t == "Warning" && r == "FinalizerReleased"
    })
    .await;
    assert!(
        double
            .delete_requests(SINGLE_TENANT)
            .iter()
            .any(|r| r.request_id == id),
        "the store never cancelled it"
    );
    operator.stop().await;
}

// ---- The real OpenSearch node: a throttled delete-by-query task ----

async fn bulk(http: &reqwest::Client, url: &str, index: &str, docs: &[(usize, i64)]) {
    let mut body = String::new();
    for (id, days) in docs {
        let at = (chrono::Utc::now() - chrono::Duration::days(*days)).to_rfc3339();
        body.push_str(&format!(
            "{{\"index\":{{\"_index\":\"{index}\",\"_id\":\"{id}\"}}}}\n"
        ));
        body.push_str(&format!("{{\"@timestamp\":\"{at}\"}}\n"));
    }
    let answer: Value = http
        .post(format!("{url}/_bulk?refresh=true"))
        .header("content-type", "application/x-ndjson")
        .body(body)
        .send()
        .await
        .expect("bulk")
        .json()
        .await
        .expect("bulk answer");
    assert_eq!(answer["errors"], json!(false), "{answer}");
}

async fn count(http: &reqwest::Client, url: &str, index: &str) -> u64 {
    let _ = http.post(format!("{url}/{index}/_refresh")).send().await;
    let answer: Value = http
        .get(format!("{url}/{index}/_count"))
        .send()
        .await
        .expect("count")
        .json()
        .await
        .expect("count answer");
    answer["count"].as_u64().expect("a count")
}

/// Delete-by-query tasks running on the node for `index`.
async fn running_tasks(http: &reqwest::Client, url: &str, index: &str) -> Vec<String> {
    let answer: Value = http
        .get(format!(
            "{url}/_tasks?actions=*delete/byquery&detailed=true"
        ))
        .send()
        .await
        .expect("_tasks")
        .json()
        .await
        .expect("_tasks answer");
    let mut ids = Vec::new();
    for (_, node) in answer["nodes"].as_object().into_iter().flatten() {
        for (id, task) in node["tasks"].as_object().into_iter().flatten() {
            if task["description"]
                .as_str()
                .is_some_and(|d| d.contains(index))
            {
                ids.push(id.clone());
            }
        }
    }
    ids
}

const EXPIRED: usize = 3000;

/// A policy `events` (retention 30d) over an index of 3000 documents 40 days old and 5 of a
/// day, on a store throttled to 20 deletions a second: its task is running when this
/// returns.
async fn os_task_running(
    client: &kube::Client,
    ns: &str,
    http: &reqwest::Client,
) -> (String, String) {
    let node = SearchNode::opensearch();
    let index = format!("{}-events", node.index_prefix("spec-change"));
    let mut docs: Vec<(usize, i64)> = (0..EXPIRED).map(|i| (i, 40)).collect();
    docs.extend((EXPIRED..EXPIRED + 5).map(|i| (i, 1)));
    bulk(http, &node.url(), &index, &docs).await;
    create::<DataStore>(
        client,
        ns,
        json!({"apiVersion": "tombstone.dev/v1alpha1", "kind": "DataStore",
               "metadata": {"name": "search"},
               "spec": {"elasticsearch": {"url": node.url(), "deleteRequestsPerSecond": 20}}}),
    )
    .await;
    create::<RetentionPolicy>(
        client,
        ns,
        policy_json(
            "events",
            "30d",
            json!([{"name": "events", "store": "search",
                    "elasticsearch": {"index": index, "timestampField": "@timestamp"}}]),
        ),
    )
    .await;
    let waiting = wait_policy(
        client,
        ns,
        "events",
        "a cursor holding the delete-by-query task",
        Duration::from_secs(60),
        |p| cursor(p).is_some_and(|c| c.contains("\"t\":")),
    )
    .await;
    let running = running_tasks(http, &node.url(), &index).await;
    assert_eq!(
        running.len(),
        1,
        "the task runs before the edit: {running:?}"
    );
    assert!(cursor(&waiting).unwrap().contains(&running[0]));
    (index, node.url())
}

async fn os_edit_cancels(prefix: &str, edit: Option<Value>) {
    let (client, ns) = setup(prefix).await;
    let http = reqwest::Client::new();
    let operator = TestOperator::start(&ns).await;
    let (index, url) = os_task_running(&client, &ns, &http).await;
    let api: Api<RetentionPolicy> = Api::namespaced(client.clone(), &ns);
    match &edit {
        Some(spec) => patch_spec::<RetentionPolicy>(&client, &ns, "events", spec.clone()).await,
        None => {
            api.delete("events", &DeleteParams::default())
                .await
                .expect("delete");
        }
    }
    wait_event(&client, &ns, "events", |(t, r, n)| {
        t == "Normal" && r == "StoreDeletionCancelled" && n.contains("target events")
    })
    .await;
    crate::support::wait_for("the task gone", Duration::from_secs(20), || {
        let (http, url, index) = (http.clone(), url.clone(), index.clone());
        async move {
            running_tasks(&http, &url, &index)
                .await
                .is_empty()
                .then_some(())
        }
    })
    .await;
    if edit.is_some() {
        // The sweep under the new spec completes: it keeps the documents the old one was
        // deleting.
        wait_sweep_completed(&client, &ns, "events", None).await;
    } else {
        crate::support::wait_for("the policy gone", Duration::from_secs(30), || {
            let api = api.clone();
            async move { api.get_opt("events").await.ok().filter(Option::is_none) }
        })
        .await;
    }
    let left = count(&http, &url, &index).await;
    // At 20 a second, most of the 3000 were not reached before the cancel.
    assert!(
        left > (EXPIRED as u64) / 2,
        "the task went on deleting: {left} documents left"
    );
    operator.stop().await;
}

#[tokio::test]
async fn a_lengthened_retention_cancels_the_running_delete_by_query_task() {
    os_edit_cancels("spec-os-retention", Some(json!({"retention": "60d"}))).await;
}

#[tokio::test]
async fn deleting_a_policy_cancels_its_running_delete_by_query_task() {
    os_edit_cancels("spec-os-delete", None).await;
}

/// Asked to stop a delete-by-query task that has already finished, the real node cannot:
/// the backend says so (`TooLate`), never "cancelled" nor "nothing to cancel".
#[tokio::test]
async fn a_finished_delete_by_query_task_is_too_late_to_cancel() {
    use tombstone::backends::elasticsearch::{ElasticsearchBackend, ElasticsearchConfig};
    use tombstone::backends::http::HttpAuth;
    use tombstone::backends::{Backend, Cancel, Limits, Next, StepBudget, SweepJob};

    let node = SearchNode::opensearch();
    let http = reqwest::Client::new();
    let index = format!("{}-events", node.index_prefix("spec-finished"));
    bulk(&http, &node.url(), &index, &[(0, 40), (1, 40), (2, 1)]).await;
    let backend = ElasticsearchBackend::new(
        ElasticsearchConfig {
            url: node.url(),
            auth: HttpAuth::None,
            delete_requests_per_second: None,
        },
        Limits::default(),
    );
    let job = SweepJob {
        target: serde_json::from_value(json!({"name": "events", "store": "search",
            "elasticsearch": {"index": index, "timestampField": "@timestamp"}}))
        .expect("a valid target"),
        retention: "30d".parse().expect("a duration"),
        dry_run: false,
        cutoff: chrono::Utc::now() - chrono::Duration::days(30),
        held: Default::default(),
    };
    // A step hands back the task's cursor as soon as it is submitted.
    let budget = StepBudget {
        max_time: Duration::from_millis(1),
        cancel: tokio_util::sync::CancellationToken::new(),
        fence: Default::default(),
    };
    let mut cursor: Option<String> = None;
    let waiting = loop {
        let step = backend
            .sweep_step(&job, cursor.as_deref(), &budget)
            .await
            .expect("a step");
        assert!(step.failure.is_none(), "{:?}", step.failure);
        match step.next {
            Next::Wait { cursor: c, .. } => break c,
            Next::Continue(c) => cursor = Some(c),
            Next::Done => panic!("the sweep ended without a task"),
        }
    };
    let task: String = {
        let json = waiting
            .strip_prefix("v1:elasticsearch:")
            .expect("an es cursor");
        let v: Value = serde_json::from_str(json).expect("cursor JSON");
        v["t"].as_str().expect("a task in the cursor").to_string()
    };
    crate::support::wait_for("the task finished", Duration::from_secs(30), || {
        let (http, url, task) = (http.clone(), node.url(), task.clone());
        async move {
            let v: Value = http
                .get(format!("{url}/_tasks/{task}"))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            (v["completed"] == json!(true)).then_some(())
        }
    })
    .await;
    assert_eq!(count(&http, &node.url(), &index).await, 1);
    assert_eq!(
        backend.cancel(&waiting).await.expect("the node answers"),
        Cancel::TooLate
    );
}
