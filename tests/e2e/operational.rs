//! Resumability, leader election and the HTTP endpoints.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use tombstone::api::retentionpolicy::{SweepOutcome, TargetPhase};
use tombstone::api::RetentionPolicy;
use tombstone::leader::LeaderElection;

use crate::fixtures::*;
use crate::support::{wait_for, RedisServer};

#[tokio::test]
async fn a_sweep_stopped_midway_resumes_from_its_checkpoint_and_counts_nothing_twice() {
    const MATCHING: usize = 40_000;
    let (client, ns) = setup("resume").await;
    let redis = RedisServer::start();
    let mut conn = redis_conn(&redis.url()).await;
    seed(&mut conn, "old:", MATCHING).await;
    seed(&mut conn, "keep:", 10_000).await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    // A rate limit makes the sweep take several seconds, so there is a middle to stop in.
    let operator = TestOperator::start(&ns).await;
    redis_store(
        &client,
        &ns,
        "cache",
        &redis.url(),
        json!({"limits": {"requestsPerSecond": 12000, "concurrency": 2}}),
    )
    .await;
    create::<RetentionPolicy>(
        &client,
        &ns,
        policy_json("old", "1s", json!([{"name": "old", "store": "cache", "redis": {"keyPattern": "old:*", "mode": "idle"}}])),
    )
    .await;
    let midway = wait_policy(
        &client,
        &ns,
        "old",
        "a checkpoint",
        Duration::from_secs(60),
        |p| {
            p.status.as_ref().is_some_and(|s| {
                s.current_sweep.is_some()
                    && s.targets
                        .first()
                        .is_some_and(|t| t.cursor.is_some() && t.deleted > 0)
            })
        },
    )
    .await;
    operator.stop().await;

    // After a graceful stop the checkpoint accounts for every key deleted so far.
    let stopped = get_policy(&client, &ns, "old").await.status.unwrap();
    let started = stopped
        .current_sweep
        .clone()
        .expect("the sweep is still under way")
        .start_time;
    assert_eq!(
        midway.status.unwrap().current_sweep.unwrap().start_time,
        started
    );
    let target = &stopped.targets[0];
    assert_eq!(target.phase, TargetPhase::Sweeping);
    assert!(target.cursor.is_some());
    let remaining = count_keys(&mut conn, "old:*").await;
    assert!(
        remaining > 0,
        "the sweep must not have finished before the stop"
    );
    assert_eq!(
        target.deleted_total as usize,
        MATCHING - remaining,
        "nothing deleted goes uncounted"
    );

    // A new instance resumes the same sweep rather than starting over.
    let operator = TestOperator::start(&ns).await;
    let done = wait_sweep_completed(&client, &ns, "old", None)
        .await
        .status
        .unwrap();
    let last = done.last_sweep.unwrap();
    assert_eq!(last.start_time, started, "the same sweep, resumed");
    assert_eq!(last.outcome, SweepOutcome::Succeeded);
    assert_eq!(
        last.deleted as usize, MATCHING,
        "nothing counted twice, nothing lost"
    );
    assert_eq!(done.targets[0].deleted_total as usize, MATCHING);
    assert_eq!(count_keys(&mut conn, "old:*").await, 0);
    assert_eq!(count_keys(&mut conn, "keep:*").await, 10_000);
    operator.stop().await;
}

