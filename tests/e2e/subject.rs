//! Finding, erasing and verifying one subject's records in Redis, on real redis-servers.

use std::collections::BTreeMap;

use serde_json::json;
use tokio_util::sync::CancellationToken;

use tombstone::api::retentionpolicy::Target;
use tombstone::backends::redis::{RedisBackend, RedisConfig};
use tombstone::backends::{Limits, StepBudget, SubjectAction, SubjectJob};

use crate::fixtures::{count_keys, redis_conn};
use crate::support::{RedisCluster, RedisServer};

fn target() -> Target {
    serde_json::from_value(json!({
        "name": "sessions",
        "store": "cache",
        "redis": {"keyPattern": "session:*"},
        "subject": {"redis": {
            "keys": ["session:{userId}:*", "cart:{userId}", "mail:{email}"],
            "hashFields": [{"key": "profiles", "field": "{userId}"}],
            "setMembers": [{"key": "newsletter", "member": "{email}"}, {"key": "leaderboard", "member": "{userId}"}]
        }}
    }))
    .unwrap()
}

async fn run(
    backend: &RedisBackend,
    ids: &[(&str, &str)],
    action: SubjectAction,
) -> (u64, Vec<String>) {
    let job = SubjectJob {
        target: target(),
        identifiers: ids
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
        action,
    };
    let budget = StepBudget {
        max_time: std::time::Duration::from_secs(5),
        cancel: CancellationToken::new(),
        fence: Default::default(),
    };
    let step = crate::fixtures::subject_until_done(backend, &job, &budget)
        .await
        .expect("subject step");
    assert!(step.failure.is_none());
    (step.count, step.skipped)
}

async fn seed(conn: &mut redis::aio::MultiplexedConnection, user: &str, email: &str) {
    let mut pipe = redis::pipe();
    for n in 0..3 {
        pipe.cmd("SET")
            .arg(format!("session:{user}:{n}"))
            .arg("t")
            .ignore();
    }
    pipe.cmd("SET")
        .arg(format!("cart:{user}"))
        .arg("c")
        .ignore();
    pipe.cmd("SET")
        .arg(format!("mail:{email}"))
        .arg("m")
        .ignore();
    pipe.cmd("HSET").arg("profiles").arg(user).arg("p").ignore();
    pipe.cmd("SADD").arg("newsletter").arg(email).ignore();
    pipe.cmd("ZADD")
        .arg("leaderboard")
        .arg(1)
        .arg(user)
        .ignore();
    let _: () = pipe.query_async(conn).await.unwrap();
}

#[tokio::test]
async fn only_the_subjects_records_are_found_erased_and_verified_gone() {
    let redis = RedisServer::start();
    let mut conn = redis_conn(&redis.url()).await;
    seed(&mut conn, "47", "bob@example.com").await;
    // Neighbours whose ids share a prefix, and one whose id is a glob.
    seed(&mut conn, "4711", "bob@example.com.evil").await;
    seed(&mut conn, "4*", "star@example.com").await;
    let backend = RedisBackend::new(
        RedisConfig {
            url: redis.url(),
            password: None,
            cluster: false,
        },
        Limits::default(),
    );
    let bob = [("userId", "47"), ("email", "bob@example.com")];

    // 3 sessions + cart + mail key + hash field + set member + sorted-set member.
    assert_eq!(run(&backend, &bob, SubjectAction::Find).await, (8, vec![]));
    assert_eq!(
        run(&backend, &bob, SubjectAction::Erase).await.0,
        8,
        "erased equals found"
    );
    assert_eq!(run(&backend, &bob, SubjectAction::Verify).await.0, 0);
    assert_eq!(
        run(&backend, &bob, SubjectAction::Erase).await.0,
        0,
        "idempotent"
    );

    // The neighbours are intact.
    assert_eq!(count_keys(&mut conn, "session:4711:*").await, 3);
    let star = [("userId", "4*"), ("email", "star@example.com")];
    assert_eq!(
        run(&backend, &star, SubjectAction::Find).await.0,
        8,
        "a glob in an id matches only itself"
    );
    let other = [("userId", "4711"), ("email", "bob@example.com.evil")];
    assert_eq!(run(&backend, &other, SubjectAction::Find).await.0, 8);
    let members: Vec<String> = redis::cmd("SMEMBERS")
        .arg("newsletter")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        !members.contains(&"bob@example.com".to_string()) && members.len() == 2,
        "{members:?}"
    );
}

#[tokio::test]
async fn locators_needing_a_missing_identifier_are_skipped_not_run_blank() {
    let redis = RedisServer::start();
    let mut conn = redis_conn(&redis.url()).await;
    seed(&mut conn, "47", "bob@example.com").await;
    let backend = RedisBackend::new(
        RedisConfig {
            url: redis.url(),
            password: None,
            cluster: false,
        },
        Limits::default(),
    );
    let (count, skipped) = run(
        &backend,
        &[("email", "bob@example.com")],
        SubjectAction::Erase,
    )
    .await;
    assert_eq!(count, 2, "the mail key and the newsletter membership");
    assert_eq!(
        skipped,
        vec![
            "keys[0] needs {userId}",
            "keys[1] needs {userId}",
            "hashFields[0] needs {userId}",
            "setMembers[1] needs {userId}"
        ]
    );
    // Nothing keyed by userId was touched: a blank id would have matched `session::*` etc.
    assert_eq!(count_keys(&mut conn, "session:47:*").await, 3);
    for s in &skipped {
        assert!(!s.contains("bob"), "no identifier values in messages");
    }
}

#[tokio::test]
async fn a_subject_spread_over_a_cluster_is_erased_on_every_primary() {
    let cluster = RedisCluster::start(3);
    let nodes: Vec<String> = cluster.nodes().iter().map(|n| n.url()).collect();
    let client = redis::cluster::ClusterClient::new(nodes.clone()).unwrap();
    let mut conn = client.get_async_connection().await.unwrap();
    for n in 0..30 {
        let _: () = redis::cmd("SET")
            .arg(format!("session:47:{n}"))
            .arg("t")
            .query_async(&mut conn)
            .await
            .unwrap();
        let _: () = redis::cmd("SET")
            .arg(format!("session:4711:{n}"))
            .arg("t")
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let _: () = redis::cmd("SADD")
        .arg("newsletter")
        .arg("bob@example.com")
        .query_async(&mut conn)
        .await
        .unwrap();
    let backend = RedisBackend::new(
        RedisConfig {
            url: cluster.seed_url(),
            password: None,
            cluster: true,
        },
        Limits::default(),
    );
    let bob = [("userId", "47"), ("email", "bob@example.com")];
    assert_eq!(run(&backend, &bob, SubjectAction::Find).await.0, 31);
    assert_eq!(run(&backend, &bob, SubjectAction::Erase).await.0, 31);
    assert_eq!(run(&backend, &bob, SubjectAction::Verify).await.0, 0);
    let mut left = 0;
    for url in &nodes {
        left += count_keys(&mut redis_conn(url).await, "session:4711:*").await;
    }
    assert_eq!(left, 30);
}
