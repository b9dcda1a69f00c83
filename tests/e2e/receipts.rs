//! Durable, chained receipts: every sweep and erasure receipt also written to an S3 sink
//! (moto), one object per receipt, chained per stream; Object Lock retention where the
//! bucket has it; a sink that is down keeps receipts pending in status until it is back.

use std::time::Duration;

use kube::api::{Api, Patch, PatchParams};
use kube::ResourceExt;
use serde_json::json;

use tombstone::api::erasurerequest::ErasurePhase;
use tombstone::api::{ErasureRequest, RetentionPolicy};
use tombstone::audit::chain::{self, Head, Stored, StreamKind};
use tombstone::audit::sink::{LockMode, Sink, SinkSettings};
use tombstone::controller::Settings;

use crate::erasure::wait_phase;
use crate::fixtures::*;
use crate::s3::s3_store;
use crate::support::s3::{S3Server, ACCESS_KEY_ID, SECRET_ACCESS_KEY};
use crate::support::RedisServer;

/// Identifiers no other test uses: none may reach the sink.
const PROBE_EMAIL: &str = "receipt-probe-5c1e9d@example.org";
const PROBE_USER: &str = "rcpt-probe-8a2f";
const PREFIX: &str = "audit/";

fn sink_settings(ns: &str, lock_mode: LockMode) -> SinkSettings {
    SinkSettings {
        datastore: "sink".into(),
        namespace: ns.into(),
        bucket: None,
        prefix: PREFIX.into(),
        lock_mode,
        lock_period: Duration::from_secs(86_400),
        allow_ambient_credentials: false,
    }
}

/// The sink's DataStore (bucket `receipts` at `endpoint`) and its credentials.
async fn sink_store(client: &kube::Client, ns: &str, endpoint: &str) {
    create_credentials_secret(
        client,
        ns,
        "sink-creds",
        json!({"accessKeyId": ACCESS_KEY_ID, "secretAccessKey": SECRET_ACCESS_KEY}),
    )
    .await;
    s3_store(client, ns, "sink", "receipts", endpoint).await;
}

async fn start_with_sink(ns: &str, lock_mode: LockMode, ttl: Option<Duration>) -> TestOperator {
    let mut settings = Settings {
        receipt_sink: Some(sink_settings(ns, lock_mode)),
        ..fast_settings()
    };
    if let Some(ttl) = ttl {
        settings.completed_request_ttl = ttl;
    }
    TestOperator::start_with(ns, None, None, settings).await
}

/// A policy on Redis that sweeps every second (and finds nothing old enough to delete), with
/// a subject locator.
async fn sweeping_policy(client: &kube::Client, ns: &str, redis: &RedisServer) {
    redis_store(client, ns, "cache", &redis.url(), json!({})).await;
    let mut p = policy_json(
        "sessions",
        "30d",
        json!([{
            "name": "sessions", "store": "cache",
            "redis": {"keyPattern": "session:*"},
            "subject": {"redis": {"keys": ["session:{userId}:*"]}}
        }]),
    );
    p["spec"]["schedule"] = json!({"every": "1s"});
    create::<RetentionPolicy>(client, ns, p).await;
}

/// Waits until the policy's chain has at least `n` receipts, all of them in the sink.
async fn wait_policy_receipts(client: &kube::Client, ns: &str, n: u64) -> RetentionPolicy {
    wait_policy(
        client,
        ns,
        "sessions",
        &format!("{n} sweep receipts in the sink"),
        Duration::from_secs(90),
        |p| {
            p.status
                .as_ref()
                .and_then(|s| s.receipts.as_ref())
                .is_some_and(|r| r.sequence >= n && r.pending_upload.is_empty())
        },
    )
    .await
}

/// Suspends the policy and waits until it has no sweep under way and nothing pending: its
/// chain no longer moves.
async fn suspend(client: &kube::Client, ns: &str) -> RetentionPolicy {
    patch_spec::<RetentionPolicy>(client, ns, "sessions", json!({"suspend": true})).await;
    wait_policy(
        client,
        ns,
        "sessions",
        "the suspended policy at rest",
        Duration::from_secs(60),
        |p| {
            p.status.as_ref().is_some_and(|s| {
                s.observed_generation == p.metadata.generation
                    && s.current_sweep.is_none()
                    && s.receipts
                        .as_ref()
                        .is_some_and(|r| r.pending_upload.is_empty())
            })
        },
    )
    .await
}

