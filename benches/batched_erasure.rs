//! Batched erasure: many ErasureRequests against gzip JSON-lines mail logs in a local S3
//! server (moto) and a large Redis keyspace, on the test API server with the operator
//! in-process. Measured in the same run, on the same data:
//! - one request alone: the time until it is Completed;
//! - N requests filed at once, batched (the operator's defaults): the time until all are
//!   Completed, and its ratio to one request alone (goal: under 3);
//! - requests one at a time (`--erasure-batch-size 1`, what the operator did before it
//!   batched): the time of `BENCH_SERIAL` requests filed at once, per request, and what N
//!   would take at that rate;
//! - the API server's ceilings: status writes like the operator's (to requests made for it),
//!   and creates (ConfigMaps), as fast as it takes them; and the time the batched run's writes
//!   (the operator's and the benchmark's own creates) alone need at those rates: a floor of
//!   the batched run on this machine.
//!
//! Run:
//!
//!     cargo bench --bench batched_erasure          # 1,000 requests, 200 MB of logs, 1,000,000 keys
//!     BENCH_REQUESTS=100 BENCH_LOGS_MB=20 BENCH_KEYS=100000 cargo bench --bench batched_erasure
//!
//! Knobs: `BENCH_REQUESTS` (default 1000), `BENCH_LOGS_MB` (decoded size of the logs,
//! default 200, in archives of 10 MB), `BENCH_KEYS` (Redis keys, default 1,000,000),
//! `BENCH_SERIAL` (requests of the one-at-a-time run, default 8). Every subject has 2
//! session keys and 3 records in the logs. Needs the environment of `hack/setup.sh`
//! (`KUBEBUILDER_ASSETS`), `redis-server` and moto. `RUST_LOG=tombstone::engine::batch=info`
//! logs every batch as it ends: its target, action, members, steps and checkpoint time.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::io::Write;
use std::time::{Duration, Instant};

use flate2::write::GzEncoder;
use flate2::Compression;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{Api, ListParams};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use tombstone::api::erasurerequest::ErasurePhase;
use tombstone::api::{DataStore, ErasureRequest, RetentionPolicy};
use tombstone::controller::Settings;
use tombstone::engine::batch::BatchSettings;
use tombstone::operator::{self, Options};

use support::request_log::{table, RequestLog};
use support::s3::S3Server;
use support::scale::{create_retrying, write_floor, writes, Rng};
use support::{ControlPlane, RedisServer};

const BUCKET: &str = "mail-archive";
const LOGS: &str = "mail/logs/";
const ARCHIVE_MB: usize = 10;
const RECORDS_PER_SUBJECT: usize = 3;
const KEYS_PER_SUBJECT: usize = 2;
/// How many creates the benchmark has in flight when it files requests.
const FILING_IN_FLIGHT: usize = 32;

