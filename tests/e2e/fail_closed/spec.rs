//! Specs that could delete the wrong data or crash the operator are refused when the policy
//! is validated: the policy is not Ready (reason
//! InvalidSpec, with a Warning event), nothing is swept or erased, and other policies keep
//! being reconciled. Objects stored under the older, looser schema are caught the same way.

use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::{json, Value};

use tombstone::api::common::ConditionStatus;
use tombstone::api::erasurerequest::ErasureTargetPhase;
use tombstone::api::retentionpolicy::SweepOutcome;
use tombstone::api::{ErasureRequest, RetentionPolicy};

use crate::fixtures::*;
use crate::support::{wait_for, RedisServer};

/// The RetentionPolicy CRD of this build, as JSON.
fn policy_crd() -> Value {
    let (_, crd) = tombstone::crds::all()
        .into_iter()
        .find(|(file, _)| *file == "retentionpolicies.yaml")
        .expect("the RetentionPolicy CRD");
    serde_json::to_value(crd).unwrap()
}

/// The same CRD with the schema of the first release: any number of any unit for durations
/// (zero and 1000000000w included), and no list-map on targets.
fn loose_policy_crd() -> Value {
    let mut crd = policy_crd();
    let spec = &mut crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    spec["properties"]["retention"]["pattern"] = json!("^[0-9]+(s|m|h|d|w)$");
    spec["properties"]["schedule"]["properties"]["every"]["pattern"] = json!("^[0-9]+(s|m|h|d|w)$");
    let targets = spec["properties"]["targets"].as_object_mut().unwrap();
    targets.remove("x-kubernetes-list-type");
    targets.remove("x-kubernetes-list-map-keys");
    crd
}

async fn apply_crd(client: &Client, crd: &Value) {
    let crd: CustomResourceDefinition = serde_json::from_value(crd.clone()).unwrap();
    Api::<CustomResourceDefinition>::all(client.clone())
        .patch(
            &crd.name_any(),
            &PatchParams::apply("tombstone-tests").force(),
            &Patch::Apply(&crd),
        )
        .await
        .expect("CRD applied");
}

/// Creates `object`, retrying while the server still refuses it as Invalid (a CRD's new
/// schema takes a moment to be served); returns the last refusal on timeout.
async fn create_when_accepted(client: &Client, ns: &str, object: &Value) -> Result<(), String> {
    let api: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        ns,
        &ApiResource::erase::<RetentionPolicy>(&()),
    );
    let object: DynamicObject = serde_json::from_value(object.clone()).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match api.create(&PostParams::default(), &object).await {
            Ok(_) => return Ok(()),
            Err(e) if tokio::time::Instant::now() >= deadline => return Err(e.to_string()),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Waits until the current schema refuses `object` with 422 Invalid; returns the message.
async fn refused_by_schema(client: &Client, ns: &str, object: &Value) -> String {
    let api: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        ns,
        &ApiResource::erase::<RetentionPolicy>(&()),
    );
    let object: DynamicObject = serde_json::from_value(object.clone()).unwrap();
    wait_for(
        "the schema to refuse the object",
        Duration::from_secs(30),
        || {
            let (api, object) = (api.clone(), object.clone());
            async move {
                match api.create(&PostParams::default(), &object).await {
                    Err(kube::Error::Api(s)) if s.code == 422 => Some(s.message),
                    Ok(created) => {
                        // Accepted by a schema not yet replaced: remove it and try again.
                        let _ = api.delete(&created.name_any(), &Default::default()).await;
                        None
                    }
                    Err(_) => None,
                }
            }
        },
    )
    .await
}

fn redis_target(name: &str, pattern: &str) -> Value {
    json!({"name": name, "store": "cache", "redis": {"keyPattern": pattern, "mode": "expire"}})
}

