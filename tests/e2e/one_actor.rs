//! One actor at a time: a leader frozen past its Lease and thawed after a standby took over
//! deletes nothing more and overwrites no checkpoint. The
//! operators here are real `tombstone run` processes, frozen and thawed with signals.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{DeleteParams, ObjectMeta, PostParams};
use kube::Api;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use tombstone::api::retentionpolicy::{SweepOutcome, TargetPhase};
use tombstone::api::{LegalHold, RetentionPolicy};
use tombstone::backends::redis::{RedisBackend, RedisConfig};
use tombstone::backends::{Backend, Limits, Next, StepBudget, SweepJob};
use tombstone::leader::{Fence, LeaderElection};

use crate::fixtures::*;
use crate::support::operator_process::OperatorProcess;
use crate::support::s3::S3Server;
use crate::support::{wait_for, RedisServer};

const TOMBSTONE: &str = env!("CARGO_BIN_EXE_tombstone");

async fn wait_holder(leases: &Api<Lease>, identity: &str, timeout: Duration) {
    wait_for(&format!("{identity} to hold the Lease"), timeout, || {
        let leases = leases.clone();
        async move {
            let holder = leases
                .get_opt("tombstone-leader")
                .await
                .ok()
                .flatten()?
                .spec?
                .holder_identity;
            (holder.as_deref() == Some(identity)).then_some(())
        }
    })
    .await;
}

/// What changes while the old leader is frozen.
#[derive(Clone, Copy, Debug, PartialEq)]
enum WhileFrozen {
    /// A LegalHold stops the policy.
    Hold,
    /// The policy's retention is lengthened so that no key left is expired any more.
    LongerRetention,
}

#[tokio::test]
async fn a_leader_frozen_past_its_lease_deletes_and_writes_nothing_after_it_thaws() {
    frozen_leader(WhileFrozen::Hold, "fence").await;
}

#[tokio::test]
async fn a_leader_frozen_past_its_lease_deletes_nothing_a_lengthened_retention_keeps() {
    frozen_leader(WhileFrozen::LongerRetention, "fence-retention").await;
}

