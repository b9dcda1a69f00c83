//! Issue 10, items 3 (runtime side), 7 and 8, through the operator: one identifier form in
//! every store (trimmed, e-mail addresses in any case), values a free-text locator cannot
//! tell apart from other text fail the target instead of running, and archive lines that are
//! not JSON but hold the identifier count as remaining until the DPO decides.

use std::time::Duration;

use chrono::{Duration as Days, SecondsFormat, Utc};
use kube::Api;
use serde_json::json;

use tombstone::api::erasurerequest::{ErasurePhase, ErasureTargetPhase, ErasureTargetStatus};
use tombstone::api::{DataStore, ErasureRequest, RetentionPolicy};

use crate::erasure::wait_phase;
use crate::fixtures::*;
use crate::support::elasticsearch::EsDouble;
use crate::support::loki::{now_ns, LokiDouble, SINGLE_TENANT};
use crate::support::s3::{S3Server, ACCESS_KEY_ID, SECRET_ACCESS_KEY};
use crate::support::{base64, wait_for, RedisServer};

/// The subject's address, as the application stored it in some places.
const MIXED: &str = "Fc-Match-9d2k@Example.ORG";
/// Its canonical form.
const CANONICAL: &str = "fc-match-9d2k@example.org";
const DAY_NS: i64 = 86_400_000_000_000;

fn json_data(pairs: &[(&str, &[u8])]) -> serde_json::Value {
    let mut data = serde_json::Map::new();
    for (k, v) in pairs {
        data.insert(k.to_string(), json!(base64(v)));
    }
    serde_json::Value::Object(data)
}

/// An identifiers Secret written as `echo … | base64` would: each value with its newline.
async fn secret_with_newlines(client: &kube::Client, ns: &str, name: &str, pairs: &[(&str, &str)]) {
    let values: Vec<(String, Vec<u8>)> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), format!("{v}\n").into_bytes()))
        .collect();
    let refs: Vec<(&str, &[u8])> = values.iter().map(|(k, v)| (k.as_str(), &v[..])).collect();
    let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_value(json!({
        "metadata": {"name": name},
        "data": json_data(&refs),
    }))
    .unwrap();
    Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client.clone(), ns)
        .create(&Default::default(), &secret)
        .await
        .unwrap();
}

async fn store(client: &kube::Client, ns: &str, name: &str, spec: serde_json::Value) {
    create::<DataStore>(
        client,
        ns,
        json!({"apiVersion": "tombstone.dev/v1alpha1", "kind": "DataStore", "metadata": {"name": name}, "spec": spec}),
    )
    .await;
}

async fn s3_store(client: &kube::Client, ns: &str, server: &S3Server) {
    create_credentials_secret(
        client,
        ns,
        "archive-creds",
        json!({"accessKeyId": ACCESS_KEY_ID, "secretAccessKey": SECRET_ACCESS_KEY}),
    )
    .await;
    store(
        client,
        ns,
        "archive",
        json!({"s3": {"bucket": "archive", "region": "us-east-1", "endpoint": server.endpoint(),
                      "forcePathStyle": true, "credentialsSecretRef": {"name": "archive-creds"}},
               "insecure": true}),
    )
    .await;
}

async fn suspended_policy(client: &kube::Client, ns: &str, name: &str, targets: serde_json::Value) {
    let mut p = policy_json(name, "30d", targets);
    p["spec"]["suspend"] = json!(true);
    create::<RetentionPolicy>(client, ns, p).await;
}

fn dry_run_request(name: &str, secret: &str) -> serde_json::Value {
    json!({"apiVersion": "tombstone.dev/v1alpha1", "kind": "ErasureRequest", "metadata": {"name": name},
           "spec": {"subject": {"secretRef": {"name": secret}}, "reason": "objection", "dryRun": true}})
}

