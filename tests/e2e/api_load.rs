//! What the operator asks of the API server: every request it makes goes through a client
//! that records it, so the load of a sweep can be measured (and printed) and a pass with
//! nothing to do can be shown to write nothing.

use std::collections::BTreeMap;
use std::time::Duration;

use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use tombstone::api::erasurerequest::ErasurePhase;
use tombstone::api::retentionpolicy::RetentionPolicy;
use tombstone::api::ErasureRequest;
use tombstone::controller::Settings;

use crate::fixtures::{
    count_keys, create, create_credentials_secret, create_subject_secret, fast_settings,
    policy_json, redis_conn, redis_store, seed, setup, wait_policy, wait_store_ready,
    wait_sweep_succeeded, TestOperator,
};
use crate::support::{wait_for, RedisServer};

pub use crate::support::request_log::{request_kind, RequestLog};

fn table(counts: &BTreeMap<String, usize>) -> String {
    counts
        .iter()
        .map(|(kind, n)| format!("  {n:>6}  {kind}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn total(counts: &BTreeMap<String, usize>, verbs: &[&str]) -> usize {
    counts
        .iter()
        .filter(|(kind, _)| verbs.iter().any(|v| kind.starts_with(&format!("{v} "))))
        .map(|(_, n)| n)
        .sum()
}

/// Fails unless every read (`get`, `list`) in `counts` is of a kind in `allowed`.
fn assert_reads_only(counts: &BTreeMap<String, usize>, allowed: &[&str]) {
    let other: Vec<&String> = counts
        .keys()
        .filter(|k| {
            (k.starts_with("get ") || k.starts_with("list ")) && !allowed.contains(&k.as_str())
        })
        .collect();
    assert!(
        other.is_empty(),
        "unexpected reads {other:?}\n{}",
        table(counts)
    );
}

const POLICIES: &str = tombstone::controller::retentionpolicy::CONTROLLER;
const STORES_CONTROLLER: &str = tombstone::controller::datastore::CONTROLLER;

#[test]
fn requests_are_classified_by_verb_and_resource() {
    let get = http::Method::GET;
    assert_eq!(
        request_kind(&get, "/api/v1/namespaces/n/secrets/s", ""),
        "get secrets"
    );
    assert_eq!(
        request_kind(
            &http::Method::PATCH,
            "/apis/tombstone.dev/v1alpha1/namespaces/n/retentionpolicies/p/status",
            "fieldManager=x"
        ),
        "patch retentionpolicies/status"
    );
    assert_eq!(
        request_kind(
            &get,
            "/apis/tombstone.dev/v1alpha1/namespaces/n/legalholds",
            ""
        ),
        "list legalholds"
    );
    assert_eq!(
        request_kind(
            &get,
            "/apis/tombstone.dev/v1alpha1/namespaces/n/legalholds",
            "resourceVersion=1&watch=true"
        ),
        "watch legalholds"
    );
    assert_eq!(
        request_kind(&http::Method::POST, "/api/v1/namespaces/n/events", ""),
        "create events"
    );
}

/// One policy sweeps 100,000 Redis keys: the requests it makes per checkpointed step are
/// printed (the figures the caching of reads is measured against), and once the sweep is
/// done, passes with nothing due write nothing: no status, no Event.
#[tokio::test]
async fn a_sweep_of_100k_keys_costs_a_few_requests_per_step_and_a_quiet_pass_writes_nothing() {
    const KEYS: usize = 100_000;
    let (client, ns) = setup("api-load").await;
    let redis = RedisServer::start_with_password("api-load-pass");
    let mut conn = redis_conn(&redis.url()).await;
    seed(&mut conn, "old:", KEYS).await;
    let log = RequestLog::default();
    // Short steps, so that the sweep takes many and the figures are per step.
    let settings = Settings {
        checkpoint_interval: Duration::from_millis(50),
        ..fast_settings()
    };
    let operator = TestOperator::start_with_client(log.client(), &ns, None, None, settings).await;
    create_credentials_secret(
        &client,
        &ns,
        "redis-auth",
        json!({"password": "api-load-pass"}),
    )
    .await;
    let plain = format!("redis://127.0.0.1:{}", redis.port());
    redis_store(
        &client,
        &ns,
        "cache",
        &plain,
        json!({"redis": {"passwordSecretRef": {"name": "redis-auth", "key": "password"}}, "insecure": true}),
    )
    .await;
    wait_store_ready(&client, &ns, "cache", true).await;

    let before = log.len();
    let probes_before = operator.reconciliations(STORES_CONTROLLER);
    create::<RetentionPolicy>(
        &client,
        &ns,
        policy_json(
            "sessions",
            "1h",
            json!([{"name": "sessions", "store": "cache", "redis": {"keyPattern": "old:*", "mode": "idle"}}]),
        ),
    )
    .await;
    let status = wait_sweep_succeeded(
        &client,
        &ns,
        "sessions",
        "the sweep",
        Duration::from_secs(240),
    )
    .await;
    let sweep = log.since(before);
    // Keys idle for less than an hour are all kept: the sweep scans them all.
    let last = status.last_sweep.expect("lastSweep");
    assert_eq!(last.deleted, 0);
    assert_eq!(count_keys(&mut conn, "old:*").await, KEYS);
    let checkpoints = sweep
        .get("patch retentionpolicies/status")
        .copied()
        .unwrap_or(0);
    assert!(
        checkpoints > 0,
        "no status write seen: the client does not record\n{}",
        table(&sweep)
    );
    let reads = total(&sweep, &["get", "list"]);
    // A step reads its checkpoint object fresh, the LegalHolds fresh (a hold placed a moment
    // ago must win) and the credentials Secret (not watched: the RBAC grants no list on
    // Secrets); its DataStore comes from the watch cache. The DataStore controller's own
    // probes (each reading its object fresh) are the only DataStore reads.
    let probes = operator.reconciliations(STORES_CONTROLLER) - probes_before;
    let store_reads = sweep.get("get datastores").copied().unwrap_or(0);
    assert!(
        store_reads as u64 <= probes,
        "{store_reads} DataStore reads for {probes} probes: the sweep's steps read their store from the API server\n{}",
        table(&sweep)
    );
    let allowed = [
        "get retentionpolicies",
        "list legalholds",
        "get secrets",
        "get datastores",
    ];
    assert_reads_only(&sweep, &allowed);
    eprintln!(
        "api_load: a sweep of {KEYS} keys made {} requests, {checkpoints} status writes, {reads} reads ({:.1} per status write):\n{}",
        sweep.values().sum::<usize>(),
        reads as f64 / checkpoints as f64,
        table(&sweep)
    );

    // Two passes with nothing due, each started by an annotation (reconciles of one object
    // never overlap, so once the second has started the first has ended).
    let quiet = log.len();
    let api = Api::<RetentionPolicy>::namespaced(client.clone(), &ns);
    let started = operator.reconciliations(POLICIES);
    for (i, wanted) in [(1, started + 1), (2, started + 2)] {
        api.patch(
            "sessions",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"test/pass": i.to_string()}}})),
        )
        .await
        .expect("annotation patch");
        wait_for("a reconcile of the policy", Duration::from_secs(30), || {
            let seen = operator.reconciliations(POLICIES);
            async move { (seen >= wanted).then_some(()) }
        })
        .await;
    }
    let writes: BTreeMap<String, usize> = log
        .since(quiet)
        .into_iter()
        .filter(|(kind, _)| {
            !kind.starts_with("get ")
                && !kind.starts_with("list ")
                && !kind.starts_with("watch ")
                && kind != "update leases"
        })
        .collect();
    assert!(
        writes.is_empty(),
        "a pass with nothing due wrote:\n{}",
        table(&writes)
    );
    operator.stop().await;
}

