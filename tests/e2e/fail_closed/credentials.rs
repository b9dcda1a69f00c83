//! The operator is no deputy for credentials: a DataStore can
//! name any host, so the operator reads a Secret as store credentials only when the Secret
//! is labelled for it, sends credentials in plain text only when the DataStore says
//! `insecure: true`, and lends its own cloud identity only when started to allow it.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams};
use kube::Api;
use serde_json::{json, Value};
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;

use tombstone::api::{ConditionStatus, DataStore, RetentionPolicy};

use crate::fixtures::*;
use crate::support::s3::S3Server;
use crate::support::{wait_for, ControlPlane, RedisServer};

const LABEL: &str = "tombstone.dev/credentials";

/// A value no test or server writes anywhere else, so finding it proves where it went.
fn probe(what: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{what}-probe-{nanos:x}")
}

/// A host of the attacker's choosing: accepts connections on loopback, never answers, and
/// keeps every byte it is sent.
struct Catcher {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    received: Arc<Mutex<Vec<u8>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Catcher {
    async fn start() -> Catcher {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local address");
        let connections = Arc::new(AtomicUsize::new(0));
        let received = Arc::new(Mutex::new(Vec::new()));
        let (count, bytes) = (connections.clone(), received.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let bytes = bytes.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = socket.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        bytes
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .extend_from_slice(&buf[..n]);
                    }
                });
            }
        });
        Catcher {
            addr,
            connections,
            received,
            task,
        }
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    fn received(&self) -> String {
        String::from_utf8_lossy(&self.received.lock().unwrap_or_else(|p| p.into_inner()))
            .into_owned()
    }
}

impl Drop for Catcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Kills the child on drop, so a failing test leaves no operator behind.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn datastore(client: &kube::Client, ns: &str, name: &str, spec: Value) {
    create::<DataStore>(
        client,
        ns,
        json!({"apiVersion": "tombstone.dev/v1alpha1", "kind": "DataStore",
               "metadata": {"name": name}, "spec": spec}),
    )
    .await;
}

/// Waits for Ready=False and returns its reason and message.
async fn refused(client: &kube::Client, ns: &str, name: &str) -> (String, String) {
    let store = wait_store_ready(client, ns, name, false).await;
    let (_, reason, message) = condition(&store.status.expect("status").conditions, "Ready");
    (reason, message)
}

/// Everything the operator wrote about `names`: status, events and its log.
async fn trail(client: &kube::Client, ns: &str, names: &[&str]) -> String {
    let api: Api<DataStore> = Api::namespaced(client.clone(), ns);
    let mut out = String::new();
    for name in names {
        let store = api.get(name).await.expect("get DataStore");
        out.push_str(&serde_json::to_string(&store.status).unwrap_or_default());
        out.push_str(&format!("{:?}", events_for(client, ns, name).await));
    }
    out.push_str(&format!("{:?}", captured_logs()));
    out
}

#[tokio::test]
async fn a_secret_not_labelled_as_store_credentials_is_never_read_nor_sent() {
    let (client, ns) = setup("fc-cred-label").await;
    let password = probe("pw");
    let redis = RedisServer::start_with_password(&password);
    let catcher = Catcher::start().await;
    let operator = TestOperator::start(&ns).await;
    // Another team's Secret, with the keys each store kind would read.
    create_secret(
        &client,
        &ns,
        "team-db",
        json!({"password": password, "username": "app",
               "accessKeyId": "AKIAIOSFODNN7EXAMPLE", "secretAccessKey": password}),
    )
    .await;
    let redis_ref = json!({"name": "team-db", "key": "password"});
    // `insecure: true` everywhere: the label alone must stop them.
    datastore(
        &client,
        &ns,
        "cache",
        json!({"redis": {"url": format!("redis://127.0.0.1:{}", redis.port()),
                         "passwordSecretRef": redis_ref}, "insecure": true}),
    )
    .await;
    datastore(
        &client,
        &ns,
        "elsewhere",
        json!({"redis": {"url": format!("redis://{}", catcher.addr),
                         "passwordSecretRef": redis_ref}, "insecure": true}),
    )
    .await;
    datastore(
        &client,
        &ns,
        "search",
        json!({"elasticsearch": {"url": format!("http://{}", catcher.addr),
                                 "credentialsSecretRef": {"name": "team-db"}}, "insecure": true}),
    )
    .await;
    datastore(
        &client,
        &ns,
        "archive",
        json!({"s3": {"bucket": "archive", "endpoint": format!("http://{}", catcher.addr),
                      "forcePathStyle": true, "credentialsSecretRef": {"name": "team-db"}},
               "insecure": true}),
    )
    .await;

    let names = ["cache", "elsewhere", "search", "archive"];
    for name in names {
        let (reason, message) = refused(&client, &ns, name).await;
        assert_eq!(reason, "CredentialsNotPermitted", "{name}: {message}");
        assert!(
            message.contains("team-db") && message.contains(LABEL),
            "{name}: the message names the Secret and the label: {message}"
        );
        wait_event(&client, &ns, name, |(t, r, _)| {
            t == "Warning" && r == "CredentialsNotPermitted"
        })
        .await;
    }
    assert_eq!(
        catcher.connections(),
        0,
        "a store was contacted with credentials it may not use"
    );
    let written = trail(&client, &ns, &names).await;
    assert!(
        !written.contains(&password),
        "the password leaked: {written}"
    );

    // The Secret's owner opts in: the same DataStore becomes Ready without an edit.
    Api::<Secret>::namespaced(client.clone(), &ns)
        .patch(
            "team-db",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {LABEL: "true"}}})),
        )
        .await
        .expect("label the Secret");
    let store = wait_store_ready(&client, &ns, "cache", true).await;
    let status = store.status.expect("status");
    assert!(status.insecure, "plain text is shown in status");
    // And from then on it goes wherever a DataStore of the namespace says: the label is the
    // owner's decision, which is why it is required.
    wait_for(
        "the password at the other host",
        Duration::from_secs(30),
        || async { catcher.received().contains(&password).then_some(()) },
    )
    .await;
    operator.stop().await;
}

