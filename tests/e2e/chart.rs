//! The Helm chart (`charts/tombstone`): `helm lint` with its values schema, `helm template`
//! with the default values and with everything enabled, the rendered manifests applied to
//! the real API server with a server-side dry run, the restricted security settings and
//! probes of the rendered Deployment, RBAC equal to `config/rbac`, and a dashboard and
//! alerts that query only metrics the operator exports.
//!
//! helm comes from `HELM_BIN`, else `PATH`, else `${XDG_CACHE_HOME:-~/.cache}/tombstone/helm/bin/helm`
//! (where `hack/setup.sh` installs it). Without it these tests fail in CI (`CI` set) and are
//! skipped, with a message, elsewhere.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::Deserialize;
use serde_yaml::Value;

use tombstone::api::retentionpolicy::SweepOutcome;

use crate::support::{test_namespace, ControlPlane};

const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/tombstone");
const DASHBOARD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/charts/tombstone/dashboards/tombstone.json"
);

/// Values that turn every optional part of the chart on.
const EVERYTHING: &[&str] = &[
    "replicas=2",
    "watchNamespace=shop",
    "logFormat=text",
    "metrics.serviceMonitor.enabled=true",
    "metrics.prometheusRule.enabled=true",
    "dashboard.enabled=true",
    "networkPolicy.enabled=true",
    "receipts.dataStore=receipts",
    "receipts.bucket=audit-receipts",
];

// ---------------------------------------------------------------------------------------
// helm
// ---------------------------------------------------------------------------------------

struct Helm {
    bin: PathBuf,
    /// helm's cache, config and data directories: never the user's.
    home: PathBuf,
}

/// The helm binary, or `None` (after saying why) when it is missing outside CI.
fn helm() -> Option<Helm> {
    let in_ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false");
    let bin = if let Some(bin) = std::env::var_os("HELM_BIN").filter(|v| !v.is_empty()) {
        let bin = PathBuf::from(bin);
        assert!(bin.is_file(), "HELM_BIN={} does not exist", bin.display());
        Some(bin)
    } else {
        let on_path = std::env::var_os("PATH").and_then(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join("helm"))
                .find(|p| p.is_file())
        });
        let cache = std::env::var_os("XDG_CACHE_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".cache")));
        let cached = cache
            .map(|cache| cache.join("tombstone/helm/bin/helm"))
            .filter(|p| p.is_file());
        on_path.or(cached)
    };
    let Some(bin) = bin else {
        let hint = "helm not found: set HELM_BIN, put helm on PATH, or run hack/setup.sh \
                    (installs it into ${XDG_CACHE_HOME:-~/.cache}/tombstone/helm/bin)";
        assert!(!in_ci, "{hint}");
        eprintln!("SKIPPED: {hint}");
        return None;
    };
    let home = std::env::temp_dir().join(format!("tombstone-chart-tests-{}", std::process::id()));
    Some(Helm { bin, home })
}

impl Helm {
    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.env("HELM_CACHE_HOME", self.home.join("cache"))
            .env("HELM_CONFIG_HOME", self.home.join("config"))
            .env("HELM_DATA_HOME", self.home.join("data"))
            .stdin(Stdio::null());
        cmd
    }

    fn run(&self, args: &[&str], sets: &[&str]) -> Result<String, String> {
        let mut cmd = self.command();
        cmd.args(args);
        for set in sets {
            cmd.args(["--set", set]);
        }
        let out = cmd.output().expect("cannot run helm");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(stdout)
        } else {
            Err(format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)))
        }
    }

    /// `helm template` of the chart as release `tombstone` in `namespace`.
    fn template(&self, namespace: &str, sets: &[&str]) -> Result<Vec<Value>, String> {
        self.run(
            &["template", "tombstone", CHART, "--namespace", namespace],
            sets,
        )
        .map(|yaml| documents(&yaml))
    }
}

fn documents(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| Value::deserialize(d).expect("helm rendered invalid YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

fn kind(object: &Value) -> &str {
    object["kind"].as_str().expect("an object without kind")
}

fn name(object: &Value) -> &str {
    object["metadata"]["name"]
        .as_str()
        .expect("an object without name")
}

fn find<'a>(objects: &'a [Value], wanted: &str) -> Vec<&'a Value> {
    objects.iter().filter(|o| kind(o) == wanted).collect()
}

