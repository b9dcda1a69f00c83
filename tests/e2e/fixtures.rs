//! Building blocks of the operator tests: the operator run in-process against the test API
//! server, objects built from YAML-like JSON, and Redis seeding.

use std::time::Duration;

use k8s_openapi::api::events::v1::Event;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use redis::aio::MultiplexedConnection;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use tombstone::api::common::{find_condition, ConditionStatus};
use tombstone::api::retentionpolicy::{RetentionPolicyStatus, SweepOutcome};
use tombstone::api::{DataStore, RetentionPolicy};
use tombstone::controller::Settings;
use tombstone::leader::LeaderElection;
use tombstone::operator::{self, Options, Running};

use crate::support::{test_namespace, wait_for, ControlPlane};

/// A fresh namespace with the CRDs installed, and a client for this test's runtime.
pub async fn setup(prefix: &str) -> (Client, String) {
    // Operator logs show with a failing test's output (RUST_LOG widens them), and every log
    // record is also kept in memory so tests can inspect the operator's log.
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "tombstone=info,audit=info".into());
    let _ = tracing_subscriber::registry()
        .with(tracing_subscriber::EnvFilter::new(filter))
        .with(tracing_subscriber::fmt::layer().with_test_writer())
        .with(LogCapture)
        .try_init();
    let cp = ControlPlane::get();
    cp.install_crds().await;
    let client = cp.client();
    let ns = test_namespace(&client, prefix).await;
    (client, ns)
}

/// Settings that make sweeps checkpoint often, so tests see progress quickly.
pub fn fast_settings() -> Settings {
    Settings {
        checkpoint_interval: Duration::from_millis(250),
        probe_interval: Duration::from_secs(5),
        ..Default::default()
    }
}

/// The operator running in-process, watching one namespace.
pub struct TestOperator {
    pub shutdown: CancellationToken,
    pub running: Running,
}

impl TestOperator {
    pub async fn start(ns: &str) -> Self {
        Self::start_with(ns, None, None, fast_settings()).await
    }

    pub async fn start_with(
        ns: &str,
        leader_election: Option<LeaderElection>,
        http_addr: Option<std::net::SocketAddr>,
        settings: Settings,
    ) -> Self {
        Self::start_with_client(
            ControlPlane::get().client(),
            ns,
            leader_election,
            http_addr,
            settings,
        )
        .await
    }

    /// As [`Self::start_with`], talking to the API server through `client` (one that counts
    /// its requests, say).
    pub async fn start_with_client(
        client: Client,
        ns: &str,
        leader_election: Option<LeaderElection>,
        http_addr: Option<std::net::SocketAddr>,
        settings: Settings,
    ) -> Self {
        let shutdown = CancellationToken::new();
        // The digest key Secret lives in the test's namespace, as in the operator's own.
        let settings = Settings {
            operator_namespace: ns.to_string(),
            ..settings
        };
        let options = Options {
            namespace: Some(ns.to_string()),
            leader_election,
            http_addr,
            reporter: "tombstone".into(),
            settings,
        };
        let running = operator::start(client, options, shutdown.clone())
            .await
            .expect("operator starts");
        Self { shutdown, running }
    }

    /// An operator watching every namespace of `client`'s cluster (a private control plane:
    /// the shared one has other tests' objects), with its own namespace `operator_ns`.
    pub async fn start_watching_all(client: Client, operator_ns: &str, settings: Settings) -> Self {
        let shutdown = CancellationToken::new();
        let options = Options {
            namespace: None,
            leader_election: None,
            http_addr: None,
            reporter: "tombstone".into(),
            settings: Settings {
                operator_namespace: operator_ns.to_string(),
                ..settings
            },
        };
        let running = operator::start(client, options, shutdown.clone())
            .await
            .expect("operator starts");
        Self { shutdown, running }
    }

    /// Reconciles `controller` (e.g. `retentionpolicy::CONTROLLER`) has started so far.
    pub fn reconciliations(&self, controller: &str) -> u64 {
        self.running
            .metrics
            .reconciliations
            .get_or_create(&tombstone::metrics::ControllerLabels {
                controller: controller.into(),
            })
            .get()
    }

    /// Graceful stop, as on SIGTERM: running steps checkpoint, then everything ends.
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.running.task)
            .await
            .expect("operator stops within 30s")
            .expect("operator task did not panic")
            .expect("operator stopped cleanly");
    }
}

