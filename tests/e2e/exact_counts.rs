//! Counts stay exact when a step's outcome is lost: the operator killed (or fenced out) after
//! the store deleted and before the checkpoint. Each test drives `Backend` steps directly,
//! throws away the outcome of the first step after which the store has lost records, resumes
//! from the previous cursor with a fresh backend (as after a restart), and checks that the
//! counts of the job equal what the store lost. (The conformance suite checks the same for the
//! sweep and key paths of every driver.)

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::json;
use tokio_util::sync::CancellationToken;

use tombstone::api::retentionpolicy::Target;
use tombstone::backends::{Backend, Next, StepBudget, SubjectAction, SubjectJob};

use crate::support::s3::S3Server;

const EMAIL: &str = "exact-3f9a@example.org";
const ARCHIVES: usize = 8;
const SUBJECT_LINES: usize = 2;

fn record(to: &str, n: usize) -> String {
    format!("{{\"msg\":{{\"recipient\":\"{to}\",\"id\":{n}}}}}\n")
}

fn budget() -> StepBudget {
    StepBudget {
        max_time: Duration::from_millis(1),
        cancel: CancellationToken::new(),
        fence: Default::default(),
    }
}

/// The subject's records left in the archives.
async fn subject_lines(server: &S3Server) -> usize {
    let mut n = 0;
    for a in 0..ARCHIVES {
        let body = server
            .get("lost", &format!("mail/logs/day{a:02}.jsonl"))
            .await;
        n += String::from_utf8_lossy(&body)
            .lines()
            .filter(|l| l.contains(EMAIL))
            .count();
    }
    n
}

/// The erasure of `EMAIL`'s records from the archives under `mail/logs/`.
fn archive_erasure() -> SubjectJob {
    let target: Target = serde_json::from_value(json!({
        "name": "archive", "store": "archive", "s3": {"prefix": "mail/"},
        "subject": {"s3": {"records": {
            "prefix": "mail/logs/", "field": "msg.recipient", "equals": "{email}"
        }}}
    }))
    .unwrap();
    SubjectJob {
        target,
        identifiers: BTreeMap::from([("email".to_string(), EMAIL.to_string())]),
        action: SubjectAction::Erase,
    }
}

/// Runs [`archive_erasure`] on `bucket` step by step, each on a fresh backend (as after a
/// restart), and throws away the outcome of the first step after which `left()` fell, as if
/// the operator was killed before its checkpoint. Returns what the steps counted and how
/// many records the lost step took.
async fn erase_losing_one_step<F, Fut>(server: &S3Server, bucket: &str, left: F) -> (u64, usize)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = usize>,
{
    let job = archive_erasure();
    let before = left().await;
    let (mut cursor, mut erased, mut lost) = (None::<String>, 0u64, None);
    for steps in 0.. {
        assert!(steps < 1000, "the erasure did not finish");
        let backend = crate::s3::backend(server, bucket);
        let step = backend
            .subject_step(&job, cursor.as_deref(), &budget())
            .await
            .expect("a subject step");
        assert!(step.failure.is_none(), "{:?}", step.failure);
        if lost.is_none() {
            let now = left().await;
            if now < before {
                // Killed before the checkpoint: nothing of this step is kept.
                lost = Some(before - now);
                continue;
            }
        }
        erased += step.count;
        match step.next {
            Next::Done => break,
            Next::Continue(c) => {
                assert!(!c.contains(EMAIL), "{c}");
                cursor = Some(c);
            }
            Next::Wait { .. } => panic!("S3 steps never wait"),
        }
    }
    (
        erased,
        lost.expect("no step deleted any of the records watched"),
    )
}

