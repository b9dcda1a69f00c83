//! Many objects at once: a thousand RetentionPolicies and a thousand ErasureRequests are each
//! reconciled and given a status with few requests to the API server (one status write per
//! request and per policy), and an operator that starts over them afterwards (every object
//! reconciled once more, nothing due) writes nothing: no reconcile storm.

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::json;
use tombstone::api::{ErasureRequest, RetentionPolicy};
use tombstone::controller::{erasurerequest, retentionpolicy};

use crate::api_load::RequestLog;
use crate::fixtures::{
    create, fast_settings, policy_json, redis_store, setup, wait_store_ready, TestOperator,
};
use crate::support::scale::Handled;
use crate::support::{wait_for, RedisServer};

const POLICIES: usize = 1_000;
const REQUESTS: usize = 1_000;
/// Objects created at once.
const CREATE_CONCURRENCY: usize = 16;

fn rss_mib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

#[tokio::test]
async fn a_thousand_policies_and_requests_are_all_reconciled_and_a_second_pass_writes_nothing() {
    let (client, ns) = setup("scale").await;
    let redis = RedisServer::start();
    let first_log = RequestLog::default();
    let first =
        TestOperator::start_with_client(first_log.client(), &ns, None, None, fast_settings()).await;
    redis_store(&client, &ns, "cache", &redis.url(), json!({})).await;
    wait_store_ready(&client, &ns, "cache", true).await;

    let handled = Handled::watch(&client, &ns).await;
    let started = Instant::now();
    futures::stream::iter(0..POLICIES)
        .for_each_concurrent(CREATE_CONCURRENCY, |i| {
            let client = client.clone();
            let ns = ns.clone();
            async move {
                create::<RetentionPolicy>(
                    &client,
                    &ns,
                    policy_json(
                        &format!("p-{i}"),
                        "30d",
                        json!([{
                            "name": "sessions", "store": "cache",
                            "redis": {"keyPattern": format!("p{i}:session:*")},
                            "subject": {"redis": {"keys": [format!("p{i}:session:{{userId}}:*")]}}
                        }]),
                    ),
                )
                .await;
            }
        })
        .await;
    futures::stream::iter(0..REQUESTS)
        .for_each_concurrent(CREATE_CONCURRENCY, |i| {
            let client = client.clone();
            let ns = ns.clone();
            async move {
                create::<ErasureRequest>(
                    &client,
                    &ns,
                    json!({
                        "apiVersion": "tombstone.dev/v1alpha1", "kind": "ErasureRequest",
                        "metadata": {"name": format!("r-{i}")},
                        "spec": {"subject": {"identifiers": {"userId": format!("u-scale-{i}")}},
                                 "reason": "consentWithdrawn",
                                 "policies": [format!("p-{}", i % POLICIES)]}
                    }),
                )
                .await;
            }
        })
        .await;
    let created = started.elapsed();
    let (policies, requests) = wait_for(
        "every policy and request handled",
        Duration::from_secs(600),
        || {
            let (p, r) = handled.counts();
            std::future::ready((p == POLICIES && r == REQUESTS).then_some((p, r)))
        },
    )
    .await;
    let all_handled = started.elapsed();
    eprintln!(
        "scale: {POLICIES} policies and {REQUESTS} requests created in {:.1}s; all {policies} + {requests} handled {:.1}s after the first was created; test process RSS {} MiB",
        created.as_secs_f64(),
        all_handled.as_secs_f64(),
        rss_mib().map_or("?".into(), |m| m.to_string()),
    );
    first.stop().await;
    let made = first_log.since(0);
    eprintln!("scale: the first operator made {made:?}");
    // Each request passes its quick phases in one reconcile: one status write (three when each
    // phase took a reconcile) and no more than one Event, and LegalHold lists are shared by
    // the reconciles asking at the same moment (not one per reconcile and phase).
    let of = |kind: &str| made.get(kind).copied().unwrap_or(0);
    assert!(
        of("patch erasurerequests/status") < REQUESTS * 3 / 2,
        "status writes per request: {made:?}"
    );
    // A policy's first sweep finds nothing to delete in the empty store: it ends in the step
    // that starts it, one status write (no ledger to name, checkpoint and remove).
    assert!(
        of("patch retentionpolicies/status") < POLICIES * 3 / 2,
        "status writes per policy: {made:?}"
    );
    assert!(
        of("create events") < POLICIES + REQUESTS * 3 / 2,
        "Events per request: {made:?}"
    );
    assert!(
        of("list legalholds") < 2 * (POLICIES + REQUESTS),
        "LegalHold lists: {made:?}"
    );

    // A new operator over the same objects: it reconciles each once as its watches list
    // them; with nothing due, none of those passes writes anything.
    let log = RequestLog::default();
    let second =
        TestOperator::start_with_client(log.client(), &ns, None, None, fast_settings()).await;
    let restarted = Instant::now();
    wait_for(
        "every object reconciled by the new operator",
        Duration::from_secs(300),
        || {
            let seen = (
                second.reconciliations(retentionpolicy::CONTROLLER),
                second.reconciliations(erasurerequest::CONTROLLER),
            );
            async move { (seen.0 >= POLICIES as u64 && seen.1 >= REQUESTS as u64).then_some(()) }
        },
    )
    .await;
    let second_pass = restarted.elapsed();
    // Every object's reconcile has started; a graceful stop lets the running ones end, so the
    // log is complete once it returns.
    second.stop().await;
    let counts = log.since(0);
    let writes: Vec<(&String, &usize)> = counts
        .iter()
        .filter(|(kind, _)| {
            !kind.starts_with("get ") && !kind.starts_with("list ") && !kind.starts_with("watch ")
        })
        .collect();
    eprintln!(
        "scale: the second operator reconciled every object in {:.1}s with {} requests: {:?}",
        second_pass.as_secs_f64(),
        counts.values().sum::<usize>(),
        counts
    );
    assert!(
        writes.is_empty(),
        "a pass with nothing due wrote: {writes:?}"
    );
}
