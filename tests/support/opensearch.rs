//! Real search servers on loopback for tests: an OpenSearch node, from the launcher of
//! `tests/opensearch-node`, and an Elasticsearch 7.17 node, from `tests/elasticsearch-node`
//! (Maven modules; `hack/setup.sh` builds them and exports their classpaths as
//! `OPENSEARCH_LAUNCHER_CLASSPATH` and `ELASTICSEARCH_LAUNCHER_CLASSPATH`). Each is started
//! once per test binary, on first use, and shared by its tests, each of which works on
//! indices of its own ([`SearchNode::index_prefix`]).
//!
//! Nothing is left behind: the JVM is started with `PR_SET_PDEATHSIG`, it stops by itself when
//! its stdin (a pipe this process holds) closes, and the reaper kills it and removes its
//! directory (the JVM's `java.io.tmpdir`, where the node keeps its home and data) once the test
//! process is gone.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, LazyLock};
use std::thread;
use std::time::{Duration, Instant};

use super::{log_file, random_hex, spawn_server, tail, Reaper};

/// A cold JVM starting a node takes 5 to 20 s on a busy machine.
const START_TIMEOUT: Duration = Duration::from_secs(180);
const SETUP_HINT: &str = "run `eval \"$(hack/setup.sh)\"` first: it builds the launchers in \
     tests/opensearch-node and tests/elasticsearch-node and exports their classpaths";

/// Which server a [`SearchNode`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Distribution {
    OpenSearch,
    Elasticsearch,
}

impl Distribution {
    /// As `GET /` names it in `version.distribution` (Elasticsearch 7 has none: "elasticsearch").
    pub fn name(self) -> &'static str {
        match self {
            Distribution::OpenSearch => "opensearch",
            Distribution::Elasticsearch => "elasticsearch",
        }
    }

    fn launcher(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Distribution::OpenSearch => (
                "OPENSEARCH_LAUNCHER_CLASSPATH",
                "dev.tombstone.testnode.Launcher",
                "OPENSEARCH_READY ",
            ),
            Distribution::Elasticsearch => (
                "ELASTICSEARCH_LAUNCHER_CLASSPATH",
                "dev.tombstone.testnode.EsLauncher",
                "ELASTICSEARCH_READY ",
            ),
        }
    }
}

pub struct SearchNode {
    distribution: Distribution,
    port: u16,
    version: String,
    dir: PathBuf,
    process: Child,
    /// Held open for the node's life: the launcher stops when it closes.
    stdin: Option<ChildStdin>,
    reaper: Reaper,
    started_in: Duration,
}

static OPENSEARCH: LazyLock<SearchNode> =
    LazyLock::new(|| SearchNode::start(Distribution::OpenSearch));
static ELASTICSEARCH: LazyLock<SearchNode> =
    LazyLock::new(|| SearchNode::start(Distribution::Elasticsearch));