async fn erase_probe(client: &kube::Client, ns: &str, redis: &RedisServer, name: &str) {
    let mut conn = redis_conn(&redis.url()).await;
    let _: () = redis::cmd("SET")
        .arg(format!("session:{PROBE_USER}:1"))
        .arg("t")
        .query_async(&mut conn)
        .await
        .unwrap();
    create_subject_secret(
        client,
        ns,
        name,
        json!({"email": PROBE_EMAIL, "userId": PROBE_USER}),
    )
    .await;
    request_erasure(client, ns, name, name).await;
}

fn test_sink(server: &S3Server) -> Sink {
    Sink::new(
        server.client(),
        "receipts".into(),
        PREFIX.into(),
        LockMode::Governance,
        Duration::from_secs(60),
    )
}

#[tokio::test]
async fn receipts_land_in_the_sink_as_one_locked_object_each_chained_per_stream_without_identifiers(
) {
    let (client, ns) = setup("rcpt-chain").await;
    let server = S3Server::start();
    server.create_bucket("receipts", true, true).await;
    let redis = RedisServer::start();
    let operator = start_with_sink(&ns, LockMode::Compliance, None).await;
    sink_store(&client, &ns, &server.endpoint()).await;
    sweeping_policy(&client, &ns, &redis).await;
    wait_policy_receipts(&client, &ns, 3).await;
    let policy = suspend(&client, &ns).await;
    erase_probe(&client, &ns, &redis, "dsr-probe").await;
    let done = wait_phase(&client, &ns, "dsr-probe", ErasurePhase::Completed).await;
    let api: Api<ErasureRequest> = Api::namespaced(client.clone(), &ns);
    let request = wait_for_request(&api, "dsr-probe", |s| {
        s.receipts
            .as_ref()
            .is_some_and(|r| r.pending_upload.is_empty())
    })
    .await;
    let status = request.status.clone().unwrap();
    let head = status.receipts.clone().unwrap();
    assert_eq!(head.sequence, 1);
    assert_eq!(status.receipt.as_deref(), Some(head.digest.as_str()));
    assert_eq!(done.metadata.uid, request.metadata.uid);

    // One object per receipt, keyed by stream and sequence; the request's is what was logged.
    let keys = server.keys("receipts", PREFIX).await;
    let policy_uid = policy.metadata.uid.clone().unwrap();
    let request_uid = request.metadata.uid.clone().unwrap();
    let policy_keys: Vec<&String> = keys.iter().filter(|k| k.contains(&policy_uid)).collect();
    let policy_head = policy.status.unwrap().receipts.unwrap();
    assert_eq!(policy_keys.len() as u64, policy_head.sequence, "{keys:?}");
    let request_key = format!("{PREFIX}requests/{ns}/dsr-probe/{request_uid}/000000000001.json");
    assert!(keys.contains(&request_key), "{keys:?}");
    let body = String::from_utf8(server.get("receipts", &request_key).await).unwrap();
    let logged = logged_audit_record(&head.digest);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap(),
        logged
    );
    assert_eq!(logged["kind"], "ErasureReceipt");
    assert_eq!(logged["subjectDigest"], json!(status.subject_digest));

    // Object Lock: every receipt carries a retention in the configured mode.
    let head_object = server
        .client()
        .head_object()
        .bucket("receipts")
        .key(&request_key)
        .send()
        .await
        .expect("HeadObject");
    assert_eq!(
        head_object.object_lock_mode().map(|m| m.as_str()),
        Some("COMPLIANCE"),
        "{head_object:?}"
    );
    let until = head_object
        .object_lock_retain_until_date()
        .expect("a retain-until date");
    assert!(
        until.secs() > chrono::Utc::now().timestamp() + 3600,
        "{head_object:?}"
    );

    // No identifier reaches the sink.
    for key in &keys {
        let body = String::from_utf8(server.get("receipts", key).await).unwrap();
        for probe in [PROBE_EMAIL, PROBE_USER] {
            assert!(!body.contains(probe), "{key} holds an identifier: {body}");
            assert!(!key.contains(probe), "{key} names an identifier");
        }
    }

    // Every chain is unbroken and its head is the one status keeps.
    let sink = test_sink(&server);
    let reports = tombstone::audit::sink::verify(&sink, Some(&client), None)
        .await
        .expect("verify");
    assert_eq!(reports.len(), 2, "{reports:?}");
    for r in &reports {
        assert!(r.intact(), "{}", chain::table(&reports));
        assert_eq!(r.head, "Status");
    }
    let policy_report = reports
        .iter()
        .find(|r| r.stream.kind == StreamKind::Policy)
        .unwrap();
    assert!(policy_report.last >= 3);
    operator.stop().await;
}