#[tokio::test]
async fn only_the_leader_acts_and_a_standby_takes_over_when_it_stops() {
    let (client, ns) = setup("leader").await;
    let redis = RedisServer::start();
    let mut conn = redis_conn(&redis.url()).await;
    seed(&mut conn, "a:", 10).await;
    seed(&mut conn, "b:", 10).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let election = |id: &str| {
        let mut e = LeaderElection::new(&ns, "tombstone-leader", id);
        e.renew_interval = Duration::from_millis(500);
        e.renew_deadline = Duration::from_secs(2);
        e.lease_duration = Duration::from_secs(3);
        e
    };
    let first = TestOperator::start_with(&ns, Some(election("first")), None, fast_settings()).await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let holder = || {
        let leases = leases.clone();
        async move {
            leases
                .get_opt("tombstone-leader")
                .await
                .ok()
                .flatten()
                .and_then(|l| l.spec?.holder_identity)
        }
    };
    wait_for("first to lead", Duration::from_secs(20), || async {
        (holder().await.as_deref() == Some("first")).then_some(())
    })
    .await;
    let second =
        TestOperator::start_with(&ns, Some(election("second")), None, fast_settings()).await;

    redis_store(&client, &ns, "cache", &redis.url(), json!({})).await;
    create::<RetentionPolicy>(&client, &ns, policy_json("a", "1s", json!([{"name": "a", "store": "cache", "redis": {"keyPattern": "a:*", "mode": "idle"}}]))).await;
    wait_sweep_completed(&client, &ns, "a", None).await;
    assert_eq!(
        holder().await.as_deref(),
        Some("first"),
        "the standby never took the Lease while the leader ran"
    );
    wait_metric(
        &first.running.metrics,
        "tombstone_sweeps_total{outcome=\"Succeeded\"} 1",
    )
    .await;
    assert!(
        !second
            .running
            .metrics
            .render()
            .contains("tombstone_sweeps_total{"),
        "the standby did nothing"
    );

    first.stop().await;
    wait_for("second to lead", Duration::from_secs(20), || async {
        (holder().await.as_deref() == Some("second")).then_some(())
    })
    .await;
    create::<RetentionPolicy>(&client, &ns, policy_json("b", "1s", json!([{"name": "b", "store": "cache", "redis": {"keyPattern": "b:*", "mode": "idle"}}]))).await;
    let b = wait_sweep_completed(&client, &ns, "b", None).await;
    assert_eq!(b.status.unwrap().last_sweep.unwrap().deleted, 10);
    wait_metric(
        &second.running.metrics,
        "tombstone_sweeps_total{outcome=\"Succeeded\"} 1",
    )
    .await;
    second.stop().await;
    let lease = leases.get("tombstone-leader").await.unwrap();
    assert_eq!(
        lease.spec.unwrap().holder_identity,
        None,
        "released on graceful shutdown"
    );
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let code = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

#[tokio::test]
async fn health_readiness_and_metrics_are_served() {
    let (client, ns) = setup("http").await;
    let redis = RedisServer::start();
    let mut conn = redis_conn(&redis.url()).await;
    seed(&mut conn, "m:", 7).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let operator = TestOperator::start_with(
        &ns,
        None,
        Some("127.0.0.1:0".parse().unwrap()),
        fast_settings(),
    )
    .await;
    let addr = operator.running.http_addr.expect("serving HTTP");
    assert_eq!(http_get(addr, "/healthz").await.0, 200);
    wait_for("readyz", Duration::from_secs(20), || async {
        (http_get(addr, "/readyz").await.0 == 200).then_some(())
    })
    .await;

    redis_store(&client, &ns, "cache", &redis.url(), json!({})).await;
    create::<RetentionPolicy>(&client, &ns, policy_json("m", "1s", json!([{"name": "m", "store": "cache", "redis": {"keyPattern": "m:*", "mode": "idle"}}]))).await;
    wait_sweep_completed(&client, &ns, "m", None).await;
    // Metrics are counted just after the status is written.
    let metrics = wait_for("the sweep in /metrics", Duration::from_secs(20), || async {
        let (code, body) = http_get(addr, "/metrics").await;
        (code == 200 && body.contains("tombstone_sweeps_total{outcome=\"Succeeded\"} 1"))
            .then_some(body)
    })
    .await;
    for expected in [
        "tombstone_sweeps_total{outcome=\"Succeeded\"} 1",
        "tombstone_items_deleted_total{store_kind=\"redis\"} 7",
        "tombstone_sweep_duration_seconds_count 1",
        "tombstone_reconciliations_total{controller=\"retentionpolicy\"}",
    ] {
        assert!(
            metrics.contains(expected),
            "{expected} missing from\n{metrics}"
        );
    }
    // The compliance gauge is recomputed from the cache every few seconds.
    wait_metric(
        &operator.running.metrics,
        "tombstone_retention_policies{compliant=\"True\"} 1",
    )
    .await;
    operator.stop().await;
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the server stops with the operator"
    );
}

#[tokio::test]
async fn the_binary_logs_json_and_stops_gracefully_on_sigterm() {
    let (client, ns) = setup("sigterm").await;
    let cp = crate::support::ControlPlane::get();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_tombstone"))
        .args([
            "run",
            "--namespace",
            &ns,
            "--lease-namespace",
            &ns,
            "--http-addr",
            "127.0.0.1:0",
        ])
        .env("KUBECONFIG", cp.kubeconfig_path())
        .env("POD_NAME", "tombstone-0")
        .env_remove("LOG_FORMAT")
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start tombstone run");
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    wait_for(
        "the binary to take the Lease",
        Duration::from_secs(30),
        || {
            let leases = leases.clone();
            async move {
                let holder = leases
                    .get_opt("tombstone-leader")
                    .await
                    .ok()
                    .flatten()?
                    .spec?
                    .holder_identity;
                (holder.as_deref() == Some("tombstone-0")).then_some(())
            }
        },
    )
    .await;
    // SAFETY: sending a signal to a child we own.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    // Read stderr on a thread (a full pipe would stall the child) and never wait forever.
    let mut child = child;
    let mut stderr_pipe = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut stderr_pipe, &mut text).map(|_| text)
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if tokio::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = reader.join().unwrap().unwrap_or_default();
            panic!("tombstone did not exit within 30s of SIGTERM; its log:\n{stderr}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(status.success(), "exit status {status:?}");
    let stderr = reader.join().unwrap().unwrap();
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty());
    for line in &lines {
        let record: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            record.get("level").is_some() && record.get("timestamp").is_some(),
            "{line}"
        );
    }
    assert!(stderr.contains("shutdown signal received"), "{stderr}");
    assert!(stderr.contains("released leadership"), "{stderr}");
    let lease = leases.get("tombstone-leader").await.unwrap();
    assert_eq!(lease.spec.unwrap().holder_identity, None);
}

#[tokio::test]
async fn an_operator_stopped_right_after_start_still_stops() {
    let (_client, ns) = setup("early-stop").await;
    for with_lease in [false, true] {
        let election = with_lease.then(|| LeaderElection::new(&ns, "tombstone-leader", "early"));
        let operator = TestOperator::start_with(&ns, election, None, fast_settings()).await;
        operator.stop().await;
    }
}
