//! The CRDs as the API server sees them: invalid objects are refused by the server itself
//! (422 Invalid), the documented examples are accepted and stored whole, and `kubectl`
//! finds every kind through the `tombstone` category with its printer columns.

use kube::api::{Api, ApiResource, DynamicObject, PostParams};
use kube::Client;
use serde_json::{json, Value};
use tombstone::api::{DataStore, ErasureRequest, LegalHold, RetentionPolicy};

use crate::support::{test_namespace, ControlPlane};

/// CRDs installed, a client and a fresh namespace.
async fn setup(prefix: &str) -> (Client, String) {
    let plane = ControlPlane::get();
    plane.install_crds().await;
    let client = plane.client();
    let ns = test_namespace(&client, prefix).await;
    (client, ns)
}

fn api_resource(kind: &str) -> ApiResource {
    match kind {
        "DataStore" => ApiResource::erase::<DataStore>(&()),
        "RetentionPolicy" => ApiResource::erase::<RetentionPolicy>(&()),
        "ErasureRequest" => ApiResource::erase::<ErasureRequest>(&()),
        "LegalHold" => ApiResource::erase::<LegalHold>(&()),
        other => panic!("not a tombstone kind: {other}"),
    }
}

async fn create(client: &Client, ns: &str, object: &Value) -> kube::Result<DynamicObject> {
    let api: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        ns,
        &api_resource(object["kind"].as_str().unwrap()),
    );
    let object: DynamicObject = serde_json::from_value(object.clone()).unwrap();
    api.create(&PostParams::default(), &object).await
}

/// Creating `object` fails with 422 Invalid, and the message names each of `mentions`.
async fn assert_invalid(client: &Client, ns: &str, object: Value, mentions: &[&str]) {
    match create(client, ns, &object).await {
        Err(kube::Error::Api(status)) => {
            assert_eq!(
                (status.code, status.reason.as_str()),
                (422, "Invalid"),
                "expected 422 Invalid, got {status:?}"
            );
            for m in mentions {
                assert!(
                    status.message.contains(m),
                    "the rejection should mention {m:?}: {}",
                    status.message
                );
            }
        }
        Ok(_) => panic!("the server accepted an invalid object: {object:#}"),
        Err(e) => panic!("expected 422 Invalid, got {e}"),
    }
}

fn object(kind: &str, name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "tombstone.dev/v1alpha1",
        "kind": kind,
        "metadata": {"name": name},
        "spec": spec,
    })
}

/// The DataStores of API.md, one per store kind.
fn datastores() -> Vec<Value> {
    vec![
        object(
            "DataStore",
            "cache",
            json!({
                "redis": {
                    "url": "redis://redis.shop.svc:6379/0",
                    "passwordSecretRef": {"name": "redis-auth", "key": "password"},
                    "cluster": false,
                },
                "limits": {"requestsPerSecond": 500, "concurrency": 4},
            }),
        ),
        object(
            "DataStore",
            "archive",
            json!({
                "s3": {
                    "bucket": "shop-archive",
                    "region": "eu-west-1",
                    "endpoint": "http://minio.storage.svc:9000",
                    "forcePathStyle": true,
                    "credentialsSecretRef": {"name": "s3-creds"},
                },
            }),
        ),
        object(
            "DataStore",
            "logs",
            json!({
                "loki": {
                    "url": "http://loki-gateway.logging.svc",
                    "tenant": "shop",
                    "credentialsSecretRef": {"name": "loki-auth"},
                },
            }),
        ),
        object(
            "DataStore",
            "search",
            json!({
                "elasticsearch": {
                    "url": "https://es.logging.svc:9200",
                    "credentialsSecretRef": {"name": "es-auth"},
                },
            }),
        ),
    ]
}

