//! The right to erasure end to end: ErasureRequest → find, erase, verify → Completed, with
//! only keyed digests in the operator's trail.

use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{DeleteParams, PostParams};
use kube::Api;
use serde_json::json;

use tombstone::api::erasurerequest::{ErasurePhase, ErasureTargetPhase};
use tombstone::api::{ErasureRequest, LegalHold, RetentionPolicy};

use crate::fixtures::*;
use crate::support::{wait_for, RedisServer};

pub(crate) const EMAIL: &str = "zq-unique-7f3a@example.org";
pub(crate) const USER: &str = "u-93b1c7";

pub(crate) async fn shop(client: &kube::Client, ns: &str, redis: &RedisServer) {
    redis_store(client, ns, "cache", &redis.url(), json!({})).await;
    wait_store_ready(client, ns, "cache", true).await;
    let mut p = policy_json(
        "sessions",
        "30d",
        json!([{
            "name": "sessions", "store": "cache",
            "redis": {"keyPattern": "session:*"},
            "subject": {"redis": {
                "keys": ["session:{userId}:*"],
                "setMembers": [{"key": "newsletter", "member": "{email}"}]
            }}
        }]),
    );
    // This test is about erasure: keep the retention sweep out of the way.
    p["spec"]["suspend"] = json!(true);
    create::<RetentionPolicy>(client, ns, p).await;
}

pub(crate) async fn seed_subjects(conn: &mut redis::aio::MultiplexedConnection) {
    let mut pipe = redis::pipe();
    for n in 0..4 {
        pipe.cmd("SET")
            .arg(format!("session:{USER}:{n}"))
            .arg("t")
            .ignore();
        pipe.cmd("SET")
            .arg(format!("session:{USER}0:{n}"))
            .arg("t")
            .ignore();
    }
    pipe.cmd("SADD")
        .arg("newsletter")
        .arg(EMAIL)
        .arg("other@example.org")
        .ignore();
    let _: () = pipe.query_async(conn).await.unwrap();
}

/// The subject's identifiers, in a Secret labelled as such (so deleted once erased).
pub(crate) async fn identifiers_secret(client: &kube::Client, ns: &str, name: &str) {
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"tombstone.dev/subject-identifiers": "true"}},
        "stringData": {"email": EMAIL, "userId": USER}
    }))
    .unwrap();
    Api::<Secret>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
}

pub(crate) fn request_json(name: &str, secret: &str, dry_run: bool) -> serde_json::Value {
    json!({
        "apiVersion": "tombstone.dev/v1alpha1", "kind": "ErasureRequest", "metadata": {"name": name},
        "spec": {"subject": {"secretRef": {"name": secret}}, "reason": "consentWithdrawn",
                 "receivedAt": "2026-11-20T09:00:00Z", "dryRun": dry_run, "reference": "DSR-1"}
    })
}

