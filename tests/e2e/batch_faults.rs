//! A batch of erasure requests against one Redis target when the operator is killed (SIGKILL)
//! while the batch erases, before a step's checkpoint: the operator comes back and every
//! request completes, each subject's keys are gone and every neighbour's kept, and each
//! request counts exactly the records its subject had. And a request deleted while its
//! batch erases leaves the batch at the next checkpoint (nothing more is started for it)
//! and is closed, and its batch-mate completes.

use std::collections::BTreeSet;
use std::time::Duration;

use kube::api::{DeleteParams, ListParams};
use kube::Api;
use redis::aio::MultiplexedConnection;
use serde_json::json;

use tombstone::api::erasurerequest::{ErasurePhase, ErasureTargetPhase};
use tombstone::api::ErasureRequest;
use tombstone::engine::batch::MemberCursor;

use crate::chaos::{users_policy, OPERATOR_ARGS};
use crate::erasure::wait_phase;
use crate::fixtures::*;
use crate::support::operator_process::OperatorProcess;
use crate::support::{wait_for, RedisServer};

const TOMBSTONE: &str = env!("CARGO_BIN_EXE_tombstone");
const SUBJECTS: usize = 10;
const NEIGHBOUR_KEYS: usize = 100;
/// Keys under the target's pattern that belong to no one: every pass scans them.
const OTHER_KEYS: usize = 55_000;

/// Subject `i`'s number of keys (all different, so a count given to the wrong member shows).
fn keys_of(i: usize) -> usize {
    250 + 13 * i
}

async fn seed(conn: &mut MultiplexedConnection) {
    let mut keys: Vec<String> = Vec::new();
    for i in 0..SUBJECTS {
        keys.extend((0..keys_of(i)).map(|n| format!("user:bf{i}:{n}")));
        keys.extend((0..NEIGHBOUR_KEYS).map(|n| format!("user:bf{i}n:{n}")));
    }
    keys.extend((0..OTHER_KEYS).map(|n| format!("user:zz:{n}")));
    for chunk in keys.chunks(5000) {
        let mut pipe = redis::pipe();
        for k in chunk {
            pipe.cmd("SET").arg(k).arg("v").ignore();
        }
        let _: () = pipe.query_async(conn).await.expect("seeded");
    }
}

/// The Redis DataStore, removing at most `per_second` keys a second, and a suspended policy
/// whose target selects every subject's keys by `userId`.
async fn shop(client: &kube::Client, ns: &str, redis: &RedisServer, per_second: u32) {
    redis_store(
        client,
        ns,
        "cache",
        &redis.url(),
        json!({"limits": {"requestsPerSecond": per_second, "concurrency": 2}}),
    )
    .await;
    users_policy(client, ns).await;
}

