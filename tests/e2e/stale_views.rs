//! Issue 12: a sweep acts on what it read, never on a view that went stale. Mode `timestamp`
//! checks and deletes in one server-side script, so a hash refreshed between the sweep's read
//! and its delete survives, on a standalone server and on a cluster node alike; mode `idle`
//! judges idleness in the deleting script, on a cluster node too.

use std::time::Duration;

use redis::aio::MultiplexedConnection;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tombstone::backends::redis::{
    unlink_expired_hashes, unlink_idle, unlink_unchanged, JudgedHashes, RedisBackend, RedisConfig,
};
use tombstone::backends::{Backend, Limits, Next, StepBudget, SweepJob};
use tombstone::leader::Fence;

use crate::fixtures::{count_keys, redis_conn};
use crate::support::{wait_for, RedisCluster, RedisServer};

const FIELD: &str = "createdAt";

/// Runs one set-up command; its reply is not needed.
async fn exec(conn: &mut (impl redis::aio::ConnectionLike + Send), cmd: &mut redis::Cmd) {
    let _: () = cmd.query_async(conn).await.unwrap();
}

async fn hset(conn: &mut MultiplexedConnection, key: &str, at: i64) {
    exec(
        conn,
        redis::cmd("HSET")
            .arg(key)
            .arg(FIELD)
            .arg(at)
            .arg("probe")
            .arg("x"),
    )
    .await;
}

async fn exists(conn: &mut MultiplexedConnection, key: &str) -> bool {
    redis::cmd("EXISTS")
        .arg(key)
        .query_async::<u64>(conn)
        .await
        .unwrap()
        == 1
}

/// What the sweep read for `key` (the view it judged expired).
async fn read(conn: &mut MultiplexedConnection, key: &str) -> (Vec<u8>, String) {
    let value: String = redis::cmd("HGET")
        .arg(key)
        .arg(FIELD)
        .query_async(conn)
        .await
        .unwrap();
    (key.as_bytes().to_vec(), value)
}

#[tokio::test]
async fn a_hash_refreshed_after_the_read_survives_the_delete() {
    let server = RedisServer::start();
    let mut conn = redis_conn(&server.url()).await;
    let old = chrono::Utc::now().timestamp() - 90 * 86_400;
    for key in ["h:stale", "h:refreshed", "h:retyped", "h:gone"] {
        hset(&mut conn, key, old).await;
    }
    // The sweep's view: all four expired.
    let mut view = Vec::new();
    for key in ["h:stale", "h:refreshed", "h:retyped", "h:gone"] {
        view.push(read(&mut conn, key).await);
    }
    // Between the read and the delete: one hash is refreshed, one becomes a string, one is
    // deleted by its application.
    hset(&mut conn, "h:refreshed", chrono::Utc::now().timestamp()).await;
    exec(&mut conn, redis::cmd("DEL").arg("h:retyped")).await;
    exec(&mut conn, redis::cmd("SET").arg("h:retyped").arg("v")).await;
    exec(&mut conn, redis::cmd("DEL").arg("h:gone")).await;

    let removed = unlink_unchanged(&mut conn, FIELD, &view, false, "0a1b2c")
        .await
        .unwrap();

    assert_eq!(
        removed, 1,
        "only the unchanged stale hash is deleted and counted"
    );
    assert!(!exists(&mut conn, "h:stale").await);
    assert!(
        exists(&mut conn, "h:refreshed").await,
        "refreshed hash deleted"
    );
    assert!(
        exists(&mut conn, "h:retyped").await,
        "a key of another type deleted"
    );
    // Re-running on the same stale view deletes and counts nothing more.
    assert_eq!(
        unlink_unchanged(&mut conn, FIELD, &view, false, "0a1b2c")
            .await
            .unwrap(),
        0
    );
}