/// Waits until the operator has reconciled the policy's current generation.
async fn wait_reconciled(client: &Client, ns: &str, name: &str) -> RetentionPolicy {
    wait_policy(
        client,
        ns,
        name,
        &format!("{name} reconciled"),
        Duration::from_secs(60),
        |p| {
            p.status.as_ref().is_some_and(|s| {
                s.observed_generation.is_some() && s.observed_generation == p.metadata.generation
            })
        },
    )
    .await
}

/// Asserts the policy is not Ready for reason InvalidSpec with a message holding `mentions`,
/// that it never swept, and that a Warning event says so.
async fn assert_invalid_spec(client: &Client, ns: &str, name: &str, mentions: &str) {
    let policy = wait_reconciled(client, ns, name).await;
    let status = policy.status.unwrap();
    let (ready, reason, message) = condition(&status.conditions, "Ready");
    assert_eq!(
        (ready, reason.as_str()),
        (ConditionStatus::False, "InvalidSpec"),
        "{name}: {message}"
    );
    assert!(
        message.contains(mentions),
        "{name}: {message:?} should name {mentions:?}"
    );
    assert!(
        status.last_sweep.is_none() && status.current_sweep.is_none(),
        "{name} must never sweep: {status:?}"
    );
    wait_event(client, ns, name, |(t, r, note)| {
        t == "Warning" && r == "InvalidSpec" && note.contains(mentions)
    })
    .await;
}

#[tokio::test]
async fn policies_stored_under_the_old_schema_are_reported_invalid_and_others_keep_sweeping() {
    let (client, ns) = setup("fc-old-schema").await;
    let redis = RedisServer::start();
    let mut conn = redis_conn(&redis.url()).await;
    seed(&mut conn, "ok:", 5).await;
    seed(&mut conn, "bad:", 5).await;

    // Objects the first release's schema accepted: a zero retention, a retention far past
    // what dates can hold (it used to panic the reconciler and crash-loop the operator),
    // two targets of the same name, and a retention pattern that selects every key.
    let zero = policy_json("zero", "0d", json!([redis_target("t", "bad:*")]));
    let huge = policy_json("huge", "1000000000w", json!([redis_target("t", "bad:*")]));
    let twice = policy_json(
        "twice",
        "1s",
        json!([redis_target("t", "bad:*"), redis_target("t", "bad:x:*")]),
    );
    let every = policy_json("every", "1s", json!([redis_target("t", "*:*")]));
    apply_crd(&client, &loose_policy_crd()).await;
    let mut stored = Vec::new();
    for object in [&zero, &huge, &twice, &every] {
        stored.push(create_when_accepted(&client, &ns, object).await);
    }
    // Back to this build's schema before asserting anything, so no other test sees the
    // loose one for longer than needed.
    apply_crd(&client, &policy_crd()).await;
    for (object, result) in [&zero, &huge, &twice, &every].iter().zip(stored) {
        result.unwrap_or_else(|e| {
            panic!("the old schema accepts {}: {e}", object["metadata"]["name"])
        });
    }

    // A healthy policy beside them.
    create::<RetentionPolicy>(
        &client,
        &ns,
        policy_json("healthy", "1h", json!([redis_target("t", "ok:*")])),
    )
    .await;
    redis_store(&client, &ns, "cache", &redis.url(), json!({})).await;
    let operator = TestOperator::start(&ns).await;

    let healthy = wait_sweep_completed(&client, &ns, "healthy", None).await;
    let last = healthy.status.unwrap().last_sweep.unwrap();
    assert_eq!((last.outcome, last.deleted), (SweepOutcome::Succeeded, 5));
    // Valid under the new schema, so their status says it.
    assert_invalid_spec(&client, &ns, "huge", "longer than the maximum").await;
    assert_invalid_spec(&client, &ns, "every", "allowMatchAll").await;
    // The API server refuses any status write on an object that violates the installed
    // schema (no validation ratcheting before 1.28): a Warning event says why instead.
    for (name, mentions) in [
        ("zero", "retention is zero"),
        ("twice", "target name t is used more than once"),
    ] {
        wait_event(&client, &ns, name, |(t, r, note)| {
            t == "Warning" && r == "InvalidSpec" && note.contains(mentions)
        })
        .await;
        let status = get_policy(&client, &ns, name)
            .await
            .status
            .unwrap_or_default();
        assert!(
            status.last_sweep.is_none() && status.current_sweep.is_none(),
            "{name}"
        );
    }
    // The invalid policies touched nothing: no key of theirs was given a TTL.
    for n in 0..5 {
        assert_eq!(ttl(&mut conn, &format!("bad:{n}")).await, -1, "bad:{n}");
        assert!(ttl(&mut conn, &format!("ok:{n}")).await > 0, "ok:{n}");
    }
    // Still alive: an edit that fixes a policy is picked up and it sweeps.
    patch_spec::<RetentionPolicy>(&client, &ns, "zero", json!({"retention": "2h"})).await;
    let fixed = wait_sweep_completed(&client, &ns, "zero", None).await;
    assert_eq!(
        condition(&fixed.status.unwrap().conditions, "Ready").1,
        "Valid"
    );
    // The new schema refuses a zero retention and duplicate target names by itself.
    let mut zero2 = zero.clone();
    zero2["metadata"]["name"] = json!("zero2");
    let message = refused_by_schema(&client, &ns, &zero2).await;
    assert!(message.contains("spec.retention"), "{message}");
    let mut twice2 = twice.clone();
    twice2["metadata"]["name"] = json!("twice2");
    let message = refused_by_schema(&client, &ns, &twice2).await;
    assert!(message.contains("Duplicate value"), "{message}");

    operator.stop().await;
}