async fn frozen_leader(change: WhileFrozen, prefix: &str) {
    const MATCHING: usize = 80_000;
    const OTHERS: usize = 1_000;
    let (client, ns) = setup(prefix).await;
    let redis = RedisServer::start();
    let mut conn = redis_conn(&redis.url()).await;
    seed(&mut conn, "old:", MATCHING).await;
    seed(&mut conn, "keep:", OTHERS).await;
    // Mode idle deletes keys idle for longer than the retention of 1s.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let mut first = OperatorProcess::start(TOMBSTONE, &ns, "first", &[]);
    wait_holder(&leases, "first", Duration::from_secs(60)).await;
    let second = OperatorProcess::start(TOMBSTONE, &ns, "second", &[]);

    // A rate limit makes the sweep take tens of seconds (two pages of 5000 keys in flight,
    // each waiting about 2s for its turn), so there is a middle to freeze the leader in.
    redis_store(
        &client,
        &ns,
        "cache",
        &redis.url(),
        json!({"limits": {"requestsPerSecond": 5000, "concurrency": 2}}),
    )
    .await;
    create::<RetentionPolicy>(
        &client,
        &ns,
        policy_json("old", "1s", json!([{"name": "old", "store": "cache", "redis": {"keyPattern": "old:*", "mode": "idle"}}])),
    )
    .await;
    let deleted_total = |p: &RetentionPolicy| {
        p.status
            .as_ref()
            .and_then(|s| s.targets.first())
            .map_or(0, |t| t.deleted_total)
    };
    wait_policy(
        &client,
        &ns,
        "old",
        "a first checkpoint",
        Duration::from_secs(60),
        |p| p.status.as_ref().is_some_and(|s| s.current_sweep.is_some()) && deleted_total(p) > 0,
    )
    .await;

    // Freeze the leader mid-sweep, past its Lease: the standby takes over and goes on.
    first.freeze();
    let at_freeze = deleted_total(&get_policy(&client, &ns, "old").await);
    assert!((at_freeze as usize) < MATCHING, "frozen mid-sweep");
    wait_holder(&leases, "second", Duration::from_secs(60)).await;
    wait_policy(
        &client,
        &ns,
        "old",
        "progress by the new leader",
        Duration::from_secs(60),
        |p| deleted_total(p) > at_freeze,
    )
    .await;

    // While the old leader is still frozen, a LegalHold stops the policy, or its retention
    // is lengthened so that the keys left are no longer expired.
    let held = match change {
        WhileFrozen::Hold => {
            hold_policies(&client, &ns, "litigation", &["old"]).await;
            wait_policy(
                &client,
                &ns,
                "old",
                "the target held",
                Duration::from_secs(60),
                |p| {
                    p.status
                        .as_ref()
                        .and_then(|s| s.targets.first())
                        .is_some_and(|t| t.phase == TargetPhase::Held)
                },
            )
            .await
        }
        WhileFrozen::LongerRetention => {
            patch_spec::<RetentionPolicy>(&client, &ns, "old", json!({"retention": "1h"})).await;
            wait_policy(
                &client,
                &ns,
                "old",
                "the sweep under the new retention completed",
                Duration::from_secs(60),
                |p| {
                    p.status.as_ref().is_some_and(|s| {
                        s.observed_generation == p.metadata.generation
                            && s.current_sweep.is_none()
                            && s.last_sweep.is_some()
                    }) && p.metadata.generation > Some(1)
                },
            )
            .await
        }
    }
    .status
    .unwrap();
    let held_keys = count_keys(&mut conn, "old:*").await;
    assert!(held_keys > 0, "the change came before the sweep finished");
    assert_eq!(
        held.targets[0].deleted_total as usize,
        MATCHING - held_keys,
        "the new leader's counts are exact"
    );

    // Thawed, the old leader finds its Lease expired by its own clock: it stops at once.
    first.thaw();
    let exit = first
        .wait_exit(Duration::from_secs(60))
        .await
        .expect("the thawed leader stops");
    assert!(!exit.success(), "losing leadership is an error exit");
    let log = first.log();
    assert!(log.contains("leadership lost"), "{log}");

    // It deleted nothing more: the held keys survive, and the others too.
    assert_eq!(
        count_keys(&mut conn, "old:*").await,
        held_keys,
        "held data deleted by the thawed leader; its log:\n{log}"
    );
    assert_eq!(count_keys(&mut conn, "keep:*").await, OTHERS);
    // It overwrote no checkpoint: the status is still the new leader's.
    let after = get_policy(&client, &ns, "old").await.status.unwrap();
    assert_eq!(
        (
            &after.targets[0].phase,
            after.targets[0].deleted_total,
            &after.targets[0].cursor
        ),
        (
            &held.targets[0].phase,
            held.targets[0].deleted_total,
            &held.targets[0].cursor
        ),
        "the thawed leader overwrote the checkpoint; its log:\n{log}"
    );
    assert_eq!(
        (after.observed_generation, &after.last_sweep),
        (held.observed_generation, &held.last_sweep),
        "the thawed leader overwrote the status; its log:\n{log}"
    );
    if change == WhileFrozen::LongerRetention {
        // The sweep under the new retention deleted nothing: every key left is younger.
        assert_eq!(held.last_sweep.as_ref().map(|l| l.deleted), Some(0));
        drop(second);
        return;
    }

    // Lifted, the hold lets the new leader finish the same sweep, every key counted once.
    Api::<LegalHold>::namespaced(client.clone(), &ns)
        .delete("litigation", &DeleteParams::default())
        .await
        .unwrap();
    let done = wait_sweep_completed(&client, &ns, "old", None)
        .await
        .status
        .unwrap();
    let last = done.last_sweep.unwrap();
    assert_eq!(last.outcome, SweepOutcome::Succeeded);
    assert_eq!(
        last.deleted as usize, MATCHING,
        "nothing counted twice or lost"
    );
    assert_eq!(count_keys(&mut conn, "old:*").await, 0);
    assert_eq!(count_keys(&mut conn, "keep:*").await, OTHERS);
    drop(second);
}

/// A fence whose last renewal was sent longer than the renew deadline ago: what a process
/// thawed after a long freeze holds.
fn expired_fence() -> Fence {
    let fence = Fence::new(Duration::from_secs(10));
    fence.renewed(tokio::time::Instant::now() - Duration::from_secs(11));
    assert!(!fence.is_valid());
    fence
}

fn budget(fence: Fence) -> StepBudget {
    StepBudget {
        max_time: Duration::from_secs(10),
        cancel: CancellationToken::new(),
        fence,
    }
}

fn sweep_job(target: serde_json::Value) -> SweepJob {
    SweepJob {
        target: serde_json::from_value(target).expect("a valid target"),
        retention: "1s".parse().unwrap(),
        dry_run: false,
        cutoff: chrono::Utc::now() + chrono::Duration::hours(1),
        held: Default::default(),
    }
}

