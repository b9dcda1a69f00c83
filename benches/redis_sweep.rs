//! Retention sweep throughput on a local redis-server, measured in the same run on the same
//! data against:
//! - the naive shell pipeline `redis-cli --scan --pattern P | xargs -n 1000 redis-cli unlink`;
//! - the client ceiling: a client pipelining `SCAN MATCH P COUNT 5000` with a multi-key `UNLINK`
//!   (mode `expire`: `EXPIRE` per key) of the page before, with no checks at all;
//! - the server ceiling: the same loop run inside the server as one Lua script;
//! - the selection ceiling (modes `idle` and `timestamp`): that script also reading, per key,
//!   what the mode selects by (`OBJECT IDLETIME`, or the timestamp field with `HGET`) and
//!   deleting only the keys it selects: the least any sweep of that mode must do.
//!
//! Run:
//!
//!     cargo bench --bench redis_sweep            # 1,000,000 matching keys among 2,000,000
//!     BENCH_KEYS=100000 cargo bench --bench redis_sweep
//!
//! Prints keys/s for each, per mode, and Tombstone's rate as a fraction of the best ceiling
//! and of the selection ceiling.
//! Needs `redis-server` and `redis-cli` on PATH.

#[path = "../tests/support/mod.rs"]
mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use tokio_util::sync::CancellationToken;

use tombstone::api::retentionpolicy::{RedisMode, RedisTarget, Selector, Target};
use tombstone::backends::redis::{RedisBackend, RedisConfig};
use tombstone::backends::{Backend, Limits, Next, StepBudget, SweepJob};

const PATTERN: &str = "bench:expired:*";

const TIMESTAMP_FIELD: &str = "createdAt";
/// What the retention of mode `expire` bounds every TTL to, in seconds (30 days).
const EXPIRE_SECS: u64 = 30 * 86_400;

async fn seed(conn: &mut MultiplexedConnection, prefix: &str, count: usize) {
    seed_as(conn, prefix, count, false).await;
}

