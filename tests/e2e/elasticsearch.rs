//! The Elasticsearch/OpenSearch backend against the test double of `support::elasticsearch`
//! (and against real servers: the same retention and erasure scenarios, on indices of their
//! own, run on the real OpenSearch and Elasticsearch 7.17 nodes of `support::opensearch`, or
//! on the server that `ELASTICSEARCH_URL` names): retention by delete-by-query and by whole
//! old indices, the task lifecycle and its faults, exact and injection-proof subject
//! queries, and the operator flows (DataStore probe, RetentionPolicy with dry run,
//! ErasureRequest with a LegalHold) with an Elasticsearch store.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use tombstone::api::retentionpolicy::Target;
use tombstone::backends::elasticsearch::{ElasticsearchBackend, ElasticsearchConfig};
use tombstone::backends::http::HttpAuth;
use tombstone::backends::{
    Backend, Error, Limits, Next, StepBudget, SubjectAction, SubjectJob, SubjectStep, SweepJob,
};

use crate::support::elasticsearch::{EsClient, EsDouble, Options};
use crate::support::opensearch::{Distribution, SearchNode};

const EMAIL: &str = "es-subject-7c2e@example.org";
const USER: &str = "user-47";

fn backend_for(url: &str, auth: HttpAuth) -> ElasticsearchBackend {
    backend_throttled(url, auth, None)
}

fn backend_throttled(url: &str, auth: HttpAuth, rate: Option<u32>) -> ElasticsearchBackend {
    ElasticsearchBackend::new(
        ElasticsearchConfig {
            url: url.into(),
            auth,
            delete_requests_per_second: rate,
        },
        Limits::default(),
    )
}

fn backend(es: &EsDouble) -> ElasticsearchBackend {
    backend_for(&es.url(), HttpAuth::None)
}

fn target(index: &str, terms: Value) -> Target {
    let mut t = json!({"name": "events", "store": "search",
        "elasticsearch": {"index": index, "timestampField": "@timestamp"}});
    if !terms.is_null() {
        t["subject"] = json!({"elasticsearch": {"term": terms}});
    }
    serde_json::from_value(t).expect("a valid target")
}

