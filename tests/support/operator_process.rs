//! The `tombstone run` binary as a child process, for tests that signal it (freeze it with
//! SIGSTOP, thaw it with SIGCONT, kill it). Its log is collected on a thread, so a full pipe
//! never stalls it; on drop it is thawed, killed and reaped.

use std::io::Read;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::ControlPlane;

pub struct OperatorProcess {
    pub identity: String,
    child: Child,
    log: Arc<Mutex<String>>,
    reader: Option<JoinHandle<()>>,
}

impl OperatorProcess {
    /// `binary run` (the `tombstone` binary, `env!("CARGO_BIN_EXE_tombstone")` in an
    /// integration test) watching `ns`, electing a leader on a Lease in `ns` as `identity`,
    /// with `extra` arguments appended.
    pub fn start(binary: &str, ns: &str, identity: &str, extra: &[&str]) -> Self {
        Self::start_with(binary, ns, identity, extra, None, &[])
    }

    /// As [`Self::start`], reaching the API server through `kubeconfig` (default: the test
    /// control plane's own) and with extra environment variables.
    pub fn start_with(
        binary: &str,
        ns: &str,
        identity: &str,
        extra: &[&str],
        kubeconfig: Option<&std::path::Path>,
        env: &[(&str, &str)],
    ) -> Self {
        let cp = ControlPlane::get();
        let kubeconfig = kubeconfig.unwrap_or(cp.kubeconfig_path());
        let mut child = Command::new(binary)
            .args([
                "run",
                "--namespace",
                ns,
                "--lease-namespace",
                ns,
                "--identity",
                identity,
                "--http-addr",
                "127.0.0.1:0",
                "--log-format",
                "text",
            ])
            .args(extra)
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "tombstone=info")
            .envs(env.iter().copied())
            .env_remove("POD_NAME")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start tombstone run");
        let mut stderr = child.stderr.take().expect("stderr is piped");
        let log = Arc::new(Mutex::new(String::new()));
        let sink = log.clone();
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            while let Ok(n) = stderr.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Self {
            identity: identity.into(),
            child,
            log,
            reader: Some(reader),
        }
    }

    fn signal(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits");
        // SAFETY: sending a signal to a child we own and have not reaped.
        assert_eq!(
            unsafe { libc::kill(pid, signal) },
            0,
            "kill({pid}, {signal})"
        );
    }

    /// Freezes the process (SIGSTOP): it neither runs nor knows it is not running.
    pub fn freeze(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// Thaws a frozen process (SIGCONT).
    pub fn thaw(&self) {
        self.signal(libc::SIGCONT);
    }

    /// Everything the process logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Waits up to `timeout` for the process to exit on its own; None if it is still running.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            // SIGKILL ends a stopped process too; thawing it first is merely tidy.
            let pid = libc::pid_t::try_from(self.child.id()).unwrap_or(0);
            if pid > 0 {
                // SAFETY: signalling a child we own and have not reaped.
                unsafe { libc::kill(pid, libc::SIGCONT) };
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}
