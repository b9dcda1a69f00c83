//! Issue 10, items 17 and 19: sweeps that are true.
//!
//! 17. A LegalHold on a subject protects their data from retention sweeps: each store leaves
//!     the held subject's data out through the target's subject locator (Redis keys, S3
//!     prefixes and archives holding their records, an Elasticsearch `must_not`, a negative
//!     Loki line filter); where it cannot, the whole target is held and says why.
//! 19. `Compliant` is measured: what a sweep cannot judge is counted and makes it False.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::Utc;
use kube::api::DeleteParams;
use kube::Api;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use tombstone::api::retentionpolicy::{SweepOutcome, TargetPhase};
use tombstone::api::{ConditionStatus, LegalHold, RetentionPolicy};
use tombstone::backends::elasticsearch::{ElasticsearchBackend, ElasticsearchConfig};
use tombstone::backends::http::HttpAuth;
use tombstone::backends::loki::{LokiBackend, LokiConfig};
use tombstone::backends::{Backend, HeldSubjects, Limits, Next, Step, StepBudget, SweepJob};

use crate::fixtures::*;
use crate::support::elasticsearch::EsDouble;
use crate::support::loki::{now_ns, LokiDouble, SINGLE_TENANT};
use crate::support::s3::{S3Server, ACCESS_KEY_ID, SECRET_ACCESS_KEY};
use crate::support::RedisServer;

/// The held subject's id: a unique probe, so that finding it anywhere in the operator's own
/// trail (status, events) is a leak.
const HELD: &str = "u-held-5d1f";
/// Another subject, whose expired data goes.
const OTHER: &str = "u-other-77c3";

async fn hold_subject_by_secret(client: &kube::Client, ns: &str, name: &str, secret: &str) {
    create::<LegalHold>(
        client,
        ns,
        json!({"apiVersion": "tombstone.dev/v1alpha1", "kind": "LegalHold", "metadata": {"name": name},
               "spec": {"reason": "Litigation, Art. 17(3)(e)", "subjects": [{"secretRef": {"name": secret}}]}}),
    )
    .await;
    wait_hold_active(client, ns, name).await;
}

async fn wait_hold_active(client: &kube::Client, ns: &str, name: &str) {
    let api: Api<LegalHold> = Api::namespaced(client.clone(), ns);
    crate::support::wait_for(
        &format!("hold {name} active"),
        Duration::from_secs(30),
        || {
            let api = api.clone();
            async move {
                let h = api.get(name).await.ok()?;
                let st = h.status.as_ref()?;
                (condition(&st.conditions, "Active").0 == ConditionStatus::True).then_some(())
            }
        },
    )
    .await
}

async fn keys(conn: &mut redis::aio::MultiplexedConnection, pattern: &str) -> Vec<String> {
    let mut keys: Vec<String> = redis::cmd("KEYS")
        .arg(pattern)
        .query_async(conn)
        .await
        .unwrap();
    keys.sort();
    keys
}

async fn set_all(conn: &mut redis::aio::MultiplexedConnection, keys: &[String]) {
    let mut pipe = redis::pipe();
    for k in keys {
        pipe.cmd("SET").arg(k).arg("v").ignore();
    }
    let _: () = pipe.query_async(conn).await.unwrap();
}

/// Nothing of the held subject's identifier in the policy's status or its events.
async fn assert_no_identifier(client: &kube::Client, ns: &str, policy: &RetentionPolicy) {
    let status = serde_json::to_string(&policy.status).unwrap();
    assert!(!status.contains(HELD), "identifier in status: {status}");
    for (_, reason, note) in events_for(client, ns, "sessions").await {
        assert!(
            !note.contains(HELD) && !reason.contains(HELD),
            "identifier in an event: {note}"
        );
    }
}

