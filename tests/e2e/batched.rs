//! Erasure requests ready at the same time are worked in batches (one pass over the store
//! for all of them), and each still ends with its own counts, status and receipt: a late
//! request joins the next batch, a hold on one subject holds only it, and a subject whose
//! records are still there at verification goes back to erasing alone.

use std::collections::BTreeSet;
use std::time::Duration;

use kube::api::DeleteParams;
use kube::Api;
use serde_json::json;

use tombstone::api::erasurerequest::{ErasurePhase, ErasureTargetPhase};
use tombstone::api::{ErasureRequest, LegalHold};
use tombstone::controller::Settings;
use tombstone::engine::batch::BatchSettings;

use crate::erasure::{shop, wait_phase};
use crate::fixtures::*;
use crate::support::request_log::RequestLog;
use crate::support::{wait_for, RedisServer};

/// One data subject of a test: its identifiers and how many session keys it has.
struct Subject {
    name: String,
    user: String,
    email: String,
    keys: usize,
}

fn subjects(tag: &str, n: usize) -> Vec<Subject> {
    (0..n)
        .map(|i| Subject {
            name: format!("dsr-{i}"),
            user: format!("u-{tag}-{i}"),
            email: format!("zq-{tag}-{i}@example.org"),
            keys: i + 1,
        })
        .collect()
}

/// Each subject's session keys and newsletter membership, and a neighbour's keys
/// (`session:<user>0:*`) and a stranger's membership that must stay.
async fn seed(conn: &mut redis::aio::MultiplexedConnection, subjects: &[Subject]) {
    let mut pipe = redis::pipe();
    for s in subjects {
        for n in 0..s.keys {
            pipe.cmd("SET")
                .arg(format!("session:{}:{n}", s.user))
                .arg("t")
                .ignore();
            pipe.cmd("SET")
                .arg(format!("session:{}0:{n}", s.user))
                .arg("t")
                .ignore();
        }
        pipe.cmd("SADD").arg("newsletter").arg(&s.email).ignore();
    }
    pipe.cmd("SADD")
        .arg("newsletter")
        .arg("stranger@example.org")
        .ignore();
    let _: () = pipe.query_async(conn).await.expect("seeded");
}

async fn file_request(client: &kube::Client, ns: &str, s: &Subject) {
    create_subject_secret(
        client,
        ns,
        &s.name,
        json!({"email": s.email, "userId": s.user}),
    )
    .await;
    create::<ErasureRequest>(
        client,
        ns,
        crate::erasure::request_json(&s.name, &s.name, false),
    )
    .await;
}

/// Fast steps, and batches that wait a moment for the requests created together.
fn batching(wait: Duration) -> Settings {
    Settings {
        batches: BatchSettings {
            max_members: 1000,
            wait,
        },
        ..fast_settings()
    }
}

/// Batches started and members worked, for `action`.
fn batches(operator: &TestOperator, action: &str) -> (u64, u64) {
    let labels = tombstone::metrics::ActionLabels {
        action: action.to_string(),
    };
    let m = &operator.running.metrics;
    (
        m.erasure_batches.get_or_create(&labels).get(),
        m.erasure_batch_members.get_or_create(&labels).get(),
    )
}

/// A request Completed with exactly its subject's records (its keys and its membership).
async fn completed_with_its_own_counts(client: &kube::Client, ns: &str, s: &Subject) -> String {
    let done = wait_phase(client, ns, &s.name, ErasurePhase::Completed).await;
    let status = done.status.expect("a status");
    let target = &status.targets[0];
    assert_eq!(target.phase, ErasureTargetPhase::Verified, "{}", s.name);
    assert_eq!(
        target.found,
        s.keys as u64 + 1,
        "{} found its own records",
        s.name
    );
    assert_eq!(
        target.erased,
        s.keys as u64 + 1,
        "{} erased its own records",
        s.name
    );
    let text = serde_json::to_string(&status).expect("status as JSON");
    for s in [&s.user, &s.email] {
        assert!(!text.contains(s.as_str()), "no identifier in status");
    }
    status.receipt.expect("a receipt")
}

/// A LegalHold `claim` on the subject whose identifiers a new Secret `secret` holds.
async fn hold_by_secret(
    client: &kube::Client,
    ns: &str,
    secret: &str,
    identifiers: serde_json::Value,
) {
    create_secret(client, ns, secret, identifiers).await;
    create::<LegalHold>(
        client,
        ns,
        json!({"apiVersion": "tombstone.dev/v1alpha1", "kind": "LegalHold", "metadata": {"name": "claim"},
               "spec": {"reason": "Pending claim", "subjects": [{"secretRef": {"name": secret}}]}}),
    )
    .await;
}