/// The check before each destructive batch, store by store: with the Lease expired by the
/// monotonic clock a sweep step deletes nothing and says why; renewed, the same step deletes.
#[tokio::test]
async fn a_sweep_step_past_the_renew_deadline_deletes_nothing() {
    let redis = RedisServer::start();
    let mut conn = redis_conn(&redis.url()).await;
    seed(&mut conn, "idle:", 50).await;
    seed(&mut conn, "expire:", 50).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let backend = RedisBackend::new(
        RedisConfig {
            url: redis.url(),
            password: None,
            cluster: false,
        },
        Limits::default(),
    );
    for (mode, pattern) in [("idle", "idle:*"), ("expire", "expire:*")] {
        let job = sweep_job(
            json!({"name": "t", "store": "s", "redis": {"keyPattern": pattern, "mode": mode}}),
        );
        let step = backend
            .sweep_step(&job, None, &budget(expired_fence()))
            .await
            .expect("a step with counts");
        assert_eq!(
            step.failure.as_ref().map(|e| e.reason()),
            Some("LeadershipLost"),
            "{mode}"
        );
        assert_eq!(step.deleted, 0, "{mode}");
        assert_ne!(step.next, Next::Done, "{mode}: the page is retried");
        // Resumed from the failed step's cursor, as the engine does.
        let Next::Continue(resume) = step.next else {
            panic!("{mode}: a failed step keeps its cursor");
        };
        let fence = Fence::new(Duration::from_secs(10));
        fence.renewed(tokio::time::Instant::now());
        let step = backend
            .sweep_step(&job, Some(&resume), &budget(fence))
            .await
            .expect("a step");
        assert!(step.failure.is_none(), "{mode}: {:?}", step.failure);
        assert_eq!(step.deleted, 50, "{mode}");
    }
    assert_eq!(count_keys(&mut conn, "idle:*").await, 0);
    assert_ne!(
        ttl(&mut conn, "expire:7").await,
        -1,
        "bounded by a TTL (or gone)"
    );

    let server = S3Server::start();
    server.create_bucket("fenced", false, false).await;
    for i in 0..20 {
        server.put("fenced", &format!("logs/{i}"), "x").await;
    }
    let backend = crate::s3::backend(&server, "fenced");
    let job = sweep_job(json!({"name": "t", "store": "s", "s3": {"prefix": "logs/"}}));
    let step = backend
        .sweep_step(&job, None, &budget(expired_fence()))
        .await
        .expect("a step with counts");
    assert_eq!(
        step.failure.as_ref().map(|e| e.reason()),
        Some("LeadershipLost")
    );
    assert_eq!(step.deleted, 0);
    assert_eq!(server.keys("fenced", "logs/").await.len(), 20);
    // Resumed from the failed step's cursor, as the engine does.
    let Next::Continue(resume) = step.next else {
        panic!("a failed step keeps its cursor");
    };
    let fence = Fence::new(Duration::from_secs(10));
    fence.renewed(tokio::time::Instant::now());
    let step = backend
        .sweep_step(&job, Some(&resume), &budget(fence))
        .await
        .expect("a step");
    assert!(step.failure.is_none(), "{:?}", step.failure);
    assert_eq!(step.deleted, 20);
    assert!(server.keys("fenced", "logs/").await.is_empty());
}

/// A holder whose clock runs an hour behind writes renewTimes that look long expired; it is
/// alive as long as the Lease keeps changing, and a standby must wait for a whole lease
/// duration of silence by its own clock before taking over.
#[tokio::test]
async fn a_standby_judges_the_holder_by_its_own_clock_not_the_renew_time() {
    let (client, ns) = setup("skew").await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let an_hour_ago = || MicroTime(jiff::Timestamp::now() - jiff::SignedDuration::from_hours(1));
    leases
        .create(
            &PostParams::default(),
            &Lease {
                metadata: ObjectMeta {
                    name: Some("tombstone-leader".into()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some("skewed".into()),
                    lease_duration_seconds: Some(3),
                    renew_time: Some(an_hour_ago()),
                    ..Default::default()
                }),
            },
        )
        .await
        .unwrap();
    let mut election = LeaderElection::new(&ns, "tombstone-leader", "standby");
    election.lease_duration = Duration::from_secs(3);
    election.renew_deadline = Duration::from_secs(2);
    election.renew_interval = Duration::from_millis(500);
    let standby = TestOperator::start_with(&ns, Some(election), None, fast_settings()).await;

    // The skewed holder renews every 500 ms for 8 s (more than twice its lease duration).
    let mut last_change = tokio::time::Instant::now();
    for _ in 0..16 {
        let mut lease = leases.get("tombstone-leader").await.unwrap();
        let spec = lease.spec.get_or_insert_with(Default::default);
        assert_eq!(
            spec.holder_identity.as_deref(),
            Some("skewed"),
            "the standby took the Lease from a holder that kept renewing"
        );
        spec.renew_time = Some(an_hour_ago());
        if leases
            .replace("tombstone-leader", &PostParams::default(), &lease)
            .await
            .is_ok()
        {
            last_change = tokio::time::Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Silent now: the standby takes over, a lease duration after the last change it saw.
    wait_holder(&leases, "standby", Duration::from_secs(30)).await;
    let silence = last_change.elapsed();
    assert!(
        silence >= Duration::from_secs(3),
        "taken over after {silence:?} of silence"
    );
    standby.stop().await;
}
