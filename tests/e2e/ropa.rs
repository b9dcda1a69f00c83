//! `tombstone ropa`, the Art. 30 register, run as a binary: on the samples (files and
//! directory, every format) and on a real API server.

use std::path::PathBuf;
use std::process::{Command, Output};

use kube::api::{Api, Patch, PatchParams};
use serde_json::{json, Value};

use tombstone::api::{DataStore, RetentionPolicy};

use crate::fixtures::{create, policy_json, redis_store, setup};
use crate::support::{test_namespace, ControlPlane};

/// `tombstone ropa` with no ambient cluster settings.
fn ropa() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tombstone"));
    cmd.arg("ropa")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .env_remove("RUST_LOG");
    cmd
}

fn stdout_of(output: &Output) -> String {
    assert!(
        output.status.success(),
        "tombstone ropa failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).expect("stdout is UTF-8")
}

fn samples_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config/samples")
}

fn sample_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(samples_dir())
        .expect("config/samples")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

/// What the samples' Secrets and DataStores hold that the register must never show.
const NEVER: [&str; 10] = [
    "replace-me",
    "alice@example.com",
    "carol@example.com",
    "archive-s3-credentials",
    "search-credentials",
    "dsr-2026-0042",
    "hold-subject-1",
    "minio.storage.svc",
    "redis://",
    "https://",
];

/// The content every format shows for the samples, in that format's spelling.
fn assert_samples_register(out: &str, format: &str) {
    let star = if format == "markdown" { "\\*" } else { "*" };
    let quote = if format == "csv" { "\"\"" } else { "\"" };
    let quote = if format == "json" { "\\\"" } else { quote };
    for expected in [
        "mailer-data".to_string(),
        "sessions".to_string(),
        "Deliver transactional email and answer delivery questions".to_string(),
        "Keep customers signed in and remember their shopping carts".to_string(),
        "Contract (Art. 6(1)(b))".to_string(),
        "30 days".to_string(),
        "s3 bucket shop-archive in eu-west-1, prefix mailer/logs/ (DataStore archive)".to_string(),
        format!(
            "loki tenant shop, streams {{namespace={quote}mailer{quote}, app={quote}mailer{quote}}} (DataStore logs)"
        ),
        format!("elasticsearch index mailer-events-{star} (DataStore search)"),
        format!("redis keys session:{star} (DataStore cache)"),
        format!("redis keys cart:{star} (DataStore cache)"),
    ] {
        assert!(out.contains(&expected), "{format}: no {expected:?} in\n{out}");
    }
    let lists = if format == "json" {
        ["\"visitors\"", "\"cart contents\""]
    } else {
        [
            "customers, visitors",
            "user ID, session data, cart contents",
        ]
    };
    for expected in lists {
        assert!(
            out.contains(expected),
            "{format}: no {expected:?} in\n{out}"
        );
    }
    for secret in NEVER {
        assert!(
            !out.contains(secret),
            "{format}: {secret:?} leaked into\n{out}"
        );
    }
    // ErasureRequests and LegalHolds are no processing activities.
    assert!(!out.contains("litigation-2026-17"), "{out}");
}

#[test]
fn samples_register_in_every_format() {
    for format in ["markdown", "csv", "json"] {
        let from_dir = stdout_of(
            &ropa()
                .arg(samples_dir())
                .args(["--format", format])
                .output()
                .expect("cannot run tombstone"),
        );
        assert_samples_register(&from_dir, format);
        let from_files = stdout_of(
            &ropa()
                .args(sample_files())
                .args(["--format", format])
                .output()
                .expect("cannot run tombstone"),
        );
        assert_eq!(from_files, from_dir, "{format}: files and directory agree");
    }

    // Markdown is the default: a table, one row per policy, in name order.
    let md = stdout_of(&ropa().arg(samples_dir()).output().expect("run"));
    let lines: Vec<&str> = md.lines().collect();
    assert_eq!(lines.len(), 4, "{md}");
    assert!(lines[0].starts_with("| Processing activity | Description | Purpose |"));
    assert!(lines[1].starts_with("|---|"));
    assert!(lines[2].starts_with("| mailer-data | "), "{md}");
    assert!(lines[3].starts_with("| sessions | "), "{md}");
    assert!(
        lines[2].contains(" | unknown | unknown |"),
        "no status in files"
    );

    // CSV: header and records end in CRLF; `--namespace` fills the namespace in.
    let csv = stdout_of(
        &ropa()
            .arg(samples_dir())
            .args(["--format", "csv", "--namespace", "shop"])
            .output()
            .expect("run"),
    );
    let records: Vec<&str> = csv.split("\r\n").collect();
    assert_eq!(records.len(), 4, "{csv:?}");
    assert!(records[0].starts_with("Namespace,Processing activity,Description,"));
    assert!(records[1]
        .starts_with("shop,mailer-data,\"Transactional email data in the S3 archive, the Loki"));
    assert!(records[2].starts_with("shop,sessions,Web shop sessions"));

    // JSON: one object per activity.
    let json: Value = serde_json::from_str(&stdout_of(
        &ropa()
            .arg(samples_dir())
            .args(["--format", "json"])
            .output()
            .expect("run"),
    ))
    .expect("valid JSON");
    let activities = json["activities"].as_array().expect("activities");
    assert_eq!(activities.len(), 2);
    assert_eq!(activities[1]["name"], "sessions");
    assert_eq!(activities[1]["legalBasis"], "contract");
    assert_eq!(activities[1]["retention"], "30d");
    assert_eq!(activities[0]["storage"].as_array().unwrap().len(), 3);
    assert_eq!(activities[0]["storage"][0]["kind"], "s3");
    assert_eq!(activities[0]["statusKnown"], false);
}