fn ids(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn budget(max_time: Duration) -> StepBudget {
    StepBudget {
        max_time,
        cancel: CancellationToken::new(),
        fence: Default::default(),
    }
}

fn days_ago(days: i64) -> String {
    (Utc::now() - chrono::Duration::days(days)).to_rfc3339()
}

fn cutoff() -> DateTime<Utc> {
    Utc::now() - chrono::Duration::days(30)
}

/// What a whole sweep came to, with every cursor it handed out.
#[derive(Debug, Default)]
struct Swept {
    scanned: u64,
    deleted: u64,
    blocked: u64,
    items: Vec<String>,
    cursors: Vec<String>,
    waits: usize,
    failure: Option<Error>,
    /// Reasons of the setbacks the sweep recovered from (tasks submitted again).
    retrying: Vec<&'static str>,
}

impl Swept {
    /// The distinct delete-by-query tasks its cursors named, in order.
    fn tasks(&self) -> Vec<String> {
        task_ids(&self.cursors)
    }
}

/// The distinct task ids the cursors name (running, `t`, or finished, `x`), in order.
fn task_ids(cursors: &[String]) -> Vec<String> {
    let mut ids: Vec<String> = Vec::new();
    for c in cursors {
        let json: Value =
            serde_json::from_str(c.strip_prefix("v1:elasticsearch:").expect("an es cursor"))
                .expect("a JSON cursor");
        for t in ["t", "x"]
            .iter()
            .filter_map(|k| json.get(*k).and_then(Value::as_str))
        {
            if !ids.iter().any(|i| i == t) {
                ids.push(t.to_string());
            }
        }
    }
    ids
}

/// Runs a sweep to the end, each step resuming from the cursor the previous one returned (as
/// after a restart), waiting out `Next::Wait` without sleeping.
async fn sweep_with(
    backend: &ElasticsearchBackend,
    target: &Target,
    cutoff: DateTime<Utc>,
    dry_run: bool,
    max_time: Duration,
) -> Swept {
    sweep_from(backend, target, cutoff, dry_run, max_time, None, |_| false)
        .await
        .0
}

/// [`sweep_with`] from `cursor`, stopping early (returning the cursor to go on from) after
/// the first step whose cursor `stop` accepts.
async fn sweep_from(
    backend: &ElasticsearchBackend,
    target: &Target,
    cutoff: DateTime<Utc>,
    dry_run: bool,
    max_time: Duration,
    mut cursor: Option<String>,
    stop: impl Fn(&str) -> bool,
) -> (Swept, Option<String>) {
    let job = SweepJob {
        target: target.clone(),
        retention: "30d".parse().unwrap(),
        dry_run,
        cutoff,
        held: Default::default(),
    };
    let mut swept = Swept::default();
    for _ in 0..1000 {
        let step = backend
            .sweep_step(&job, cursor.as_deref(), &budget(max_time))
            .await
            .expect("sweep step");
        swept.scanned += step.scanned;
        swept.deleted += step.deleted;
        swept.blocked += step.blocked;
        swept.items.extend(step.blocked_items);
        if let Some(r) = &step.retrying {
            swept.retrying.push(r.reason());
        }
        if step.failure.is_some() {
            if let Next::Continue(c) | Next::Wait { cursor: c, .. } = &step.next {
                swept.cursors.push(c.clone());
            }
            swept.failure = step.failure;
            return (swept, None);
        }
        match step.next {
            Next::Done => return (swept, None),
            Next::Continue(c) => {
                swept.cursors.push(c.clone());
                cursor = Some(c);
            }
            Next::Wait { cursor: c, .. } => {
                swept.waits += 1;
                swept.cursors.push(c.clone());
                cursor = Some(c);
            }
        }
        if cursor.as_deref().is_some_and(&stop) {
            return (swept, cursor);
        }
    }
    panic!("the sweep did not finish");
}

async fn sweep(backend: &ElasticsearchBackend, target: &Target, dry_run: bool) -> Swept {
    sweep_with(backend, target, cutoff(), dry_run, Duration::from_secs(10)).await
}

/// Runs one subject action to its end (Erase may wait on its task), returning the last step
/// and every cursor handed out.
async fn subject_with(
    backend: &ElasticsearchBackend,
    target: &Target,
    identifiers: &BTreeMap<String, String>,
    action: SubjectAction,
    max_time: Duration,
) -> (SubjectStep, Vec<String>) {
    let job = SubjectJob {
        target: target.clone(),
        identifiers: identifiers.clone(),
        action,
    };
    let mut cursors = Vec::new();
    for _ in 0..1000 {
        let step = backend
            .subject_step(&job, cursors.last().map(String::as_str), &budget(max_time))
            .await
            .expect("subject step");
        assert!(step.failure.is_none(), "{:?}", step.failure);
        match &step.next {
            Next::Done => return (step, cursors),
            Next::Continue(c) | Next::Wait { cursor: c, .. } => {
                assert_eq!(step.count, 0, "counts come with Done only");
                cursors.push(c.clone());
            }
        }
    }
    panic!("the subject step did not finish");
}

async fn subject(
    backend: &ElasticsearchBackend,
    target: &Target,
    identifiers: &BTreeMap<String, String>,
    action: SubjectAction,
) -> SubjectStep {
    subject_with(
        backend,
        target,
        identifiers,
        action,
        Duration::from_secs(10),
    )
    .await
    .0
}

// -------------------------------------------------------------------------------------
// Scenarios that run against the double and, opt-in, against a real server
// -------------------------------------------------------------------------------------

/// Daily indices: one wholly expired (deleted whole), one mixed (old documents deleted by
/// query, the young one kept), one whose old document sits beside an undated one (never
/// deleted whole), and a neighbour outside the pattern. Returns the names, for more checks.
async fn retention_scenario(client: &EsClient, backend: &ElasticsearchBackend, p: &str) {
    let (expired, mixed, undated, outside) = (
        format!("{p}-2026.01.01"),
        format!("{p}-2026.01.02"),
        format!("{p}-undated"),
        format!("{p}x-2026.01.01"),
    );
    for index in [&expired, &mixed, &undated, &outside] {
        client.create_index(index).await;
    }
    let old = |n: i64| json!({"@timestamp": days_ago(40 + n), "msg": "old"});
    client
        .bulk(&expired, &[("e1", old(0)), ("e2", old(1)), ("e3", old(2))])
        .await;
    client
        .bulk(
            &mixed,
            &[
                ("m1", old(0)),
                ("m2", old(1)),
                ("young", json!({"@timestamp": days_ago(1), "msg": "young"})),
            ],
        )
        .await;
    client
        .bulk(
            &undated,
            &[("u1", old(0)), ("no-ts", json!({"msg": "no timestamp"}))],
        )
        .await;
    client.bulk(&outside, &[("x1", old(0))]).await;

    let t = target(&format!("{p}-*"), Value::Null);
    let dry = sweep(backend, &t, true).await;
    assert!(dry.failure.is_none(), "{:?}", dry.failure);
    assert_eq!((dry.scanned, dry.deleted), (8, 6), "dry run");
    assert!(client.exists(&expired).await, "a dry run deletes nothing");
    assert_eq!(client.ids(&mixed).await.len(), 3);

    let real = sweep(backend, &t, false).await;
    assert!(real.failure.is_none(), "{:?}", real.failure);
    assert_eq!(
        (real.scanned, real.deleted, real.blocked),
        (8, 6, 0),
        "dry-run parity"
    );
    assert!(
        !client.exists(&expired).await,
        "the expired index is deleted whole"
    );
    assert_eq!(client.ids(&mixed).await, vec!["young"]);
    assert_eq!(client.ids(&undated).await, vec!["no-ts"]);
    assert_eq!(
        client.ids(&outside).await,
        vec!["x1"],
        "outside the pattern"
    );
    let again = sweep(backend, &t, false).await;
    assert_eq!(again.deleted, 0, "idempotent");
}

/// A subject's documents by exact `term`: neighbours that share a prefix, a case or a space
/// with the identifier are kept, and identifiers built to break out of the query find none.
async fn erasure_scenario(client: &EsClient, backend: &ElasticsearchBackend, p: &str) {
    let (a, b) = (format!("{p}-a"), format!("{p}-b"));
    for index in [&a, &b] {
        client.create_index(index).await;
    }
    let doc = |id: &str, email: &str| json!({"@timestamp": days_ago(1), "user": {"id": id, "email": email}, "tenant": "shop"});
    client
        .bulk(
            &a,
            &[
                ("s1", doc(USER, EMAIL)),
                ("n1", doc("user-4711", "other@example.org")),
                ("n2", doc("USER-47", "other@example.org")),
                ("n3", doc("user-47 ", "other@example.org")),
            ],
        )
        .await;
    client
        .bulk(
            &b,
            &[
                ("s2", doc(USER, EMAIL)),
                (
                    "s3",
                    json!({"@timestamp": days_ago(2), "user": {"id": USER}, "tenant": "other"}),
                ),
                ("n4", doc("user-470", "x@example.org")),
            ],
        )
        .await;
    let t = target(
        &format!("{p}-*"),
        json!({"user.id": "{userId}", "tenant": "shop"}),
    );
    let subject_ids = ids(&[("userId", USER), ("email", EMAIL)]);

    // Identifiers built to widen or break the query match nothing and delete nothing.
    for hostile in [
        r#"user-47" } } , { "match_all": {} "#,
        "user-4*",
        "user-47|user-4711",
        r"user-47\",
        "user-47}}]}",
        "*",
    ] {
        let hostile_ids = ids(&[("userId", hostile)]);
        let found = subject(backend, &t, &hostile_ids, SubjectAction::Find).await;
        assert_eq!(found.count, 0, "{hostile}");
        let erased = subject(backend, &t, &hostile_ids, SubjectAction::Erase).await;
        assert_eq!(erased.count, 0, "{hostile}");
    }
    assert_eq!(client.ids(&a).await.len() + client.ids(&b).await.len(), 7);

    let found = subject(backend, &t, &subject_ids, SubjectAction::Find).await;
    assert_eq!(
        (found.count, found.ran),
        (2, true),
        "both terms are required"
    );
    let erased = subject(backend, &t, &subject_ids, SubjectAction::Erase).await;
    assert_eq!(erased.count, 2, "Find counts what Erase removes");
    let verified = subject(backend, &t, &subject_ids, SubjectAction::Verify).await;
    assert_eq!(verified.count, 0);
    assert_eq!(client.ids(&a).await, vec!["n1", "n2", "n3"]);
    assert_eq!(client.ids(&b).await, vec!["n4", "s3"]);

    // A subject without the identifier the locator needs: skipped, never run with a blank.
    let skipped = subject(backend, &t, &ids(&[("email", EMAIL)]), SubjectAction::Erase).await;
    assert_eq!(
        (skipped.ran, skipped.count, skipped.skipped.clone()),
        (false, 0, vec!["term[user.id] needs {userId}".to_string()])
    );
}

#[tokio::test]
async fn es_sweep_deletes_old_documents_and_whole_expired_indices_only() {
    let es = EsDouble::start().await;
    let client = EsClient::new(&es.url(), None);
    let backend = backend(&es);
    retention_scenario(&client, &backend, "logs").await;

    // Request shapes: one DELETE, of the expired index only; a delete-by-query on the
    // pattern with the documented parameters and the absolute cutoff; no write block left.
    let requests = es.requests();
    let deletes: Vec<&str> = requests
        .iter()
        // Stored task results are deleted too; indices are what counts here.
        .filter(|r| r.method == "DELETE" && !r.path.starts_with("/.tasks/"))
        .map(|r| r.path.as_str())
        .collect();
    assert_eq!(deletes, vec!["/logs-2026.01.01"]);
    let dbq = requests
        .iter()
        .find(|r| r.path == "/logs-*/_delete_by_query")
        .expect("a delete-by-query");
    for (k, v) in [
        ("wait_for_completion", "false"),
        ("conflicts", "proceed"),
        ("slices", "auto"),
    ] {
        assert_eq!(dbq.query.get(k).map(String::as_str), Some(v), "{k}");
    }
    let body: Value = serde_json::from_str(&dbq.body).unwrap();
    let lt = body
        .pointer("/query/range/@timestamp/lt")
        .and_then(Value::as_str)
        .expect("range lt");
    assert!(DateTime::parse_from_rfc3339(lt).is_ok(), "{lt}");
    assert!(!dbq.body.contains("now"), "{}", dbq.body);
    for index in es.indices() {
        assert!(!es.write_blocked(&index), "{index} left write-blocked");
    }
}

#[tokio::test]
async fn es_an_index_holding_one_young_document_is_never_deleted_whole() {
    let es = EsDouble::start().await;
    let old = json!({"@timestamp": days_ago(60)});
    // Judged expired at first sight, but a young document arrives (not yet searchable) right
    // after that first look: the write block and the refresh before the second look find it.
    es.seed(
        "app-2026.01.01",
        &[("o1", old.clone()), ("o2", old.clone())],
    );
    es.write_during_next(
        "/app-2026.01.01/_search",
        "app-2026.01.01",
        "late",
        json!({"@timestamp": days_ago(0)}),
    );
    // Write-blocked by its owner (ILM read-only) and wholly expired: deleted whole.
    es.seed("app-2026.01.02", &[("k1", old.clone())]);
    es.set_write_block("app-2026.01.02", true);
    // Write-blocked by its owner, with a young document: kept, and its block too.
    es.seed("app-2026.01.03", &[("k2", old.clone())]);
    es.seed_unrefreshed(
        "app-2026.01.03",
        "young",
        json!({"@timestamp": days_ago(0)}),
    );
    es.set_write_block("app-2026.01.03", true);
    let t = target("app-*", Value::Null);
    let swept = sweep(&backend(&es), &t, false).await;
    assert_eq!(es.ids("app-2026.01.01"), vec!["late"]);
    assert!(
        !es.write_blocked("app-2026.01.01"),
        "its own block is lifted"
    );
    assert!(!es.indices().contains(&"app-2026.01.02".to_string()));
    assert!(
        es.write_blocked("app-2026.01.03"),
        "the owner's block is kept"
    );
    // The blocked index refuses the deletion of its old document: a failure, not a success.
    assert_eq!(es.ids("app-2026.01.03"), vec!["k2", "young"]);
    let failure = swept.failure.expect("the blocked index fails the task");
    assert!(
        failure.to_string().contains("cluster_block_exception"),
        "{failure}"
    );
    assert_eq!(swept.deleted, 3);
    let deletes: Vec<String> = es
        .requests()
        .into_iter()
        .filter(|r| r.method == "DELETE" && !r.path.starts_with("/.tasks/"))
        .map(|r| r.path)
        .collect();
    assert_eq!(deletes, vec!["/app-2026.01.02"]);
}

#[tokio::test]
async fn es_without_the_privileges_of_the_fast_path_the_sweep_deletes_by_query_alone() {
    let es = EsDouble::start().await;
    let old = json!({"@timestamp": days_ago(40)});
    es.seed("day-2026.01.01", &[("a", old.clone()), ("b", old.clone())]);
    let t = target("day-*", Value::Null);
    // Not allowed to list indices (`monitor`), then not allowed to block writes (`manage`).
    for (path, status) in [("/_cat/indices", 403), ("/day-2026.01.01/_settings", 403)] {
        es.seed("day-2026.01.01", &[("a", old.clone()), ("b", old.clone())]);
        es.fail(path, status, 1);
        let swept = sweep(&backend(&es), &t, false).await;
        assert!(swept.failure.is_none(), "{path}: {:?}", swept.failure);
        assert_eq!(swept.deleted, 2, "{path}");
        assert_eq!(
            es.indices(),
            vec!["day-2026.01.01"],
            "{path}: kept, emptied"
        );
        assert!(es.ids("day-2026.01.01").is_empty());
        assert!(!es.write_blocked("day-2026.01.01"));
    }
}

#[tokio::test]
async fn es_sweep_waits_on_its_task_and_resumes_from_the_cursor_counting_once() {
    let es = EsDouble::start().await;
    let old = json!({"@timestamp": days_ago(40)});
    let young = json!({"@timestamp": days_ago(1)});
    es.seed(
        "events-1",
        &[("a", old.clone()), ("b", old.clone()), ("c", young.clone())],
    );
    es.seed("events-2", &[("d", old.clone()), ("e", young.clone())]);
    es.set_running_polls(3);
    // Two transient failures of the poll: the task goes on, the poll is retried.
    es.fail("/_tasks/", 503, 2);
    let t = target("events-*", Value::Null);
    // Each step may take 1 ms: every poll of the running task is a step of its own, and
    // each step starts from the cursor alone (a fresh backend, as after a restart).
    let job_cutoff = cutoff();
    let first = sweep_with(
        &backend(&es),
        &t,
        job_cutoff,
        false,
        Duration::from_millis(1),
    )
    .await;
    assert!(first.failure.is_none(), "{:?}", first.failure);
    assert_eq!(first.deleted, 3);
    assert!(first.waits >= 3, "{first:?}");
    assert_eq!(es.task_count(), 1, "one task, submitted once and polled");
    assert!(first
        .cursors
        .iter()
        .any(|c| c.starts_with("v1:elasticsearch:") && c.contains("\"t\":")));
    assert_eq!(es.ids("events-1"), vec!["c"]);
    assert_eq!(es.ids("events-2"), vec!["e"]);

    // A poll that keeps failing ends the step with Unreachable.
    es.seed("events-1", &[("f", old.clone())]);
    es.set_running_polls(1);
    es.fail("/_tasks/", 503, 10);
    let failed = sweep_with(
        &backend(&es),
        &t,
        job_cutoff,
        false,
        Duration::from_millis(1),
    )
    .await;
    let failure = failed.failure.expect("the poll gives up");
    assert_eq!(failure.reason(), "Unreachable", "{failure}");
}

#[tokio::test]
async fn es_version_conflicts_are_reported_as_blocked_and_taken_by_the_next_sweep() {
    let es = EsDouble::start().await;
    let old = json!({"@timestamp": days_ago(40), "n": 1});
    es.seed(
        "orders-1",
        &[
            ("a", old.clone()),
            ("b", old.clone()),
            ("c", old.clone()),
            ("d", json!({"@timestamp": days_ago(1)})),
        ],
    );
    es.inject_version_conflicts(2);
    let t = target("orders-*", Value::Null);
    let swept = sweep(&backend(&es), &t, false).await;
    assert!(swept.failure.is_none(), "{:?}", swept.failure);
    assert_eq!((swept.deleted, swept.blocked), (1, 2));
    assert!(
        swept.items[0].contains("version conflicts"),
        "{:?}",
        swept.items
    );
    assert_eq!(es.ids("orders-1").len(), 3);
    // A real conflict: a writer changes a document while the task runs.
    es.set_running_polls(1);
    let b = backend(&es);
    let job = SweepJob {
        target: t.clone(),
        retention: "30d".parse().unwrap(),
        dry_run: false,
        cutoff: cutoff(),
        held: Default::default(),
    };
    let mut cursor = None;
    let cursor = loop {
        let step = b
            .sweep_step(&job, cursor.as_deref(), &budget(Duration::from_millis(1)))
            .await
            .unwrap();
        match step.next {
            Next::Continue(c) => cursor = Some(c),
            Next::Wait { cursor, .. } => break cursor,
            Next::Done => panic!("the task runs"),
        }
    };
    let remaining = es.ids("orders-1");
    es.update(
        "orders-1",
        &remaining[0],
        json!({"@timestamp": days_ago(40), "n": 2}),
    );
    let done = b
        .sweep_step(&job, Some(&cursor), &budget(Duration::from_secs(5)))
        .await
        .unwrap();
    assert_eq!((done.deleted, done.blocked), (1, 1));
    assert_eq!(
        es.stored_task_results(),
        1,
        "the result stays until its count is checkpointed"
    );
    // One more step deletes the task's stored result, its count being checkpointed.
    let Next::Continue(cursor) = done.next else {
        panic!("a clean-up step follows: {:?}", done.next)
    };
    let cleaned = b
        .sweep_step(&job, Some(&cursor), &budget(Duration::from_secs(5)))
        .await
        .unwrap();
    assert_eq!(
        (cleaned.deleted, cleaned.blocked, cleaned.next),
        (0, 0, Next::Done)
    );
    assert_eq!(es.stored_task_results(), 0);
    let last = sweep(&b, &t, false).await;
    assert_eq!((last.deleted, last.blocked), (1, 0));
    assert_eq!(es.ids("orders-1"), vec!["d"]);
}

/// A task that ends with failures, or that the store no longer knows (a node restarted), is
/// submitted again from the cursor; what each task deleted is counted once; the stored result
/// of every finished task is deleted, but only in the step after the one that reported its
/// count.
#[tokio::test]
async fn es_a_task_that_ends_badly_or_vanishes_is_submitted_again_counting_once() {
    let es = EsDouble::start().await;
    let old = json!({"@timestamp": days_ago(40)});
    let seed = |es: &EsDouble| {
        es.seed(
            "audit-1",
            &[
                ("a", old.clone()),
                ("b", old.clone()),
                ("c", old.clone()),
                ("y", json!({"@timestamp": days_ago(1)})),
            ],
        )
    };
    seed(&es);
    let t = target("audit-*", Value::Null);
    let b = backend(&es);
    // The first task's bulk rejects one document and deletes the two others.
    es.inject_task_failures(1);
    let swept = sweep(&b, &t, false).await;
    assert!(swept.failure.is_none(), "{:?}", swept.failure);
    assert_eq!(swept.retrying, vec!["StoreTaskFailed"]);
    assert_eq!((swept.deleted, swept.blocked), (3, 0), "{swept:?}");
    assert_eq!(es.task_count(), 2);
    assert_eq!(es.ids("audit-1"), vec!["y"]);
    assert_eq!(es.stored_task_results(), 0, "both results deleted");
    // The step that read a task's count did not delete its result yet.
    let deletes: Vec<usize> = es
        .requests()
        .iter()
        .enumerate()
        .filter(|(_, r)| r.method == "DELETE" && r.path.starts_with("/.tasks/_doc/"))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(deletes.len(), 2, "one delete per finished task");

    // A node restart while the task runs: the task is gone; a new one is submitted.
    seed(&es);
    es.set_running_polls(1_000);
    let (first, cursor) = sweep_from(
        &b,
        &t,
        cutoff(),
        false,
        Duration::from_millis(1),
        None,
        |c| c.contains("\"t\":"),
    )
    .await;
    assert!(first.failure.is_none(), "{:?}", first.failure);
    es.lose_running_tasks();
    es.set_running_polls(0);
    let (rest, _) = sweep_from(
        &b,
        &t,
        cutoff(),
        false,
        Duration::from_secs(10),
        cursor,
        |_| false,
    )
    .await;
    assert!(rest.failure.is_none(), "{:?}", rest.failure);
    assert_eq!(rest.retrying, vec!["StoreTaskLost"]);
    assert_eq!(first.deleted + rest.deleted, 3, "{first:?} {rest:?}");
    assert_eq!(es.task_count(), 4);
    assert_eq!(es.ids("audit-1"), vec!["y"]);
    assert_eq!(es.stored_task_results(), 0);

    // An erasure: the count of the failed task travels in the cursor to the end.
    es.seed(
        "audit-1",
        &[
            ("s1", json!({"@timestamp": days_ago(1), "user": USER})),
            ("s2", json!({"@timestamp": days_ago(2), "user": USER})),
            ("s3", json!({"@timestamp": days_ago(3), "user": USER})),
        ],
    );
    es.inject_task_failures(1);
    let t = target("audit-*", json!({"user": "{userId}"}));
    let job = SubjectJob {
        target: t.clone(),
        identifiers: ids(&[("userId", USER)]),
        action: SubjectAction::Erase,
    };
    let mut cursor: Option<String> = None;
    let mut failures = Vec::new();
    let mut erased = None;
    for _ in 0..20 {
        let step = b
            .subject_step(&job, cursor.as_deref(), &budget(Duration::from_secs(10)))
            .await
            .expect("erase step");
        if let Some(f) = &step.failure {
            failures.push(f.reason());
            assert!(!f.to_string().contains(USER), "{f}");
        }
        match step.next {
            Next::Done => {
                erased = Some(step.count);
                break;
            }
            Next::Continue(c) | Next::Wait { cursor: c, .. } => {
                assert_eq!(step.count, 0, "counts come with Done only");
                cursor = Some(c);
            }
        }
    }
    assert_eq!(failures, vec!["StoreTaskFailed"]);
    assert_eq!(erased, Some(3), "two by the failed task, one by the next");
    assert_eq!(es.ids("audit-1"), vec!["y"]);
    assert_eq!(es.stored_task_results(), 0);
}

#[tokio::test]
async fn es_task_failures_and_store_errors_fail_the_step_with_their_category() {
    let es = EsDouble::start().await;
    es.seed(
        "audit-1",
        &[
            ("user-47@example.org", json!({"@timestamp": days_ago(40)})),
            ("y", json!({"@timestamp": days_ago(1)})),
        ],
    );
    let t = target("audit-*", Value::Null);
    let b = backend(&es);
    // Every submission ends with bulk failures: submitted three times, then the step fails.
    es.inject_failing_tasks(3, 1);
    let swept = sweep(&b, &t, false).await;
    let failure = swept
        .failure
        .expect("bulk failures fail the step in the end");
    assert_eq!(failure.reason(), "StoreTaskFailed");
    assert_eq!(swept.retrying, vec!["StoreTaskFailed", "StoreTaskFailed"]);
    assert_eq!(es.task_count(), 3, "submitted three times");
    assert!(
        failure
            .to_string()
            .contains("es_rejected_execution_exception"),
        "{failure}"
    );
    assert!(
        failure.to_string().contains("gave up after 3 attempts"),
        "{failure}"
    );
    assert!(
        !failure.to_string().contains("user-47"),
        "no document id: {failure}"
    );
    assert_eq!(swept.deleted, 0);

    for (status, reason) in [
        (401, "AuthenticationFailed"),
        (429, "Unreachable"),
        (503, "Unreachable"),
        (500, "Unreachable"),
    ] {
        es.fail("/_count", status, 1);
        let err = b
            .sweep_step(
                &SweepJob {
                    target: t.clone(),
                    retention: "30d".parse().unwrap(),
                    dry_run: true,
                    cutoff: cutoff(),
                    held: Default::default(),
                },
                None,
                &budget(Duration::from_secs(5)),
            )
            .await
            .expect_err("the store refused");
        assert_eq!(err.reason(), reason, "{status}: {err}");
    }
    // A match-everything pattern is refused before any request.
    es.clear_requests();
    let err = b
        .sweep_step(
            &SweepJob {
                target: target("*", Value::Null),
                retention: "30d".parse().unwrap(),
                dry_run: false,
                cutoff: cutoff(),
                held: Default::default(),
            },
            None,
            &budget(Duration::from_secs(5)),
        )
        .await
        .expect_err("refused");
    assert_eq!(err.reason(), "InvalidSpec");
    assert!(es.requests().is_empty());
}

#[tokio::test]
async fn es_probe_names_the_distribution_and_checks_the_credentials() {
    let es = EsDouble::start_with(Options {
        accept: vec![
            Options::basic("tombstone", "s3cret"),
            Options::api_key("aWQ6a2V5"),
        ],
        ..Default::default()
    })
    .await;
    let probe = |auth: HttpAuth| {
        let url = es.url();
        async move { backend_for(&url, auth).probe().await }
    };
    assert_eq!(
        probe(HttpAuth::Basic {
            username: "tombstone".into(),
            password: "s3cret".into()
        })
        .await
        .unwrap(),
        "elasticsearch 8.13.0"
    );
    assert_eq!(
        probe(HttpAuth::ApiKey("aWQ6a2V5".into())).await.unwrap(),
        "elasticsearch 8.13.0"
    );
    for auth in [
        HttpAuth::None,
        HttpAuth::Basic {
            username: "tombstone".into(),
            password: "wrong-pw".into(),
        },
    ] {
        let err = probe(auth).await.unwrap_err();
        assert_eq!(err.reason(), "AuthenticationFailed", "{err}");
        assert!(!err.to_string().contains("wrong-pw"), "{err}");
    }
    let os = EsDouble::start_with(Options {
        opensearch: true,
        version: "2.11.0".into(),
        ..Default::default()
    })
    .await;
    assert_eq!(backend(&os).probe().await.unwrap(), "opensearch 2.11.0");
    let closed = format!("http://127.0.0.1:{}", {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    });
    let err = backend_for(&closed, HttpAuth::None)
        .probe()
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "Unreachable", "{err}");
}