#[tokio::test]
async fn on_a_cluster_node_keys_of_many_slots_are_checked_and_deleted_per_slot() {
    let cluster = RedisCluster::start(3);
    let node = 0;
    let url = cluster.nodes()[node].url();
    let mut conn = redis_conn(&url).await;
    let old = chrono::Utc::now().timestamp() - 90 * 86_400;
    // Hashes served by node 0, in many slots (two of them sharing one through a hash tag).
    let mut keys: Vec<String> = (0..400)
        .map(|i| format!("h:{i}"))
        .filter(|k| cluster.owner_of(cluster.slot_of(k)) == node)
        .take(40)
        .collect();
    keys.push("h:{tag}:a".into());
    keys.push("h:{tag}:b".into());
    assert!(keys.len() > 20, "node 0 serves too few of the probe keys");
    for key in &keys {
        if cluster.owner_of(cluster.slot_of(key)) == node {
            hset(&mut conn, key, old).await;
        }
    }
    let keys: Vec<String> = keys
        .into_iter()
        .filter(|k| cluster.owner_of(cluster.slot_of(k)) == node)
        .collect();
    let mut view = Vec::new();
    for key in &keys {
        view.push(read(&mut conn, key).await);
    }
    let refreshed: Vec<&String> = keys.iter().step_by(5).collect();
    for key in &refreshed {
        hset(&mut conn, key, chrono::Utc::now().timestamp()).await;
    }

    // One script over keys of several slots is refused by a cluster node (CROSSSLOT): the
    // grouping by slot is what makes the atomic delete possible there.
    let crossslot = unlink_unchanged(&mut conn, FIELD, &view, false, "0a1b2c").await;
    assert!(
        crossslot
            .as_ref()
            .is_err_and(|e| e.to_string().to_lowercase().contains("crossslot")),
        "a cluster node accepted a cross-slot script: {crossslot:?}"
    );

    let removed = unlink_unchanged(&mut conn, FIELD, &view, true, "0a1b2c")
        .await
        .unwrap();
    assert_eq!(removed as usize, keys.len() - refreshed.len());
    for key in &keys {
        let kept = refreshed.contains(&key);
        assert_eq!(exists(&mut conn, key).await, kept, "{key}");
    }
}

async fn idle_secs(conn: &mut MultiplexedConnection, key: &str) -> u64 {
    redis::cmd("OBJECT")
        .arg("IDLETIME")
        .arg(key)
        .query_async(conn)
        .await
        .unwrap()
}