pub(crate) async fn wait_phase(
    client: &kube::Client,
    ns: &str,
    name: &str,
    phase: ErasurePhase,
) -> ErasureRequest {
    let api: Api<ErasureRequest> = Api::namespaced(client.clone(), ns);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut last = None;
    while tokio::time::Instant::now() < deadline {
        if let Ok(r) = api.get(name).await {
            if r.status.as_ref().is_some_and(|s| s.phase == phase) {
                return r;
            }
            last = r.status;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "{name} did not reach {phase:?} within 60s; last status: {}",
        serde_json::to_string(&last).unwrap_or_default()
    );
}

#[tokio::test]
async fn a_request_erases_the_subject_verifies_and_leaves_no_identifier_behind() {
    let (client, ns) = setup("erasure").await;
    let redis = RedisServer::start();
    let mut conn = redis_conn(&redis.url()).await;
    seed_subjects(&mut conn).await;
    let operator = TestOperator::start(&ns).await;
    shop(&client, &ns, &redis).await;

    // A dry run first: it counts exactly what the real run then erases.
    identifiers_secret(&client, &ns, "dsr-dry").await;
    create::<ErasureRequest>(&client, &ns, request_json("dsr-dry", "dsr-dry", true)).await;
    let dry = wait_phase(&client, &ns, "dsr-dry", ErasurePhase::Completed)
        .await
        .status
        .unwrap();
    assert_eq!(
        dry.totals.as_ref().map(|t| (t.found, t.erased)),
        Some((5, 0))
    );
    assert_eq!(
        count_keys(&mut conn, &format!("session:{USER}:*")).await,
        4,
        "a dry run erases nothing"
    );

    identifiers_secret(&client, &ns, "dsr-1").await;
    create::<ErasureRequest>(&client, &ns, request_json("dsr-1", "dsr-1", false)).await;
    let done = wait_phase(&client, &ns, "dsr-1", ErasurePhase::Completed).await;
    let status = done.status.clone().unwrap();
    let target = &status.targets[0];
    assert_eq!(
        (
            target.policy.as_str(),
            target.target.as_str(),
            target.store.as_str()
        ),
        ("sessions", "sessions", "cache")
    );
    assert_eq!(
        (target.phase, target.found, target.erased, target.remaining),
        (ErasureTargetPhase::Verified, 5, 5, 0)
    );
    assert_eq!(
        status.totals.as_ref().map(|t| t.erased),
        Some(5),
        "dry-run parity: 5 found, 5 erased"
    );
    assert_eq!(
        status.received_at.unwrap().to_string(),
        "2026-11-20T09:00:00Z"
    );
    assert_eq!(status.deadline.unwrap().to_string(), "2026-12-20T09:00:00Z");
    assert!(status.completion_time.is_some());
    assert!(status
        .receipt
        .as_deref()
        .is_some_and(|r| r.starts_with("sha256:") && r.len() == 71));
    assert_eq!(condition(&status.conditions, "Complete").1, "Verified");

    // The digest is the keyed digest `tombstone digest` prints for the same identifiers.
    let key = tombstone::audit::load_key(&client, &ns).await.unwrap();
    let ids = [
        ("email".to_string(), EMAIL.to_string()),
        ("userId".to_string(), USER.to_string()),
    ]
    .into();
    assert_eq!(
        status.subject_digest.as_deref(),
        Some(tombstone::audit::subject_digest(&key, &ids).as_str())
    );

    // Only the subject's records are gone.
    assert_eq!(count_keys(&mut conn, &format!("session:{USER}:*")).await, 0);
    assert_eq!(
        count_keys(&mut conn, &format!("session:{USER}0:*")).await,
        4,
        "a neighbouring id is untouched"
    );
    let members: Vec<String> = redis::cmd("SMEMBERS")
        .arg("newsletter")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(members, vec!["other@example.org".to_string()]);

    // The identifiers Secret is deleted; the dry run's is kept (a dry run changes nothing).
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    wait_for(
        "the identifiers Secret to go",
        Duration::from_secs(20),
        || {
            let secrets = secrets.clone();
            async move {
                secrets
                    .get_opt("dsr-1")
                    .await
                    .ok()
                    .flatten()
                    .is_none()
                    .then_some(())
            }
        },
    )
    .await;
    assert!(secrets.get_opt("dsr-dry").await.unwrap().is_some());

    // No identifier anywhere in status, events or metrics.
    wait_event(&client, &ns, "dsr-1", |(_, r, _)| r == "ErasureCompleted").await;
    let trail = format!(
        "{}\n{:?}\n{}",
        serde_json::to_string(&done).unwrap(),
        events_for(&client, &ns, "dsr-1").await,
        operator.running.metrics.render()
    );
    let logs = captured_logs();
    let trail = format!("{trail}\n{logs:?}");
    for secret in [EMAIL, USER, "zq-unique", "93b1c7"] {
        assert!(
            !trail.contains(secret),
            "{secret} leaked into the operator's trail"
        );
    }

    // The receipt is the SHA-256 of the audit record logged on the `audit` target.
    let parsed = logged_audit_record(status.receipt.as_deref().unwrap());
    assert_eq!(parsed["subjectDigest"], json!(status.subject_digest));
    assert_eq!(parsed["totals"]["erased"], json!(5));
    assert_eq!(parsed["operatorVersion"], json!(env!("CARGO_PKG_VERSION")));
    wait_metric(
        &operator.running.metrics,
        "tombstone_erasure_requests{phase=\"Completed\"} 2",
    )
    .await;

    // A completed request is final: an edit is reported, nothing runs again.
    let api: Api<ErasureRequest> = Api::namespaced(client.clone(), &ns);
    api.patch(
        "dsr-1",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(json!({"spec": {"reference": "DSR-1-edited"}})),
    )
    .await
    .unwrap();
    let edited = wait_for("the edit to be reported", Duration::from_secs(20), || {
        let api = api.clone();
        async move {
            let s = api.get("dsr-1").await.ok()?.status?;
            find_ignored(&s).then_some(s)
        }
    })
    .await;
    assert_eq!(edited.phase, ErasurePhase::Completed);
    assert_eq!(
        edited.receipt, status.receipt,
        "the receipt of what was done stands"
    );
    assert!(operator
        .running
        .metrics
        .render()
        .contains("tombstone_items_erased_total{store_kind=\"redis\"} 5"));
    operator.stop().await;
}

#[tokio::test]
async fn a_held_subject_blocks_the_request_until_the_hold_is_lifted() {
    let (client, ns) = setup("erasure-hold").await;
    let redis = RedisServer::start();
    let mut conn = redis_conn(&redis.url()).await;
    seed_subjects(&mut conn).await;
    let operator = TestOperator::start(&ns).await;
    shop(&client, &ns, &redis).await;
    let key = wait_for("the digest key", Duration::from_secs(10), || {
        let client = client.clone();
        let ns = ns.clone();
        async move {
            tombstone::audit::load_or_create_key(&client, &ns)
                .await
                .ok()
        }
    })
    .await;
    let digest = tombstone::audit::identifier_digest(&key, "email", EMAIL);
    create::<LegalHold>(
        &client,
        &ns,
        json!({"apiVersion": "tombstone.dev/v1alpha1", "kind": "LegalHold", "metadata": {"name": "claim-17"},
               "spec": {"reason": "Pending claim", "subjects": [{"digest": digest}]}}),
    )
    .await;
    identifiers_secret(&client, &ns, "dsr-2").await;
    create::<ErasureRequest>(&client, &ns, request_json("dsr-2", "dsr-2", false)).await;
    let blocked = wait_phase(&client, &ns, "dsr-2", ErasurePhase::Blocked)
        .await
        .status
        .unwrap();
    let (_, reason, message) = condition(&blocked.conditions, "Blocked");
    assert_eq!(reason, "LegalHold");
    assert!(message.contains("claim-17"), "{message}");
    wait_event(&client, &ns, "dsr-2", |(t, r, _)| {
        t == "Warning" && r == "ErasureBlocked"
    })
    .await;
    assert_eq!(
        count_keys(&mut conn, &format!("session:{USER}:*")).await,
        4,
        "held data is not erased"
    );

    Api::<LegalHold>::namespaced(client.clone(), &ns)
        .delete("claim-17", &DeleteParams::default())
        .await
        .unwrap();
    let done = wait_phase(&client, &ns, "dsr-2", ErasurePhase::Completed)
        .await
        .status
        .unwrap();
    assert_eq!(done.totals.unwrap().erased, 5);
    assert_eq!(condition(&done.conditions, "Blocked").1, "NotHeld");
    operator.stop().await;
}

#[tokio::test]
async fn a_store_that_is_down_fails_the_target_and_the_request_retries_until_it_completes() {
    let (client, ns) = setup("erasure-down").await;
    let redis = RedisServer::start();
    let operator = TestOperator::start(&ns).await;
    shop(&client, &ns, &redis).await;
    drop(redis); // the store goes down
    identifiers_secret(&client, &ns, "dsr-3").await;
    create::<ErasureRequest>(&client, &ns, request_json("dsr-3", "dsr-3", false)).await;
    let api: Api<ErasureRequest> = Api::namespaced(client.clone(), &ns);
    let failing = wait_for("a failed target", Duration::from_secs(60), || {
        let api = api.clone();
        async move {
            let r = api.get("dsr-3").await.ok()?;
            let s = r.status?;
            s.targets
                .iter()
                .any(|t| t.phase == ErasureTargetPhase::Failed)
                .then_some(s)
        }
    })
    .await;
    assert_ne!(failing.phase, ErasurePhase::Completed);
    assert_eq!(
        failing.targets[0].erased, 0,
        "nothing is reported erased that was not"
    );
    assert!(!failing.targets[0].message.is_empty());

    // The store comes back (elsewhere): the request completes without any edit to it.
    let redis = RedisServer::start();
    let mut conn = redis_conn(&redis.url()).await;
    seed_subjects(&mut conn).await;
    let url = redis.url();
    Api::<tombstone::api::DataStore>::namespaced(client.clone(), &ns)
        .patch(
            "cache",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"spec": {"redis": {"url": url}}})),
        )
        .await
        .unwrap();
    let done = wait_for("the request to complete", Duration::from_secs(120), || {
        let api = api.clone();
        async move {
            let s = api.get("dsr-3").await.ok()?.status?;
            (s.phase == ErasurePhase::Completed).then_some(s)
        }
    })
    .await;
    assert_eq!(done.targets[0].phase, ErasureTargetPhase::Verified);
    assert_eq!(done.totals.unwrap().erased, 5);
    assert_eq!(count_keys(&mut conn, &format!("session:{USER}:*")).await, 0);
    operator.stop().await;
}