#[tokio::test]
async fn a_held_subjects_redis_keys_survive_the_sweep_while_others_expire() {
    let (client, ns) = setup("fc-hold-redis").await;
    let redis = RedisServer::start();
    let mut conn = redis_conn(&redis.url()).await;
    set_all(
        &mut conn,
        &[
            format!("session:{HELD}:a"),
            format!("session:{HELD}:b"),
            // A neighbour whose id only starts like the held one: not held.
            format!("session:{HELD}0:a"),
            format!("session:{OTHER}:a"),
            format!("cart:{HELD}"),
            format!("cart:{OTHER}"),
        ],
    )
    .await;
    // Mode idle: the keys must be idle longer than the retention.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let operator = TestOperator::start(&ns).await;
    redis_store(&client, &ns, "cache", &redis.url(), json!({})).await;
    wait_store_ready(&client, &ns, "cache", true).await;
    create_secret(&client, &ns, "held-subject", json!({"userId": HELD})).await;
    hold_subject_by_secret(&client, &ns, "litigation", "held-subject").await;

    create::<RetentionPolicy>(
        &client,
        &ns,
        policy_json(
            "sessions",
            "1s",
            json!([
                {"name": "sessions", "store": "cache",
                 "redis": {"keyPattern": "session:*", "mode": "idle"},
                 "subject": {"redis": {"keys": ["session:{userId}:*"]}}},
                // No subject locator: the sweep cannot tell the held subject's carts apart.
                {"name": "carts", "store": "cache",
                 "redis": {"keyPattern": "cart:*", "mode": "idle"}},
            ]),
        ),
    )
    .await;
    let policy = wait_sweep_completed(&client, &ns, "sessions", None).await;
    let status = policy.status.clone().unwrap();
    assert_eq!(
        keys(&mut conn, "session:*").await,
        vec![format!("session:{HELD}:a"), format!("session:{HELD}:b")],
        "the held subject's expired keys survive; everyone else's go"
    );
    assert_eq!(
        keys(&mut conn, "cart:*").await,
        vec![format!("cart:{HELD}"), format!("cart:{OTHER}")],
        "a target without a subject locator is held whole"
    );
    let sessions = &status.targets[0];
    assert_eq!(
        (
            sessions.phase,
            sessions.scanned,
            sessions.deleted,
            sessions.held
        ),
        (TargetPhase::Idle, 4, 2, 2)
    );
    assert!(
        sessions
            .message
            .contains("2 kept for subjects a LegalHold holds"),
        "{}",
        sessions.message
    );
    let carts = &status.targets[1];
    assert_eq!(carts.phase, TargetPhase::Held);
    assert!(
        carts.message.contains("held whole by LegalHold litigation")
            && carts.message.contains("no subject locator"),
        "{}",
        carts.message
    );
    assert_eq!(
        status.last_sweep.as_ref().unwrap().outcome,
        SweepOutcome::Succeeded
    );
    let (compliant, reason, message) = condition(&status.conditions, "Compliant");
    assert_eq!(
        (compliant, reason.as_str()),
        (ConditionStatus::True, "LegalHold"),
        "{message}"
    );
    // The sweep's receipt records what was kept for the hold.
    let record = logged_audit_record(
        status
            .last_sweep
            .as_ref()
            .and_then(|l| l.receipt.as_deref())
            .expect("a sweep receipt"),
    );
    assert_eq!(record["targets"][0]["held"], json!(2));
    assert!(!record.to_string().contains(HELD));
    assert_no_identifier(&client, &ns, &policy).await;
    operator.stop().await;
}