#[tokio::test]
async fn credentials_travel_in_plain_text_only_where_the_datastore_says_insecure() {
    let (client, ns) = setup("fc-cred-plain").await;
    let password = probe("pw");
    let redis = RedisServer::start_with_password(&password);
    let s3 = S3Server::start();
    s3.create_bucket("archive", false, false).await;
    let (key_id, secret_key) = s3.enable_auth();
    let catcher = Catcher::start().await;
    let operator = TestOperator::start(&ns).await;
    create_credentials_secret(&client, &ns, "cache-auth", json!({"password": password})).await;
    create_credentials_secret(
        &client,
        &ns,
        "http-auth",
        json!({"username": "tombstone", "password": password}),
    )
    .await;
    create_credentials_secret(
        &client,
        &ns,
        "s3-auth",
        json!({"accessKeyId": key_id, "secretAccessKey": secret_key}),
    )
    .await;
    let redis_ref = json!({"name": "cache-auth", "key": "password"});
    let tapped = format!("http://{}", catcher.addr);
    for (name, spec, secret) in [
        (
            "cache",
            json!({"redis": {"url": format!("redis://127.0.0.1:{}", redis.port()),
                             "passwordSecretRef": redis_ref}}),
            Some("cache-auth"),
        ),
        (
            "tapped",
            json!({"redis": {"url": format!("redis://{}", catcher.addr),
                             "passwordSecretRef": redis_ref}}),
            Some("cache-auth"),
        ),
        (
            "inline",
            json!({"redis": {"url": format!("redis://:{password}@{}", catcher.addr)}}),
            None,
        ),
        (
            "logs",
            json!({"loki": {"url": tapped, "credentialsSecretRef": {"name": "http-auth"}}}),
            Some("http-auth"),
        ),
        (
            "search",
            json!({"elasticsearch": {"url": tapped, "credentialsSecretRef": {"name": "http-auth"}}}),
            Some("http-auth"),
        ),
        (
            "archive",
            json!({"s3": {"bucket": "archive", "region": "us-east-1", "endpoint": s3.endpoint(),
                          "forcePathStyle": true, "credentialsSecretRef": {"name": "s3-auth"}}}),
            Some("s3-auth"),
        ),
    ] {
        datastore(&client, &ns, name, spec).await;
        let (reason, message) = refused(&client, &ns, name).await;
        assert_eq!(reason, "InsecureTransport", "{name}: {message}");
        assert!(message.contains("insecure: true"), "{name}: {message}");
        if let Some(secret) = secret {
            assert!(message.contains(secret), "{name}: {message}");
        }
        wait_event(&client, &ns, name, |(t, r, _)| {
            t == "Warning" && r == "InsecureTransport"
        })
        .await;
    }
    assert_eq!(
        catcher.connections(),
        0,
        "credentials went out in plain text"
    );

    // TLS needs no opt-in: the store is contacted (here it never answers the handshake),
    // and nothing readable is sent.
    datastore(
        &client,
        &ns,
        "tls",
        json!({"redis": {"url": format!("rediss://{}", catcher.addr),
                         "passwordSecretRef": redis_ref}}),
    )
    .await;
    wait_for(
        "a TLS handshake at the host",
        Duration::from_secs(30),
        || async { (catcher.connections() > 0).then_some(()) },
    )
    .await;
    let (reason, message) = refused(&client, &ns, "tls").await;
    assert_ne!(reason, "InsecureTransport", "{message}");
    assert!(!catcher.received().contains(&password));

    // With insecure: true the same stores connect, and status says so.
    for name in ["cache", "archive"] {
        patch_spec::<DataStore>(&client, &ns, name, json!({"insecure": true})).await;
    }
    let api: Api<DataStore> = Api::namespaced(client.clone(), &ns);
    for name in ["cache", "archive"] {
        let store = wait_for(
            &format!("{name} Ready at generation 2"),
            Duration::from_secs(30),
            || {
                let api = api.clone();
                async move {
                    let s = api.get(name).await.ok()?;
                    let st = s.status.as_ref()?;
                    let (ready, _, _) = condition(&st.conditions, "Ready");
                    (st.observed_generation == Some(2) && ready == ConditionStatus::True)
                        .then_some(s)
                }
            },
        )
        .await;
        assert!(store.status.expect("status").insecure, "{name}");
    }
    let written = trail(
        &client,
        &ns,
        &["cache", "tapped", "inline", "logs", "search"],
    )
    .await;
    assert!(
        !written.contains(&password),
        "the password leaked: {written}"
    );

    // The register of processing activities shows it too.
    create::<RetentionPolicy>(
        &client,
        &ns,
        policy_json(
            "sessions",
            "30d",
            json!([{"name": "sessions", "store": "cache", "redis": {"keyPattern": "session:*"}}]),
        ),
    )
    .await;
    let ropa = Command::new(env!("CARGO_BIN_EXE_tombstone"))
        .args(["ropa", "--namespace", &ns])
        .env("KUBECONFIG", ControlPlane::get().kubeconfig_path())
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("RUST_LOG")
        .output()
        .expect("run tombstone ropa");
    let register = String::from_utf8_lossy(&ropa.stdout);
    assert!(ropa.status.success(), "{register}");
    assert!(
        register.contains("(DataStore cache, insecure: credentials sent without TLS)"),
        "{register}"
    );
    operator.stop().await;
}