#[tokio::test]
async fn es_erasure_is_exact_injection_proof_and_waits_for_its_task() {
    let es = EsDouble::start().await;
    let client = EsClient::new(&es.url(), None);
    let backend = backend(&es);
    es.set_running_polls(2);
    erasure_scenario(&client, &backend, "mail").await;

    // The subject's task, step by step with 1 ms each: Wait until the task completes, then
    // Done with the count. The cursors hold the task id and nothing of the subject; the
    // request bodies hold the identifier only as one term value.
    es.seed(
        "mail-a",
        &[("s9", json!({"user": {"id": USER}, "tenant": "shop"}))],
    );
    es.clear_requests();
    let t = target("mail-*", json!({"user.id": "{userId}", "tenant": "shop"}));
    let subject_ids = ids(&[("userId", USER)]);
    let (done, cursors) = subject_with(
        &backend,
        &t,
        &subject_ids,
        SubjectAction::Erase,
        Duration::from_millis(1),
    )
    .await;
    assert_eq!(done.count, 1);
    assert!(cursors.len() >= 2, "{cursors:?}");
    for c in &cursors {
        assert!(
            c.starts_with("v1:elasticsearch:") && !c.contains("user-47"),
            "{c}"
        );
    }
    let dbq = es
        .requests()
        .into_iter()
        .find(|r| r.path.ends_with("/_delete_by_query"))
        .unwrap();
    let body: Value = serde_json::from_str(&dbq.body).unwrap();
    assert_eq!(
        body,
        json!({"query": {"bool": {"filter": [
            {"term": {"tenant": {"value": "shop"}}},
            {"term": {"user.id": {"value": USER}}},
        ]}}})
    );
    assert!(!dbq.path.contains("user-47") && !dbq.query.values().any(|v| v.contains("user-47")));

    // A store error on a request that carried the identifier never quotes it.
    es.fail("/_count", 400, 1);
    let job = SubjectJob {
        target: t.clone(),
        identifiers: subject_ids.clone(),
        action: SubjectAction::Find,
    };
    let err = backend
        .subject_step(&job, None, &budget(Duration::from_secs(5)))
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "StoreError");
    assert!(!err.to_string().contains("user-47"), "{err}");
}

