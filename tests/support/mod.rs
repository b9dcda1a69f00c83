//! The integration-test harness: a real kube-apiserver and etcd (the envtest convention:
//! binaries from `KUBEBUILDER_ASSETS`), Redis servers and clusters on loopback, and small
//! helpers. Shared by test binaries with
//!
//! ```ignore
//! #[path = "../support/mod.rs"]
//! mod support;
//! ```
//!
//! Nothing is left behind when the test process ends, however it ends: every server is
//! started with `PR_SET_PDEATHSIG` (SIGKILL when the test process dies), and a small reaper
//! process, watching a pipe the test process holds, kills what is left and removes the
//! temporary directory once that pipe closes.
#![allow(dead_code)]

pub mod elasticsearch;
pub mod faults;
pub mod loki;
pub mod opensearch;
pub mod operator_process;
pub mod request_log;
pub mod s3;
pub mod scale;

use std::env;
use std::fs;
use std::future::Future;
use std::io::{self, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, LazyLock};
use std::thread;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::wait::{await_condition, conditions};
use kube::ResourceExt;

/// How long the API server may take to answer `/readyz` with 200.
const APISERVER_START_TIMEOUT: Duration = Duration::from_secs(90);
const REDIS_START_TIMEOUT: Duration = Duration::from_secs(20);
const ASSETS_HINT: &str =
    "run the tests as `KUBEBUILDER_ASSETS=$(hack/envtest-assets.sh) cargo test --test e2e`";

// ---------------------------------------------------------------------------------------
// Process plumbing
// ---------------------------------------------------------------------------------------

type SpawnJob = (Command, mpsc::Sender<io::Result<Child>>);

/// The thread that forks every server. `PR_SET_PDEATHSIG` fires when the *thread* that
/// forked the child exits, not the process, so all forks happen on this one thread, which
/// lives as long as the test process.
static SPAWNER: LazyLock<mpsc::Sender<SpawnJob>> = LazyLock::new(|| {
    let (jobs, rx) = mpsc::channel::<SpawnJob>();
    thread::Builder::new()
        .name("test-server-spawner".into())
        .spawn(move || {
            let parent = std::process::id() as libc::pid_t;
            for (mut cmd, reply) in rx {
                // SAFETY: prctl, getppid and _exit are async-signal-safe.
                unsafe {
                    cmd.pre_exec(move || {
                        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                            return Err(io::Error::last_os_error());
                        }
                        // The parent died before prctl took effect.
                        if libc::getppid() != parent {
                            libc::_exit(1);
                        }
                        Ok(())
                    });
                }
                let _ = reply.send(cmd.spawn());
            }
        })
        .expect("cannot start the spawner thread");
    jobs
});

/// Spawns a server that is SIGKILLed when the test process exits.
fn spawn_server(cmd: Command) -> io::Result<Child> {
    let (reply, result) = mpsc::channel();
    SPAWNER.send((cmd, reply)).expect("spawner thread is gone");
    result.recv().expect("spawner thread is gone")
}

/// Kills the processes it was told about and removes a directory once the test process
/// is gone (its stdin closes), unless disarmed first.
struct Reaper {
    child: Child,
    stdin: Option<ChildStdin>,
}

const REAPER_SCRIPT: &str = r#"
trap '' HUP INT
dir=$1
pids=
while read -r line; do
  [ "$line" = done ] && exit 0
  pids="$pids $line"
done
if [ -n "$pids" ]; then
  kill $pids 2>/dev/null
  sleep 1
  kill -9 $pids 2>/dev/null
fi
rm -rf "$dir"
"#;

impl Reaper {
    fn spawn(dir: &Path) -> Reaper {
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(REAPER_SCRIPT)
            .arg("test-reaper")
            .arg(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Out of the terminal's process group: Ctrl-C must not kill the reaper first.
            .process_group(0)
            .spawn()
            .expect("cannot start the reaper (sh)");
        let stdin = child.stdin.take();
        Reaper { child, stdin }
    }

    fn watch(&mut self, pid: u32) {
        if let Some(stdin) = &mut self.stdin {
            writeln!(stdin, "{pid}").expect("reaper is gone");
        }
    }

    /// The owner cleaned up itself: the reaper exits without touching anything.
    fn disarm(&mut self) {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = writeln!(stdin, "done");
        }
        let _ = self.child.wait();
    }
}