/// An archive rewritten by a step whose outcome is lost records in its metadata that the
/// run dropped its records; the step that repeats it counts them instead of 0.
#[tokio::test]
async fn an_archive_rewrite_whose_step_is_lost_is_counted_by_the_step_that_repeats_it() {
    let server = S3Server::start();
    server.create_bucket("lost", false, false).await;
    for a in 0..ARCHIVES {
        let body: String = (0..SUBJECT_LINES)
            .map(|i| record(EMAIL, a * 10 + i))
            .chain(std::iter::once(record("other@example.org", a * 10 + 9)))
            .collect();
        server
            .put("lost", &format!("mail/logs/day{a:02}.jsonl"), body)
            .await;
    }
    let seeded = ARCHIVES * SUBJECT_LINES;
    let (erased, lost) = erase_losing_one_step(&server, "lost", || subject_lines(&server)).await;
    assert_eq!(subject_lines(&server).await, 0);
    assert_eq!(
        erased, seeded as u64,
        "the {lost} records dropped by the lost step are counted once by the step after it"
    );
}

/// The subject's records in versions of the archives that are not current (with their
/// version ids), in the versioned bucket `older`.
async fn older_subject_lines(server: &S3Server) -> usize {
    let out = server
        .client()
        .list_object_versions()
        .bucket("older")
        .prefix("mail/logs/")
        .send()
        .await
        .expect("ListObjectVersions");
    let mut n = 0;
    for v in out.versions() {
        if v.is_latest() == Some(true) {
            continue;
        }
        let body = server
            .client()
            .get_object()
            .bucket("older")
            .key(v.key().unwrap_or_default())
            .version_id(v.version_id().unwrap_or_default())
            .send()
            .await
            .expect("GetObject")
            .body
            .collect()
            .await
            .expect("a body")
            .into_bytes();
        n += String::from_utf8_lossy(&body)
            .lines()
            .filter(|l| l.contains(EMAIL))
            .count();
    }
    n
}

/// On a versioned bucket an erasure deletes the older archive versions that hold the
/// subject's records, counting those records: when the step that deleted some is lost,
/// the step resumed before it counts them from its intent (weighed by the records each
/// version held), once.
#[tokio::test]
async fn older_archive_versions_deleted_by_a_lost_step_are_counted_by_the_step_after_it() {
    let server = S3Server::start();
    server.create_bucket("older", true, false).await;
    for version in 0..2 {
        for a in 0..ARCHIVES {
            let body: String = (0..SUBJECT_LINES)
                .map(|i| record(EMAIL, version * 100 + a * 10 + i))
                .chain(std::iter::once(record("other@example.org", a * 10 + 9)))
                .collect();
            server
                .put("older", &format!("mail/logs/day{a:02}.jsonl"), body)
                .await;
        }
    }
    let older = older_subject_lines(&server).await;
    assert_eq!(older, ARCHIVES * SUBJECT_LINES);
    // Every record: the current versions' (rewritten) and the older versions'.
    let seeded = 2 * ARCHIVES * SUBJECT_LINES;
    // Rewrites replace current versions (and delete the replaced ones at once): the older
    // versions' records only go when the versions pass deletes them.
    let (erased, lost) =
        erase_losing_one_step(&server, "older", || older_subject_lines(&server)).await;
    assert_eq!(older_subject_lines(&server).await, 0);
    assert_eq!(
        erased, seeded as u64,
        "the {lost} records of the older versions deleted by the lost step are counted once"
    );
}

