//! Upgrades keep work in flight. A sweep checkpointed by the previous version, whose cursor
//! in status is in the format that version wrote, resumes where it stopped; a checkpoint
//! this version cannot read restarts the sweep, with a Warning Event saying so, and every
//! item is still counted once.

use kube::api::{Patch, PatchParams};
use kube::Api;
use redis::aio::MultiplexedConnection;
use serde_json::json;

use tombstone::api::retentionpolicy::SweepOutcome;
use tombstone::api::RetentionPolicy;

use crate::fixtures::*;
use crate::support::RedisServer;

const RETENTION_MS: u64 = 3_600_000;

/// `n` keys `prefix{i}` from `from`, without a TTL, or bounded to the retention as a sweep
/// in mode `expire` bounds them.
async fn keys(
    conn: &mut MultiplexedConnection,
    prefix: &str,
    from: usize,
    n: usize,
    bounded: bool,
) {
    let mut pipe = redis::pipe();
    for i in from..from + n {
        let key = format!("{prefix}{i}");
        pipe.cmd("SET").arg(&key).arg("v").ignore();
        if bounded {
            pipe.cmd("PEXPIRE").arg(&key).arg(RETENTION_MS).ignore();
        }
    }
    let () = pipe.query_async(conn).await.expect("seed");
}

/// A policy sweeping `pattern` in mode `expire`, with the status a previous version left:
/// a sweep under way, its one target at `cursor` having bounded `deleted` keys.
async fn checkpointed(
    client: &kube::Client,
    ns: &str,
    name: &str,
    pattern: &str,
    cursor: &str,
    deleted: u64,
) {
    let mut policy = policy_json(
        name,
        "1h",
        json!([{"name": "sessions", "store": "cache",
                "redis": {"keyPattern": pattern, "mode": "expire"}}]),
    );
    policy["spec"]["schedule"] = json!({"every": "24h"});
    let created = create::<RetentionPolicy>(client, ns, policy).await;
    let generation = created.metadata.generation.expect("a generation");
    let started = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    Api::<RetentionPolicy>::namespaced(client.clone(), ns)
        // Written as the operator writes status (server-side apply, its field manager), so
        // that it owns these fields as it would own those its previous version wrote.
        .patch_status(
            name,
            &PatchParams::apply(tombstone::controller::FIELD_MANAGER).force(),
            &Patch::Apply(json!({"apiVersion": "tombstone.dev/v1alpha1", "kind": "RetentionPolicy", "status": {
                "observedGeneration": generation,
                "currentSweep": {"startTime": started, "generation": generation},
                "targets": [{"name": "sessions", "phase": "Sweeping", "scanned": deleted,
                             "deleted": deleted, "deletedTotal": 0, "blocked": 0,
                             "cursor": cursor}],
            }})),
        )
        .await
        .expect("status patch");
}

#[tokio::test]
async fn a_sweep_checkpointed_by_the_previous_version_resumes_or_restarts_with_an_event() {
    let (client, ns) = setup("upgrade").await;
    let redis = RedisServer::start();
    let mut conn = redis_conn(&redis.url()).await;
    redis_store(&client, &ns, "cache", &redis.url(), json!({})).await;

    // Resumes: the previous version had passed every key (node 1 of 1: all done) and
    // bounded 200, and had named its ledger. Keys written after it passed are left for the
    // next sweep: a restart would bound them too.
    keys(&mut conn, "a:", 0, 200, true).await;
    keys(&mut conn, "a:", 200, 100, false).await;
    checkpointed(&client, &ns, "resumes", "a:*", "1:0;0a1b2c3d4e5f.200", 200).await;

    // Restarts: a checkpoint no version of the Redis driver wrote. The previous version had
    // bounded 100 keys; 200 are left.
    keys(&mut conn, "b:", 0, 100, true).await;
    keys(&mut conn, "b:", 100, 200, false).await;
    checkpointed(&client, &ns, "restarts", "b:*", "7:not-a-position", 100).await;

    let operator = TestOperator::start(&ns).await;
    let resumed = wait_sweep_completed(&client, &ns, "resumes", None).await;
    let restarted = wait_sweep_completed(&client, &ns, "restarts", None).await;

    let last = |p: &RetentionPolicy| {
        let s = p.status.clone().expect("a status");
        let last = s.last_sweep.expect("a last sweep");
        (last.outcome, last.deleted, s.targets[0].deleted)
    };
    assert_eq!(
        last(&resumed),
        (SweepOutcome::Succeeded, 200, 200),
        "resumed past every key: nothing counted twice, nothing new bounded"
    );
    assert_eq!(count_unbounded(&mut conn, "a:*").await, 100);
    assert_eq!(
        last(&restarted),
        (SweepOutcome::Succeeded, 300, 300),
        "started over: the 200 keys left bounded, the 100 bounded before not counted again"
    );
    assert_eq!(count_unbounded(&mut conn, "b:*").await, 0);

    wait_event(&client, &ns, "restarts", |(type_, reason, note)| {
        type_ == "Warning"
            && reason == "CursorRestarted"
            && note.contains("target sessions")
            && note.contains("started over")
            && !note.contains("not-a-position")
    })
    .await;
    // Its sweep's events came before its completion was written (seen above).
    let resumed_events = events_for(&client, &ns, "resumes").await;
    assert!(
        resumed_events
            .iter()
            .all(|(_, reason, _)| reason != "CursorRestarted"),
        "{resumed_events:?}"
    );
    operator.stop().await;
}

/// Keys matching `pattern` that have no TTL.
async fn count_unbounded(conn: &mut MultiplexedConnection, pattern: &str) -> usize {
    let mut cursor = 0u64;
    let mut unbounded = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await
            .expect("scan");
        for key in keys {
            let ttl: i64 = redis::cmd("PTTL")
                .arg(&key)
                .query_async(conn)
                .await
                .expect("pttl");
            if ttl == -1 {
                unbounded += 1;
            }
        }
        if next == 0 {
            return unbounded;
        }
        cursor = next;
    }
}
