//! The Redis driver's batch step against a real redis-server: many subjects found, erased
//! and verified in one pass, each record counted for the member(s) it belongs to.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::MultiplexedConnection;
use serde_json::json;

use tombstone::api::retentionpolicy::Target;
use tombstone::backends::redis::{RedisBackend, RedisConfig};
use tombstone::backends::{
    Backend, BatchJob, BatchMember, BatchStep, Error, HoldGate, Limits, Next, NoHolds,
    SubjectAction,
};

use crate::conformance::{budget, Owner, Probe};
use crate::fixtures::{count_keys, redis_conn};
use crate::support::{RedisCluster, RedisServer};

/// A gate that cannot be read from its `fails_at`-th question on.
struct Failing {
    fails_at: usize,
    asked: AtomicUsize,
}

#[async_trait]
impl HoldGate for Failing {
    async fn held(&self) -> Result<BTreeSet<usize>, Error> {
        if self.asked.fetch_add(1, Ordering::Relaxed) + 1 >= self.fails_at {
            return Err(Error::Unreachable("the holds cannot be read".into()));
        }
        Ok(BTreeSet::new())
    }
}

/// A gate that holds the same members at every commit.
struct Holds(BTreeSet<usize>);

#[async_trait]
impl HoldGate for Holds {
    async fn held(&self) -> Result<BTreeSet<usize>, Error> {
        Ok(self.0.clone())
    }
}

/// Keys `ds:u:<userId>:<i>` and `ds:m:<email>:<i>`; with `records`, also a hash field, a
/// set member and a sorted-set member per subject.
fn target(records: bool) -> Target {
    let mut subject = json!({"keys": ["ds:u:{userId}:*", "ds:m:{email}:*"]});
    if records {
        subject["hashFields"] = json!([{"key": "ds:profiles", "field": "{userId}"}]);
        subject["setMembers"] = json!([
            {"key": "ds:emails", "member": "{email}"},
            {"key": "ds:rank", "member": "{userId}"}
        ]);
    }
    serde_json::from_value(json!({"name": "ds", "store": "cache",
        "redis": {"keyPattern": "ds:*", "mode": "idle"},
        "subject": {"redis": subject}}))
    .expect("a valid target")
}

fn job(target: &Target, owners: &[Owner], action: SubjectAction) -> BatchJob {
    BatchJob {
        target: target.clone(),
        action,
        members: owners
            .iter()
            .enumerate()
            .map(|(i, o)| BatchMember {
                id: format!("digest-{i}"),
                identifiers: o.identifiers(),
            })
            .collect(),
        gate: Arc::new(NoHolds),
    }
}

async fn seed_keys(conn: &mut MultiplexedConnection, owner: &Owner, n: usize) {
    let mut pipe = redis::pipe();
    for i in 0..n {
        pipe.cmd("SET")
            .arg(format!("ds:u:{}:{i}", owner.user_id))
            .arg("v")
            .ignore();
        pipe.cmd("SET")
            .arg(format!("ds:m:{}:{i}", owner.email))
            .arg("v")
            .ignore();
    }
    let () = pipe.query_async(conn).await.expect("SET");
}

async fn seed_records(conn: &mut MultiplexedConnection, owner: &Owner) {
    let () = redis::pipe()
        .cmd("HSET")
        .arg("ds:profiles")
        .arg(&owner.user_id)
        .arg("{}")
        .ignore()
        .cmd("SADD")
        .arg("ds:emails")
        .arg(&owner.email)
        .ignore()
        .cmd("ZADD")
        .arg("ds:rank")
        .arg(1)
        .arg(&owner.user_id)
        .ignore()
        .query_async(conn)
        .await
        .expect("records");
}

async fn seed_filler(conn: &mut MultiplexedConnection, n: usize) {
    for chunk in (0..n).collect::<Vec<_>>().chunks(5000) {
        let mut pipe = redis::pipe();
        for i in chunk {
            pipe.cmd("SET").arg(format!("ds:s:{i}")).arg("v").ignore();
        }
        let () = pipe.query_async(conn).await.expect("SET");
    }
}

