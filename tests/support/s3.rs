//! An S3-compatible server on loopback for tests: `moto` in server mode (PyPI
//! `moto[server]`), one per test, with its files in a temporary directory. Stopped, and the
//! directory removed, on drop.

use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{
    BucketVersioningStatus, CreateBucketConfiguration, VersioningConfiguration,
};
use aws_sdk_s3::Client;

use super::{free_ports, log_file, spawn_server, tail, Reaper};

const MOTO_START_TIMEOUT: Duration = Duration::from_secs(60);
/// Credentials moto accepts when it does not check them.
pub const ACCESS_KEY_ID: &str = "AKIAIOSFODNN7EXAMPLE";
pub const SECRET_ACCESS_KEY: &str = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";
pub const REGION: &str = "us-east-1";

pub struct S3Server {
    port: u16,
    process: Child,
    reaper: Reaper,
    dir: tempfile::TempDir,
}

/// The Python that has moto: `MOTO_PYTHON`; else the Python of the virtualenv that
/// `hack/setup.sh` fills (`TOMBSTONE_VENV`, default `.venv` in the repository) when it exists;
/// else `python3`.
fn python() -> String {
    if let Some(python) = std::env::var_os("MOTO_PYTHON").filter(|v| !v.is_empty()) {
        return python.to_string_lossy().into_owned();
    }
    let venv = std::env::var_os("TOMBSTONE_VENV")
        .filter(|v| !v.is_empty())
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv"));
    let python = venv.join("bin/python");
    if python.is_file() {
        python.to_string_lossy().into_owned()
    } else {
        "python3".into()
    }
}

impl S3Server {
    pub fn start() -> S3Server {
        Self::launch(&[])
    }

    /// With request authentication on: only keys of IAM users created through the server are
    /// accepted (see `create_access_key`).
    pub fn start_with_auth() -> S3Server {
        Self::launch(&[("INITIAL_NO_AUTH_ACTION_COUNT", "0")])
    }