fn knob(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn user(i: usize) -> String {
    format!("u{i}")
}

fn email(i: usize) -> String {
    format!("subject-{i}@mail.example.org")
}

/// Gzip JSON-lines mailer logs of about `megabytes` decoded, in archives of `ARCHIVE_MB`:
/// every subject's records spread at random among everyone else's.
fn logs(megabytes: usize, subjects: usize) -> Vec<Vec<u8>> {
    let archives = megabytes.div_ceil(ARCHIVE_MB).max(1);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    // Which archive and line each subject record goes to.
    let mut placed: Vec<Vec<(usize, usize)>> = vec![Vec::new(); archives];
    let lines_per_archive = ARCHIVE_MB * 1_000_000 / 330;
    for s in 0..subjects {
        for _ in 0..RECORDS_PER_SUBJECT {
            let a = (rng.next() % archives as u64) as usize;
            let line = (rng.next() % lines_per_archive as u64) as usize;
            placed[a].push((line, s));
        }
    }
    placed
        .into_iter()
        .map(|mut mine| {
            mine.sort_unstable();
            let mut out = GzEncoder::new(Vec::new(), Compression::default());
            let mut next = mine.into_iter().peekable();
            for n in 0..lines_per_archive {
                let r = rng.next();
                let mut write = |recipient: &str| {
                    let _ = writeln!(
                        out,
                        "{{\"ts\":\"2025-03-01T12:{:02}:{:02}.{:03}Z\",\"level\":\"info\",\"msg\":{{\"recipient\":\"{recipient}\",\"id\":{n},\"template\":\"order-confirmation\"}},\"status\":\"sent\",\"pad\":\"<{:016x}@mail.example.org> relay=mx1.example.net delay=0.{:03} dsn=2.0.0\"}}",
                        (r >> 8) % 60,
                        (r >> 16) % 60,
                        (r >> 24) % 1000,
                        rng.next(),
                        r % 1000,
                    );
                };
                while next.peek().is_some_and(|(line, _)| *line == n) {
                    if let Some((_, s)) = next.next() {
                        write(&email(s));
                    }
                }
                write(&format!("user{}@example.org", (r >> 32) % 250_000));
            }
            out.finish().unwrap_or_default()
        })
        .collect()
}

async fn seed_redis(url: &str, keys: usize, subjects: usize) {
    let client = redis::Client::open(url).expect("redis url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis connection");
    let subject_keys = subjects * KEYS_PER_SUBJECT;
    let others = keys.saturating_sub(subject_keys);
    let mut pipe = redis::pipe();
    let mut queued = 0;
    let all = (0..subjects)
        .flat_map(|s| (0..KEYS_PER_SUBJECT).map(move |k| format!("session:{}:{k}", user(s))))
        .chain((0..others).map(|j| format!("session:visitor{j}:0")));
    for key in all {
        pipe.cmd("SET").arg(key).arg("t").ignore();
        queued += 1;
        if queued == 10_000 {
            let _: () = pipe.query_async(&mut conn).await.expect("SET");
            pipe = redis::pipe();
            queued = 0;
        }
    }
    if queued > 0 {
        let _: () = pipe.query_async(&mut conn).await.expect("SET");
    }
}

/// The stores and the policy with the two targets every request erases from.
async fn shop(client: &kube::Client, ns: &str, redis: &RedisServer, s3: &S3Server) {
    let stores: Api<DataStore> = Api::namespaced(client.clone(), ns);
    create_retrying(
        &stores,
        json!({"apiVersion": "tombstone.dev/v1alpha1", "kind": "DataStore",
        "metadata": {"name": "cache"}, "spec": {"redis": {"url": redis.url()}}}),
    )
    .await;
    create_retrying(
        &Api::<Secret>::namespaced(client.clone(), ns),
        json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "archive-creds", "labels": {"tombstone.dev/credentials": "true"}},
        "stringData": {"accessKeyId": "bench", "secretAccessKey": "bench"}}),
    )
    .await;
    create_retrying(
        &stores,
        json!({"apiVersion": "tombstone.dev/v1alpha1", "kind": "DataStore",
        "metadata": {"name": "archive"},
        "spec": {"s3": {"bucket": BUCKET, "region": "us-east-1", "endpoint": s3.endpoint(),
                        "forcePathStyle": true, "credentialsSecretRef": {"name": "archive-creds"}},
                 "insecure": true}}),
    )
    .await;
    create_retrying(
        &Api::<RetentionPolicy>::namespaced(client.clone(), ns),
        json!({
            "apiVersion": "tombstone.dev/v1alpha1", "kind": "RetentionPolicy",
            "metadata": {"name": "mailer"},
            "spec": {"purpose": "Deliver transactional email", "legalBasis": "contract",
                     "dataSubjects": ["customers"], "dataCategories": ["email address"],
                     "retention": "30d", "schedule": {"every": "24h"}, "suspend": true,
                     "targets": [
                        {"name": "sessions", "store": "cache", "redis": {"keyPattern": "session:*"},
                         "subject": {"redis": {"keys": ["session:{userId}:*"]}}},
                        {"name": "logs", "store": "archive", "s3": {"prefix": LOGS},
                         "subject": {"s3": {"records": {"prefix": LOGS, "field": "msg.recipient",
                                                         "equals": "{email}"}}}}]}
        }),
    )
    .await;
}