/// The RetentionPolicy of API.md (status left out).
fn mailer_data() -> Value {
    object(
        "RetentionPolicy",
        "mailer-data",
        json!({
            "description": "Transactional email delivery data",
            "purpose": "Deliver transactional email and answer delivery questions",
            "legalBasis": "contract",
            "dataSubjects": ["customers", "recipients"],
            "dataCategories": ["email address", "IP address"],
            "retention": "30d",
            "schedule": {"every": "1h"},
            "suspend": false,
            "dryRun": false,
            "targets": [
                {
                    "name": "sessions",
                    "store": "cache",
                    "redis": {"keyPattern": "session:*", "mode": "expire", "timestampField": "createdAt"},
                    "subject": {"redis": {
                        "keys": ["session:{userId}:*", "cart:{userId}"],
                        "hashFields": [{"key": "profiles", "field": "{userId}"}],
                        "setMembers": [{"key": "newsletter", "member": "{email}"}],
                    }},
                },
                {
                    "name": "archive",
                    "store": "archive",
                    "s3": {"prefix": "mailer/logs/"},
                    "subject": {"s3": {
                        "keyPrefixes": ["mailer/users/{userId}/"],
                        "records": {"prefix": "mailer/logs/", "field": "recipient", "equals": "{email}"},
                    }},
                },
                {
                    "name": "delivery-logs",
                    "store": "logs",
                    "loki": {"selector": "{namespace=\"mailer\"}"},
                    "subject": {"loki": {"lineFilter": "{email}"}},
                },
                {
                    "name": "events",
                    "store": "search",
                    "elasticsearch": {"index": "mailer-events-*", "timestampField": "@timestamp"},
                    "subject": {"elasticsearch": {"term": {"user.email": "{email}"}}},
                },
            ],
        }),
    )
}

/// A second policy: a cron schedule and the other Redis modes.
fn carts() -> Value {
    object(
        "RetentionPolicy",
        "carts",
        json!({
            "purpose": "Remember shopping carts",
            "legalBasis": "legitimateInterests",
            "retention": "2w",
            "schedule": {"cron": "0 3 * * *"},
            "targets": [
                {"name": "carts", "store": "cache", "redis": {"keyPattern": "cart:*", "mode": "idle"}},
                {"name": "orders", "store": "cache",
                 "redis": {"keyPattern": "order:*", "mode": "timestamp", "timestampField": "createdAt"}},
            ],
        }),
    )
}

/// The ErasureRequest of API.md.
fn erasure_request() -> Value {
    object(
        "ErasureRequest",
        "dsr-2026-0042",
        json!({
            "subject": {"secretRef": {"name": "dsr-2026-0042"}, "identifiers": {"userId": "4711"}},
            "reason": "consentWithdrawn",
            "receivedAt": "2026-11-20T09:00:00Z",
            "policies": ["mailer-data"],
            "dryRun": false,
            "reference": "DSR-2026-0042",
            "retainSubjectSecret": false,
        }),
    )
}

/// The LegalHold of API.md, with a well-formed digest.
fn legal_hold() -> Value {
    object(
        "LegalHold",
        "litigation-2026-17",
        json!({
            "reason": "Pending litigation, Art. 17(3)(e)",
            "policies": ["billing-records"],
            "subjects": [
                {"secretRef": {"name": "hold-subject-1"}},
                {"digest": format!("hmac-sha256:{}", "0123456789abcdef".repeat(4))},
            ],
            "expiresAt": "2027-06-01T00:00:00Z",
        }),
    )
}

fn documented_examples() -> Vec<Value> {
    let mut all = datastores();
    all.extend([mailer_data(), carts(), erasure_request(), legal_hold()]);
    all
}

