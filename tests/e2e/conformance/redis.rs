//! The Redis driver against a real redis-server (one per test), mode `timestamp`: hashes
//! `<dataset>:s:old-<n>` / `new-<n>` with a `createdAt` field; a subject's keys are
//! `<dataset>:u:<userId>:<n>` and `<dataset>:m:<email>:<n>`.

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use redis::aio::MultiplexedConnection;
use serde_json::json;

use tombstone::api::retentionpolicy::Target;
use tombstone::backends::redis::{RedisBackend, RedisConfig};
use tombstone::backends::{Backend, Limits};

use super::{Fixture, Owner};
use crate::fixtures::{count_keys, redis_conn};
use crate::support::RedisServer;

pub struct RedisFixture {
    server: RedisServer,
    conn: MultiplexedConnection,
}

impl RedisFixture {
    async fn set_many(&self, keys: impl IntoIterator<Item = (String, i64)>) {
        let mut pipe = redis::pipe();
        for (key, at) in keys {
            pipe.cmd("HSET").arg(key).arg("createdAt").arg(at).ignore();
        }
        let _: () = pipe
            .query_async(&mut self.conn.clone())
            .await
            .expect("HSET");
    }
}

#[async_trait]
impl Fixture for RedisFixture {
    async fn start() -> Self {
        let server = RedisServer::start();
        let conn = redis_conn(&server.url()).await;
        Self { server, conn }
    }

    fn backend(&self) -> Arc<dyn Backend> {
        Arc::new(RedisBackend::new(
            RedisConfig {
                url: self.server.url(),
                password: None,
                cluster: false,
            },
            Limits::default(),
        ))
    }

    fn target(&self, dataset: &str) -> Target {
        serde_json::from_value(json!({"name": dataset, "store": "cache",
        "redis": {"keyPattern": format!("{dataset}:*"), "mode": "timestamp",
            "timestampField": "createdAt"},
        "subject": {"redis": {"keys": [
            format!("{dataset}:u:{{userId}}:*"),
            format!("{dataset}:m:{{email}}:*")
        ]}}}))
        .expect("a valid target")
    }

    fn target_without_identifier(&self, dataset: &str) -> Target {
        let mut t = self.target(dataset);
        if let Some(tombstone::api::retentionpolicy::SubjectLocator::Redis(r)) = t.subject.as_mut()
        {
            r.keys = vec![format!("{dataset}:u:everyone:*")];
        }
        t
    }

    async fn seed(&self, dataset: &str, expired: usize, young: usize) -> DateTime<Utc> {
        let now = Utc::now().timestamp();
        let old = (0..expired).map(|n| (format!("{dataset}:s:old-{n}"), now - 90 * 86_400));
        let new = (0..young).map(|n| (format!("{dataset}:s:new-{n}"), now));
        self.set_many(old.chain(new)).await;
        Utc::now() - chrono::Duration::days(30)
    }

    async fn seed_owner(&self, dataset: &str, owner: &Owner, n: usize) -> u64 {
        let now = Utc::now().timestamp();
        let by_user = (0..n).map(|i| (format!("{dataset}:u:{}:{i}", owner.user_id), now));
        let by_mail = (0..n).map(|i| (format!("{dataset}:m:{}:{i}", owner.email), now));
        self.set_many(by_user.chain(by_mail)).await;
        2 * n as u64
    }

    async fn count(&self, dataset: &str, _cutoff: DateTime<Utc>) -> (u64, u64) {
        let mut conn = self.conn.clone();
        let old = count_keys(&mut conn, &format!("{dataset}:s:old-*")).await;
        let new = count_keys(&mut conn, &format!("{dataset}:s:new-*")).await;
        (old as u64, new as u64)
    }

    async fn count_owner(&self, dataset: &str, owner: &Owner) -> u64 {
        let mut conn = self.conn.clone();
        let user = count_keys(&mut conn, &format!("{dataset}:u:{}:*", owner.user_id)).await;
        let mail = count_keys(&mut conn, &format!("{dataset}:m:{}:*", owner.email)).await;
        (user + mail) as u64
    }
}

crate::conformance!(tests, RedisFixture);
