//! Erasure requests fail closed: a hold that cannot be evaluated blocks, a lost digest key is
//! not silently replaced, nothing in scope is not "erased", only marked Secrets are deleted,
//! store errors and inline e-mail addresses never put an identifier in the operator's trail.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use kube::api::{Patch, PatchParams, PostParams};
use kube::Api;
use serde_json::json;

use tombstone::api::erasurerequest::{ErasurePhase, ErasureTargetPhase, SubjectSecretFate};
use tombstone::api::{ErasureRequest, ErasureRequestStatus, LegalHold};

use crate::erasure::{
    identifiers_secret, request_json, seed_subjects, shop, wait_phase, EMAIL, USER,
};
use crate::fixtures::*;
use crate::support::{wait_for, ControlPlane, RedisServer};

/// Waits until the request's status satisfies `pred`.
async fn wait_request(
    client: &kube::Client,
    ns: &str,
    name: &str,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&ErasureRequestStatus) -> bool,
) -> ErasureRequestStatus {
    let api: Api<ErasureRequest> = Api::namespaced(client.clone(), ns);
    wait_for(what, timeout, || {
        let api = api.clone();
        let pred = &pred;
        async move { api.get(name).await.ok()?.status.filter(|s| pred(s)) }
    })
    .await
}

fn complete_reason(s: &ErasureRequestStatus, reason: &str) -> bool {
    s.conditions
        .iter()
        .any(|c| c.type_ == "Complete" && c.reason == reason)
}

fn blocked_message(s: &ErasureRequestStatus) -> Option<String> {
    s.conditions
        .iter()
        .find(|c| c.type_ == "Blocked" && c.reason == "HoldUnverifiable")
        .map(|c| c.message.clone())
}

async fn put_secret(client: &kube::Client, ns: &str, secret: Secret) {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let name = secret.metadata.name.clone().unwrap_or_default();
    if api.get_opt(&name).await.unwrap().is_some() {
        api.delete(&name, &Default::default()).await.unwrap();
    }
    api.create(&PostParams::default(), &secret).await.unwrap();
}

async fn secret_exists(client: &kube::Client, ns: &str, name: &str) -> bool {
    Api::<Secret>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .unwrap()
        .is_some()
}

/// Item 6: a hold whose Secret is missing, then not text, blocks the request (reason
/// `HoldUnverifiable`, naming the hold); once it can be evaluated (another subject) the
/// request runs.
#[tokio::test]
async fn a_hold_that_cannot_be_evaluated_blocks_the_erasure() {
    let (client, ns) = setup("fc-hold-unverifiable").await;
    let redis = RedisServer::start();
    let mut conn = redis_conn(&redis.url()).await;
    seed_subjects(&mut conn).await;
    let operator = TestOperator::start(&ns).await;
    shop(&client, &ns, &redis).await;
    create::<LegalHold>(
        &client,
        &ns,
        json!({"apiVersion": "tombstone.dev/v1alpha1", "kind": "LegalHold", "metadata": {"name": "claim-77"},
               "spec": {"reason": "Pending claim", "subjects": [{"secretRef": {"name": "held-77"}}]}}),
    )
    .await;
    identifiers_secret(&client, &ns, "dsr-h").await;
    create::<ErasureRequest>(&client, &ns, request_json("dsr-h", "dsr-h", false)).await;

    let blocked = wait_phase(&client, &ns, "dsr-h", ErasurePhase::Blocked)
        .await
        .status
        .unwrap();
    let message = blocked_message(&blocked).expect("Blocked=HoldUnverifiable");
    assert!(
        message.contains("claim-77") && message.contains("held-77"),
        "{message}"
    );
    wait_event(&client, &ns, "dsr-h", |(t, r, n)| {
        t == "Warning" && r == "ErasureBlocked" && n.contains("claim-77")
    })
    .await;
    assert_eq!(
        count_keys(&mut conn, &format!("session:{USER}:*")).await,
        4,
        "nothing is erased while a hold cannot be evaluated"
    );

    // The Secret appears, but a value is not text: still unverifiable.
    let mut not_text = Secret::default();
    not_text.metadata.name = Some("held-77".into());
    not_text.data = Some([("email".to_string(), ByteString(vec![0xff, 0xfe, 0x40]))].into());
    put_secret(&client, &ns, not_text).await;
    let still = wait_request(
        &client,
        &ns,
        "dsr-h",
        "HoldUnverifiable for a value that is not text",
        Duration::from_secs(60),
        |s| blocked_message(s).is_some_and(|m| m.contains("UTF-8")),
    )
    .await;
    assert_eq!(still.phase, ErasurePhase::Blocked);
    assert_eq!(count_keys(&mut conn, &format!("session:{USER}:*")).await, 4);

    // Readable, and about someone else: the hold does not cover this subject.
    let mut other = Secret::default();
    other.metadata.name = Some("held-77".into());
    other.string_data =
        Some([("email".to_string(), "someone-else@example.org".to_string())].into());
    put_secret(&client, &ns, other).await;
    let done = wait_request(
        &client,
        &ns,
        "dsr-h",
        "the request to complete",
        Duration::from_secs(120),
        |s| s.phase == ErasurePhase::Completed,
    )
    .await;
    assert_eq!(condition(&done.conditions, "Blocked").1, "NotHeld");
    assert_eq!(count_keys(&mut conn, &format!("session:{USER}:*")).await, 0);
    operator.stop().await;
}

