//! The digest key Secret on a real API server, and `tombstone digest` run as a binary.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ListParams};

use tombstone::audit::{
    identifier_digest, load_key, load_or_create_key, DigestKey, DIGEST_KEY_SECRET,
};

use crate::support::{test_namespace, ControlPlane};

/// `tombstone` with no ambient cluster or namespace settings.
fn tombstone() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tombstone"));
    cmd.env_remove("POD_NAMESPACE")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .env_remove("RUST_LOG");
    cmd
}

fn stdout_of(output: &Output) -> String {
    assert!(
        output.status.success(),
        "tombstone digest failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).expect("stdout is UTF-8")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_loads_agree_on_one_key() {
    let client = ControlPlane::get().client();
    // Both calls usually read "absent" and both create, so one create meets 409 and reads
    // the winner's key; a few namespaces make that interleaving all but certain to occur.
    for _ in 0..3 {
        let ns = test_namespace(&client, "digest").await;
        let (a, b) = tokio::join!(
            load_or_create_key(&client, &ns),
            load_or_create_key(&client, &ns)
        );
        let (a, b) = (a.expect("first load"), b.expect("second load"));
        assert_eq!(a, b, "both callers must use the same key");

        let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
        let all = secrets
            .list(&ListParams::default())
            .await
            .expect("list Secrets");
        let names: Vec<_> = all
            .items
            .iter()
            .map(|s| s.metadata.name.clone().unwrap_or_default())
            .collect();
        assert_eq!(names, [DIGEST_KEY_SECRET], "exactly one Secret");
        let secret = &all.items[0];
        assert_eq!(
            secret.metadata.labels.as_ref().expect("labels")["app.kubernetes.io/managed-by"],
            "tombstone"
        );
        let stored = &secret.data.as_ref().expect("Secret data")["key"];
        assert_eq!(stored.0, a.as_bytes(), "the Secret holds the returned key");

        // Later loads, creating or not, read the same key.
        assert_eq!(load_or_create_key(&client, &ns).await.unwrap(), a);
        assert_eq!(load_key(&client, &ns).await.unwrap(), a);
    }
}

#[tokio::test]
async fn load_key_never_creates() {
    let client = ControlPlane::get().client();
    let ns = test_namespace(&client, "digest-absent").await;
    let error = load_key(&client, &ns).await.expect_err("no key Secret yet");
    assert_eq!(error.reason(), "DigestKeyNotFound");
    let secrets: Api<Secret> = Api::namespaced(client, &ns);
    assert!(secrets.get_opt(DIGEST_KEY_SECRET).await.unwrap().is_none());

    // Nor does the CLI: it fails, naming the Secret.
    let output = tombstone()
        .args(["digest", "email", "alice@example.com", "--namespace", &ns])
        .env("KUBECONFIG", ControlPlane::get().kubeconfig_path())
        .output()
        .expect("cannot run tombstone");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(DIGEST_KEY_SECRET), "{stderr}");
    assert!(secrets.get_opt(DIGEST_KEY_SECRET).await.unwrap().is_none());
}

#[tokio::test]
async fn cli_prints_the_operators_digest() {
    let client = ControlPlane::get().client();
    let ns = test_namespace(&client, "digest-cli").await;
    let key = load_or_create_key(&client, &ns).await.expect("key");

    let output = tombstone()
        .args(["digest", "email", " Alice@Example.com", "--namespace", &ns])
        .env("KUBECONFIG", ControlPlane::get().kubeconfig_path())
        .output()
        .expect("cannot run tombstone");
    let expected = identifier_digest(&key, "email", "alice@example.com");
    assert_eq!(stdout_of(&output), format!("{expected}\n"));

    // The namespace can come from POD_NAMESPACE too.
    let output = tombstone()
        .args(["digest", "userId", "4711"])
        .env("POD_NAMESPACE", &ns)
        .env("KUBECONFIG", ControlPlane::get().kubeconfig_path())
        .output()
        .expect("cannot run tombstone");
    assert_eq!(
        stdout_of(&output),
        format!("{}\n", identifier_digest(&key, "userId", "4711"))
    );
}

#[test]
fn cli_with_a_key_file_needs_no_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let key_path = dir.path().join("digest.key");
    let key = DigestKey::generate();
    std::fs::write(&key_path, key.as_bytes()).unwrap();
    let no_cluster = dir.path().join("no-such-kubeconfig");
    let expected = format!(
        "{}\n",
        identifier_digest(&key, "email", "alice@example.com")
    );

    let output = tombstone()
        .args(["digest", "email", "ALICE@example.com "])
        .arg("--key-file")
        .arg(&key_path)
        .env("KUBECONFIG", &no_cluster)
        .output()
        .expect("cannot run tombstone");
    assert_eq!(stdout_of(&output), expected);

    // `-` reads the identifier from standard input, keeping it out of shell history.
    let mut child = tombstone()
        .args(["digest", "email", "-"])
        .arg("--key-file")
        .arg(&key_path)
        .env("KUBECONFIG", &no_cluster)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot run tombstone");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"Alice@Example.com\n")
        .unwrap();
    assert_eq!(stdout_of(&child.wait_with_output().unwrap()), expected);

    // A key that is too short is refused, without showing its bytes.
    let short_path = dir.path().join("short.key");
    std::fs::write(&short_path, b"not-a-long-enough-key").unwrap();
    let output = tombstone()
        .args(["digest", "email", "alice@example.com"])
        .arg("--key-file")
        .arg(&short_path)
        .env("KUBECONFIG", &no_cluster)
        .output()
        .expect("cannot run tombstone");
    assert!(!output.status.success());
    assert!(output.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("at least 32"), "{stderr}");
    assert!(!stderr.contains("not-a-long-enough-key"), "{stderr}");
}