#[tokio::test]
async fn a_held_policy_blocks_its_targets_in_an_erasure() {
    let (client, ns) = setup("erasure-policy-hold").await;
    let redis = RedisServer::start();
    let mut conn = redis_conn(&redis.url()).await;
    seed_subjects(&mut conn).await;
    let operator = TestOperator::start(&ns).await;
    shop(&client, &ns, &redis).await;
    create::<LegalHold>(
        &client,
        &ns,
        json!({"apiVersion": "tombstone.dev/v1alpha1", "kind": "LegalHold", "metadata": {"name": "audit-2026"},
               "spec": {"reason": "Tax audit", "policies": ["sessions"]}}),
    )
    .await;
    identifiers_secret(&client, &ns, "dsr-4").await;
    create::<ErasureRequest>(&client, &ns, request_json("dsr-4", "dsr-4", false)).await;
    let blocked = wait_phase(&client, &ns, "dsr-4", ErasurePhase::Blocked).await;
    // While held, the request rests: no status rewrites, no busy loop.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let api: Api<ErasureRequest> = Api::namespaced(client.clone(), &ns);
    assert_eq!(
        api.get("dsr-4").await.unwrap().metadata.resource_version,
        blocked.metadata.resource_version
    );
    let blocked = blocked.status.unwrap();
    assert_eq!(blocked.targets[0].phase, ErasureTargetPhase::Blocked);
    assert!(condition(&blocked.conditions, "Blocked")
        .2
        .contains("audit-2026"));
    assert_eq!(count_keys(&mut conn, &format!("session:{USER}:*")).await, 4);
    Api::<LegalHold>::namespaced(client.clone(), &ns)
        .delete("audit-2026", &DeleteParams::default())
        .await
        .unwrap();
    let done = wait_phase(&client, &ns, "dsr-4", ErasurePhase::Completed)
        .await
        .status
        .unwrap();
    assert_eq!(done.totals.unwrap().erased, 5);
    operator.stop().await;
}

