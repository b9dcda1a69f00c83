//! `kubectl tombstone`, run as kubectl runs a plugin: the binary under the name
//! `kubectl-tombstone`, against the test API server, with the operator running.

use std::path::{Path, PathBuf};
use std::process::Output;

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use serde_json::json;
use tokio::io::AsyncWriteExt;

use tombstone::api::erasurerequest::ErasurePhase;
use tombstone::api::{ErasureRequest, LegalHold};
use tombstone::audit::{identifier_digest, load_or_create_key};

use crate::erasure::{seed_subjects, shop, wait_phase, EMAIL, USER};
use crate::fixtures::{count_keys, create, redis_conn, setup, TestOperator};
use crate::support::{ControlPlane, RedisServer};

/// The plugin installed as kubectl finds it: a `kubectl-tombstone` on the PATH (here a
/// link to the built binary in a temporary directory).
pub(crate) struct Plugin {
    dir: tempfile::TempDir,
    kubeconfig: PathBuf,
}

impl Plugin {
    pub(crate) fn install() -> Self {
        Self::install_for(ControlPlane::get().kubeconfig_path())
    }

    /// Talking to the cluster of `kubeconfig`.
    pub(crate) fn install_for(kubeconfig: &Path) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        std::os::unix::fs::symlink(
            env!("CARGO_BIN_EXE_tombstone"),
            dir.path().join("kubectl-tombstone"),
        )
        .expect("link kubectl-tombstone");
        Plugin {
            dir,
            kubeconfig: kubeconfig.to_path_buf(),
        }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("kubectl-tombstone")
    }

    /// Runs `kubectl tombstone ARGS` with `stdin` as its input.
    pub(crate) async fn run(&self, args: &[&str], stdin: &str) -> Output {
        run_with(&self.path(), &self.kubeconfig, args, stdin).await
    }
}

async fn run_with(program: &Path, kubeconfig: &Path, args: &[&str], stdin: &str) -> Output {
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .env_remove("POD_NAMESPACE")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start kubectl-tombstone");
    let mut input = child.stdin.take().expect("stdin");
    input
        .write_all(stdin.as_bytes())
        .await
        .expect("write stdin");
    drop(input);
    child
        .wait_with_output()
        .await
        .expect("kubectl-tombstone ran")
}

fn text(output: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

pub(crate) fn succeeded(output: &Output) -> String {
    let (stdout, stderr) = text(output);
    assert!(
        output.status.success(),
        "failed ({}): {stderr}\n{stdout}",
        output.status
    );
    stdout
}

async fn secret(client: &kube::Client, ns: &str, name: &str) -> Option<Secret> {
    Api::<Secret>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .expect("read Secret")
}

pub(crate) fn identifiers() -> String {
    format!("# the subject of DSR-9\nemail={EMAIL}\nuserId={USER}\n")
}

pub(crate) fn assert_no_identifier(output: &Output) {
    let (stdout, stderr) = text(output);
    for probe in [EMAIL, USER] {
        assert!(
            !stdout.contains(probe) && !stderr.contains(probe),
            "{probe} shown:\n{stdout}\n{stderr}"
        );
    }
}

/// A namespace with the shop's subjects seeded in Redis, its policy, the operator
/// watching it, and the plugin installed. Bind every field (`_redis` too): a field left
/// out of the pattern would be dropped at once, and with it the server.
struct Shop {
    client: kube::Client,
    ns: String,
    _redis: RedisServer,
    conn: redis::aio::MultiplexedConnection,
    operator: TestOperator,
    plugin: Plugin,
}

impl Shop {
    async fn open(name: &str) -> Self {
        let (client, ns) = setup(name).await;
        let redis = RedisServer::start();
        let mut conn = redis_conn(&redis.url()).await;
        seed_subjects(&mut conn).await;
        let operator = TestOperator::start(&ns).await;
        shop(&client, &ns, &redis).await;
        Shop {
            client,
            ns,
            _redis: redis,
            conn,
            operator,
            plugin: Plugin::install(),
        }
    }
}

/// `erase` files the labelled identifiers Secret and the request, prints the digest and
/// deadline the operator gave it, and the operator erases the subject.
#[tokio::test]
async fn erase_files_a_request_the_operator_completes_and_prints_its_digest_and_deadline() {
    let Shop {
        client,
        ns,
        mut conn,
        operator,
        plugin,
        _redis,
    } = Shop::open("plugin-erase").await;

    let output = plugin
        .run(
            &[
                "erase",
                "-n",
                &ns,
                "--ground",
                "consentWithdrawn",
                "--reference",
                "DSR-9",
                "--name",
                "dsr-9",
            ],
            &identifiers(),
        )
        .await;
    let stdout = succeeded(&output);
    assert_no_identifier(&output);

    let request = Api::<ErasureRequest>::namespaced(client.clone(), &ns)
        .get("dsr-9")
        .await
        .expect("the request was created");
    let status = request
        .status
        .clone()
        .expect("the operator answered before erase returned");
    let digest = status.subject_digest.expect("subject digest");
    let deadline = status.deadline.expect("deadline");
    assert!(
        stdout.contains(&format!("subject digest: {digest}")),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("deadline:       {deadline}")),
        "{stdout}"
    );
    assert_eq!(request.spec.reference.as_deref(), Some("DSR-9"));

    wait_phase(&client, &ns, "dsr-9", ErasurePhase::Completed).await;
    assert_eq!(count_keys(&mut conn, &format!("session:{USER}:*")).await, 0);
    // The operator deletes the identifiers right after it writes Completed.
    crate::support::wait_for(
        "the identifiers Secret to go",
        std::time::Duration::from_secs(30),
        || {
            let client = client.clone();
            let ns = ns.clone();
            async move {
                secret(&client, &ns, "dsr-9-identifiers")
                    .await
                    .is_none()
                    .then_some(())
            }
        },
    )
    .await;

    // A dry run keeps its Secret, which shows how it was made: labelled for deletion and
    // owned by its request.
    succeeded(
        &plugin
            .run(
                &[
                    "erase",
                    "-n",
                    &ns,
                    "--ground",
                    "objection",
                    "--name",
                    "dry",
                    "--dry-run",
                ],
                &identifiers(),
            )
            .await,
    );
    let dry = wait_phase(&client, &ns, "dry", ErasurePhase::Completed).await;
    let kept = secret(&client, &ns, "dry-identifiers")
        .await
        .expect("a dry run keeps its Secret");
    assert_eq!(
        kept.metadata.labels.unwrap_or_default()["tombstone.dev/subject-identifiers"],
        "true"
    );
    let owners = kept.metadata.owner_references.unwrap_or_default();
    assert_eq!(owners.len(), 1, "{owners:?}");
    assert_eq!(Some(owners[0].uid.clone()), dry.metadata.uid);
    assert_eq!(
        count_keys(&mut conn, &format!("session:{USER}0:*")).await,
        4,
        "the neighbour stays"
    );
    operator.stop().await;
}