#[tokio::test]
async fn on_a_cluster_node_idle_keys_of_many_slots_are_judged_and_deleted_in_one_script_per_slot() {
    // Wide enough that a touched key stays young through the calls below on a loaded machine.
    const THRESHOLD_SECS: u64 = 4;
    let cluster = RedisCluster::start(3);
    let node = 0;
    let mut conn = redis_conn(&cluster.nodes()[node].url()).await;
    let keys: Vec<String> = (0..400)
        .map(|i| format!("idle:{i}"))
        .filter(|k| cluster.owner_of(cluster.slot_of(k)) == node)
        .take(40)
        .collect();
    assert!(keys.len() > 20, "node 0 serves too few of the probe keys");
    for key in &keys {
        exec(&mut conn, redis::cmd("SET").arg(key).arg("v")).await;
    }
    // Every key idle past the threshold (OBJECT IDLETIME does not touch the key).
    let probe = redis_conn(&cluster.nodes()[node].url()).await;
    wait_for(
        "every key idle past the threshold",
        Duration::from_secs(30),
        || {
            let (mut probe, keys) = (probe.clone(), keys.clone());
            async move {
                for key in &keys {
                    if idle_secs(&mut probe, key).await <= THRESHOLD_SECS {
                        return None;
                    }
                }
                Some(())
            }
        },
    )
    .await;
    // Some keys are read again: no longer idle, they must survive.
    let touched: Vec<&String> = keys.iter().step_by(5).collect();
    for key in &touched {
        let _: String = redis::cmd("GET")
            .arg(key.as_str())
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let raw: Vec<Vec<u8>> = keys.iter().map(|k| k.as_bytes().to_vec()).collect();

    // One script over keys of several slots is refused by a cluster node (CROSSSLOT).
    let crossslot = unlink_idle(&mut conn, &raw, THRESHOLD_SECS, false, false, "0a1b2c").await;
    assert!(
        crossslot
            .as_ref()
            .is_err_and(|e| e.to_string().to_lowercase().contains("crossslot")),
        "a cluster node accepted a cross-slot script: {crossslot:?}"
    );
    // A dry run runs the same check and deletes nothing.
    let would = unlink_idle(&mut conn, &raw, THRESHOLD_SECS, true, true, "0a1b2c")
        .await
        .unwrap();
    assert_eq!(would as usize, keys.len() - touched.len());
    assert_eq!(count_keys(&mut conn, "idle:*").await, keys.len());

    let removed = unlink_idle(&mut conn, &raw, THRESHOLD_SECS, false, true, "0a1b2c")
        .await
        .unwrap();
    assert_eq!(removed as usize, keys.len() - touched.len());
    for key in &keys {
        assert_eq!(
            exists(&mut conn, key).await,
            touched.contains(&key),
            "{key}"
        );
    }
}

fn budget(fence: Fence) -> StepBudget {
    StepBudget {
        max_time: Duration::from_secs(10),
        cancel: CancellationToken::new(),
        fence,
    }
}

fn leading() -> Fence {
    let fence = Fence::new(Duration::from_secs(10));
    fence.renewed(tokio::time::Instant::now());
    fence
}

fn timestamp_job() -> SweepJob {
    SweepJob {
        target: serde_json::from_value(json!({"name": "t", "store": "s",
            "redis": {"keyPattern": "h:*", "mode": "timestamp", "timestampField": FIELD}}))
        .unwrap(),
        retention: "30d".parse().unwrap(),
        dry_run: false,
        cutoff: chrono::Utc::now() - chrono::Duration::days(30),
        held: Default::default(),
    }
}

/// What a sweep did, all its steps together.
#[derive(Default)]
struct Swept {
    deleted: u64,
    unjudged: u64,
    oldest: Option<chrono::DateTime<chrono::Utc>>,
}

/// Runs `job` to its end.
async fn sweep_job(backend: &RedisBackend, job: &SweepJob) -> Swept {
    let (mut cursor, mut swept) = (None::<String>, Swept::default());
    for _ in 0..100 {
        let step = backend
            .sweep_step(job, cursor.as_deref(), &budget(leading()))
            .await
            .expect("sweep step");
        assert!(step.failure.is_none(), "{:?}", step.failure);
        swept.deleted += step.deleted;
        swept.unjudged += step.unjudged;
        swept.oldest = match (swept.oldest, step.oldest_remaining) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        match step.next {
            Next::Done => return swept,
            Next::Continue(c) | Next::Wait { cursor: c, .. } => cursor = Some(c),
        }
    }
    panic!("the sweep did not finish");
}

/// Runs a timestamp sweep to its end; returns the keys deleted.
async fn sweep(backend: &RedisBackend) -> u64 {
    sweep_job(backend, &timestamp_job()).await.deleted
}

/// The sweep itself deletes through the conditional script (on a standalone server and,
/// grouped by slot, on every primary of a cluster), still behind the leader fence.
#[tokio::test]
async fn a_timestamp_sweep_deletes_through_the_script_behind_the_fence() {
    let old = chrono::Utc::now().timestamp() - 90 * 86_400;
    let young = chrono::Utc::now().timestamp();
    let server = RedisServer::start();
    let mut conn = redis_conn(&server.url()).await;
    for i in 0..30 {
        hset(&mut conn, &format!("h:{i}"), old).await;
    }
    for i in 0..5 {
        hset(&mut conn, &format!("h:young:{i}"), young).await;
    }
    let backend = RedisBackend::new(
        RedisConfig {
            url: server.url(),
            password: None,
            cluster: false,
        },
        Limits::default(),
    );
    // A fenced-out instance deletes nothing and says why.
    let fence = Fence::new(Duration::from_secs(10));
    fence.renewed(tokio::time::Instant::now() - Duration::from_secs(11));
    let step = backend
        .sweep_step(&timestamp_job(), None, &budget(fence))
        .await
        .expect("a step with counts");
    assert_eq!(
        step.failure.as_ref().map(|e| e.reason()),
        Some("LeadershipLost")
    );
    assert_eq!(step.deleted, 0);
    assert_eq!(count_keys(&mut conn, "h:*").await, 35);

    assert_eq!(sweep(&backend).await, 30);
    assert_eq!(count_keys(&mut conn, "h:*").await, 5);
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        stats.contains("cmdstat_evalsha:calls="),
        "the delete did not go through the script:\n{stats}"
    );

    let cluster = RedisCluster::start(3);
    let client = redis::cluster::ClusterClient::new(vec![cluster.seed_url()]).unwrap();
    let mut cconn = client.get_async_connection().await.unwrap();
    for i in 0..300 {
        let at = if i % 10 == 0 { young } else { old };
        exec(
            &mut cconn,
            redis::cmd("HSET").arg(format!("h:{i}")).arg(FIELD).arg(at),
        )
        .await;
    }
    let backend = RedisBackend::new(
        RedisConfig {
            url: cluster.seed_url(),
            password: None,
            cluster: true,
        },
        Limits::default(),
    );
    assert_eq!(sweep(&backend).await, 270);
    let mut left = 0;
    for node in cluster.nodes() {
        let mut n = redis_conn(&node.url()).await;
        left += count_keys(&mut n, "h:*").await;
    }
    assert_eq!(left, 30, "the young hashes, on every primary");
}