async fn wait_for_request(
    api: &Api<ErasureRequest>,
    name: &str,
    pred: impl Fn(&tombstone::api::ErasureRequestStatus) -> bool,
) -> ErasureRequest {
    crate::support::wait_for(name, Duration::from_secs(60), || async {
        api.get(name)
            .await
            .ok()
            .filter(|r| r.status.as_ref().is_some_and(&pred))
    })
    .await
}

#[tokio::test]
async fn a_sink_that_is_down_keeps_the_receipt_pending_and_takes_it_when_back() {
    let (client, ns) = setup("rcpt-down").await;
    let server = S3Server::start();
    server.create_bucket("receipts", false, false).await;
    let redis = RedisServer::start();
    let operator = start_with_sink(&ns, LockMode::Governance, None).await;
    // The sink's endpoint: a port nothing listens on.
    let closed = format!("http://127.0.0.1:{}", {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    });
    sink_store(&client, &ns, &closed).await;
    let mut p = policy_json(
        "sessions",
        "30d",
        json!([{"name": "sessions", "store": "cache", "redis": {"keyPattern": "session:*"}}]),
    );
    p["spec"]["schedule"] = json!({"every": "1h"});
    redis_store(&client, &ns, "cache", &redis.url(), json!({})).await;
    create::<RetentionPolicy>(&client, &ns, p).await;

    let pending = wait_policy(
        &client,
        &ns,
        "sessions",
        "a receipt pending upload",
        Duration::from_secs(60),
        |p| {
            p.status
                .as_ref()
                .and_then(|s| s.receipts.as_ref())
                .is_some_and(|r| r.pending_upload.len() == 1)
        },
    )
    .await;
    wait_event(&client, &ns, "sessions", |(t, reason, _)| {
        t == "Warning" && reason == "ReceiptUploadFailed"
    })
    .await;
    wait_metric(
        &operator.running.metrics,
        "tombstone_receipt_upload_failures_total{reason=\"Unreachable\"}",
    )
    .await;
    wait_metric(
        &operator.running.metrics,
        "tombstone_receipts_pending_upload 1",
    )
    .await;
    let head = pending.status.unwrap().receipts.unwrap();
    assert!(server.keys("receipts", "").await.is_empty());

    // The sink comes back (here: its DataStore is pointed at it).
    Api::<tombstone::api::DataStore>::namespaced(client.clone(), &ns)
        .patch(
            "sink",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"s3": {"endpoint": server.endpoint()}}})),
        )
        .await
        .expect("patch the sink");
    let uploaded = wait_policy(
        &client,
        &ns,
        "sessions",
        "the pending receipt uploaded",
        Duration::from_secs(120),
        |p| {
            p.status
                .as_ref()
                .and_then(|s| s.receipts.as_ref())
                .is_some_and(|r| r.pending_upload.is_empty())
        },
    )
    .await;
    let after = uploaded.status.unwrap().receipts.unwrap();
    assert_eq!(
        (after.sequence, &after.digest),
        (head.sequence, &head.digest)
    );
    let keys = server.keys("receipts", PREFIX).await;
    assert_eq!(keys, vec![head.pending_upload[0].key.clone()]);
    let body = String::from_utf8(server.get("receipts", &keys[0]).await).unwrap();
    assert_eq!(
        body, head.pending_upload[0].body,
        "uploaded as it was logged"
    );
    let stream =
        tombstone::audit::receipt::policy_stream(&get_policy(&client, &ns, "sessions").await);
    let report = chain::verify_stream(
        &stream,
        &[Stored { sequence: 1, body }],
        &Head::Status(Some(after)),
    );
    assert!(report.intact(), "{report:?}");
    operator.stop().await;
}