/// Item 6: the digest key Secret is gone while a LegalHold carries a digest made with it: no
/// new key is made, the request waits saying to restore the Secret, nothing is erased.
#[tokio::test]
async fn a_lost_digest_key_is_not_recreated_while_digests_use_it() {
    let (client, ns) = setup("fc-digest-key").await;
    let redis = RedisServer::start();
    let mut conn = redis_conn(&redis.url()).await;
    seed_subjects(&mut conn).await;
    let operator = TestOperator::start(&ns).await;
    shop(&client, &ns, &redis).await;
    // A hold made with a key that is no longer there.
    let digest = format!("hmac-sha256:{}", "ab".repeat(32));
    create::<LegalHold>(
        &client,
        &ns,
        json!({"apiVersion": "tombstone.dev/v1alpha1", "kind": "LegalHold", "metadata": {"name": "claim-9"},
               "spec": {"reason": "Pending claim", "subjects": [{"digest": digest}]}}),
    )
    .await;
    identifiers_secret(&client, &ns, "dsr-k").await;
    create::<ErasureRequest>(&client, &ns, request_json("dsr-k", "dsr-k", false)).await;
    let waiting = wait_request(
        &client,
        &ns,
        "dsr-k",
        "Complete=DigestKeyLost",
        Duration::from_secs(30),
        |s| complete_reason(s, "DigestKeyLost"),
    )
    .await;
    let (_, _, message) = condition(&waiting.conditions, "Complete");
    assert!(
        message.contains("claim-9") && message.contains("restore"),
        "{message}"
    );
    assert_eq!(waiting.phase, ErasurePhase::Pending);
    assert!(waiting.subject_digest.is_none());
    wait_event(&client, &ns, "dsr-k", |(t, r, _)| {
        t == "Warning" && r == "DigestKeyLost"
    })
    .await;
    assert!(
        !secret_exists(&client, &ns, tombstone::audit::DIGEST_KEY_SECRET).await,
        "no new key is made"
    );
    assert_eq!(count_keys(&mut conn, &format!("session:{USER}:*")).await, 4);

    // The Secret is restored (here: a key is put back by hand): the request goes on.
    tombstone::audit::load_or_create_key(&client, &ns)
        .await
        .unwrap();
    let done = wait_request(
        &client,
        &ns,
        "dsr-k",
        "the request to complete",
        Duration::from_secs(120),
        |s| s.phase == ErasurePhase::Completed,
    )
    .await;
    assert_eq!(done.totals.unwrap().erased, 5);
    operator.stop().await;
}