async fn hset_raw(conn: &mut MultiplexedConnection, key: &str, value: &[u8]) {
    exec(conn, redis::cmd("HSET").arg(key).arg(FIELD).arg(value)).await;
}

/// The script judges whole seconds against the cutoff (to the nanosecond), hands back every
/// other form of value, counts a missing field or a key of another type as unjudged, and a
/// dry run deletes nothing.
#[tokio::test]
async fn the_reading_script_judges_whole_seconds_and_hands_back_the_rest() {
    let server = RedisServer::start();
    let mut conn = redis_conn(&server.url()).await;
    let cutoff = chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap();
    hset_raw(&mut conn, "h:before", b"1699999999").await;
    hset_raw(&mut conn, "h:at", b"1700000000").await;
    hset_raw(&mut conn, "h:after", b"1700000100").await;
    hset_raw(&mut conn, "h:zeros", b"001699999999").await;
    hset_raw(&mut conn, "h:long", b"0001699999999").await;
    hset_raw(&mut conn, "h:rfc", b"2023-11-14T22:13:19Z").await;
    hset_raw(&mut conn, "h:empty", b"").await;
    exec(
        &mut conn,
        redis::cmd("HSET").arg("h:missing").arg("other").arg("1"),
    )
    .await;
    exec(&mut conn, redis::cmd("SET").arg("h:string").arg("1")).await;
    let keys: Vec<Vec<u8>> = [
        "h:before",
        "h:at",
        "h:after",
        "h:zeros",
        "h:long",
        "h:rfc",
        "h:empty",
        "h:missing",
        "h:string",
        "h:absent",
    ]
    .iter()
    .map(|k| k.as_bytes().to_vec())
    .collect();
    let unread = vec![
        (b"h:long".to_vec(), b"0001699999999".to_vec()),
        (b"h:rfc".to_vec(), b"2023-11-14T22:13:19Z".to_vec()),
        (b"h:empty".to_vec(), Vec::new()),
    ];

    let dry = unlink_expired_hashes(&mut conn, &keys, FIELD, cutoff, true, false, "0a1b2c")
        .await
        .unwrap();
    let expected = JudgedHashes {
        deleted: 2,
        unjudged: 3,
        oldest: Some(cutoff),
        unread: unread.clone(),
    };
    assert_eq!(dry, expected);
    assert!(exists(&mut conn, "h:before").await, "a dry run deleted");

    // A cutoff half a second later: a time at its whole second is before it.
    let later = cutoff + chrono::Duration::milliseconds(500);
    let real = unlink_expired_hashes(&mut conn, &keys, FIELD, later, false, false, "0a1b2c")
        .await
        .unwrap();
    let expected = JudgedHashes {
        deleted: 3,
        unjudged: 3,
        oldest: chrono::DateTime::from_timestamp(1_700_000_100, 0),
        unread,
    };
    assert_eq!(real, expected);
    for (key, kept) in [
        ("h:before", false),
        ("h:at", false),
        ("h:zeros", false),
        ("h:after", true),
        ("h:long", true),
        ("h:rfc", true),
        ("h:missing", true),
        ("h:string", true),
    ] {
        assert_eq!(exists(&mut conn, key).await, kept, "{key}");
    }
    let ledger: u64 = redis::cmd("GET")
        .arg("tombstone:ledger:0a1b2c")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(ledger, 3, "the deletes are recorded in the ledger");
}

