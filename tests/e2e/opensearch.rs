//! The real search nodes of the harness (`support::opensearch`): the OpenSearch node is
//! OpenSearch, answers the REST API the backend uses, behaves as real servers do where the
//! double of `support::elasticsearch` does not, and leaves nothing behind; the Elasticsearch
//! node is Elasticsearch 7.17.

use std::time::Duration;

use serde_json::{json, Value};

use crate::support::opensearch::{Distribution, SearchNode};

async fn get(url: &str) -> Value {
    let response = reqwest::get(url).await.expect("GET");
    assert!(
        response.status().is_success(),
        "GET {url}: {}",
        response.status()
    );
    response.json().await.expect("a JSON body")
}

/// VmRSS of a process, in MiB.
fn rss_mib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib / 1024)
}

#[tokio::test]
async fn the_harness_node_is_a_real_opensearch_and_says_which() {
    let node = SearchNode::opensearch();
    let root = get(&node.url()).await;
    // The CI log shows which server the search tests ran against.
    println!(
        "opensearch: {} {} (lucene {}), started in {:.1?}, RSS {} MiB",
        root["version"]["distribution"],
        root["version"]["number"],
        root["version"]["lucene_version"],
        node.started_in(),
        rss_mib(node.pid()).map_or("?".into(), |m| m.to_string()),
    );
    assert_eq!(root["version"]["distribution"], "opensearch", "{root}");
    assert_eq!(root["version"]["number"], node.version(), "{root}");
    // The modules the backend needs are loaded: HTTP (we are talking to it), reindex
    // (_delete_by_query), painless and the common analysers.
    let plugins = reqwest::get(format!("{}/_cat/plugins?h=component", node.url()))
        .await
        .expect("GET _cat/plugins")
        .text()
        .await
        .expect("text");
    for module in [
        "ReindexPlugin",
        "PainlessPlugin",
        "CommonAnalysisPlugin",
        "Netty4Plugin",
    ] {
        assert!(
            plugins.contains(module),
            "{module} missing from:\n{plugins}"
        );
    }
}

/// The behaviour the double got wrong: an unmapped string is mapped as analysed
/// `text` with a `.keyword` sub-field, not as `keyword`.
#[tokio::test]
async fn dynamic_mapping_of_a_string_is_text_with_a_keyword_sub_field() {
    let node = SearchNode::opensearch();
    let index = format!("{}-people", node.index_prefix("dynamic-mapping"));
    let http = reqwest::Client::new();
    let put = http
        .put(format!("{}/{index}/_doc/1?refresh=true", node.url()))
        .json(&json!({"user": {"email": "probe-5d1f@example.org"}, "@timestamp": "2026-01-01T00:00:00Z"}))
        .send()
        .await
        .expect("index a document");
    assert!(put.status().is_success(), "{}", put.status());
    let mapping = get(&format!("{}/{index}/_mapping", node.url())).await;
    let email = &mapping[&index]["mappings"]["properties"]["user"]["properties"]["email"];
    assert_eq!(email["type"], "text", "{mapping}");
    assert_eq!(email["fields"]["keyword"]["type"], "keyword", "{mapping}");
    assert_eq!(
        mapping[&index]["mappings"]["properties"]["@timestamp"]["type"], "date",
        "{mapping}"
    );
    let deleted = http
        .delete(format!("{}/{index}", node.url()))
        .send()
        .await
        .expect("delete the index");
    assert!(deleted.status().is_success(), "{}", deleted.status());
}

/// A node of its own: when the launcher's stdin closes (as when the test process ends), the
/// JVM stops the node and exits, and its port is closed.
#[tokio::test]
async fn the_launcher_exits_when_its_stdin_closes() {
    let node = tokio::task::spawn_blocking(|| SearchNode::start(Distribution::OpenSearch))
        .await
        .expect("start");
    let url = node.url();
    let pid = node.pid();
    let rss = rss_mib(pid);
    assert_eq!(get(&url).await["version"]["distribution"], "opensearch");
    let took =
        tokio::task::spawn_blocking(move || node.stop_by_closing_stdin(Duration::from_secs(60)))
            .await
            .expect("stop");
    println!(
        "opensearch: a launcher started, used {} MiB RSS, and exited {took:.1?} after its stdin closed",
        rss.map_or("?".into(), |m| m.to_string())
    );
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "the JVM {pid} is still there"
    );
    assert!(reqwest::get(&url).await.is_err(), "{url} still answers");
}

#[tokio::test]
async fn the_harness_elasticsearch_node_is_elasticsearch_7_17() {
    let node = SearchNode::elasticsearch();
    let root = get(&node.url()).await;
    println!(
        "elasticsearch: {} (lucene {}), started in {:.1?}, RSS {} MiB",
        root["version"]["number"],
        root["version"]["lucene_version"],
        node.started_in(),
        rss_mib(node.pid()).map_or("?".into(), |m| m.to_string()),
    );
    assert_eq!(node.distribution(), Distribution::Elasticsearch);
    // Elasticsearch names no distribution; OpenSearch always does.
    assert!(root["version"].get("distribution").is_none(), "{root}");
    assert_eq!(root["version"]["number"], node.version(), "{root}");
    assert!(node.version().starts_with("7.17."), "{root}");
}
