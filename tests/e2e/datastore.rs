//! The DataStore controller against a real API server and real redis-servers.

use k8s_openapi::api::core::v1::Secret;
use kube::api::PostParams;
use kube::Api;
use serde_json::json;

use tombstone::api::ConditionStatus;

use crate::fixtures::*;
use crate::support::RedisServer;

#[tokio::test]
async fn a_reachable_redis_is_ready_with_its_version() {
    let (client, ns) = setup("ds-ready").await;
    let redis = RedisServer::start();
    let operator = TestOperator::start(&ns).await;
    redis_store(&client, &ns, "cache", &redis.url(), json!({})).await;

    let store = wait_store_ready(&client, &ns, "cache", true).await;
    let status = store.status.unwrap();
    let (_, reason, message) = condition(&status.conditions, "Ready");
    assert_eq!(reason, "Connected");
    assert!(message.starts_with("redis 7."), "{message}");
    assert_eq!(status.store_type.as_deref(), Some("redis"));
    assert_eq!(status.observed_generation, Some(1));
    wait_event(&client, &ns, "cache", |(t, r, _)| {
        t == "Normal" && r == "Connected"
    })
    .await;
    operator.stop().await;
}

#[tokio::test]
async fn a_missing_secret_is_reported_then_the_store_recovers_when_it_appears() {
    let (client, ns) = setup("ds-secret").await;
    let redis = RedisServer::start_with_password("s3cret-pass");
    let operator = TestOperator::start(&ns).await;
    redis_store(
        &client,
        &ns,
        "cache",
        &redis.url(),
        json!({"redis": {"passwordSecretRef": {"name": "redis-auth", "key": "password"}},
               "insecure": true}),
    )
    .await;

    let store = wait_store_ready(&client, &ns, "cache", false).await;
    let (status, reason, message) = condition(&store.status.unwrap().conditions, "Ready");
    assert_eq!(
        (status, reason.as_str()),
        (ConditionStatus::False, "SecretNotFound")
    );
    assert!(message.contains("redis-auth"), "{message}");
    wait_event(&client, &ns, "cache", |(t, r, _)| {
        t == "Warning" && r == "SecretNotFound"
    })
    .await;

    // The wrong password is an authentication failure, not "unreachable".
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let secret = |pw: &str| -> Secret {
        serde_json::from_value(json!({"metadata": {"name": "redis-auth",
                                "labels": {"tombstone.dev/credentials": "true"}},
                   "stringData": {"password": pw}}))
        .unwrap()
    };
    secrets
        .create(&PostParams::default(), &secret("wrong"))
        .await
        .unwrap();
    let api: Api<tombstone::api::DataStore> = Api::namespaced(client.clone(), &ns);
    crate::support::wait_for(
        "AuthenticationFailed",
        std::time::Duration::from_secs(60),
        || {
            let api = api.clone();
            async move {
                let s = api.get("cache").await.ok()?;
                let (_, reason, _) = condition(&s.status?.conditions, "Ready");
                (reason == "AuthenticationFailed").then_some(())
            }
        },
    )
    .await;

    // The right password: retried with backoff, the store becomes ready without any edit.
    secrets
        .replace("redis-auth", &PostParams::default(), &secret("s3cret-pass"))
        .await
        .unwrap();
    let store = wait_store_ready(&client, &ns, "cache", true).await;
    let conditions = store.status.unwrap().conditions;
    assert!(!serde_json::to_string(&conditions)
        .unwrap()
        .contains("s3cret-pass"));
    operator.stop().await;
}

#[tokio::test]
async fn an_unreachable_store_is_not_ready() {
    let (client, ns) = setup("ds-down").await;
    // A port nothing listens on: bind, read the port, close.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let operator = TestOperator::start(&ns).await;
    redis_store(
        &client,
        &ns,
        "cache",
        &format!("redis://127.0.0.1:{port}/0"),
        json!({}),
    )
    .await;
    let store = wait_store_ready(&client, &ns, "cache", false).await;
    let (_, reason, _) = condition(&store.status.unwrap().conditions, "Ready");
    assert_eq!(reason, "Unreachable");
    operator.stop().await;
}

/// A redis-server serving TLS only, with a self-signed certificate made by `openssl`.
struct TlsRedis {
    port: u16,
    process: std::process::Child,
    _dir: tempfile::TempDir,
}

impl TlsRedis {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        let status = std::process::Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=127.0.0.1",
                "-keyout",
            ])
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success());
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let process = std::process::Command::new("redis-server")
            .args([
                "--port",
                "0",
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--tls-auth-clients",
                "no",
            ])
            .arg("--tls-port")
            .arg(port.to_string())
            .arg("--tls-cert-file")
            .arg(&cert)
            .arg("--tls-key-file")
            .arg(&key)
            .arg("--tls-ca-cert-file")
            .arg(&cert)
            .arg("--dir")
            .arg(dir.path())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        Self {
            port,
            process,
            _dir: dir,
        }
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

#[tokio::test]
async fn a_tls_redis_is_probed_over_rediss() {
    let (client, ns) = setup("ds-tls").await;
    let redis = TlsRedis::start();
    let operator = TestOperator::start(&ns).await;
    // `#insecure`: the test certificate is self-signed.
    redis_store(
        &client,
        &ns,
        "cache",
        &format!("rediss://127.0.0.1:{}/#insecure", redis.port),
        json!({}),
    )
    .await;
    let store = wait_store_ready(&client, &ns, "cache", true).await;
    assert_eq!(
        condition(&store.status.unwrap().conditions, "Ready").1,
        "Connected"
    );
    operator.stop().await;
}
