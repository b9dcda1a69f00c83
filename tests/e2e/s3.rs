//! The S3 backend against a real S3-compatible server (moto): retention sweeps on plain,
//! versioned and Object Lock buckets, erasure by key prefix and of records inside JSON-lines
//! archives, and the operator flows (DataStore probe, RetentionPolicy, ErasureRequest,
//! LegalHold) with an S3 store.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{ChecksumAlgorithm, ObjectLockMode, StorageClass};
use chrono::{DateTime, Utc};
use futures::{FutureExt, StreamExt};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use tombstone::api::retentionpolicy::Target;
use tombstone::backends::s3::{S3Backend, S3Config, S3Credentials};
use tombstone::backends::{
    Backend, Limits, Next, StepBudget, SubjectAction, SubjectJob, SubjectStep, SweepJob,
};

use crate::support::s3::{S3Server, ACCESS_KEY_ID, SECRET_ACCESS_KEY};

const EMAIL: &str = "s3-subject-4f1d@example.org";
const USER: &str = "47";

pub(crate) fn backend(server: &S3Server, bucket: &str) -> S3Backend {
    S3Backend::new(
        S3Config {
            bucket: bucket.into(),
            region: Some("us-east-1".into()),
            endpoint: Some(server.endpoint()),
            force_path_style: true,
            credentials: Some(S3Credentials {
                access_key_id: ACCESS_KEY_ID.into(),
                secret_access_key: SECRET_ACCESS_KEY.into(),
                session_token: None,
            }),
        },
        Limits::default(),
    )
}

fn target(spec: serde_json::Value) -> Target {
    let mut t = json!({"name": "archive", "store": "archive"});
    t.as_object_mut()
        .unwrap()
        .extend(spec.as_object().unwrap().clone());
    serde_json::from_value(t).expect("a valid target")
}