/// One erasure over four targets (four DataStores, each with its credentials Secret): the
/// requests it makes are printed, and its steps read only the request itself, the LegalHolds
/// and the Secrets they need; policies and stores come from the watch caches.
#[tokio::test]
async fn an_erasure_over_four_stores_reads_only_its_request_the_holds_and_its_secrets() {
    const USER: &str = "u-api-load-4e1d";
    const STORES: [&str; 4] = ["sessions", "carts", "mail", "prefs"];
    let (client, ns) = setup("api-load-erasure").await;
    let redis = RedisServer::start_with_password("api-load-pass");
    let mut conn = redis_conn(&redis.url()).await;
    for store in STORES {
        seed(&mut conn, &format!("{store}:{USER}:"), 50).await;
        seed(&mut conn, &format!("{store}:other:"), 50).await;
    }
    let log = RequestLog::default();
    let operator =
        TestOperator::start_with_client(log.client(), &ns, None, None, fast_settings()).await;
    create_credentials_secret(
        &client,
        &ns,
        "redis-auth",
        json!({"password": "api-load-pass"}),
    )
    .await;
    let plain = format!("redis://127.0.0.1:{}", redis.port());
    let mut targets = Vec::new();
    for store in STORES {
        redis_store(
            &client,
            &ns,
            store,
            &plain,
            json!({"redis": {"passwordSecretRef": {"name": "redis-auth", "key": "password"}}, "insecure": true}),
        )
        .await;
        wait_store_ready(&client, &ns, store, true).await;
        targets.push(json!({
            "name": store, "store": store,
            "redis": {"keyPattern": format!("{store}:*")},
            "subject": {"redis": {"keys": [format!("{store}:{{userId}}:*")]}}
        }));
    }
    let mut policy = policy_json("shop", "30d", json!(targets));
    policy["spec"]["suspend"] = json!(true);
    create::<RetentionPolicy>(&client, &ns, policy).await;
    // Reconciled, so in the operator's cache (its controller reconciles what its watch saw).
    wait_policy(
        &client,
        &ns,
        "shop",
        "the policy's status",
        Duration::from_secs(30),
        |p| p.status.is_some(),
    )
    .await;
    create_subject_secret(&client, &ns, "dsr", json!({"userId": USER})).await;

    let before = log.len();
    let probes_before = operator.reconciliations(STORES_CONTROLLER);
    let reconciles_before =
        operator.reconciliations(tombstone::controller::erasurerequest::CONTROLLER);
    create::<ErasureRequest>(
        &client,
        &ns,
        json!({
            "apiVersion": "tombstone.dev/v1alpha1", "kind": "ErasureRequest", "metadata": {"name": "dsr"},
            "spec": {"subject": {"secretRef": {"name": "dsr"}}, "reason": "consentWithdrawn", "reference": "DSR-API"}
        }),
    )
    .await;
    let api = Api::<ErasureRequest>::namespaced(client.clone(), &ns);
    let done = wait_for("the request Completed", Duration::from_secs(120), || {
        let api = api.clone();
        async move {
            api.get("dsr")
                .await
                .ok()
                .and_then(|r| r.status)
                .filter(|s| s.phase == ErasurePhase::Completed)
        }
    })
    .await;
    let erasure = log.since(before);
    let erased: u64 = done.targets.iter().map(|t| t.erased).sum();
    assert_eq!(erased, 4 * 50);
    for store in STORES {
        assert_eq!(count_keys(&mut conn, &format!("{store}:other:*")).await, 50);
    }
    let writes = erasure
        .get("patch erasurerequests/status")
        .copied()
        .unwrap_or(0);
    let reads = total(&erasure, &["get", "list"]);
    eprintln!(
        "api_load: an erasure over {} stores made {} requests, {writes} status writes, {reads} reads ({:.1} per status write):\n{}",
        STORES.len(),
        erasure.values().sum::<usize>(),
        reads as f64 / writes.max(1) as f64,
        table(&erasure)
    );
    let probes = operator.reconciliations(STORES_CONTROLLER) - probes_before;
    let store_reads = erasure.get("get datastores").copied().unwrap_or(0);
    assert!(
        store_reads as u64 <= probes,
        "{store_reads} DataStore reads for {probes} probes: the erasure read its stores from the API server\n{}",
        table(&erasure)
    );
    assert_eq!(
        erasure.get("get retentionpolicies"),
        None,
        "the erasure read its policies from the API server\n{}",
        table(&erasure)
    );
    // Listed once: the scope of the new request (completeness beats a cache there).
    assert!(
        erasure.get("list retentionpolicies").copied().unwrap_or(0) <= 1,
        "{}",
        table(&erasure)
    );
    // The digest key Secret is read once (made here, on the first request), not at every step.
    let allowed = [
        "get erasurerequests",
        "list legalholds",
        "get secrets",
        "get datastores",
        "list retentionpolicies",
        "list erasurerequests",
    ];
    assert_reads_only(&erasure, &allowed);
    // Per reconcile: the identifiers Secret and one credentials Secret per target, and the
    // digest key Secret a couple of times while it is made.
    let reconciles = operator.reconciliations(tombstone::controller::erasurerequest::CONTROLLER)
        - reconciles_before;
    let secrets = erasure.get("get secrets").copied().unwrap_or(0);
    assert!(
        secrets as u64 <= reconciles * (1 + STORES.len() as u64) + 3,
        "{secrets} Secret reads in {reconciles} reconciles\n{}",
        table(&erasure)
    );
    operator.stop().await;
}