/// Loopback ports free at the time of the call, all distinct.
fn free_ports<const N: usize>() -> [u16; N] {
    let listeners: Vec<TcpListener> = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("cannot bind a loopback port"))
        .collect();
    std::array::from_fn(|i| listeners[i].local_addr().unwrap().port())
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    let mut f = fs::File::open("/dev/urandom").expect("/dev/urandom");
    io::Read::read_exact(&mut f, &mut buf).expect("/dev/urandom");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

fn log_file(path: &Path) -> Stdio {
    Stdio::from(fs::File::create(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
}

/// The last `lines` lines of a log file, for panic messages.
fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_else(|e| format!("({e})"));
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn is_executable(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// `name` from `KUBEBUILDER_ASSETS`; when that is unset, from `/usr/local/kubebuilder/bin`
/// or PATH.
fn find_binary(name: &str) -> PathBuf {
    if let Some(dir) = env::var_os("KUBEBUILDER_ASSETS").filter(|d| !d.is_empty()) {
        let path = Path::new(&dir).join(name);
        assert!(
            is_executable(&path),
            "KUBEBUILDER_ASSETS={} has no executable {name}; {ASSETS_HINT}",
            Path::new(&dir).display()
        );
        return path;
    }
    let default = Path::new("/usr/local/kubebuilder/bin").join(name);
    if is_executable(&default) {
        return default;
    }
    env::var_os("PATH")
        .and_then(|paths| {
            env::split_paths(&paths)
                .map(|dir| dir.join(name))
                .find(|p| is_executable(p))
        })
        .unwrap_or_else(|| {
            panic!(
                "{name} not found (KUBEBUILDER_ASSETS is unset, and it is neither in \
                 /usr/local/kubebuilder/bin nor on PATH); {ASSETS_HINT}"
            )
        })
}

// ---------------------------------------------------------------------------------------
// Kubernetes control plane
// ---------------------------------------------------------------------------------------

/// etcd and kube-apiserver on loopback, started once per test process (see [`Self::get`]).
/// Only the API server runs: no controller-manager, scheduler or kubelet, so Pods never
/// run, garbage collection never happens and deleted namespaces stay `Terminating`.
pub struct ControlPlane {
    url: String,
    token: String,
    dir: PathBuf,
    kubeconfig: PathBuf,
    etcd: Child,
    apiserver: Child,
    /// Never disarmed: cleans up when the test process exits.
    _reaper: Reaper,
}

static CONTROL_PLANE: LazyLock<ControlPlane> = LazyLock::new(ControlPlane::start);

impl ControlPlane {
    /// The control plane of this test process, started on first use (a few seconds).
    pub fn get() -> &'static ControlPlane {
        tombstone::install_crypto_provider();
        &CONTROL_PLANE
    }

    /// A control plane of the caller's own, for a test that needs every namespace to itself
    /// (an operator watching the whole cluster); stopped and removed when dropped.
    pub fn start_private() -> ControlPlane {
        tombstone::install_crypto_provider();
        Self::start()
    }

    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A bearer token of a `system:masters` user.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// A new client, bound to the calling tokio runtime (every `#[tokio::test]` has its own,
    /// so never share a client between tests).
    pub fn client(&self) -> kube::Client {
        kube::Client::try_from(self.config()).expect("cannot build a kube client")
    }

    pub fn config(&self) -> kube::Config {
        let mut config = kube::Config::new(self.url.parse().expect("cluster URL"));
        config.accept_invalid_certs = true;
        config.auth_info.token = Some(self.token.clone().into());
        config
    }

    /// A kubeconfig file for this server (admin user), for tests that run `kubectl`.
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// `kubectl` with `--kubeconfig` set to this server, and a discovery cache of its own
    /// per call (so it always sees the CRDs installed so far and writes nothing to $HOME).
    /// Runs kubectl with `args`, feeding `input` on stdin; returns its output.
    pub fn kubectl_with_input(&self, args: &[&str], input: &str) -> std::process::Output {
        let mut child = self
            .kubectl()
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot run kubectl");
        // Written on a thread: a child that fills its stdout before reading all of stdin
        // would otherwise deadlock with us.
        let mut stdin = child.stdin.take().expect("piped stdin");
        let input = input.to_string();
        let writer = thread::spawn(move || stdin.write_all(input.as_bytes()));
        let output = child.wait_with_output().expect("kubectl runs");
        writer
            .join()
            .expect("stdin writer")
            .expect("kubectl reads its input");
        output
    }

    pub fn kubectl(&self) -> Command {
        static CALLS: AtomicU64 = AtomicU64::new(0);
        let cache = self.dir.join(format!(
            "kubectl-cache-{}",
            CALLS.fetch_add(1, Ordering::Relaxed)
        ));
        let mut cmd = Command::new("kubectl");
        cmd.arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(cache);
        cmd
    }

    /// Installs every CRD of `tombstone::crds::all()` by server-side apply (field manager
    /// `tombstone-tests`, forced) and waits until each is Established. Idempotent; the work
    /// is done once per process.
    pub async fn install_crds(&self) {
        static INSTALLED: tokio::sync::Mutex<bool> = tokio::sync::Mutex::const_new(false);
        let mut installed = INSTALLED.lock().await;
        if *installed {
            return;
        }
        self.apply_crds().await;
        *installed = true;
    }

    /// Applies every CRD and waits until each is Established (for a private control plane;
    /// the shared one uses [`Self::install_crds`]).
    pub async fn apply_crds(&self) {
        let crds: Api<CustomResourceDefinition> = Api::all(self.client());
        let params = PatchParams::apply("tombstone-tests").force();
        let crd_list = tombstone::crds::all();
        for (_, crd) in &crd_list {
            crds.patch(&crd.name_any(), &params, &Patch::Apply(crd))
                .await
                .unwrap_or_else(|e| panic!("cannot apply CRD {}: {e}", crd.name_any()));
        }
        for (_, crd) in &crd_list {
            let name = crd.name_any();
            tokio::time::timeout(
                Duration::from_secs(30),
                await_condition(crds.clone(), &name, conditions::is_crd_established()),
            )
            .await
            .unwrap_or_else(|_| panic!("CRD {name} not Established within 30s"))
            .unwrap_or_else(|e| panic!("watching CRD {name}: {e}"));
        }
    }

    fn start() -> ControlPlane {
        let etcd_bin = find_binary("etcd");
        let apiserver_bin = find_binary("kube-apiserver");
        // In memory where the machine has a tmpfs: etcd syncs every write to disk, and on a
        // disk that is most of the API server's write latency (which tests only wait on).
        let builder = {
            let mut b = tempfile::Builder::new();
            b.prefix("tombstone-envtest-");
            b
        };
        let dir = builder
            .tempdir_in("/dev/shm")
            .or_else(|_| builder.tempdir())
            .expect("cannot create a temporary directory")
            .keep();
        let mut reaper = Reaper::spawn(&dir);

        let token = random_hex(16);
        fs::write(
            dir.join("tokens.csv"),
            format!("{token},admin,admin,\"system:masters\"\n"),
        )
        .expect("cannot write the token file");
        let sa_key = dir.join("service-account.key");
        let openssl = Command::new("openssl")
            .arg("genrsa")
            .arg("-out")
            .arg(&sa_key)
            .arg("2048")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .expect("cannot run openssl (needed for the service-account key)");
        assert!(
            openssl.status.success(),
            "openssl genrsa failed: {}",
            String::from_utf8_lossy(&openssl.stderr)
        );

        let [etcd_port, peer_port, api_port] = free_ports();
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let mut etcd = Command::new(&etcd_bin);
        etcd.current_dir(&dir)
            .args(["--name", "envtest"])
            .arg("--data-dir")
            .arg(dir.join("etcd"))
            .args(["--listen-client-urls", &etcd_url])
            .args(["--advertise-client-urls", &etcd_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("envtest={peer_url}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file(&dir.join("etcd.log")));
        let etcd = spawn_server(etcd)
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", etcd_bin.display()));
        reaper.watch(etcd.id());

        let apiserver_log = dir.join("kube-apiserver.log");
        let mut apiserver = Command::new(&apiserver_bin);
        apiserver
            .current_dir(&dir)
            .arg(format!("--etcd-servers={etcd_url}"))
            .arg(format!("--secure-port={api_port}"))
            .arg("--bind-address=127.0.0.1")
            .arg("--advertise-address=127.0.0.1")
            .arg(format!("--cert-dir={}", dir.join("certs").display()))
            .arg(format!(
                "--token-auth-file={}",
                dir.join("tokens.csv").display()
            ))
            .arg("--authorization-mode=RBAC")
            .arg(format!("--service-account-key-file={}", sa_key.display()))
            .arg(format!(
                "--service-account-signing-key-file={}",
                sa_key.display()
            ))
            .arg("--service-account-issuer=https://kubernetes.default.svc")
            .arg("--service-cluster-ip-range=10.0.0.0/24")
            // As envtest: no controller-manager creates the `default` ServiceAccounts the
            // ServiceAccount admission plugin would require of every Pod.
            .arg("--disable-admission-plugins=ServiceAccount")
            .arg("--allow-privileged=true")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file(&apiserver_log));
        let apiserver = spawn_server(apiserver)
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", apiserver_bin.display()));
        reaper.watch(apiserver.id());

        let kubeconfig = dir.join("kubeconfig");
        let url = format!("https://127.0.0.1:{api_port}");
        fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\n\
                 clusters:\n- name: envtest\n  cluster:\n    server: {url}\n    insecure-skip-tls-verify: true\n\
                 users:\n- name: admin\n  user:\n    token: {token}\n\
                 contexts:\n- name: envtest\n  context:\n    cluster: envtest\n    user: admin\n    namespace: default\n\
                 current-context: envtest\n"
            ),
        )
        .expect("cannot write the kubeconfig");

        let mut plane = ControlPlane {
            url,
            token,
            dir,
            kubeconfig,
            etcd,
            apiserver,
            _reaper: reaper,
        };
        plane.wait_ready();
        plane
    }

    /// Polls `/readyz` until it answers 200. Runs on a thread of its own: this is called
    /// from inside a test's tokio runtime, where another runtime cannot block.
    fn wait_ready(&mut self) {
        let config = self.config();
        let mut servers = [
            ("etcd", &mut self.etcd),
            ("kube-apiserver", &mut self.apiserver),
        ];
        let outcome = thread::scope(|s| {
            s.spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("tokio runtime");
                rt.block_on(async move {
                    let client = kube::Client::try_from(config).expect("kube client");
                    let deadline = Instant::now() + APISERVER_START_TIMEOUT;
                    loop {
                        let request = http::Request::get("/readyz").body(Vec::new()).unwrap();
                        let last_error = match client.request_text(request).await {
                            Ok(_) => return Ok(()),
                            Err(e) => e.to_string(),
                        };
                        for (name, server) in servers.iter_mut() {
                            if let Ok(Some(status)) = server.try_wait() {
                                return Err(format!("{name} exited ({status})"));
                            }
                        }
                        if Instant::now() > deadline {
                            return Err(format!(
                                "not ready after {APISERVER_START_TIMEOUT:?}: {last_error}"
                            ));
                        }
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                })
            })
            .join()
            .expect("readiness thread panicked")
        });
        if let Err(why) = outcome {
            panic!(
                "kube-apiserver at {} did not become ready: {why}\n\
                 --- last lines of kube-apiserver.log ---\n{}\n\
                 --- last lines of etcd.log ---\n{}",
                self.url,
                tail(&self.dir.join("kube-apiserver.log"), 40),
                tail(&self.dir.join("etcd.log"), 10),
            );
        }
    }
}

/// Creates a namespace `PREFIX-XXXXXX` for one test and returns its name. Namespaces are
/// never cleaned up: without a controller-manager they never finish deleting.
pub async fn test_namespace(client: &kube::Client, prefix: &str) -> String {
    let mut stem: String = prefix
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    stem.truncate(50);
    let stem = stem.trim_matches('-');
    let stem = if stem.is_empty() { "test" } else { stem };
    let name = format!("{stem}-{}", random_hex(3));
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            ..Default::default()
        },
        ..Default::default()
    };
    namespaces
        .create(&PostParams::default(), &ns)
        .await
        .unwrap_or_else(|e| panic!("cannot create namespace {name}: {e}"));
    name
}