/// A key created while the operator checks whether one was lost (by another replica, or by a
/// request reconciled at the same moment) is used, not taken for lost: the digest users it
/// finds were made with that key. The moment is made certain here: the operator's client
/// creates the key just before its list of the requests that carry digests.
#[tokio::test]
async fn a_digest_key_created_during_the_lost_key_check_is_used() {
    let (client, ns) = setup("fc-key-race").await;
    let redis = RedisServer::start();
    let mut conn = redis_conn(&redis.url()).await;
    seed_subjects(&mut conn).await;
    // A digest user, as made with the key about to be created.
    let digest = format!("hmac-sha256:{}", "cd".repeat(32));
    create::<LegalHold>(
        &client,
        &ns,
        json!({"apiVersion": "tombstone.dev/v1alpha1", "kind": "LegalHold", "metadata": {"name": "claim-7"},
               "spec": {"reason": "Pending claim", "subjects": [{"digest": digest}]}}),
    )
    .await;
    let created = Arc::new(Mutex::new(None));
    let racing = {
        let (created, ns) = (created.clone(), ns.clone());
        let requests_path = format!("/apis/tombstone.dev/v1alpha1/namespaces/{ns}/erasurerequests");
        let layer =
            tower::util::MapRequestLayer::new(move |request: http::Request<kube::client::Body>| {
                let query = request.uri().query().unwrap_or("");
                // The check's list: unpaged (a watch's lists come in pages) and not a watch.
                let checks_users = request.method() == http::Method::GET
                    && request.uri().path() == requests_path
                    && !query.contains("watch")
                    && !query.contains("limit");
                let mut created = created.lock().unwrap_or_else(|p| p.into_inner());
                if checks_users && created.is_none() {
                    // Its own thread and runtime: this one waits on the request being sent.
                    let ns = ns.clone();
                    let key = std::thread::spawn(move || {
                        let runtime = tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                            .expect("a runtime");
                        runtime.block_on(async move {
                            let other = kube::Client::try_from(ControlPlane::get().config())
                                .expect("a client");
                            tombstone::audit::load_or_create_key(&other, &ns).await
                        })
                    })
                    .join()
                    .expect("the key thread ends")
                    .expect("the key is created");
                    *created = Some(key);
                }
                request
            });
        kube::client::ClientBuilder::try_from(ControlPlane::get().config())
            .expect("client builder")
            .with_layer(&layer)
            .build()
    };
    let operator = TestOperator::start_with_client(racing, &ns, None, None, fast_settings()).await;
    shop(&client, &ns, &redis).await;
    identifiers_secret(&client, &ns, "dsr-race").await;
    create::<ErasureRequest>(&client, &ns, request_json("dsr-race", "dsr-race", false)).await;
    let done = wait_request(
        &client,
        &ns,
        "dsr-race",
        "the request to complete",
        Duration::from_secs(60),
        |s| s.phase == ErasurePhase::Completed || complete_reason(s, "DigestKeyLost"),
    )
    .await;
    let (_, reason, message) = condition(&done.conditions, "Complete");
    assert_eq!(done.phase, ErasurePhase::Completed, "{reason}: {message}");
    let key = created
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .expect("the key was created during the check");
    let ids = [
        ("email".to_string(), EMAIL.to_string()),
        ("userId".to_string(), USER.to_string()),
    ]
    .into();
    assert_eq!(
        done.subject_digest.as_deref(),
        Some(tombstone::audit::subject_digest(&key, &ids).as_str()),
        "the digest is made with the key created during the check"
    );
    assert_eq!(done.totals.unwrap_or_default().erased, 5);
    operator.stop().await;
}

