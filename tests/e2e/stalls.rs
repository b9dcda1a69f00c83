//! Stalls are seen before deadlines are: an erasure request that stops moving and a policy
//! whose sweeps stop completing show in the gauges the alerts watch.

use std::time::Duration;

use serde_json::json;
use tombstone::api::erasurerequest::ErasurePhase;
use tombstone::api::{DataStore, ErasureRequest, LegalHold, RetentionPolicy};
use tombstone::controller::erasurerequest::plan::StallAfter;
use tombstone::controller::Settings;

use crate::erasure::{identifiers_secret, request_json, seed_subjects, shop, wait_phase};
use crate::fixtures::{
    create, fast_settings, policy_json, redis_conn, setup, wait_metric, wait_policy, TestOperator,
};
use crate::support::loki::{now_ns, LokiDouble, SINGLE_TENANT};
use crate::support::RedisServer;

fn quick_stalls() -> Settings {
    Settings {
        stall_after: StallAfter {
            no_progress: Duration::from_secs(3600),
            failing: Duration::from_secs(1),
        },
        ..fast_settings()
    }
}

/// A request blocked by a LegalHold that cannot be evaluated (its Secret is missing) counts
/// as stalled once that has lasted `--stall-failing-after`; its phase carries the time it
/// was entered.
#[tokio::test]
async fn a_request_blocked_by_an_unverifiable_hold_is_reported_stalled() {
    let (client, ns) = setup("stall-hold").await;
    let redis = RedisServer::start();
    let mut conn = redis_conn(&redis.url()).await;
    seed_subjects(&mut conn).await;
    let operator = TestOperator::start_with(&ns, None, None, quick_stalls()).await;
    shop(&client, &ns, &redis).await;
    create::<LegalHold>(
        &client,
        &ns,
        json!({"apiVersion": "tombstone.dev/v1alpha1", "kind": "LegalHold", "metadata": {"name": "claim-5"},
               "spec": {"reason": "Pending claim", "subjects": [{"secretRef": {"name": "missing-5"}}]}}),
    )
    .await;
    identifiers_secret(&client, &ns, "dsr-s").await;
    create::<ErasureRequest>(&client, &ns, request_json("dsr-s", "dsr-s", false)).await;

    let blocked = wait_phase(&client, &ns, "dsr-s", ErasurePhase::Blocked).await;
    let status = blocked.status.expect("status");
    let since = status.phase_since.expect("phaseSince");
    assert!(
        since.0 <= chrono::Utc::now()
            && since.0 > chrono::Utc::now() - chrono::Duration::minutes(1),
        "phaseSince {since} is when it was blocked"
    );
    let metrics = operator.running.metrics.clone();
    wait_metric(
        &metrics,
        "tombstone_erasure_requests_stalled{why=\"HoldUnverifiable\"} 1",
    )
    .await;
    let text = metrics.render();
    assert!(
        text.contains("tombstone_erasure_requests_stalled{why=\"NoProgress\"} 0"),
        "{text}"
    );
    assert!(
        text.contains("tombstone_erasure_requests_longest_in_phase_seconds{phase=\"Blocked\"}"),
        "{text}"
    );
    operator.stop().await;
}

/// A sweep that waits on its store and never completes (a Loki delete request left in a long
/// cancel period) makes its policy late once twice its schedule has passed. A suspended
/// policy, which does not sweep on purpose, is not late. (A sweep that fails does complete:
/// failing sweeps have an alert of their own.)
#[tokio::test]
async fn a_policy_whose_sweep_does_not_complete_is_reported_late() {
    const HOUR_NS: i64 = 3_600_000_000_000;
    let (client, ns) = setup("stall-sweep").await;
    let double = LokiDouble::start().await;
    double.set_cancel_period(Duration::from_secs(3600));
    let old = now_ns() - 2 * HOUR_NS;
    double.push(
        SINGLE_TENANT,
        &[("app", "mailer")],
        &[(old, "a"), (old + 1, "b")],
    );
    let operator = TestOperator::start_with(&ns, None, None, quick_stalls()).await;
    create::<DataStore>(
        &client,
        &ns,
        json!({"apiVersion": "tombstone.dev/v1alpha1", "kind": "DataStore",
               "metadata": {"name": "logs"}, "spec": {"loki": {"url": double.url()}}}),
    )
    .await;
    let targets =
        json!([{"name": "logs", "store": "logs", "loki": {"selector": "{app=\"mailer\"}"}}]);
    for (name, suspend) in [("late", false), ("suspended", true)] {
        let mut policy = policy_json(name, "1h", targets.clone());
        policy["spec"]["schedule"] = json!({"every": "1s"});
        policy["spec"]["suspend"] = json!(suspend);
        create::<RetentionPolicy>(&client, &ns, policy).await;
    }
    wait_policy(
        &client,
        &ns,
        "late",
        "a sweep waiting on its delete request",
        Duration::from_secs(60),
        |p| {
            p.status.as_ref().is_some_and(|s| {
                s.current_sweep.is_some()
                    && s.targets
                        .first()
                        .and_then(|t| t.cursor.as_deref())
                        .is_some_and(|c| c.starts_with("v1:loki:"))
            })
        },
    )
    .await;
    wait_policy(
        &client,
        &ns,
        "suspended",
        "a status",
        Duration::from_secs(30),
        |p| p.status.is_some(),
    )
    .await;
    wait_metric(
        &operator.running.metrics,
        "tombstone_retention_policies_sweep_late 1",
    )
    .await;
    let late = crate::fixtures::get_policy(&client, &ns, "late").await;
    assert!(
        late.status.as_ref().is_some_and(|s| s.last_sweep.is_none()),
        "the late policy has never completed a sweep"
    );
    operator.stop().await;
}
