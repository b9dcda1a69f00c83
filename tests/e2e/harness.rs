//! The Redis parts of the harness work as the backend tests expect.

use crate::support::{RedisCluster, RedisServer};

#[tokio::test]
async fn redis_server_requires_its_password_and_cleans_up() {
    let server = RedisServer::start_with_password("s3cret:/@");
    let mut con = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg("k")
        .arg("v")
        .query_async(&mut con)
        .await
        .unwrap();
    let without_password = format!("redis://127.0.0.1:{}", server.port());
    let refused = redis::Client::open(without_password)
        .unwrap()
        .get_multiplexed_async_connection()
        .await;
    let refused = match refused {
        Err(e) => e.to_string(),
        Ok(mut con) => redis::cmd("GET")
            .arg("k")
            .query_async::<String>(&mut con)
            .await
            .unwrap_err()
            .to_string(),
    };
    assert!(refused.contains("NOAUTH"), "{refused}");

    let port = server.port();
    drop(server);
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "redis-server still listening after drop"
    );
}

#[tokio::test]
async fn redis_cluster_serves_every_slot() {
    let cluster = RedisCluster::start(3);
    let mut con = redis::cluster::ClusterClient::new(vec![cluster.seed_url()])
        .unwrap()
        .get_async_connection()
        .await
        .unwrap();
    // Keys spread over the slots of every primary.
    for i in 0..50 {
        let _: () = redis::cmd("SET")
            .arg(format!("key:{i}"))
            .arg(i)
            .query_async(&mut con)
            .await
            .unwrap();
    }
    for node in cluster.nodes() {
        let keys: usize = node.cli(&["DBSIZE"]).unwrap().trim().parse().unwrap();
        assert!(keys > 0, "node {} holds no key", node.port());
    }
}
