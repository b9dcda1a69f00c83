//! The local demo behind `hack/demo.sh`: a local control plane (etcd + kube-apiserver), a
//! redis-server with some personal data in it, S3 (moto), the Loki test double, a real
//! OpenSearch node (the Elasticsearch test double when Java or its launcher is missing, said
//! loudly), the CRDs, the operator (the real `tombstone
//! run` binary, given as TOMBSTONE_BIN) and the samples of config/samples. Waits for the
//! first sweep and prints what `kubectl get tombstone` shows. With `--keep` it stays up
//! until Ctrl-C so you can look around with kubectl.

#[path = "../tests/support/mod.rs"]
mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use kube::Api;
use tombstone::api::erasurerequest::ErasurePhase;
use tombstone::api::{ErasureRequest, RetentionPolicy};

const NAMESPACE: &str = "shop";

fn kubectl(cp: &support::ControlPlane, args: &[&str]) -> String {
    let out = cp.kubectl().args(args).output().expect("running kubectl");
    if !out.status.success() {
        panic!(
            "kubectl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The search store of the demo: a real OpenSearch node when Java and its launcher are
/// there (`hack/setup.sh` provides both), otherwise the Elasticsearch test double.
enum Search {
    Real(&'static support::opensearch::SearchNode, reqwest::Client),
    Double(support::elasticsearch::EsDouble),
}

impl Search {
    async fn start() -> Search {
        let launcher = std::env::var("OPENSEARCH_LAUNCHER_CLASSPATH").unwrap_or_default();
        let java = std::env::var("OPENSEARCH_JAVA").unwrap_or_else(|_| "java".into());
        let java_runs = Command::new(&java)
            .arg("-version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !launcher.is_empty() && java_runs {
            println!("==> starting OpenSearch (a real node) with delivery events");
            let node = support::opensearch::SearchNode::opensearch();
            println!("    OpenSearch {} on {}", node.version(), node.url());
            return Search::Real(node, reqwest::Client::new());
        }
        let why = if launcher.is_empty() {
            "OPENSEARCH_LAUNCHER_CLASSPATH is not set"
        } else {
            "java does not run"
        };
        eprintln!();
        eprintln!("!!! ------------------------------------------------------------------------");
        eprintln!("!!! NO REAL OPENSEARCH: {why}. The demo falls back to the Elasticsearch");
        eprintln!("!!! TEST DOUBLE, which only imitates the REST API. Run it through hack/demo.sh");
        eprintln!("!!! (or eval \"$(hack/setup.sh)\" first) with Java installed for a real node.");
        eprintln!("!!! ------------------------------------------------------------------------");
        eprintln!();
        println!("==> starting Elasticsearch (the test double) with delivery events");
        Search::Double(support::elasticsearch::EsDouble::start().await)
    }

    fn name(&self) -> &'static str {
        match self {
            Search::Real(..) => "OpenSearch",
            Search::Double(_) => "Elasticsearch (test double)",
        }
    }

    fn url(&self) -> String {
        match self {
            Search::Real(node, _) => node.url(),
            Search::Double(es) => es.url(),
        }
    }

    async fn seed(&self, index: &str, docs: &[(&str, serde_json::Value)]) {
        match self {
            Search::Double(es) => es.seed(index, docs),
            Search::Real(node, http) => {
                for (id, source) in docs {
                    let response = http
                        .put(format!("{}/{index}/_doc/{id}?refresh=true", node.url()))
                        .json(source)
                        .send()
                        .await
                        .expect("indexing a document");
                    assert!(
                        response.status().is_success(),
                        "indexing into {index}: {}",
                        response.status()
                    );
                }
            }
        }
    }

    async fn indices(&self) -> Vec<String> {
        match self {
            Search::Double(es) => es.indices(),
            Search::Real(node, http) => {
                let rows: Vec<serde_json::Value> = http
                    .get(format!(
                        "{}/_cat/indices/mailer-events-*?format=json&h=index",
                        node.url()
                    ))
                    .send()
                    .await
                    .expect("_cat/indices")
                    .json()
                    .await
                    .expect("_cat/indices answer");
                let mut names: Vec<String> = rows
                    .iter()
                    .filter_map(|r| r["index"].as_str().map(str::to_string))
                    .collect();
                names.sort();
                names
            }
        }
    }

    async fn ids(&self, index: &str) -> Vec<String> {
        match self {
            Search::Double(es) => es.ids(index),
            Search::Real(node, http) => {
                let answer: serde_json::Value = http
                    .get(format!(
                        "{}/{index}/_search?size=100&_source=false&ignore_unavailable=true",
                        node.url()
                    ))
                    .send()
                    .await
                    .expect("_search")
                    .json()
                    .await
                    .expect("_search answer");
                let mut ids: Vec<String> = answer["hits"]["hits"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|h| h["_id"].as_str().map(str::to_string))
                    .collect();
                ids.sort();
                ids
            }
        }
    }
}

#[tokio::main]
async fn main() {
    tombstone::install_crypto_provider();
    let keep = std::env::args().any(|a| a == "--keep");
    let binary = std::env::var("TOMBSTONE_BIN")
        .expect("TOMBSTONE_BIN: the tombstone binary to run (hack/demo.sh sets it)");

    println!("==> starting a local control plane (etcd + kube-apiserver)");
    let cp = support::ControlPlane::get();
    cp.install_crds().await;
    let client = cp.client();
    kubectl(cp, &["create", "namespace", NAMESPACE]);

    println!("==> starting redis-server and filling it with sessions and carts");
    let redis = support::RedisServer::start();
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let mut pipe = redis::pipe();
    for user in 0..100 {
        for n in 0..10 {
            pipe.cmd("SET")
                .arg(format!("session:{user}:{n}"))
                .arg("token")
                .ignore();
        }
        pipe.cmd("HSET")
            .arg(format!("cart:{user}"))
            .arg("sku-1")
            .arg(1)
            .ignore();
    }
    pipe.cmd("SET")
        .arg("config:feature-flags")
        .arg("{}")
        .ignore();
    let _: () = pipe.query_async(&mut conn).await.unwrap();
    let ttl = |key: &'static str| {
        let mut conn = conn.clone();
        async move {
            redis::cmd("TTL")
                .arg(key)
                .query_async::<i64>(&mut conn)
                .await
                .unwrap()
        }
    };
    println!(
        "    TTL of session:43:0 before: {} (-1: kept forever)",
        ttl("session:43:0").await
    );

    println!("==> starting a local S3 server (moto) with a mail archive in bucket shop-archive");
    let s3 = support::s3::S3Server::start();
    s3.create_bucket("shop-archive", true, false).await;
    for day in 20..23 {
        let mut lines = String::new();
        for user in 40..45 {
            lines.push_str(&format!(
                "{{\"ts\":\"2026-11-{day}T10:00:00Z\",\"msg\":{{\"recipient\":\"{}\",\"template\":\"order-shipped\"}},\"status\":\"delivered\"}}\n",
                if user == 42 { "alice@example.com".to_string() } else { format!("user{user}@example.com") }
            ));
        }
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        std::io::Write::write_all(&mut gz, lines.as_bytes()).unwrap();
        s3.put(
            "shop-archive",
            &format!("mailer/logs/2026-11-{day}.jsonl.gz"),
            gz.finish().unwrap(),
        )
        .await;
    }
    for user in [42, 4242] {
        for file in ["invoices.json", "preferences.json"] {
            s3.put("shop-archive", &format!("mailer/users/{user}/{file}"), "{}")
                .await;
        }
    }

    // No Loki can be installed here: the demo uses its test double, which follows Loki's
    // documented delete API and keeps state.
    println!("==> starting Loki (the test double) with delivery logs");
    let loki = support::loki::LokiDouble::start_with(true, None).await;
    let day_ns = 86_400 * 1_000_000_000_i64;
    let now_ns = support::loki::now_ns();
    let labels = [("namespace", "mailer"), ("app", "mailer")];
    let old_lines: Vec<(i64, String)> = (0..50)
        .map(|i| {
            (
                now_ns - 40 * day_ns + i,
                format!("delivered order-confirmation to user{i}@example.com"),
            )
        })
        .collect();
    let mut new_lines: Vec<(i64, String)> = (0..20)
        .map(|i| {
            (
                now_ns - 3_600_000_000_000 + i,
                format!("delivered order-shipped to user{i}@example.com"),
            )
        })
        .collect();
    new_lines.push((
        now_ns - 1_800_000_000_000,
        "delivered password-reset to alice@example.com".into(),
    ));
    new_lines.push((
        now_ns - 1_700_000_000_000,
        "bounced newsletter for malice@example.com".into(),
    ));
    for lines in [&old_lines, &new_lines] {
        let lines: Vec<(i64, &str)> = lines.iter().map(|(t, l)| (*t, l.as_str())).collect();
        loki.push_flushed("shop", &labels, &lines);
    }
    let es = Search::start().await;
    let event = |days_ago: i64, email: &str| {
        let at = chrono::Utc::now() - chrono::Duration::days(days_ago);
        serde_json::json!({"@timestamp": at.to_rfc3339(), "user": {"email": email}, "event": "email.delivered"})
    };
    es.seed(
        "mailer-events-2026.10.01",
        &[
            ("a", event(50, "user1@example.com")),
            ("b", event(50, "user2@example.com")),
        ],
    )
    .await;
    es.seed(
        "mailer-events-2026.11.22",
        &[
            ("c", event(1, "alice@example.com")),
            ("d", event(1, "user1@example.com")),
            ("e", event(40, "user2@example.com")),
        ],
    )
    .await;

    println!("==> applying config/samples, pointed at these stores");
    kubectl(cp, &["apply", "-n", NAMESPACE, "-k", "config/samples"]);
    let url_patch = format!(r#"{{"spec":{{"redis":{{"url":"{}"}}}}}}"#, redis.url());
    kubectl(
        cp,
        &[
            "patch",
            "-n",
            NAMESPACE,
            "datastore",
            "cache",
            "--type",
            "merge",
            "-p",
            &url_patch,
        ],
    );

    // The local stores speak plain HTTP: credentials may go there only with insecure.
    let s3_patch = format!(
        r#"{{"spec":{{"s3":{{"endpoint":"{}"}},"insecure":true}}}}"#,
        s3.endpoint()
    );
    kubectl(
        cp,
        &[
            "patch",
            "-n",
            NAMESPACE,
            "datastore",
            "archive",
            "--type",
            "merge",
            "-p",
            &s3_patch,
        ],
    );
    for (store, kind, url, insecure) in [
        ("logs", "loki", loki.url(), false),
        ("search", "elasticsearch", es.url(), true),
    ] {
        let patch = format!(r#"{{"spec":{{"{kind}":{{"url":"{url}"}},"insecure":{insecure}}}}}"#);
        kubectl(
            cp,
            &[
                "patch",
                "-n",
                NAMESPACE,
                "datastore",
                store,
                "--type",
                "merge",
                "-p",
                &patch,
            ],
        );
    }
    // moto accepts any keys; a real store needs the real ones in this Secret.
    let creds_patch = format!(
        r#"{{"stringData":{{"accessKeyId":"{}","secretAccessKey":"{}"}}}}"#,
        support::s3::ACCESS_KEY_ID,
        support::s3::SECRET_ACCESS_KEY
    );
    kubectl(
        cp,
        &[
            "patch",
            "-n",
            NAMESPACE,
            "secret",
            "archive-s3-credentials",
            "-p",
            &creds_patch,
        ],
    );

    println!("==> starting the operator: {binary} run");
    let log_path = std::env::temp_dir().join(format!("tombstone-demo-{}.log", std::process::id()));
    let log = std::fs::File::create(&log_path).expect("operator log file");
    let mut operator = Command::new(&binary)
        .args([
            "run",
            "--lease-namespace",
            NAMESPACE,
            "--http-addr",
            "127.0.0.1:0",
        ])
        .env("KUBECONFIG", cp.kubeconfig_path())
        .env("POD_NAME", "tombstone-demo")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("starting the operator");

    let policies: Api<RetentionPolicy> = Api::namespaced(client.clone(), NAMESPACE);
    for policy in ["sessions", "mailer-data"] {
        support::wait_for(
            &format!("the first sweep of {policy}"),
            Duration::from_secs(120),
            || {
                let policies = policies.clone();
                async move {
                    let p = policies.get(policy).await.ok()?;
                    p.status?.last_sweep.map(|_| ())
                }
            },
        )
        .await;
    }

    let requests: Api<ErasureRequest> = Api::namespaced(client.clone(), NAMESPACE);
    for (name, phase) in [
        ("dsr-2026-0042", ErasurePhase::Completed),
        ("dsr-2026-0043", ErasurePhase::Blocked),
    ] {
        support::wait_for(
            &format!("{name} to reach {phase:?}"),
            Duration::from_secs(120),
            || {
                let requests = requests.clone();
                async move {
                    let r = requests.get(name).await.ok()?;
                    (r.status?.phase == phase).then_some(())
                }
            },
        )
        .await;
    }

    println!("\n$ kubectl get tombstone -n {NAMESPACE}");
    print!("{}", kubectl(cp, &["get", "tombstone", "-n", NAMESPACE]));
    println!(
        "\n$ kubectl get retentionpolicy sessions -n {NAMESPACE} -o jsonpath='{{.status.targets}}'"
    );
    println!(
        "{}",
        kubectl(
            cp,
            &[
                "get",
                "retentionpolicy",
                "sessions",
                "-n",
                NAMESPACE,
                "-o",
                "jsonpath={.status.targets}"
            ]
        )
    );
    println!(
        "\n    TTL of session:43:0 after: {}s (bounded by the 30d retention); config:feature-flags untouched: {}",
        ttl("session:43:0").await,
        ttl("config:feature-flags").await
    );
    let left: Vec<String> = redis::cmd("KEYS")
        .arg("session:42:*")
        .query_async(&mut conn.clone())
        .await
        .unwrap();
    println!("    keys of user 42 (erased by dsr-2026-0042) left: {}; user 7 (held, dsr-2026-0043 Blocked) still has theirs", left.len());
    let user_objects = s3.versions("shop-archive", "mailer/users/42/").await.len();
    let mut alice_records = 0;
    for key in s3.keys("shop-archive", "mailer/logs/").await {
        let body = s3.get("shop-archive", &key).await;
        let mut text = String::new();
        std::io::Read::read_to_string(&mut flate2::read::MultiGzDecoder::new(&body[..]), &mut text)
            .unwrap();
        alice_records += text.matches("alice@example.com").count();
    }
    println!(
        "    S3: objects and versions under mailer/users/42/ left: {user_objects}; user 4242's kept: {}; alice's records left in the gzip mail logs: {alice_records} (other users' records kept)",
        s3.keys("shop-archive", "mailer/users/4242/").await.len()
    );
    let lines = loki.lines("shop");
    let count = |f: &dyn Fn(&str) -> bool| lines.iter().filter(|(_, l)| f(l)).count();
    println!(
        "    Loki: lines older than 30 days left: {} of 50; alice's lines left: {}; malice@example.com's line (a neighbour) kept: {}",
        count(&|l| l.contains("order-confirmation")),
        count(&|l| l.contains(" alice@example.com")),
        count(&|l| l.contains("malice@example.com")) == 1
    );
    println!(
        "    {}: indices left: {:?}; documents left in mailer-events-2026.11.22: {:?} (alice's erased, the 40-day-old one swept)",
        es.name(),
        es.indices().await,
        es.ids("mailer-events-2026.11.22").await
    );
    println!(
        "    documents left in the expired mailer-events-2026.10.01: {:?}",
        es.ids("mailer-events-2026.10.01").await
    );
    for name in ["dsr-2026-0042", "dsr-2026-0043"] {
        println!("\n$ kubectl describe erasurerequest {name} -n {NAMESPACE}");
        print!(
            "{}",
            kubectl(cp, &["describe", "erasurerequest", name, "-n", NAMESPACE])
        );
    }
    println!(
        "    operator log (JSON lines; receipts under target \"audit\"): {}",
        log_path.display()
    );

    if keep {
        println!("\nThe demo keeps running. In another shell:\n    export KUBECONFIG={}\n    kubectl get tombstone -n {NAMESPACE}\nPress Ctrl-C to stop everything.", cp.kubeconfig_path().display());
        let _ = tokio::signal::ctrl_c().await;
    }
    // SIGTERM: the operator shuts down gracefully and releases its Lease.
    unsafe { libc::kill(operator.id() as i32, libc::SIGTERM) };
    let status = operator.wait().expect("operator exit");
    println!("==> operator stopped ({status}); stopping the stores and the control plane");
}