/// Waits until the request's target `target` has failed with `reason`.
async fn wait_target_failed(
    client: &kube::Client,
    ns: &str,
    request: &str,
    target: &str,
    reason: &str,
) -> ErasureTargetStatus {
    let api: Api<ErasureRequest> = Api::namespaced(client.clone(), ns);
    wait_for(
        &format!("{request}: target {target} to fail with {reason}"),
        Duration::from_secs(60),
        || {
            let api = api.clone();
            async move {
                let status = api.get(request).await.ok()?.status?;
                status.targets.into_iter().find(|t| {
                    t.target == target
                        && t.phase == ErasureTargetPhase::Failed
                        && t.message.starts_with(reason)
                })
            }
        },
    )
    .await
}

fn record(to: &str, n: u32) -> String {
    format!("{{\"msg\":{{\"recipient\":\"{to}\",\"id\":{n}}},\"status\":\"sent\"}}\n")
}

async fn trail(client: &kube::Client, ns: &str, request: &str) -> String {
    let r = Api::<ErasureRequest>::namespaced(client.clone(), ns)
        .get(request)
        .await
        .unwrap();
    format!(
        "{}\n{:?}\n{:?}",
        serde_json::to_string(&r.status).unwrap(),
        events_for(client, ns, request).await,
        captured_logs()
    )
}

#[tokio::test]
async fn a_secret_value_ending_in_a_newline_erases_the_subject_in_every_case_redis_keeps() {
    let (client, ns) = setup("fc-match-redis").await;
    let redis = RedisServer::start();
    let mut conn = redis_conn(&redis.url()).await;
    let _: () = redis::pipe()
        .cmd("SET")
        .arg(format!("prefs:{MIXED}:1"))
        .arg("t")
        .ignore()
        .cmd("SET")
        .arg(format!("prefs:{CANONICAL}:2"))
        .arg("t")
        .ignore()
        .cmd("SET")
        .arg(format!("prefs:x{CANONICAL}:1"))
        .arg("t")
        .ignore()
        .cmd("SADD")
        .arg("newsletter")
        .arg(CANONICAL)
        .arg(MIXED)
        .arg("other@example.org")
        .ignore()
        .query_async(&mut conn)
        .await
        .unwrap();
    let operator = TestOperator::start(&ns).await;
    redis_store(&client, &ns, "cache", &redis.url(), json!({})).await;
    suspended_policy(
        &client,
        &ns,
        "prefs",
        json!([{"name": "prefs", "store": "cache", "redis": {"keyPattern": "prefs:*"},
        "subject": {"redis": {
            "keys": ["prefs:{email}:*"],
            "setMembers": [{"key": "newsletter", "member": "{email}"}]
        }}}]),
    )
    .await;
    // As `echo "$EMAIL" | base64` writes it: with a newline, and as the person typed it.
    secret_with_newlines(&client, &ns, "dsr-nl", &[("email", MIXED)]).await;
    request_erasure(&client, &ns, "dsr-nl", "dsr-nl").await;

    let done = wait_phase(&client, &ns, "dsr-nl", ErasurePhase::Completed).await;
    let status = done.status.unwrap();
    let t = &status.targets[0];
    assert_eq!(
        (t.phase, t.found, t.erased, t.remaining),
        (ErasureTargetPhase::Verified, 4, 4, 0),
        "both keys (any case, one glob) and both spellings of the set member; {}",
        t.message
    );
    assert_eq!(
        count_keys(&mut conn, "prefs:*").await,
        1,
        "a neighbouring address is kept"
    );
    let members: Vec<String> = redis::cmd("SMEMBERS")
        .arg("newsletter")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(members, vec!["other@example.org".to_string()]);
    // The digest is made from the same canonical form the queries used.
    let key = tombstone::audit::load_key(&client, &ns).await.unwrap();
    let canonical = [("email".to_string(), CANONICAL.to_string())].into();
    assert_eq!(
        status.subject_digest.as_deref(),
        Some(tombstone::audit::subject_digest(&key, &canonical).as_str())
    );
    let trail = trail(&client, &ns, "dsr-nl").await;
    assert!(!trail.to_lowercase().contains(CANONICAL), "{trail}");
    operator.stop().await;
}