/// Intents of a run abandoned long ago (its policy deleted, its spec changed) are removed by
/// the next job that finishes in the bucket; a recent intent of another run, which a live
/// cursor may still need, is kept, and so are none of the sweep's own.
#[tokio::test]
async fn abandoned_intents_are_removed_and_recent_ones_of_other_runs_kept() {
    let server = S3Server::start();
    server.create_bucket("tidy", false, false).await;
    let old = ".tombstone/intents/0a0a0a0a0a0a0a0a/00000000000000000000";
    let recent = ".tombstone/intents/0b0b0b0b0b0b0b0b/00000000000000000003";
    server.put("tidy", old, r#"{"o":[]}"#).await;
    let modified = |key: &'static str| {
        let client = server.client();
        async move {
            client
                .head_object()
                .bucket("tidy")
                .key(key)
                .send()
                .await
                .expect("HeadObject")
                .last_modified()
                .copied()
                .expect("LastModified")
        }
    };
    let old_at = modified(old).await;
    // LastModified has whole seconds: the recent intent is written again until the server
    // stamps it later than the old one.
    let started = std::time::Instant::now();
    let recent_at = loop {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the server clock stands still"
        );
        server.put("tidy", recent, r#"{"o":[]}"#).await;
        let at = modified(recent).await;
        if at.secs() > old_at.secs() {
            break at;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // "Abandoned" is judged by the recent intent's time: the old one is before it.
    let before = chrono::DateTime::from_timestamp(recent_at.secs(), 0).expect("a time");
    server.put("tidy", "logs/a", "x").await;
    let target: Target = serde_json::from_value(json!({
        "name": "logs", "store": "archive", "s3": {"prefix": "logs/"}
    }))
    .unwrap();
    let job = tombstone::backends::SweepJob {
        target,
        retention: "1s".parse().expect("a duration"),
        dry_run: false,
        cutoff: chrono::Utc::now() + chrono::Duration::days(1),
        held: Default::default(),
    };
    let (mut cursor, mut deleted) = (None::<String>, 0u64);
    for steps in 0.. {
        assert!(steps < 100, "the sweep did not finish");
        let backend = crate::s3::backend(&server, "tidy").with_abandoned_intents_before(before);
        let step = backend
            .sweep_step(&job, cursor.as_deref(), &budget())
            .await
            .expect("a sweep step");
        assert!(step.failure.is_none(), "{:?}", step.failure);
        deleted += step.deleted;
        match step.next {
            Next::Done => break,
            Next::Continue(c) => cursor = Some(c),
            Next::Wait { .. } => panic!("S3 steps never wait"),
        }
    }
    assert_eq!(deleted, 1, "the sweep ran");
    assert_eq!(
        server.keys("tidy", ".tombstone/").await,
        vec![recent.to_string()],
        "the abandoned intent is gone, the recent one of another run kept, the sweep's own removed"
    );
}

/// The ACL rules the README documents for the operator's Redis user (target `session:*`),
/// without the password.
const README_ACL: &str = "resetkeys ~session:* ~user:* ~tombstone:ledger:* resetchannels -@all \
    +ping +info +cluster|nodes +scan +type +exists +get +hget +hexists +pttl +object|idletime \
    +sismember +zscore +eval +evalsha +script|load +unlink +pexpire +hdel +srem +zrem +incrby \
    +expire";

/// A timestamp sweep of `session:*` hashes older than a day.
fn session_sweep() -> tombstone::backends::SweepJob {
    tombstone::backends::SweepJob {
        target: serde_json::from_value(json!({"name": "s", "store": "cache",
            "redis": {"keyPattern": "session:*", "mode": "timestamp", "timestampField": "createdAt"}}))
        .unwrap(),
        retention: "1d".parse().unwrap(),
        dry_run: false,
        cutoff: chrono::Utc::now() - chrono::Duration::days(1),
        held: Default::default(),
    }
}

/// Sweeps `job` to its end (or its first failure) with a fresh backend per step; returns
/// what the steps counted and the failure, if any.
async fn sweep_to_end(
    config: &tombstone::backends::redis::RedisConfig,
    job: &tombstone::backends::SweepJob,
) -> (u64, Option<tombstone::backends::Error>) {
    let (mut cursor, mut deleted) = (None::<String>, 0u64);
    for _ in 0..1000 {
        let backend = tombstone::backends::redis::RedisBackend::new(
            config.clone(),
            tombstone::backends::Limits::default(),
        );
        let step = match backend.sweep_step(job, cursor.as_deref(), &budget()).await {
            Ok(step) => step,
            Err(e) => return (deleted, Some(e)),
        };
        deleted += step.deleted;
        if step.failure.is_some() {
            return (deleted, step.failure);
        }
        match step.next {
            Next::Done => return (deleted, None),
            Next::Continue(c) | Next::Wait { cursor: c, .. } => cursor = Some(c),
        }
    }
    panic!("the sweep did not finish");
}

/// The cursor a sweep's first step stopped at before the first page that would delete: it
/// names the run (`named_by` is in it), and nothing was deleted.
fn run_named(first: tombstone::backends::Step, named_by: &str) -> String {
    assert!(first.failure.is_none(), "{:?}", first.failure);
    assert_eq!(
        first.deleted, 0,
        "nothing is deleted before the run is named"
    );
    let Next::Continue(named) = first.next else {
        panic!(
            "the first page that would delete ends the step: {:?}",
            first.next
        );
    };
    assert!(
        named.contains(named_by),
        "the checkpoint names the run: {named}"
    );
    named
}

/// A sweep's first step that found nothing to delete: it judged `scanned` items and ended.
fn ended_at_once(step: &tombstone::backends::Step, scanned: u64) {
    assert!(step.failure.is_none(), "{:?}", step.failure);
    assert_eq!(
        step.next,
        Next::Done,
        "a sweep with nothing to delete ends at once"
    );
    assert_eq!((step.scanned, step.deleted), (scanned, 0));
}

/// Runs a sweep on from `cursor` to its end, each step by `step`; returns what the steps
/// deleted and scanned.
async fn sweep_on<F, Fut>(cursor: String, step: F) -> (u64, u64)
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = tombstone::backends::Step>,
{
    let (mut cursor, mut deleted, mut scanned) = (Some(cursor), 0, 0);
    for _ in 0..1000 {
        let Some(c) = cursor.take() else {
            return (deleted, scanned);
        };
        let step = step(c).await;
        assert!(step.failure.is_none(), "{:?}", step.failure);
        deleted += step.deleted;
        scanned += step.scanned;
        match step.next {
            Next::Done => {}
            Next::Continue(c) | Next::Wait { cursor: c, .. } => cursor = Some(c),
        }
    }
    panic!("the sweep did not finish");
}

/// The README's ACL lets the operator sweep with exact counts; without its ledger pattern
/// the first destructive script is refused before it deletes anything, and the step says
/// what the user lacks.
#[tokio::test]
async fn a_redis_user_that_may_not_write_the_ledger_deletes_nothing_and_says_why() {
    use tombstone::backends::redis::RedisConfig;
    let server = crate::support::RedisServer::start();
    let mut conn = crate::fixtures::redis_conn(&server.url()).await;
    let old = chrono::Utc::now().timestamp() - 90 * 86_400;
    let mut pipe = redis::pipe();
    for i in 0..50 {
        pipe.cmd("HSET")
            .arg(format!("session:{i}"))
            .arg("createdAt")
            .arg(old)
            .ignore();
    }
    let _: () = pipe.query_async(&mut conn).await.expect("seed");
    let acl = |user: &str, rules: &str| {
        let mut cmd = redis::cmd("ACL");
        cmd.arg("SETUSER").arg(user).arg("on").arg(">pw-7d1");
        for rule in rules.split_whitespace() {
            cmd.arg(rule);
        }
        cmd
    };
    let without_ledger = README_ACL.replace(" ~tombstone:ledger:*", "");
    let _: () = acl("limited", &without_ledger)
        .query_async(&mut conn)
        .await
        .expect("ACL SETUSER limited");
    let _: () = acl("tombstone", README_ACL)
        .query_async(&mut conn)
        .await
        .expect("ACL SETUSER tombstone");
    let config = |user: &str| RedisConfig {
        url: format!("redis://{user}@127.0.0.1:{}", server.port()),
        password: Some("pw-7d1".into()),
        cluster: false,
    };
    let job = session_sweep();

    let (deleted, failure) = sweep_to_end(&config("limited"), &job).await;
    let failure = failure.expect("a user without the ledger pattern is refused");
    assert_eq!(
        (failure.reason(), failure.category()),
        ("StoreError", tombstone::backends::Category::Refused),
        "{failure}"
    );
    let message = failure.to_string();
    assert!(
        message.contains("NOPERM") && message.contains("tombstone:ledger:"),
        "{message}"
    );
    assert_eq!(deleted, 0);
    assert_eq!(
        crate::fixtures::count_keys(&mut conn, "session:*").await,
        50
    );

    let (deleted, failure) = sweep_to_end(&config("tombstone"), &job).await;
    assert!(failure.is_none(), "{failure:?}");
    assert_eq!(deleted, 50);
    assert_eq!(crate::fixtures::count_keys(&mut conn, "session:*").await, 0);
    assert_eq!(
        crate::fixtures::count_keys(&mut conn, "tombstone:ledger:*").await,
        0,
        "the run's ledger is removed once its reading is checkpointed"
    );
}

/// A Redis sweep names its run's ledger only when it meets a page that would delete, and
/// checkpoints that name before deleting anything: a sweep that finds nothing to delete
/// ends in one step (one status write for the policy) and leaves no ledger, and one that
/// finds expired keys stops before their page, then deletes them under the ledger it named.
#[tokio::test]
async fn a_redis_sweep_names_its_ledger_only_before_the_first_page_that_would_delete() {
    use tombstone::backends::redis::{RedisBackend, RedisConfig};
    let server = crate::support::RedisServer::start();
    let mut conn = crate::fixtures::redis_conn(&server.url()).await;
    let now = chrono::Utc::now().timestamp();
    let seed = |prefix: &'static str, n: usize, at: i64| {
        let mut pipe = redis::pipe();
        for i in 0..n {
            pipe.cmd("HSET")
                .arg(format!("session:{prefix}:{i}"))
                .arg("createdAt")
                .arg(at)
                .ignore();
        }
        pipe
    };
    let _: () = seed("fresh", 12_000, now)
        .query_async(&mut conn)
        .await
        .expect("seed");
    let config = RedisConfig {
        url: server.url(),
        password: None,
        cluster: false,
    };
    let job = session_sweep();
    let long = StepBudget {
        max_time: Duration::from_secs(30),
        ..budget()
    };
    let backend = || RedisBackend::new(config.clone(), tombstone::backends::Limits::default());

    // Nothing expired: one step judges every key and ends; no ledger was ever named.
    let step = backend()
        .sweep_step(&job, None, &long)
        .await
        .expect("a step");
    ended_at_once(&step, 12_000);
    assert_eq!(
        crate::fixtures::count_keys(&mut conn, "tombstone:ledger:*").await,
        0
    );

    // Expired keys among them: the first step stops before the first page that would delete,
    // with a named ledger and nothing deleted; the steps after delete exactly those keys.
    let _: () = seed("old", 40, now - 90 * 86_400)
        .query_async(&mut conn)
        .await
        .expect("seed");
    let first = backend()
        .sweep_step(&job, None, &long)
        .await
        .expect("a first step");
    let scanned_first = first.scanned;
    let named = run_named(first, "\"ledger\"");
    assert_eq!(
        crate::fixtures::count_keys(&mut conn, "session:old:*").await,
        40
    );
    let (deleted, scanned) = sweep_on(named, |c| {
        let (job, long) = (&job, &long);
        async move {
            backend()
                .sweep_step(job, Some(&c), long)
                .await
                .expect("a step")
        }
    })
    .await;
    let scanned = scanned + scanned_first;
    assert_eq!(deleted, 40);
    assert!(
        scanned >= 12_040,
        "every key judged once at least: {scanned}"
    );
    assert_eq!(
        crate::fixtures::count_keys(&mut conn, "session:old:*").await,
        0
    );
    assert_eq!(
        crate::fixtures::count_keys(&mut conn, "session:fresh:*").await,
        12_000
    );
    assert_eq!(
        crate::fixtures::count_keys(&mut conn, "tombstone:ledger:*").await,
        0,
        "the run's ledger is removed once its reading is checkpointed"
    );
}

/// An S3 sweep names its run's journal only when it meets a page that would delete, and
/// checkpoints that name before any intent or deletion: a sweep that finds nothing to
/// delete ends in one step (one status write for the policy) and writes no intent, and one
/// that finds expired objects stops before their page, then deletes exactly those under the
/// journal it named.
#[tokio::test]
async fn an_s3_sweep_names_its_journal_only_before_the_first_page_that_would_delete() {
    let server = S3Server::start();
    server.create_bucket("lazy", false, false).await;
    let put_all = |names: Vec<String>| {
        let server = &server;
        async move {
            futures::stream::iter(names)
                .for_each_concurrent(16, |key| async move { server.put("lazy", &key, "x").await })
                .await
        }
    };
    use futures::StreamExt;
    // Old objects sort last; the young ones, written a second later, fill the first listing
    // page and half the second.
    put_all((0..200).map(|i| format!("logs/b-{i:04}")).collect()).await;
    // The newest of the old objects' LastModified (whole seconds, or finer).
    let listed = server
        .client()
        .list_objects_v2()
        .bucket("lazy")
        .prefix("logs/b-")
        .send()
        .await
        .expect("ListObjectsV2");
    let old_max = listed
        .contents()
        .iter()
        .filter_map(|o| o.last_modified().map(|t| t.secs()))
        .max()
        .expect("the old objects");
    let started = std::time::Instant::now();
    while chrono::Utc::now().timestamp() <= old_max {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the clock stands still"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    put_all((0..1200).map(|i| format!("logs/a-{i:04}")).collect()).await;
    let target: Target = serde_json::from_value(
        json!({"name": "logs", "store": "archive", "s3": {"prefix": "logs/"}}),
    )
    .unwrap();
    let sweep = |cutoff: i64| tombstone::backends::SweepJob {
        target: target.clone(),
        retention: "1d".parse().expect("a duration"),
        dry_run: false,
        cutoff: chrono::DateTime::from_timestamp(cutoff, 0).expect("a time"),
        held: Default::default(),
    };
    let long = StepBudget {
        max_time: Duration::from_secs(30),
        ..budget()
    };
    let intents = || server.keys("lazy", ".tombstone/");

    // Nothing expired: one step judges every object and ends; no journal was ever named.
    let step = crate::s3::backend(&server, "lazy")
        .sweep_step(&sweep(old_max - 60), None, &long)
        .await
        .expect("a step");
    ended_at_once(&step, 1400);
    assert!(intents().await.is_empty(), "no intent written");

    // The old objects expired: the first step judges the first page (nothing to delete
    // there), stops before the second with a named journal, and deletes nothing.
    let job = sweep(old_max + 1);
    let first = crate::s3::backend(&server, "lazy")
        .sweep_step(&job, None, &long)
        .await
        .expect("a first step");
    assert_eq!(
        first.scanned, 1000,
        "the page that would delete is taken back, to be judged again"
    );
    let scanned_first = first.scanned;
    let named = run_named(first, "\"j\":{\"r\":");
    assert_eq!(server.keys("lazy", "logs/b-").await.len(), 200);
    assert!(
        intents().await.is_empty(),
        "no intent before the name is checkpointed"
    );

    let (deleted, scanned) = sweep_on(named, |c| {
        let (server, job, long) = (&server, &job, &long);
        async move {
            crate::s3::backend(server, "lazy")
                .sweep_step(job, Some(&c), long)
                .await
                .expect("a step")
        }
    })
    .await;
    let scanned = scanned + scanned_first;
    assert_eq!(deleted, 200, "exactly the old objects");
    assert_eq!(scanned, 1400, "every object judged once");
    assert!(server.keys("lazy", "logs/b-").await.is_empty());
    assert_eq!(server.keys("lazy", "logs/a-").await.len(), 1200);
    assert!(
        intents().await.is_empty(),
        "the run's intents are removed once their counts are checkpointed"
    );
}