fn one<'a>(objects: &'a [Value], wanted: &str) -> &'a Value {
    let found = find(objects, wanted);
    assert_eq!(
        found.len(),
        1,
        "expected one {wanted}, found {}",
        found.len()
    );
    found[0]
}

// ---------------------------------------------------------------------------------------
// Metric names
// ---------------------------------------------------------------------------------------

/// Every sample name the operator's registry exports, from its rendered `# TYPE` lines: a
/// counter `x` is sampled as `x_total`, a histogram as `x_bucket`, `x_sum` and `x_count`.
fn exported_metric_names() -> BTreeSet<String> {
    // The registry `tombstone::operator::start` builds and `/metrics` renders.
    let text = tombstone::metrics::Metrics::default().render();
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let (name, kind) = rest.split_once(' ').expect("a # TYPE line");
        match kind {
            "counter" => {
                names.insert(format!("{}_total", name.trim_end_matches("_total")));
            }
            "histogram" => {
                for suffix in ["bucket", "sum", "count"] {
                    names.insert(format!("{name}_{suffix}"));
                }
            }
            _ => {
                names.insert(name.to_string());
            }
        }
    }
    assert!(names.len() >= 5, "too few metrics in:\n{text}");
    names
}

/// The metric names a PromQL expression selects: every identifier that is not a function,
/// an aggregation, a keyword, a label (in `{…}` or `by (…)`), a string, a number, a range
/// or a Grafana variable.
fn promql_metric_names(expr: &str) -> Vec<String> {
    const LABEL_LISTS: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    const KEYWORDS: &[&str] = &[
        "bool",
        "and",
        "or",
        "unless",
        "offset",
        "sum",
        "min",
        "max",
        "avg",
        "count",
        "stddev",
        "stdvar",
        "topk",
        "bottomk",
        "quantile",
        "count_values",
        "group",
        "limitk",
        "limit_ratio",
    ];
    let chars: Vec<char> = expr.chars().collect();
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    // Index just past the bracket that closes the one at `i`, skipping quoted strings.
    let skip_group = |mut i: usize, open: char, close: char| {
        let mut depth = 0;
        while i < chars.len() {
            match chars[i] {
                '"' | '\'' | '`' => {
                    let quote = chars[i];
                    i += 1;
                    while i < chars.len() && chars[i] != quote {
                        i += if chars[i] == '\\' { 2 } else { 1 };
                    }
                }
                c if c == open => depth += 1,
                c if c == close => {
                    depth -= 1;
                    if depth == 0 {
                        return i + 1;
                    }
                }
                _ => {}
            }
            i += 1;
        }
        panic!("unbalanced {open}{close} in {expr}")
    };
    let mut names = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            i += 1;
            while i < chars.len() && chars[i] != c {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
        } else if c == '{' {
            i = skip_group(i, '{', '}');
        } else if c == '[' {
            i = skip_group(i, '[', ']');
        } else if c.is_ascii_digit() || c == '.' || c == '$' {
            // Numbers, durations (`5m`, `1e3`) and Grafana variables.
            i += 1;
            while i < chars.len() && (ident(chars[i]) || chars[i] == '.') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len() && ident(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut next = i;
            while next < chars.len() && chars[next].is_whitespace() {
                next += 1;
            }
            let next_char = chars.get(next).copied();
            if LABEL_LISTS.contains(&word.as_str()) {
                if next_char == Some('(') {
                    i = skip_group(next, '(', ')');
                }
            } else if next_char == Some('(') || KEYWORDS.contains(&word.as_str()) {
                // A function or an aggregation: its arguments are read on.
            } else {
                names.push(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

#[test]
fn promql_metric_names_skips_functions_labels_and_ranges() {
    assert_eq!(
        promql_metric_names(
            r#"histogram_quantile(0.95, sum by (le) (rate(a_bucket{job=~"$job", x="y}"}[$__rate_interval]))) / on (job) group_left b:c offset 5m > bool 1e3 and up"#
        ),
        ["a_bucket", "b:c", "up"]
    );
    assert_eq!(
        promql_metric_names("tombstone_erasure_requests_overdue > 0"),
        ["tombstone_erasure_requests_overdue"]
    );
}

/// Every PromQL query of the dashboard: panel targets and template variables.
fn dashboard_queries(dashboard: &serde_json::Value) -> Vec<String> {
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            queries.push(
                target["expr"]
                    .as_str()
                    .expect("a target's expr")
                    .to_string(),
            );
        }
    }
    for variable in dashboard["templating"]["list"].as_array().unwrap() {
        if variable["type"] == "query" {
            let query = variable["definition"].as_str().expect("a query variable");
            // label_values(metric, label): the metric is the first argument.
            let inner = query
                .strip_prefix("label_values(")
                .and_then(|q| q.strip_suffix(')'))
                .unwrap_or_else(|| panic!("unexpected variable query {query}"));
            queries.push(inner.split(',').next().unwrap().trim().to_string());
        }
    }
    queries
}

/// The metrics a query uses, each checked against the exported ones.
fn check_metrics(what: &str, queries: &[String], exported: &BTreeSet<String>) -> BTreeSet<String> {
    let mut used = BTreeSet::new();
    for query in queries {
        let names = promql_metric_names(query);
        assert!(!names.is_empty(), "{what}: no metric in `{query}`");
        for name in names {
            assert!(
                exported.contains(&name),
                "{what}: `{name}` in `{query}` is not a metric the operator exports; it exports {exported:?}"
            );
            used.insert(name);
        }
    }
    used
}

#[test]
fn the_dashboard_queries_only_metrics_the_operator_exports() {
    let exported = exported_metric_names();
    let text = std::fs::read_to_string(DASHBOARD).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    let used = check_metrics("dashboard", &dashboard_queries(&dashboard), &exported);
    // Also any metric-like word anywhere in the JSON (descriptions, links…).
    for word in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if word.starts_with("tombstone_") {
            assert!(
                exported.contains(word),
                "dashboard mentions unknown metric {word}"
            );
        }
    }
    for needed in [
        "tombstone_erasure_requests",
        "tombstone_erasure_requests_overdue",
        "tombstone_erasure_requests_due_soon",
        "tombstone_items_deleted_total",
        "tombstone_items_erased_total",
        "tombstone_sweeps_total",
        "tombstone_sweep_duration_seconds_bucket",
        "tombstone_reconcile_errors_total",
        "tombstone_retention_policies",
    ] {
        assert!(used.contains(needed), "no dashboard panel shows {needed}");
    }
    let titles: Vec<&str> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["title"].as_str().unwrap())
        .collect();
    assert_eq!(titles.len(), 11, "{titles:?}");
    let uid = dashboard["uid"].as_str().unwrap();
    assert!(
        !uid.is_empty() && uid.len() <= 40,
        "Grafana uids are at most 40 characters"
    );
}

#[test]
fn the_alerts_use_only_metrics_the_operator_exports() {
    let Some(helm) = helm() else { return };
    let exported = exported_metric_names();
    let objects = helm
        .template("tombstone-system", &["metrics.prometheusRule.enabled=true"])
        .unwrap();
    let rule = one(&objects, "PrometheusRule");
    let rules = rule["spec"]["groups"][0]["rules"].as_sequence().unwrap();
    let exprs: Vec<String> = rules
        .iter()
        .map(|r| r["expr"].as_str().expect("an alert's expr").to_string())
        .collect();
    let used = check_metrics("PrometheusRule", &exprs, &exported);
    for needed in [
        "tombstone_erasure_requests_overdue",
        "tombstone_erasure_requests_due_soon",
        "tombstone_erasure_requests_stalled",
        "tombstone_retention_policies_sweep_late",
        "tombstone_sweeps_total",
    ] {
        assert!(used.contains(needed), "no alert on {needed}");
    }
    let failed = format!("outcome=\"{}\"", SweepOutcome::Failed.as_str());
    assert!(
        exprs.iter().any(|e| e.contains(&failed)),
        "no alert on {failed} sweeps: {exprs:?}"
    );
}

// ---------------------------------------------------------------------------------------
// Chart metadata, lint and schema
// ---------------------------------------------------------------------------------------

#[test]
fn the_chart_app_version_is_the_crate_version() {
    let chart: Value =
        serde_yaml::from_str(&std::fs::read_to_string(format!("{CHART}/Chart.yaml")).unwrap())
            .unwrap();
    assert_eq!(
        chart["appVersion"].as_str(),
        Some(env!("CARGO_PKG_VERSION")),
        "charts/tombstone/Chart.yaml appVersion must track Cargo.toml's version"
    );
    assert_eq!(chart["apiVersion"].as_str(), Some("v2"));
}

#[test]
fn the_chart_lints_and_its_schema_rejects_bad_values() {
    let Some(helm) = helm() else { return };
    helm.run(&["lint", "--strict", CHART], &[])
        .unwrap_or_else(|e| panic!("helm lint (default values) failed:\n{e}"));
    helm.run(&["lint", "--strict", CHART], EVERYTHING)
        .unwrap_or_else(|e| panic!("helm lint (everything enabled) failed:\n{e}"));

    for (set, expected) in [
        ("replicas=two", "replicas"),
        ("logFormat=xml", "logFormat"),
        ("replica=2", "replica"),
        ("image.pullPolicy=Sometimes", "pullPolicy"),
        ("checkpointInterval=soon", "checkpointInterval"),
        ("service.port=70000", "port"),
        ("receipts.lockMode=forever", "lockMode"),
        ("completedRequestTTL=a-month", "completedRequestTTL"),
    ] {
        let err = helm
            .template("tombstone-system", &[set])
            .expect_err(&format!("--set {set} was accepted"));
        assert!(
            err.contains("schema") && err.contains(expected),
            "--set {set}: not a schema error naming {expected}:\n{err}"
        );
    }
    let err = helm
        .template(
            "tombstone-system",
            &["replicas=2", "leaderElection.enabled=false"],
        )
        .expect_err("replicas > 1 without leader election was accepted");
    assert!(err.contains("needs leaderElection.enabled"), "{err}");
}

// ---------------------------------------------------------------------------------------
// Rendered objects
// ---------------------------------------------------------------------------------------

fn env_var<'a>(container: &'a Value, name: &str) -> &'a Value {
    container["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("no env {name}"))
}

