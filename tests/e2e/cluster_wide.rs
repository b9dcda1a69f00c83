//! One erasure request for the whole organisation: filed once, with its identifiers in the
//! operator's namespace only, it searches every namespace that has not opted out and says
//! per namespace what it did. It runs on a control plane of its own, because the operator
//! watches every namespace there.

use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::Api;
use serde_json::json;

use tombstone::api::erasurerequest::{ErasurePhase, ErasureTargetPhase};
use tombstone::api::{ErasureRequest, LegalHold, RetentionPolicy};
use tombstone::audit::{load_or_create_key, subject_digest};

use crate::erasure::{wait_phase, EMAIL, USER};
use crate::fixtures::{
    count_keys, create, fast_settings, logged_audit_record, redis_conn, redis_store, setup,
    wait_store_ready, TestOperator,
};
use crate::plugin::{assert_no_identifier, identifiers, succeeded, Plugin};
use crate::support::{test_namespace, ControlPlane, RedisServer};

/// A team's dataset: a DataStore on the shared Redis and a policy whose subject locator
/// finds the subject's sessions under the namespace's own prefix.
async fn team(client: &kube::Client, ns: &str, redis: &RedisServer, extra_target: bool) {
    redis_store(client, ns, "cache", &redis.url(), json!({})).await;
    wait_store_ready(client, ns, "cache", true).await;
    let mut targets = vec![json!({
        "name": "sessions", "store": "cache",
        "redis": {"keyPattern": format!("{ns}:session:*")},
        "subject": {"redis": {"keys": [format!("{ns}:session:{{userId}}:*")]}}
    })];
    if extra_target {
        targets.push(json!({"name": "metrics", "store": "cache", "redis": {"keyPattern": format!("{ns}:metrics:*")}}));
    }
    let mut policy = crate::fixtures::policy_json("sessions", "30d", json!(targets));
    policy["spec"]["suspend"] = json!(true);
    create::<RetentionPolicy>(client, ns, policy).await;
}

async fn seed(conn: &mut redis::aio::MultiplexedConnection, ns: &str) {
    let mut pipe = redis::pipe();
    for n in 0..4 {
        pipe.cmd("SET")
            .arg(format!("{ns}:session:{USER}:{n}"))
            .arg("t")
            .ignore();
        pipe.cmd("SET")
            .arg(format!("{ns}:session:{USER}0:{n}"))
            .arg("t")
            .ignore();
    }
    let _: () = pipe.query_async(conn).await.unwrap();
}

