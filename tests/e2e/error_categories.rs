//! Error categories decide what follows a failure; what the operator keeps in memory per
//! object goes when the object does.

use std::time::Duration;

use kube::api::DeleteParams;
use kube::Api;
use serde_json::json;

use tombstone::api::common::ErrorCategory;
use tombstone::api::erasurerequest::{ErasurePhase, ErasureRequest, ErasureTargetPhase};
use tombstone::api::{DataStore, RetentionPolicy};

use crate::erasure::{identifiers_secret, request_json, seed_subjects, shop, wait_phase, USER};
use crate::fixtures::*;
use crate::support::{wait_for, RedisServer};

async fn wait_cached(operator: &TestOperator, want: usize, what: &str) {
    wait_for(what, Duration::from_secs(30), || async {
        (operator.running.cached_backends() == want).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_deleted_datastore_drops_its_cached_backend() {
    let (client, ns) = setup("ec-forget").await;
    let redis = RedisServer::start();
    let operator = TestOperator::start(&ns).await;
    for name in ["cache-a", "cache-b"] {
        redis_store(&client, &ns, name, &redis.url(), json!({})).await;
        wait_store_ready(&client, &ns, name, true).await;
    }
    // Each probe cached its store's backend.
    wait_cached(&operator, 2, "a backend cached per store").await;

    let stores: Api<DataStore> = Api::namespaced(client.clone(), &ns);
    stores
        .delete("cache-a", &DeleteParams::default())
        .await
        .expect("delete succeeds");
    wait_cached(&operator, 1, "the deleted store's backend dropped").await;
    // The other store is still there, and still served by its backend.
    assert!(stores.get_opt("cache-b").await.unwrap().is_some());
    stores
        .delete("cache-b", &DeleteParams::default())
        .await
        .expect("delete succeeds");
    wait_cached(&operator, 0, "no backend left").await;
    operator.stop().await;
}

/// A target whose policy is invalid fails for good (InvalidSpec): it is not retried, the
/// other targets are erased and verified, and the request then ends Failed instead of
/// waiting forever for a target that cannot run.
#[tokio::test]
async fn an_invalid_spec_target_fails_the_request_once_the_rest_is_erased() {
    let (client, ns) = setup("ec-invalid").await;
    let redis = RedisServer::start();
    let mut conn = redis_conn(&redis.url()).await;
    seed_subjects(&mut conn).await;
    let operator = TestOperator::start(&ns).await;
    shop(&client, &ns, &redis).await;
    // Not bounded by the identifier: it would take user 40's keys with user 4's.
    let mut loose = policy_json(
        "loose",
        "30d",
        json!([{"name": "sessions", "store": "cache",
                "redis": {"keyPattern": "session:*"},
                "subject": {"redis": {"keys": ["session:{userId}*"]}}}]),
    );
    loose["spec"]["suspend"] = json!(true);
    create::<RetentionPolicy>(&client, &ns, loose).await;
    identifiers_secret(&client, &ns, "dsr-i").await;
    create::<ErasureRequest>(&client, &ns, request_json("dsr-i", "dsr-i", false)).await;

    let failed = wait_phase(&client, &ns, "dsr-i", ErasurePhase::Failed)
        .await
        .status
        .unwrap();
    let target = |policy: &str| {
        failed
            .targets
            .iter()
            .find(|t| t.policy == policy)
            .unwrap_or_else(|| panic!("a target of {policy}"))
    };
    let invalid = target("loose");
    assert_eq!(
        (invalid.phase, invalid.failure_category, invalid.erased),
        (
            ErasureTargetPhase::Failed,
            Some(ErrorCategory::InvalidSpec),
            0
        ),
        "{}",
        invalid.message
    );
    assert!(
        invalid.message.starts_with("InvalidSpec"),
        "{}",
        invalid.message
    );
    let valid = target("sessions");
    assert_eq!(
        (valid.phase, valid.erased, valid.failure_category),
        (ErasureTargetPhase::Verified, 5, None),
        "{}",
        valid.message
    );
    let (status, reason, message) = condition(&failed.conditions, "Complete");
    assert_eq!(
        (status, reason.as_str()),
        (tombstone::api::ConditionStatus::False, "Failed")
    );
    assert!(message.contains("loose/sessions: InvalidSpec"), "{message}");
    // The subject's keys went; user 40's (which the loose locator would have taken) stayed.
    assert_eq!(count_keys(&mut conn, &format!("session:{USER}:*")).await, 0);
    assert_eq!(
        count_keys(&mut conn, &format!("session:{USER}0:*")).await,
        4
    );
    operator.stop().await;
}

/// A Redis server under an LFU maxmemory-policy tracks no idle time: the idle-mode script
/// answers with the error code it sets for that (matched as a code, not as text), so the
/// sweep fails as InvalidSpec (the policy or the server must change) and deletes nothing.
#[tokio::test]
async fn mode_idle_under_an_lfu_policy_is_an_invalid_spec_known_by_its_code() {
    use tombstone::backends::redis::{RedisBackend, RedisConfig};
    use tombstone::backends::{Backend, Limits, StepBudget, SweepJob};
    let redis = RedisServer::start();
    let mut conn = redis_conn(&redis.url()).await;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("allkeys-lfu")
        .query_async(&mut conn)
        .await
        .expect("config set");
    seed(&mut conn, "idle:", 50).await;
    let backend = RedisBackend::new(
        RedisConfig {
            url: redis.url(),
            password: None,
            cluster: false,
        },
        Limits::default(),
    );
    let job = SweepJob {
        target: serde_json::from_value(json!({"name": "t", "store": "s",
            "redis": {"keyPattern": "idle:*", "mode": "idle"}}))
        .expect("a valid target"),
        retention: "1s".parse().expect("a duration"),
        dry_run: false,
        cutoff: chrono::Utc::now(),
        held: Default::default(),
    };
    let budget = StepBudget {
        max_time: Duration::from_secs(10),
        cancel: tokio_util::sync::CancellationToken::new(),
        fence: Default::default(),
    };
    let mut cursor: Option<String> = None;
    let mut failure = None;
    for _ in 0..10 {
        let step = match backend.sweep_step(&job, cursor.as_deref(), &budget).await {
            Ok(step) => step,
            Err(e) => {
                failure = Some(e);
                break;
            }
        };
        if step.failure.is_some() {
            failure = step.failure;
            break;
        }
        match step.next {
            tombstone::backends::Next::Continue(c) => cursor = Some(c),
            other => panic!("the sweep ended without failing: {other:?}"),
        }
    }
    let failure = failure.expect("the sweep fails");
    assert_eq!(failure.reason(), "InvalidSpec", "{failure}");
    assert_eq!(failure.category(), ErrorCategory::InvalidSpec);
    assert!(failure.to_string().contains("LFU"), "{failure}");
    assert_eq!(count_keys(&mut conn, "idle:*").await, 50);
}
