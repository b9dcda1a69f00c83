//! Retention sweep throughput on a local redis-server, against the naive shell pipeline
//! `redis-cli --scan --pattern P | xargs -n 1000 redis-cli unlink`, measured in the same run
//! on the same data.
//!
//!     cargo bench --bench redis_sweep            # 1,000,000 matching keys among 2,000,000
//!     BENCH_KEYS=100000 cargo bench --bench redis_sweep
//!
//! Prints keys/s for both and the ratio. Needs `redis-server` and `redis-cli` on PATH.

#[path = "../tests/support/mod.rs"]
mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use tokio_util::sync::CancellationToken;

use tombstone::api::retentionpolicy::{RedisMode, RedisTarget, Target};
use tombstone::backends::redis::{RedisBackend, RedisConfig};
use tombstone::backends::{Backend, Limits, Next, StepBudget, SweepJob};

const PATTERN: &str = "bench:expired:*";

async fn seed(conn: &mut MultiplexedConnection, prefix: &str, count: usize) {
    let mut i = 0;
    while i < count {
        let mut pipe = redis::pipe();
        for j in i..(i + 10_000).min(count) {
            pipe.cmd("SET")
                .arg(format!("{prefix}{j}"))
                .arg("v")
                .ignore();
        }
        let _: () = pipe.query_async(conn).await.expect("seeding");
        i += 10_000;
    }
}

async fn dbsize(conn: &mut MultiplexedConnection) -> usize {
    redis::cmd("DBSIZE")
        .query_async(conn)
        .await
        .expect("DBSIZE")
}

fn baseline(port: u16) -> Duration {
    let start = Instant::now();
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "redis-cli -p {port} --scan --pattern '{PATTERN}' | xargs -n 1000 redis-cli -p {port} unlink > /dev/null"
        ))
        .status()
        .expect("running the redis-cli pipeline");
    assert!(status.success(), "baseline pipeline failed");
    start.elapsed()
}

async fn tombstone_sweep(url: &str, keys: usize, mode: RedisMode) -> (Duration, u64) {
    let backend = RedisBackend::new(
        RedisConfig {
            url: url.to_string(),
            password: None,
            cluster: false,
        },
        Limits {
            rate: None,
            concurrency: 4,
        },
    );
    let job = SweepJob {
        target: Target {
            name: "bench".into(),
            store: "bench".into(),
            redis: Some(RedisTarget {
                key_pattern: PATTERN.into(),
                mode,
                timestamp_field: None,
            }),
            s3: None,
            loki: None,
            elasticsearch: None,
            subject: None,
            allow_match_all: false,
        },
        retention: if mode == RedisMode::Idle { "1s" } else { "30d" }
            .parse()
            .expect("duration"),
        dry_run: false,
        cutoff: chrono::Utc::now(),
        held: Default::default(),
    };
    // Checkpoints as often as the operator does by default, so the figure includes them.
    let budget = StepBudget {
        max_time: Duration::from_secs(2),
        cancel: CancellationToken::new(),
        fence: Default::default(),
    };
    backend.probe().await.expect("probe");
    let start = Instant::now();
    let mut cursor: Option<String> = None;
    let mut deleted = 0;
    loop {
        let step = backend
            .sweep_step(&job, cursor.as_deref(), &budget)
            .await
            .expect("sweep step");
        assert!(step.failure.is_none(), "{:?}", step.failure);
        deleted += step.deleted;
        match step.next {
            Next::Continue(c) => cursor = Some(c),
            Next::Done => break,
            Next::Wait { .. } => unreachable!("redis never waits"),
        }
    }
    let elapsed = start.elapsed();
    assert_eq!(
        deleted as usize, keys,
        "the sweep must act on exactly the matching keys"
    );
    (elapsed, deleted)
}

#[tokio::main]
async fn main() {
    let keys: usize = std::env::var("BENCH_KEYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let redis = support::RedisServer::start();
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    println!(
        "redis_sweep: {keys} matching keys among {} in a local redis-server",
        keys * 2
    );
    seed(&mut conn, "bench:live:", keys).await;

    seed(&mut conn, "bench:expired:", keys).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let base = baseline(redis.port());
    assert_eq!(
        dbsize(&mut conn).await,
        keys,
        "the baseline must leave only the live keys"
    );

    seed(&mut conn, "bench:expired:", keys).await;
    // Mode idle deletes keys idle longer than the retention (1s).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut conn)
        .await
        .unwrap();
    let (ours, _) = tombstone_sweep(&redis.url(), keys, RedisMode::Idle).await;
    if std::env::var_os("BENCH_STATS").is_some() {
        // Where the server spent its time during the sweep.
        let stats: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut conn)
            .await
            .unwrap();
        println!("{stats}");
    }
    assert_eq!(
        dbsize(&mut conn).await,
        keys,
        "the sweep must leave every live key"
    );

    // Mode expire (the default) on the same data: every matching key gets a bounded TTL.
    seed(&mut conn, "bench:expired:", keys).await;
    let (expire, _) = tombstone_sweep(&redis.url(), keys, RedisMode::Expire).await;
    let bounded: i64 = redis::cmd("TTL")
        .arg("bench:expired:0")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(bounded > 0, "mode expire must bound the TTL");

    let rate = |d: Duration| keys as f64 / d.as_secs_f64();
    println!(
        "baseline  redis-cli --scan | xargs -n 1000 redis-cli unlink: {:>10.0} keys/s ({:.2}s)",
        rate(base),
        base.as_secs_f64()
    );
    println!("tombstone sweep (mode idle: OBJECT IDLETIME + UNLINK, pipelined): {:>10.0} keys/s ({:.2}s)", rate(ours), ours.as_secs_f64());
    println!(
        "ratio: {:.2}x the baseline",
        base.as_secs_f64() / ours.as_secs_f64()
    );
    println!(
        "tombstone sweep (mode expire: EXPIRE .. LT, pipelined): {:>10.0} keys/s ({:.2}s), {:.2}x the baseline",
        rate(expire),
        expire.as_secs_f64(),
        base.as_secs_f64() / expire.as_secs_f64()
    );
}