fn ids() -> BTreeMap<String, String> {
    [("email", EMAIL), ("userId", USER)]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Runs a sweep to the end, one short step at a time (each step resumes from the cursor the
/// previous one returned, as after a restart). Returns (scanned, deleted, blocked, items).
async fn sweep(
    backend: &S3Backend,
    target: &Target,
    cutoff: DateTime<Utc>,
    dry_run: bool,
) -> (u64, u64, u64, Vec<String>) {
    let job = SweepJob {
        target: target.clone(),
        retention: "1s".parse().unwrap(),
        dry_run,
        cutoff,
        held: Default::default(),
    };
    let budget = StepBudget {
        max_time: Duration::from_millis(1),
        cancel: CancellationToken::new(),
        fence: Default::default(),
    };
    let (mut scanned, mut deleted, mut blocked, mut items) = (0, 0, 0, Vec::new());
    let mut cursor: Option<String> = None;
    for _ in 0..10_000 {
        let step = backend
            .sweep_step(&job, cursor.as_deref(), &budget)
            .await
            .expect("sweep step");
        assert!(step.failure.is_none(), "{:?}", step.failure);
        scanned += step.scanned;
        deleted += step.deleted;
        blocked += step.blocked;
        items.extend(step.blocked_items);
        match step.next {
            Next::Done => return (scanned, deleted, blocked, items),
            Next::Continue(c) => cursor = Some(c),
            Next::Wait { .. } => panic!("S3 sweeps never wait"),
        }
    }
    panic!("sweep did not finish");
}

async fn subject(backend: &S3Backend, target: &Target, action: SubjectAction) -> SubjectStep {
    let job = SubjectJob {
        target: target.clone(),
        identifiers: ids(),
        action,
    };
    let budget = StepBudget {
        max_time: Duration::from_secs(60),
        cancel: CancellationToken::new(),
        fence: Default::default(),
    };
    // An erase of archive records first checkpoints its run, then works.
    let step = crate::fixtures::subject_until_done(backend, &job, &budget)
        .await
        .expect("subject step");
    assert!(step.failure.is_none(), "{:?}", step.failure);
    assert_eq!(step.next, Next::Done);
    step
}

/// Puts many small objects, 16 at a time.
async fn put_many(server: &S3Server, bucket: &str, keys: Vec<String>) {
    let client = server.client();
    futures::stream::iter(keys)
        .map(|key| {
            let client = client.clone();
            async move {
                client
                    .put_object()
                    .bucket(bucket)
                    .key(&key)
                    .body(ByteStream::from_static(b"{\"msg\":\"x\"}\n"))
                    .send()
                    .await
                    .unwrap_or_else(|e| panic!("PutObject {key}: {e:?}"));
            }
        })
        .buffer_unordered(16)
        .for_each(|_| async {})
        .await;
}

/// A point in time strictly between what was written before and what is written after.
async fn instant_between() -> DateTime<Utc> {
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let cutoff = Utc::now();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    cutoff
}

#[tokio::test]
async fn s3_sweep_deletes_expired_objects_under_the_prefix_only_and_resumes_by_cursor() {
    let server = S3Server::start();
    server.create_bucket("plain", false, false).await;
    let old: Vec<String> = (0..2345).map(|i| format!("logs/{i:05}.jsonl")).collect();
    put_many(&server, "plain", old).await;
    // Neighbours: a prefix that starts the same, and another prefix altogether.
    put_many(
        &server,
        "plain",
        vec!["logs-2024/a.jsonl".into(), "logsx".into(), "other/a".into()],
    )
    .await;
    let cutoff = instant_between().await;
    put_many(&server, "plain", vec!["logs/new-1.jsonl".into()]).await;

    let backend = backend(&server, "plain");
    let t = target(json!({"s3": {"prefix": "logs/"}}));
    // Dry run: counts, deletes nothing.
    let dry = sweep(&backend, &t, cutoff, true).await;
    assert_eq!((dry.0, dry.1), (2346, 2345));
    assert_eq!(server.keys("plain", "logs/").await.len(), 2346);
    // The real run deletes exactly what the dry run counted (it takes several steps: each
    // step is given 1 ms, so every page boundary is a checkpoint).
    let real = sweep(&backend, &t, cutoff, false).await;
    assert_eq!((real.0, real.1, real.2), (2346, 2345, 0));
    assert_eq!(
        server.keys("plain", "").await,
        vec!["logs-2024/a.jsonl", "logs/new-1.jsonl", "logsx", "other/a"]
    );
    // Idempotent: a second run finds nothing to delete.
    assert_eq!(sweep(&backend, &t, cutoff, false).await.1, 0);
}

#[tokio::test]
async fn s3_versioned_sweep_leaves_no_expired_version_and_no_orphaned_marker() {
    let server = S3Server::start();
    server.create_bucket("versioned", true, false).await;
    let client = server.client();
    for key in ["logs/a", "logs/a", "logs/b", "logs/c", "logs/d", "keep/z"] {
        server.put("versioned", key, "{}\n").await;
    }
    // b is deleted (a delete marker over its only version); d too, but written again later.
    for key in ["logs/b", "logs/d"] {
        client
            .delete_object()
            .bucket("versioned")
            .key(key)
            .send()
            .await
            .unwrap();
    }
    let cutoff = instant_between().await;
    server.put("versioned", "logs/c", "{\"v\":2}\n").await;
    server.put("versioned", "logs/d", "{\"v\":3}\n").await;

    let backend = backend(&server, "versioned");
    let t = target(json!({"s3": {"prefix": "logs/"}}));
    let dry = sweep(&backend, &t, cutoff, true).await;
    let real = sweep(&backend, &t, cutoff, false).await;
    // a: 2 versions; b: 1 version + its orphaned marker; c: 1 old version; d: 1 old version.
    assert_eq!(real.1, 6);
    assert_eq!(dry.1, real.1, "dry-run parity");
    let mut left: Vec<(String, bool)> = server
        .versions("versioned", "")
        .await
        .into_iter()
        .map(|(k, _, marker)| (k, marker))
        .collect();
    left.sort();
    assert_eq!(
        left,
        vec![
            ("keep/z".to_string(), false),
            ("logs/c".to_string(), false),
            // d's marker sits between an expired and a young version: not orphaned, kept.
            ("logs/d".to_string(), false),
            ("logs/d".to_string(), true),
        ]
    );
    assert_eq!(sweep(&backend, &t, cutoff, false).await.1, 0, "idempotent");
}

#[tokio::test]
async fn s3_objects_under_object_lock_are_counted_as_blocked_and_named() {
    let server = S3Server::start();
    server.create_bucket("locked", true, true).await;
    let client = server.client();
    let until = aws_sdk_s3::primitives::DateTime::from_secs(Utc::now().timestamp() + 86_400);
    client
        .put_object()
        .bucket("locked")
        .key("logs/retained.jsonl")
        .body(ByteStream::from_static(b"{}\n"))
        .checksum_algorithm(ChecksumAlgorithm::Crc32)
        .object_lock_mode(ObjectLockMode::Governance)
        .object_lock_retain_until_date(until)
        .send()
        .await
        .unwrap();
    server
        .put_on_legal_hold("locked", "logs/held.jsonl", b"{}\n")
        .await;
    server.put("locked", "logs/free.jsonl", "{}\n").await;
    let cutoff = instant_between().await;

    let backend = backend(&server, "locked");
    let t = target(json!({"s3": {"prefix": "logs/"}}));
    // The dry run reads the locks and reports as blocked what the real run is refused.
    let (_, dry_deleted, dry_blocked, dry_items) = sweep(&backend, &t, cutoff, true).await;
    assert_eq!((dry_deleted, dry_blocked), (1, 2));
    assert!(
        dry_items
            .iter()
            .any(|i| i == "logs/held.jsonl (Object Lock legal hold)"),
        "{dry_items:?}"
    );
    let (scanned, deleted, blocked, items) = sweep(&backend, &t, cutoff, false).await;
    assert_eq!((scanned, deleted, blocked), (3, 1, 2));
    assert_eq!(items.len(), 2);
    assert!(items.iter().any(|i| i.starts_with("logs/retained.jsonl (")));
    assert!(items.iter().any(|i| i.starts_with("logs/held.jsonl (")));
    assert_eq!(
        server.keys("locked", "").await,
        vec!["logs/held.jsonl", "logs/retained.jsonl"]
    );
}

#[tokio::test]
async fn s3_erasure_by_key_prefix_takes_every_version_and_spares_neighbouring_ids() {
    let server = S3Server::start();
    server.create_bucket("users", true, false).await;
    for key in [
        "users/47/profile.json",
        "users/47/profile.json",
        "users/47/avatar.png",
        "users/4711/profile.json",
        "users/470/profile.json",
        "users/047/profile.json",
    ] {
        server.put("users", key, "{}").await;
    }
    server
        .client()
        .delete_object()
        .bucket("users")
        .key("users/47/avatar.png")
        .send()
        .await
        .unwrap();
    let backend = backend(&server, "users");
    let t = target(json!({
        "s3": {"prefix": "logs/"},
        "subject": {"s3": {"keyPrefixes": ["users/{userId}/", "mail/{email}/"]}}
    }));
    // 2 versions of profile.json, 1 of avatar.png and its delete marker.
    let found = subject(&backend, &t, SubjectAction::Find).await;
    assert_eq!((found.count, found.ran), (4, true));
    let erased = subject(&backend, &t, SubjectAction::Erase).await;
    assert_eq!(
        erased.count, found.count,
        "a dry run counts what erasure removes"
    );
    assert_eq!(subject(&backend, &t, SubjectAction::Verify).await.count, 0);
    let left: Vec<String> = server
        .versions("users", "")
        .await
        .into_iter()
        .map(|(k, _, _)| k)
        .collect();
    assert_eq!(
        left,
        vec![
            "users/047/profile.json",
            "users/470/profile.json",
            "users/4711/profile.json"
        ]
    );
    assert_eq!(subject(&backend, &t, SubjectAction::Erase).await.count, 0);
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn gunzip(data: &[u8]) -> String {
    let mut out = String::new();
    std::io::Read::read_to_string(&mut flate2::read::MultiGzDecoder::new(data), &mut out).unwrap();
    out
}

fn records_target() -> Target {
    target(json!({
        "s3": {"prefix": "mailer/logs/"},
        "subject": {"s3": {"records": {
            "prefix": "mailer/logs/", "field": "msg.recipient", "equals": "{email}"
        }}}
    }))
}

fn record(to: &str, n: u32) -> String {
    format!("{{\"msg\":{{\"recipient\":\"{to}\",\"id\":{n}}},\"status\":\"sent\"}}\n")
}

#[tokio::test]
async fn s3_records_leave_plain_and_gzip_archives_and_everything_else_is_kept() {
    let server = S3Server::start();
    server.create_bucket("mail", false, false).await;
    let client = server.client();
    // Another recipient whose address starts with the subject's.
    let neighbour = format!("{EMAIL}.evil");
    let day1 = [
        record(EMAIL, 1),
        record(&neighbour, 2),
        // Not the subject's (their unparsed copies: fail_closed::matching).
        "not json, but mentions bob@example.org\n".to_string(),
        record("bob@example.org", 3),
        record(EMAIL, 4),
    ]
    .concat();
    client
        .put_object()
        .bucket("mail")
        .key("mailer/logs/day1.jsonl")
        .body(ByteStream::from(day1.clone().into_bytes()))
        .content_type("application/x-ndjson")
        .metadata("source", "mailer")
        .storage_class(StorageClass::StandardIa)
        .tagging("retention=30d&team=mail")
        .send()
        .await
        .unwrap();
    // Gzip without a .gz suffix: detected by content.
    let day2 = [record("bob@example.org", 5), record(EMAIL, 6)].concat();
    server
        .put("mail", "mailer/logs/day2.log", gzip(day2.as_bytes()))
        .await;
    // An archive without the subject, and the subject outside the records prefix.
    let day3 = gzip(record("carol@example.org", 7).as_bytes());
    server
        .put("mail", "mailer/logs/day3.jsonl.gz", day3.clone())
        .await;
    server
        .put("mail", "mailer/other/day1.jsonl", record(EMAIL, 8))
        .await;
    let etag = |key: &'static str| {
        let client = client.clone();
        async move {
            let head = client
                .head_object()
                .bucket("mail")
                .key(key)
                .send()
                .await
                .unwrap();
            head.e_tag().unwrap().to_string()
        }
    };
    let day3_etag = etag("mailer/logs/day3.jsonl.gz").await;

    let backend = backend(&server, "mail");
    let t = records_target();
    let found = subject(&backend, &t, SubjectAction::Find).await;
    assert_eq!((found.count, found.malformed), (3, 1));
    let erased = subject(&backend, &t, SubjectAction::Erase).await;
    assert_eq!((erased.count, erased.malformed), (3, 1));
    assert_eq!(subject(&backend, &t, SubjectAction::Verify).await.count, 0);

    let day1_after = String::from_utf8(server.get("mail", "mailer/logs/day1.jsonl").await).unwrap();
    assert_eq!(
        day1_after,
        [
            record(&neighbour, 2),
            "not json, but mentions bob@example.org\n".to_string(),
            record("bob@example.org", 3),
        ]
        .concat(),
        "other subjects' records and the malformed line are kept byte for byte"
    );
    let head = client
        .head_object()
        .bucket("mail")
        .key("mailer/logs/day1.jsonl")
        .send()
        .await
        .unwrap();
    assert_eq!(head.content_type(), Some("application/x-ndjson"));
    assert_eq!(
        head.metadata()
            .and_then(|m| m.get("source"))
            .map(String::as_str),
        Some("mailer")
    );
    assert_eq!(head.storage_class(), Some(&StorageClass::StandardIa));
    let tags = client
        .get_object_tagging()
        .bucket("mail")
        .key("mailer/logs/day1.jsonl")
        .send()
        .await
        .unwrap();
    let mut tags: Vec<(String, String)> = tags
        .tag_set()
        .iter()
        .map(|t| (t.key().to_string(), t.value().to_string()))
        .collect();
    tags.sort();
    assert_eq!(
        tags,
        vec![
            ("retention".into(), "30d".into()),
            ("team".into(), "mail".into())
        ]
    );
    let day2_after = server.get("mail", "mailer/logs/day2.log").await;
    assert_eq!(&day2_after[..2], &[0x1f, 0x8b], "still gzip");
    assert_eq!(gunzip(&day2_after), record("bob@example.org", 5));
    assert_eq!(
        etag("mailer/logs/day3.jsonl.gz").await,
        day3_etag,
        "an archive without the subject is not rewritten"
    );
    assert_eq!(
        server.get("mail", "mailer/other/day1.jsonl").await,
        record(EMAIL, 8).into_bytes(),
        "outside the records prefix"
    );
    assert_eq!(subject(&backend, &t, SubjectAction::Erase).await.count, 0);
}

#[tokio::test]
async fn s3_records_on_a_versioned_bucket_survive_in_no_older_version() {
    let server = S3Server::start();
    server.create_bucket("vmail", true, false).await;
    let key = "mailer/logs/day1.jsonl";
    let v1 = [record(EMAIL, 1), record("bob@example.org", 2)].concat();
    let v2 = [v1.clone(), record(EMAIL, 3)].concat();
    let other = record("bob@example.org", 9);
    server.put("vmail", key, v1).await;
    server.put("vmail", key, v2).await;
    server
        .put("vmail", "mailer/logs/other.jsonl", other.clone())
        .await;
    server
        .put("vmail", "mailer/logs/other.jsonl", other.clone())
        .await;

    let backend = backend(&server, "vmail");
    let t = records_target();
    // v1 holds 1 record, v2 holds 2.
    let found = subject(&backend, &t, SubjectAction::Find).await;
    assert_eq!(found.count, 3);
    let erased = subject(&backend, &t, SubjectAction::Erase).await;
    assert_eq!(erased.count, 3, "dry-run parity");
    assert_eq!(subject(&backend, &t, SubjectAction::Verify).await.count, 0);
    let versions: Vec<String> = server
        .versions("vmail", "")
        .await
        .into_iter()
        .map(|(k, _, _)| k)
        .collect();
    assert_eq!(
        versions,
        vec![
            key.to_string(),
            "mailer/logs/other.jsonl".into(),
            "mailer/logs/other.jsonl".into()
        ],
        "one clean version of the archive is left; the other archive's history is untouched"
    );
    assert_eq!(
        String::from_utf8(server.get("vmail", key).await).unwrap(),
        record("bob@example.org", 2)
    );
}

/// Runs a sweep to the end with a generous budget. Returns (deleted, unjudged).
async fn sweep_counts(backend: &S3Backend, target: &Target, cutoff: DateTime<Utc>) -> (u64, u64) {
    let job = SweepJob {
        target: target.clone(),
        retention: "1s".parse().unwrap(),
        dry_run: false,
        cutoff,
        held: Default::default(),
    };
    let budget = StepBudget {
        max_time: Duration::from_secs(60),
        cancel: CancellationToken::new(),
        fence: Default::default(),
    };
    let (mut deleted, mut unjudged) = (0, 0);
    let mut cursor: Option<String> = None;
    for _ in 0..100 {
        let step = backend
            .sweep_step(&job, cursor.as_deref(), &budget)
            .await
            .expect("sweep step");
        assert!(step.failure.is_none(), "{:?}", step.failure);
        deleted += step.deleted;
        unjudged += step.unjudged;
        match step.next {
            Next::Done => return (deleted, unjudged),
            Next::Continue(c) => cursor = Some(c),
            Next::Wait { .. } => panic!("S3 sweeps never wait"),
        }
    }
    panic!("sweep did not finish");
}

const ORIGINAL_TIME: &str = "tombstone-original-time";

#[tokio::test]
async fn s3_an_archive_rewritten_for_an_erasure_keeps_its_age_and_expires_on_time() {
    const CAROL: &str = "carol-77a2@example.org";
    let server = S3Server::start();
    let client = server.client();
    for (bucket, versioned) in [("plain", false), ("versioned", true)] {
        server.create_bucket(bucket, versioned, false).await;
        let (old, young, garbled) = (
            "mailer/logs/old.jsonl",
            "mailer/logs/young.jsonl",
            "mailer/logs/garbled.jsonl",
        );
        let bob = |n| record("bob@example.org", n);
        server
            .put(
                bucket,
                old,
                [record(EMAIL, 1), record(CAROL, 2), bob(3)].concat(),
            )
            .await;
        let head = |key: &'static str| {
            client
                .head_object()
                .bucket(bucket)
                .key(key)
                .send()
                .map(|r| r.expect("HeadObject"))
        };
        let written = head(old).await.last_modified().copied().unwrap();
        let written = DateTime::from_timestamp(written.secs(), 0).unwrap();
        let cutoff = instant_between().await;
        server
            .put(bucket, young, [record(EMAIL, 4), bob(5)].concat())
            .await;
        // A young archive whose recorded time is not a time: not trusted.
        client
            .put_object()
            .bucket(bucket)
            .key(garbled)
            .metadata(ORIGINAL_TIME, "2020-01-01 (roughly)")
            .body(ByteStream::from(bob(6).into_bytes()))
            .send()
            .await
            .expect("PutObject");

        let backend = backend(&server, bucket);
        let t = target(json!({
            "s3": {"prefix": "mailer/"},
            "subject": {"s3": {"records": {
                "prefix": "mailer/logs/", "field": "msg.recipient", "equals": "{email}"
            }}}
        }));
        let erased = subject(&backend, &t, SubjectAction::Erase).await;
        assert_eq!(erased.count, 2, "{bucket}: one record in each archive");
        // A second erasure, of another subject, rewrites the old archive again later.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let job = SubjectJob {
            target: t.clone(),
            identifiers: [("email".to_string(), CAROL.to_string())].into(),
            action: SubjectAction::Erase,
        };
        let budget = StepBudget {
            max_time: Duration::from_secs(60),
            cancel: CancellationToken::new(),
            fence: Default::default(),
        };
        let second = crate::fixtures::subject_until_done(&backend, &job, &budget)
            .await
            .unwrap();
        assert_eq!((second.count, second.failure.is_none()), (1, true));

        // Its LastModified is the second rewrite's; its recorded time is when it was written.
        let rewritten = head(old).await;
        let modified = rewritten.last_modified().unwrap().secs();
        assert!(
            modified > cutoff.timestamp(),
            "{bucket}: the rewrite is young"
        );
        assert_eq!(
            rewritten.metadata().and_then(|m| m.get(ORIGINAL_TIME)),
            Some(&written.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
            "{bucket}: the second rewrite kept the first recorded time"
        );
        assert_eq!(
            String::from_utf8(server.get(bucket, old).await).unwrap(),
            bob(3)
        );

        let (deleted, unjudged) = sweep_counts(&backend, &t, cutoff).await;
        assert_eq!(
            deleted, 1,
            "{bucket}: the old archive (one version: the erasures deleted the replaced ones)"
        );
        assert_eq!(
            unjudged, 1,
            "{bucket}: the garbled time is judged by LastModified"
        );
        assert_eq!(
            server.keys(bucket, "").await,
            vec![garbled, young],
            "{bucket}: the young rewritten archive and the garbled one are kept"
        );
        let versions = server.versions(bucket, "").await;
        assert_eq!(versions.len(), 2, "{bucket}: {versions:?}");
        assert_eq!(sweep_counts(&backend, &t, cutoff).await.0, 0, "{bucket}");
    }
}

#[tokio::test]
async fn s3_records_rewrite_starts_again_when_a_concurrent_writer_got_there_first() {
    let server = Arc::new(S3Server::start());
    server.create_bucket("race", false, false).await;
    let key = "mailer/logs/live.jsonl";
    server
        .put(
            "race",
            key,
            [record(EMAIL, 1), record("bob@example.org", 2)].concat(),
        )
        .await;
    let writes = Arc::new(AtomicU32::new(0));
    let hook_server = server.clone();
    let hook_writes = writes.clone();
    let backend = backend(&server, "race").with_before_write_hook(Arc::new(move || {
        let server = hook_server.clone();
        let writes = hook_writes.clone();
        Box::pin(async move {
            // The first time only: another writer appends between our read and our write.
            if writes.fetch_add(1, Ordering::SeqCst) == 0 {
                let appended = [
                    record(EMAIL, 1),
                    record("bob@example.org", 2),
                    record("carol@example.org", 3),
                    record(EMAIL, 4),
                ]
                .concat();
                server.put("race", key, appended).await;
            }
        })
    }));
    let erased = subject(&backend, &records_target(), SubjectAction::Erase).await;
    assert_eq!(writes.load(Ordering::SeqCst), 2, "one conflict, one retry");
    assert_eq!(erased.count, 2, "counted from the fresh read");
    assert_eq!(
        String::from_utf8(server.get("race", key).await).unwrap(),
        [record("bob@example.org", 2), record("carol@example.org", 3)].concat(),
        "the concurrent writer's record survives"
    );
}

#[tokio::test]
async fn s3_records_rewrite_streams_an_archive_of_200_mb() {
    let server = S3Server::start();
    server.create_bucket("big", false, false).await;
    // ~200 MB of JSON lines with the subject's record every 10,000 lines.
    let mut file = tempfile::NamedTempFile::new().unwrap();
    let mut expected_removed = 0u64;
    let mut total = 0u64;
    let filler = "x".repeat(120);
    let mut n = 0u32;
    {
        let mut w = std::io::BufWriter::new(file.as_file_mut());
        while total < 200 * 1024 * 1024 {
            let line = if n.is_multiple_of(10_000) {
                expected_removed += 1;
                record(EMAIL, n)
            } else {
                format!(
                    "{{\"msg\":{{\"recipient\":\"user{n}@example.org\",\"id\":{n}}},\"pad\":\"{filler}\"}}\n"
                )
            };
            total += line.len() as u64;
            w.write_all(line.as_bytes()).unwrap();
            n += 1;
        }
        w.flush().unwrap();
    }
    server
        .client()
        .put_object()
        .bucket("big")
        .key("mailer/logs/big.jsonl")
        .body(ByteStream::from_path(file.path()).await.unwrap())
        .send()
        .await
        .unwrap();
    let backend = backend(&server, "big");
    let t = records_target();
    let erased = subject(&backend, &t, SubjectAction::Erase).await;
    assert_eq!(erased.count, expected_removed);
    let head = server
        .client()
        .head_object()
        .bucket("big")
        .key("mailer/logs/big.jsonl")
        .send()
        .await
        .unwrap();
    let removed_bytes: u64 = (0..n)
        .step_by(10_000)
        .map(|i| record(EMAIL, i).len() as u64)
        .sum();
    assert_eq!(head.content_length(), Some((total - removed_bytes) as i64));
    assert_eq!(subject(&backend, &t, SubjectAction::Verify).await.count, 0);
}

// ---- The operator with S3 stores ----

use kube::api::DeleteParams;
use kube::Api;

use tombstone::api::erasurerequest::{ErasurePhase, ErasureTargetPhase};
use tombstone::api::{ConditionStatus, LegalHold, RetentionPolicy};

use crate::erasure::wait_phase;
use crate::fixtures::*;
use crate::support::RedisServer;

pub(crate) async fn s3_store(
    client: &kube::Client,
    ns: &str,
    name: &str,
    bucket: &str,
    endpoint: &str,
) {
    let spec = json!({"s3": {
        "bucket": bucket, "region": "us-east-1", "endpoint": endpoint, "forcePathStyle": true,
        "credentialsSecretRef": {"name": format!("{name}-creds")}
    }, "insecure": true});
    create::<tombstone::api::DataStore>(
        client,
        ns,
        json!({"apiVersion": "tombstone.dev/v1alpha1", "kind": "DataStore", "metadata": {"name": name}, "spec": spec}),
    )
    .await;
}

async fn ready_reason(
    client: &kube::Client,
    ns: &str,
    name: &str,
    ready: bool,
) -> (String, String) {
    let store = wait_store_ready(client, ns, name, ready).await;
    let status = store.status.unwrap();
    assert_eq!(status.store_type.as_deref(), Some("s3"));
    let (_, reason, message) = condition(&status.conditions, "Ready");
    (reason, message)
}

#[tokio::test]
async fn an_s3_store_is_ready_or_says_which_of_credentials_network_or_bucket_is_wrong() {
    let (client, ns) = setup("s3-ready").await;
    let server = S3Server::start();
    server.create_bucket("archive", false, false).await;
    let (key_id, secret_key) = server.enable_auth();
    let endpoint = server.endpoint();
    let operator = TestOperator::start(&ns).await;
    let good = json!({"accessKeyId": key_id, "secretAccessKey": secret_key});
    for name in ["archive", "missing", "closed"] {
        create_credentials_secret(&client, &ns, &format!("{name}-creds"), good.clone()).await;
    }
    create_credentials_secret(
        &client,
        &ns,
        "wrongkey-creds",
        json!({"accessKeyId": key_id, "secretAccessKey": "not-the-secret"}),
    )
    .await;
    s3_store(&client, &ns, "archive", "archive", &endpoint).await;
    s3_store(&client, &ns, "missing", "no-such-bucket", &endpoint).await;
    s3_store(&client, &ns, "wrongkey", "archive", &endpoint).await;
    s3_store(&client, &ns, "nosecret", "archive", &endpoint).await;
    // A port nothing listens on.
    let closed = format!("http://127.0.0.1:{}", {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    });
    s3_store(&client, &ns, "closed", "archive", &closed).await;

    let (reason, message) = ready_reason(&client, &ns, "archive", true).await;
    assert_eq!(
        (reason.as_str(), message.as_str()),
        ("Connected", "s3 bucket archive")
    );
    let (reason, message) = ready_reason(&client, &ns, "missing", false).await;
    assert_eq!(reason, "BucketNotFound", "{message}");
    let (reason, message) = ready_reason(&client, &ns, "wrongkey", false).await;
    assert_eq!(reason, "AuthenticationFailed", "{message}");
    assert!(!message.contains("not-the-secret"), "{message}");
    let (reason, _) = ready_reason(&client, &ns, "nosecret", false).await;
    assert_eq!(reason, "SecretNotFound");
    let (reason, message) = ready_reason(&client, &ns, "closed", false).await;
    assert_eq!(reason, "Unreachable", "{message}");
    operator.stop().await;
}

#[tokio::test]
async fn an_s3_policy_sweeps_through_the_operator_and_names_what_object_lock_keeps() {
    let (client, ns) = setup("s3-sweep").await;
    let server = S3Server::start();
    server.create_bucket("archive", true, true).await;
    for key in [
        "mailer/logs/a.jsonl",
        "mailer/logs/b.jsonl",
        "mailer/other.jsonl",
    ] {
        server.put("archive", key, "{}\n").await;
    }
    server
        .put_on_legal_hold("archive", "mailer/logs/held.jsonl", b"{}\n")
        .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let operator = TestOperator::start(&ns).await;
    create_credentials_secret(
        &client,
        &ns,
        "archive-creds",
        json!({"accessKeyId": ACCESS_KEY_ID, "secretAccessKey": SECRET_ACCESS_KEY}),
    )
    .await;
    s3_store(&client, &ns, "archive", "archive", &server.endpoint()).await;
    wait_store_ready(&client, &ns, "archive", true).await;
    create::<RetentionPolicy>(
        &client,
        &ns,
        policy_json(
            "mailer",
            "2s",
            json!([{"name": "logs", "store": "archive", "s3": {"prefix": "mailer/logs/"}}]),
        ),
    )
    .await;
    let policy = wait_sweep_completed(&client, &ns, "mailer", None).await;
    let status = policy.status.unwrap();
    let target = &status.targets[0];
    assert_eq!((target.scanned, target.deleted, target.blocked), (3, 2, 1));
    assert!(
        target
            .message
            .contains("1 blocked by the store: mailer/logs/held.jsonl ("),
        "{}",
        target.message
    );
    let (compliant, _, message) = condition(&status.conditions, "Compliant");
    assert_eq!(compliant, ConditionStatus::False, "{message}");
    assert_eq!(
        server.keys("archive", "").await,
        vec!["mailer/logs/held.jsonl", "mailer/other.jsonl"]
    );
    operator.stop().await;
}

#[tokio::test]
async fn an_erasure_spans_redis_and_s3_and_a_hold_on_the_archive_blocks_only_its_target() {
    let (client, ns) = setup("s3-erasure").await;
    let redis = RedisServer::start();
    let mut conn = redis_conn(&redis.url()).await;
    let _: () = redis::pipe()
        .cmd("SET")
        .arg(format!("session:{USER}:1"))
        .arg("t")
        .ignore()
        .cmd("SET")
        .arg(format!("session:{USER}:2"))
        .arg("t")
        .ignore()
        .cmd("SET")
        .arg(format!("session:{USER}11:1"))
        .arg("t")
        .ignore()
        .query_async(&mut conn)
        .await
        .unwrap();
    let server = S3Server::start();
    server.create_bucket("archive", true, false).await;
    for key in [
        "mailer/users/47/a.json",
        "mailer/users/47/b.json",
        "mailer/users/4711/a.json",
    ] {
        server.put("archive", key, "{}").await;
    }
    let archive = [
        record(EMAIL, 1),
        record("bob@example.org", 2),
        record(EMAIL, 3),
    ]
    .concat();
    server
        .put("archive", "mailer/logs/day1.jsonl", archive)
        .await;

    let operator = TestOperator::start(&ns).await;
    redis_store(&client, &ns, "cache", &redis.url(), json!({})).await;
    create_credentials_secret(
        &client,
        &ns,
        "archive-creds",
        json!({"accessKeyId": ACCESS_KEY_ID, "secretAccessKey": SECRET_ACCESS_KEY}),
    )
    .await;
    s3_store(&client, &ns, "archive", "archive", &server.endpoint()).await;
    let mut sessions = policy_json(
        "sessions",
        "30d",
        json!([{"name": "sessions", "store": "cache", "redis": {"keyPattern": "session:*"},
                "subject": {"redis": {"keys": ["session:{userId}:*"]}}}]),
    );
    sessions["spec"]["suspend"] = json!(true);
    create::<RetentionPolicy>(&client, &ns, sessions).await;
    let mut mailer = policy_json(
        "mailer",
        "30d",
        json!([{"name": "archive", "store": "archive", "s3": {"prefix": "mailer/logs/"},
        "subject": {"s3": {
            "keyPrefixes": ["mailer/users/{userId}/"],
            "records": {"prefix": "mailer/logs/", "field": "msg.recipient", "equals": "{email}"}
        }}}]),
    );
    mailer["spec"]["suspend"] = json!(true);
    create::<RetentionPolicy>(&client, &ns, mailer).await;
    hold_policies(&client, &ns, "audit", &["mailer"]).await;
    create_subject_secret(
        &client,
        &ns,
        "dsr-s3",
        json!({"email": EMAIL, "userId": USER}),
    )
    .await;
    request_erasure(&client, &ns, "dsr-s3", "dsr-s3").await;

    let held = wait_phase(&client, &ns, "dsr-s3", ErasurePhase::Blocked).await;
    let status = held.status.unwrap();
    let phase_of = |targets: &[tombstone::api::erasurerequest::ErasureTargetStatus],
                    store: &str| {
        targets
            .iter()
            .find(|t| t.store == store)
            .map(|t| (t.phase, t.found, t.erased))
    };
    assert_eq!(
        phase_of(&status.targets, "archive"),
        Some((ErasureTargetPhase::Blocked, 0, 0))
    );
    assert_eq!(
        phase_of(&status.targets, "cache"),
        Some((ErasureTargetPhase::Verified, 2, 2))
    );
    assert_eq!(
        server.keys("archive", "mailer/users/47/").await.len(),
        2,
        "held"
    );

    Api::<LegalHold>::namespaced(client.clone(), &ns)
        .delete("audit", &DeleteParams::default())
        .await
        .unwrap();
    let done = wait_phase(&client, &ns, "dsr-s3", ErasurePhase::Completed).await;
    let status = done.status.unwrap();
    // Two objects (one version each) under the prefix, and two records in the archive.
    assert_eq!(
        phase_of(&status.targets, "archive"),
        Some((ErasureTargetPhase::Verified, 4, 4))
    );
    let totals = status.totals.clone().unwrap();
    assert_eq!((totals.found, totals.erased), (6, 6));
    assert!(server
        .versions("archive", "mailer/users/47/")
        .await
        .is_empty());
    assert_eq!(server.keys("archive", "mailer/users/4711/").await.len(), 1);
    assert_eq!(
        String::from_utf8(server.get("archive", "mailer/logs/day1.jsonl").await).unwrap(),
        record("bob@example.org", 2)
    );
    assert_eq!(count_keys(&mut conn, "session:*").await, 1);

    // No identifier, and no key or prefix built from one, in status, events, metrics or logs.
    wait_metric(
        &operator.running.metrics,
        "tombstone_items_erased_total{store_kind=\"s3\"} 4",
    )
    .await;
    let trail = format!(
        "{}\n{:?}\n{}\n{:?}",
        serde_json::to_string(&status).unwrap(),
        events_for(&client, &ns, "dsr-s3").await,
        operator.running.metrics.render(),
        captured_logs()
    );
    for secret in [EMAIL, "s3-subject-4f1d", "mailer/users/47/"] {
        assert!(
            !trail.contains(secret),
            "{secret} leaked into the operator's trail"
        );
    }
    operator.stop().await;
}

/// Kills the child on drop, so a failing test leaves no operator behind.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn without_a_secret_the_binary_uses_the_default_aws_credential_chain() {
    let (client, ns) = setup("s3-chain").await;
    let server = S3Server::start();
    server.create_bucket("archive", false, false).await;
    // From here on the server accepts only these keys; they reach the operator only through
    // its environment, as on a node or pod with AWS credentials.
    let (key_id, secret_key) = server.enable_auth();
    // moto speaks plain HTTP: requests signed with the operator's identity need insecure.
    let spec = json!({"s3": {"bucket": "archive", "region": "us-east-1",
                             "endpoint": server.endpoint(), "forcePathStyle": true},
                      "insecure": true});
    create::<tombstone::api::DataStore>(
        &client,
        &ns,
        json!({"apiVersion": "tombstone.dev/v1alpha1", "kind": "DataStore", "metadata": {"name": "archive"}, "spec": spec}),
    )
    .await;
    let cp = crate::support::ControlPlane::get();
    let _operator = KillOnDrop(
        std::process::Command::new(env!("CARGO_BIN_EXE_tombstone"))
            .args([
                "run",
                "--namespace",
                &ns,
                "--leader-election=false",
                "--http-addr",
                "127.0.0.1:0",
                "--allow-ambient-credentials",
            ])
            .env("KUBECONFIG", cp.kubeconfig_path())
            .env("AWS_ACCESS_KEY_ID", &key_id)
            .env("AWS_SECRET_ACCESS_KEY", &secret_key)
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env_remove("AWS_PROFILE")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start tombstone run"),
    );
    let (reason, message) = ready_reason(&client, &ns, "archive", true).await;
    assert_eq!(
        (reason.as_str(), message.as_str()),
        ("Connected", "s3 bucket archive")
    );
}