fn find_ignored(status: &tombstone::api::ErasureRequestStatus) -> bool {
    status.conditions.iter().any(|c| {
        c.type_ == "SpecChangeIgnored" && c.status == tombstone::api::ConditionStatus::True
    })
}

#[tokio::test]
async fn a_late_request_is_reported_overdue_and_a_retained_secret_is_kept() {
    let (client, ns) = setup("erasure-late").await;
    let redis = RedisServer::start();
    let mut conn = redis_conn(&redis.url()).await;
    seed_subjects(&mut conn).await;
    let operator = TestOperator::start(&ns).await;
    shop(&client, &ns, &redis).await;
    identifiers_secret(&client, &ns, "dsr-5").await;
    let mut request = request_json("dsr-5", "dsr-5", false);
    request["spec"]["receivedAt"] = json!("2026-09-01T00:00:00Z");
    request["spec"]["retainSubjectSecret"] = json!(true);
    create::<ErasureRequest>(&client, &ns, request).await;
    let done = wait_phase(&client, &ns, "dsr-5", ErasurePhase::Completed)
        .await
        .status
        .unwrap();
    assert_eq!(done.deadline.unwrap().to_string(), "2026-10-01T00:00:00Z");
    wait_event(&client, &ns, "dsr-5", |(t, r, n)| {
        t == "Warning" && r == "ErasureOverdue" && n.contains("2026-10-01")
    })
    .await;
    // Once complete it is no longer overdue, and the Secret stays as asked.
    assert_eq!(
        condition(&done.conditions, "Overdue").0,
        tombstone::api::ConditionStatus::False
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(Api::<Secret>::namespaced(client.clone(), &ns)
        .get_opt("dsr-5")
        .await
        .unwrap()
        .is_some());
    operator.stop().await;
}

#[tokio::test]
async fn a_hold_naming_the_subject_by_secret_blocks_the_request() {
    let (client, ns) = setup("erasure-hold-secret").await;
    let redis = RedisServer::start();
    let mut conn = redis_conn(&redis.url()).await;
    seed_subjects(&mut conn).await;
    let operator = TestOperator::start(&ns).await;
    shop(&client, &ns, &redis).await;
    // The hold knows the subject by one identifier only (the email); that is enough.
    let held: Secret = serde_json::from_value(
        json!({"metadata": {"name": "held-1"}, "stringData": {"email": EMAIL}}),
    )
    .unwrap();
    Api::<Secret>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &held)
        .await
        .unwrap();
    create::<LegalHold>(
        &client,
        &ns,
        json!({"apiVersion": "tombstone.dev/v1alpha1", "kind": "LegalHold", "metadata": {"name": "claim-18"},
               "spec": {"reason": "Pending claim", "subjects": [{"secretRef": {"name": "held-1"}}]}}),
    )
    .await;
    identifiers_secret(&client, &ns, "dsr-6").await;
    create::<ErasureRequest>(&client, &ns, request_json("dsr-6", "dsr-6", false)).await;
    let blocked = wait_phase(&client, &ns, "dsr-6", ErasurePhase::Blocked)
        .await
        .status
        .unwrap();
    assert!(condition(&blocked.conditions, "Blocked")
        .2
        .contains("claim-18"));
    assert_eq!(count_keys(&mut conn, &format!("session:{USER}:*")).await, 4);
    operator.stop().await;
}