pub async fn create<K>(client: &Client, ns: &str, value: Value) -> K
where
    K: kube::Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
{
    let obj: K = serde_json::from_value(value).expect("test object deserializes");
    Api::<K>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &obj)
        .await
        .expect("create succeeds")
}

pub async fn redis_store(
    client: &Client,
    ns: &str,
    name: &str,
    url: &str,
    extra: Value,
) -> DataStore {
    let mut redis = json!({"url": url});
    if let (Some(r), Some(e)) = (
        redis.as_object_mut(),
        extra.get("redis").and_then(Value::as_object),
    ) {
        r.extend(e.clone());
    }
    let mut spec = json!({"redis": redis});
    for field in ["limits", "insecure"] {
        if let Some(value) = extra.get(field) {
            spec[field] = value.clone();
        }
    }
    create(client, ns, json!({"apiVersion": "tombstone.dev/v1alpha1", "kind": "DataStore", "metadata": {"name": name}, "spec": spec})).await
}

/// A policy over `targets` with the Art. 30 fields filled in.
pub fn policy_json(name: &str, retention: &str, targets: Value) -> Value {
    json!({
        "apiVersion": "tombstone.dev/v1alpha1",
        "kind": "RetentionPolicy",
        "metadata": {"name": name},
        "spec": {
            "purpose": "Keep shoppers logged in",
            "legalBasis": "contract",
            "dataSubjects": ["customers"],
            "dataCategories": ["session data"],
            "retention": retention,
            "schedule": {"every": "1h"},
            "targets": targets,
        }
    })
}

pub async fn patch_spec<K>(client: &Client, ns: &str, name: &str, spec: Value)
where
    K: kube::Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    Api::<K>::namespaced(client.clone(), ns)
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": spec})),
        )
        .await
        .expect("spec patch succeeds");
}

pub async fn get_policy(client: &Client, ns: &str, name: &str) -> RetentionPolicy {
    Api::<RetentionPolicy>::namespaced(client.clone(), ns)
        .get(name)
        .await
        .expect("policy exists")
}

/// Waits until the policy's status satisfies `pred`, returning it.
pub async fn wait_policy(
    client: &Client,
    ns: &str,
    name: &str,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&RetentionPolicy) -> bool,
) -> RetentionPolicy {
    let api = Api::<RetentionPolicy>::namespaced(client.clone(), ns);
    wait_for(what, timeout, || {
        let api = api.clone();
        let pred = &pred;
        async move { api.get(name).await.ok().filter(|p| pred(p)) }
    })
    .await
}

/// Waits until no sweep is under way and the last one succeeded; returns the status.
pub async fn wait_sweep_succeeded(
    client: &Client,
    ns: &str,
    name: &str,
    what: &str,
    timeout: Duration,
) -> RetentionPolicyStatus {
    let policy = wait_policy(client, ns, name, what, timeout, |p| {
        p.status.as_ref().is_some_and(|s| {
            s.current_sweep.is_none()
                && s.last_sweep
                    .as_ref()
                    .is_some_and(|l| l.outcome == SweepOutcome::Succeeded)
        })
    })
    .await;
    policy.status.unwrap_or_default()
}

/// Waits until a sweep has completed `n` times in total (by `lastSweep` start times seen).
pub async fn wait_sweep_completed(
    client: &Client,
    ns: &str,
    name: &str,
    after: Option<&str>,
) -> RetentionPolicy {
    let after = after.map(str::to_string);
    wait_policy(
        client,
        ns,
        name,
        "a completed sweep",
        Duration::from_secs(60),
        move |p| {
            p.status
                .as_ref()
                .and_then(|s| s.last_sweep.as_ref())
                .is_some_and(|l| {
                    after
                        .as_deref()
                        .is_none_or(|a| l.start_time.to_string().as_str() > a)
                })
                && p.status.as_ref().is_some_and(|s| s.current_sweep.is_none())
        },
    )
    .await
}

pub fn condition(
    conditions: &[tombstone::api::Condition],
    type_: &str,
) -> (ConditionStatus, String, String) {
    let c = find_condition(conditions, type_)
        .unwrap_or_else(|| panic!("no {type_} condition in {conditions:?}"));
    (c.status, c.reason.clone(), c.message.clone())
}

