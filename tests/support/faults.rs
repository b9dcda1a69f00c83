//! Fault injection for the chaos tests: a loopback TCP proxy that can cut every connection
//! through it and refuse new ones for a while (a store or the API server unreachable), and a
//! `redis-server` that can be stopped and started again on the same port with its data kept.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::{free_ports, log_file, redis_cli, spawn_server, tail, ControlPlane, Reaper};

/// A TCP proxy on a free loopback port in front of `upstream`, run on a thread (and tokio
/// runtime) of its own so that it keeps serving while a test blocks its own thread.
pub struct Proxy {
    port: u16,
    blocked: Arc<AtomicBool>,
    cut: tokio::sync::watch::Sender<u64>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Proxy {
    pub fn start(upstream: std::net::SocketAddr) -> Proxy {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let port = listener.local_addr().expect("local address").port();
        let blocked = Arc::new(AtomicBool::new(false));
        let (cut, cut_rx) = tokio::sync::watch::channel(0u64);
        let (stop, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
        let is_blocked = blocked.clone();
        let thread = thread::Builder::new()
            .name(format!("proxy-{port}"))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("proxy runtime");
                rt.block_on(async move {
                    let listener =
                        tokio::net::TcpListener::from_std(listener).expect("tokio listener");
                    loop {
                        let (inbound, _) = tokio::select! {
                            _ = &mut stop_rx => return,
                            accepted = listener.accept() => match accepted {
                                Ok(a) => a,
                                Err(_) => continue,
                            },
                        };
                        if is_blocked.load(Ordering::SeqCst) {
                            // Unreachable: the connection is closed at once.
                            drop(inbound);
                            continue;
                        }
                        let mut cut = cut_rx.clone();
                        cut.mark_unchanged();
                        tokio::spawn(async move {
                            let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream).await
                            else {
                                return;
                            };
                            let mut inbound = inbound;
                            tokio::select! {
                                _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                                _ = cut.changed() => {}
                            }
                        });
                    }
                });
            })
            .expect("start the proxy thread");
        Proxy {
            port,
            blocked,
            cut,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Cuts every open connection and refuses new ones until [`Proxy::unblock`].
    pub fn block(&self) {
        self.blocked.store(true, Ordering::SeqCst);
        self.cut.send_modify(|n| *n += 1);
    }

    pub fn unblock(&self) {
        self.blocked.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.block();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A kubeconfig for the test control plane reached through `proxy`, written into `dir`.
pub fn kubeconfig_through(proxy: &Proxy, dir: &Path) -> PathBuf {
    let cp = ControlPlane::get();
    let path = dir.join("kubeconfig");
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\n\
             clusters:\n- name: proxied\n  cluster:\n    server: https://127.0.0.1:{}\n    insecure-skip-tls-verify: true\n\
             users:\n- name: admin\n  user:\n    token: {}\n\
             contexts:\n- name: proxied\n  context:\n    cluster: proxied\n    user: admin\n\
             current-context: proxied\n",
            proxy.port(),
            cp.token()
        ),
    )
    .expect("write the proxied kubeconfig");
    path
}

/// The API server's loopback address.
pub fn apiserver_addr() -> std::net::SocketAddr {
    let url = url::Url::parse(ControlPlane::get().url()).expect("API server URL");
    let port = url.port().expect("API server port");
    std::net::SocketAddr::from(([127, 0, 0, 1], port))
}

/// `redis-server` on a free loopback port that can be stopped (`SHUTDOWN SAVE`) and started
/// again on the same port, loading what it saved.
pub struct RestartableRedis {
    port: u16,
    process: Option<Child>,
    reaper: Reaper,
    dir: tempfile::TempDir,
}

impl RestartableRedis {
    pub fn start() -> RestartableRedis {
        let dir = tempfile::Builder::new()
            .prefix("tombstone-redis-")
            .tempdir()
            .expect("cannot create a temporary directory");
        let reaper = Reaper::spawn(dir.path());
        let [port] = free_ports();
        let mut redis = RestartableRedis {
            port,
            process: None,
            reaper,
            dir,
        };
        redis.launch();
        redis
    }

    fn launch(&mut self) {
        let mut cmd = Command::new("redis-server");
        cmd.args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log_file(&self.dir.path().join("redis.log")))
            .stderr(Stdio::null());
        let mut process = spawn_server(cmd).expect("cannot start redis-server");
        self.reaper.watch(process.id());
        let deadline = Instant::now() + Duration::from_secs(20);
        while redis_cli(self.port, None, &["PING"]).is_none_or(|out| out.trim() != "PONG") {
            let exited = process.try_wait().ok().flatten();
            assert!(
                exited.is_none() && Instant::now() < deadline,
                "redis-server on port {} did not answer PING:\n{}",
                self.port,
                tail(&self.dir.path().join("redis.log"), 20)
            );
            thread::sleep(Duration::from_millis(50));
        }
        self.process = Some(process);
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Saves the data set and stops; the port refuses connections until [`Self::resume`].
    pub fn stop(&mut self) {
        let _ = redis_cli(self.port, None, &["SHUTDOWN", "SAVE"]);
        if let Some(mut process) = self.process.take() {
            let deadline = Instant::now() + Duration::from_secs(20);
            while process.try_wait().ok().flatten().is_none() {
                if Instant::now() > deadline {
                    let _ = process.kill();
                }
                thread::sleep(Duration::from_millis(20));
            }
            let _ = process.wait();
        }
    }

    /// Starts again on the same port with the saved data.
    pub fn resume(&mut self) {
        self.launch();
    }
}

impl Drop for RestartableRedis {
    fn drop(&mut self) {
        if let Some(mut process) = self.process.take() {
            let _ = process.kill();
            let _ = process.wait();
        }
        self.reaper.disarm();
    }
}