/// Every key of an owner's.
async fn keys_of(conn: &mut MultiplexedConnection, owner: &Owner) -> usize {
    count_keys(conn, &format!("ds:u:{}:*", owner.user_id)).await
        + count_keys(conn, &format!("ds:m:{}:*", owner.email)).await
}

/// Runs batch steps to the end, each on a fresh backend (as after a restart), adding up the
/// members' counts; `lose` decides, from a step's cursor, whether its result is thrown
/// away (the step is then repeated from the cursor before it).
async fn to_end(
    server: &RedisServer,
    job: &BatchJob,
    max_time: Duration,
    lose: impl FnMut(&BatchStep) -> bool,
) -> (Vec<u64>, BTreeSet<usize>, usize) {
    resume(server, job, None, max_time, lose).await
}

/// [`to_end`] from `cursor`.
async fn resume(
    server: &RedisServer,
    job: &BatchJob,
    mut cursor: Option<String>,
    max_time: Duration,
    mut lose: impl FnMut(&BatchStep) -> bool,
) -> (Vec<u64>, BTreeSet<usize>, usize) {
    let mut totals = vec![0u64; job.members.len()];
    let mut held = BTreeSet::new();
    for steps in 1..=500 {
        let step = server
            .backend()
            .batch_step(job, cursor.as_deref(), &budget(max_time))
            .await
            .expect("a batch step");
        assert!(step.failure.is_none(), "{:?}", step.failure);
        assert_eq!(step.members.len(), job.members.len());
        if lose(&step) {
            continue;
        }
        for (t, m) in totals.iter_mut().zip(&step.members) {
            *t += m.count;
            assert!(m.ran);
        }
        held.extend(step.held.iter().copied());
        match step.next {
            Next::Done => return (totals, held, steps),
            Next::Continue(c) => cursor = Some(c),
            Next::Wait { .. } => panic!("a Redis batch never waits"),
        }
    }
    panic!("the batch did not end in 500 steps");
}

/// A redis-server with five members' keys (3, 50, 400, 1 and 5 of each kind; the fifth
/// shares the user id of the second, so its `ds:u:` keys count for both), the probe's
/// neighbours' (2 of each kind), `filler` other keys under the pattern, and with `records`
/// a hash field, set member and sorted-set member of each member and neighbour.
struct World {
    server: RedisServer,
    conn: MultiplexedConnection,
    probe: Probe,
    owners: Vec<Owner>,
}

impl World {
    async fn new(records: bool, filler: usize) -> World {
        let server = RedisServer::start();
        let mut conn = redis_conn(&server.url()).await;
        let probe = Probe::new();
        let tag = &probe.subject.email;
        let other = |n: &str| Owner {
            user_id: format!("{n}-{}", tag.len()),
            email: format!("{n}-{tag}"),
        };
        let mut shared = other("share");
        shared.user_id = other("m1").user_id;
        let owners = vec![
            probe.subject.clone(),
            other("m1"),
            other("m2"),
            other("m3"),
            shared,
        ];
        let seeded = owners
            .iter()
            .zip([3, 50, 400, 1, 5])
            .chain(probe.neighbours.iter().map(|n| (n, 2)));
        for (o, n) in seeded {
            seed_keys(&mut conn, o, n).await;
            if records {
                seed_records(&mut conn, o).await;
            }
        }
        seed_filler(&mut conn, filler).await;
        World {
            server,
            conn,
            probe,
            owners,
        }
    }
}

const ENOUGH: Duration = Duration::from_secs(30);