/// Files the requests of `subjects` at once (Secret, then request) and waits until all are
/// Completed; returns the time from the first create.
async fn erase(
    client: &kube::Client,
    ns: &str,
    run: &str,
    subjects: std::ops::Range<usize>,
) -> Duration {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let requests: Api<ErasureRequest> = Api::namespaced(client.clone(), ns);
    let n = subjects.len();
    let started = Instant::now();
    futures::stream::iter(subjects)
        .for_each_concurrent(FILING_IN_FLIGHT, |i| {
            let (secrets, requests) = (secrets.clone(), requests.clone());
            async move {
                create_retrying(&secrets, json!({"apiVersion": "v1", "kind": "Secret",
                    "metadata": {"name": format!("dsr-{i}"), "labels": {"tombstone.dev/subject-identifiers": "true"}},
                    "stringData": {"userId": user(i), "email": email(i)}}))
                .await;
                create_retrying(&requests, json!({"apiVersion": "tombstone.dev/v1alpha1", "kind": "ErasureRequest",
                    "metadata": {"name": format!("{run}-{i}"), "labels": {"run": run}},
                    "spec": {"subject": {"secretRef": {"name": format!("dsr-{i}")}},
                             "reason": "consentWithdrawn"}}))
                .await;
            }
        })
        .await;
    if n > 1 {
        println!(
            "    {run}: {n} requests filed in {:.1}s",
            started.elapsed().as_secs_f64()
        );
    }
    let by_run = ListParams::default().labels(&format!("run={run}"));
    let mut last_report = Instant::now();
    loop {
        let list = requests.list(&by_run).await.expect("list requests");
        let done = list
            .items
            .iter()
            .filter(|r| {
                r.status
                    .as_ref()
                    .is_some_and(|s| s.phase == ErasurePhase::Completed)
            })
            .count();
        let failed: Vec<&str> = list
            .items
            .iter()
            .filter(|r| {
                r.status
                    .as_ref()
                    .is_some_and(|s| s.phase == ErasurePhase::Failed)
            })
            .filter_map(|r| r.metadata.name.as_deref())
            .collect();
        assert!(failed.is_empty(), "requests failed: {failed:?}");
        if done == n {
            return started.elapsed();
        }
        if last_report.elapsed() > Duration::from_secs(30) {
            // Where the slowest request is, so a stuck run says why.
            last_report = Instant::now();
            let waiting = list.items.iter().find(|r| {
                r.status
                    .as_ref()
                    .is_none_or(|s| s.phase != ErasurePhase::Completed)
            });
            let why = waiting
                .and_then(|r| r.status.as_ref())
                .map(|s| {
                    let targets: Vec<String> = s
                        .targets
                        .iter()
                        .map(|t| format!("{}: {:?} {}", t.target, t.phase, t.message))
                        .collect();
                    format!("{:?} [{}]", s.phase, targets.join("; "))
                })
                .unwrap_or_else(|| "no status yet".into());
            println!(
                "    {run}: {done} of {n} completed after {:.0}s; one waiting: {why}",
                started.elapsed().as_secs_f64()
            );
        }
        assert!(
            started.elapsed() < Duration::from_secs(3600),
            "{run}: only {done} of {n} completed in an hour"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Runs `work` with the operator in-process; returns its outcome, the erase batches and
/// their members, and the operator's API requests by kind.
async fn with_operator<T>(
    client: &kube::Client,
    ns: &str,
    batches: BatchSettings,
    work: impl std::future::Future<Output = T>,
) -> (T, u64, u64, BTreeMap<String, usize>) {
    let shutdown = CancellationToken::new();
    let options = Options {
        namespace: Some(ns.to_string()),
        leader_election: None,
        http_addr: None,
        reporter: "tombstone".into(),
        settings: Settings {
            operator_namespace: ns.to_string(),
            batches,
            ..Settings::default()
        },
    };
    let log = RequestLog::default();
    let running = operator::start(log.client(), options, shutdown.clone())
        .await
        .expect("operator starts");
    // The stores are probed and Ready before any request is filed: the runs time erasures,
    // not the operator's start.
    let stores: Api<DataStore> = Api::namespaced(client.clone(), ns);
    for name in ["cache", "archive"] {
        let started = Instant::now();
        loop {
            let store = stores.get(name).await.expect("get DataStore");
            let ready = store
                .status
                .as_ref()
                .and_then(|s| tombstone::api::common::find_condition(&s.conditions, "Ready"))
                .is_some_and(|c| c.status == tombstone::api::common::ConditionStatus::True);
            if ready {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "DataStore {name} is not Ready"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let mark = log.len();
    let out = work.await;
    let requests = log.since(mark);
    let erase = tombstone::metrics::ActionLabels {
        action: "erase".into(),
    };
    let batches_run = running.metrics.erasure_batches.get_or_create(&erase).get();
    let members = running
        .metrics
        .erasure_batch_members
        .get_or_create(&erase)
        .get();
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(60), running.task).await;
    (out, batches_run, members, requests)
}

#[tokio::main]
async fn main() {
    // `RUST_LOG=tombstone::engine::batch=info` shows each batch as it ends.
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .try_init();
    }
    let n = knob("BENCH_REQUESTS", 1000);
    let megabytes = knob("BENCH_LOGS_MB", 200);
    let keys = knob("BENCH_KEYS", 1_000_000);
    let serial = knob("BENCH_SERIAL", 8);
    // Subject 0 alone, 1..=n batched, then `serial` one at a time.
    let subjects = 1 + n + serial;

    let plane = ControlPlane::get();
    plane.install_crds().await;
    let client = plane.client();
    let ns = support::test_namespace(&client, "batched-bench").await;
    let redis = RedisServer::start();
    let s3 = S3Server::start();
    s3.create_bucket(BUCKET, false, false).await;
    let timer = Instant::now();
    seed_redis(&redis.url(), keys, subjects).await;
    let archives = logs(megabytes, subjects);
    let compressed: usize = archives.iter().map(Vec::len).sum();
    for (i, archive) in archives.into_iter().enumerate() {
        s3.put(BUCKET, &format!("{LOGS}2025-03-{i:03}.jsonl.gz"), archive)
            .await;
    }
    println!(
        "batched erasure: {keys} Redis keys and {megabytes} MB of mail logs ({:.0} MB gzip) seeded in {:.1}s; {subjects} subjects with {KEYS_PER_SUBJECT} keys and {RECORDS_PER_SUBJECT} records each",
        compressed as f64 / 1e6,
        timer.elapsed().as_secs_f64()
    );
    shop(&client, &ns, &redis, &s3).await;

    let defaults = BatchSettings::default();
    let (one, _, _, _) =
        with_operator(&client, &ns, defaults, erase(&client, &ns, "alone", 0..1)).await;
    println!(
        "  one request alone: Completed in {:.1}s",
        one.as_secs_f64()
    );

    let (all, batches_run, members, requests) = with_operator(
        &client,
        &ns,
        defaults,
        erase(&client, &ns, "batched", 1..n + 1),
    )
    .await;
    println!(
        "  {n} requests filed at once, batched (up to {} per batch): all Completed in {:.1}s, {:.2}x one request alone (goal: under 3x); erase ran in {batches_run} batches for {members} targets",
        defaults.max_members,
        all.as_secs_f64(),
        all.as_secs_f64() / one.as_secs_f64()
    );
    println!(
        "    the operator's API requests meanwhile: {}, {} of them writes\n{}",
        requests.values().sum::<usize>(),
        writes(&requests),
        table(&requests)
    );
    // What the API server alone needs for those writes and the benchmark's own creates (a
    // Secret and a request each), at its ceilings measured now: status writes like the
    // operator's (of a finished request's status), and plain creates for the rest.
    let floor = write_floor(
        &client,
        &ns,
        Some("run=batched"),
        &requests,
        2 * n,
        n,
        FILING_IN_FLIGHT,
    )
    .await;
    println!(
        "    the API server's ceilings now: {:.0} status writes/s, {:.0} creates/s; the run's {} status writes and {} other writes alone take {:.1}s there, {:.0}% of the run",
        floor.status_rate,
        floor.create_rate,
        floor.status_writes,
        floor.other_writes,
        floor.seconds(),
        100.0 * floor.seconds() / all.as_secs_f64()
    );

    let one_at_a_time = BatchSettings {
        max_members: 1,
        ..defaults
    };
    let (some, _, _, _) = with_operator(
        &client,
        &ns,
        one_at_a_time,
        erase(&client, &ns, "serial", n + 1..n + 1 + serial),
    )
    .await;
    let each = some.as_secs_f64() / serial as f64;
    println!(
        "  one at a time (--erasure-batch-size 1): {serial} requests filed at once Completed in {:.1}s, {:.2}s per request: {n} would take about {:.0}s, {:.0}x the batched run",
        some.as_secs_f64(),
        each,
        each * n as f64,
        each * n as f64 / all.as_secs_f64()
    );
    let _ = Api::<Namespace>::all(client)
        .delete(&ns, &Default::default())
        .await;
}