#[tokio::test]
async fn subject_locators_not_bounded_by_their_identifier_are_refused_and_never_erased() {
    let (client, ns) = setup("fc-locators").await;
    let redis = RedisServer::start();
    let mut conn = redis_conn(&redis.url()).await;
    // User "4" has session:4 and session:4:a; session:42:a and session:14 are other users'.
    let mut pipe = redis::pipe();
    for key in ["session:4", "session:4:a", "session:42:a", "session:14"] {
        pipe.cmd("SET").arg(key).arg("v").ignore();
    }
    let _: () = pipe.query_async(&mut conn).await.unwrap();
    let operator = TestOperator::start(&ns).await;
    redis_store(&client, &ns, "cache", &redis.url(), json!({})).await;
    wait_store_ready(&client, &ns, "cache", true).await;

    let with_keys = |name: &str, keys: Value| {
        let mut p = policy_json(
            name,
            "30d",
            json!([{"name": "sessions", "store": "cache",
                    "redis": {"keyPattern": "session:*"},
                    "subject": {"redis": {"keys": keys}}}]),
        );
        p["spec"]["suspend"] = json!(true);
        p
    };
    for (name, keys) in [
        ("prefix", json!(["session:{userId}*"])),
        ("suffix", json!(["session:*{userId}"])),
        ("copy", json!(["session:*"])),
    ] {
        create::<RetentionPolicy>(&client, &ns, with_keys(name, keys)).await;
    }
    assert_invalid_spec(&client, &ns, "prefix", "keys[0] \"session:{userId}*\"").await;
    assert_invalid_spec(&client, &ns, "suffix", "keys[0] \"session:*{userId}\"").await;
    assert_invalid_spec(
        &client,
        &ns,
        "copy",
        "keys[0] \"session:*\" names no identifier",
    )
    .await;

    // An erasure of user 4 scoped to these policies runs none of their targets.
    create_secret(&client, &ns, "subject-4", json!({"userId": "4"})).await;
    create::<ErasureRequest>(
        &client,
        &ns,
        json!({"apiVersion": "tombstone.dev/v1alpha1", "kind": "ErasureRequest",
               "metadata": {"name": "dsr-4"},
               "spec": {"subject": {"secretRef": {"name": "subject-4"}}, "reason": "objection",
                        "policies": ["prefix", "suffix", "copy"]}}),
    )
    .await;
    let api: Api<ErasureRequest> = Api::namespaced(client.clone(), &ns);
    let request = wait_for(
        "the erasure's targets to fail",
        Duration::from_secs(60),
        || {
            let api = api.clone();
            async move {
                api.get("dsr-4").await.ok().filter(|r| {
                    r.status.as_ref().is_some_and(|s| {
                        s.targets.len() == 3
                            && s.targets
                                .iter()
                                .all(|t| t.phase == ErasureTargetPhase::Failed)
                    })
                })
            }
        },
    )
    .await;
    for t in request.status.unwrap().targets {
        assert!(
            t.message.starts_with("InvalidSpec"),
            "{}: {}",
            t.policy,
            t.message
        );
        assert!(t.message.contains("subject.redis.keys[0]"), "{}", t.message);
        assert_eq!((t.found, t.erased), (0, 0));
    }
    for key in ["session:4", "session:4:a", "session:42:a", "session:14"] {
        let exists: bool = redis::cmd("EXISTS")
            .arg(key)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(exists, "{key} must not be erased by a refused locator");
    }
    operator.stop().await;
}

