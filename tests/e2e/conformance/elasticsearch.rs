//! The Elasticsearch driver against the real OpenSearch 2.19 node of the harness (`tests`)
//! and the real Elasticsearch 7.17 node (`elasticsearch7`), each shared: each test has its
//! own indices `<prefix>-<dataset>`, small, deleted when the test ends.
//! Documents `{"kind": "old"|"new", "@timestamp"}` 90 days old or now; a subject's documents
//! carry `user` and `mail` (keyword fields, as the driver's `term` locator needs).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::{json, Value};

use tombstone::api::retentionpolicy::Target;
use tombstone::backends::elasticsearch::{ElasticsearchBackend, ElasticsearchConfig};
use tombstone::backends::http::HttpAuth;
use tombstone::backends::{Backend, Limits};

use super::{Fixture, Owner};
use crate::support::opensearch::SearchNode;

/// The fixture on the OpenSearch node (`ES7: false`) or the Elasticsearch 7.17 node.
pub struct SearchFixture<const ES7: bool> {
    node: &'static SearchNode,
    prefix: String,
    http: reqwest::Client,
    created: Mutex<HashSet<String>>,
}

pub type ElasticsearchFixture = SearchFixture<false>;
pub type Elasticsearch7Fixture = SearchFixture<true>;

impl<const ES7: bool> SearchFixture<ES7> {
    fn index(&self, dataset: &str) -> String {
        format!("{}-{dataset}", self.prefix)
    }

    async fn ensure_index(&self, index: &str) {
        if !self
            .created
            .lock()
            .expect("indices")
            .insert(index.to_string())
        {
            return;
        }
        let response = self
            .http
            .put(format!("{}/{index}", self.node.url()))
            .json(&json!({
                "settings": {"number_of_shards": 1, "number_of_replicas": 0},
                "mappings": {"properties": {
                    "@timestamp": {"type": "date"},
                    "kind": {"type": "keyword"},
                    "user": {"type": "keyword"},
                    "mail": {"type": "keyword"}
                }}
            }))
            .send()
            .await
            .expect("create index");
        assert!(response.status().is_success(), "create index {index}");
    }

    async fn bulk(&self, dataset: &str, docs: Vec<Value>) {
        let index = self.index(dataset);
        self.ensure_index(&index).await;
        let mut body = String::new();
        for doc in docs {
            body.push_str("{\"index\":{}}\n");
            body.push_str(&doc.to_string());
            body.push('\n');
        }
        let response = self
            .http
            .post(format!("{}/{index}/_bulk?refresh=true", self.node.url()))
            .header("content-type", "application/x-ndjson")
            .body(body)
            .send()
            .await
            .expect("bulk");
        let reply: Value = response.json().await.expect("a bulk reply");
        assert_eq!(reply["errors"], false, "bulk into {index}: {reply}");
    }

    async fn count_where(&self, dataset: &str, query: Value) -> u64 {
        let index = self.index(dataset);
        let url = self.node.url();
        let _ = self
            .http
            .post(format!("{url}/{index}/_refresh"))
            .send()
            .await;
        let reply: Value = self
            .http
            .post(format!("{url}/{index}/_count"))
            .json(&json!({"query": query}))
            .send()
            .await
            .expect("count")
            .json()
            .await
            .expect("a count reply");
        reply["count"]
            .as_u64()
            .unwrap_or_else(|| panic!("_count: {reply}"))
    }
}

impl<const ES7: bool> Drop for SearchFixture<ES7> {
    fn drop(&mut self) {
        let url = format!("{}/{}-*", self.node.url(), self.prefix);
        // Not on the test's runtime, which may be shutting down.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            runtime.block_on(async move {
                let _ = reqwest::Client::new().delete(url).send().await;
            });
        })
        .join();
    }
}

#[async_trait]
impl<const ES7: bool> Fixture for SearchFixture<ES7> {
    async fn start() -> Self {
        let node = if ES7 {
            SearchNode::elasticsearch()
        } else {
            SearchNode::opensearch()
        };
        Self {
            node,
            prefix: node.index_prefix("conformance"),
            http: reqwest::Client::new(),
            created: Mutex::default(),
        }
    }

    fn backend(&self) -> Arc<dyn Backend> {
        Arc::new(ElasticsearchBackend::new(
            ElasticsearchConfig {
                url: self.node.url(),
                auth: HttpAuth::None,
                delete_requests_per_second: None,
            },
            Limits::default(),
        ))
    }

    fn target(&self, dataset: &str) -> Target {
        serde_json::from_value(json!({"name": dataset, "store": "search",
            "elasticsearch": {"index": self.index(dataset), "timestampField": "@timestamp"},
            "subject": {"elasticsearch": {"term": {"user": "{userId}", "mail": "{email}"}}}}))
        .expect("a valid target")
    }

    fn target_without_identifier(&self, dataset: &str) -> Target {
        let mut t = self.target(dataset);
        if let Some(tombstone::api::retentionpolicy::SubjectLocator::Elasticsearch(e)) =
            t.subject.as_mut()
        {
            e.term = [("user".to_string(), "everyone".to_string())].into();
        }
        t
    }

    async fn seed(&self, dataset: &str, expired: usize, young: usize) -> DateTime<Utc> {
        let old = (Utc::now() - chrono::Duration::days(90)).to_rfc3339();
        let now = Utc::now().to_rfc3339();
        let mut docs: Vec<Value> = (0..expired)
            .map(|_| json!({"kind": "old", "@timestamp": old}))
            .collect();
        docs.extend((0..young).map(|_| json!({"kind": "new", "@timestamp": now})));
        self.bulk(dataset, docs).await;
        Utc::now() - chrono::Duration::days(30)
    }

    async fn seed_owner(&self, dataset: &str, owner: &Owner, n: usize) -> u64 {
        let now = Utc::now().to_rfc3339();
        let docs = (0..n)
            .map(|_| json!({"user": owner.user_id, "mail": owner.email, "@timestamp": now}))
            .collect();
        self.bulk(dataset, docs).await;
        n as u64
    }

    async fn count(&self, dataset: &str, _cutoff: DateTime<Utc>) -> (u64, u64) {
        (
            self.count_where(dataset, json!({"term": {"kind": "old"}}))
                .await,
            self.count_where(dataset, json!({"term": {"kind": "new"}}))
                .await,
        )
    }

    async fn count_owner(&self, dataset: &str, owner: &Owner) -> u64 {
        self.count_where(dataset, json!({"term": {"user": owner.user_id}}))
            .await
    }

    fn defers_deletion(&self) -> bool {
        true
    }

    fn poll_interval(&self) -> std::time::Duration {
        std::time::Duration::from_millis(200)
    }

    fn many(&self) -> usize {
        150
    }
}

crate::conformance!(tests, ElasticsearchFixture);
crate::conformance!(elasticsearch7, Elasticsearch7Fixture);
crate::batch_checks!(tests_batch, super::ElasticsearchFixture);
crate::batch_checks!(elasticsearch7_batch, super::Elasticsearch7Fixture);

/// A locator of one field compared with case: each chunk is one `terms` query.
#[tokio::test]
async fn a_batch_of_one_exact_field_is_deleted_by_terms() {
    super::batch_members::exact_counts_and_holds_in::<ElasticsearchFixture>(
        super::batch_members::ORDINARY,
        |f, dataset| {
            let mut t = f.target(dataset);
            if let Some(tombstone::api::retentionpolicy::SubjectLocator::Elasticsearch(e)) =
                t.subject.as_mut()
            {
                e.term = [("user".to_string(), "{userId}".to_string())].into();
            }
            t
        },
    )
    .await;
}