impl SearchNode {
    /// The OpenSearch node of this test binary, started on first use.
    pub fn opensearch() -> &'static SearchNode {
        &OPENSEARCH
    }

    /// The Elasticsearch 7.17 node of this test binary, started on first use.
    pub fn elasticsearch() -> &'static SearchNode {
        &ELASTICSEARCH
    }

    /// The shared node of `distribution`.
    pub fn get(distribution: Distribution) -> &'static SearchNode {
        match distribution {
            Distribution::OpenSearch => Self::opensearch(),
            Distribution::Elasticsearch => Self::elasticsearch(),
        }
    }

    pub fn distribution(&self) -> Distribution {
        self.distribution
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The version the launcher reported (e.g. `2.19.1`).
    pub fn version(&self) -> &str {
        &self.version
    }

    /// How long the node took to answer, from the start of the JVM.
    pub fn started_in(&self) -> Duration {
        self.started_in
    }

    /// The launcher's process id.
    pub fn pid(&self) -> u32 {
        self.process.id()
    }

    /// A prefix no other test of any binary uses, for index names: `t-<test>-<random>`
    /// (lowercase, as index names must be).
    pub fn index_prefix(&self, test: &str) -> String {
        static N: AtomicU64 = AtomicU64::new(0);
        let test: String = test
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .collect();
        format!(
            "t-{test}-{}{}",
            random_hex(3),
            N.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// A node of its own (not the shared one), for tests of the harness itself.
    pub fn start(distribution: Distribution) -> SearchNode {
        let (variable, main_class, ready) = distribution.launcher();
        let classpath = std::env::var(variable)
            .ok()
            .filter(|c| !c.is_empty())
            .unwrap_or_else(|| panic!("{variable} is not set; {SETUP_HINT}"));
        let java = std::env::var("OPENSEARCH_JAVA")
            .ok()
            .filter(|j| !j.is_empty())
            .unwrap_or_else(|| "java".into());
        let dir = tempfile::Builder::new()
            .prefix(&format!("tombstone-{}-", distribution.name()))
            .tempdir()
            .expect("cannot create a temporary directory")
            .keep();
        let mut reaper = Reaper::spawn(&dir);
        let log = dir.join("node.log");
        let mut cmd = Command::new(&java);
        cmd.arg("-Xms256m")
            .arg("-Xmx512m")
            .arg(format!("-Djava.io.tmpdir={}", dir.display()))
            .arg("-cp")
            .arg(&classpath)
            .arg(main_class)
            .current_dir(&dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log_file(&log));
        let t0 = Instant::now();
        let mut process = spawn_server(cmd)
            .unwrap_or_else(|e| panic!("cannot start `{java}` (the {main_class} launcher): {e}"));
        reaper.watch(process.id());
        let stdin = process.stdin.take();
        let stdout = process.stdout.take().expect("piped stdout");

        // The launcher prints one line when the node answers; read it on a thread so that
        // a launcher that hangs is caught by the timeout.
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.starts_with(ready) {
                    let _ = tx.send(line);
                }
            }
        });
        let line = match rx.recv_timeout(START_TIMEOUT) {
            Ok(line) => line,
            Err(_) => {
                let _ = process.kill();
                panic!(
                    "the {main_class} launcher did not report ready within {START_TIMEOUT:?} \
                     (exited: {:?}); its log ends with:\n{}",
                    process.try_wait().ok().flatten(),
                    tail(&log, 40)
                );
            }
        };
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
                .unwrap_or_else(|| panic!("no {name}= in the launcher's line {line:?}"))
                .to_string()
        };
        let port = field("port")
            .parse()
            .unwrap_or_else(|e| panic!("port in {line:?}: {e}"));
        let version = field("version");
        let started_in = t0.elapsed();
        // Straight to stderr, past the test harness's output capture: the log of every run
        // (CI's included) shows which server the search tests ran against.
        let _ = writeln!(
            std::io::stderr(),
            "search node: {} {version} (a real node) on 127.0.0.1:{port}, \
             started in {started_in:.1?}",
            distribution.name()
        );
        SearchNode {
            distribution,
            port,
            version,
            dir,
            process,
            stdin,
            reaper,
            started_in,
        }
    }

    /// Closes the launcher's stdin, as the end of the test process does, and waits for the
    /// JVM to exit (it stops the node and removes its files first). Returns how long it took.
    pub fn stop_by_closing_stdin(mut self, timeout: Duration) -> Duration {
        let t0 = Instant::now();
        drop(self.stdin.take());
        while t0.elapsed() < timeout {
            if self.process.try_wait().ok().flatten().is_some() {
                self.reaper.disarm();
                let _ = std::fs::remove_dir_all(&self.dir);
                return t0.elapsed();
            }
            thread::sleep(Duration::from_millis(100));
        }
        let _ = self.process.kill();
        panic!("the launcher was still running {timeout:?} after its stdin closed");
    }
}