pub async fn wait_store_ready(client: &Client, ns: &str, name: &str, ready: bool) -> DataStore {
    let api = Api::<DataStore>::namespaced(client.clone(), ns);
    let want = if ready {
        ConditionStatus::True
    } else {
        ConditionStatus::False
    };
    wait_for(
        &format!("DataStore {name} Ready={ready}"),
        Duration::from_secs(30),
        || {
            let api = api.clone();
            async move {
                api.get(name).await.ok().filter(|s| {
                    s.status
                        .as_ref()
                        .and_then(|st| find_condition(&st.conditions, "Ready"))
                        .is_some_and(|c| c.status == want)
                })
            }
        },
    )
    .await
}

/// Waits until an event about `name` satisfies `pred` (events are published just after the
/// status is written, so a test that saw the status may not see the event yet).
pub async fn wait_event(
    client: &Client,
    ns: &str,
    name: &str,
    pred: impl Fn(&(String, String, String)) -> bool,
) {
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while tokio::time::Instant::now() < deadline {
        seen = events_for(client, ns, name).await;
        if seen.iter().any(&pred) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("no matching event about {name} within 20s; saw {seen:?}");
}

/// Events about one object, as (type, reason, note).
pub async fn events_for(client: &Client, ns: &str, name: &str) -> Vec<(String, String, String)> {
    let events: Api<Event> = Api::namespaced(client.clone(), ns);
    let list = events
        .list(&ListParams::default().fields(&format!("regarding.name={name}")))
        .await
        .expect("list events");
    list.items
        .into_iter()
        .map(|e| {
            (
                e.type_.unwrap_or_default(),
                e.reason.unwrap_or_default(),
                e.note.unwrap_or_default(),
            )
        })
        .collect()
}

pub async fn redis_conn(url: &str) -> MultiplexedConnection {
    redis::Client::open(url)
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis connection")
}

/// Sets `count` string keys `{prefix}{i}` in pipelined batches.
pub async fn seed(conn: &mut MultiplexedConnection, prefix: &str, count: usize) {
    for chunk in (0..count).collect::<Vec<_>>().chunks(5000) {
        let mut pipe = redis::pipe();
        for i in chunk {
            pipe.cmd("SET")
                .arg(format!("{prefix}{i}"))
                .arg("v")
                .ignore();
        }
        let _: () = pipe.query_async(conn).await.expect("seed");
    }
}

/// Keys matching a glob, counted with SCAN.
pub async fn count_keys(conn: &mut MultiplexedConnection, pattern: &str) -> usize {
    // SCAN may return a key twice while the server resizes its table (after a mass
    // deletion): count distinct keys.
    let mut cursor = 0u64;
    let mut seen = std::collections::HashSet::new();
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await
            .expect("scan");
        seen.extend(keys);
        if next == 0 {
            return seen.len();
        }
        cursor = next;
    }
}

pub async fn ttl(conn: &mut MultiplexedConnection, key: &str) -> i64 {
    redis::cmd("TTL")
        .arg(key)
        .query_async(conn)
        .await
        .expect("ttl")
}

/// One captured log record: its target and its fields (`message` included).
#[derive(Clone, Debug)]
pub struct LogRecord {
    pub target: String,
    pub fields: std::collections::BTreeMap<String, String>,
}

static LOGS: std::sync::Mutex<Vec<LogRecord>> = std::sync::Mutex::new(Vec::new());

/// Every log record emitted in this test process so far (all tests share the process).
pub fn captured_logs() -> Vec<LogRecord> {
    LOGS.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

struct LogCapture;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for LogCapture {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        struct Fields(std::collections::BTreeMap<String, String>);
        impl tracing::field::Visit for Fields {
            fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
                self.0.insert(field.name().to_string(), value.to_string());
            }
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                self.0
                    .insert(field.name().to_string(), format!("{value:?}"));
            }
        }
        let mut fields = Fields(Default::default());
        event.record(&mut fields);
        let record = LogRecord {
            target: event.metadata().target().to_string(),
            fields: fields.0,
        };
        LOGS.lock().unwrap_or_else(|p| p.into_inner()).push(record);
    }
}