#[tokio::test]
async fn es_a_term_on_an_analysed_text_field_is_refused_with_the_keyword_advice() {
    let es = EsDouble::start().await;
    let client = EsClient::new(&es.url(), None);
    // `user.email` is `text` (what dynamic mapping makes of strings), with a `keyword`
    // sub-field: a term on the text field would compare with tokens and miss the subject.
    let (status, _) = client
        .put_json(
            "/people-1",
            json!({"mappings": {"properties": {"user": {"properties": {"email": {
                "type": "text", "fields": {"keyword": {"type": "keyword", "ignore_above": 256}}
            }}}}}}),
        )
        .await;
    assert_eq!(status, 200);
    client
        .bulk("people-1", &[("p1", json!({"user": {"email": EMAIL}}))])
        .await;
    let b = backend(&es);
    let on_text = target("people-*", json!({"user.email": "{email}"}));
    let job = SubjectJob {
        target: on_text,
        identifiers: ids(&[("email", EMAIL)]),
        action: SubjectAction::Find,
    };
    let err = b
        .subject_step(&job, None, &budget(Duration::from_secs(5)))
        .await
        .expect_err("refused");
    assert_eq!(err.reason(), "InvalidSpec");
    assert!(err.to_string().contains("user.email.keyword"), "{err}");
    assert!(!err.to_string().contains(EMAIL), "{err}");
    let on_keyword = target("people-*", json!({"user.email.keyword": "{email}"}));
    let found = subject(
        &b,
        &on_keyword,
        &ids(&[("email", EMAIL)]),
        SubjectAction::Find,
    )
    .await;
    assert_eq!((found.ran, found.count), (true, 1));
}

// -------------------------------------------------------------------------------------
// The same scenarios against a real OpenSearch (or the Elasticsearch of ELASTICSEARCH_URL)
// -------------------------------------------------------------------------------------

/// A client, a backend and a unique index prefix for a real server: the one `ELASTICSEARCH_URL`
/// names (optionally with `ELASTICSEARCH_USERNAME`/`ELASTICSEARCH_PASSWORD` or
/// `ELASTICSEARCH_API_KEY`), else the harness's own node of `distribution` (started on first
/// use; a test fails when neither is available, it never passes without a server).
fn real_server(distribution: Distribution) -> (EsClient, ElasticsearchBackend, String) {
    real_server_with(distribution, None)
}

/// [`real_server`] with a backend whose delete-by-query tasks are throttled to `rate`
/// documents a second (`requests_per_second`).
fn real_server_with(
    distribution: Distribution,
    rate: Option<u32>,
) -> (EsClient, ElasticsearchBackend, String) {
    let Some(url) = std::env::var("ELASTICSEARCH_URL")
        .ok()
        .filter(|u| !u.is_empty())
    else {
        let node = SearchNode::get(distribution);
        let url = node.url();
        return (
            EsClient::new(&url, None),
            backend_throttled(&url, HttpAuth::None, rate),
            node.index_prefix("es-real"),
        );
    };
    let (auth, header) = match (
        std::env::var("ELASTICSEARCH_API_KEY").ok(),
        std::env::var("ELASTICSEARCH_USERNAME").ok(),
    ) {
        (Some(key), _) => (HttpAuth::ApiKey(key.clone()), Some(Options::api_key(&key))),
        (None, Some(user)) => {
            let password = std::env::var("ELASTICSEARCH_PASSWORD").unwrap_or_default();
            (
                HttpAuth::Basic {
                    username: user.clone(),
                    password: password.clone(),
                },
                Some(Options::basic(&user, &password)),
            )
        }
        _ => (HttpAuth::None, None),
    };
    let prefix = format!(
        "tombstone-test-{}",
        Utc::now().timestamp_nanos_opt().unwrap_or(0)
    );
    (
        EsClient::new(&url, header),
        backend_throttled(&url, auth, rate),
        prefix,
    )
}

/// Documents per second of the throttled tasks of the tests below: with batches of 1,000 (the
/// default scroll size) a task deletes its first batch at once and the next ones seconds
/// apart, so it can be caught mid-way.
const SLOW: u32 = 400;
/// Expired documents those tests seed.
const MANY: u64 = 3000;

/// `MANY` expired documents and a young one in `index` (so it is never deleted whole).
async fn seed_many(client: &EsClient, index: &str) {
    let old: Vec<(String, Value)> = (0..MANY)
        .map(|i| {
            (
                format!("o{i}"),
                json!({"@timestamp": days_ago(40 + (i % 20) as i64)}),
            )
        })
        .collect();
    let mut docs: Vec<(&str, Value)> = old.iter().map(|(id, d)| (id.as_str(), d.clone())).collect();
    docs.push(("young", json!({"@timestamp": days_ago(1)})));
    client.bulk(index, &docs).await;
}