#[tokio::test]
async fn one_request_erases_a_person_across_namespaces_except_those_opted_out() {
    // Only for the operator's log capture, where receipts are found.
    setup("cluster-wide-log").await;
    let plane = ControlPlane::start_private();
    plane.apply_crds().await;
    let client = plane.client();
    let ops = test_namespace(&client, "tombstone-system").await;
    let (shop, mail, billing, legacy) = (
        test_namespace(&client, "shop").await,
        test_namespace(&client, "mail").await,
        test_namespace(&client, "billing").await,
        test_namespace(&client, "legacy").await,
    );
    let redis = RedisServer::start();
    let mut conn = redis_conn(&redis.url()).await;
    for ns in [&shop, &mail, &billing, &legacy] {
        seed(&mut conn, ns).await;
    }
    // The legacy namespace opts out, with its reason; a label alone would not do.
    Api::<Namespace>::all(client.clone())
        .patch(
            &legacy,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {
                "labels": {"tombstone.dev/erasure-opt-out": "true"},
                "annotations": {"tombstone.dev/erasure-opt-out-reason": "Anonymised test fixtures only"}}})),
        )
        .await
        .unwrap();
    let operator = TestOperator::start_watching_all(client.clone(), &ops, fast_settings()).await;
    team(&client, &shop, &redis, true).await;
    team(&client, &mail, &redis, false).await;
    team(&client, &billing, &redis, false).await;
    team(&client, &legacy, &redis, false).await;

    // Billing holds the subject: only billing's data waits.
    let key = load_or_create_key(&client, &ops).await.expect("digest key");
    let ids = std::collections::BTreeMap::from([
        ("email".to_string(), EMAIL.to_string()),
        ("userId".to_string(), USER.to_string()),
    ]);
    create::<LegalHold>(
        &client,
        &billing,
        json!({"apiVersion": "tombstone.dev/v1alpha1", "kind": "LegalHold", "metadata": {"name": "audit-2026"},
               "spec": {"reason": "Tax audit", "subjects": [{"digest": subject_digest(&key, &ids)}]}}),
    )
    .await;

    let plugin = Plugin::install_for(plane.kubeconfig_path());
    let output = plugin
        .run(
            &[
                "erase",
                "--cluster-wide",
                "--operator-namespace",
                &ops,
                "--ground",
                "consentWithdrawn",
                "--name",
                "dsr-org",
            ],
            &identifiers(),
        )
        .await;
    let stdout = succeeded(&output);
    assert_no_identifier(&output);
    assert!(
        stdout.contains(&format!("erasurerequest {ops}/dsr-org filed")),
        "{stdout}"
    );

    // Shop and mail are erased; billing waits on its hold; legacy is not searched.
    let requests: Api<ErasureRequest> = Api::namespaced(client.clone(), &ops);
    let status = crate::support::wait_for(
        "shop and mail verified, billing blocked",
        std::time::Duration::from_secs(60),
        || {
            let requests = requests.clone();
            let (shop, mail, billing) = (shop.clone(), mail.clone(), billing.clone());
            async move {
                let status = requests.get("dsr-org").await.ok()?.status?;
                let phase_of = |ns: &str| {
                    status
                        .targets
                        .iter()
                        .find(|t| t.namespace.as_deref() == Some(ns))
                        .map(|t| t.phase)
                };
                (phase_of(&shop) == Some(ErasureTargetPhase::Verified)
                    && phase_of(&mail) == Some(ErasureTargetPhase::Verified)
                    && phase_of(&billing) == Some(ErasureTargetPhase::Blocked))
                .then_some(status)
            }
        },
    )
    .await;
    assert_ne!(status.phase, ErasurePhase::Completed);
    assert_eq!(status.targets.len(), 3, "{:?}", status.targets);
    let billing_target = status
        .targets
        .iter()
        .find(|t| t.namespace.as_deref() == Some(billing.as_str()))
        .unwrap();
    assert!(
        billing_target
            .message
            .contains(&format!("{billing}/audit-2026")),
        "{}",
        billing_target.message
    );
    assert_eq!(
        count_keys(&mut conn, &format!("{billing}:session:{USER}:*")).await,
        4,
        "held data stays"
    );

    // Coverage: the opted-out namespace and the target without a locator, each with why.
    let opted: Vec<_> = status
        .not_searched
        .iter()
        .filter(|n| n.reason == "NamespaceOptedOut")
        .collect();
    assert_eq!(opted.len(), 1, "{:?}", status.not_searched);
    assert_eq!(opted[0].namespace.as_deref(), Some(legacy.as_str()));
    assert!(
        opted[0].message.contains("Anonymised test fixtures only"),
        "{}",
        opted[0].message
    );
    assert!(status
        .not_searched
        .iter()
        .any(|n| n.reason == "NoSubjectLocator"
            && n.namespace.as_deref() == Some(shop.as_str())
            && n.target == "metrics"));
    let progress: Vec<(String, u64, u32)> = status
        .namespaces
        .iter()
        .map(|p| (p.namespace.clone(), p.erased, p.not_searched))
        .collect();
    let mut expected = vec![
        (billing.clone(), 0, 0),
        (legacy.clone(), 0, 1),
        (mail.clone(), 4, 0),
        (shop.clone(), 4, 1),
    ];
    expected.sort();
    assert_eq!(progress, expected);

    // The hold goes: billing is erased too and the request completes.
    Api::<LegalHold>::namespaced(client.clone(), &billing)
        .delete("audit-2026", &DeleteParams::default())
        .await
        .unwrap();
    let done = wait_phase(&client, &ops, "dsr-org", ErasurePhase::Completed).await;
    let status = done.status.unwrap();
    assert_eq!(status.totals.as_ref().map(|t| t.erased), Some(12));
    for ns in [&shop, &mail, &billing] {
        assert_eq!(
            count_keys(&mut conn, &format!("{ns}:session:{USER}:*")).await,
            0,
            "{ns}"
        );
        assert_eq!(
            count_keys(&mut conn, &format!("{ns}:session:{USER}0:*")).await,
            4,
            "{ns}: the neighbour stays"
        );
    }
    assert_eq!(
        count_keys(&mut conn, &format!("{legacy}:session:{USER}:*")).await,
        4,
        "opted out"
    );

    // The receipt names each namespace's targets and what was not searched.
    let record = logged_audit_record(status.receipt.as_deref().expect("receipt"));
    let text = record.to_string();
    for ns in [&shop, &mail, &billing, &legacy] {
        assert!(text.contains(ns.as_str()), "the receipt names {ns}: {text}");
    }
    assert!(!text.contains(EMAIL) && !text.contains(USER), "{text}");

    // The identifiers never left the operator's namespace.
    let secrets: Api<Secret> = Api::all(client.clone());
    for secret in secrets.list(&ListParams::default()).await.unwrap() {
        if secret.metadata.namespace.as_deref() == Some(ops.as_str()) {
            continue;
        }
        for value in secret.data.unwrap_or_default().values() {
            let value = String::from_utf8_lossy(&value.0);
            assert!(
                !value.contains(EMAIL) && !value.contains(USER),
                "identifiers copied into {:?}",
                secret.metadata.namespace
            );
        }
    }

    // Filed anywhere but the operator's namespace, a cluster-wide request is refused.
    crate::fixtures::create_subject_secret(&client, &shop, "ids", json!({"userId": USER})).await;
    create::<ErasureRequest>(
        &client,
        &shop,
        json!({"apiVersion": "tombstone.dev/v1alpha1", "kind": "ErasureRequest", "metadata": {"name": "too-wide"},
               "spec": {"subject": {"secretRef": {"name": "ids"}}, "reason": "objection", "scope": "Cluster"}}),
    )
    .await;
    let refused = wait_phase(&client, &shop, "too-wide", ErasurePhase::Failed).await;
    let text = serde_json::to_string(&refused.status).unwrap();
    assert!(text.contains("accepted only in the operator's"), "{text}");
    assert!(
        refused.status.unwrap().targets.is_empty(),
        "nothing was searched"
    );
    operator.stop().await;
}
