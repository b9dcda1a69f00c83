//! Subject steps are bounded: a Redis key-glob erasure and an S3 archive rewrite stop when
//! the step's time is spent or the step is cancelled, hand back a cursor, and resume there
//! with exact counts.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use kube::api::{Api, WatchEvent, WatchParams};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use tombstone::api::erasurerequest::ErasurePhase;
use tombstone::api::retentionpolicy::Target;
use tombstone::api::{ErasureRequest, RetentionPolicy};
use tombstone::backends::redis::{RedisBackend, RedisConfig};
use tombstone::backends::{Backend, Limits, Next, StepBudget, SubjectAction, SubjectJob};
use tombstone::controller::Settings;

use crate::fixtures::*;
use crate::support::RedisServer;

const USER: &str = "u-77";
const SUBJECT_KEYS: usize = 20_000;

fn redis_target() -> Target {
    serde_json::from_value(json!({
        "name": "sessions", "store": "cache",
        "redis": {"keyPattern": "session:*"},
        "subject": {"redis": {"keys": ["session:{userId}:*"]}}
    }))
    .unwrap()
}

fn job(target: Target, ids: &[(&str, &str)], action: SubjectAction) -> SubjectJob {
    SubjectJob {
        target,
        identifiers: ids
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
        action,
    }
}

fn budget(max_time: Duration, cancel: CancellationToken) -> StepBudget {
    StepBudget {
        max_time,
        cancel,
        fence: Default::default(),
    }
}

/// Runs steps with a 1 ms budget until done. Returns the total count and how many steps it
/// took; every step but the last hands back a cursor that holds no identifier, and the
/// counts of the steps add up to the last step's (unfinished steps report none: the
/// running total travels in the cursor).
async fn run_to_done(backend: &dyn Backend, job: &SubjectJob, secret: &str) -> (u64, usize) {
    let mut cursor: Option<String> = None;
    let mut steps = 0;
    let mut counted: u64;
    let mut added = 0u64;
    loop {
        steps += 1;
        assert!(steps < 10_000, "no end in sight");
        let step = backend
            .subject_step(
                job,
                cursor.as_deref(),
                &budget(Duration::from_millis(1), CancellationToken::new()),
            )
            .await
            .expect("a subject step");
        assert!(step.failure.is_none(), "{:?}", step.failure);
        added += step.count;
        counted = step.count;
        match step.next {
            Next::Continue(c) => {
                assert!(!c.contains(secret), "a cursor holds an identifier: {c}");
                cursor = Some(c);
            }
            Next::Done => break,
            Next::Wait { .. } => panic!("a subject step never waits on Redis"),
        }
    }
    assert_eq!(added, counted, "the steps' counts add up to the total");
    (counted, steps)
}

fn redis_backend(redis: &RedisServer) -> RedisBackend {
    RedisBackend::new(
        RedisConfig {
            url: redis.url(),
            password: None,
            cluster: false,
        },
        Limits::default(),
    )
}

async fn seed_redis(conn: &mut redis::aio::MultiplexedConnection) {
    seed(conn, &format!("session:{USER}:"), SUBJECT_KEYS).await;
    // Neighbours: an id the subject's is a prefix of, and one that is a prefix of it.
    seed(conn, &format!("session:{USER}0:"), 500).await;
    seed(conn, "session:u-7:", 500).await;
}

#[tokio::test]
async fn a_redis_key_glob_erasure_takes_many_bounded_steps_and_counts_each_key_once() {
    let redis = RedisServer::start();
    let mut conn = redis_conn(&redis.url()).await;
    seed_redis(&mut conn).await;
    let backend = redis_backend(&redis);
    let ids = [("userId", USER)];

    let (found, find_steps) = run_to_done(
        &backend,
        &job(redis_target(), &ids, SubjectAction::Find),
        USER,
    )
    .await;
    assert_eq!(found, SUBJECT_KEYS as u64, "found exactly");
    let (erased, erase_steps) = run_to_done(
        &backend,
        &job(redis_target(), &ids, SubjectAction::Erase),
        USER,
    )
    .await;
    assert_eq!(erased, SUBJECT_KEYS as u64, "erased exactly, each key once");
    assert!(
        find_steps > 2 && erase_steps > 2,
        "a 1 ms budget takes many steps: find {find_steps}, erase {erase_steps}"
    );
    let (left, _) = run_to_done(
        &backend,
        &job(redis_target(), &ids, SubjectAction::Verify),
        USER,
    )
    .await;
    assert_eq!(left, 0);
    assert_eq!(count_keys(&mut conn, &format!("session:{USER}:*")).await, 0);
    assert_eq!(
        count_keys(&mut conn, &format!("session:{USER}0:*")).await,
        500
    );
    assert_eq!(count_keys(&mut conn, "session:u-7:*").await, 500);
}