/// Waits until the node shows the task running with some documents deleted (and not yet
/// completed); returns how many it has deleted so far.
async fn wait_mid_way(client: &EsClient, task: &str) -> u64 {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (status, answer) = client
            .call(reqwest::Method::GET, &format!("/_tasks/{task}"), None)
            .await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(
            answer["completed"],
            json!(false),
            "the task ended before it was caught mid-way: {answer}"
        );
        let deleted = answer
            .pointer("/task/status/deleted")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        if deleted > 0 {
            assert!(deleted < MANY, "{answer}");
            return deleted;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the task deleted nothing in 30 s: {answer}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The ids of the stored task results in `.tasks` whose task worked on indices of `prefix`.
async fn stored_results_for(client: &EsClient, prefix: &str) -> Vec<String> {
    client
        .call(reqwest::Method::POST, "/.tasks/_refresh", None)
        .await;
    let (status, answer) = client
        .call(
            reqwest::Method::POST,
            "/.tasks/_search",
            Some(json!({"size": 1000, "query": {"match_all": {}}})),
        )
        .await;
    if status == 404 {
        return Vec::new();
    }
    assert_eq!(status, 200, "{answer}");
    answer
        .pointer("/hits/hits")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|h| {
            h.pointer("/_source/task/description")
                .and_then(Value::as_str)
                .is_some_and(|d| d.contains(prefix))
        })
        .filter_map(|h| h["_id"].as_str().map(str::to_string))
        .collect()
}

/// On the real node: a throttled task cancelled from outside (`POST _tasks/<id>/_cancel`)
/// while it is mid-way is submitted again from the cursor; what the cancelled task deleted
/// and what the next one deleted add up to every expired document, each counted once; no
/// stored task result of the sweep is left in `.tasks`.
async fn real_server_a_task_cancelled_from_outside_is_submitted_again_counting_once(
    distribution: Distribution,
) {
    let (client, backend, p) =
        tokio::task::spawn_blocking(move || real_server_with(distribution, Some(SLOW)))
            .await
            .expect("a real server");
    let index = format!("{p}-2026.01.01");
    seed_many(&client, &index).await;
    let t = target(&format!("{p}-*"), Value::Null);
    let (first, cursor) = sweep_from(
        &backend,
        &t,
        cutoff(),
        false,
        Duration::from_millis(1),
        None,
        |c| c.contains("\"t\":"),
    )
    .await;
    assert!(first.failure.is_none(), "{:?}", first.failure);
    let task = first.tasks().pop().expect("a task in the cursor");
    let before = wait_mid_way(&client, &task).await;
    let (status, answer) = client
        .call(
            reqwest::Method::POST,
            &format!("/_tasks/{task}/_cancel"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    let (status, ended) = client
        .call(
            reqwest::Method::GET,
            &format!("/_tasks/{task}?wait_for_completion=true&timeout=30s"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{ended}");
    println!("the cancelled task: {ended}");
    let (rest, _) = sweep_from(
        &backend,
        &t,
        cutoff(),
        false,
        Duration::from_secs(10),
        cursor,
        |_| false,
    )
    .await;
    assert!(rest.failure.is_none(), "{:?}", rest.failure);
    assert_eq!(
        rest.retrying,
        vec!["StoreTaskCancelled"],
        "{rest:?}: {ended}"
    );
    assert_eq!(
        (first.deleted + rest.deleted, rest.blocked),
        (MANY, 0),
        "each document counted once ({before} deleted before the cancel): {rest:?}"
    );
    assert_eq!(client.ids(&index).await, vec!["young"]);
    let mut tasks = first.tasks();
    tasks.extend(rest.tasks());
    tasks.sort();
    tasks.dedup();
    assert_eq!(tasks.len(), 2, "submitted again once: {tasks:?}");
    println!(
        "{}: cancelled from outside after {before} of {MANY}; the resumed sweep counted {} (the cancelled task's and the next task's)",
        distribution.name(),
        rest.deleted
    );
    assert_eq!(
        stored_results_for(&client, &p).await,
        Vec::<String>::new(),
        "no stored result of the sweep's tasks is left in .tasks"
    );
    client.delete_index(&index).await;
}

/// On the real node: documents updated while a throttled task runs (`conflicts=proceed`) are
/// left in place and reported as blocked; the next sweep takes them. Deleted plus blocked is
/// every expired document, and the two sweeps' deletions add up to exactly that.
async fn real_server_documents_changed_while_a_task_runs_are_taken_by_the_next_sweep(
    distribution: Distribution,
) {
    let (client, backend, p) =
        tokio::task::spawn_blocking(move || real_server_with(distribution, Some(SLOW)))
            .await
            .expect("a real server");
    let index = format!("{p}-2026.01.01");
    seed_many(&client, &index).await;
    let t = target(&format!("{p}-*"), Value::Null);
    let (first, cursor) = sweep_from(
        &backend,
        &t,
        cutoff(),
        false,
        Duration::from_millis(1),
        None,
        |c| c.contains("\"t\":"),
    )
    .await;
    let task = first.tasks().pop().expect("a task in the cursor");
    wait_mid_way(&client, &task).await;
    // Every expired document is touched (those deleted already answer 404 and stay gone).
    let mut updates = String::new();
    for i in 0..MANY {
        updates.push_str(&json!({"update": {"_index": index, "_id": format!("o{i}")}}).to_string());
        updates.push('\n');
        updates.push_str(&json!({"doc": {"touched": true}}).to_string());
        updates.push('\n');
    }
    let (status, answer) = client.bulk_raw(updates).await;
    assert_eq!(status, 200, "{answer}");
    let (rest, _) = sweep_from(
        &backend,
        &t,
        cutoff(),
        false,
        Duration::from_secs(10),
        cursor,
        |_| false,
    )
    .await;
    assert!(rest.failure.is_none(), "{:?}", rest.failure);
    assert!(rest.retrying.is_empty(), "{rest:?}");
    let (deleted, blocked) = (first.deleted + rest.deleted, rest.blocked);
    assert!(
        blocked > 0,
        "the updated documents were version conflicts: {rest:?}"
    );
    assert_eq!(deleted + blocked, MANY, "{rest:?}");
    assert!(
        rest.items.iter().any(|i| i.contains("version conflicts")),
        "{:?}",
        rest.items
    );
    println!(
        "{}: {deleted} deleted, {blocked} version conflicts left for the next sweep",
        distribution.name()
    );
    let next = sweep(&backend, &t, false).await;
    assert!(next.failure.is_none(), "{:?}", next.failure);
    assert_eq!(
        (next.deleted, next.blocked),
        (blocked, 0),
        "the next sweep takes exactly what was skipped"
    );
    assert_eq!(client.ids(&index).await, vec!["young"]);
    assert_eq!(
        stored_results_for(&client, &p).await,
        Vec::<String>::new(),
        "no stored result of the sweeps' tasks is left in .tasks"
    );
    client.delete_index(&index).await;
}

async fn real_server_retention_sweep(distribution: Distribution) {
    let (client, backend, prefix) = tokio::task::spawn_blocking(move || real_server(distribution))
        .await
        .expect("a real server");
    println!("{}", backend.probe().await.expect("probe"));
    retention_scenario(&client, &backend, &prefix).await;
    assert_eq!(
        stored_results_for(&client, &prefix).await,
        Vec::<String>::new(),
        "nothing of the sweep's tasks is left in .tasks"
    );
    for suffix in ["2026.01.02", "undated"] {
        client.delete_index(&format!("{prefix}-{suffix}")).await;
    }
    client.delete_index(&format!("{prefix}x-2026.01.01")).await;
}

async fn real_server_subject_erasure(distribution: Distribution) {
    let (client, backend, prefix) = tokio::task::spawn_blocking(move || real_server(distribution))
        .await
        .expect("a real server");
    erasure_scenario(&client, &backend, &prefix).await;
    assert_eq!(
        stored_results_for(&client, &prefix).await,
        Vec::<String>::new(),
        "nothing of the erasure's tasks is left in .tasks"
    );
    for suffix in ["a", "b"] {
        client.delete_index(&format!("{prefix}-{suffix}")).await;
    }
}

/// Real dynamic mapping (no template, no explicit mapping): a string becomes analysed `text`
/// with a `.keyword` sub-field. A term on the text field is refused with the advice; on the
/// sub-field the subject is found exactly, erased, and `_count` is 0 after `_refresh`.
async fn real_server_a_term_on_a_dynamically_mapped_string_is_refused_and_keyword_erases(
    distribution: Distribution,
) {
    let (client, backend, p) = tokio::task::spawn_blocking(move || real_server(distribution))
        .await
        .expect("a real server");
    let index = format!("{p}-people");
    client
        .bulk(
            &index,
            &[
                (
                    "s1",
                    json!({"@timestamp": days_ago(1), "user": {"email": EMAIL}}),
                ),
                (
                    "n1",
                    json!({"@timestamp": days_ago(1), "user": {"email": format!("x{EMAIL}")}}),
                ),
            ],
        )
        .await;
    let email = ids(&[("email", EMAIL)]);
    let job = SubjectJob {
        target: target(&format!("{p}-*"), json!({"user.email": "{email}"})),
        identifiers: email.clone(),
        action: SubjectAction::Find,
    };
    let err = backend
        .subject_step(&job, None, &budget(Duration::from_secs(10)))
        .await
        .expect_err("a term on analysed text is refused");
    assert_eq!(err.reason(), "InvalidSpec", "{err}");
    assert!(err.to_string().contains("user.email.keyword"), "{err}");
    assert!(!err.to_string().contains(EMAIL), "{err}");

    let on_keyword = target(&format!("{p}-*"), json!({"user.email.keyword": "{email}"}));
    let found = subject(&backend, &on_keyword, &email, SubjectAction::Find).await;
    assert_eq!((found.ran, found.count), (true, 1));
    let erased = subject(&backend, &on_keyword, &email, SubjectAction::Erase).await;
    assert_eq!(erased.count, 1);
    let verified = subject(&backend, &on_keyword, &email, SubjectAction::Verify).await;
    assert_eq!(verified.count, 0);
    assert_eq!(client.ids(&index).await, vec!["n1"], "the neighbour stays");
    client.delete_index(&index).await;
}

/// On the real node: a daily index with 3,000 expired documents and one young one is swept by
/// a real delete-by-query task, each step resuming from the cursor alone (a fresh backend, as
/// after a restart) and counting each document once; a wholly expired index that its owner
/// write-blocked is deleted whole; no write block of the sweep's own is left behind.
async fn real_server_a_sweep_resumes_its_task_from_the_cursor_and_counts_once(
    distribution: Distribution,
) {
    let (client, backend, p) = tokio::task::spawn_blocking(move || real_server(distribution))
        .await
        .expect("a real server");
    let (big, blocked) = (format!("{p}-2026.01.01"), format!("{p}-2026.01.02"));
    let old: Vec<(String, Value)> = (0..3000)
        .map(|i| {
            (
                format!("o{i}"),
                json!({"@timestamp": days_ago(40 + i % 20)}),
            )
        })
        .collect();
    let mut docs: Vec<(&str, Value)> = old.iter().map(|(id, d)| (id.as_str(), d.clone())).collect();
    docs.push(("young", json!({"@timestamp": days_ago(1)})));
    client.bulk(&big, &docs).await;
    client
        .bulk(&blocked, &[("b1", json!({"@timestamp": days_ago(50)}))])
        .await;
    let (status, answer) = client
        .put_json(
            &format!("/{blocked}/_settings"),
            json!({"index": {"blocks": {"write": true}}}),
        )
        .await;
    assert_eq!(status, 200, "{answer}");

    let t = target(&format!("{p}-*"), Value::Null);
    let dry = sweep(&backend, &t, true).await;
    assert!(dry.failure.is_none(), "{:?}", dry.failure);
    assert_eq!((dry.scanned, dry.deleted), (3002, 3001), "dry run");
    // Steps of 1 ms: the running task is polled from its cursor, step after step.
    let swept = sweep_with(&backend, &t, cutoff(), false, Duration::from_millis(1)).await;
    assert!(swept.failure.is_none(), "{:?}", swept.failure);
    assert!(
        swept.waits >= 1
            && swept
                .cursors
                .iter()
                .any(|c| c.starts_with("v1:elasticsearch:") && c.contains("\"t\":")),
        "the task was polled from its cursor: {:?}",
        swept.cursors
    );
    assert_eq!(
        (swept.deleted, swept.blocked),
        (3001, 0),
        "counted once, with dry-run parity: {swept:?}"
    );
    assert_eq!(client.ids(&big).await, vec!["young"]);
    assert!(!client.exists(&blocked).await, "deleted whole");
    let mut get = reqwest::Client::new().get(format!("{}/{big}/_settings", client.url));
    if let Some(authorization) = &client.authorization {
        get = get.header("Authorization", authorization);
    }
    let settings: Value = get
        .send()
        .await
        .expect("GET _settings")
        .json()
        .await
        .expect("JSON");
    assert_eq!(
        settings.pointer(&format!("/{big}/settings/index/blocks/write")),
        None,
        "no write block left: {settings}"
    );
    let again = sweep(&backend, &t, false).await;
    assert_eq!(again.deleted, 0, "idempotent");
    client.delete_index(&big).await;
}

/// On the real node: an index pattern with an exclusion (`P-*,-P-keep`) sweeps the indices it
/// names, by the whole-index fast path and by delete-by-query, and leaves the excluded index
/// untouched; the dry run counts the same.
async fn real_server_an_excluded_index_is_never_swept(distribution: Distribution) {
    let (client, backend, p) = tokio::task::spawn_blocking(move || real_server(distribution))
        .await
        .expect("a real server");
    let (expired, mixed, keep) = (
        format!("{p}-2026.01.01"),
        format!("{p}-2026.01.02"),
        format!("{p}-keep"),
    );
    let old = |n: i64| json!({"@timestamp": days_ago(40 + n)});
    client
        .bulk(&expired, &[("e1", old(0)), ("e2", old(1))])
        .await;
    client
        .bulk(
            &mixed,
            &[
                ("m1", old(0)),
                ("young", json!({"@timestamp": days_ago(1)})),
            ],
        )
        .await;
    client.bulk(&keep, &[("k1", old(0)), ("k2", old(1))]).await;
    let t = target(&format!("{p}-*,-{keep}"), Value::Null);
    let dry = sweep(&backend, &t, true).await;
    assert!(dry.failure.is_none(), "{:?}", dry.failure);
    assert_eq!((dry.scanned, dry.deleted), (4, 3), "dry run");
    let real = sweep(&backend, &t, false).await;
    assert!(real.failure.is_none(), "{:?}", real.failure);
    assert_eq!((real.scanned, real.deleted), (4, 3), "dry-run parity");
    assert!(!client.exists(&expired).await, "deleted whole");
    assert_eq!(client.ids(&mixed).await, vec!["young"]);
    assert_eq!(client.ids(&keep).await, vec!["k1", "k2"], "excluded");
    for index in [&mixed, &keep] {
        client.delete_index(index).await;
    }
}

/// Each real-server scenario runs on both servers the harness starts: `NAME::opensearch` and
/// `NAME::elasticsearch`.
macro_rules! on_both_servers {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            use crate::support::opensearch::Distribution;

            #[tokio::test]
            async fn opensearch() {
                super::$name(Distribution::OpenSearch).await
            }

            #[tokio::test]
            async fn elasticsearch() {
                super::$name(Distribution::Elasticsearch).await
            }
        }
    )*};
}

on_both_servers!(
    real_server_retention_sweep,
    real_server_subject_erasure,
    real_server_a_term_on_a_dynamically_mapped_string_is_refused_and_keyword_erases,
    real_server_a_sweep_resumes_its_task_from_the_cursor_and_counts_once,
    real_server_an_excluded_index_is_never_swept,
    real_server_a_task_cancelled_from_outside_is_submitted_again_counting_once,
    real_server_documents_changed_while_a_task_runs_are_taken_by_the_next_sweep,
);

// -------------------------------------------------------------------------------------
// Through the operator
// -------------------------------------------------------------------------------------

mod operator {
    use super::*;

    use kube::api::{Api, DeleteParams};

    use tombstone::api::erasurerequest::{ErasurePhase, ErasureTargetPhase};
    use tombstone::api::retentionpolicy::SweepOutcome;
    use tombstone::api::{ConditionStatus, DataStore, LegalHold, RetentionPolicy};

    use crate::erasure::wait_phase;
    use crate::fixtures::*;

    pub(super) async fn es_store(
        client: &kube::Client,
        ns: &str,
        name: &str,
        url: &str,
        secret: Option<&str>,
    ) {
        let mut spec = json!({"elasticsearch": {"url": url}});
        if let Some(s) = secret {
            spec["elasticsearch"]["credentialsSecretRef"] = json!({"name": s});
            // The doubles speak plain HTTP: credentials may go there only with insecure.
            spec["insecure"] = json!(true);
        }
        create::<DataStore>(
            client,
            ns,
            json!({"apiVersion": "tombstone.dev/v1alpha1", "kind": "DataStore", "metadata": {"name": name}, "spec": spec}),
        )
        .await;
    }

    async fn ready(client: &kube::Client, ns: &str, name: &str, ready: bool) -> (String, String) {
        let store = wait_store_ready(client, ns, name, ready).await;
        let status = store.status.unwrap();
        assert_eq!(status.store_type.as_deref(), Some("elasticsearch"));
        let (_, reason, message) = condition(&status.conditions, "Ready");
        (reason, message)
    }

    #[tokio::test]
    async fn an_elasticsearch_store_is_ready_with_its_version_or_says_why_not() {
        let (client, ns) = setup("es-ready").await;
        let es = EsDouble::start_with(Options {
            accept: vec![
                Options::basic("tombstone", "s3cret"),
                Options::api_key("aWQ6a2V5"),
            ],
            ..Default::default()
        })
        .await;
        let os = EsDouble::start_with(Options {
            opensearch: true,
            version: "2.11.0".into(),
            ..Default::default()
        })
        .await;
        let operator = TestOperator::start(&ns).await;
        create_credentials_secret(
            &client,
            &ns,
            "basic",
            json!({"username": "tombstone", "password": "s3cret"}),
        )
        .await;
        create_credentials_secret(&client, &ns, "apikey", json!({"apiKey": "aWQ6a2V5"})).await;
        create_credentials_secret(
            &client,
            &ns,
            "wrong",
            json!({"username": "tombstone", "password": "not-the-pw"}),
        )
        .await;
        es_store(&client, &ns, "basic", &es.url(), Some("basic")).await;
        es_store(&client, &ns, "apikey", &es.url(), Some("apikey")).await;
        es_store(&client, &ns, "wrong", &es.url(), Some("wrong")).await;
        es_store(&client, &ns, "opensearch", &os.url(), None).await;
        let closed = format!("http://127.0.0.1:{}", {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        });
        es_store(&client, &ns, "closed", &closed, None).await;

        for name in ["basic", "apikey"] {
            let (reason, message) = ready(&client, &ns, name, true).await;
            assert_eq!(
                (reason.as_str(), message.as_str()),
                ("Connected", "elasticsearch 8.13.0")
            );
        }
        let (_, message) = ready(&client, &ns, "opensearch", true).await;
        assert_eq!(message, "opensearch 2.11.0");
        let (reason, message) = ready(&client, &ns, "wrong", false).await;
        assert_eq!(reason, "AuthenticationFailed", "{message}");
        assert!(!message.contains("not-the-pw"), "{message}");
        let (reason, message) = ready(&client, &ns, "closed", false).await;
        assert_eq!(reason, "Unreachable", "{message}");
        operator.stop().await;
    }

    #[tokio::test]
    async fn an_elasticsearch_policy_sweeps_through_the_operator_after_a_dry_run_with_parity() {
        let (client, ns) = setup("es-sweep").await;
        let es = EsDouble::start().await;
        let old = json!({"@timestamp": days_ago(40)});
        let young = json!({"@timestamp": days_ago(1)});
        es.seed(
            "mailer-events-2026.01.01",
            &[("a", old.clone()), ("b", old.clone())],
        );
        es.seed(
            "mailer-events-2026.01.02",
            &[("c", old.clone()), ("d", young.clone())],
        );
        es.seed("other-2026.01.01", &[("e", old.clone())]);
        // The task stays running for a few polls: the sweep waits on it through status.
        es.set_running_polls(3);
        let operator = TestOperator::start(&ns).await;
        es_store(&client, &ns, "search", &es.url(), None).await;
        wait_store_ready(&client, &ns, "search", true).await;
        let mut policy = policy_json(
            "mailer",
            "30d",
            json!([{"name": "events", "store": "search",
                    "elasticsearch": {"index": "mailer-events-*", "timestampField": "@timestamp"}}]),
        );
        policy["spec"]["dryRun"] = json!(true);
        create::<RetentionPolicy>(&client, &ns, policy).await;
        let dry = wait_sweep_completed(&client, &ns, "mailer", None)
            .await
            .status
            .unwrap();
        let last = dry.last_sweep.clone().unwrap();
        assert_eq!((last.outcome, last.deleted), (SweepOutcome::DryRun, 3));
        assert_eq!((dry.targets[0].scanned, dry.targets[0].deleted), (4, 3));
        assert_eq!(es.indices().len(), 3, "a dry run deletes nothing");
        assert_eq!(es.task_count(), 0);

        patch_spec::<RetentionPolicy>(&client, &ns, "mailer", json!({"dryRun": false})).await;
        // Start times have one-second resolution: wait for the outcome instead.
        let done = wait_sweep_succeeded(
            &client,
            &ns,
            "mailer",
            "a real sweep",
            Duration::from_secs(60),
        )
        .await;
        let last = done.last_sweep.clone().unwrap();
        assert_eq!(
            (last.outcome, last.deleted),
            (SweepOutcome::Succeeded, 3),
            "parity"
        );
        assert_eq!(done.targets[0].deleted_total, 3);
        assert_eq!(
            es.indices(),
            vec![
                "mailer-events-2026.01.02".to_string(),
                "other-2026.01.01".to_string()
            ]
        );
        assert_eq!(es.ids("mailer-events-2026.01.02"), vec!["d"]);
        assert_eq!(es.task_count(), 1, "submitted once, polled until done");
        let polls = es
            .requests()
            .iter()
            .filter(|r| r.path.starts_with("/_tasks/"))
            .count();
        assert!(polls >= 4, "{polls} polls");
        let (compliant, _, message) = condition(&done.conditions, "Compliant");
        assert_eq!(compliant, ConditionStatus::True, "{message}");
        operator.stop().await;
    }

    #[tokio::test]
    async fn an_elasticsearch_erasure_waits_for_its_task_and_a_hold_blocks_it_first() {
        let (client, ns) = setup("es-erasure").await;
        let es = EsDouble::start().await;
        let doc = |email: &str| json!({"@timestamp": days_ago(1), "user": {"email": email}});
        es.seed(
            "mailer-events-1",
            &[("s1", doc(EMAIL)), ("n1", doc(&format!("{EMAIL}.evil")))],
        );
        es.seed(
            "mailer-events-2",
            &[("s2", doc(EMAIL)), ("n2", doc("bob@example.org"))],
        );
        es.set_running_polls(2);
        let operator = TestOperator::start(&ns).await;
        es_store(&client, &ns, "search", &es.url(), None).await;
        let mut policy = policy_json(
            "mailer",
            "30d",
            json!([{"name": "events", "store": "search",
                    "elasticsearch": {"index": "mailer-events-*", "timestampField": "@timestamp"},
                    "subject": {"elasticsearch": {"term": {"user.email": "{email}"}}}}]),
        );
        policy["spec"]["suspend"] = json!(true);
        create::<RetentionPolicy>(&client, &ns, policy).await;
        hold_policies(&client, &ns, "audit", &["mailer"]).await;
        create_subject_secret(&client, &ns, "dsr-es", json!({"email": EMAIL})).await;
        request_erasure(&client, &ns, "dsr-es", "dsr-es").await;
        let held = wait_phase(&client, &ns, "dsr-es", ErasurePhase::Blocked).await;
        assert_eq!(
            held.status.unwrap().targets[0].phase,
            ErasureTargetPhase::Blocked
        );
        assert_eq!(es.task_count(), 0, "nothing erased under a hold");

        Api::<LegalHold>::namespaced(client.clone(), &ns)
            .delete("audit", &DeleteParams::default())
            .await
            .unwrap();
        let done = wait_phase(&client, &ns, "dsr-es", ErasurePhase::Completed).await;
        let status = done.status.unwrap();
        let t = &status.targets[0];
        assert_eq!(
            (t.phase, t.found, t.erased, t.remaining),
            (ErasureTargetPhase::Verified, 2, 2, 0)
        );
        assert_eq!(es.ids("mailer-events-1"), vec!["n1"]);
        assert_eq!(es.ids("mailer-events-2"), vec!["n2"]);
        assert_eq!(es.task_count(), 1);

        let trail = format!(
            "{}\n{:?}\n{}\n{:?}",
            serde_json::to_string(&status).unwrap(),
            events_for(&client, &ns, "dsr-es").await,
            operator.running.metrics.render(),
            captured_logs()
        );
        for secret in [EMAIL, "es-subject-7c2e"] {
            assert!(
                !trail.contains(secret),
                "{secret} leaked into the operator's trail"
            );
        }
        operator.stop().await;
    }
}

mod erasure_retry {
    use super::*;

    use tombstone::api::erasurerequest::{ErasurePhase, ErasureTargetPhase};
    use tombstone::api::RetentionPolicy;

    use crate::erasure::wait_phase;
    use crate::fixtures::*;

    /// The erasure's first task ends with a bulk failure after deleting two of the subject's
    /// three documents: the failed step's cursor (with that count) is kept, the retry submits
    /// a new task from it, and the request completes having erased exactly three.
    #[tokio::test]
    async fn an_erasure_whose_task_fails_resumes_from_the_failed_steps_cursor_counting_once() {
        let (client, ns) = setup("es-erasure-retry").await;
        let es = EsDouble::start().await;
        let doc = |email: &str| json!({"@timestamp": days_ago(1), "user": {"email": email}});
        es.seed(
            "mailer-events-1",
            &[
                ("s1", doc(EMAIL)),
                ("s2", doc(EMAIL)),
                ("s3", doc(EMAIL)),
                ("n1", doc("bob@example.org")),
            ],
        );
        es.inject_task_failures(1);
        let operator = TestOperator::start(&ns).await;
        super::operator::es_store(&client, &ns, "search", &es.url(), None).await;
        let mut policy = policy_json(
            "mailer",
            "30d",
            json!([{"name": "events", "store": "search",
                    "elasticsearch": {"index": "mailer-events-*", "timestampField": "@timestamp"},
                    "subject": {"elasticsearch": {"term": {"user.email": "{email}"}}}}]),
        );
        policy["spec"]["suspend"] = json!(true);
        create::<RetentionPolicy>(&client, &ns, policy).await;
        create_subject_secret(&client, &ns, "dsr-es", json!({"email": EMAIL})).await;
        request_erasure(&client, &ns, "dsr-es", "dsr-es").await;
        let done = wait_phase(&client, &ns, "dsr-es", ErasurePhase::Completed).await;
        let status = done.status.unwrap();
        let t = &status.targets[0];
        assert_eq!(
            (t.phase, t.found, t.erased, t.remaining),
            (ErasureTargetPhase::Verified, 3, 3, 0),
            "{}",
            t.message
        );
        assert_eq!(es.ids("mailer-events-1"), vec!["n1"]);
        assert_eq!(es.task_count(), 2, "submitted again once");
        assert_eq!(es.stored_task_results(), 0);
        let metrics = operator.running.metrics.render();
        assert!(
            metrics.contains("StoreTaskFailed"),
            "the failed step was reported with its reason"
        );
        operator.stop().await;
    }
}

mod restart {
    use super::*;

    use tombstone::api::retentionpolicy::SweepOutcome;
    use tombstone::api::DataStore;
    use tombstone::api::RetentionPolicy;

    use crate::fixtures::*;

    #[tokio::test]
    async fn an_elasticsearch_sweep_polls_the_same_task_after_an_operator_restart() {
        let (client, ns) = setup("es-restart").await;
        let es = EsDouble::start().await;
        let old = json!({"@timestamp": days_ago(40)});
        es.seed(
            "jobs-1",
            &[
                ("a", old.clone()),
                ("b", old.clone()),
                ("y", json!({"@timestamp": days_ago(1)})),
            ],
        );
        // The task runs until told otherwise.
        es.set_running_polls(u32::MAX);
        let operator = TestOperator::start(&ns).await;
        create::<DataStore>(
            &client,
            &ns,
            json!({"apiVersion": "tombstone.dev/v1alpha1", "kind": "DataStore", "metadata": {"name": "search"},
                   "spec": {"elasticsearch": {"url": es.url()}}}),
        )
        .await;
        create::<RetentionPolicy>(
            &client,
            &ns,
            policy_json(
                "jobs",
                "30d",
                json!([{"name": "jobs", "store": "search",
                        "elasticsearch": {"index": "jobs-*", "timestampField": "@timestamp"}}]),
            ),
        )
        .await;
        let waiting = wait_policy(
            &client,
            &ns,
            "jobs",
            "a task in the cursor",
            Duration::from_secs(60),
            |p| {
                p.status.as_ref().is_some_and(|s| {
                    s.targets.first().is_some_and(|t| {
                        t.cursor.as_deref().is_some_and(|c| {
                            c.starts_with("v1:elasticsearch:") && c.contains("\"t\":")
                        })
                    })
                })
            },
        )
        .await;
        operator.stop().await;
        let started = waiting.status.unwrap().current_sweep.unwrap().start_time;
        assert_eq!(es.task_count(), 1);

        es.complete_tasks();
        let operator = TestOperator::start(&ns).await;
        let done = wait_policy(
            &client,
            &ns,
            "jobs",
            "the sweep resumed",
            Duration::from_secs(60),
            |p| {
                p.status
                    .as_ref()
                    .is_some_and(|s| s.current_sweep.is_none() && s.last_sweep.is_some())
            },
        )
        .await
        .status
        .unwrap();
        let last = done.last_sweep.unwrap();
        assert_eq!(last.start_time, started, "the same sweep, resumed");
        assert_eq!((last.outcome, last.deleted), (SweepOutcome::Succeeded, 2));
        assert_eq!(
            es.task_count(),
            1,
            "the task was polled again, not submitted again"
        );
        assert_eq!(es.ids("jobs-1"), vec!["y"]);
        operator.stop().await;
    }
}

#[tokio::test]
async fn es_requests_keep_to_the_stores_rate_limit() {
    let es = EsDouble::start().await;
    es.seed(
        "rate-1",
        &[(
            "a",
            json!({"@timestamp": days_ago(40), "user": {"id": USER}}),
        )],
    );
    let limited = ElasticsearchBackend::new(
        ElasticsearchConfig {
            url: es.url(),
            auth: HttpAuth::None,
            delete_requests_per_second: None,
        },
        Limits {
            rate: Some(std::sync::Arc::new(
                tombstone::engine::limits::RateLimiter::new(2),
            )),
            concurrency: 1,
        },
    );
    let started = std::time::Instant::now();
    // Dry run: refresh, two counts, the search counting undated documents and the one for
    // the oldest kept; Find: mapping check, refresh and a count. Two a second, a burst of 2.
    let dry = sweep(&limited, &target("rate-*", Value::Null), true).await;
    assert_eq!(dry.deleted, 1);
    let t = target("rate-*", json!({"user.id": "{userId}"}));
    let found = subject(&limited, &t, &ids(&[("userId", USER)]), SubjectAction::Find).await;
    assert_eq!(found.count, 1);
    // … and the field-mapping check of the locator.
    assert_eq!(es.requests().len(), 8);
    assert!(
        started.elapsed() >= Duration::from_millis(2900),
        "{:?}",
        started.elapsed()
    );
}

mod failed_step {
    use super::*;

    use tombstone::api::retentionpolicy::TargetPhase;
    use tombstone::api::RetentionPolicy;

    use crate::fixtures::*;

    /// The store stops answering task polls (503, on the double: a real node cannot be made
    /// to on demand) until the step fails. Unreachable is transient: the target keeps
    /// sweeping and keeps the cursor naming the task, and the retry (with back-off) polls that
    /// same task instead of orphaning it; the sweep then completes and counts exactly.
    #[tokio::test]
    async fn a_transient_step_failure_keeps_its_task_and_the_retry_resumes_it() {
        let (client, ns) = setup("es-failed-step").await;
        let es = EsDouble::start().await;
        es.seed(
            "jobs-1",
            &[
                ("a", json!({"@timestamp": days_ago(40)})),
                ("y", json!({"@timestamp": days_ago(1)})),
            ],
        );
        es.set_running_polls(u32::MAX);
        // Every poll of the task fails: the fifth failure in a row fails the step.
        es.fail("/_tasks/", 503, 5);
        let operator = TestOperator::start(&ns).await;
        super::operator::es_store(&client, &ns, "search", &es.url(), None).await;
        wait_store_ready(&client, &ns, "search", true).await;
        create::<RetentionPolicy>(
            &client,
            &ns,
            policy_json(
                "jobs",
                "30d",
                json!([{"name": "jobs", "store": "search",
                        "elasticsearch": {"index": "jobs-*", "timestampField": "@timestamp"}}]),
            ),
        )
        .await;
        // A positive sign that the step failed: the error is counted before status is
        // written. The retry follows after its back-off and finds the task still running, so
        // the failure may already be cleared from status.
        wait_metric(
            &operator.running.metrics,
            "controller=\"retentionpolicy\",reason=\"Unreachable\"",
        )
        .await;
        let retrying = wait_policy(
            &client,
            &ns,
            "jobs",
            "the failure written",
            Duration::from_secs(30),
            |p| {
                p.status.as_ref().is_some_and(|s| {
                    s.targets.first().is_some_and(|t| {
                        t.failure_category.is_some()
                            || t.phase != TargetPhase::Sweeping
                            || (t.message.is_empty() && t.cursor.is_some())
                    })
                })
            },
        )
        .await
        .status
        .unwrap();
        let target = &retrying.targets[0];
        assert_eq!(target.phase, TargetPhase::Sweeping, "{}", target.message);
        assert!(
            target
                .cursor
                .as_deref()
                .is_some_and(|c| c.contains("\"t\":")),
            "the retrying target still names its task: {:?}",
            target.cursor
        );
        let first_sweep = retrying
            .current_sweep
            .as_ref()
            .expect("the sweep goes on")
            .start_time;
        assert_eq!((es.task_count(), es.cancelled_tasks()), (1, 0));

        // The store answers again: the retry polls the same task, which completes.
        es.complete_tasks();
        let done = wait_sweep_succeeded(
            &client,
            &ns,
            "jobs",
            "the sweep succeeded",
            Duration::from_secs(120),
        )
        .await;
        assert_eq!(
            (es.task_count(), es.cancelled_tasks()),
            (1, 0),
            "the same task was resumed: none cancelled, none submitted again"
        );
        assert_eq!(done.targets[0].failure_category, None);
        assert_eq!(
            done.last_sweep.as_ref().map(|l| l.start_time),
            Some(first_sweep),
            "the sweep that failed a step is the one that completed"
        );
        assert_eq!(done.last_sweep.unwrap().deleted, 1);
        assert_eq!(done.targets[0].cursor, None);
        assert_eq!(es.ids("jobs-1"), vec!["y"]);
        assert_eq!(es.stored_task_results(), 0);
        operator.stop().await;
    }
}

mod hold {
    use super::*;

    use kube::api::{Api, DeleteParams};

    use tombstone::api::retentionpolicy::TargetPhase;
    use tombstone::api::{DataStore, LegalHold, RetentionPolicy};

    use crate::fixtures::*;

    #[tokio::test]
    async fn a_hold_cancels_a_real_task_mid_way_on_opensearch() {
        a_hold_cancels_a_real_task_mid_way(Distribution::OpenSearch).await
    }

    #[tokio::test]
    async fn a_hold_cancels_a_real_task_mid_way_on_elasticsearch() {
        a_hold_cancels_a_real_task_mid_way(Distribution::Elasticsearch).await
    }

    /// On the real nodes, through the operator: a DataStore with `deleteRequestsPerSecond`
    /// throttles the sweep's delete-by-query task so that the node shows it running with some
    /// documents deleted when a LegalHold lands; the hold cancels it (the node no longer
    /// runs it, and its stored result is gone), the rest stays while held, and once released
    /// the sweep deletes the rest and leaves nothing of its tasks in `.tasks`.
    async fn a_hold_cancels_a_real_task_mid_way(distribution: Distribution) {
        let (client, ns) = setup("es-real-hold").await;
        let node = tokio::task::spawn_blocking(move || SearchNode::get(distribution))
            .await
            .expect("a real node");
        let url = node.url();
        let es = EsClient::new(&url, None);
        let p = node.index_prefix("hold-task");
        let index = format!("{p}-2026.01.01");
        seed_many(&es, &index).await;
        let operator = TestOperator::start(&ns).await;
        create::<DataStore>(
            &client,
            &ns,
            json!({"apiVersion": "tombstone.dev/v1alpha1", "kind": "DataStore", "metadata": {"name": "search"},
                   "spec": {"elasticsearch": {"url": url, "deleteRequestsPerSecond": 200}}}),
        )
        .await;
        wait_store_ready(&client, &ns, "search", true).await;
        create::<RetentionPolicy>(
            &client,
            &ns,
            policy_json(
                "mailer",
                "30d",
                json!([{"name": "events", "store": "search",
                        "elasticsearch": {"index": format!("{p}-*"), "timestampField": "@timestamp"}}]),
            ),
        )
        .await;
        let waiting = wait_policy(
            &client,
            &ns,
            "mailer",
            "a task to wait on",
            Duration::from_secs(60),
            |p| {
                p.status.as_ref().is_some_and(|s| {
                    s.targets
                        .first()
                        .is_some_and(|t| t.cursor.as_deref().is_some_and(|c| c.contains("\"t\":")))
                })
            },
        )
        .await;
        let cursor = waiting.status.unwrap().targets[0].cursor.clone().unwrap();
        let task = task_ids(&[cursor]).pop().expect("a task id");
        let before = wait_mid_way(&es, &task).await;

        hold_policies(&client, &ns, "audit", &["mailer"]).await;
        let held = wait_policy(
            &client,
            &ns,
            "mailer",
            "the target held, its task cancelled",
            Duration::from_secs(60),
            |p| {
                p.status.as_ref().is_some_and(|s| {
                    s.targets
                        .first()
                        .is_some_and(|t| t.phase == TargetPhase::Held && t.cursor.is_none())
                })
            },
        )
        .await;
        let (status, answer) = es
            .call(reqwest::Method::GET, &format!("/_tasks/{task}"), None)
            .await;
        assert_eq!(
            status, 404,
            "the task neither runs nor left its stored result: {answer}"
        );
        let left = es.ids(&index).await.len() as u64 - 1;
        assert!(
            left > 0 && left <= MANY - before,
            "cancelled mid-way: {before} deleted when the hold landed, {left} expired left"
        );
        assert_eq!(
            es.ids(&index).await.len() as u64 - 1,
            left,
            "nothing more deleted while held"
        );
        println!(
            "{}: the hold landed after {before} of {MANY} deleted; {left} left while held",
            distribution.name()
        );
        assert_eq!(
            held.status.unwrap().targets[0].deleted,
            MANY - left,
            "what the cancelled task deleted before it stopped is counted"
        );

        Api::<LegalHold>::namespaced(client.clone(), &ns)
            .delete("audit", &DeleteParams::default())
            .await
            .unwrap();
        let done = wait_sweep_succeeded(
            &client,
            &ns,
            "mailer",
            "the sweep completed",
            Duration::from_secs(120),
        )
        .await;
        // What the cancelled task deleted before the hold and what the sweep deleted after
        // the release add up to every expired document, each counted once.
        assert_eq!(done.last_sweep.unwrap().deleted, MANY);
        assert_eq!(es.ids(&index).await, vec!["young".to_string()]);
        assert_eq!(
            stored_results_for(&es, &p).await,
            Vec::<String>::new(),
            "nothing of the sweep's tasks is left in .tasks"
        );
        operator.stop().await;
        es.delete_index(&index).await;
    }

    #[tokio::test]
    async fn a_hold_landing_while_a_delete_by_query_task_runs_cancels_it_and_holds_win() {
        let (client, ns) = setup("es-hold-task").await;
        let es = EsDouble::start().await;
        es.seed(
            "mailer-events-2026.01.02",
            &[
                ("old", json!({"@timestamp": days_ago(40)})),
                ("young", json!({"@timestamp": days_ago(1)})),
            ],
        );
        // The task keeps running: the sweep is waiting on it when the hold lands.
        es.set_running_polls(100_000);
        let operator = TestOperator::start(&ns).await;
        super::operator::es_store(&client, &ns, "search", &es.url(), None).await;
        wait_store_ready(&client, &ns, "search", true).await;
        create::<RetentionPolicy>(
            &client,
            &ns,
            policy_json(
                "mailer",
                "30d",
                json!([{"name": "events", "store": "search",
                        "elasticsearch": {"index": "mailer-events-*", "timestampField": "@timestamp"}}]),
            ),
        )
        .await;
        wait_policy(
            &client,
            &ns,
            "mailer",
            "a task to wait on",
            Duration::from_secs(60),
            |p| {
                p.status.as_ref().is_some_and(|s| {
                    s.targets
                        .first()
                        .is_some_and(|t| t.cursor.as_deref().is_some_and(|c| c.contains("\"t\":")))
                })
            },
        )
        .await;
        assert_eq!(es.task_count(), 1);

        hold_policies(&client, &ns, "audit", &["mailer"]).await;
        let held = wait_policy(
            &client,
            &ns,
            "mailer",
            "the target held, its task cancelled",
            Duration::from_secs(60),
            |p| {
                p.status.as_ref().is_some_and(|s| {
                    s.targets
                        .first()
                        .is_some_and(|t| t.phase == TargetPhase::Held && t.cursor.is_none())
                })
            },
        )
        .await;
        assert_eq!(
            es.cancelled_tasks(),
            1,
            "the running task was cancelled: the hold wins"
        );
        assert_eq!(
            es.ids("mailer-events-2026.01.02").len(),
            2,
            "nothing deleted"
        );
        assert!(
            held.status.unwrap().current_sweep.is_some(),
            "the sweep is paused, not over"
        );

        // Released: the sweep runs the target again with a new task and completes.
        es.set_running_polls(1);
        Api::<LegalHold>::namespaced(client.clone(), &ns)
            .delete("audit", &DeleteParams::default())
            .await
            .unwrap();
        let done = wait_sweep_succeeded(
            &client,
            &ns,
            "mailer",
            "the sweep completed",
            Duration::from_secs(60),
        )
        .await;
        assert_eq!(done.last_sweep.unwrap().deleted, 1);
        assert_eq!(
            es.ids("mailer-events-2026.01.02"),
            vec!["young".to_string()]
        );
        operator.stop().await;
    }
}