/// `tombstone receipts verify` against the test API server and the sink; (exit code, output).
fn verify_cli(ns: &str, extra: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tombstone"))
        .args([
            "receipts",
            "verify",
            "--namespace",
            ns,
            "--receipt-sink-datastore",
            "sink",
            "--receipt-sink-prefix",
            PREFIX,
        ])
        .args(extra)
        .env(
            "KUBECONFIG",
            crate::support::ControlPlane::get().kubeconfig_path(),
        )
        .env_remove("POD_NAMESPACE")
        .env_remove("RECEIPT_SINK_DATASTORE")
        .output()
        .expect("tombstone runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

#[tokio::test]
async fn receipts_verify_passes_then_detects_an_edited_a_deleted_middle_and_a_deleted_last_receipt()
{
    let (client, ns) = setup("rcpt-verify").await;
    let server = S3Server::start();
    // No Object Lock here: the test plays the one who alters the sink.
    server.create_bucket("receipts", false, false).await;
    let redis = RedisServer::start();
    let operator = start_with_sink(&ns, LockMode::Governance, None).await;
    sink_store(&client, &ns, &server.endpoint()).await;
    sweeping_policy(&client, &ns, &redis).await;
    wait_policy_receipts(&client, &ns, 4).await;
    let policy = suspend(&client, &ns).await;
    erase_probe(&client, &ns, &redis, "dsr-verify").await;
    wait_phase(&client, &ns, "dsr-verify", ErasurePhase::Completed).await;
    let api: Api<ErasureRequest> = Api::namespaced(client.clone(), &ns);
    wait_for_request(&api, "dsr-verify", |s| {
        s.receipts
            .as_ref()
            .is_some_and(|r| r.pending_upload.is_empty())
    })
    .await;
    operator.stop().await;

    let (code, out) = verify_cli(&ns, &[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("2 chains verified"), "{out}");

    // The proof of the request, as the plugin prints it.
    let sink = test_sink(&server);
    let proof = tombstone::audit::proof::proof(client.clone(), &sink, &ns, "dsr-verify")
        .await
        .expect("proof");
    assert!(proof.verified(), "{proof}");
    let summary = proof.to_string();
    let digest = api.get("dsr-verify").await.unwrap().status.unwrap();
    assert!(summary.contains("Result: VERIFIED"), "{summary}");
    assert!(
        summary.contains(digest.subject_digest.as_deref().unwrap()),
        "{summary}"
    );
    assert!(
        summary.contains(digest.receipt.as_deref().unwrap()),
        "{summary}"
    );
    assert!(!summary.contains(PROBE_EMAIL) && !summary.contains(PROBE_USER));
    // The same proof from `kubectl tombstone proof`, as an auditor would ask for it.
    let plugin = crate::plugin::Plugin::install();
    let proof_args = [
        "proof",
        "dsr-verify",
        "-n",
        ns.as_str(),
        "--operator-namespace",
        ns.as_str(),
        "--receipt-sink-datastore",
        "sink",
        "--receipt-sink-prefix",
        PREFIX,
    ];
    let printed = crate::plugin::succeeded(&plugin.run(&proof_args, "").await);
    assert_eq!(printed, summary, "the plugin prints the proof");

    let head = policy.status.unwrap().receipts.unwrap();
    let stream =
        tombstone::audit::receipt::policy_stream(&get_policy(&client, &ns, "sessions").await);
    let key = |n: u64| chain::object_key(PREFIX, &stream, n);
    let policy_arg = format!("{ns}/sessions");
    let only_policy = ["--policy", policy_arg.as_str()];
    let original = server.get("receipts", &key(2)).await;

    // (a) An edited receipt.
    let edited = String::from_utf8(original.clone())
        .unwrap()
        .replace("\"scanned\":0", "\"scanned\":1");
    assert_ne!(
        edited.as_bytes(),
        original.as_slice(),
        "the edit changes something"
    );
    server.put("receipts", &key(2), edited).await;
    let (code, out) = verify_cli(&ns, &only_policy);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("BROKEN (ReceiptEdited)"), "{out}");
    assert!(out.contains("receipt 2 was altered"), "{out}");
    server.put("receipts", &key(2), original.clone()).await;
    assert_eq!(verify_cli(&ns, &only_policy).0, 0);

    // (b) A receipt deleted from the middle.
    delete(&server, &key(2)).await;
    let (code, out) = verify_cli(&ns, &only_policy);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("ReceiptMissing"), "{out}");
    assert!(out.contains("receipt 2 is missing"), "{out}");
    server.put("receipts", &key(2), original).await;

    // (c) The last receipt deleted: only status can tell.
    delete(&server, &key(head.sequence)).await;
    let (code, out) = verify_cli(&ns, &only_policy);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("LastReceiptMissing"), "{out}");
    assert!(out.contains("the last receipt is missing"), "{out}");

    // The request's receipt edited: its proof no longer verifies.
    let uid = api.get("dsr-verify").await.unwrap().metadata.uid.unwrap();
    let request_key = format!("{PREFIX}requests/{ns}/dsr-verify/{uid}/000000000001.json");
    let body = String::from_utf8(server.get("receipts", &request_key).await).unwrap();
    server
        .put(
            "receipts",
            &request_key,
            body.replace("\"erased\":1", "\"erased\":2"),
        )
        .await;
    let proof = tombstone::audit::proof::proof(client.clone(), &sink, &ns, "dsr-verify")
        .await
        .expect("proof");
    assert!(!proof.verified());
    let summary = proof.to_string();
    assert!(summary.contains("Result: BROKEN"), "{summary}");
    assert!(summary.contains("ReceiptEdited"), "{summary}");
    let broken = plugin.run(&proof_args, "").await;
    assert_eq!(
        broken.status.code(),
        Some(1),
        "a broken proof fails the command"
    );
    assert!(String::from_utf8_lossy(&broken.stdout).contains("Result: BROKEN"));
}