/// Every field of `sent` is in `stored` with the same value (the server may add defaults,
/// but must not prune anything the schema forgot).
fn assert_kept(sent: &Value, stored: &Value, path: &str) {
    match (sent, stored) {
        (Value::Object(sent), Value::Object(stored)) => {
            for (key, value) in sent {
                let stored_value = stored
                    .get(key)
                    .unwrap_or_else(|| panic!("the server dropped {path}.{key}"));
                assert_kept(value, stored_value, &format!("{path}.{key}"));
            }
        }
        (Value::Array(sent), Value::Array(stored)) => {
            assert_eq!(sent.len(), stored.len(), "{path} changed length");
            for (i, (a, b)) in sent.iter().zip(stored).enumerate() {
                assert_kept(a, b, &format!("{path}[{i}]"));
            }
        }
        _ => assert_eq!(sent, stored, "{path} changed"),
    }
}

#[tokio::test]
async fn accepts_and_keeps_the_documented_examples() {
    let (client, ns) = setup("valid-examples").await;
    for example in documented_examples() {
        let stored = create(&client, &ns, &example)
            .await
            .unwrap_or_else(|e| panic!("the server refused a valid object: {e}\n{example:#}"));
        assert_kept(&example["spec"], &stored.data["spec"], "spec");
    }
    // What the server stored reads back into the Rust types.
    let datastores = Api::<DataStore>::namespaced(client.clone(), &ns)
        .list(&Default::default())
        .await
        .unwrap();
    assert_eq!(datastores.items.len(), 4);
    let policy = Api::<RetentionPolicy>::namespaced(client.clone(), &ns)
        .get("mailer-data")
        .await
        .unwrap();
    assert_eq!(policy.spec.retention.as_secs(), 30 * 86_400);
    assert_eq!(policy.spec.targets.len(), 4);
    Api::<RetentionPolicy>::namespaced(client.clone(), &ns)
        .get("carts")
        .await
        .unwrap();
    Api::<ErasureRequest>::namespaced(client.clone(), &ns)
        .get("dsr-2026-0042")
        .await
        .unwrap();
    Api::<LegalHold>::namespaced(client.clone(), &ns)
        .get("litigation-2026-17")
        .await
        .unwrap();
}

#[tokio::test]
async fn rejects_a_retention_that_is_not_a_duration() {
    let (client, ns) = setup("bad-retention").await;
    let mut policy = mailer_data();
    policy["spec"]["retention"] = json!("30 days");
    assert_invalid(&client, &ns, policy, &["spec.retention", "should match"]).await;
}

#[tokio::test]
async fn rejects_an_unknown_legal_basis() {
    let (client, ns) = setup("bad-legal-basis").await;
    let mut policy = mailer_data();
    policy["spec"]["legalBasis"] = json!("legitimateInterest");
    assert_invalid(
        &client,
        &ns,
        policy,
        &["spec.legalBasis", "Unsupported value"],
    )
    .await;
}

#[tokio::test]
async fn rejects_a_policy_without_targets() {
    let (client, ns) = setup("no-targets").await;
    let mut policy = mailer_data();
    policy["spec"]["targets"] = json!([]);
    assert_invalid(&client, &ns, policy, &["spec.targets", "at least 1 items"]).await;
}

#[tokio::test]
async fn rejects_a_target_with_two_store_kinds() {
    let (client, ns) = setup("target-two-kinds").await;
    let mut policy = mailer_data();
    policy["spec"]["targets"][0]["s3"] = json!({"prefix": "sessions/"});
    // Kubernetes 1.20 names the array ("spec.targets"), not the item, in oneOf errors.
    let mentions = [
        r#""spec.targets" must validate one and only one schema"#,
        "Found 2 valid",
    ];
    assert_invalid(&client, &ns, policy, &mentions).await;
}