/// The restricted Pod Security Standard, probes, env and flags of the Deployment.
fn check_deployment(deployment: &Value, replicas: u64, namespace: &str) {
    assert_eq!(
        deployment["metadata"]["namespace"].as_str(),
        Some(namespace)
    );
    let spec = &deployment["spec"];
    assert_eq!(spec["replicas"].as_u64(), Some(replicas));
    let strategy = if replicas > 1 {
        "RollingUpdate"
    } else {
        "Recreate"
    };
    assert_eq!(spec["strategy"]["type"].as_str(), Some(strategy));
    let pod = &spec["template"]["spec"];
    let pod_security = &pod["securityContext"];
    assert_eq!(pod_security["runAsNonRoot"].as_bool(), Some(true));
    assert_eq!(
        pod_security["seccompProfile"]["type"].as_str(),
        Some("RuntimeDefault")
    );
    for forbidden in ["hostNetwork", "hostPID", "hostIPC"] {
        assert!(pod[forbidden].is_null(), "{forbidden} set");
    }
    let containers = pod["containers"].as_sequence().unwrap();
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    let security = &c["securityContext"];
    assert_eq!(security["runAsNonRoot"].as_bool(), Some(true));
    assert_eq!(security["runAsUser"].as_u64(), Some(65532));
    assert_eq!(security["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(security["allowPrivilegeEscalation"].as_bool(), Some(false));
    assert!(security["privileged"].is_null() || security["privileged"] == false);
    assert_eq!(
        security["capabilities"]["drop"].as_sequence().unwrap(),
        &[Value::from("ALL")]
    );
    assert!(security["capabilities"]["add"].is_null());
    assert_eq!(
        security["seccompProfile"]["type"].as_str(),
        Some("RuntimeDefault")
    );

    // Probes on the named HTTP port, which is the one --http-addr listens on.
    let ports = c["ports"].as_sequence().unwrap();
    let http = ports
        .iter()
        .find(|p| p["name"] == "http")
        .expect("port http");
    let port = http["containerPort"].as_u64().unwrap();
    let args: Vec<&str> = c["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(
        args.contains(&format!("--http-addr=0.0.0.0:{port}").as_str()),
        "{args:?}"
    );
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        assert_eq!(c[probe]["httpGet"]["path"].as_str(), Some(path), "{probe}");
        assert_eq!(
            c[probe]["httpGet"]["port"].as_str(),
            Some("http"),
            "{probe}"
        );
    }
    assert!(c["resources"]["requests"]["cpu"].is_string());
    assert!(c["resources"]["requests"]["memory"].is_string());
    assert!(c["resources"]["limits"]["memory"].is_string());

    // Downward API for the Lease, and the log format.
    assert_eq!(
        env_var(c, "POD_NAME")["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
        Some("metadata.name")
    );
    assert_eq!(
        env_var(c, "POD_NAMESPACE")["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
        Some("metadata.namespace")
    );
    assert!(env_var(c, "LOG_FORMAT")["value"].is_string());

    // /tmp is writable (an emptyDir) although the root filesystem is not.
    let mount = c["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"] == "/tmp")
        .expect("/tmp mounted");
    let volume = pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap();
    assert!(volume["emptyDir"].is_mapping());

    // The image tag is the appVersion, and the binary knows every flag and env var given.
    let image = c["image"].as_str().unwrap();
    assert!(
        image.ends_with(&format!(":{}", env!("CARGO_PKG_VERSION"))),
        "{image}"
    );
    assert_eq!(
        c["command"].as_sequence().unwrap(),
        &[Value::from("/tombstone"), Value::from("run")]
    );
    let help = Command::new(env!("CARGO_BIN_EXE_tombstone"))
        .args(["run", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    for arg in &args {
        let flag = arg.split('=').next().unwrap();
        assert!(
            help.contains(flag),
            "`tombstone run` has no {flag}:\n{help}"
        );
    }
    for env in c["env"].as_sequence().unwrap() {
        let name = env["name"].as_str().unwrap();
        assert!(
            name == "RUST_LOG" || help.contains(&format!("[env: {name}")),
            "`tombstone run` reads no {name}:\n{help}"
        );
    }
}

/// Applies every object but the prometheus-operator kinds with a server-side dry run, and
/// checks that kubectl reports each one.
fn dry_run_apply(objects: &[Value]) -> usize {
    let applicable: Vec<&Value> = objects
        .iter()
        .filter(|o| !matches!(kind(o), "ServiceMonitor" | "PrometheusRule"))
        .collect();
    let mut manifests = String::new();
    for object in &applicable {
        manifests.push_str("---\n");
        manifests.push_str(&serde_yaml::to_string(object).unwrap());
    }
    let applied = ControlPlane::get().kubectl_with_input(
        &["apply", "--server-side", "--dry-run=server", "-f", "-"],
        &manifests,
    );
    let report = String::from_utf8_lossy(&applied.stdout);
    assert!(
        applied.status.success(),
        "kubectl apply --dry-run=server refused the chart:\n{report}{}\n{manifests}",
        String::from_utf8_lossy(&applied.stderr)
    );
    for object in &applicable {
        let group = object["apiVersion"]
            .as_str()
            .unwrap()
            .rsplit_once('/')
            .map(|(group, _)| format!(".{group}"))
            .unwrap_or_default();
        let prefix = format!("{}{group}/{} ", kind(object).to_lowercase(), name(object));
        assert!(
            report
                .lines()
                .any(|l| l.starts_with(&prefix) && l.ends_with("(server dry run)")),
            "{prefix}missing from kubectl's report:\n{report}"
        );
    }
    applicable.len()
}

fn kinds(objects: &[Value]) -> BTreeSet<&str> {
    objects.iter().map(kind).collect()
}

#[tokio::test]
async fn the_chart_with_default_values_applies_server_side() {
    let Some(helm) = helm() else { return };
    let client = ControlPlane::get().client();
    let ns = test_namespace(&client, "chart-default").await;
    let objects = helm.template(&ns, &[]).unwrap();
    assert_eq!(
        kinds(&objects),
        BTreeSet::from([
            "ClusterRole",
            "ClusterRoleBinding",
            "Deployment",
            "Role",
            "RoleBinding",
            "Service",
            "ServiceAccount",
        ])
    );
    check_deployment(one(&objects, "Deployment"), 1, &ns);
    let deployment = one(&objects, "Deployment");
    let c = &deployment["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(env_var(c, "LOG_FORMAT")["value"].as_str(), Some("json"));
    assert!(
        c["env"]
            .as_sequence()
            .unwrap()
            .iter()
            .all(|e| e["name"] != "WATCH_NAMESPACE"),
        "watches every namespace by default"
    );
    // The Service exposes the metrics port to the operator's pod.
    let service = one(&objects, "Service");
    assert_eq!(
        service["spec"]["selector"],
        deployment["spec"]["selector"]["matchLabels"]
    );
    assert_eq!(
        service["spec"]["ports"][0]["targetPort"].as_str(),
        Some("http")
    );
    assert_eq!(dry_run_apply(&objects), 7);
}

#[tokio::test]
async fn the_chart_with_everything_enabled_applies_server_side() {
    let Some(helm) = helm() else { return };
    let client = ControlPlane::get().client();
    let ns = test_namespace(&client, "chart-all").await;
    let objects = helm.template(&ns, EVERYTHING).unwrap();
    assert_eq!(
        kinds(&objects),
        BTreeSet::from([
            "ClusterRole",
            "ClusterRoleBinding",
            "ConfigMap",
            "Deployment",
            "NetworkPolicy",
            "PrometheusRule",
            "Role",
            "RoleBinding",
            "Service",
            "ServiceAccount",
            "ServiceMonitor",
        ])
    );
    let deployment = one(&objects, "Deployment");
    check_deployment(deployment, 2, &ns);
    let c = &deployment["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(
        env_var(c, "WATCH_NAMESPACE")["value"].as_str(),
        Some("shop")
    );
    assert_eq!(env_var(c, "LOG_FORMAT")["value"].as_str(), Some("text"));
    let args: Vec<&str> = c["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for arg in [
        "--receipt-sink-datastore=receipts",
        "--receipt-sink-bucket=audit-receipts",
        "--receipt-sink-prefix=tombstone-receipts/",
        "--receipt-lock-mode=compliance",
        "--receipt-lock-period=2190d",
        "--completed-request-ttl=30d",
    ] {
        assert!(args.contains(&arg), "{arg} not in {args:?}");
    }
    let selector = &deployment["spec"]["selector"]["matchLabels"];

    // The dashboard: labelled for the Grafana sidecar, the JSON shipped unchanged.
    let dashboard = one(&objects, "ConfigMap");
    assert_eq!(
        dashboard["metadata"]["labels"]["grafana_dashboard"].as_str(),
        Some("1")
    );
    let json: serde_json::Value =
        serde_json::from_str(dashboard["data"]["tombstone.json"].as_str().unwrap()).unwrap();
    let shipped: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(DASHBOARD).unwrap()).unwrap();
    assert_eq!(json, shipped);

    // The NetworkPolicy: ingress only to the metrics port, egress open.
    let policy = one(&objects, "NetworkPolicy");
    assert_eq!(&policy["spec"]["podSelector"]["matchLabels"], selector);
    let ingress = policy["spec"]["ingress"].as_sequence().unwrap();
    assert_eq!(ingress.len(), 1);
    assert_eq!(
        ingress[0]["ports"].as_sequence().unwrap(),
        &[serde_yaml::from_str::<Value>("{port: http, protocol: TCP}").unwrap()]
    );
    assert_eq!(
        policy["spec"]["egress"].as_sequence().unwrap(),
        &[Value::Mapping(Default::default())]
    );

    // The prometheus-operator kinds, whose CRDs the test API server lacks: their shape.
    let monitor = one(&objects, "ServiceMonitor");
    assert_eq!(
        monitor["apiVersion"].as_str(),
        Some("monitoring.coreos.com/v1")
    );
    assert_eq!(monitor["metadata"]["namespace"].as_str(), Some(ns.as_str()));
    let service = one(&objects, "Service");
    let service_labels = service["metadata"]["labels"].as_mapping().unwrap();
    for (key, value) in monitor["spec"]["selector"]["matchLabels"]
        .as_mapping()
        .unwrap()
    {
        assert_eq!(
            service_labels.get(key),
            Some(value),
            "ServiceMonitor misses the Service"
        );
    }
    assert_eq!(
        monitor["spec"]["namespaceSelector"]["matchNames"][0].as_str(),
        Some(ns.as_str())
    );
    let endpoint = &monitor["spec"]["endpoints"][0];
    assert_eq!(endpoint["port"], service["spec"]["ports"][0]["name"]);
    assert_eq!(endpoint["path"].as_str(), Some("/metrics"));

    let rule = one(&objects, "PrometheusRule");
    assert_eq!(
        rule["apiVersion"].as_str(),
        Some("monitoring.coreos.com/v1")
    );
    let rules = rule["spec"]["groups"][0]["rules"].as_sequence().unwrap();
    let alerts: BTreeSet<&str> = rules.iter().map(|r| r["alert"].as_str().unwrap()).collect();
    for alert in [
        "TombstoneErasureRequestOverdue",
        "TombstoneErasureRequestDueSoon",
        "TombstoneRetentionPolicyNotCompliant",
        "TombstoneSweepsFailing",
        "TombstoneErasureRequestStalled",
        "TombstoneSweepLate",
    ] {
        assert!(alerts.contains(alert), "no alert {alert}: {alerts:?}");
    }
    for r in rules {
        assert!(r["expr"].is_string() && r["for"].is_string(), "{r:?}");
        assert!(
            matches!(
                r["labels"]["severity"].as_str(),
                Some("critical" | "warning")
            ),
            "{r:?}"
        );
        assert!(r["annotations"]["summary"].is_string(), "{r:?}");
    }

    assert_eq!(dry_run_apply(&objects), 9);
}

/// The rules of `kind` in these objects, as a set of (apiGroups, resources, resourceNames,
/// verbs) each sorted.
fn rules(objects: &[Value], wanted: &str) -> BTreeSet<String> {
    let mut set = BTreeSet::new();
    for object in find(objects, wanted) {
        for rule in object["rules"].as_sequence().unwrap() {
            let field = |f: &str| {
                let mut items: Vec<String> = rule[f]
                    .as_sequence()
                    .map(|s| s.iter().map(|v| v.as_str().unwrap().to_string()).collect())
                    .unwrap_or_default();
                items.sort();
                items.join(",")
            };
            set.insert(format!(
                "groups={} resources={} names={} verbs={}",
                field("apiGroups"),
                field("resources"),
                field("resourceNames"),
                field("verbs")
            ));
        }
    }
    set
}

#[test]
fn the_chart_rbac_is_config_rbac() {
    let Some(helm) = helm() else { return };
    let rendered = Command::new("kubectl")
        .args([
            "kustomize",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config/rbac"),
        ])
        .output()
        .expect("cannot run kubectl");
    assert!(rendered.status.success());
    let config = documents(&String::from_utf8(rendered.stdout).unwrap());
    let chart = helm.template("tombstone-system", &[]).unwrap();
    for kind in ["ClusterRole", "Role"] {
        assert_eq!(
            rules(&chart, kind),
            rules(&config, kind),
            "the chart's {kind} differs from config/rbac"
        );
    }
    // Every rule says why it is needed.
    for template in ["rbac.yaml"] {
        let text = std::fs::read_to_string(format!("{CHART}/templates/{template}")).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            if line.starts_with("- apiGroups:") {
                assert!(
                    lines[..i].last().is_some_and(|l| l.starts_with('#')),
                    "{template}:{}: a rule without a comment saying why",
                    i + 1
                );
            }
        }
    }
    // rbac.create=false leaves RBAC to the cluster's owner.
    let chart = helm
        .template("tombstone-system", &["rbac.create=false"])
        .unwrap();
    assert!(
        chart.iter().all(|o| !kind(o).contains("Role")),
        "rbac.create=false still renders RBAC"
    );
    // Without leader election, no Lease rights.
    let chart = helm
        .template("tombstone-system", &["leaderElection.enabled=false"])
        .unwrap();
    assert!(rules(&chart, "Role").iter().all(|r| !r.contains("leases")));
    let deployment = one(&chart, "Deployment");
    let args = &deployment["spec"]["template"]["spec"]["containers"][0]["args"];
    assert!(args
        .as_sequence()
        .unwrap()
        .contains(&Value::from("--leader-election=false")));
}