/// Bad input is refused before anything is created, and the refusal names the line only.
#[tokio::test]
async fn erase_refuses_malformed_identifiers_without_echoing_them_or_creating_anything() {
    let (client, ns) = setup("plugin-refuse").await;
    let plugin = Plugin::install();
    let output = plugin
        .run(
            &[
                "erase",
                "-n",
                &ns,
                "--ground",
                "objection",
                "--name",
                "dsr-x",
                "--wait",
                "0s",
            ],
            &format!("email={EMAIL}\n{USER}\n"),
        )
        .await;
    assert!(!output.status.success());
    assert_no_identifier(&output);
    let (_, stderr) = text(&output);
    assert!(stderr.contains("line 2"), "{stderr}");
    assert!(Api::<ErasureRequest>::namespaced(client.clone(), &ns)
        .get_opt("dsr-x")
        .await
        .unwrap()
        .is_none());
    assert!(Api::<Secret>::namespaced(client, &ns)
        .get_opt("dsr-x-identifiers")
        .await
        .unwrap()
        .is_none());

    let output = plugin
        .run(&["erase", "-n", &ns, "--ground", "because"], "userId=1\n")
        .await;
    assert!(!output.status.success());
    assert!(
        text(&output).1.contains("consentWithdrawn"),
        "the valid grounds are listed"
    );
}