/// Item 9: an empty scope, a scope of missing policies, and a subject no locator can use end
/// Failed (never Completed), keep their Secret, and say what the locators need.
#[tokio::test]
async fn a_request_with_nothing_in_scope_fails_and_keeps_its_secret() {
    let (client, ns) = setup("fc-nothing").await;
    let redis = RedisServer::start();
    let mut conn = redis_conn(&redis.url()).await;
    seed_subjects(&mut conn).await;
    let operator = TestOperator::start(&ns).await;
    shop(&client, &ns, &redis).await;

    // `policies: []`: nothing in scope.
    identifiers_secret(&client, &ns, "dsr-empty").await;
    let mut empty = request_json("dsr-empty", "dsr-empty", false);
    empty["spec"]["policies"] = json!([]);
    create::<ErasureRequest>(&client, &ns, empty).await;
    // Only policies that do not exist.
    identifiers_secret(&client, &ns, "dsr-missing").await;
    let mut missing = request_json("dsr-missing", "dsr-missing", false);
    missing["spec"]["policies"] = json!(["no-such-policy"]);
    create::<ErasureRequest>(&client, &ns, missing).await;
    // One named policy exists, one does not: nothing is erased rather than part of it.
    identifiers_secret(&client, &ns, "dsr-partial").await;
    let mut partial = request_json("dsr-partial", "dsr-partial", false);
    partial["spec"]["policies"] = json!(["sessions", "no-such-policy"]);
    create::<ErasureRequest>(&client, &ns, partial).await;
    // Identifiers of a type no locator uses.
    create_subject_secret(&client, &ns, "dsr-phone", json!({"phone": "+15550100"})).await;
    create::<ErasureRequest>(&client, &ns, request_json("dsr-phone", "dsr-phone", false)).await;

    for (name, reason) in [
        ("dsr-empty", "NothingInScope"),
        ("dsr-missing", "NothingInScope"),
        ("dsr-partial", "PolicyNotFound"),
        ("dsr-phone", "NoApplicableLocator"),
    ] {
        let failed = wait_phase(&client, &ns, name, ErasurePhase::Failed)
            .await
            .status
            .unwrap();
        let (_, got, message) = condition(&failed.conditions, "Complete");
        assert_eq!(got, reason, "{name}: {message}");
        assert!(failed.receipt.is_none(), "{name}: no receipt of an erasure");
        assert_eq!(failed.totals.unwrap_or_default().erased, 0);
        if name == "dsr-phone" {
            assert!(
                message.contains("{userId}") && message.contains("{email}"),
                "says which identifier types are needed: {message}"
            );
        }
        if name == "dsr-missing" || name == "dsr-partial" {
            assert!(message.contains("no-such-policy"), "{message}");
        }
        wait_event(&client, &ns, name, |(t, r, _)| {
            t == "Warning" && r == "ErasureFailed"
        })
        .await;
        assert!(
            secret_exists(&client, &ns, name).await,
            "{name}: the Secret is kept"
        );
    }
    assert_eq!(
        count_keys(&mut conn, &format!("session:{USER}:*")).await,
        4,
        "none of these requests erased anything"
    );
    operator.stop().await;
}

/// Item 12: an unlabelled Secret (it may be anything: a password) is kept after a real
/// erasure, and the request says so; a labelled one is deleted.
#[tokio::test]
async fn only_a_secret_labelled_as_identifiers_is_deleted() {
    let (client, ns) = setup("fc-secret").await;
    let redis = RedisServer::start();
    let mut conn = redis_conn(&redis.url()).await;
    seed_subjects(&mut conn).await;
    let operator = TestOperator::start(&ns).await;
    shop(&client, &ns, &redis).await;
    create_secret(
        &client,
        &ns,
        "app-config",
        json!({"email": EMAIL, "userId": USER, "password": "hunter2"}),
    )
    .await;
    create::<ErasureRequest>(&client, &ns, request_json("dsr-u", "app-config", false)).await;
    let done = wait_phase(&client, &ns, "dsr-u", ErasurePhase::Completed)
        .await
        .status
        .unwrap();
    assert_eq!(
        done.totals.as_ref().unwrap().erased,
        5,
        "a real erasure ran"
    );
    assert_eq!(done.subject_secret, Some(SubjectSecretFate::KeptUnmarked));
    let (_, _, message) = condition(&done.conditions, "Complete");
    assert!(
        message.contains("app-config") && message.contains("tombstone.dev/subject-identifiers"),
        "{message}"
    );
    wait_event(&client, &ns, "dsr-u", |(_, r, n)| {
        r == "SubjectSecretKept" && n.contains("app-config")
    })
    .await;
    assert!(
        secret_exists(&client, &ns, "app-config").await,
        "an unlabelled Secret is never deleted"
    );
    let record = logged_audit_record(done.receipt.as_deref().unwrap());
    assert_eq!(record["subjectSecret"], json!("KeptUnmarked"));
    assert_eq!(record["queryTextRetainedBy"], json!([]));

    // The same subject again, from a labelled Secret: deleted once erased.
    seed_subjects(&mut conn).await;
    identifiers_secret(&client, &ns, "dsr-l").await;
    create::<ErasureRequest>(&client, &ns, request_json("dsr-l", "dsr-l", false)).await;
    let done = wait_phase(&client, &ns, "dsr-l", ErasurePhase::Completed)
        .await
        .status
        .unwrap();
    assert_eq!(done.subject_secret, Some(SubjectSecretFate::Deleted));
    wait_for("the labelled Secret to go", Duration::from_secs(20), || {
        let client = client.clone();
        let ns = ns.clone();
        async move { (!secret_exists(&client, &ns, "dsr-l").await).then_some(()) }
    })
    .await;
    operator.stop().await;
}