#[tokio::test]
async fn an_s3_sweep_stopped_midway_resumes_from_the_listing_position_in_status() {
    const OLD: usize = 3000;
    let (client, ns) = setup("s3-resume").await;
    let server = S3Server::start();
    server.create_bucket("archive", false, false).await;
    put_many(
        &server,
        "archive",
        (0..OLD).map(|i| format!("logs/{i:05}")).collect(),
    )
    .await;
    put_many(
        &server,
        "archive",
        (0..10).map(|i| format!("keep/{i}")).collect(),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    // One request a second: each listing page and each DeleteObjects waits its turn, so the
    // sweep checkpoints page by page and there is a middle to stop in.
    let operator = TestOperator::start(&ns).await;
    create_credentials_secret(
        &client,
        &ns,
        "archive-creds",
        json!({"accessKeyId": ACCESS_KEY_ID, "secretAccessKey": SECRET_ACCESS_KEY}),
    )
    .await;
    s3_store(&client, &ns, "archive", "archive", &server.endpoint()).await;
    patch_spec::<tombstone::api::DataStore>(
        &client,
        &ns,
        "archive",
        json!({"limits": {"requestsPerSecond": 1}}),
    )
    .await;
    create::<RetentionPolicy>(
        &client,
        &ns,
        policy_json(
            "logs",
            "1s",
            json!([{"name": "logs", "store": "archive", "s3": {"prefix": "logs/"}}]),
        ),
    )
    .await;
    wait_policy(
        &client,
        &ns,
        "logs",
        "a checkpoint",
        Duration::from_secs(60),
        |p| {
            p.status.as_ref().is_some_and(|s| {
                s.targets.first().is_some_and(|t| {
                    t.cursor.as_deref().is_some_and(|c| c.starts_with("v1:s3:")) && t.deleted > 0
                })
            })
        },
    )
    .await;
    operator.stop().await;

    let stopped = get_policy(&client, &ns, "logs").await.status.unwrap();
    let started = stopped
        .current_sweep
        .clone()
        .expect("still under way")
        .start_time;
    let remaining = server.keys("archive", "logs/").await.len();
    assert!(
        remaining > 0,
        "the sweep must not have finished before the stop"
    );
    assert_eq!(stopped.targets[0].deleted_total as usize, OLD - remaining);

    let operator = TestOperator::start(&ns).await;
    let done = wait_sweep_completed(&client, &ns, "logs", None)
        .await
        .status
        .unwrap();
    let last = done.last_sweep.unwrap();
    assert_eq!(last.start_time, started, "the same sweep, resumed");
    assert_eq!(
        last.deleted as usize, OLD,
        "nothing counted twice, nothing lost"
    );
    assert_eq!(done.targets[0].deleted_total as usize, OLD);
    assert!(server.keys("archive", "logs/").await.is_empty());
    assert_eq!(server.keys("archive", "keep/").await.len(), 10);
    operator.stop().await;
}
