//! Retention sweeps of Redis datasets, end to end: operator, API server, redis-server.

use std::time::Duration;

use serde_json::json;

use tombstone::api::retentionpolicy::{SweepOutcome, TargetPhase};
use tombstone::api::{ConditionStatus, RetentionPolicy};

use crate::fixtures::*;
use crate::support::{RedisCluster, RedisServer};

#[tokio::test]
async fn each_mode_touches_only_the_keys_its_target_selects() {
    let (client, ns) = setup("sweep-modes").await;
    let redis = RedisServer::start();
    let mut conn = redis_conn(&redis.url()).await;
    // expire: sessions without a TTL get one; neighbours that merely share a prefix do not.
    seed(&mut conn, "session:", 300).await;
    seed(&mut conn, "sessions-archive:", 50).await;
    seed(&mut conn, "other:", 100).await;
    let _: () = redis::cmd("SET")
        .arg("session:short")
        .arg("v")
        .arg("EX")
        .arg(60)
        .query_async(&mut conn)
        .await
        .unwrap();
    // idle: old carts are deleted, carts touched recently are kept.
    seed(&mut conn, "cart:old:", 40).await;
    // timestamp: hashes with an old createdAt go, recent ones and non-hashes stay.
    let now = chrono::Utc::now().timestamp();
    for i in 0..25 {
        let _: () = redis::cmd("HSET")
            .arg(format!("profile:old:{i}"))
            .arg("createdAt")
            .arg(now - 7200)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let _: () = redis::cmd("HSET")
        .arg("profile:nofield")
        .arg("name")
        .arg("x")
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg("profile:string")
        .arg("not a hash")
        .query_async(&mut conn)
        .await
        .unwrap();
    // The store is probed first so that the sweep runs right after the fresh carts are set.
    let operator = TestOperator::start(&ns).await;
    redis_store(&client, &ns, "cache", &redis.url(), json!({})).await;
    wait_store_ready(&client, &ns, "cache", true).await;
    tokio::time::sleep(Duration::from_secs(7)).await;
    seed(&mut conn, "cart:fresh:", 30).await;
    for i in 0..25 {
        let created = chrono::Utc::now().to_rfc3339();
        let _: () = redis::cmd("HSET")
            .arg(format!("profile:new:{i}"))
            .arg("createdAt")
            .arg(created)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    create::<RetentionPolicy>(
        &client,
        &ns,
        policy_json(
            "shop",
            "5s",
            json!([
                {"name": "sessions", "store": "cache", "redis": {"keyPattern": "session:*", "mode": "expire"}},
                {"name": "carts", "store": "cache", "redis": {"keyPattern": "cart:*", "mode": "idle"}},
                {"name": "profiles", "store": "cache", "redis": {"keyPattern": "profile:*", "mode": "timestamp", "timestampField": "createdAt"}},
            ]),
        ),
    )
    .await;
    let policy = wait_sweep_completed(&client, &ns, "shop", None).await;
    let status = policy.status.clone().unwrap();

    let target = |name: &str| {
        status
            .targets
            .iter()
            .find(|t| t.name == name)
            .unwrap()
            .clone()
    };
    // Every session key got a TTL of at most the retention; session:short already had one
    // longer than 5s, so it was bounded too (301 keys).
    assert_eq!(target("sessions").deleted, 301);
    assert_eq!(target("sessions").scanned, 301);
    assert!(ttl(&mut conn, "session:7").await <= 5);
    assert_eq!(
        ttl(&mut conn, "sessions-archive:7").await,
        -1,
        "outside the selector"
    );
    assert_eq!(ttl(&mut conn, "other:7").await, -1, "outside the selector");
    assert_eq!(target("carts").deleted, 40);
    assert_eq!(count_keys(&mut conn, "cart:fresh:*").await, 30);
    assert_eq!(target("profiles").deleted, 25);
    assert_eq!(count_keys(&mut conn, "profile:new:*").await, 25);
    assert_eq!(count_keys(&mut conn, "profile:old:*").await, 0);
    for untouched in ["profile:nofield", "profile:string"] {
        let exists: i64 = redis::cmd("EXISTS")
            .arg(untouched)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(exists, 1, "{untouched}");
    }
    assert_eq!(count_keys(&mut conn, "other:*").await, 100);

    let last = status.last_sweep.clone().unwrap();
    assert_eq!((last.outcome, last.deleted), (SweepOutcome::Succeeded, 366));
    // Every sweep leaves an audit record; its receipt is on the status.
    let record = logged_audit_record(last.receipt.as_deref().expect("a sweep receipt"));
    assert_eq!(record["kind"], json!("SweepReceipt"));
    assert_eq!(record["lastSweep"]["deleted"], json!(366));
    assert!(status.next_sweep_time.unwrap() > last.start_time);
    assert_eq!(status.observed_generation, Some(1));
    assert!(status
        .targets
        .iter()
        .all(|t| t.phase == TargetPhase::Idle && t.cursor.is_none()));
    assert_eq!(
        condition(&status.conditions, "Ready").0,
        ConditionStatus::True
    );
    // profile:nofield has no timestamp: kept, counted, and the policy is not Compliant.
    assert_eq!(target("profiles").unjudged, 1);
    assert_eq!(
        condition(&status.conditions, "Compliant").1,
        "ItemsUnjudged"
    );
    assert_eq!(
        condition(&status.conditions, "Degraded").0,
        ConditionStatus::False
    );
    assert!(status
        .conditions
        .iter()
        .all(|c| c.observed_generation == Some(1)));
    wait_event(&client, &ns, "shop", |(_, r, n)| {
        r == "SweepCompleted" && n.contains("366")
    })
    .await;

    // Nothing more is written while nothing changes: no status churn.
    let rv = policy.metadata.resource_version.clone();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        get_policy(&client, &ns, "shop")
            .await
            .metadata
            .resource_version,
        rv
    );
    operator.stop().await;
}

#[tokio::test]
async fn a_dry_run_reports_exactly_what_the_real_sweep_then_deletes() {
    let (client, ns) = setup("sweep-dry").await;
    let redis = RedisServer::start();
    let mut conn = redis_conn(&redis.url()).await;
    // Timestamps rather than idle times, so the judgement cannot drift between the two runs.
    let now = chrono::Utc::now().timestamp();
    let mut pipe = redis::pipe();
    for i in 0..1234 {
        pipe.cmd("HSET")
            .arg(format!("tmp:old:{i}"))
            .arg("at")
            .arg(now - 3600 - i)
            .ignore();
    }
    for i in 0..66 {
        pipe.cmd("HSET")
            .arg(format!("tmp:fresh:{i}"))
            .arg("at")
            .arg(now)
            .ignore();
    }
    for i in 0..500 {
        pipe.cmd("HSET")
            .arg(format!("keep:{i}"))
            .arg("at")
            .arg(now - 3600)
            .ignore();
    }
    let _: () = pipe.query_async(&mut conn).await.unwrap();

    let operator = TestOperator::start(&ns).await;
    redis_store(&client, &ns, "cache", &redis.url(), json!({})).await;
    let mut p = policy_json(
        "tmp",
        "10m",
        json!([{"name": "tmp", "store": "cache", "redis": {"keyPattern": "tmp:*", "mode": "timestamp", "timestampField": "at"}}]),
    );
    p["spec"]["dryRun"] = json!(true);
    create::<RetentionPolicy>(&client, &ns, p).await;
    let dry = wait_sweep_completed(&client, &ns, "tmp", None)
        .await
        .status
        .unwrap();
    let dry_last = dry.last_sweep.unwrap();
    assert_eq!(
        (dry_last.outcome, dry_last.deleted),
        (SweepOutcome::DryRun, 1234)
    );
    assert_eq!(dry.targets[0].deleted_total, 0);
    assert!(
        dry.targets[0]
            .message
            .starts_with("scanned 1300, would delete 1234, oldest remaining from "),
        "{}",
        dry.targets[0].message
    );
    assert_eq!(condition(&dry.conditions, "Compliant").1, "DryRun");
    assert_eq!(
        count_keys(&mut conn, "tmp:*").await,
        1300,
        "a dry run deletes nothing"
    );

    patch_spec::<RetentionPolicy>(&client, &ns, "tmp", json!({"dryRun": false})).await;
    let real = wait_policy(
        &client,
        &ns,
        "tmp",
        "a real sweep",
        Duration::from_secs(60),
        |p| {
            p.status
                .as_ref()
                .and_then(|s| s.last_sweep.as_ref())
                .is_some_and(|l| l.outcome == SweepOutcome::Succeeded)
        },
    )
    .await
    .status
    .unwrap();
    assert_eq!(real.last_sweep.unwrap().deleted, 1234, "dry-run parity");
    assert_eq!(real.targets[0].deleted_total, 1234);
    assert_eq!(count_keys(&mut conn, "tmp:*").await, 66);
    assert_eq!(count_keys(&mut conn, "keep:*").await, 500);
    operator.stop().await;
}

#[tokio::test]
async fn match_everything_selectors_and_missing_stores_are_refused_before_anything_runs() {
    let (client, ns) = setup("sweep-invalid").await;
    let redis = RedisServer::start();
    let mut conn = redis_conn(&redis.url()).await;
    seed(&mut conn, "k:", 10).await;
    let operator = TestOperator::start(&ns).await;
    redis_store(&client, &ns, "cache", &redis.url(), json!({})).await;
    wait_store_ready(&client, &ns, "cache", true).await;
    create::<RetentionPolicy>(
        &client,
        &ns,
        policy_json("wipe", "1s", json!([{"name": "all", "store": "cache", "redis": {"keyPattern": "*", "mode": "idle"}}])),
    )
    .await;
    create::<RetentionPolicy>(
        &client,
        &ns,
        policy_json("lost", "1s", json!([{"name": "x", "store": "nowhere", "redis": {"keyPattern": "k:*", "mode": "idle"}}])),
    )
    .await;
    // An invalid spec is refused before any sweep starts: nothing is swept at all.
    let wipe = wait_policy(
        &client,
        &ns,
        "wipe",
        "wipe reconciled",
        Duration::from_secs(30),
        |p| {
            p.status
                .as_ref()
                .is_some_and(|s| s.observed_generation.is_some())
        },
    )
    .await
    .status
    .unwrap();
    let (ready, reason, message) = condition(&wipe.conditions, "Ready");
    assert_eq!(
        (ready, reason.as_str()),
        (ConditionStatus::False, "InvalidSpec")
    );
    assert!(message.contains("allowMatchAll"), "{message}");
    assert!(wipe.last_sweep.is_none() && wipe.current_sweep.is_none());
    assert_ne!(wipe.targets[0].phase, TargetPhase::Sweeping);

    let lost = wait_policy(
        &client,
        &ns,
        "lost",
        "lost swept",
        Duration::from_secs(30),
        |p| p.status.as_ref().is_some_and(|s| s.last_sweep.is_some()),
    )
    .await
    .status
    .unwrap();
    assert_eq!(condition(&lost.conditions, "Ready").1, "StoreNotFound");
    assert_eq!(count_keys(&mut conn, "k:*").await, 10, "nothing deleted");
    wait_event(&client, &ns, "wipe", |(t, r, _)| {
        t == "Warning" && r == "InvalidSpec"
    })
    .await;
    operator.stop().await;
}

#[tokio::test]
async fn cron_schedules_wait_and_suspended_policies_do_not_sweep() {
    let (client, ns) = setup("sweep-sched").await;
    let redis = RedisServer::start();
    let mut conn = redis_conn(&redis.url()).await;
    seed(&mut conn, "c:", 10).await;
    seed(&mut conn, "s:", 10).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let operator = TestOperator::start(&ns).await;
    redis_store(&client, &ns, "cache", &redis.url(), json!({})).await;
    let mut cron = policy_json(
        "nightly",
        "1s",
        json!([{"name": "c", "store": "cache", "redis": {"keyPattern": "c:*", "mode": "idle"}}]),
    );
    cron["spec"]["schedule"] = json!({"cron": "0 3 * * *"});
    create::<RetentionPolicy>(&client, &ns, cron).await;
    let mut suspended = policy_json(
        "paused",
        "1s",
        json!([{"name": "s", "store": "cache", "redis": {"keyPattern": "s:*", "mode": "idle"}}]),
    );
    suspended["spec"]["suspend"] = json!(true);
    create::<RetentionPolicy>(&client, &ns, suspended).await;

    let nightly = wait_policy(
        &client,
        &ns,
        "nightly",
        "next sweep time",
        Duration::from_secs(30),
        |p| {
            p.status
                .as_ref()
                .is_some_and(|s| s.next_sweep_time.is_some())
        },
    )
    .await
    .status
    .unwrap();
    let next = nightly.next_sweep_time.unwrap();
    assert_eq!(next.to_string()[11..], *"03:00:00Z");
    assert!(nightly.last_sweep.is_none());
    assert_eq!(condition(&nightly.conditions, "Compliant").1, "NotYetSwept");
    let paused = wait_policy(
        &client,
        &ns,
        "paused",
        "paused status",
        Duration::from_secs(30),
        |p| p.status.is_some(),
    )
    .await
    .status
    .unwrap();
    assert_eq!(
        condition(&paused.conditions, "Compliant"),
        (
            ConditionStatus::Unknown,
            "Suspended".into(),
            "sweeps are suspended; expired data is not being deleted".into()
        )
    );
    assert_eq!(
        count_keys(&mut conn, "c:*").await + count_keys(&mut conn, "s:*").await,
        20
    );

    // Resuming sweeps at once.
    patch_spec::<RetentionPolicy>(&client, &ns, "paused", json!({"suspend": false})).await;
    let resumed = wait_sweep_completed(&client, &ns, "paused", None)
        .await
        .status
        .unwrap();
    assert_eq!(resumed.last_sweep.unwrap().deleted, 10);
    operator.stop().await;
}

#[tokio::test]
async fn cluster_mode_sweeps_every_primary() {
    let (client, ns) = setup("sweep-cluster").await;
    let cluster = RedisCluster::start(3);
    let nodes: Vec<String> = cluster.nodes().iter().map(|n| n.url()).collect();
    let seed_client = redis::cluster::ClusterClient::new(nodes.clone()).unwrap();
    let mut conn = seed_client.get_async_connection().await.unwrap();
    for i in 0..600 {
        let _: () = redis::cmd("SET")
            .arg(format!("sess:{i}"))
            .arg("v")
            .query_async(&mut conn)
            .await
            .unwrap();
        let _: () = redis::cmd("SET")
            .arg(format!("keep:{i}"))
            .arg("v")
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Every primary holds some of the keys, so a sweep of one node alone would miss some.
    for url in &nodes {
        let mut node = redis_conn(url).await;
        assert!(count_keys(&mut node, "sess:*").await > 0);
    }
    let operator = TestOperator::start(&ns).await;
    redis_store(
        &client,
        &ns,
        "cache",
        &cluster.seed_url(),
        json!({"redis": {"cluster": true}}),
    )
    .await;
    let store = wait_store_ready(&client, &ns, "cache", true).await;
    assert!(condition(&store.status.unwrap().conditions, "Ready")
        .2
        .contains("3 primaries"));
    create::<RetentionPolicy>(
        &client,
        &ns,
        policy_json("sess", "2s", json!([{"name": "sess", "store": "cache", "redis": {"keyPattern": "sess:*", "mode": "idle"}}])),
    )
    .await;
    let status = wait_sweep_completed(&client, &ns, "sess", None)
        .await
        .status
        .unwrap();
    assert_eq!(status.last_sweep.unwrap().deleted, 600);
    for url in &nodes {
        let mut node = redis_conn(url).await;
        assert_eq!(count_keys(&mut node, "sess:*").await, 0);
        assert!(count_keys(&mut node, "keep:*").await > 0);
    }
    operator.stop().await;
}