/// Item 15: a Redis error that echoes its arguments (an unknown command repeats them, the
/// e-mail address among them) reaches status, events and logs only as its kind.
#[tokio::test]
async fn a_store_error_echoing_the_identifier_is_reduced_to_its_kind() {
    const PROBE: &str = "fc-probe-4be1d@example.org";
    let (client, ns) = setup("fc-store-error").await;
    // SISMEMBER is unknown to this server: its error repeats the command's arguments.
    let redis = RedisServer::start_with_args(&["--rename-command", "SISMEMBER", ""]);
    let mut conn = redis_conn(&redis.url()).await;
    let _: () = redis::cmd("SADD")
        .arg("newsletter")
        .arg(PROBE)
        .query_async(&mut conn)
        .await
        .unwrap();
    let echo: redis::RedisResult<u64> = redis::cmd("SISMEMBER")
        .arg("newsletter")
        .arg(PROBE)
        .query_async(&mut conn)
        .await;
    assert!(
        echo.as_ref()
            .is_err_and(|e| e.to_string().contains("fc-probe-4be1d")),
        "the store's error echoes the identifier: {echo:?}"
    );
    let operator = TestOperator::start(&ns).await;
    shop(&client, &ns, &redis).await;
    create_subject_secret(
        &client,
        &ns,
        "dsr-e",
        json!({"email": PROBE, "userId": "u-fc-5521"}),
    )
    .await;
    create::<ErasureRequest>(&client, &ns, request_json("dsr-e", "dsr-e", false)).await;
    let failing = wait_request(
        &client,
        &ns,
        "dsr-e",
        "a failed target",
        Duration::from_secs(60),
        |s| {
            s.targets
                .iter()
                .any(|t| t.phase == ErasureTargetPhase::Failed)
        },
    )
    .await;
    let target = &failing.targets[0];
    assert!(
        target.message.starts_with("StoreError: "),
        "{}",
        target.message
    );
    assert_ne!(failing.phase, ErasurePhase::Completed);
    // The failure was logged (a positive sign that the log path ran), without the identifier.
    wait_for(
        "the failure to be logged",
        Duration::from_secs(20),
        || async {
            captured_logs()
                .iter()
                .any(|l| {
                    l.fields
                        .get("reason")
                        .is_some_and(|r| r.contains("StoreError"))
                        && l.fields.contains_key("target")
                })
                .then_some(())
        },
    )
    .await;
    let trail = format!(
        "{}\n{:?}\n{:?}\n{}",
        serde_json::to_string(&failing).unwrap(),
        events_for(&client, &ns, "dsr-e").await,
        captured_logs(),
        operator.running.metrics.render()
    );
    for probe in [PROBE, "fc-probe-4be1d", "u-fc-5521"] {
        assert!(!trail.contains(probe), "{probe} leaked into the trail");
    }
    operator.stop().await;
}

