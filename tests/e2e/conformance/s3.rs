//! The S3 driver against moto (one server per test), on a plain bucket (`tests`) and on a
//! versioned one (`versioned`: sweeps and erasures delete versions by id): objects
//! `<dataset>/s/old-<n>` put before the cutoff and `<dataset>/s/new-<n>` after it (moto
//! stamps LastModified itself, so the fixture waits across the cutoff); a subject's objects
//! are under `<dataset>/u/<userId>/` and `<dataset>/m/<email>/`.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_s3::primitives::ByteStream;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde_json::json;

use tombstone::api::retentionpolicy::Target;
use tombstone::backends::Backend;

use super::{Fixture, Owner};
use crate::support::s3::S3Server;

const BUCKET: &str = "conformance";

/// The fixture on a plain bucket (`VERSIONED: false`) or a versioned one.
pub struct BucketFixture<const VERSIONED: bool> {
    server: S3Server,
}

pub type S3Fixture = BucketFixture<false>;
pub type S3VersionedFixture = BucketFixture<true>;

impl<const VERSIONED: bool> BucketFixture<VERSIONED> {
    async fn put_many(&self, keys: Vec<String>) {
        let client = self.server.client();
        futures::stream::iter(keys)
            .map(|key| {
                let client = client.clone();
                async move {
                    client
                        .put_object()
                        .bucket(BUCKET)
                        .key(&key)
                        .body(ByteStream::from_static(b"{\"msg\":\"x\"}\n"))
                        .send()
                        .await
                        .unwrap_or_else(|e| panic!("PutObject: {e:?}"));
                }
            })
            .buffer_unordered(16)
            .collect::<Vec<()>>()
            .await;
    }

    async fn count_prefix(&self, prefix: &str) -> u64 {
        self.server.keys(BUCKET, prefix).await.len() as u64
    }
}

#[async_trait]
impl<const VERSIONED: bool> Fixture for BucketFixture<VERSIONED> {
    async fn start() -> Self {
        let server = S3Server::start();
        server.create_bucket(BUCKET, VERSIONED, false).await;
        Self { server }
    }

    fn backend(&self) -> Arc<dyn Backend> {
        Arc::new(crate::s3::backend(&self.server, BUCKET))
    }

    fn target(&self, dataset: &str) -> Target {
        serde_json::from_value(json!({"name": dataset, "store": "archive",
        "s3": {"prefix": format!("{dataset}/")},
        "subject": {"s3": {"keyPrefixes": [
            format!("{dataset}/u/{{userId}}/"),
            format!("{dataset}/m/{{email}}/")
        ]}}}))
        .expect("a valid target")
    }

    fn target_without_identifier(&self, dataset: &str) -> Target {
        let mut t = self.target(dataset);
        if let Some(tombstone::api::retentionpolicy::SubjectLocator::S3(s)) = t.subject.as_mut() {
            s.key_prefixes = vec![format!("{dataset}/u/everyone/")];
        }
        t
    }

    async fn seed(&self, dataset: &str, expired: usize, young: usize) -> DateTime<Utc> {
        self.put_many(
            (0..expired)
                .map(|n| format!("{dataset}/s/old-{n}"))
                .collect(),
        )
        .await;
        // LastModified has whole seconds: the cutoff lies a second after the last old object
        // and a second before the first young one.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let cutoff = Utc::now();
        tokio::time::sleep(Duration::from_millis(1100)).await;
        self.put_many((0..young).map(|n| format!("{dataset}/s/new-{n}")).collect())
            .await;
        cutoff
    }

    async fn seed_owner(&self, dataset: &str, owner: &Owner, n: usize) -> u64 {
        let mut keys: Vec<String> = (0..n)
            .map(|i| format!("{dataset}/u/{}/{i}", owner.user_id))
            .collect();
        keys.extend((0..n).map(|i| format!("{dataset}/m/{}/{i}", owner.email)));
        self.put_many(keys).await;
        2 * n as u64
    }

    async fn count(&self, dataset: &str, _cutoff: DateTime<Utc>) -> (u64, u64) {
        (
            self.count_prefix(&format!("{dataset}/s/old-")).await,
            self.count_prefix(&format!("{dataset}/s/new-")).await,
        )
    }

    async fn count_owner(&self, dataset: &str, owner: &Owner) -> u64 {
        self.count_prefix(&format!("{dataset}/u/{}/", owner.user_id))
            .await
            + self
                .count_prefix(&format!("{dataset}/m/{}/", owner.email))
                .await
    }

    // A step handles at least one ListObjectsV2 page (1000 keys) before it looks at its
    // budget: only more than a page shows a step interrupted.
    fn many(&self) -> usize {
        1050
    }
}

crate::conformance!(tests, S3Fixture);
crate::conformance!(versioned, S3VersionedFixture);