#[test]
fn a_file_that_does_not_parse_is_named() {
    let dir = tempfile::tempdir().expect("temp dir");
    let broken = dir.path().join("broken.yaml");
    std::fs::write(
        &broken,
        "apiVersion: tombstone.dev/v1alpha1\nkind: [unclosed\n",
    )
    .unwrap();
    let output = ropa()
        .arg(samples_dir())
        .arg(&broken)
        .output()
        .expect("run");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(&broken.display().to_string()), "{stderr}");
    assert!(output.stdout.is_empty(), "nothing printed on error");

    let output = ropa()
        .arg(dir.path().join("absent.yaml"))
        .output()
        .expect("run");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("absent.yaml"));
}

#[tokio::test]
async fn register_from_the_cluster() {
    let (client, ns) = setup("ropa").await;
    redis_store(
        &client,
        &ns,
        "cache",
        "redis://:s3cr3t@127.0.0.1:1/0",
        json!({}),
    )
    .await;
    let mut swept = policy_json(
        "web-sessions",
        "7d",
        json!([{"name": "sessions", "store": "cache", "redis": {"keyPattern": "session:*"}},
               {"name": "carts", "store": "cache", "redis": {"keyPattern": "cart:*", "mode": "idle"}}]),
    );
    swept["spec"]["legalBasis"] = json!("legitimateInterests");
    swept["spec"]["description"] = json!("Sessions | carts");
    create::<RetentionPolicy>(&client, &ns, swept).await;
    Api::<RetentionPolicy>::namespaced(client.clone(), &ns)
        .patch_status(
            "web-sessions",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {
                "lastSweep": {"startTime": "2026-11-20T03:00:00Z",
                              "completionTime": "2026-11-20T03:00:12Z",
                              "outcome": "Succeeded", "deleted": 3},
                "conditions": [{"type": "Compliant", "status": "True", "reason": "UpToDate",
                                "message": "swept on schedule", "lastTransitionTime": "2026-11-20T03:00:12Z"}],
            }})),
        )
        .await
        .expect("status patch");
    create::<RetentionPolicy>(
        &client,
        &ns,
        policy_json(
            "analytics",
            "2w",
            json!([{"name": "events", "store": "nowhere", "s3": {"prefix": "events/"}}]),
        ),
    )
    .await;
    // Another namespace's policy stays out of this namespace's register.
    let other = test_namespace(&client, "ropa-other").await;
    create::<RetentionPolicy>(
        &client,
        &other,
        policy_json(
            "elsewhere",
            "1d",
            json!([{"name": "t", "store": "cache", "redis": {"keyPattern": "x:*"}}]),
        ),
    )
    .await;
    assert!(Api::<DataStore>::namespaced(client.clone(), &ns)
        .get_opt("cache")
        .await
        .unwrap()
        .is_some());

    let run = |format: &str| {
        ropa()
            .args(["--namespace", &ns, "--format", format])
            .env("KUBECONFIG", ControlPlane::get().kubeconfig_path())
            .output()
            .expect("cannot run tombstone")
    };
    let md = stdout_of(&run("markdown"));
    let lines: Vec<&str> = md.lines().collect();
    assert_eq!(lines.len(), 4, "{md}");
    assert!(
        lines[0].starts_with("| Namespace | Processing activity |"),
        "{md}"
    );
    assert!(
        lines[2].starts_with(&format!("| {ns} | analytics | ")),
        "{md}"
    );
    assert!(
        lines[2].contains("s3 prefix events/ (DataStore nowhere, not found)"),
        "{md}"
    );
    assert!(lines[2].contains("| 2 weeks | unknown | unknown |"), "{md}");
    assert!(
        lines[3].starts_with(&format!("| {ns} | web-sessions | Sessions \\| carts | ")),
        "{md}"
    );
    assert!(
        lines[3].contains("| Legitimate interests (Art. 6(1)(f)) |"),
        "{md}"
    );
    assert!(
        lines[3].contains(
            "| redis keys session:\\* (DataStore cache)<br>redis keys cart:\\* (DataStore cache) |"
        ),
        "{md}"
    );
    assert!(
        lines[3].ends_with("| 1 week | 2026-11-20T03:00:12Z (Succeeded) | True (UpToDate) |"),
        "{md}"
    );
    assert!(
        !md.contains("elsewhere") && !md.contains("s3cr3t") && !md.contains("127.0.0.1"),
        "{md}"
    );

    let csv = stdout_of(&run("csv"));
    assert!(
        csv.contains(&format!(
            "{ns},web-sessions,Sessions | carts,Keep shoppers logged in,\
         Legitimate interests (Art. 6(1)(f)),customers,session data,\
         redis keys session:* (DataStore cache); redis keys cart:* (DataStore cache),\
         1 week,2026-11-20T03:00:12Z (Succeeded),True (UpToDate)\r\n"
        )),
        "{csv:?}"
    );

    let json: Value = serde_json::from_str(&stdout_of(&run("json"))).expect("valid JSON");
    let names: Vec<&str> = json["activities"]
        .as_array()
        .expect("activities")
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["analytics", "web-sessions"]);
    assert_eq!(json["activities"][1]["lastSweep"]["outcome"], "Succeeded");
    assert_eq!(json["activities"][1]["compliant"]["status"], "True");
    assert_eq!(json["activities"][0]["compliant"], Value::Null);

    // Without --namespace every namespace is listed.
    let all = stdout_of(
        &ropa()
            .args(["--format", "json"])
            .env("KUBECONFIG", ControlPlane::get().kubeconfig_path())
            .output()
            .expect("run"),
    );
    assert!(all.contains("\"elsewhere\"") && all.contains("\"web-sessions\""));
}