#[tokio::test]
async fn a_batch_counts_each_member_exactly_and_keeps_a_held_members_keys() {
    let World {
        server,
        mut conn,
        probe,
        owners,
    } = World::new(false, 300).await;
    let target = target(false);
    // Member 4 shares member 1's user keys: 50 of them, and its own 5 e-mail keys.
    let expected = vec![6, 100, 800, 2, 55];
    let find = job(&target, &owners, SubjectAction::Find);
    assert_eq!(to_end(&server, &find, ENOUGH, |_| false).await.0, expected);

    // Member 2 is held at every commit: its keys stay, it is reported held, and nothing of
    // it is counted; the others are erased.
    let mut erase = job(&target, &owners, SubjectAction::Erase);
    erase.gate = Arc::new(Holds([2].into()));
    let (erased, held, _) = to_end(&server, &erase, ENOUGH, |_| false).await;
    assert_eq!(erased, vec![6, 100, 0, 2, 55]);
    assert_eq!(held, [2].into());
    assert_eq!(keys_of(&mut conn, &owners[2]).await, 800);
    for (i, o) in owners.iter().enumerate().filter(|(i, _)| *i != 2) {
        assert_eq!(keys_of(&mut conn, o).await, 0, "member {i}");
    }
    for n in &probe.neighbours {
        assert_eq!(keys_of(&mut conn, n).await, 4, "a neighbour was touched");
    }
    assert_eq!(count_keys(&mut conn, "ds:s:*").await, 300);

    let verify = job(&target, &owners, SubjectAction::Verify);
    assert_eq!(
        to_end(&server, &verify, ENOUGH, |_| false).await.0,
        vec![0, 0, 800, 0, 0]
    );
    assert_eq!(count_keys(&mut conn, "tombstone:ledger:*").await, 0);
}

/// The members of `job` at `indices`, keeping their ids (as a batch resumes with some of its
/// members).
fn part(job: &BatchJob, indices: &[usize]) -> BatchJob {
    BatchJob {
        target: job.target.clone(),
        action: job.action,
        members: indices.iter().map(|&i| job.members[i].clone()).collect(),
        gate: Arc::new(NoHolds),
    }
}

/// The operator dies while a step's new position is being checkpointed: some members hold
/// it, the others the position before, and they resume as two batches. The batch ahead goes
/// on (past the ledger of the step the others repeat); the batch behind repeats that step
/// and still counts what the lost attempt erased of its members.
#[tokio::test]
async fn members_resuming_from_two_checkpoints_of_one_step_each_count_exactly() {
    let World {
        server,
        mut conn,
        owners,
        ..
    } = World::new(false, 20_000).await;
    let target = target(false);
    let expected = [6, 100, 800, 2, 55];
    let erase = job(&target, &owners, SubjectAction::Erase);
    let step = |cursor: Option<String>| {
        let (server, erase) = (&server, &erase);
        async move {
            server
                .backend()
                .batch_step(erase, cursor.as_deref(), &budget(Duration::ZERO))
                .await
                .expect("a batch step")
        }
    };
    // The run is named, then one SCAN page is erased: its result reaches members 0 and 2.
    let Next::Continue(named) = step(None).await.next else {
        panic!("an erase names its run first");
    };
    let first = step(Some(named.clone())).await;
    let Next::Continue(ahead_at) = first.next.clone() else {
        panic!("more than one page");
    };
    let (ahead, behind) = ([0, 2], [1, 3, 4]);
    assert!(
        behind.iter().any(|&i| first.members[i].count > 0),
        "the lost attempt erased records of the members behind"
    );
    let (ahead_counts, _, _) = resume(
        &server,
        &part(&erase, &ahead),
        Some(ahead_at),
        Duration::ZERO,
        |_| false,
    )
    .await;
    let (behind_counts, _, _) = resume(
        &server,
        &part(&erase, &behind),
        Some(named),
        Duration::ZERO,
        |_| false,
    )
    .await;
    for (k, &i) in ahead.iter().enumerate() {
        assert_eq!(
            first.members[i].count + ahead_counts[k],
            expected[i],
            "member {i} (ahead)"
        );
    }
    for (k, &i) in behind.iter().enumerate() {
        assert_eq!(behind_counts[k], expected[i], "member {i} (behind)");
    }
    for o in &owners {
        assert_eq!(keys_of(&mut conn, o).await, 0);
    }
    assert_eq!(count_keys(&mut conn, "tombstone:ledger:*").await, 0);
}