/// Finds the audit record logged with `receipt`, checks that the receipt is the SHA-256 of
/// the logged line, and returns the record.
pub fn logged_audit_record(receipt: &str) -> serde_json::Value {
    let logs = captured_logs();
    let record = logs
        .iter()
        .find(|l| {
            l.target == "audit" && l.fields.get("receipt").map(String::as_str) == Some(receipt)
        })
        .unwrap_or_else(|| panic!("no audit record with receipt {receipt} was logged"));
    let line = &record.fields["record"];
    let recomputed = format!(
        "sha256:{}",
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(line.as_bytes()))
    );
    assert_eq!(
        recomputed, receipt,
        "the receipt is the SHA-256 of the logged record"
    );
    serde_json::from_str(line).expect("the audit record is JSON")
}

/// Waits until the rendered metrics contain `needle` (metrics are updated just after status).
pub async fn wait_metric(metrics: &tombstone::metrics::Metrics, needle: &str) {
    // Generous: what is counted may come after a store's back-off (a task polled at 1, 2, 4,
    // 8 s), and a loaded machine stretches it.
    wait_for(needle, Duration::from_secs(60), || async {
        metrics.render().contains(needle).then_some(())
    })
    .await;
}

/// A Secret with `string_data` and no label: the operator neither reads it as store
/// credentials nor deletes it.
pub async fn create_secret(client: &Client, ns: &str, name: &str, string_data: Value) {
    create_labelled_secret(client, ns, name, json!({}), string_data).await;
}

/// A Secret of store credentials, labelled so that the operator may read it as such.
pub async fn create_credentials_secret(client: &Client, ns: &str, name: &str, string_data: Value) {
    let labels = json!({"tombstone.dev/credentials": "true"});
    create_labelled_secret(client, ns, name, labels, string_data).await;
}

/// A data subject's identifiers in a Secret labelled `tombstone.dev/subject-identifiers`,
/// which lets the operator delete it once the erasure is done.
pub async fn create_subject_secret(client: &Client, ns: &str, name: &str, string_data: Value) {
    let labels = json!({"tombstone.dev/subject-identifiers": "true"});
    create_labelled_secret(client, ns, name, labels, string_data).await;
}

async fn create_labelled_secret(
    client: &Client,
    ns: &str,
    name: &str,
    labels: Value,
    string_data: Value,
) {
    let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels},
        "stringData": string_data,
    }))
    .expect("a valid Secret");
    Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &secret)
        .await
        .expect("create succeeds");
}

/// A LegalHold on whole policies.
pub async fn hold_policies(client: &Client, ns: &str, name: &str, policies: &[&str]) {
    create::<tombstone::api::LegalHold>(
        client,
        ns,
        json!({"apiVersion": "tombstone.dev/v1alpha1", "kind": "LegalHold", "metadata": {"name": name},
               "spec": {"reason": "Litigation, Art. 17(3)(e)", "policies": policies}}),
    )
    .await;
}

/// An ErasureRequest for the subject whose identifiers are in the Secret `secret`.
pub async fn request_erasure(client: &Client, ns: &str, name: &str, secret: &str) {
    create::<tombstone::api::ErasureRequest>(
        client,
        ns,
        json!({"apiVersion": "tombstone.dev/v1alpha1", "kind": "ErasureRequest", "metadata": {"name": name},
               "spec": {"subject": {"secretRef": {"name": secret}}, "reason": "objection"}}),
    )
    .await;
}

/// Runs subject steps of `job` from the start until one is done (or fails, or returns
/// `Wait`), and returns that step: its count is the job's. An erase takes at least two steps
/// where the driver checkpoints the id of its ledger before it erases anything.
pub async fn subject_until_done(
    backend: &dyn tombstone::backends::Backend,
    job: &tombstone::backends::SubjectJob,
    budget: &tombstone::backends::StepBudget,
) -> Result<tombstone::backends::SubjectStep, tombstone::backends::Error> {
    let mut cursor: Option<String> = None;
    for _ in 0..10_000 {
        let step = backend.subject_step(job, cursor.as_deref(), budget).await?;
        match &step.next {
            tombstone::backends::Next::Continue(c) if step.failure.is_none() => {
                cursor = Some(c.clone())
            }
            _ => return Ok(step),
        }
    }
    panic!("the subject job did not finish in 10,000 steps");
}