/// `hold` by identifiers (digested with the operator's key) blocks the subject's erasure;
/// `hold` by digest stores exactly that digest, and a malformed one is refused.
#[tokio::test]
async fn hold_puts_a_subject_under_a_legal_hold_that_blocks_their_erasure() {
    let Shop {
        client,
        ns,
        mut conn,
        operator,
        plugin,
        _redis,
    } = Shop::open("plugin-hold").await;
    // The operator creates its digest key when it first needs it; so may anyone first.
    let key = load_or_create_key(&client, &ns).await.expect("digest key");

    let output = plugin
        .run(
            &[
                "hold",
                "-n",
                &ns,
                "--reason",
                "Pending claim",
                "--from-file",
                "-",
                "--operator-namespace",
                &ns,
                "--name",
                "claim",
            ],
            &identifiers(),
        )
        .await;
    let stdout = succeeded(&output);
    assert_no_identifier(&output);
    let email_digest = identifier_digest(&key, "email", EMAIL);
    assert!(stdout.contains(&email_digest), "{stdout}");
    let hold = Api::<LegalHold>::namespaced(client.clone(), &ns)
        .get("claim")
        .await
        .unwrap();
    let held: Vec<String> = hold
        .spec
        .subjects
        .unwrap_or_default()
        .into_iter()
        .filter_map(|s| s.digest)
        .collect();
    assert_eq!(
        held,
        [
            email_digest.clone(),
            identifier_digest(&key, "userId", USER)
        ]
    );

    let output = plugin
        .run(
            &[
                "erase",
                "-n",
                &ns,
                "--ground",
                "objection",
                "--name",
                "dsr-held",
            ],
            &identifiers(),
        )
        .await;
    succeeded(&output);
    let blocked = wait_phase(&client, &ns, "dsr-held", ErasurePhase::Blocked).await;
    assert!(blocked
        .status
        .unwrap()
        .conditions
        .iter()
        .any(|c| c.type_ == "Blocked" && c.reason == "LegalHold"));
    assert_eq!(
        count_keys(&mut conn, &format!("session:{USER}:*")).await,
        4,
        "held data stays"
    );

    let by_digest = plugin
        .run(
            &[
                "hold",
                "-n",
                &ns,
                "--reason",
                "Audit",
                "--digest",
                &email_digest,
                "--name",
                "by-digest",
            ],
            "",
        )
        .await;
    succeeded(&by_digest);
    let hold = Api::<LegalHold>::namespaced(client.clone(), &ns)
        .get("by-digest")
        .await
        .unwrap();
    assert_eq!(
        hold.spec.subjects.unwrap()[0].digest.as_deref(),
        Some(email_digest.as_str())
    );

    let refused = plugin
        .run(
            &[
                "hold", "-n", &ns, "--reason", "Audit", "--digest", EMAIL, "--name", "raw",
            ],
            "",
        )
        .await;
    assert!(!refused.status.success());
    assert!(Api::<LegalHold>::namespaced(client, &ns)
        .get_opt("raw")
        .await
        .unwrap()
        .is_none());
    operator.stop().await;
}

/// `status` sorts requests into overdue, due soon and stalled, from what the operator wrote.
#[tokio::test]
async fn status_shows_overdue_due_soon_and_stalled_requests() {
    let (client, ns) = setup("plugin-status").await;
    let redis = RedisServer::start();
    let operator = TestOperator::start(&ns).await;
    shop(&client, &ns, &redis).await;
    // A hold whose Secret is missing cannot be evaluated: every request waits, Blocked.
    create::<LegalHold>(
        &client,
        &ns,
        json!({"apiVersion": "tombstone.dev/v1alpha1", "kind": "LegalHold", "metadata": {"name": "unknown"},
               "spec": {"reason": "Pending claim", "subjects": [{"secretRef": {"name": "missing"}}]}}),
    )
    .await;
    let now = chrono::Utc::now();
    let received = [
        ("overdue", now - chrono::Duration::days(45)),
        ("due-soon", now - chrono::Duration::days(28)),
        ("fresh", now),
    ];
    for (name, at) in received {
        crate::fixtures::create_subject_secret(&client, &ns, name, json!({"userId": USER})).await;
        create::<ErasureRequest>(
            &client,
            &ns,
            json!({"apiVersion": "tombstone.dev/v1alpha1", "kind": "ErasureRequest", "metadata": {"name": name},
                   "spec": {"subject": {"secretRef": {"name": name}}, "reason": "objection",
                            "receivedAt": at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)}}),
        )
        .await;
    }
    for (name, _) in received {
        wait_phase(&client, &ns, name, ErasurePhase::Blocked).await;
    }

    let plugin = Plugin::install();
    let output = plugin
        .run(&["status", "-n", &ns, "--stall-failing-after", "0s"], "")
        .await;
    let stdout = succeeded(&output);
    let section = |title: &str| -> Vec<String> {
        let mut lines = stdout.lines().skip_while(|l| !l.starts_with(title));
        let header = lines.next().unwrap_or_default().to_string();
        lines
            .take_while(|l| !l.is_empty())
            .filter(|l| !l.trim_start().starts_with("NAMESPACE"))
            .filter_map(|l| l.split_whitespace().nth(1).map(str::to_string))
            .chain(std::iter::once(header))
            .collect()
    };
    assert!(stdout.contains("Erasure requests: 3"), "{stdout}");
    assert_eq!(section("Overdue:"), ["overdue", "Overdue: 1"], "{stdout}");
    assert_eq!(
        section("Due within 7d:"),
        ["due-soon", "Due within 7d: 1"],
        "{stdout}"
    );
    let stalled = section("Stalled:");
    assert_eq!(stalled.len(), 4, "{stdout}");
    assert!(stdout.contains("HoldUnverifiable"), "{stdout}");

    // The operator's own default (an hour) has not passed: nothing is stalled yet.
    let output = plugin.run(&["status", "-n", &ns], "").await;
    assert!(succeeded(&output).contains("Stalled: 0"));
    operator.stop().await;
}