/// The request says what it did not search and why: a target without a subject locator is
/// listed in `status.notSearched` (and in the receipt), not silently left out.
#[tokio::test]
async fn a_target_without_a_subject_locator_is_listed_as_not_searched() {
    let (client, ns) = setup("erasure-coverage").await;
    let redis = RedisServer::start();
    let mut conn = redis_conn(&redis.url()).await;
    seed_subjects(&mut conn).await;
    let operator = TestOperator::start(&ns).await;
    redis_store(&client, &ns, "cache", &redis.url(), json!({})).await;
    wait_store_ready(&client, &ns, "cache", true).await;
    let mut p = policy_json(
        "shop",
        "30d",
        json!([
            {"name": "sessions", "store": "cache", "redis": {"keyPattern": "session:*"},
             "subject": {"redis": {"keys": ["session:{userId}:*"]}}},
            {"name": "page-views", "store": "cache", "redis": {"keyPattern": "views:*"}}
        ]),
    );
    p["spec"]["suspend"] = json!(true);
    create::<RetentionPolicy>(&client, &ns, p).await;
    identifiers_secret(&client, &ns, "dsr-c").await;
    create::<ErasureRequest>(&client, &ns, request_json("dsr-c", "dsr-c", false)).await;
    let done = wait_phase(&client, &ns, "dsr-c", ErasurePhase::Completed).await;
    let status = done.status.unwrap();
    let searched: Vec<&str> = status.targets.iter().map(|t| t.target.as_str()).collect();
    assert_eq!(searched, ["sessions"]);
    assert_eq!(status.not_searched.len(), 1, "{:?}", status.not_searched);
    let missing = &status.not_searched[0];
    assert_eq!(
        (
            missing.policy.as_str(),
            missing.target.as_str(),
            missing.reason.as_str()
        ),
        ("shop", "page-views", "NoSubjectLocator")
    );
    let receipt = status.receipt.expect("a receipt");
    let record = logged_audit_record(&receipt);
    assert_eq!(record["notSearched"][0]["target"], "page-views", "{record}");
    operator.stop().await;
}