/// The batch positions of the requests erasing now, and whether one has erased something
/// already.
async fn erasing(api: &Api<ErasureRequest>) -> (BTreeSet<String>, bool) {
    let mut positions = BTreeSet::new();
    let mut counted = false;
    for r in api
        .list(&ListParams::default())
        .await
        .map(|l| l.items)
        .unwrap_or_default()
    {
        let Some(status) = r.status else { continue };
        if status.phase != ErasurePhase::Erasing {
            continue;
        }
        let cursors = status.targets.iter().filter_map(|t| t.cursor.as_deref());
        for cursor in cursors.filter_map(MemberCursor::decode) {
            counted |= cursor.count > 0;
            positions.extend(cursor.at);
        }
    }
    (positions, counted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_killed_mid_erase_completes_every_request_with_exact_counts() {
    let (client, ns) = setup("batchfault").await;
    let redis = tokio::task::block_in_place(RedisServer::start);
    let mut conn = redis_conn(&redis.url()).await;
    seed(&mut conn).await;
    // About 400 keys a second removed: the batch's erase takes several one-second steps.
    shop(&client, &ns, &redis, 400).await;

    let first = OperatorProcess::start(TOMBSTONE, &ns, "batch-fault-1", OPERATOR_ARGS);
    for i in 0..SUBJECTS {
        let name = format!("dsr-{i}");
        create_subject_secret(&client, &ns, &name, json!({"userId": format!("bf{i}")})).await;
        request_erasure(&client, &ns, &name, &name).await;
    }

    // Kill it once a batch has checkpointed an erase step that removed records...
    let api: Api<ErasureRequest> = Api::namespaced(client.clone(), &ns);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    let positions = loop {
        let (positions, counted) = erasing(&api).await;
        if counted {
            break positions;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no batch erased within 40s; operator log:\n{}",
            first.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // Then while the next step removes records, before its checkpoint: the step's result is
    // lost, and what it removed must be counted when it is worked again.
    let checkpointed: u64 = redis::cmd("DBSIZE")
        .query_async(&mut conn)
        .await
        .expect("DBSIZE");
    loop {
        let now: u64 = redis::cmd("DBSIZE")
            .query_async(&mut conn)
            .await
            .expect("DBSIZE");
        // Beyond the new step's ledger key.
        if now + 2 <= checkpointed {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the next step removed nothing within 40s"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    drop(first);
    let at_kill = erasing(&api).await.0;
    eprintln!(
        "killed mid-erase: batch positions when the step began {positions:?}, after the kill {at_kill:?} (the same: the step's result was lost)"
    );

    let second = OperatorProcess::start(TOMBSTONE, &ns, "batch-fault-2", OPERATOR_ARGS);
    let mut figures = Vec::new();
    for i in 0..SUBJECTS {
        let name = format!("dsr-{i}");
        let done = wait_phase(&client, &ns, &name, ErasurePhase::Completed).await;
        let status = done.status.expect("a status");
        let target = &status.targets[0];
        assert_eq!(target.phase, ErasureTargetPhase::Verified, "{name}");
        let seeded = keys_of(i) as u64;
        assert_eq!(target.found, seeded, "{name} found its own keys");
        assert!(
            target.erased <= seeded,
            "{name} counts {} erased, more than its {seeded} keys",
            target.erased
        );
        figures.push((name.clone(), seeded, target.erased));
        assert_eq!(
            count_keys(&mut conn, &format!("user:bf{i}:*")).await,
            0,
            "every key of subject {i} is gone"
        );
        assert_eq!(
            count_keys(&mut conn, &format!("user:bf{i}n:*")).await,
            NEIGHBOUR_KEYS,
            "the neighbour of subject {i} keeps its keys"
        );
    }
    assert_eq!(count_keys(&mut conn, "user:zz:*").await, OTHER_KEYS);
    let ledgers = count_keys(&mut conn, "tombstone:ledger:*").await;
    let short: Vec<String> = figures
        .iter()
        .filter(|(_, seeded, erased)| erased < seeded)
        .map(|(name, seeded, erased)| format!("{name}: {erased} of {seeded}"))
        .collect();
    eprintln!(
        "erased counts after the kill: {} of {SUBJECTS} exact; short: {short:?}; ledger keys left: {ledgers}",
        SUBJECTS - short.len()
    );
    // What the lost step erased is in its ledger, and each member that repeats the step reads
    // its own entries there, whichever batch it resumes in.
    assert!(short.is_empty(), "counts short after the kill: {short:?}");
    assert_eq!(ledgers, 0, "every ledger is removed once all are done");
    drop(second);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_deleted_mid_batch_leaves_it_and_is_closed_while_its_mate_completes() {
    let (client, ns) = setup("batchdel").await;
    let redis = tokio::task::block_in_place(RedisServer::start);
    let mut conn = redis_conn(&redis.url()).await;
    seed(&mut conn).await;
    // About 60 keys a second removed: the erase of two subjects takes several seconds.
    shop(&client, &ns, &redis, 60).await;
    let settings = tombstone::controller::Settings {
        batches: tombstone::engine::batch::BatchSettings {
            max_members: 1000,
            wait: Duration::from_millis(500),
        },
        ..fast_settings()
    };
    let _operator = TestOperator::start_with(&ns, None, None, settings).await;
    for i in 0..2 {
        let name = format!("dsr-{i}");
        create_subject_secret(&client, &ns, &name, json!({"userId": format!("bf{i}")})).await;
        request_erasure(&client, &ns, &name, &name).await;
    }
    let api: Api<ErasureRequest> = Api::namespaced(client.clone(), &ns);
    wait_for("the batch to erase", Duration::from_secs(40), || async {
        erasing(&api).await.1.then_some(())
    })
    .await;
    api.delete("dsr-0", &DeleteParams::default())
        .await
        .expect("deleted");
    wait_for(
        "the deleted request to be closed",
        Duration::from_secs(30),
        || async { api.get_opt("dsr-0").await.ok()?.is_none().then_some(()) },
    )
    .await;
    let done = wait_phase(&client, &ns, "dsr-1", ErasurePhase::Completed).await;
    assert_eq!(
        done.status.expect("a status").targets[0].erased,
        keys_of(1) as u64
    );
    assert_eq!(count_keys(&mut conn, "user:bf1:*").await, 0);
    let left = count_keys(&mut conn, "user:bf0:*").await;
    assert!(
        left > 0,
        "the batch stopped erasing for the deleted request once it was deleted"
    );
    eprintln!("the deleted request's keys left: {left} of {}", keys_of(0));
}