#[tokio::test]
async fn an_address_in_another_case_is_erased_from_loki_elasticsearch_and_archive_records() {
    let (client, ns) = setup("fc-match-case").await;
    let loki = LokiDouble::start().await;
    let now = now_ns();
    loki.push_flushed(
        SINGLE_TENANT,
        &[("app", "mailer")],
        &[
            (
                now - DAY_NS,
                format!("sent to {}", MIXED.to_uppercase()).leak(),
            ),
            (now - DAY_NS + 1, "sent to other@example.org"),
            (now - DAY_NS + 2, format!("sent to x{CANONICAL}").leak()),
        ],
    );
    let es = EsDouble::start().await;
    let day = (Utc::now() - Days::days(1)).to_rfc3339_opts(SecondsFormat::Millis, true);
    es.seed(
        "mailer-events-1",
        &[
            ("s1", json!({"@timestamp": day, "user": {"email": MIXED}})),
            (
                "n1",
                json!({"@timestamp": day, "user": {"email": "other@example.org"}}),
            ),
        ],
    );
    let s3 = S3Server::start();
    s3.create_bucket("archive", false, false).await;
    s3.put(
        "archive",
        "mailer/logs/day1.jsonl",
        [
            record(&MIXED.to_uppercase(), 1),
            record("other@example.org", 2),
        ]
        .concat(),
    )
    .await;

    let operator = TestOperator::start(&ns).await;
    store(&client, &ns, "logs", json!({"loki": {"url": loki.url()}})).await;
    store(
        &client,
        &ns,
        "search",
        json!({"elasticsearch": {"url": es.url()}}),
    )
    .await;
    s3_store(&client, &ns, &s3).await;
    suspended_policy(
        &client,
        &ns,
        "mailer",
        json!([
            {"name": "logs", "store": "logs", "loki": {"selector": "{app=\"mailer\"}"},
             "subject": {"loki": {"lineFilter": "{email}"}}},
            {"name": "events", "store": "search",
             "elasticsearch": {"index": "mailer-events-*", "timestampField": "@timestamp"},
             "subject": {"elasticsearch": {"term": {"user.email": "{email}"}}}},
            {"name": "archive", "store": "archive", "s3": {"prefix": "mailer/logs/"},
             "subject": {"s3": {"records": {"prefix": "mailer/logs/", "field": "msg.recipient", "equals": "{email}"}}}}
        ]),
    )
    .await;
    create_secret(&client, &ns, "dsr-case", json!({"email": CANONICAL})).await;
    request_erasure(&client, &ns, "dsr-case", "dsr-case").await;

    let done = wait_phase(&client, &ns, "dsr-case", ErasurePhase::Completed).await;
    let status = done.status.unwrap();
    for name in ["logs", "events", "archive"] {
        let t = status.targets.iter().find(|t| t.target == name).unwrap();
        assert_eq!(
            (t.phase, t.found, t.erased, t.remaining),
            (ErasureTargetPhase::Verified, 1, 1, 0),
            "{name}: {}",
            t.message
        );
    }
    let mut lines: Vec<String> = loki
        .lines(SINGLE_TENANT)
        .into_iter()
        .map(|(_, l)| l)
        .collect();
    lines.sort();
    assert_eq!(
        lines,
        vec![
            "sent to other@example.org".to_string(),
            format!("sent to x{CANONICAL}")
        ]
    );
    assert_eq!(es.ids("mailer-events-1"), vec!["n1"]);
    assert_eq!(
        String::from_utf8(s3.get("archive", "mailer/logs/day1.jsonl").await).unwrap(),
        record("other@example.org", 2)
    );
    let trail = trail(&client, &ns, "dsr-case").await;
    assert!(!trail.to_lowercase().contains(CANONICAL), "{trail}");
    operator.stop().await;
}