    fn launch(env: &[(&str, &str)]) -> S3Server {
        let dir = tempfile::Builder::new()
            .prefix("tombstone-s3-")
            .tempdir()
            .expect("cannot create a temporary directory");
        let mut reaper = Reaper::spawn(dir.path());
        let [port] = free_ports();
        let mut cmd = Command::new(python());
        cmd.args([
            "-m",
            "moto.server",
            "-H",
            "127.0.0.1",
            "-p",
            &port.to_string(),
        ])
        // moto spools large objects to temporary files: keep them in our directory.
        .env("TMPDIR", dir.path())
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(log_file(&dir.path().join("moto.log")))
        .stderr(log_file(&dir.path().join("moto.err")));
        let process = spawn_server(cmd)
            .expect("cannot start moto (hack/setup.sh installs it into .venv; MOTO_PYTHON names the Python)");
        reaper.watch(process.id());
        let mut server = S3Server {
            port,
            process,
            reaper,
            dir,
        };
        let deadline = Instant::now() + MOTO_START_TIMEOUT;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            let exited = server.process.try_wait().ok().flatten();
            if exited.is_some() || Instant::now() > deadline {
                panic!(
                    "moto on port {port} did not listen ({}):\n{}",
                    exited.map_or("timed out".to_string(), |s| s.to_string()),
                    tail(&server.dir.path().join("moto.err"), 20)
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
        server
    }

    /// Creates an IAM user allowed everything, then turns request authentication on: from
    /// then on only that user's keys are accepted. Returns (access key id, secret key).
    pub fn enable_auth(&self) -> (String, String) {
        const SCRIPT: &str = r#"
import json, sys, boto3, requests
base = sys.argv[1]
iam = boto3.client("iam", endpoint_url=base, region_name="us-east-1",
                   aws_access_key_id="test", aws_secret_access_key="test")
iam.create_user(UserName="tombstone")
key = iam.create_access_key(UserName="tombstone")["AccessKey"]
iam.put_user_policy(UserName="tombstone", PolicyName="all", PolicyDocument=json.dumps(
    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
requests.post(base + "/moto-api/reset-auth", data=b"0").raise_for_status()
print(key["AccessKeyId"], key["SecretAccessKey"])
"#;
        let out = Command::new(python())
            .args(["-c", SCRIPT, &self.endpoint()])
            .output()
            .expect("python runs");
        assert!(
            out.status.success(),
            "enabling auth on moto failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let mut words = text.split_whitespace();
        match (words.next(), words.next()) {
            (Some(id), Some(secret)) => (id.to_string(), secret.to_string()),
            _ => panic!("unexpected output from the auth script: {text}"),
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// A client with the given keys.
    pub fn client_with(&self, access_key_id: &str, secret_access_key: &str) -> Client {
        let config = aws_sdk_s3::config::Builder::new()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(REGION))
            .endpoint_url(self.endpoint())
            .force_path_style(true)
            .credentials_provider(Credentials::new(
                access_key_id,
                secret_access_key,
                None,
                None,
                "test",
            ))
            .request_checksum_calculation(
                aws_sdk_s3::config::RequestChecksumCalculation::WhenRequired,
            )
            .build();
        Client::from_conf(config)
    }

    pub fn client(&self) -> Client {
        self.client_with(ACCESS_KEY_ID, SECRET_ACCESS_KEY)
    }

    /// Creates a bucket; `versioned` turns versioning on, `object_lock` enables Object Lock
    /// (which implies versioning).
    pub async fn create_bucket(&self, bucket: &str, versioned: bool, object_lock: bool) {
        let client = self.client();
        let mut create = client.create_bucket().bucket(bucket);
        if REGION != "us-east-1" {
            create = create.create_bucket_configuration(
                CreateBucketConfiguration::builder()
                    .location_constraint(REGION.into())
                    .build(),
            );
        }
        if object_lock {
            create = create.object_lock_enabled_for_bucket(true);
        }
        create.send().await.expect("CreateBucket");
        if versioned || object_lock {
            client
                .put_bucket_versioning()
                .bucket(bucket)
                .versioning_configuration(
                    VersioningConfiguration::builder()
                        .status(BucketVersioningStatus::Enabled)
                        .build(),
                )
                .send()
                .await
                .expect("PutBucketVersioning");
        }
    }

    pub async fn put(&self, bucket: &str, key: &str, body: impl Into<Vec<u8>>) {
        self.client()
            .put_object()
            .bucket(bucket)
            .key(key)
            .body(ByteStream::from(body.into()))
            .send()
            .await
            .unwrap_or_else(|e| panic!("PutObject {key}: {e:?}"));
    }

    /// Puts an object under an Object Lock legal hold (the bucket must have Object Lock).
    pub async fn put_on_legal_hold(&self, bucket: &str, key: &str, body: &'static [u8]) {
        self.client()
            .put_object()
            .bucket(bucket)
            .key(key)
            .body(ByteStream::from_static(body))
            // Object Lock uploads must carry a checksum.
            .checksum_algorithm(aws_sdk_s3::types::ChecksumAlgorithm::Crc32)
            .object_lock_legal_hold_status(aws_sdk_s3::types::ObjectLockLegalHoldStatus::On)
            .send()
            .await
            .unwrap_or_else(|e| panic!("PutObject {key} under legal hold: {e:?}"));
    }

    pub async fn get(&self, bucket: &str, key: &str) -> Vec<u8> {
        let out = self
            .client()
            .get_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GetObject {key}: {e:?}"));
        out.body
            .collect()
            .await
            .expect("body")
            .into_bytes()
            .to_vec()
    }

    /// Every key (current objects) under `prefix`, sorted.
    pub async fn keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let mut keys = Vec::new();
        let mut pages = self
            .client()
            .list_objects_v2()
            .bucket(bucket)
            .prefix(prefix)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.expect("ListObjectsV2");
            keys.extend(
                page.contents()
                    .iter()
                    .filter_map(|o| o.key().map(String::from)),
            );
        }
        keys.sort();
        keys
    }

    /// Every version and delete marker under `prefix`, as (key, version id, is marker).
    pub async fn versions(&self, bucket: &str, prefix: &str) -> Vec<(String, String, bool)> {
        let out = self
            .client()
            .list_object_versions()
            .bucket(bucket)
            .prefix(prefix)
            .send()
            .await
            .expect("ListObjectVersions");
        let mut all: Vec<(String, String, bool)> = out
            .versions()
            .iter()
            .map(|v| {
                (
                    v.key().unwrap_or_default().to_string(),
                    v.version_id().unwrap_or_default().to_string(),
                    false,
                )
            })
            .chain(out.delete_markers().iter().map(|m| {
                (
                    m.key().unwrap_or_default().to_string(),
                    m.version_id().unwrap_or_default().to_string(),
                    true,
                )
            }))
            .collect();
        all.sort();
        all
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
        self.reaper.disarm();
    }
}
