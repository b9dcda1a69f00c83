//! LegalHolds stop retention sweeps of the policies they name, visibly, until lifted or expired.

use std::time::Duration;

use kube::api::DeleteParams;
use kube::Api;
use serde_json::json;

use tombstone::api::retentionpolicy::{SweepOutcome, TargetPhase};
use tombstone::api::{ConditionStatus, LegalHold, RetentionPolicy};

use crate::fixtures::*;
use crate::support::RedisServer;

fn hold_json(name: &str, policies: &[&str], expires_at: Option<String>) -> serde_json::Value {
    let mut spec = json!({"reason": "Pending litigation, Art. 17(3)(e)", "policies": policies});
    if let Some(e) = expires_at {
        spec["expiresAt"] = json!(e);
    }
    json!({"apiVersion": "tombstone.dev/v1alpha1", "kind": "LegalHold", "metadata": {"name": name}, "spec": spec})
}

async fn wait_hold_active(client: &kube::Client, ns: &str, name: &str, active: bool) -> LegalHold {
    let api: Api<LegalHold> = Api::namespaced(client.clone(), ns);
    let want = if active {
        ConditionStatus::True
    } else {
        ConditionStatus::False
    };
    crate::support::wait_for(
        &format!("hold {name} Active={active}"),
        Duration::from_secs(30),
        || {
            let api = api.clone();
            async move {
                let h = api.get(name).await.ok()?;
                let st = h.status.as_ref()?;
                (condition(&st.conditions, "Active").0 == want).then_some(h)
            }
        },
    )
    .await
}

#[tokio::test]
async fn a_held_policy_is_not_swept_until_the_hold_is_deleted() {
    let (client, ns) = setup("hold").await;
    let redis = RedisServer::start();
    let mut conn = redis_conn(&redis.url()).await;
    seed(&mut conn, "bill:", 20).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let operator = TestOperator::start(&ns).await;
    redis_store(&client, &ns, "cache", &redis.url(), json!({})).await;
    wait_store_ready(&client, &ns, "cache", true).await;
    create::<LegalHold>(&client, &ns, hold_json("litigation", &["billing"], None)).await;
    let hold = wait_hold_active(&client, &ns, "litigation", true).await;
    assert_eq!(
        condition(&hold.status.unwrap().conditions, "Active").2,
        "holds policies billing until released"
    );

    create::<RetentionPolicy>(
        &client,
        &ns,
        policy_json("billing", "1s", json!([{"name": "bills", "store": "cache", "redis": {"keyPattern": "bill:*", "mode": "idle"}}])),
    )
    .await;
    let held = wait_policy(
        &client,
        &ns,
        "billing",
        "held targets",
        Duration::from_secs(30),
        |p| {
            p.status.as_ref().is_some_and(|s| {
                s.targets
                    .first()
                    .is_some_and(|t| t.phase == TargetPhase::Held)
            })
        },
    )
    .await
    .status
    .unwrap();
    assert_eq!(held.targets[0].message, "held by LegalHold litigation");
    assert!(held.last_sweep.is_none());
    assert_eq!(condition(&held.conditions, "Compliant").1, "LegalHold");
    wait_event(&client, &ns, "billing", |(_, r, n)| {
        r == "Held" && n.contains("litigation")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        count_keys(&mut conn, "bill:*").await,
        20,
        "held data is never deleted"
    );

    // Lifting the hold lets the sweep run without any edit to the policy.
    Api::<LegalHold>::namespaced(client.clone(), &ns)
        .delete("litigation", &DeleteParams::default())
        .await
        .unwrap();
    let swept = wait_sweep_completed(&client, &ns, "billing", None)
        .await
        .status
        .unwrap();
    assert_eq!(swept.last_sweep.unwrap().outcome, SweepOutcome::Succeeded);
    assert_eq!(swept.targets[0].deleted, 20);
    assert_eq!(count_keys(&mut conn, "bill:*").await, 0);
    wait_event(&client, &ns, "billing", |(_, r, _)| r == "Released").await;
    operator.stop().await;
}

#[tokio::test]
async fn an_expiring_hold_releases_the_policy_by_itself() {
    let (client, ns) = setup("hold-expiry").await;
    let redis = RedisServer::start();
    let mut conn = redis_conn(&redis.url()).await;
    seed(&mut conn, "tmp:", 5).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let operator = TestOperator::start(&ns).await;
    redis_store(&client, &ns, "cache", &redis.url(), json!({})).await;
    wait_store_ready(&client, &ns, "cache", true).await;
    let expires = (chrono::Utc::now() + chrono::Duration::seconds(6))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    create::<LegalHold>(&client, &ns, hold_json("short", &["tmp"], Some(expires))).await;
    wait_hold_active(&client, &ns, "short", true).await;
    create::<RetentionPolicy>(
        &client,
        &ns,
        policy_json("tmp", "1s", json!([{"name": "tmp", "store": "cache", "redis": {"keyPattern": "tmp:*", "mode": "idle"}}])),
    )
    .await;
    wait_policy(&client, &ns, "tmp", "held", Duration::from_secs(30), |p| {
        p.status.as_ref().is_some_and(|s| {
            s.targets
                .first()
                .is_some_and(|t| t.phase == TargetPhase::Held)
        })
    })
    .await;
    let swept = wait_sweep_completed(&client, &ns, "tmp", None)
        .await
        .status
        .unwrap();
    assert_eq!(swept.targets[0].deleted, 5);
    let hold = wait_hold_active(&client, &ns, "short", false).await;
    assert_eq!(
        condition(&hold.status.unwrap().conditions, "Active").1,
        "Expired"
    );
    operator.stop().await;
}