async fn neighbours_kept(conn: &mut redis::aio::MultiplexedConnection, subjects: &[Subject]) {
    for s in subjects {
        let theirs = count_keys(conn, &format!("session:{}0:*", s.user)).await;
        assert_eq!(theirs, s.keys, "the neighbour of {} keeps its keys", s.name);
    }
    let stranger: bool = redis::cmd("SISMEMBER")
        .arg("newsletter")
        .arg("stranger@example.org")
        .query_async(conn)
        .await
        .expect("SISMEMBER");
    assert!(stranger);
}

#[tokio::test]
async fn requests_ready_together_are_erased_in_batches_each_with_its_own_counts_and_receipt() {
    let (client, ns) = setup("batched").await;
    let redis = RedisServer::start();
    let mut conn = redis_conn(&redis.url()).await;
    let all = subjects("b1", 7);
    seed(&mut conn, &all).await;
    let operator =
        TestOperator::start_with(&ns, None, None, batching(Duration::from_millis(500))).await;
    shop(&client, &ns, &redis).await;
    let (first, late) = all.split_at(6);
    for s in first {
        file_request(&client, &ns, s).await;
    }
    // A request filed once the others are under way joins a later batch.
    let api: Api<ErasureRequest> = Api::namespaced(client.clone(), &ns);
    wait_for(
        "the first requests to start",
        Duration::from_secs(60),
        || async {
            let started = api.get(&first[0].name).await.ok()?.status?.subject_digest;
            started.map(|_| ())
        },
    )
    .await;
    file_request(&client, &ns, &late[0]).await;

    let mut receipts = BTreeSet::new();
    for s in &all {
        receipts.insert(completed_with_its_own_counts(&client, &ns, s).await);
        assert_eq!(
            count_keys(&mut conn, &format!("session:{}:*", s.user)).await,
            0
        );
    }
    assert_eq!(receipts.len(), all.len(), "one receipt per request");
    neighbours_kept(&mut conn, &all).await;
    let left: Vec<String> = redis::cmd("SMEMBERS")
        .arg("newsletter")
        .query_async(&mut conn)
        .await
        .expect("SMEMBERS");
    assert_eq!(left, vec!["stranger@example.org".to_string()]);
    for action in ["find", "erase", "verify"] {
        let (batches, members) = batches(&operator, action);
        assert!(
            members >= all.len() as u64,
            "{action}: every request was worked"
        );
        assert!(
            batches < members,
            "{action}: some batch served several requests ({batches} batches for {members} targets)"
        );
    }
}

#[tokio::test]
async fn a_hold_on_one_subject_of_a_batch_holds_only_it() {
    let (client, ns) = setup("batched-hold").await;
    let redis = RedisServer::start();
    let mut conn = redis_conn(&redis.url()).await;
    let all = subjects("b2", 3);
    seed(&mut conn, &all).await;
    let operator =
        TestOperator::start_with(&ns, None, None, batching(Duration::from_millis(500))).await;
    shop(&client, &ns, &redis).await;
    // The held subject's identifiers, as the hold's own Secret.
    let held = &all[1];
    hold_by_secret(
        &client,
        &ns,
        "held-subject",
        json!({"email": held.email, "userId": held.user}),
    )
    .await;
    for s in &all {
        file_request(&client, &ns, s).await;
    }
    for s in [&all[0], &all[2]] {
        completed_with_its_own_counts(&client, &ns, s).await;
    }
    let blocked = wait_phase(&client, &ns, &held.name, ErasurePhase::Blocked).await;
    let text = serde_json::to_string(&blocked.status).expect("status as JSON");
    assert!(!text.contains(&held.user) && !text.contains(&held.email));
    assert_eq!(
        count_keys(&mut conn, &format!("session:{}:*", held.user)).await,
        held.keys,
        "the held subject keeps its keys"
    );
    let (batches, members) = batches(&operator, "erase");
    assert!(
        batches < members,
        "the others were erased together ({batches} batches, {members} targets)"
    );

    Api::<LegalHold>::namespaced(client.clone(), &ns)
        .delete("claim", &DeleteParams::default())
        .await
        .expect("hold lifted");
    completed_with_its_own_counts(&client, &ns, held).await;
    neighbours_kept(&mut conn, &all).await;
}