#[tokio::test]
async fn a_subject_held_by_digest_only_holds_every_target_until_released() {
    let (client, ns) = setup("fc-hold-digest").await;
    let redis = RedisServer::start();
    let mut conn = redis_conn(&redis.url()).await;
    set_all(
        &mut conn,
        &[format!("session:{HELD}:a"), format!("session:{OTHER}:a")],
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let operator = TestOperator::start(&ns).await;
    redis_store(&client, &ns, "cache", &redis.url(), json!({})).await;
    wait_store_ready(&client, &ns, "cache", true).await;
    let digest = format!("hmac-sha256:{}", "0".repeat(64));
    create::<LegalHold>(
        &client,
        &ns,
        json!({"apiVersion": "tombstone.dev/v1alpha1", "kind": "LegalHold", "metadata": {"name": "by-digest"},
               "spec": {"reason": "Litigation", "subjects": [{"digest": digest}]}}),
    )
    .await;
    wait_hold_active(&client, &ns, "by-digest").await;
    create::<RetentionPolicy>(
        &client,
        &ns,
        policy_json(
            "sessions",
            "1s",
            json!([{"name": "sessions", "store": "cache",
                    "redis": {"keyPattern": "session:*", "mode": "idle"},
                    "subject": {"redis": {"keys": ["session:{userId}:*"]}}}]),
        ),
    )
    .await;
    let held = wait_policy(
        &client,
        &ns,
        "sessions",
        "the target held",
        Duration::from_secs(30),
        |p| {
            p.status.as_ref().is_some_and(|s| {
                s.observed_generation == p.metadata.generation
                    && s.targets
                        .first()
                        .is_some_and(|t| t.phase == TargetPhase::Held)
            })
        },
    )
    .await
    .status
    .unwrap();
    assert!(
        held.targets[0].message.contains("by-digest")
            && held.targets[0].message.contains("digest only"),
        "{}",
        held.targets[0].message
    );
    assert!(held.last_sweep.is_none(), "nothing was swept");
    assert_eq!(
        condition(&held.conditions, "Compliant").1,
        "LegalHold",
        "kept lawfully, and said so"
    );
    assert_eq!(count_keys(&mut conn, "session:*").await, 2);

    // Released: the sweep runs without any edit to the policy.
    Api::<LegalHold>::namespaced(client.clone(), &ns)
        .delete("by-digest", &DeleteParams::default())
        .await
        .unwrap();
    let swept = wait_sweep_completed(&client, &ns, "sessions", None)
        .await
        .status
        .unwrap();
    assert_eq!(swept.targets[0].deleted, 2);
    assert_eq!(count_keys(&mut conn, "session:*").await, 0);
    operator.stop().await;
}

fn record(user: &str, n: u32) -> String {
    format!("{{\"userId\":\"{user}\",\"n\":{n}}}\n")
}

#[tokio::test]
async fn a_held_subjects_s3_prefix_and_archives_survive_the_sweep_while_others_expire() {
    let (client, ns) = setup("fc-hold-s3").await;
    let server = S3Server::start();
    server.create_bucket("archive", false, false).await;
    for key in [
        format!("app/users/{HELD}/a.json"),
        format!("app/users/{HELD}0/a.json"),
        format!("app/users/{OTHER}/a.json"),
    ] {
        server.put("archive", &key, "{}").await;
    }
    let with_held = [record(OTHER, 1), record(HELD, 2), record(OTHER, 3)].concat();
    server
        .put("archive", "app/logs/day1.jsonl", with_held)
        .await;
    server
        .put("archive", "app/logs/day2.jsonl", record(OTHER, 4))
        .await;
    // Older than the retention when the sweep starts.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let operator = TestOperator::start(&ns).await;
    create_credentials_secret(
        &client,
        &ns,
        "archive-creds",
        json!({"accessKeyId": ACCESS_KEY_ID, "secretAccessKey": SECRET_ACCESS_KEY}),
    )
    .await;
    crate::s3::s3_store(&client, &ns, "archive", "archive", &server.endpoint()).await;
    wait_store_ready(&client, &ns, "archive", true).await;
    create_secret(&client, &ns, "held-subject", json!({"userId": HELD})).await;
    hold_subject_by_secret(&client, &ns, "litigation", "held-subject").await;
    create::<RetentionPolicy>(
        &client,
        &ns,
        policy_json(
            "sessions",
            "2s",
            json!([{"name": "archive", "store": "archive", "s3": {"prefix": "app/"},
                    "subject": {"s3": {
                        "keyPrefixes": ["app/users/{userId}/"],
                        "records": {"prefix": "app/logs/", "field": "userId", "equals": "{userId}"}}}}]),
        ),
    )
    .await;
    let policy = wait_sweep_completed(&client, &ns, "sessions", None).await;
    let status = policy.status.clone().unwrap();
    assert_eq!(
        server.keys("archive", "").await,
        vec![
            "app/logs/day1.jsonl".to_string(),
            format!("app/users/{HELD}/a.json"),
        ],
        "the held subject's objects and the archive holding their record survive"
    );
    assert_eq!(
        server.get("archive", "app/logs/day1.jsonl").await,
        [record(OTHER, 1), record(HELD, 2), record(OTHER, 3)]
            .concat()
            .into_bytes(),
        "the archive is kept as it was"
    );
    let target = &status.targets[0];
    assert_eq!(
        (target.scanned, target.deleted, target.held),
        (5, 3, 2),
        "{}",
        target.message
    );
    assert!(
        target.oldest_remaining.is_some(),
        "the oldest object kept is reported"
    );
    assert_eq!(condition(&status.conditions, "Compliant").1, "LegalHold");
    assert_no_identifier(&client, &ns, &policy).await;
    operator.stop().await;
}

#[tokio::test]
async fn redis_keys_without_a_readable_timestamp_are_counted_and_make_the_policy_not_compliant() {
    let (client, ns) = setup("fc-unjudged").await;
    let redis = RedisServer::start();
    let mut conn = redis_conn(&redis.url()).await;
    let old = (Utc::now() - chrono::Duration::days(40)).timestamp();
    let young = Utc::now() - chrono::Duration::days(1);
    let _: () = redis::pipe()
        .cmd("HSET")
        .arg("order:1")
        .arg("createdAt")
        .arg(old)
        .ignore()
        .cmd("HSET")
        .arg("order:2")
        .arg("createdAt")
        .arg(young.timestamp())
        .ignore()
        .cmd("HSET")
        .arg("order:3")
        .arg("total")
        .arg("12")
        .ignore()
        .cmd("HSET")
        .arg("order:4")
        .arg("createdAt")
        .arg("last tuesday")
        .ignore()
        .query_async(&mut conn)
        .await
        .unwrap();
    let operator = TestOperator::start(&ns).await;
    redis_store(&client, &ns, "cache", &redis.url(), json!({})).await;
    wait_store_ready(&client, &ns, "cache", true).await;
    create::<RetentionPolicy>(
        &client,
        &ns,
        policy_json(
            "orders",
            "30d",
            json!([{"name": "orders", "store": "cache",
                    "redis": {"keyPattern": "order:*", "mode": "timestamp", "timestampField": "createdAt"}}]),
        ),
    )
    .await;
    let status = wait_sweep_completed(&client, &ns, "orders", None)
        .await
        .status
        .unwrap();
    let target = &status.targets[0];
    assert_eq!((target.scanned, target.deleted, target.unjudged), (4, 1, 2));
    assert_eq!(
        target.oldest_remaining.map(|t| t.0.timestamp()),
        Some(young.timestamp()),
        "the oldest timestamp kept"
    );
    assert!(
        target
            .message
            .contains("2 could not be judged (no readable timestamp)"),
        "{}",
        target.message
    );
    let (compliant, reason, message) = condition(&status.conditions, "Compliant");
    assert_eq!(
        (compliant, reason.as_str()),
        (ConditionStatus::False, "ItemsUnjudged")
    );
    assert!(message.contains("2 in target orders"), "{message}");
    assert_eq!(count_keys(&mut conn, "order:*").await, 3);
    operator.stop().await;
}

fn budget() -> StepBudget {
    StepBudget {
        max_time: Duration::from_secs(10),
        cancel: CancellationToken::new(),
        fence: Default::default(),
    }
}

fn held(user: &str) -> HeldSubjects {
    HeldSubjects(vec![BTreeMap::from([(
        "userId".to_string(),
        user.to_string(),
    )])])
}

/// Runs a sweep to its end, adding up its steps.
async fn run_sweep(backend: &dyn Backend, job: &SweepJob) -> Step {
    let mut total = Step::default();
    let mut cursor: Option<String> = None;
    for _ in 0..600 {
        let step = backend
            .sweep_step(job, cursor.as_deref(), &budget())
            .await
            .expect("sweep step");
        assert!(step.failure.is_none(), "{:?}", step.failure);
        total.scanned += step.scanned;
        total.deleted += step.deleted;
        total.held += step.held;
        total.unjudged += step.unjudged;
        total.oldest_remaining = total.oldest_remaining.or(step.oldest_remaining);
        match step.next {
            Next::Done => return total,
            Next::Continue(c) => cursor = Some(c),
            Next::Wait { cursor: c, .. } => {
                cursor = Some(c);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    panic!("the sweep did not finish");
}

#[tokio::test]
async fn elasticsearch_sweeps_leave_a_held_subjects_documents_and_count_undated_ones() {
    let es = EsDouble::start().await;
    let old = (Utc::now() - chrono::Duration::days(40)).to_rfc3339();
    let young = (Utc::now() - chrono::Duration::days(1)).to_rfc3339();
    // Every document of this index is expired: without a hold it would be deleted whole.
    es.seed(
        "events-old",
        &[
            ("held-1", json!({"@timestamp": old, "user": {"id": HELD}})),
            ("other-1", json!({"@timestamp": old, "user": {"id": OTHER}})),
        ],
    );
    es.seed(
        "events-new",
        &[
            ("held-2", json!({"@timestamp": old, "user": {"id": HELD}})),
            ("other-2", json!({"@timestamp": old, "user": {"id": OTHER}})),
            ("young", json!({"@timestamp": young, "user": {"id": OTHER}})),
            ("undated", json!({"user": {"id": OTHER}})),
        ],
    );
    let backend = ElasticsearchBackend::new(
        ElasticsearchConfig {
            url: es.url(),
            auth: HttpAuth::None,
            delete_requests_per_second: None,
        },
        Limits::default(),
    );
    let target = serde_json::from_value(json!({"name": "events", "store": "search",
        "elasticsearch": {"index": "events-*", "timestampField": "@timestamp"},
        "subject": {"elasticsearch": {"term": {"user.id": "{userId}"}}}}))
    .unwrap();
    let mut job = SweepJob {
        target,
        retention: "30d".parse().unwrap(),
        dry_run: true,
        cutoff: Utc::now() - chrono::Duration::days(30),
        held: held(HELD),
    };
    let dry = run_sweep(&backend, &job).await;
    job.dry_run = false;
    let real = run_sweep(&backend, &job).await;
    assert_eq!(
        (dry.deleted, dry.held, dry.unjudged),
        (2, 2, 1),
        "the dry run"
    );
    assert_eq!((real.deleted, real.held, real.unjudged), (2, 2, 1));
    // The held subject's expired documents are the oldest left, and both runs say so.
    let held_at = chrono::DateTime::parse_from_rfc3339(&old)
        .unwrap()
        .timestamp();
    assert_eq!(dry.oldest_remaining.map(|t| t.timestamp()), Some(held_at));
    assert_eq!(real.oldest_remaining.map(|t| t.timestamp()), Some(held_at));
    assert_eq!(es.ids("events-old"), vec!["held-1"]);
    assert_eq!(es.ids("events-new"), vec!["held-2", "undated", "young"]);
}

#[tokio::test]
async fn loki_sweeps_leave_a_held_subjects_lines() {
    let double = LokiDouble::start().await;
    let old = now_ns() - 10 * 86_400_000_000_000;
    double.push_flushed(
        SINGLE_TENANT,
        &[("app", "shop")],
        &[
            (old, &format!("login uid={HELD} ok")),
            (old + 1, &format!("login uid={HELD}0 ok")),
            (old + 2, &format!("login uid={OTHER} ok")),
            (
                now_ns() - 3_600_000_000_000,
                &format!("login uid={OTHER} new"),
            ),
        ],
    );
    let backend = LokiBackend::new(
        LokiConfig {
            url: double.url(),
            tenant: None,
            auth: HttpAuth::None,
            resubmit_after: std::time::Duration::from_secs(1),
        },
        Limits::default(),
    );
    let target = serde_json::from_value(json!({"name": "logs", "store": "logs",
        "loki": {"selector": "{app=\"shop\"}"},
        "subject": {"loki": {"lineFilter": "uid={userId} "}}}))
    .unwrap();
    let job = SweepJob {
        target,
        retention: "1d".parse().unwrap(),
        dry_run: false,
        cutoff: Utc::now() - chrono::Duration::days(1),
        held: held(HELD),
    };
    let swept = run_sweep(&backend, &job).await;
    assert_eq!(swept.deleted, 2, "the other subjects' old lines");
    let mut lines: Vec<String> = double
        .lines(SINGLE_TENANT)
        .into_iter()
        .map(|(_, l)| l)
        .collect();
    lines.sort();
    assert_eq!(
        lines,
        vec![
            format!("login uid={HELD} ok"),
            format!("login uid={OTHER} new")
        ]
    );
}

/// Item 18: Loki in `deletion_mode: filter-only` only hides deleted lines. The backend reads
/// the tenant's mode where Loki exposes it (`GET /runtime_config`, `GET /config`) and refuses
/// to erase, verify or sweep there, instead of reporting a deletion that never happens.
#[tokio::test]
async fn loki_in_filter_only_mode_refuses_erasures_and_sweeps_with_a_clear_reason() {
    use tombstone::backends::{SubjectAction, SubjectJob};
    let double = LokiDouble::start().await;
    let old = now_ns() - 10 * 86_400_000_000_000;
    double.push(
        SINGLE_TENANT,
        &[("app", "shop")],
        &[(old, &format!("login uid={HELD} ok"))],
    );
    let backend = LokiBackend::new(
        LokiConfig {
            url: double.url(),
            tenant: None,
            auth: HttpAuth::None,
            resubmit_after: std::time::Duration::from_secs(1),
        },
        Limits::default(),
    );
    assert_eq!(
        backend.deletion_mode().await.unwrap().as_deref(),
        Some("filter-and-delete"),
        "the default, from GET /config"
    );
    double.set_filter_only(SINGLE_TENANT);
    assert_eq!(
        backend.deletion_mode().await.unwrap().as_deref(),
        Some("filter-only"),
        "the tenant's override, from GET /runtime_config"
    );
    let target: tombstone::api::retentionpolicy::Target =
        serde_json::from_value(json!({"name": "logs", "store": "logs",
            "loki": {"selector": "{app=\"shop\"}"},
            "subject": {"loki": {"lineFilter": "uid={userId} "}}}))
        .unwrap();
    for action in [SubjectAction::Erase, SubjectAction::Verify] {
        let job = SubjectJob {
            target: target.clone(),
            identifiers: BTreeMap::from([("userId".to_string(), HELD.to_string())]),
            action,
        };
        let e = backend
            .subject_step(&job, None, &budget())
            .await
            .expect_err("refused");
        assert_eq!(e.reason(), "DeletionModeFilterOnly", "{action:?}: {e}");
        assert!(e.to_string().contains("filter-and-delete"), "{e}");
        assert!(!e.to_string().contains(HELD), "no identifier in {e}");
    }
    let sweep = SweepJob {
        target,
        retention: "1d".parse().unwrap(),
        dry_run: false,
        cutoff: Utc::now() - chrono::Duration::days(1),
        held: HeldSubjects::default(),
    };
    let e = backend
        .sweep_step(&sweep, None, &budget())
        .await
        .expect_err("refused");
    assert_eq!(e.reason(), "DeletionModeFilterOnly");
    assert!(
        !double
            .seen()
            .iter()
            .any(|s| s.method == "POST" && s.path == "/loki/api/v1/delete"),
        "no delete request was sent"
    );
    assert_eq!(double.lines(SINGLE_TENANT).len(), 1);
}

/// Item 10: a reshard (a slot moved to a primary that joined after the backend first
/// connected) must not turn into "nothing left": Verify finds the subject's key on its new
/// primary, Erase erases it there, and a sweep reaches the new primary too.
#[tokio::test]
async fn a_redis_cluster_reshard_is_followed_by_erasures_and_sweeps() {
    use tombstone::backends::redis::{RedisBackend, RedisConfig};
    use tombstone::backends::{SubjectAction, SubjectJob};
    let mut cluster = crate::support::RedisCluster::start(3);
    let backend = RedisBackend::new(
        RedisConfig {
            url: cluster.seed_url(),
            password: None,
            cluster: true,
        },
        Limits::default(),
    );
    assert!(backend.probe().await.unwrap().contains("3 primaries"));
    let key = format!("session:{HELD}:1");
    let swept_key = format!("cart:{{{HELD}}}:1");
    cluster.set(&key, "v");
    cluster.set(&swept_key, "v");
    let new = cluster.add_node();
    for k in [&key, &swept_key] {
        let slot = cluster.slot_of(k);
        let owner = cluster.owner_of(slot);
        cluster.move_slot(slot, owner, new);
    }
    assert_eq!(cluster.owner_of(cluster.slot_of(&key)), new);

    let target: tombstone::api::retentionpolicy::Target =
        serde_json::from_value(json!({"name": "sessions", "store": "cache",
            "redis": {"keyPattern": "session:*", "mode": "expire"},
            "subject": {"redis": {"keys": ["session:{userId}:*"]}}}))
        .unwrap();
    let job = |action| SubjectJob {
        target: target.clone(),
        identifiers: BTreeMap::from([("userId".to_string(), HELD.to_string())]),
        action,
    };
    let step = |action| {
        let backend = &backend;
        let job = job(action);
        async move {
            crate::fixtures::subject_until_done(backend, &job, &budget())
                .await
                .expect("subject step")
        }
    };
    assert_eq!(
        step(SubjectAction::Verify).await.count,
        1,
        "the key on the new primary is still there"
    );
    assert_eq!(step(SubjectAction::Erase).await.count, 1);
    assert_eq!(step(SubjectAction::Verify).await.count, 0);
    assert_eq!(
        cluster.nodes()[new].cli(&["EXISTS", &key]).unwrap().trim(),
        "0"
    );

    // A sweep reaches the new primary: the key there gets its TTL.
    let sweep: tombstone::api::retentionpolicy::Target =
        serde_json::from_value(json!({"name": "carts", "store": "cache",
            "redis": {"keyPattern": "cart:*", "mode": "expire"}}))
        .unwrap();
    let swept = run_sweep(
        &backend,
        &SweepJob {
            target: sweep,
            retention: "1d".parse().unwrap(),
            dry_run: false,
            cutoff: Utc::now() - chrono::Duration::days(1),
            held: HeldSubjects::default(),
        },
    )
    .await;
    assert_eq!((swept.scanned, swept.deleted), (1, 1));
    let ttl: i64 = cluster.nodes()[new]
        .cli(&["TTL", &swept_key])
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(ttl > 0, "TTL {ttl}");
}

/// Item 17, a hold placed while a sweep's deletion runs in the store: the delete-by-query
/// submitted before the hold (without the subject left out) is cancelled and the sweep starts
/// over around the held subject.
#[tokio::test]
async fn a_subject_hold_placed_during_a_sweep_cancels_the_deletion_under_way() {
    let (client, ns) = setup("fc-hold-midsweep").await;
    let es = EsDouble::start().await;
    let old = (Utc::now() - chrono::Duration::days(40)).to_rfc3339();
    let young = (Utc::now() - chrono::Duration::days(1)).to_rfc3339();
    es.seed(
        "events-1",
        &[
            ("held", json!({"@timestamp": old, "user": {"id": HELD}})),
            ("other", json!({"@timestamp": old, "user": {"id": OTHER}})),
            ("young", json!({"@timestamp": young, "user": {"id": OTHER}})),
        ],
    );
    // The first task runs until it is cancelled or completed.
    es.set_running_polls(u32::MAX);
    let operator = TestOperator::start(&ns).await;
    create::<tombstone::api::DataStore>(
        &client,
        &ns,
        json!({"apiVersion": "tombstone.dev/v1alpha1", "kind": "DataStore", "metadata": {"name": "search"},
               "spec": {"elasticsearch": {"url": es.url()}}}),
    )
    .await;
    wait_store_ready(&client, &ns, "search", true).await;
    create::<RetentionPolicy>(
        &client,
        &ns,
        policy_json(
            "sessions",
            "30d",
            json!([{"name": "events", "store": "search",
                    "elasticsearch": {"index": "events-*", "timestampField": "@timestamp"},
                    "subject": {"elasticsearch": {"term": {"user.id": "{userId}"}}}}]),
        ),
    )
    .await;
    wait_policy(
        &client,
        &ns,
        "sessions",
        "the sweep waiting on its task",
        Duration::from_secs(30),
        // The cursor names the task before the step that submits it: both are waited for.
        |p| {
            es.task_count() > 0
                && p.status
                    .as_ref()
                    .is_some_and(|s| s.targets.first().is_some_and(|t| t.cursor.is_some()))
        },
    )
    .await;
    assert_eq!(es.task_count(), 1);
    es.set_running_polls(0);

    create_secret(&client, &ns, "held-subject", json!({"userId": HELD})).await;
    hold_subject_by_secret(&client, &ns, "litigation", "held-subject").await;
    crate::support::wait_for(
        "the task submitted before the hold cancelled",
        Duration::from_secs(30),
        || async { (es.cancelled_tasks() == 1).then_some(()) },
    )
    .await;
    // Whatever still runs completes now.
    es.complete_tasks();
    let status = wait_sweep_completed(&client, &ns, "sessions", None)
        .await
        .status
        .unwrap();
    assert_eq!(es.ids("events-1"), vec!["held", "young"]);
    let target = &status.targets[0];
    assert_eq!((target.deleted, target.held), (1, 1), "{}", target.message);
    assert_eq!(status.last_sweep.unwrap().outcome, SweepOutcome::Succeeded);
    operator.stop().await;
}

/// Item 10, a failover: the replica promoted after the backend first connected serves the
/// subject's key now; the old primary (a replica now) redirects. Erasure and sweeps follow
/// the new primary instead of failing on, or trusting, the old one.
#[tokio::test]
async fn a_redis_cluster_failover_is_followed_by_erasures_and_sweeps() {
    use tombstone::backends::redis::{RedisBackend, RedisConfig};
    use tombstone::backends::{SubjectAction, SubjectJob};
    let mut cluster = crate::support::RedisCluster::start(3);
    let key = format!("session:{HELD}:1");
    // A hash tag of the other key's name: the same slot, so the same (promoted) primary.
    let swept_key = format!("session:{{{key}}}:x");
    cluster.set(&key, "v");
    let owner = cluster.owner_of(cluster.slot_of(&key));
    let replica = cluster.add_replica(owner);
    let backend = RedisBackend::new(
        RedisConfig {
            url: cluster.seed_url(),
            password: None,
            cluster: true,
        },
        Limits::default(),
    );
    assert!(backend.probe().await.unwrap().contains("3 primaries"));
    cluster.failover(replica);
    assert_eq!(cluster.owner_of(cluster.slot_of(&key)), replica);
    cluster.set(&swept_key, "v");
    assert_eq!(cluster.owner_of(cluster.slot_of(&swept_key)), replica);

    let target: tombstone::api::retentionpolicy::Target =
        serde_json::from_value(json!({"name": "sessions", "store": "cache",
            "redis": {"keyPattern": "session:*", "mode": "expire"},
            "subject": {"redis": {"keys": ["session:{userId}:*"]}}}))
        .unwrap();
    let job = |action| SubjectJob {
        target: target.clone(),
        identifiers: BTreeMap::from([("userId".to_string(), HELD.to_string())]),
        action,
    };
    let erased =
        crate::fixtures::subject_until_done(&backend, &job(SubjectAction::Erase), &budget())
            .await
            .expect("the erasure follows the new primary");
    assert_eq!(erased.count, 1);
    let verified = backend
        .subject_step(&job(SubjectAction::Verify), None, &budget())
        .await
        .unwrap();
    assert_eq!(verified.count, 0);
    assert_eq!(
        cluster.nodes()[replica]
            .cli(&["EXISTS", &key])
            .unwrap()
            .trim(),
        "0"
    );
    let swept = run_sweep(
        &backend,
        &SweepJob {
            target,
            retention: "1d".parse().unwrap(),
            dry_run: false,
            cutoff: Utc::now() - chrono::Duration::days(1),
            held: HeldSubjects::default(),
        },
    )
    .await;
    assert_eq!(
        swept.deleted, 1,
        "the key on the promoted replica got its TTL"
    );
    let ttl: i64 = cluster.nodes()[replica]
        .cli(&["TTL", &swept_key])
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(ttl > 0, "TTL {ttl}");
}