#[tokio::test]
async fn zero_budget_steps_and_lost_steps_still_count_each_member_exactly() {
    // Enough keys under the scan pattern for several SCAN pages.
    let World {
        server,
        mut conn,
        probe,
        owners,
    } = World::new(true, 20_000).await;
    let target = target(true);
    // Keys, plus a hash field, a set member and a sorted-set member each; member 4 shares
    // member 1's user id, so its profile field and rank member too.
    let expected = vec![6 + 3, 100 + 3, 800 + 3, 2 + 3, 55 + 3];
    let find = job(&target, &owners, SubjectAction::Find);
    let (found, _, steps) = to_end(&server, &find, Duration::ZERO, |_| false).await;
    assert_eq!(found, expected);
    assert!(steps >= 4, "{steps} steps: one SCAN page each");

    // A step of the scan that erased something, and the step of the hash fields and set
    // members, each lose their result (the operator died before the checkpoint): the step
    // is repeated from the cursor before it, and what the lost one erased is still counted
    // for its members.
    let erase = job(&target, &owners, SubjectAction::Erase);
    let (mut lost_scan, mut lost_records) = (false, false);
    let (erased, held, _) = to_end(&server, &erase, Duration::ZERO, |step| {
        let erased: u64 = step.members.iter().map(|m| m.count).sum();
        let Next::Continue(c) = &step.next else {
            return false;
        };
        // With no time, a step that ends in the scan worked one page of it; the step that
        // ends with phase done worked the hash fields and set members.
        let lose = |lost: &mut bool, phase: &str| {
            let now = !*lost && erased > 0 && c.contains(&format!(r#""phase":"{phase}""#));
            *lost |= now;
            now
        };
        lose(&mut lost_scan, "keys") || lose(&mut lost_records, "done")
    })
    .await;
    assert!(lost_scan && lost_records, "both losses happened");
    assert!(held.is_empty());
    assert_eq!(erased, expected);
    for o in &owners {
        assert_eq!(keys_of(&mut conn, o).await, 0);
    }
    for n in &probe.neighbours {
        assert_eq!(keys_of(&mut conn, n).await, 4, "a neighbour was touched");
    }
    let remaining: (u64, u64, u64) = redis::pipe()
        .cmd("HLEN")
        .arg("ds:profiles")
        .cmd("SCARD")
        .arg("ds:emails")
        .cmd("ZCARD")
        .arg("ds:rank")
        .query_async(&mut conn)
        .await
        .expect("records");
    // The neighbours' four profile fields, e-mails and rank members stay.
    assert_eq!(remaining, (4, 4, 4));
    assert_eq!(count_keys(&mut conn, "ds:s:*").await, 20_000);

    let verify = job(&target, &owners, SubjectAction::Verify);
    assert_eq!(
        to_end(&server, &verify, Duration::ZERO, |_| false).await.0,
        vec![0; 5]
    );
    assert_eq!(count_keys(&mut conn, "tombstone:ledger:*").await, 0);
}

#[tokio::test]
async fn a_gate_that_cannot_be_read_stops_the_commits_and_the_batch_resumes_exactly() {
    let World {
        server,
        mut conn,
        owners,
        ..
    } = World::new(false, 20_000).await;
    let mut seeded = 0;
    for o in &owners {
        seeded += keys_of(&mut conn, o).await;
    }
    let target = target(false);
    let mut erase = job(&target, &owners, SubjectAction::Erase);
    erase.gate = Arc::new(Failing {
        fails_at: 2,
        asked: AtomicUsize::new(0),
    });
    let mut cursor = None;
    let failed = loop {
        let step = server
            .backend()
            .batch_step(&erase, cursor.as_deref(), &budget(ENOUGH))
            .await
            .expect("a batch step");
        let Next::Continue(c) = &step.next else {
            panic!("the batch ended without asking the gate twice");
        };
        cursor = Some(c.clone());
        if step.failure.is_some() {
            break step;
        }
    };
    assert_eq!(failed.failure.map(|e| e.reason()), Some("Unreachable"));
    assert!(
        failed.members.iter().all(|m| m.count == 0),
        "reported later"
    );
    let mut left = 0;
    for o in &owners {
        left += keys_of(&mut conn, o).await;
    }
    assert!(left < seeded, "the first commit was made");
    assert!(left > 0, "nothing was committed after the gate failed");
    erase.gate = Arc::new(NoHolds);
    let (erased, _, _) = resume(&server, &erase, cursor, ENOUGH, |_| false).await;
    assert_eq!(erased, vec![6, 100, 800, 2, 55]);
    for o in &owners {
        assert_eq!(keys_of(&mut conn, o).await, 0);
    }
}

#[tokio::test]
async fn a_batch_over_a_cluster_counts_each_member_exactly_with_a_lost_step() {
    let cluster = RedisCluster::start(3);
    let urls: Vec<String> = cluster.nodes().iter().map(|n| n.url()).collect();
    let client = redis::cluster::ClusterClient::new(urls.clone()).expect("a cluster client");
    let mut conn = client
        .get_async_connection()
        .await
        .expect("a cluster connection");
    let probe = Probe::new();
    let owners: Vec<Owner> = std::iter::once(probe.subject.clone())
        .chain(probe.neighbours[..2].iter().cloned())
        .collect();
    let neighbours = &probe.neighbours[2..];
    let sizes = [40, 7, 1];
    let seeded = owners
        .iter()
        .zip(sizes)
        .chain(neighbours.iter().map(|n| (n, 3)));
    for (o, n) in seeded {
        // One command at a time: the keys are in many slots.
        for i in 0..n {
            for key in [
                format!("ds:u:{}:{i}", o.user_id),
                format!("ds:m:{}:{i}", o.email),
            ] {
                let () = redis::cmd("SET")
                    .arg(key)
                    .arg("v")
                    .query_async(&mut conn)
                    .await
                    .expect("SET");
            }
        }
        let () = redis::cmd("HSET")
            .arg("ds:profiles")
            .arg(&o.user_id)
            .arg("{}")
            .query_async(&mut conn)
            .await
            .expect("HSET");
        let () = redis::cmd("SADD")
            .arg("ds:emails")
            .arg(&o.email)
            .query_async(&mut conn)
            .await
            .expect("SADD");
    }
    let target = target(true);
    let cluster_backend = || {
        RedisBackend::new(
            RedisConfig {
                url: cluster.seed_url(),
                password: None,
                cluster: true,
            },
            Limits::default(),
        )
    };
    let run = |job: BatchJob, lose_one: bool| {
        let backend = &cluster_backend;
        async move {
            let mut totals = vec![0u64; job.members.len()];
            let mut cursor: Option<String> = None;
            let mut lost = !lose_one;
            loop {
                let step = backend()
                    .batch_step(&job, cursor.as_deref(), &budget(Duration::ZERO))
                    .await
                    .expect("a batch step");
                assert!(step.failure.is_none(), "{:?}", step.failure);
                if !lost && step.members.iter().any(|m| m.count > 0) {
                    lost = true;
                    continue;
                }
                for (t, m) in totals.iter_mut().zip(&step.members) {
                    *t += m.count;
                }
                match step.next {
                    Next::Continue(c) => cursor = Some(c),
                    _ => return (totals, lost),
                }
            }
        }
    };
    // Keys of each kind, a profile field and an e-mail in the set.
    let expected: Vec<u64> = sizes.iter().map(|n| 2 * n + 2).collect();
    let find = job(&target, &owners, SubjectAction::Find);
    assert_eq!(run(find, false).await.0, expected);
    let (erased, lost) = run(job(&target, &owners, SubjectAction::Erase), true).await;
    assert!(lost, "a step with erasures was lost");
    assert_eq!(erased, expected);
    assert_eq!(
        run(job(&target, &owners, SubjectAction::Verify), false)
            .await
            .0,
        vec![0; 3]
    );
    let mut left = 0;
    for url in &urls {
        let mut node = redis_conn(url).await;
        for o in owners.iter().chain(neighbours) {
            left += keys_of(&mut node, o).await;
        }
        assert_eq!(count_keys(&mut node, "tombstone:ledger:*").await, 0);
    }
    assert_eq!(
        left,
        2 * 3 * neighbours.len(),
        "only the neighbours' keys are left"
    );
    let fields: u64 = redis::cmd("HLEN")
        .arg("ds:profiles")
        .query_async(&mut conn)
        .await
        .expect("HLEN");
    let emails: u64 = redis::cmd("SCARD")
        .arg("ds:emails")
        .query_async(&mut conn)
        .await
        .expect("SCARD");
    assert_eq!((fields, emails), (2, 2), "the neighbours' records are left");
}