/// Item 16: an e-mail address inline (a value with `@`, or a type named email) is refused
/// without being echoed; a pseudonymous inline id is accepted.
#[tokio::test]
async fn an_inline_email_address_is_refused_without_being_echoed() {
    const PROBE: &str = "fc-inline-77ac";
    let (client, ns) = setup("fc-inline").await;
    let redis = RedisServer::start();
    let mut conn = redis_conn(&redis.url()).await;
    seed_subjects(&mut conn).await;
    let operator = TestOperator::start(&ns).await;
    shop(&client, &ns, &redis).await;
    let inline = |name: &str, ids: serde_json::Value| {
        json!({
            "apiVersion": "tombstone.dev/v1alpha1", "kind": "ErasureRequest", "metadata": {"name": name},
            "spec": {"subject": {"identifiers": ids}, "reason": "objection"}
        })
    };
    create::<ErasureRequest>(
        &client,
        &ns,
        inline("dsr-at", json!({"contact": format!("{PROBE}@example.org")})),
    )
    .await;
    create::<ErasureRequest>(&client, &ns, inline("dsr-type", json!({"email": PROBE}))).await;
    for name in ["dsr-at", "dsr-type"] {
        let failed = wait_phase(&client, &ns, name, ErasurePhase::Failed)
            .await
            .status
            .unwrap();
        let (_, reason, message) = condition(&failed.conditions, "Complete");
        assert_eq!(reason, "InvalidSpec", "{message}");
        assert!(message.contains("Secret"), "{message}");
        assert_eq!(count_keys(&mut conn, &format!("session:{USER}:*")).await, 4);
        wait_event(&client, &ns, name, |(t, r, _)| {
            t == "Warning" && r == "InvalidSpec"
        })
        .await;
        let trail = format!(
            "{}\n{:?}",
            serde_json::to_string(&failed).unwrap(),
            events_for(&client, &ns, name).await
        );
        assert!(!trail.contains(PROBE), "{name}: the value is echoed");
    }
    // Fixed in place (the e-mail moved out): the request starts.
    Api::<ErasureRequest>::namespaced(client.clone(), &ns)
        .patch(
            "dsr-type",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"spec": {"subject": {"identifiers": {"email": null, "userId": USER}}}}),
            ),
        )
        .await
        .unwrap();
    let done = wait_phase(&client, &ns, "dsr-type", ErasurePhase::Completed)
        .await
        .status
        .unwrap();
    assert_eq!(done.totals.unwrap().erased, 4, "the pseudonymous id ran");
    operator.stop().await;
}