/// Before every destructive step a batch asks whether each member is held. A hold that names
/// its subject by Secret is read once per question, not once per member: 60 members over
/// some 20 SCAN pages, each page a question, asked 60 reads of that Secret a page.
#[tokio::test]
async fn a_batch_reads_a_held_subjects_secret_once_per_question_not_once_per_member() {
    const FILLER: usize = 100_000;
    let (client, ns) = setup("batched-hold-reads").await;
    let redis = RedisServer::start();
    let mut conn = redis_conn(&redis.url()).await;
    let all = subjects("b4", 60);
    seed(&mut conn, &all).await;
    // Keys outside the policy's pattern, so that the erase scans many pages, each with some
    // of the members' keys (SCAN COUNT 5000).
    for chunk in (0..FILLER).collect::<Vec<_>>().chunks(10_000) {
        let mut pipe = redis::pipe();
        for i in chunk {
            pipe.cmd("SET").arg(format!("filler:{i}")).arg("f").ignore();
        }
        let _: () = pipe.query_async(&mut conn).await.expect("filler");
    }
    let log = RequestLog::default();
    let operator = TestOperator::start_with_client(
        log.client(),
        &ns,
        None,
        None,
        batching(Duration::from_millis(1500)),
    )
    .await;
    shop(&client, &ns, &redis).await;
    // A hold on somebody outside the batch, named by Secret; its reads counted from now.
    let hold_secret = format!("/api/v1/namespaces/{ns}/secrets/stranger");
    log.count_path(&hold_secret);
    hold_by_secret(
        &client,
        &ns,
        "stranger",
        json!({"userId": "u-b4-stranger-7f3a"}),
    )
    .await;
    for s in &all {
        file_request(&client, &ns, s).await;
    }
    for s in &all {
        completed_with_its_own_counts(&client, &ns, s).await;
    }
    // (With more than ten subjects, one's neighbour, `<user>0`, is another subject.)
    assert_eq!(count_keys(&mut conn, "filler:*").await, FILLER);
    let (erase_batches, erase_members) = batches(&operator, "erase");
    let reads = log.path_count(&hold_secret);
    let reconciles = operator.reconciliations(tombstone::controller::erasurerequest::CONTROLLER);
    eprintln!(
        "hold reads: {reads} reads of the hold's Secret; {erase_batches} erase batches of {erase_members} members; {reconciles} request reconciles"
    );
    // Each of the some 20 pages would have read it once per member: more than 1,000 reads.
    // Now: a read per question shared by the members asking it, and one per reconcile pass
    // (find, erase, verify, end) at most, shared by the reconciles asking together.
    assert!(
        reads < 4 * all.len(),
        "{reads} reads of the hold's Secret for {} members",
        all.len()
    );
}

#[tokio::test]
async fn a_subject_whose_verification_fails_does_not_fail_its_batch_mates() {
    let (client, ns) = setup("batched-verify").await;
    let redis = RedisServer::start();
    let mut conn = redis_conn(&redis.url()).await;
    let all = subjects("b3", 3);
    seed(&mut conn, &all).await;
    let _operator =
        TestOperator::start_with(&ns, None, None, batching(Duration::from_millis(500))).await;
    shop(&client, &ns, &redis).await;
    // An application still writing one subject's session: whatever is erased comes back
    // before verification.
    let rewritten = format!("session:{}:0", all[1].user);
    let stop = tokio_util::sync::CancellationToken::new();
    let writer = {
        let (stop, mut conn) = (stop.clone(), redis_conn(&redis.url()).await);
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                let _: Result<(), _> = redis::cmd("SET")
                    .arg(&rewritten)
                    .arg("t")
                    .query_async(&mut conn)
                    .await;
                tokio::task::yield_now().await;
            }
        })
    };
    for s in &all {
        file_request(&client, &ns, s).await;
    }
    for s in [&all[0], &all[2]] {
        completed_with_its_own_counts(&client, &ns, s).await;
    }
    let api: Api<ErasureRequest> = Api::namespaced(client.clone(), &ns);
    let status = api
        .get(&all[1].name)
        .await
        .expect("request")
        .status
        .expect("status");
    assert_ne!(
        status.phase,
        ErasurePhase::Completed,
        "its records are still written"
    );
    assert_ne!(status.phase, ErasurePhase::Failed);
    stop.cancel();
    writer.await.expect("writer stopped");
    let done = wait_phase(&client, &ns, &all[1].name, ErasurePhase::Completed).await;
    let target = &done.status.expect("status").targets[0];
    assert!(
        target.erased > all[1].keys as u64,
        "what was written again was erased again and counted"
    );
    assert_eq!(
        count_keys(&mut conn, &format!("session:{}:*", all[1].user)).await,
        0
    );
    neighbours_kept(&mut conn, &all).await;
}