async fn delete(server: &S3Server, key: &str) {
    server
        .client()
        .delete_object()
        .bucket("receipts")
        .key(key)
        .send()
        .await
        .expect("DeleteObject");
}

/// The request's receipts in the sink, parsed, in sequence order.
async fn request_receipts(
    server: &S3Server,
    ns: &str,
    name: &str,
) -> Vec<(String, serde_json::Value)> {
    let folder = chain::object_folder(PREFIX, StreamKind::Request, ns, name);
    let mut out = Vec::new();
    for key in server.keys("receipts", &folder).await {
        let body = String::from_utf8(server.get("receipts", &key).await).unwrap();
        out.push((key, serde_json::from_str(&body).unwrap()));
    }
    out
}

async fn wait_gone(api: &Api<ErasureRequest>, name: &str) {
    crate::support::wait_for(
        &format!("{name} to be deleted"),
        Duration::from_secs(90),
        || async {
            api.get_opt(name)
                .await
                .ok()
                .flatten()
                .is_none()
                .then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn a_completed_request_is_deleted_after_its_time_only_with_a_sink() {
    let (client, ns) = setup("rcpt-ttl").await;
    let (_, bare) = setup("rcpt-ttl-nosink").await;
    let server = S3Server::start();
    server.create_bucket("receipts", false, false).await;
    let redis = RedisServer::start();
    let ttl = Duration::from_secs(3);
    let operator = start_with_sink(&ns, LockMode::Governance, Some(ttl)).await;
    let without_sink = TestOperator::start_with(
        &bare,
        None,
        None,
        Settings {
            completed_request_ttl: ttl,
            ..fast_settings()
        },
    )
    .await;
    sink_store(&client, &ns, &server.endpoint()).await;
    for namespace in [&ns, &bare] {
        sweeping_policy(&client, namespace, &redis).await;
        patch_spec::<RetentionPolicy>(&client, namespace, "sessions", json!({"suspend": true}))
            .await;
        erase_probe(&client, namespace, &redis, "dsr-ttl").await;
    }

    // With a sink: deleted after its time, with an Event, its chain closed in the sink.
    let api: Api<ErasureRequest> = Api::namespaced(client.clone(), &ns);
    let done = wait_phase(&client, &ns, "dsr-ttl", ErasurePhase::Completed).await;
    assert!(
        done.finalizers()
            .contains(&tombstone::controller::erasurerequest::lifecycle::FINALIZER.to_string()),
        "{:?}",
        done.finalizers()
    );
    wait_gone(&api, "dsr-ttl").await;
    wait_event(&client, &ns, "dsr-ttl", |(t, reason, note)| {
        t == "Normal" && reason == "ErasureRequestExpired" && note.contains("sha256:")
    })
    .await;
    let receipts = request_receipts(&server, &ns, "dsr-ttl").await;
    let kinds: Vec<&str> = receipts
        .iter()
        .map(|(_, r)| r["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, vec!["ErasureReceipt", "ErasureRequestClosed"]);
    assert_eq!(receipts[1].1["deletedBy"], "Lifecycle");
    let folder = chain::object_folder(PREFIX, StreamKind::Request, &ns, "dsr-ttl");
    let reports = tombstone::audit::sink::verify(&test_sink(&server), Some(&client), Some(&folder))
        .await
        .unwrap();
    assert_eq!(reports.len(), 1);
    assert!(reports[0].intact(), "{reports:?}");
    assert_eq!(reports[0].head, "Closed");

    // Without a sink: kept. The positive sign that the operator looked at it after its time:
    // an edit reported as ignored, then one more reconcile.
    let kept: Api<ErasureRequest> = Api::namespaced(client.clone(), &bare);
    wait_phase(&client, &bare, "dsr-ttl", ErasurePhase::Completed).await;
    tokio::time::sleep(ttl + Duration::from_secs(1)).await;
    patch_spec::<ErasureRequest>(&client, &bare, "dsr-ttl", json!({"reference": "edited"})).await;
    wait_for_request(&kept, "dsr-ttl", |s| {
        s.conditions.iter().any(|c| {
            c.type_ == "SpecChangeIgnored" && c.status == tombstone::api::ConditionStatus::True
        })
    })
    .await;
    let seen = without_sink.reconciliations("erasurerequest");
    kept.patch(
        "dsr-ttl",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {"poke": "1"}}})),
    )
    .await
    .unwrap();
    crate::support::wait_for("one more reconcile", Duration::from_secs(30), || async {
        (without_sink.reconciliations("erasurerequest") > seen).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        kept.get_opt("dsr-ttl").await.unwrap().is_some(),
        "without a sink nothing is deleted"
    );
    without_sink.stop().await;
    operator.stop().await;
}

#[tokio::test]
async fn an_unfinished_request_deleted_by_a_user_leaves_an_abandonment_receipt() {
    let (client, ns) = setup("rcpt-abandon").await;
    let server = S3Server::start();
    server.create_bucket("receipts", false, false).await;
    let operator = start_with_sink(&ns, LockMode::Governance, None).await;
    sink_store(&client, &ns, &server.endpoint()).await;
    // Its identifiers Secret does not exist: the request waits, unfinished.
    request_erasure(&client, &ns, "dsr-gone", "no-such-secret").await;
    let api: Api<ErasureRequest> = Api::namespaced(client.clone(), &ns);
    let waiting = wait_for_request(&api, "dsr-gone", |s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == "Complete" && c.reason == "SecretNotFound")
    })
    .await;
    assert!(
        waiting
            .finalizers()
            .contains(&tombstone::controller::erasurerequest::lifecycle::FINALIZER.to_string()),
        "{:?}",
        waiting.finalizers()
    );
    api.delete("dsr-gone", &Default::default()).await.unwrap();
    wait_gone(&api, "dsr-gone").await;
    wait_event(&client, &ns, "dsr-gone", |(t, reason, _)| {
        t == "Warning" && reason == "ErasureAbandoned"
    })
    .await;
    let receipts = request_receipts(&server, &ns, "dsr-gone").await;
    assert_eq!(receipts.len(), 1, "{receipts:?}");
    let (key, abandoned) = &receipts[0];
    assert_eq!(abandoned["kind"], "ErasureAbandoned");
    assert_eq!(abandoned["deletedBy"], "User");
    assert_eq!(abandoned["phase"], "Pending");
    // The same receipt in the audit log.
    let body = String::from_utf8(server.get("receipts", key).await).unwrap();
    let logged = logged_audit_record(&tombstone::audit::receipt::receipt_digest(&body));
    assert_eq!(&logged, abandoned);
    let folder = chain::object_folder(PREFIX, StreamKind::Request, &ns, "dsr-gone");
    let reports = tombstone::audit::sink::verify(&test_sink(&server), Some(&client), Some(&folder))
        .await
        .unwrap();
    assert!(
        reports[0].intact() && reports[0].head == "Closed",
        "{reports:?}"
    );
    operator.stop().await;
}