#[tokio::test]
async fn a_cancelled_redis_subject_step_returns_at_once_with_its_cursor() {
    let redis = RedisServer::start();
    let mut conn = redis_conn(&redis.url()).await;
    seed_redis(&mut conn).await;
    let backend = redis_backend(&redis);
    let erase = job(redis_target(), &[("userId", USER)], SubjectAction::Erase);
    // One step of work first (after the step that only checkpoints the erasure's ledger),
    // so the cancelled step has a position to hand back.
    let mut cursor: Option<String> = None;
    for _ in 0..2 {
        let step = backend
            .subject_step(
                &erase,
                cursor.as_deref(),
                &budget(Duration::from_millis(1), CancellationToken::new()),
            )
            .await
            .expect("a first step");
        let Next::Continue(c) = step.next else {
            panic!("a 1 ms step over 20,000 keys is not done: {:?}", step.next);
        };
        cursor = Some(c);
    }
    let cursor = cursor.expect("a cursor");
    let before = count_keys(&mut conn, &format!("session:{USER}:*")).await;
    assert!(before < SUBJECT_KEYS, "the first step erased some keys");
    let cancel = CancellationToken::new();
    cancel.cancel();
    let started = std::time::Instant::now();
    let step = backend
        .subject_step(
            &erase,
            Some(&cursor),
            &budget(Duration::from_secs(60), cancel),
        )
        .await
        .expect("a cancelled step is no error");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "returned promptly: {:?}",
        started.elapsed()
    );
    assert!(step.failure.is_none());
    assert_eq!(step.next, Next::Continue(cursor.clone()), "where it stood");
    assert_eq!(step.count, 0, "an unfinished step reports no count");
    let after = count_keys(&mut conn, &format!("session:{USER}:*")).await;
    assert_eq!(after, before, "the cancelled step erased nothing");
    // The cursor resumes: the rest is erased, and the total is exact.
    let (erased, _) = {
        let mut c = Some(cursor);
        loop {
            let s = backend
                .subject_step(
                    &erase,
                    c.as_deref(),
                    &budget(Duration::from_secs(60), CancellationToken::new()),
                )
                .await
                .unwrap();
            match s.next {
                Next::Continue(n) => c = Some(n),
                _ => break (s.count, ()),
            }
        }
    };
    assert_eq!(erased, SUBJECT_KEYS as u64);
}

#[tokio::test]
async fn an_erasure_request_over_many_redis_keys_checkpoints_and_completes_exactly() {
    const KEYS: usize = 6_000;
    let (client, ns) = setup("bounded-steps").await;
    let redis = RedisServer::start();
    let mut conn = redis_conn(&redis.url()).await;
    seed(&mut conn, &format!("session:{USER}:"), KEYS).await;
    seed(&mut conn, &format!("session:{USER}0:"), 2_000).await;
    // Steps this short do one SCAN page each, so the erasure checkpoints between pages.
    let settings = Settings {
        checkpoint_interval: Duration::from_millis(1),
        ..fast_settings()
    };
    let operator = TestOperator::start_with(&ns, None, None, settings).await;
    redis_store(&client, &ns, "cache", &redis.url(), json!({})).await;
    wait_store_ready(&client, &ns, "cache", true).await;
    let mut p = policy_json(
        "sessions",
        "30d",
        json!([{"name": "sessions", "store": "cache",
                "redis": {"keyPattern": "session:*"},
                "subject": {"redis": {"keys": ["session:{userId}:*"]}}}]),
    );
    p["spec"]["suspend"] = json!(true);
    create::<RetentionPolicy>(&client, &ns, p).await;
    create_subject_secret(&client, &ns, "dsr-ids", json!({"userId": USER})).await;

    // Every status the request goes through, from its creation on.
    let api: Api<ErasureRequest> = Api::namespaced(client.clone(), &ns);
    let mut events = api
        .watch(&WatchParams::default().fields("metadata.name=dsr-big"), "0")
        .await
        .unwrap()
        .boxed();
    request_erasure(&client, &ns, "dsr-big", "dsr-ids").await;
    let mut cursors_while_erasing = 0;
    let done = tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(event) = events.try_next().await.unwrap() {
            let (WatchEvent::Added(r) | WatchEvent::Modified(r)) = event else {
                continue;
            };
            let Some(status) = r.status.clone() else {
                continue;
            };
            if status.phase == ErasurePhase::Erasing
                && status.targets.iter().any(|t| t.cursor.is_some())
            {
                cursors_while_erasing += 1;
                for t in &status.targets {
                    assert!(!t.cursor.as_deref().unwrap_or_default().contains(USER));
                }
            }
            if status.phase == ErasurePhase::Completed {
                return status;
            }
            assert_ne!(status.phase, ErasurePhase::Failed, "{status:?}");
        }
        panic!("the watch ended before the request completed");
    })
    .await
    .expect("the request completes within 120 s");
    assert!(
        cursors_while_erasing > 0,
        "the erasure checkpointed a cursor while erasing"
    );
    assert_eq!(
        done.totals.as_ref().map(|t| (t.found, t.erased)),
        Some((KEYS as u64, KEYS as u64))
    );
    assert_eq!(count_keys(&mut conn, &format!("session:{USER}:*")).await, 0);
    assert_eq!(
        count_keys(&mut conn, &format!("session:{USER}0:*")).await,
        2_000
    );
    operator.stop().await;
}