/// Item 11: a version under S3 Object Lock that the policy declares kept under Art. 17(3)(e)
/// settles the request as `CompletedWithExceptions` (not Overdue, Secret kept, receipt says
/// so, no keys), and the erasure is re-applied when the lock lapses. Without a declared
/// ground the same lock keeps the request open and Overdue.
#[tokio::test]
async fn copies_kept_by_law_under_object_lock_settle_the_request_until_the_lock_lapses() {
    use crate::support::s3::{S3Server, ACCESS_KEY_ID, SECRET_ACCESS_KEY};
    use aws_sdk_s3::primitives::ByteStream;
    use aws_sdk_s3::types::{ChecksumAlgorithm, ObjectLockMode};
    use tombstone::api::RetentionPolicy;

    let (client, ns) = setup("fc-retained").await;
    let server = S3Server::start();
    server.create_bucket("archive", true, true).await;
    let until = chrono::Utc::now().timestamp() + 40;
    for user in ["u-fc-11", "u-fc-12"] {
        server
            .client()
            .put_object()
            .bucket("archive")
            .key(format!("users/{user}/invoice.json"))
            .body(ByteStream::from_static(b"{}"))
            .checksum_algorithm(ChecksumAlgorithm::Crc32)
            .object_lock_mode(ObjectLockMode::Governance)
            .object_lock_retain_until_date(aws_sdk_s3::primitives::DateTime::from_secs(until))
            .send()
            .await
            .unwrap();
        server
            .put("archive", &format!("users/{user}/profile.json"), "{}")
            .await;
    }
    server
        .put("archive", "users/u-other/profile.json", "{}")
        .await;

    let operator = TestOperator::start(&ns).await;
    create_credentials_secret(
        &client,
        &ns,
        "archive-creds",
        json!({"accessKeyId": ACCESS_KEY_ID, "secretAccessKey": SECRET_ACCESS_KEY}),
    )
    .await;
    crate::s3::s3_store(&client, &ns, "archive", "archive", &server.endpoint()).await;
    let billing = |name: &str, retained: Option<serde_json::Value>| {
        let mut subject = json!({"keyPrefixes": ["users/{userId}/"]});
        if let Some(r) = retained {
            subject["retainedCopies"] = r;
        }
        let mut p = policy_json(
            name,
            "30d",
            json!([{"name": "invoices", "store": "archive", "s3": {"prefix": "users/"},
                    "subject": {"s3": subject}}]),
        );
        p["spec"]["suspend"] = json!(true);
        p
    };
    create::<RetentionPolicy>(
        &client,
        &ns,
        billing(
            "billing",
            Some(json!({"ground": "legalClaims", "description": "invoices kept for tax claims"})),
        ),
    )
    .await;
    create::<RetentionPolicy>(&client, &ns, billing("billing-nolaw", None)).await;
    let request = |name: &str, policy: &str| {
        let mut r = request_json(name, name, false);
        r["spec"]["policies"] = json!([policy]);
        // Received long ago: past its deadline.
        r["spec"]["receivedAt"] = json!("2026-09-01T00:00:00Z");
        r
    };
    create_subject_secret(&client, &ns, "dsr-r", json!({"userId": "u-fc-11"})).await;
    create::<ErasureRequest>(&client, &ns, request("dsr-r", "billing")).await;
    create_subject_secret(&client, &ns, "dsr-n", json!({"userId": "u-fc-12"})).await;
    create::<ErasureRequest>(&client, &ns, request("dsr-n", "billing-nolaw")).await;

    let settled = wait_phase(&client, &ns, "dsr-r", ErasurePhase::CompletedWithExceptions)
        .await
        .status
        .unwrap();
    let target = &settled.targets[0];
    assert_eq!(target.phase, ErasureTargetPhase::Retained);
    let retained = target.retained.as_ref().expect("retained copies reported");
    let until_ts = chrono::DateTime::from_timestamp(until, 0).unwrap();
    assert_eq!(
        (
            retained.count,
            retained.ground,
            retained.earliest_retain_until.map(|t| t.0),
            retained.latest_retain_until.map(|t| t.0),
        ),
        (
            1,
            tombstone::api::retentionpolicy::RetentionException::LegalClaims,
            Some(until_ts),
            Some(until_ts)
        )
    );
    assert_eq!(settled.totals.as_ref().unwrap().retained, 1);
    assert_eq!(
        settled.subject_secret,
        Some(SubjectSecretFate::KeptForRetainedCopies)
    );
    let (status, reason, message) = condition(&settled.conditions, "Complete");
    assert_eq!(
        (status, reason.as_str()),
        (
            tombstone::api::ConditionStatus::True,
            "CompletedWithExceptions"
        )
    );
    assert!(message.contains("Art. 17(3)(e)"), "{message}");
    assert_eq!(
        condition(&settled.conditions, "Overdue").0,
        tombstone::api::ConditionStatus::False,
        "a request settled under an exception is not overdue"
    );
    let record = logged_audit_record(settled.receipt.as_deref().unwrap());
    assert_eq!(
        record["targets"][0]["retained"]["ground"],
        json!("legalClaims")
    );
    let trail = format!(
        "{}\n{:?}\n{record}",
        serde_json::to_string(&settled).unwrap(),
        events_for(&client, &ns, "dsr-r").await
    );
    assert!(!trail.contains("invoice.json"), "no keys: {trail}");
    wait_event(&client, &ns, "dsr-r", |(_, r, _)| {
        r == "ErasureCompletedWithExceptions"
    })
    .await;
    assert!(secret_exists(&client, &ns, "dsr-r").await);
    let left: Vec<String> = server
        .versions("archive", "users/u-fc-11/")
        .await
        .into_iter()
        .map(|(k, _, _)| k)
        .collect();
    assert_eq!(left, vec!["users/u-fc-11/invoice.json".to_string()]);

    // Without a declared ground: not an exception; open, failing target, overdue.
    let open = wait_request(
        &client,
        &ns,
        "dsr-n",
        "Overdue on the request without a ground",
        Duration::from_secs(60),
        |s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == "Overdue" && c.reason == "PastDeadline")
                && s.targets
                    .iter()
                    .any(|t| t.phase == ErasureTargetPhase::Failed)
        },
    )
    .await;
    assert_eq!(open.phase, ErasurePhase::Erasing);
    assert!(
        open.targets[0].message.contains("retainedCopies"),
        "{}",
        open.targets[0].message
    );

    // The lock lapses: the erasure is re-applied by itself and the request completes.
    let done = wait_request(
        &client,
        &ns,
        "dsr-r",
        "the request to complete once the lock lapsed",
        Duration::from_secs(120),
        |s| s.phase == ErasurePhase::Completed,
    )
    .await;
    assert_eq!(done.targets[0].phase, ErasureTargetPhase::Verified);
    assert!(server
        .versions("archive", "users/u-fc-11/")
        .await
        .is_empty());
    assert_eq!(server.versions("archive", "users/u-other/").await.len(), 1);
    wait_for("the Secret to go", Duration::from_secs(20), || {
        let client = client.clone();
        let ns = ns.clone();
        async move { (!secret_exists(&client, &ns, "dsr-r").await).then_some(()) }
    })
    .await;
    operator.stop().await;
}