/// Polls `poll` every 100 ms until it returns `Some`; panics naming `what` after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut poll: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = poll().await {
            return value;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------------------
// Redis
// ---------------------------------------------------------------------------------------

/// Runs `redis-cli` against a loopback port; `None` when it fails.
fn redis_cli(port: u16, password: Option<&str>, args: &[&str]) -> Option<String> {
    let mut cmd = Command::new("redis-cli");
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null());
    if let Some(pw) = password {
        cmd.env("REDISCLI_AUTH", pw);
    }
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Debian's `redis-server` on a free loopback port, with no persistence. Stopped, and its
/// directory removed, on drop.
pub struct RedisServer {
    port: u16,
    password: Option<String>,
    process: Child,
    reaper: Reaper,
    dir: tempfile::TempDir,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        Self::launch(None, &[])
    }

    /// A backend for this server as one standalone node, with the default limits.
    pub fn backend(&self) -> tombstone::backends::redis::RedisBackend {
        tombstone::backends::redis::RedisBackend::new(
            tombstone::backends::redis::RedisConfig {
                url: self.url(),
                password: None,
                cluster: false,
            },
            tombstone::backends::Limits::default(),
        )
    }

    /// With `requirepass`: clients must AUTH (user `default`).
    pub fn start_with_password(password: &str) -> RedisServer {
        Self::launch(Some(password), &[])
    }

    /// With extra `redis-server` arguments (e.g. `--rename-command`).
    pub fn start_with_args(extra: &[&str]) -> RedisServer {
        Self::launch(None, extra)
    }

    fn launch(password: Option<&str>, extra: &[&str]) -> RedisServer {
        let dir = tempfile::Builder::new()
            .prefix("tombstone-redis-")
            .tempdir()
            .expect("cannot create a temporary directory");
        let mut reaper = Reaper::spawn(dir.path());
        let [port] = free_ports();
        let mut cmd = Command::new("redis-server");
        cmd.args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log_file(&dir.path().join("redis.log")))
            .stderr(Stdio::null());
        if let Some(pw) = password {
            cmd.args(["--requirepass", pw]);
        }
        let process = spawn_server(cmd).expect("cannot start redis-server (is it installed?)");
        reaper.watch(process.id());
        let mut server = RedisServer {
            port,
            password: password.map(str::to_owned),
            process,
            reaper,
            dir,
        };
        let deadline = Instant::now() + REDIS_START_TIMEOUT;
        while server.cli(&["PING"]).is_none_or(|out| out.trim() != "PONG") {
            let exited = server.process.try_wait().ok().flatten();
            if exited.is_some() || Instant::now() > deadline {
                panic!(
                    "redis-server on port {port} did not answer PING ({}):\n{}",
                    exited.map_or("timed out".to_string(), |s| s.to_string()),
                    tail(&server.dir.path().join("redis.log"), 20)
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
        server
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT`, with the password when there is one.
    pub fn url(&self) -> String {
        let mut url = url::Url::parse(&format!("redis://127.0.0.1:{}", self.port)).unwrap();
        if let Some(pw) = &self.password {
            url.set_password(Some(pw)).unwrap();
        }
        url.to_string()
    }

    /// Runs one command with `redis-cli`; `None` when it fails.
    pub fn cli(&self, args: &[&str]) -> Option<String> {
        redis_cli(self.port, self.password.as_deref(), args)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
        self.reaper.disarm();
        // `dir` is removed when the TempDir drops, after this.
    }
}

/// A Redis Cluster of `primaries` primaries and no replicas, on loopback.
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Needs at least 3 primaries (`redis-cli --cluster create` refuses fewer) and Redis 7
    /// (`--cluster-port`: the default bus port, port + 10000, may not exist).
    pub fn start(primaries: usize) -> RedisCluster {
        assert!(primaries >= 3, "a Redis Cluster needs at least 3 primaries");
        let nodes: Vec<RedisServer> = (0..primaries)
            .map(|_| {
                let [bus_port] = free_ports();
                let bus_port = bus_port.to_string();
                RedisServer::launch(
                    None,
                    &[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-port",
                        &bus_port,
                    ],
                )
            })
            .collect();
        let addresses: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("cannot run redis-cli");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let deadline = Instant::now() + REDIS_START_TIMEOUT;
        for node in &nodes {
            while !node
                .cli(&["CLUSTER", "INFO"])
                .is_some_and(|info| info.contains("cluster_state:ok"))
            {
                assert!(
                    Instant::now() < deadline,
                    "Redis Cluster node {} not cluster_state:ok after {REDIS_START_TIMEOUT:?}:\n{}",
                    node.port,
                    node.cli(&["CLUSTER", "INFO"]).unwrap_or_default()
                );
                thread::sleep(Duration::from_millis(100));
            }
        }
        RedisCluster { nodes }
    }

    /// One node's URL; a cluster client discovers the others from it.
    pub fn seed_url(&self) -> String {
        self.nodes[0].url()
    }

    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    /// Starts one more node and makes it a replica of node `primary`, in sync; returns its
    /// index.
    pub fn add_replica(&mut self, primary: usize) -> usize {
        let replica = self.add_node();
        let primary_id = self.node_id(primary);
        let out = self.nodes[replica]
            .cli(&["CLUSTER", "REPLICATE", &primary_id])
            .unwrap_or_default();
        assert_eq!(out.trim(), "OK", "CLUSTER REPLICATE: {out}");
        let deadline = Instant::now() + REDIS_START_TIMEOUT;
        while !self.nodes[replica]
            .cli(&["INFO", "replication"])
            .is_some_and(|i| i.contains("master_link_status:up"))
        {
            assert!(Instant::now() < deadline, "the replica did not sync");
            thread::sleep(Duration::from_millis(100));
        }
        replica
    }

    /// `CLUSTER FAILOVER` on a replica: it becomes the primary of its slots, its primary
    /// becomes its replica. Waits until every node sees it as a primary with slots.
    pub fn failover(&self, replica: usize) {
        let id = self.node_id(replica);
        let out = self.nodes[replica]
            .cli(&["CLUSTER", "FAILOVER"])
            .unwrap_or_default();
        assert_eq!(out.trim(), "OK", "CLUSTER FAILOVER: {out}");
        let deadline = Instant::now() + REDIS_START_TIMEOUT;
        while !self.nodes.iter().all(|n| {
            n.cli(&["CLUSTER", "NODES"]).is_some_and(|l| {
                l.lines().any(|line| {
                    let f: Vec<&str> = line.split_whitespace().collect();
                    f.first() == Some(&id.as_str())
                        && f.get(2).is_some_and(|flags| flags.contains("master"))
                        && f.len() > 8
                })
            }) && n
                .cli(&["CLUSTER", "INFO"])
                .is_some_and(|i| i.contains("cluster_state:ok"))
        }) {
            assert!(Instant::now() < deadline, "the failover did not complete");
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Starts one more primary, serving no slot yet, joined to the cluster; returns its index.
    pub fn add_node(&mut self) -> usize {
        let [bus_port] = free_ports();
        let bus_port = bus_port.to_string();
        let node = RedisServer::launch(
            None,
            &[
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-port",
                &bus_port,
            ],
        );
        let port = node.port.to_string();
        self.nodes[0]
            .cli(&["CLUSTER", "MEET", "127.0.0.1", &port, &bus_port])
            .expect("CLUSTER MEET");
        self.nodes.push(node);
        let id = self.node_id(self.nodes.len() - 1);
        let deadline = Instant::now() + REDIS_START_TIMEOUT;
        // Every node knows the new one, it knows them all, and it sees the cluster whole.
        while !self.nodes.iter().all(|n| {
            n.cli(&["CLUSTER", "NODES"])
                .is_some_and(|l| l.contains(&id) && l.lines().count() == self.nodes.len())
                && n.cli(&["CLUSTER", "INFO"])
                    .is_some_and(|info| info.contains("cluster_state:ok"))
        }) {
            assert!(
                Instant::now() < deadline,
                "node {port} did not join the cluster"
            );
            thread::sleep(Duration::from_millis(100));
        }
        self.nodes.len() - 1
    }

    pub fn node_id(&self, index: usize) -> String {
        self.nodes[index]
            .cli(&["CLUSTER", "MYID"])
            .expect("CLUSTER MYID")
            .trim()
            .to_string()
    }

    /// The hash slot of a key.
    pub fn slot_of(&self, key: &str) -> u16 {
        self.nodes[0]
            .cli(&["CLUSTER", "KEYSLOT", key])
            .and_then(|s| s.trim().parse().ok())
            .expect("CLUSTER KEYSLOT")
    }

    /// The index of the node serving `slot`, as node 0 sees it.
    pub fn owner_of(&self, slot: u16) -> usize {
        let listing = self.nodes[0]
            .cli(&["CLUSTER", "NODES"])
            .expect("CLUSTER NODES");
        let serves = |range: &str| {
            let (a, b) = range.split_once('-').unwrap_or((range, range));
            matches!((a.parse::<u16>(), b.parse::<u16>()), (Ok(a), Ok(b)) if a <= slot && slot <= b)
        };
        let port = listing
            .lines()
            .find(|line| line.split_whitespace().skip(8).any(serves))
            .and_then(|line| line.split_whitespace().nth(1))
            .and_then(|addr| addr.split('@').next())
            .and_then(|addr| addr.rsplit_once(':'))
            .and_then(|(_, port)| port.parse::<u16>().ok())
            .expect("a node serves the slot");
        self.nodes
            .iter()
            .position(|n| n.port == port)
            .expect("the owner is one of ours")
    }

    /// Sets a key on the node that serves it.
    pub fn set(&self, key: &str, value: &str) {
        let owner = self.owner_of(self.slot_of(key));
        let out = self.nodes[owner].cli(&["SET", key, value]).expect("SET");
        assert_eq!(out.trim(), "OK", "SET {key}: {out}");
    }

    /// Moves `slot` and its keys from node `from` to node `to`, as `redis-cli --cluster
    /// reshard` does (IMPORTING / MIGRATING, MIGRATE, SETSLOT NODE everywhere), and waits
    /// until every node agrees.
    pub fn move_slot(&self, slot: u16, from: usize, to: usize) {
        let slot_s = slot.to_string();
        let (from_id, to_id) = (self.node_id(from), self.node_id(to));
        let ok = |n: usize, args: &[&str]| {
            let out = self.nodes[n].cli(args).unwrap_or_default();
            assert!(out.trim() == "OK", "{args:?} on node {n}: {out}");
        };
        ok(to, &["CLUSTER", "SETSLOT", &slot_s, "IMPORTING", &from_id]);
        ok(from, &["CLUSTER", "SETSLOT", &slot_s, "MIGRATING", &to_id]);
        loop {
            let keys = self.nodes[from]
                .cli(&["CLUSTER", "GETKEYSINSLOT", &slot_s, "100"])
                .unwrap_or_default();
            let keys: Vec<&str> = keys.lines().filter(|k| !k.is_empty()).collect();
            if keys.is_empty() {
                break;
            }
            let port = self.nodes[to].port.to_string();
            let mut args = vec!["MIGRATE", "127.0.0.1", &port, "", "0", "5000", "KEYS"];
            args.extend(keys);
            ok(from, &args);
        }
        for n in [to, from] {
            ok(n, &["CLUSTER", "SETSLOT", &slot_s, "NODE", &to_id]);
        }
        for n in 0..self.nodes.len() {
            if n != to && n != from {
                let _ = self.nodes[n].cli(&["CLUSTER", "SETSLOT", &slot_s, "NODE", &to_id]);
            }
        }
        let deadline = Instant::now() + REDIS_START_TIMEOUT;
        while !self.nodes.iter().all(|n| {
            n.cli(&["CLUSTER", "NODES"]).is_some_and(|l| {
                l.lines().any(|line| {
                    line.starts_with(&to_id)
                        && line
                            .split_whitespace()
                            .skip(8)
                            .any(|r| r == slot_s || r.starts_with(&format!("{slot_s}-")))
                }) && !l.contains('[')
            })
        }) {
            assert!(
                Instant::now() < deadline,
                "slot {slot} did not settle on node {to}"
            );
            thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Standard base64 with padding, for HTTP Basic credentials in the store doubles (no extra
/// crate).
pub fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