#[tokio::test]
async fn a_value_a_bare_loki_filter_cannot_tell_apart_fails_the_target_and_nothing_is_sent() {
    let (client, ns) = setup("fc-match-short").await;
    let loki = LokiDouble::start().await;
    let now = now_ns();
    // Other people's lines that hold the careless value where it stands on its own.
    let lines = [
        "10:42:13 uid=7 login from fcprobe7",
        "uid=9 status=fcprobe7",
        "order uid=42 paid",
    ];
    loki.push(
        SINGLE_TENANT,
        &[("app", "mailer")],
        &lines
            .iter()
            .enumerate()
            .map(|(i, l)| (now - DAY_NS + i as i64, *l))
            .collect::<Vec<_>>(),
    );
    let operator = TestOperator::start(&ns).await;
    store(&client, &ns, "logs", json!({"loki": {"url": loki.url()}})).await;
    suspended_policy(
        &client,
        &ns,
        "mailer",
        json!([{"name": "logs", "store": "logs", "loki": {"selector": "{app=\"mailer\"}"},
                "subject": {"loki": {"lineFilter": "{email}"}}}]),
    )
    .await;
    // Not an address: a user name put under `email` by mistake.
    create_secret(&client, &ns, "dsr-short", json!({"email": "fcprobe7"})).await;
    request_erasure(&client, &ns, "dsr-short", "dsr-short").await;

    let t = wait_target_failed(
        &client,
        &ns,
        "dsr-short",
        "logs",
        "IdentifierNotDistinctive",
    )
    .await;
    assert!(
        t.message.contains("{email}") && t.message.contains("not an e-mail address"),
        "{}",
        t.message
    );
    assert_eq!((t.found, t.erased), (0, 0));
    let request = Api::<ErasureRequest>::namespaced(client.clone(), &ns)
        .get("dsr-short")
        .await
        .unwrap();
    assert_ne!(
        request.status.as_ref().map(|s| s.phase),
        Some(ErasurePhase::Completed),
        "never reported erased"
    );
    assert!(
        loki.delete_requests(SINGLE_TENANT).is_empty(),
        "nothing submitted"
    );
    assert_eq!(loki.lines(SINGLE_TENANT).len(), 3, "every line kept");
    let trail = trail(&client, &ns, "dsr-short").await;
    assert!(!trail.contains("fcprobe7"), "{trail}");
    operator.stop().await;
}

const ARCHIVE_KEY: &str = "mailer/logs/day1.jsonl";

fn archive_targets(unparsed: Option<&str>) -> serde_json::Value {
    let mut records =
        json!({"prefix": "mailer/logs/", "field": "msg.recipient", "equals": "{email}"});
    if let Some(mode) = unparsed {
        records["unparsedLines"] = json!(mode);
    }
    json!([{"name": "archive", "store": "archive", "s3": {"prefix": "mailer/logs/"},
            "subject": {"s3": {"records": records}}}])
}