#[tokio::test]
async fn the_operators_own_cloud_identity_is_lent_only_when_allowed() {
    let (client, ns) = setup("fc-cred-ambient").await;
    let s3 = S3Server::start();
    s3.create_bucket("archive", false, false).await;
    // The server accepts only these keys; they reach the operator only through its
    // environment, as on a node or pod with a cloud identity.
    let (key_id, secret_key) = s3.enable_auth();
    let catcher = Catcher::start().await;
    datastore(
        &client,
        &ns,
        "archive",
        json!({"s3": {"bucket": "archive", "region": "us-east-1", "endpoint": s3.endpoint(),
                      "forcePathStyle": true}, "insecure": true}),
    )
    .await;
    datastore(
        &client,
        &ns,
        "elsewhere",
        json!({"s3": {"bucket": "archive", "region": "us-east-1",
                      "endpoint": format!("http://{}", catcher.addr), "forcePathStyle": true},
               "insecure": true}),
    )
    .await;
    let run = |allow: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tombstone"));
        cmd.args([
            "run",
            "--namespace",
            &ns,
            "--leader-election=false",
            "--http-addr",
            "127.0.0.1:0",
        ])
        .env("KUBECONFIG", ControlPlane::get().kubeconfig_path())
        .env("POD_NAMESPACE", &ns)
        .env("AWS_ACCESS_KEY_ID", &key_id)
        .env("AWS_SECRET_ACCESS_KEY", &secret_key)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env_remove("AWS_PROFILE")
        .env_remove("ALLOW_AMBIENT_CREDENTIALS")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        if let Some(value) = allow {
            cmd.env("ALLOW_AMBIENT_CREDENTIALS", value);
        }
        KillOnDrop(cmd.spawn().expect("start tombstone run"))
    };

    // Off by default.
    let operator = run(None);
    for name in ["archive", "elsewhere"] {
        let (reason, message) = refused(&client, &ns, name).await;
        assert_eq!(reason, "AmbientCredentialsNotAllowed", "{name}: {message}");
        assert!(
            message.contains("--allow-ambient-credentials"),
            "{name}: {message}"
        );
    }
    assert_eq!(catcher.connections(), 0, "signed requests went out");
    drop(operator);

    // Allowed by the operator's environment (the Helm value sets the flag).
    let _operator = run(Some("true"));
    let store = wait_store_ready(&client, &ns, "archive", true).await;
    let (_, reason, message) = condition(&store.status.expect("status").conditions, "Ready");
    assert_eq!(
        (reason.as_str(), message.as_str()),
        ("Connected", "s3 bucket archive")
    );
}