const EMAIL: &str = "bounded-5c2e@example.org";
const ARCHIVES: u32 = 30;
const PREFIX_OBJECTS: usize = 1_200;

fn archive_record(to: &str, n: u32) -> String {
    format!("{{\"msg\":{{\"recipient\":\"{to}\",\"id\":{n}}}}}\n")
}

#[tokio::test]
async fn an_s3_erasure_takes_bounded_steps_and_rewrites_every_archive_exactly_once() {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    let server = crate::support::s3::S3Server::start();
    server.create_bucket("steps", true, false).await;
    // Every archive has two versions: the older holds one of the subject's records, the
    // current one three.
    for a in 0..ARCHIVES {
        let key = format!("mail/logs/day{a:02}.jsonl");
        let v1 = [
            archive_record(EMAIL, 1),
            archive_record("bob@example.org", 2),
        ]
        .concat();
        let v2 = [
            v1.clone(),
            archive_record(EMAIL, 3),
            archive_record(EMAIL, 4),
        ]
        .concat();
        server.put("steps", &key, v1).await;
        server.put("steps", &key, v2).await;
    }
    // More than one listing page of the subject's objects, and a neighbour's.
    let client = server.client();
    let keys: Vec<String> = (0..PREFIX_OBJECTS)
        .map(|i| format!("users/47/f{i}"))
        .chain((0..20).map(|i| format!("users/470/f{i}")))
        .collect();
    futures::stream::iter(keys)
        .map(|key| {
            let client = client.clone();
            async move {
                client
                    .put_object()
                    .bucket("steps")
                    .key(&key)
                    .body(aws_sdk_s3::primitives::ByteStream::from_static(b"x"))
                    .send()
                    .await
                    .unwrap_or_else(|e| panic!("PutObject: {e:?}"));
            }
        })
        .buffer_unordered(16)
        .for_each(|_| async {})
        .await;

    let writes = Arc::new(AtomicU32::new(0));
    let counter = writes.clone();
    let backend =
        crate::s3::backend(&server, "steps").with_before_write_hook(Arc::new(move || {
            counter.fetch_add(1, Ordering::SeqCst);
            Box::pin(async {})
        }));
    let target: Target = serde_json::from_value(json!({
        "name": "archive", "store": "archive", "s3": {"prefix": "mail/"},
        "subject": {"s3": {
            "keyPrefixes": ["users/{userId}/"],
            "records": {"prefix": "mail/logs/", "field": "msg.recipient", "equals": "{email}"}
        }}
    }))
    .unwrap();
    let ids = [("userId", "47"), ("email", EMAIL)];
    let records = u64::from(ARCHIVES) * 4;
    let all = PREFIX_OBJECTS as u64 + records;

    let (found, find_steps) = run_to_done(
        &backend,
        &job(target.clone(), &ids, SubjectAction::Find),
        EMAIL,
    )
    .await;
    assert_eq!(found, all, "found exactly");
    assert_eq!(writes.load(Ordering::SeqCst), 0, "a find writes nothing");
    let (erased, erase_steps) = run_to_done(
        &backend,
        &job(target.clone(), &ids, SubjectAction::Erase),
        EMAIL,
    )
    .await;
    assert_eq!(erased, all, "erased exactly what was found");
    assert_eq!(
        writes.load(Ordering::SeqCst),
        ARCHIVES,
        "every archive rewritten exactly once"
    );
    assert!(
        find_steps > 3 && erase_steps > ARCHIVES as usize / 2,
        "a 1 ms budget takes many steps: find {find_steps}, erase {erase_steps}"
    );
    let (left, _) = run_to_done(
        &backend,
        &job(target.clone(), &ids, SubjectAction::Verify),
        EMAIL,
    )
    .await;
    assert_eq!(left, 0);
    assert!(server.keys("steps", "users/47/").await.is_empty());
    assert_eq!(server.keys("steps", "users/470/").await.len(), 20);
    assert_eq!(
        String::from_utf8(server.get("steps", "mail/logs/day07.jsonl").await).unwrap(),
        archive_record("bob@example.org", 2),
        "only the subject's records are gone"
    );
    let versions = server.versions("steps", "mail/logs/").await;
    assert_eq!(
        versions.len(),
        ARCHIVES as usize,
        "one clean version of each archive is left"
    );
}