#[tokio::test]
async fn archive_lines_that_are_not_json_but_hold_the_subject_keep_the_request_open_until_dropped()
{
    let (client, ns) = setup("fc-match-unparsed").await;
    let s3 = S3Server::start();
    s3.create_bucket("archive", false, false).await;
    let other_line = "2026-11-01 10:42:13 bounce for other@example.org\n";
    let subject_line = format!("2026-11-01 10:42:14 bounce for {MIXED}\n");
    s3.put(
        "archive",
        ARCHIVE_KEY,
        [
            record(CANONICAL, 1),
            subject_line.clone(),
            other_line.to_string(),
            record("other@example.org", 2),
        ]
        .concat(),
    )
    .await;
    let operator = TestOperator::start(&ns).await;
    s3_store(&client, &ns, &s3).await;
    suspended_policy(&client, &ns, "mailer", archive_targets(None)).await;
    create_secret(&client, &ns, "dsr-unparsed", json!({"email": CANONICAL})).await;
    request_erasure(&client, &ns, "dsr-unparsed", "dsr-unparsed").await;

    // Keep (the default): the copy is named by object and line count, and nothing completes.
    let t = wait_target_failed(
        &client,
        &ns,
        "dsr-unparsed",
        "archive",
        "UnparsedCopiesRemain",
    )
    .await;
    assert!(
        t.message.contains(&format!("{ARCHIVE_KEY}: 1 line"))
            && t.message.contains("unparsedLines: DropMatching"),
        "{}",
        t.message
    );
    assert_ne!(t.phase, ErasureTargetPhase::Verified);
    assert!(String::from_utf8(s3.get("archive", ARCHIVE_KEY).await)
        .unwrap()
        .contains(&subject_line));

    // The DPO decides: such lines go with the subject's records. A dry run counts them.
    patch_spec::<RetentionPolicy>(
        &client,
        &ns,
        "mailer",
        json!({"targets": archive_targets(Some("DropMatching"))}),
    )
    .await;
    create_secret(&client, &ns, "dsr-dry", json!({"email": CANONICAL})).await;
    create::<ErasureRequest>(&client, &ns, dry_run_request("dsr-dry", "dsr-dry")).await;
    let dry = wait_phase(&client, &ns, "dsr-dry", ErasurePhase::Completed).await;
    let dry_found = dry.status.unwrap().targets[0].found;
    assert_eq!(dry_found, 2, "the record and the unparsed line");

    let done = wait_phase(&client, &ns, "dsr-unparsed", ErasurePhase::Completed).await;
    let status = done.status.unwrap();
    let t = &status.targets[0];
    assert_eq!(
        (t.phase, t.found, t.erased, t.remaining),
        (ErasureTargetPhase::Verified, dry_found, 2, 0),
        "{}",
        t.message
    );
    assert_eq!(
        String::from_utf8(s3.get("archive", ARCHIVE_KEY).await).unwrap(),
        [other_line.to_string(), record("other@example.org", 2)].concat(),
        "other people's lines, parsed or not, are kept byte for byte"
    );
    let trail = trail(&client, &ns, "dsr-unparsed").await;
    assert!(!trail.to_lowercase().contains(CANONICAL), "{trail}");
    operator.stop().await;
}

#[tokio::test]
async fn a_short_id_with_unparsed_archive_lines_is_not_judged_and_not_reported_erased() {
    let (client, ns) = setup("fc-match-unjudged").await;
    let s3 = S3Server::start();
    s3.create_bucket("archive", false, false).await;
    let archive = concat!(
        "{\"userId\":42,\"n\":1}\n",
        "{\"userId\":4711,\"n\":2}\n",
        "10:42:13 worker restarted\n",
    );
    s3.put("archive", ARCHIVE_KEY, archive).await;
    let operator = TestOperator::start(&ns).await;
    s3_store(&client, &ns, &s3).await;
    let targets = json!([{"name": "archive", "store": "archive", "s3": {"prefix": "mailer/logs/"},
        "subject": {"s3": {"records": {"prefix": "mailer/logs/", "field": "userId",
                                       "equals": "{userId}", "unparsedLines": "DropMatching"}}}}]);
    suspended_policy(&client, &ns, "jobs", targets).await;
    create_secret(&client, &ns, "dsr-42", json!({"userId": "42"})).await;
    request_erasure(&client, &ns, "dsr-42", "dsr-42").await;

    let t = wait_target_failed(
        &client,
        &ns,
        "dsr-42",
        "archive",
        "IdentifierNotDistinctive",
    )
    .await;
    assert!(
        t.message.contains(&format!("{ARCHIVE_KEY}: 1 line")) && t.message.contains("only digits"),
        "{}",
        t.message
    );
    assert_eq!(
        String::from_utf8(s3.get("archive", ARCHIVE_KEY).await).unwrap(),
        archive,
        "the line is not dropped on a guess"
    );
    operator.stop().await;
}
