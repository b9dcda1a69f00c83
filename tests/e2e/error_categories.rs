//! What the operator keeps in memory per object goes when the object does: the cached
//! backend of a deleted DataStore is dropped.

use std::time::Duration;

use kube::api::DeleteParams;
use kube::Api;
use serde_json::json;

use tombstone::api::DataStore;

use crate::fixtures::*;
use crate::support::{wait_for, RedisServer};

async fn wait_cached(operator: &TestOperator, want: usize, what: &str) {
    wait_for(what, Duration::from_secs(30), || async {
        (operator.running.cached_backends() == want).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_deleted_datastore_drops_its_cached_backend() {
    let (client, ns) = setup("ec-forget").await;
    let redis = RedisServer::start();
    let operator = TestOperator::start(&ns).await;
    for name in ["cache-a", "cache-b"] {
        redis_store(&client, &ns, name, &redis.url(), json!({})).await;
        wait_store_ready(&client, &ns, name, true).await;
    }
    // Each probe cached its store's backend.
    wait_cached(&operator, 2, "a backend cached per store").await;

    let stores: Api<DataStore> = Api::namespaced(client.clone(), &ns);
    stores
        .delete("cache-a", &DeleteParams::default())
        .await
        .expect("delete succeeds");
    wait_cached(&operator, 1, "the deleted store's backend dropped").await;
    // The other store is still there, and still served by its backend.
    assert!(stores.get_opt("cache-b").await.unwrap().is_some());
    stores
        .delete("cache-b", &DeleteParams::default())
        .await
        .expect("delete succeeds");
    wait_cached(&operator, 0, "no backend left").await;
    operator.stop().await;
}