/// `count` keys `{prefix}{i}`: strings, or (`hashes`) hashes whose timestamp field is 90 days
/// old, as mode `timestamp` reads them.
async fn seed_as(conn: &mut MultiplexedConnection, prefix: &str, count: usize, hashes: bool) {
    let old = (chrono::Utc::now().timestamp() - 90 * 86_400).to_string();
    let mut i = 0;
    while i < count {
        let mut pipe = redis::pipe();
        for j in i..(i + 10_000).min(count) {
            if hashes {
                pipe.cmd("HSET")
                    .arg(format!("{prefix}{j}"))
                    .arg(TIMESTAMP_FIELD)
                    .arg(&old)
                    .ignore();
            } else {
                pipe.cmd("SET")
                    .arg(format!("{prefix}{j}"))
                    .arg("v")
                    .ignore();
            }
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

/// What a ceiling does to every matching key, with no check.
#[derive(Clone, Copy)]
enum Action {
    Unlink,
    Expire,
}

impl Action {
    fn of(mode: RedisMode) -> Action {
        match mode {
            RedisMode::Expire => Action::Expire,
            RedisMode::Idle | RedisMode::Timestamp => Action::Unlink,
        }
    }
}

/// The client ceiling: `SCAN … COUNT 5000` pipelined with the action on the page before
/// (one multi-key `UNLINK`, or one `EXPIRE` per key), one round trip per page.
async fn client_ceiling(conn: &mut MultiplexedConnection, action: Action) -> (Duration, u64) {
    let start = Instant::now();
    let mut done = 0u64;
    let (mut cursor, mut page): (u64, Vec<String>) = redis::cmd("SCAN")
        .arg(0)
        .arg("MATCH")
        .arg(PATTERN)
        .arg("COUNT")
        .arg(5000)
        .query_async(conn)
        .await
        .expect("SCAN");
    loop {
        let mut pipe = redis::pipe();
        match action {
            Action::Unlink if !page.is_empty() => {
                pipe.cmd("UNLINK").arg(&page);
            }
            Action::Unlink => {}
            Action::Expire => {
                for key in &page {
                    pipe.cmd("EXPIRE").arg(key).arg(EXPIRE_SECS).ignore();
                }
                done += page.len() as u64;
            }
        }
        let last = cursor == 0;
        if !last {
            pipe.cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(PATTERN)
                .arg("COUNT")
                .arg(5000);
        }
        let replies: Vec<redis::Value> = pipe.query_async(conn).await.expect("pipeline");
        let mut replies = replies.into_iter();
        if matches!(action, Action::Unlink) && !page.is_empty() {
            let removed: u64 = redis::from_redis_value(replies.next().expect("UNLINK reply"))
                .expect("UNLINK count");
            done += removed;
        }
        if last {
            break;
        }
        (cursor, page) =
            redis::from_redis_value(replies.next().expect("SCAN reply")).expect("SCAN reply");
    }
    (start.elapsed(), done)
}

/// What a server-side loop reads of each key to select it, before acting on those selected.
#[derive(Clone, Copy, PartialEq)]
enum Selection {
    /// Every matching key: no read at all.
    All,
    /// Keys idle longer than the mode's retention of 1 s (`OBJECT IDLETIME`).
    Idle,
    /// Hashes whose timestamp field holds a time before now (`HGET`).
    Timestamp,
}

/// The server ceiling: the same loop inside the server, as one script (it blocks the server
/// for its whole run: a measure, not a way to delete), reading what `selection` needs.
async fn server_ceiling(
    conn: &mut MultiplexedConnection,
    action: Action,
    selection: Selection,
) -> (Duration, u64) {
    let script = redis::Script::new(
        r"
local cursor, done = '0', 0
local selection, field, limit = ARGV[4], ARGV[5], tonumber(ARGV[6])
repeat
  local reply = redis.call('SCAN', cursor, 'MATCH', ARGV[1], 'COUNT', 5000)
  cursor = reply[1]
  local keys = reply[2]
  if selection ~= 'all' then
    local selected, n = {}, 0
    for i = 1, #keys do
      local key, pick = keys[i], false
      if selection == 'idle' then
        pick = redis.call('OBJECT', 'IDLETIME', key) > limit
      else
        local value = redis.call('HGET', key, field)
        pick = value and tonumber(value) < limit
      end
      if pick then
        n = n + 1
        selected[n] = key
      end
    end
    keys = selected
  end
  if #keys > 0 then
    if ARGV[2] == 'unlink' then
      for first = 1, #keys, 1000 do
        done = done + redis.call('UNLINK', unpack(keys, first, math.min(first + 999, #keys)))
      end
    else
      for _, key in ipairs(keys) do
        done = done + redis.call('EXPIRE', key, ARGV[3])
      end
    end
  end
until cursor == '0'
return done
",
    );
    let verb = match action {
        Action::Unlink => "unlink",
        Action::Expire => "expire",
    };
    let (name, limit) = match selection {
        Selection::All => ("all", 0),
        Selection::Idle => ("idle", 1),
        Selection::Timestamp => ("timestamp", chrono::Utc::now().timestamp()),
    };
    let start = Instant::now();
    let done: u64 = script
        .arg(PATTERN)
        .arg(verb)
        .arg(EXPIRE_SECS)
        .arg(name)
        .arg(TIMESTAMP_FIELD)
        .arg(limit)
        .invoke_async(conn)
        .await
        .expect("ceiling script");
    (start.elapsed(), done)
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
            selector: Some(Selector::Redis(RedisTarget {
                key_pattern: PATTERN.into(),
                mode,
                timestamp_field: (mode == RedisMode::Timestamp).then(|| TIMESTAMP_FIELD.into()),
            })),
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
    // No response timeout: the server ceiling is one script that runs for seconds.
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection_with_config(
            &redis::AsyncConnectionConfig::new().set_response_timeout(None),
        )
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

    let rate = |d: Duration| keys as f64 / d.as_secs_f64();
    println!(
        "baseline  redis-cli --scan | xargs -n 1000 redis-cli unlink: {:>10.0} keys/s ({:.2}s)",
        rate(base),
        base.as_secs_f64()
    );

    for (mode, name, how) in [
        (
            RedisMode::Idle,
            "idle",
            "OBJECT IDLETIME + UNLINK in one script per page",
        ),
        (RedisMode::Expire, "expire", "EXPIRE .. LT, pipelined"),
        (
            RedisMode::Timestamp,
            "timestamp",
            "HGET + UNLINK in one script per page",
        ),
    ] {
        let hashes = mode == RedisMode::Timestamp;
        let action = Action::of(mode);
        let check = |conn_keys: usize, what: &str| {
            let expected = match action {
                Action::Unlink => keys,
                // Mode expire bounds the TTLs and leaves the keys.
                Action::Expire => 2 * keys,
            };
            assert_eq!(
                conn_keys, expected,
                "{what} must act on exactly the matching keys"
            );
        };

        seed_as(&mut conn, "bench:expired:", keys, hashes).await;
        let (client, n) = client_ceiling(&mut conn, action).await;
        assert_eq!(n as usize, keys);
        check(dbsize(&mut conn).await, "the client ceiling");

        seed_as(&mut conn, "bench:expired:", keys, hashes).await;
        let (server, n) = server_ceiling(&mut conn, action, Selection::All).await;
        assert_eq!(n as usize, keys);
        check(dbsize(&mut conn).await, "the server ceiling");

        let selection = match mode {
            RedisMode::Idle => Selection::Idle,
            RedisMode::Timestamp => Selection::Timestamp,
            RedisMode::Expire => Selection::All,
        };
        let selecting = if selection == Selection::All {
            None
        } else {
            seed_as(&mut conn, "bench:expired:", keys, hashes).await;
            if mode == RedisMode::Idle {
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            let (took, n) = server_ceiling(&mut conn, action, selection).await;
            assert_eq!(n as usize, keys);
            check(dbsize(&mut conn).await, "the selection ceiling");
            Some(took)
        };

        seed_as(&mut conn, "bench:expired:", keys, hashes).await;
        if mode == RedisMode::Idle {
            // Mode idle deletes keys idle longer than the retention (1s).
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        let _: () = redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query_async(&mut conn)
            .await
            .unwrap();
        let (ours, _) = tombstone_sweep(&redis.url(), keys, mode).await;
        if std::env::var_os("BENCH_STATS").is_some() {
            // Where the server spent its time during the sweep.
            let stats: String = redis::cmd("INFO")
                .arg("commandstats")
                .query_async(&mut conn)
                .await
                .unwrap();
            println!("{stats}");
        }
        check(dbsize(&mut conn).await, "the sweep");
        if mode == RedisMode::Expire {
            let bounded: i64 = redis::cmd("TTL")
                .arg("bench:expired:0")
                .query_async(&mut conn)
                .await
                .unwrap();
            assert!(bounded > 0, "mode expire must bound the TTL");
            // Leave only the live keys for the next mode.
            let _: u64 = redis::cmd("EVAL")
                .arg("local n = 0 repeat local r = redis.call('SCAN', n, 'MATCH', ARGV[1], 'COUNT', 5000) n = tonumber(r[1]) if #r[2] > 0 then redis.call('UNLINK', unpack(r[2])) end until n == 0 return 0")
                .arg(0)
                .arg(PATTERN)
                .query_async(&mut conn)
                .await
                .unwrap();
        }

        let best = client.min(server);
        println!("mode {name} ({how}):");
        println!(
            "  tombstone sweep        {:>10.0} keys/s ({:.2}s), {:.2}x the baseline, {:.0}% of the best ceiling",
            rate(ours),
            ours.as_secs_f64(),
            base.as_secs_f64() / ours.as_secs_f64(),
            100.0 * best.as_secs_f64() / ours.as_secs_f64()
        );
        println!(
            "  client ceiling         {:>10.0} keys/s ({:.2}s): SCAN COUNT 5000 pipelined with {}",
            rate(client),
            client.as_secs_f64(),
            match action {
                Action::Unlink => "one UNLINK per page",
                Action::Expire => "EXPIRE per key",
            }
        );
        println!(
            "  server ceiling         {:>10.0} keys/s ({:.2}s): the same loop in one Lua script",
            rate(server),
            server.as_secs_f64()
        );
        if let Some(took) = selecting {
            println!(
                "  selection ceiling      {:>10.0} keys/s ({:.2}s): that script reading {} per key; tombstone at {:.0}% of it",
                rate(took),
                took.as_secs_f64(),
                if mode == RedisMode::Idle { "OBJECT IDLETIME" } else { "HGET" },
                100.0 * took.as_secs_f64() / ours.as_secs_f64()
            );
        }
    }
}