/// A target skipped for want of an identifier type, and one whose store is not ready, are
/// listed as not searched, the latter only until its store is ready and it has run.
#[tokio::test]
async fn skipped_targets_and_stores_not_ready_are_listed_as_not_searched_while_so() {
    let (client, ns) = setup("erasure-gaps").await;
    let redis = RedisServer::start();
    let mut conn = redis_conn(&redis.url()).await;
    seed_subjects(&mut conn).await;
    let operator = TestOperator::start(&ns).await;
    redis_store(&client, &ns, "cache", &redis.url(), json!({})).await;
    wait_store_ready(&client, &ns, "cache", true).await;
    // The later store's server is down at first.
    let mut later = crate::support::faults::RestartableRedis::start();
    later.stop();
    redis_store(&client, &ns, "later", &later.url(), json!({})).await;
    wait_store_ready(&client, &ns, "later", false).await;
    let mut p = policy_json(
        "shop",
        "30d",
        json!([
            {"name": "sessions", "store": "cache", "redis": {"keyPattern": "session:*"},
             "subject": {"redis": {"keys": ["session:{userId}:*"]}}},
            {"name": "newsletter", "store": "cache", "redis": {"keyPattern": "newsletter*"},
             "subject": {"redis": {"setMembers": [{"key": "newsletter", "member": "{email}"}]}}},
            {"name": "archive", "store": "later", "redis": {"keyPattern": "session:*"},
             "subject": {"redis": {"keys": ["session:{userId}:*"]}}}
        ]),
    );
    p["spec"]["suspend"] = json!(true);
    create::<RetentionPolicy>(&client, &ns, p).await;
    // Only the user id is given: the newsletter's locator needs the e-mail address.
    create_subject_secret(&client, &ns, "dsr-g", json!({"userId": USER})).await;
    create::<ErasureRequest>(&client, &ns, request_json("dsr-g", "dsr-g", false)).await;

    let api: Api<ErasureRequest> = Api::namespaced(client.clone(), &ns);
    let gaps = |status: &tombstone::api::ErasureRequestStatus| {
        let mut gaps: Vec<(String, String)> = status
            .not_searched
            .iter()
            .map(|n| (n.target.clone(), n.reason.clone()))
            .collect();
        gaps.sort();
        gaps
    };
    let status = wait_for("both gaps listed", Duration::from_secs(60), || {
        let api = api.clone();
        async move {
            let status = api.get("dsr-g").await.ok()?.status?;
            (gaps(&status).len() == 2).then_some(status)
        }
    })
    .await;
    assert_eq!(
        gaps(&status),
        [
            ("archive".to_string(), "StoreNotReady".to_string()),
            ("newsletter".to_string(), "IdentifierNotGiven".to_string())
        ]
    );
    let skipped = status
        .not_searched
        .iter()
        .find(|n| n.target == "newsletter")
        .unwrap();
    assert!(skipped.message.contains("{email}"), "{}", skipped.message);

    // The store comes up on its address: the target runs and leaves the list.
    later.resume();
    let done = wait_phase(&client, &ns, "dsr-g", ErasurePhase::Completed).await;
    let status = done.status.unwrap();
    assert_eq!(
        gaps(&status),
        [("newsletter".to_string(), "IdentifierNotGiven".to_string())]
    );
    let record = logged_audit_record(status.receipt.as_deref().expect("receipt"));
    assert_eq!(
        record["notSearched"][0]["reason"], "IdentifierNotGiven",
        "{record}"
    );
    operator.stop().await;
}