/// A sweep judges every form of timestamp as `parse_timestamp` reads it, whether the script
/// or the operator parses it, and counts and reports what it cannot judge.
#[tokio::test]
async fn a_timestamp_sweep_judges_every_form_of_timestamp() {
    let old = chrono::Utc::now().timestamp() - 90 * 86_400;
    let young = chrono::Utc::now().timestamp() - 86_400;
    let rfc = |t: i64| {
        chrono::DateTime::from_timestamp(t, 0)
            .unwrap()
            .to_rfc3339()
            .into_bytes()
    };
    let server = RedisServer::start();
    let mut conn = redis_conn(&server.url()).await;
    let deleted = [
        ("h:secs", old.to_string().into_bytes()),
        ("h:zeros", format!("000{old}").into_bytes()),
        ("h:float", format!("{old}.5").into_bytes()),
        ("h:spaced", format!(" {old} ").into_bytes()),
        ("h:negative", b"-5".to_vec()),
        ("h:rfc", rfc(old)),
    ];
    let kept = [
        ("h:young", young.to_string().into_bytes()),
        ("h:young-rfc", rfc(young - 60)),
    ];
    let unjudged = [
        ("h:huge", b"99999999999999999999".to_vec()),
        ("h:text", b"yesterday".to_vec()),
        ("h:empty", Vec::new()),
        ("h:binary", vec![0xff, 0xfe, b'1']),
    ];
    let backend = server.backend();
    for (key, value) in deleted.iter().chain(&kept).chain(&unjudged) {
        hset_raw(&mut conn, key, value).await;
    }
    exec(
        &mut conn,
        redis::cmd("HSET").arg("h:missing").arg("other").arg("1"),
    )
    .await;
    let swept = sweep_job(&backend, &timestamp_job()).await;
    assert_eq!(swept.deleted as usize, deleted.len());
    assert_eq!(
        swept.unjudged as usize,
        unjudged.len() + 1,
        "the unjudged hashes"
    );
    assert_eq!(
        swept.oldest.map(|t| t.timestamp()),
        Some(young - 60),
        "the oldest kept"
    );
    for (key, _) in &deleted {
        assert!(!exists(&mut conn, key).await, "{key} kept");
    }
    for (key, _) in kept.iter().chain(&unjudged) {
        assert!(exists(&mut conn, key).await, "{key} deleted");
    }
}

fn expire_job(retention: &str) -> SweepJob {
    SweepJob {
        target: serde_json::from_value(json!({"name": "t", "store": "s",
            "redis": {"keyPattern": "e:*", "mode": "expire"}}))
        .unwrap(),
        retention: retention.parse().unwrap(),
        dry_run: false,
        cutoff: chrono::Utc::now(),
        held: Default::default(),
    }
}

async fn pttl(conn: &mut MultiplexedConnection, key: &str) -> i64 {
    redis::cmd("PTTL").arg(key).query_async(conn).await.unwrap()
}

/// Mode expire bounds exactly the keys without a TTL or with a longer one, counts each once
/// (a second sweep counts nothing) and leaves no ledger behind.
#[tokio::test]
async fn an_expire_sweep_bounds_and_counts_each_key_once() {
    let server = RedisServer::start();
    let mut conn = redis_conn(&server.url()).await;
    let mut pipe = redis::pipe();
    for i in 0..40 {
        pipe.cmd("SET").arg(format!("e:none:{i}")).arg("v").ignore();
        pipe.cmd("SET")
            .arg(format!("e:long:{i}"))
            .arg("v")
            .arg("EX")
            .arg(86_400)
            .ignore();
        pipe.cmd("SET")
            .arg(format!("e:short:{i}"))
            .arg("v")
            .arg("EX")
            .arg(60)
            .ignore();
    }
    let () = pipe.query_async(&mut conn).await.unwrap();
    let backend = server.backend();

    assert_eq!(sweep_job(&backend, &expire_job("1h")).await.deleted, 80);
    for key in ["e:none:3", "e:long:3"] {
        let left = pttl(&mut conn, key).await;
        assert!(left > 0 && left <= 3_600_000, "{key}: {left}");
    }
    assert!(pttl(&mut conn, "e:short:3").await <= 60_000, "lengthened");
    assert_eq!(
        sweep_job(&backend, &expire_job("1h")).await.deleted,
        0,
        "a bounded key counted again"
    );
    let ledgers = count_keys(&mut conn, "tombstone:ledger:*").await;
    assert_eq!(ledgers, 0, "a run's ledger outlived it");
}
