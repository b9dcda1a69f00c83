//! Controller scale: N RetentionPolicies and N ErasureRequests (each with its identifiers
//! Secret, as a DPO files them) on the test API server, all created before the operator
//! starts, as after an install or a restart. Measured: the time until every policy has a
//! status for its generation and every request is Completed, the resident memory the
//! operator adds to this process, the API requests it made by kind (with the Secret GETs
//! and what one costs), and, for a second operator over the same objects with nothing due,
//! the writes it made (none is the goal: no reconcile storm).
//!
//! `SCALE_OBJECTS` sets N (default 10,000); `SCALE_RECONCILE_CONCURRENCY` the reconciles run
//! at once per controller and `SCALE_MAX_CONCURRENT_JOBS` the store steps run at once
//! (default: the operator's), to compare. Needs the environment of `hack/setup.sh`
//! (`KUBEBUILDER_ASSETS`) and `redis-server`. Run: `cargo bench --bench controller_scale`;
//! `RUST_LOG=tombstone=info` shows what the operator does, and a line every 15 s what it asked
//! of the API server.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::Api;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use tombstone::api::{DataStore, ErasureRequest, RetentionPolicy};
use tombstone::controller::{erasurerequest, retentionpolicy, Settings};
use tombstone::operator::{self, Options};

use support::request_log::{table, RequestLog};
use support::scale::{create_retrying, write_floor, writes, Handled};
use support::{ControlPlane, RedisServer};

const CREATE_CONCURRENCY: usize = 32;

fn status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