#[tokio::test]
async fn rejects_a_subject_locator_with_two_store_kinds() {
    let (client, ns) = setup("locator-two-kinds").await;
    let mut policy = carts();
    policy["spec"]["targets"][0]["subject"] = json!({
        "redis": {"keys": ["cart:{userId}"]},
        "s3": {"keyPrefixes": ["users/{userId}/"]},
    });
    let mentions = [
        r#""spec.targets.subject" must validate one and only one schema"#,
        "Found 2 valid",
    ];
    assert_invalid(&client, &ns, policy, &mentions).await;
    // One section is accepted and kept as sent.
    let mut one = carts();
    one["spec"]["targets"][0]["subject"] = json!({"redis": {"keys": ["cart:{userId}"]}});
    let stored = create(&client, &ns, &one)
        .await
        .expect("one section is accepted");
    assert_eq!(
        stored.data["spec"]["targets"][0]["subject"],
        one["spec"]["targets"][0]["subject"]
    );
}

#[tokio::test]
async fn rejects_a_datastore_with_two_store_kinds() {
    let (client, ns) = setup("store-two-kinds").await;
    let store = object(
        "DataStore",
        "two",
        json!({
            "redis": {"url": "redis://redis:6379"},
            "s3": {"bucket": "shop-archive"},
        }),
    );
    let mentions = [
        r#""spec" must validate one and only one schema"#,
        "Found 2 valid",
    ];
    assert_invalid(&client, &ns, store, &mentions).await;
}

#[tokio::test]
async fn rejects_a_datastore_without_a_store_kind() {
    let (client, ns) = setup("store-no-kind").await;
    let store = object("DataStore", "none", json!({"limits": {"concurrency": 2}}));
    let mentions = [
        r#""spec" must validate one and only one schema"#,
        "Found none valid",
    ];
    assert_invalid(&client, &ns, store, &mentions).await;
}

#[tokio::test]
async fn rejects_a_legal_hold_that_holds_nothing() {
    let (client, ns) = setup("empty-hold").await;
    let hold = object(
        "LegalHold",
        "nothing",
        json!({"reason": "Pending litigation"}),
    );
    let mentions = [r#""spec" must validate at least one schema (anyOf)"#];
    assert_invalid(&client, &ns, hold, &mentions).await;
}

#[tokio::test]
async fn kubectl_lists_every_kind_with_its_printer_columns() {
    let (client, ns) = setup("kubectl-get").await;
    for example in documented_examples() {
        create(&client, &ns, &example).await.unwrap();
    }
    let plane = ControlPlane::get();
    let kubectl = |args: &[&str]| {
        let out = plane
            .kubectl()
            .args(args)
            .output()
            .expect("cannot run kubectl");
        assert!(
            out.status.success(),
            "kubectl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };

    let all = kubectl(&["get", "tombstone", "-n", &ns]);
    for name in [
        "datastore.tombstone.dev/cache",
        "datastore.tombstone.dev/search",
        "retentionpolicy.tombstone.dev/mailer-data",
        "erasurerequest.tombstone.dev/dsr-2026-0042",
        "legalhold.tombstone.dev/litigation-2026-17",
    ] {
        assert!(
            all.contains(name),
            "`kubectl get tombstone` lacks {name}:\n{all}"
        );
    }
    assert!(
        all.contains("RETENTION") && all.contains("COMPLIANT"),
        "{all}"
    );

    // Each kind by its short name, with exactly its printer columns.
    for (short, columns, row) in [
        ("dstore", "NAME TYPE READY AGE", "cache"),
        (
            "rpol",
            "NAME RETENTION LAST SWEEP DELETED COMPLIANT AGE",
            "mailer-data 30d",
        ),
        ("erasure", "NAME PHASE ERASED DEADLINE AGE", "dsr-2026-0042"),
        ("hold", "NAME ACTIVE EXPIRES AGE", "litigation-2026-17"),
    ] {
        let table = kubectl(&["get", short, "-n", &ns]);
        let lines: Vec<String> = table
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect();
        assert_eq!(
            lines[0], columns,
            "columns of `kubectl get {short}`:\n{table}"
        );
        assert!(
            lines[1..].iter().any(|l| l.starts_with(row)),
            "`kubectl get {short}` lacks a row {row:?}:\n{table}"
        );
    }
}