#[tokio::test]
async fn every_store_kind_refuses_unbounded_locators_and_match_all_selectors_before_anything_runs()
{
    // Validation needs no store: these policies name stores that do not even exist, and are
    // refused for their spec (InvalidSpec), not for the missing store.
    let (client, ns) = setup("fc-kinds").await;
    let operator = TestOperator::start(&ns).await;
    let cases = [
        (
            "redis-glob",
            json!({"name": "t", "store": "cache", "redis": {"keyPattern": "?*"}}),
            "keyPattern \"?*\" has no literal prefix",
        ),
        (
            "s3-prefix",
            json!({"name": "t", "store": "archive", "s3": {"prefix": "logs/"},
                   "subject": {"s3": {"keyPrefixes": ["users-{userId}/"]}}}),
            "keyPrefixes[0] \"users-{userId}/\" has {userId} preceded by '-'",
        ),
        (
            "s3-records",
            json!({"name": "t", "store": "archive", "s3": {"prefix": "logs/"},
                   "subject": {"s3": {"records": {"prefix": "logs/", "field": "user", "equals": "u{userId}"}}}}),
            "records.equals \"u{userId}\"",
        ),
        (
            "loki-bare",
            json!({"name": "t", "store": "logs", "loki": {"selector": "{app=\"mailer\"}"},
                   "subject": {"loki": {"lineFilter": "{userId}"}}}),
            "uid={userId} ",
        ),
        (
            "loki-all",
            json!({"name": "t", "store": "logs", "loki": {"selector": "{app=~\".+\", env!=\"dev\"}"}}),
            "allowMatchAll",
        ),
        (
            "es-index",
            json!({"name": "t", "store": "search",
                   "elasticsearch": {"index": "*-*", "timestampField": "@timestamp"}}),
            "index \"*-*\" selects every index",
        ),
        (
            "es-hidden",
            json!({"name": "t", "store": "search",
                   "elasticsearch": {"index": ".*", "timestampField": "@timestamp"}}),
            "allowMatchAll",
        ),
        (
            "es-term",
            json!({"name": "t", "store": "search",
                   "elasticsearch": {"index": "events-*", "timestampField": "@timestamp"},
                   "subject": {"elasticsearch": {"term": {"user.id": "id-{userId}"}}}}),
            "term[user.id] \"id-{userId}\"",
        ),
    ];
    for (name, target, _) in &cases {
        create::<RetentionPolicy>(&client, &ns, policy_json(name, "30d", json!([target]))).await;
    }
    for (name, _, mentions) in &cases {
        assert_invalid_spec(&client, &ns, name, mentions).await;
    }
    operator.stop().await;
}