async fn create_all(client: &kube::Client, ns: &str, n: usize) {
    let policies: Api<RetentionPolicy> = Api::namespaced(client.clone(), ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let requests: Api<ErasureRequest> = Api::namespaced(client.clone(), ns);
    futures::stream::iter(0..n)
        .for_each_concurrent(CREATE_CONCURRENCY, |i| {
            let (policies, secrets, requests) = (policies.clone(), secrets.clone(), requests.clone());
            async move {
                create_retrying(&policies, json!({
                    "apiVersion": "tombstone.dev/v1alpha1", "kind": "RetentionPolicy",
                    "metadata": {"name": format!("p-{i}")},
                    "spec": {"purpose": "Keep shoppers logged in", "legalBasis": "contract",
                             "dataSubjects": ["customers"], "dataCategories": ["session data"],
                             "retention": "30d", "schedule": {"every": "1h"},
                             "targets": [{"name": "sessions", "store": "cache",
                                          "redis": {"keyPattern": format!("p{i}:session:*")},
                                          "subject": {"redis": {"keys": [format!("p{i}:session:{{userId}}:*")]}}}]}
                }))
                .await;
                create_retrying(&secrets, json!({
                    "apiVersion": "v1", "kind": "Secret",
                    "metadata": {"name": format!("dsr-{i}"), "labels": {"tombstone.dev/subject-identifiers": "true"}},
                    "stringData": {"userId": format!("u-scale-{i}")}
                }))
                .await;
                create_retrying(&requests, json!({
                    "apiVersion": "tombstone.dev/v1alpha1", "kind": "ErasureRequest",
                    "metadata": {"name": format!("r-{i}")},
                    "spec": {"subject": {"secretRef": {"name": format!("dsr-{i}")}},
                             "reason": "consentWithdrawn", "retainSubjectSecret": true,
                             "policies": [format!("p-{i}")]}
                }))
                .await;
            }
        })
        .await;
}

/// The operator's defaults, but for what `SCALE_RECONCILE_CONCURRENCY` and
/// `SCALE_MAX_CONCURRENT_JOBS` set.
fn settings(ns: &str) -> Settings {
    let defaults = Settings::default();
    Settings {
        operator_namespace: ns.to_string(),
        reconcile_concurrency: std::env::var("SCALE_RECONCILE_CONCURRENCY")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(defaults.reconcile_concurrency),
        max_concurrent_jobs: std::env::var("SCALE_MAX_CONCURRENT_JOBS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(defaults.max_concurrent_jobs),
        ..defaults
    }
}

async fn start(
    log: &RequestLog,
    plane: &ControlPlane,
    ns: &str,
) -> (CancellationToken, operator::Running) {
    let shutdown = CancellationToken::new();
    let options = Options {
        namespace: Some(ns.to_string()),
        leader_election: None,
        http_addr: None,
        reporter: "tombstone".into(),
        settings: settings(ns),
    };
    let running = operator::start(log.client_of(plane), options, shutdown.clone())
        .await
        .expect("operator starts");
    (shutdown, running)
}

async fn stop(shutdown: CancellationToken, running: operator::Running) {
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(60), running.task).await;
}

#[tokio::main]
async fn main() {
    // `RUST_LOG=tombstone=info` shows what the operator does.
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .try_init();
    }
    let n: usize = std::env::var("SCALE_OBJECTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let plane = ControlPlane::get();
    plane.install_crds().await;
    let client = plane.client();
    let ns = support::test_namespace(&client, "scale-bench").await;
    let redis = RedisServer::start();
    create_retrying(
        &Api::<DataStore>::namespaced(client.clone(), &ns),
        json!({"apiVersion": "tombstone.dev/v1alpha1", "kind": "DataStore", "metadata": {"name": "cache"},
               "spec": {"redis": {"url": redis.url()}}}),
    )
    .await;

    let created = Instant::now();
    create_all(&client, &ns, n).await;
    let creating = created.elapsed();
    println!(
        "controller scale: {n} policies, {n} identifiers Secrets and {n} requests created in {:.1}s ({:.0} objects/s)",
        creating.as_secs_f64(),
        (3 * n) as f64 / creating.as_secs_f64()
    );

    // What one Secret GET costs on this API server, sequentially and 16 at a time.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let sample = n.min(1_000);
    let timer = Instant::now();
    for i in 0..sample {
        secrets.get(&format!("dsr-{i}")).await.expect("get Secret");
    }
    let sequential = timer.elapsed().as_secs_f64() / sample as f64;
    let timer = Instant::now();
    futures::stream::iter(0..sample)
        .for_each_concurrent(16, |i| {
            let secrets = secrets.clone();
            async move {
                secrets.get(&format!("dsr-{i}")).await.expect("get Secret");
            }
        })
        .await;
    let concurrent = timer.elapsed().as_secs_f64() / sample as f64;
    println!(
        "  one Secret GET: {:.2} ms alone, {:.2} ms each 16 at a time: {n} of them take {:.1}s / {:.1}s",
        sequential * 1e3,
        concurrent * 1e3,
        sequential * n as f64,
        concurrent * n as f64
    );

    let handled = Handled::watch(&client, &ns).await;
    let rss_before = status_kib("VmRSS:").unwrap_or(0);
    // The kernel's own peak (VmHWM) from here on, exact where sampling misses short peaks:
    // "5" resets it to the current RSS.
    let exact_peak = std::fs::write("/proc/self/clear_refs", "5").is_ok();
    let log = RequestLog::default();
    let started = Instant::now();
    let (shutdown, running) = start(&log, plane, &ns).await;
    let mut peak_rss = 0;
    let deadline = Instant::now() + Duration::from_secs(1800);
    let mut progress = Instant::now();
    let mut mark = 0;
    loop {
        peak_rss = peak_rss.max(status_kib("VmRSS:").unwrap_or(0));
        let (p, r) = handled.counts();
        if p == n && r == n {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {p} policies and {r} requests handled in 30 minutes"
        );
        if progress.elapsed() >= Duration::from_secs(15) {
            // What the operator is doing: the requests of the last interval, most first.
            let mut recent: Vec<_> = log.since(mark).into_iter().collect();
            recent.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
            let recent: Vec<String> = recent
                .iter()
                .take(5)
                .map(|(k, n)| format!("{n} {k}"))
                .collect();
            eprintln!(
                "  {:.0}s: {p} policies and {r} requests handled; {} requests since the last line ({})",
                started.elapsed().as_secs_f64(),
                log.len() - mark,
                recent.join(", ")
            );
            progress = Instant::now();
            mark = log.len();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(handled);
    let reconciled = started.elapsed();
    let rss_after = status_kib("VmRSS:").unwrap_or(0);
    let (peak_rss, peak_how) = match status_kib("VmHWM:") {
        Some(hwm) if exact_peak => (hwm, "VmHWM"),
        _ => (peak_rss, "sampled every 100 ms"),
    };
    stop(shutdown, running).await;
    let counts = log.since(0);
    let total: usize = counts.values().sum();
    println!(
        "  every object reconciled and given its status in {:.1}s (goal: 60s); operator memory: about {} MiB added to this process's {} MiB (peak {} MiB, {peak_how}; goal: 200 MiB)",
        reconciled.as_secs_f64(),
        rss_after.saturating_sub(rss_before) / 1024,
        rss_before / 1024,
        peak_rss / 1024
    );
    println!(
        "  API requests of the first operator: {total}, {} of them writes\n{}",
        writes(&counts),
        table(&counts)
    );
    // What the API server alone needs for those writes, at its ceilings measured now: status
    // writes like the operator's (of a finished request's status) and plain creates.
    let floor = write_floor(&client, &ns, None, &counts, 0, n.min(2_000), 16).await;
    println!(
        "  the API server's ceilings now (16 in flight): {:.0} status writes/s, {:.0} creates/s; the first operator's {} status writes and {} other writes alone take {:.0}s there",
        floor.status_rate,
        floor.create_rate,
        floor.status_writes,
        floor.other_writes,
        floor.seconds()
    );

    // A second operator over the same objects, with nothing due: it must write nothing.
    let log = RequestLog::default();
    let started = Instant::now();
    let (shutdown, running) = start(&log, plane, &ns).await;
    let metrics = running.metrics.clone();
    let seen = |controller: &str| {
        metrics
            .reconciliations
            .get_or_create(&tombstone::metrics::ControllerLabels {
                controller: controller.into(),
            })
            .get()
    };
    while seen(retentionpolicy::CONTROLLER) < n as u64
        || seen(erasurerequest::CONTROLLER) < n as u64
    {
        assert!(
            started.elapsed() < Duration::from_secs(900),
            "the second pass did not finish"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let second = started.elapsed();
    stop(shutdown, running).await;
    let counts = log.since(0);
    let writes = writes(&counts);
    println!(
        "  a second operator reconciled all {} objects in {:.1}s with {} requests, {writes} of them writes (goal: 0)\n{}",
        2 * n,
        second.as_secs_f64(),
        counts.values().sum::<usize>(),
        table(&counts)
    );
    let _ = Api::<Namespace>::all(client)
        .delete(&ns, &Default::default())
        .await;
}
