use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

mod kubectl;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "tombstone",
    version,
    about = "GDPR retention and erasure operator"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the operator.
    Run(Box<RunArgs>),
    /// Print every CRD as YAML, or write them into the repository's CRD directories.
    Crds {
        /// Write crds/, config/crd/bases/ and charts/tombstone/crds/ under this root.
        #[arg(long, value_name = "REPO_ROOT", num_args = 0..=1, default_missing_value = ".")]
        write: Option<PathBuf>,
    },
    /// Print the keyed digest of one identifier, as a LegalHold's `subjects[].digest` takes it.
    Digest(DigestArgs),
    /// Print the Art. 30 register of processing activities, from the cluster or YAML files.
    Ropa(RopaArgs),
    /// Check the receipts in the receipt sink.
    #[command(subcommand)]
    Receipts(ReceiptsCommand),
    /// The `kubectl tombstone` plugin's commands (erase, status, hold), as when this binary
    /// is installed as `kubectl-tombstone`.
    Kubectl(kubectl::PluginCli),
}

#[derive(Subcommand)]
enum ReceiptsCommand {
    /// Walk every chain of receipts in the sink (or one object's): recompute every hash, check
    /// each link, the sequence for gaps and, for objects still in the cluster, the head
    /// against their status. Prints a table; exits 1 on any break.
    Verify(VerifyArgs),
    /// Print the proof of one erasure request: its receipts, the chain checked, and a summary
    /// an auditor can keep. Exits 1 unless it verifies.
    Proof(ProofArgs),
}

/// Where the sink is: the operator's own settings (same flags and environment variables).
#[derive(clap::Args)]
struct SinkLocation {
    /// Namespace of the operator, where the sink's DataStore lives.
    #[arg(long, env = "POD_NAMESPACE", default_value = "tombstone-system")]
    namespace: String,
    /// The sink's DataStore, as given to the operator.
    #[arg(long, env = "RECEIPT_SINK_DATASTORE")]
    receipt_sink_datastore: String,
    #[command(flatten)]
    sink: SinkArgs,
    /// Let a sink DataStore without a credentials Secret use this process's cloud identity.
    #[arg(long, env = "ALLOW_AMBIENT_CREDENTIALS", default_value_t = false)]
    allow_ambient_credentials: bool,
}

impl SinkLocation {
    async fn resolve(&self, client: &kube::Client) -> anyhow::Result<tombstone::audit::sink::Sink> {
        let settings = self.sink.settings(
            self.receipt_sink_datastore.clone(),
            &self.namespace,
            self.allow_ambient_credentials,
        );
        tombstone::audit::sink::Sink::resolve(client, &settings)
            .await
            .context("resolving the receipt sink")
    }
}

#[derive(clap::Args)]
struct VerifyArgs {
    #[command(flatten)]
    location: SinkLocation,
    /// Only the receipts of this RetentionPolicy (NAMESPACE/NAME).
    #[arg(long, value_name = "NAMESPACE/NAME", conflicts_with = "request")]
    policy: Option<String>,
    /// Only the receipts of this ErasureRequest (NAMESPACE/NAME).
    #[arg(long, value_name = "NAMESPACE/NAME")]
    request: Option<String>,
}

#[derive(clap::Args)]
struct ProofArgs {
    #[command(flatten)]
    location: SinkLocation,
    /// The request's namespace.
    #[arg(long = "request-namespace", short = 'r')]
    request_namespace: String,
    /// The request.
    #[arg(value_name = "REQUEST")]
    request: String,
}

#[derive(clap::Args)]
struct RopaArgs {
    /// YAML files or directories of them (`config/samples`) to read RetentionPolicies and
    /// DataStores from, instead of the cluster. Other kinds are ignored.
    #[arg(value_name = "PATH")]
    paths: Vec<PathBuf>,
    /// Only this namespace (default: every namespace). With files: the namespace of
    /// objects that have none; objects of other namespaces are left out.
    #[arg(long, short = 'n')]
    namespace: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = RopaFormat::Markdown)]
    format: RopaFormat,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum RopaFormat {
    Markdown,
    Csv,
    Json,
}

#[derive(clap::Args)]
struct DigestArgs {
    /// Identifier type: the Secret key an ErasureRequest uses for it (`email`, `userId`, …).
    #[arg(value_name = "TYPE")]
    id_type: String,
    /// The identifier; `-` reads it from standard input (keeps it out of shell history).
    #[arg(value_name = "VALUE")]
    value: String,
    /// Namespace of the operator, where the key Secret `tombstone-digest-key` lives.
    #[arg(long, env = "POD_NAMESPACE", default_value = "tombstone-system")]
    namespace: String,
    /// Read the raw key bytes from this file instead of the cluster's Secret.
    #[arg(long, value_name = "PATH")]
    key_file: Option<PathBuf>,
}

/// Where the receipt sink keeps receipts, for the operator and for `receipts verify` alike.
#[derive(clap::Args)]
struct SinkArgs {
    /// The sink's bucket (default: the DataStore's).
    #[arg(long = "receipt-sink-bucket", env = "RECEIPT_SINK_BUCKET")]
    bucket: Option<String>,
    /// Prepended to every receipt's key.
    #[arg(
        long = "receipt-sink-prefix",
        env = "RECEIPT_SINK_PREFIX",
        default_value = tombstone::audit::sink::DEFAULT_PREFIX
    )]
    prefix: String,
    /// Object Lock mode of receipts, where the bucket has Object Lock.
    #[arg(
        long = "receipt-lock-mode",
        env = "RECEIPT_LOCK_MODE",
        value_enum,
        default_value = "compliance"
    )]
    lock_mode: tombstone::audit::sink::LockMode,
    /// How long each receipt is locked, where the bucket has Object Lock.
    #[arg(
        long = "receipt-lock-period",
        env = "RECEIPT_LOCK_PERIOD",
        default_value = tombstone::audit::sink::DEFAULT_LOCK_PERIOD
    )]
    lock_period: tombstone::api::Duration,
}

impl SinkArgs {
    fn settings(
        &self,
        datastore: String,
        namespace: &str,
        allow_ambient_credentials: bool,
    ) -> tombstone::audit::sink::SinkSettings {
        tombstone::audit::sink::SinkSettings {
            datastore,
            namespace: namespace.to_string(),
            bucket: self.bucket.clone(),
            prefix: self.prefix.clone(),
            lock_mode: self.lock_mode,
            lock_period: self.lock_period.as_std(),
            allow_ambient_credentials,
        }
    }
}

#[derive(clap::Args)]
struct RunArgs {
    /// Watch only this namespace (default: every namespace).
    #[arg(long, env = "WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// Elect a leader on a Lease so that only one replica acts.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    leader_election: bool,
    /// Namespace of the Lease: the operator's own.
    #[arg(long, env = "POD_NAMESPACE", default_value = "tombstone-system")]
    lease_namespace: String,
    #[arg(long, default_value = "tombstone-leader")]
    lease_name: String,
    /// How long a standby waits, after it last saw the Lease change, before taking it over.
    #[arg(long, default_value = "15s")]
    lease_duration: tombstone::api::Duration,
    /// How long the leader keeps acting without renewing the Lease; it stops deleting and
    /// writing status after that. Must be shorter than the lease duration.
    #[arg(long, default_value = "10s")]
    renew_deadline: tombstone::api::Duration,
    /// How often the leader renews the Lease and a standby looks at it.
    #[arg(long, default_value = "2s")]
    lease_retry_period: tombstone::api::Duration,
    /// This replica's identity in the Lease (default: the pod name, else the host name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Address for /healthz, /readyz and /metrics.
    #[arg(long, default_value = "0.0.0.0:8080")]
    http_addr: std::net::SocketAddr,
    /// How long a sweep step may run before its progress is checkpointed in status.
    #[arg(long, default_value = "2s")]
    checkpoint_interval: tombstone::api::Duration,
    /// Store steps (sweeps and erasures) running at once; an erasure due within 7 days goes
    /// first, then the policy or request running the fewest.
    #[arg(long, default_value_t = 4)]
    max_concurrent_jobs: usize,
    /// Reconciles running at once per controller (policies, requests, stores, holds). Most
    /// of a reconcile is waiting for the API server and the stores, so more than the cores.
    #[arg(long, default_value_t = tombstone::controller::Settings::default().reconcile_concurrency)]
    reconcile_concurrency: u16,
    /// Erasure requests whose targets are ready at the same time are worked together, up to
    /// this many subjects per target in one pass (one scan, one rewrite, one store-side
    /// deletion); 1: one request at a time.
    #[arg(long, default_value_t = tombstone::engine::batch::BatchSettings::default().max_members, value_parser = clap::value_parser!(usize))]
    erasure_batch_size: usize,
    /// How long a batch waits for more requests to join before it starts (0s: at once).
    #[arg(long, default_value = "0s")]
    erasure_batch_wait: tombstone::api::Duration,
    /// An erasure request in one unfinished phase this long counts as stalled (a request held
    /// by a LegalHold waits lawfully and never does).
    #[arg(long, default_value = "24h")]
    stall_after: tombstone::api::Duration,
    /// An erasure request blocked by a LegalHold that cannot be evaluated, or with a target
    /// failing, this long counts as stalled.
    #[arg(long, default_value = "1h")]
    stall_failing_after: tombstone::api::Duration,
    /// Let S3 DataStores without a credentials Secret use this operator's own cloud identity
    /// (the default AWS credential chain, e.g. IRSA). Off by default: with it, any namespace
    /// that may create a DataStore reaches every bucket the operator can.
    #[arg(
        long,
        env = "ALLOW_AMBIENT_CREDENTIALS",
        default_value_t = false,
        num_args = 0..=1,
        default_missing_value = "true",
        action = clap::ArgAction::Set
    )]
    allow_ambient_credentials: bool,
    /// The receipt sink: a DataStore of kind s3 in the operator's namespace. Every receipt is
    /// also written there, one object per receipt. Unset: receipts go to the audit log only.
    #[arg(long, env = "RECEIPT_SINK_DATASTORE")]
    receipt_sink_datastore: Option<String>,
    #[command(flatten)]
    sink: SinkArgs,
    /// How long a Completed erasure request is kept once its receipts are in the sink; then
    /// the operator deletes it (with an Event). Without a sink nothing is deleted.
    #[arg(long, default_value = "30d")]
    completed_request_ttl: tombstone::api::Duration,
    /// Log format: json (default) or text.
    #[arg(long, env = "LOG_FORMAT", default_value = "json")]
    log_format: String,
}

fn main() -> anyhow::Result<()> {
    tombstone::install_crypto_provider();
    // Installed (or linked) as `kubectl-tombstone`, kubectl runs it as `kubectl tombstone`.
    let invoked_as = std::env::args_os()
        .next()
        .map(PathBuf::from)
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
    if invoked_as.is_some_and(|name| name.starts_with(kubectl::PLUGIN_BINARY)) {
        return kubectl::run(kubectl::PluginCli::parse());
    }
    match Cli::parse().command {
        Command::Run(args) => run(*args),
        Command::Crds { write } => print_or_write_crds(write),
        Command::Digest(args) => print_digest(args),
        Command::Ropa(args) => print_ropa(args),
        Command::Receipts(ReceiptsCommand::Verify(args)) => verify_receipts(args),
        Command::Receipts(ReceiptsCommand::Proof(args)) => print_proof(args),
        Command::Kubectl(cli) => kubectl::run(cli),
    }
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "text" {
        builder.init();
    } else {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init();
    }
}

#[tokio::main]
async fn run(args: RunArgs) -> anyhow::Result<()> {
    init_logging(&args.log_format);
    // Registered first, so a SIGTERM during start-up is handled gracefully too.
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API")?;
    let identity = args
        .identity
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| format!("tombstone-{}", std::process::id()));
    let options = tombstone::operator::Options {
        namespace: args.namespace,
        leader_election: args.leader_election.then(|| {
            let mut election = tombstone::leader::LeaderElection::new(
                &args.lease_namespace,
                &args.lease_name,
                &identity,
            );
            election.lease_duration = args.lease_duration.as_std();
            election.renew_deadline = args.renew_deadline.as_std();
            election.renew_interval = args.lease_retry_period.as_std();
            election
        }),
        http_addr: Some(args.http_addr),
        reporter: "tombstone".into(),
        settings: tombstone::controller::Settings {
            checkpoint_interval: args.checkpoint_interval.as_std(),
            max_concurrent_jobs: args.max_concurrent_jobs,
            reconcile_concurrency: args.reconcile_concurrency,
            operator_namespace: args.lease_namespace.clone(),
            allow_ambient_credentials: args.allow_ambient_credentials,
            stall_after: tombstone::controller::erasurerequest::plan::StallAfter {
                no_progress: args.stall_after.as_std(),
                failing: args.stall_failing_after.as_std(),
            },
            receipt_sink: args.receipt_sink_datastore.clone().map(|store| {
                args.sink
                    .settings(store, &args.lease_namespace, args.allow_ambient_credentials)
            }),
            completed_request_ttl: args.completed_request_ttl.as_std(),
            batches: tombstone::engine::batch::BatchSettings {
                max_members: args.erasure_batch_size.max(1),
                wait: args.erasure_batch_wait.as_std(),
            },
            ..Default::default()
        },
    };
    let shutdown = CancellationToken::new();
    let running = tombstone::operator::start(client, options, shutdown.clone()).await?;
    let mut task = running.task;
    tokio::select! {
        result = &mut task => return Ok(result??),
        _ = terminate.recv() => tracing::info!("shutdown signal received; stopping gracefully"),
        _ = tokio::signal::ctrl_c() => tracing::info!("shutdown signal received; stopping gracefully"),
    }
    shutdown.cancel();
    task.await??;
    Ok(())
}

fn print_or_write_crds(write: Option<PathBuf>) -> anyhow::Result<()> {
    let crds = tombstone::crds::all();
    match write {
        None => {
            for (_, crd) in &crds {
                print!("---\n{}", tombstone::crds::to_yaml(crd)?);
            }
        }
        Some(root) => {
            for dir in tombstone::crds::CRD_DIRS {
                let dir = root.join(dir);
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                for (file, crd) in &crds {
                    let path = dir.join(file);
                    std::fs::write(&path, tombstone::crds::to_yaml(crd)?)
                        .with_context(|| format!("writing {}", path.display()))?;
                }
            }
        }
    }
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn print_digest(args: DigestArgs) -> anyhow::Result<()> {
    let value = if args.value == "-" {
        let mut value = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut value)
            .context("reading the identifier from standard input")?;
        value
    } else {
        args.value
    };
    let key = match &args.key_file {
        Some(path) => {
            let bytes =
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            tombstone::audit::DigestKey::from_bytes(&bytes)
                .with_context(|| format!("invalid digest key in {}", path.display()))?
        }
        None => {
            let client = kube::Client::try_default()
                .await
                .context("connecting to the Kubernetes API")?;
            tombstone::audit::load_key(&client, &args.namespace)
                .await
                .context("loading the digest key")?
        }
    };
    println!(
        "{}",
        tombstone::audit::identifier_digest(&key, &args.id_type, &value)
    );
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn print_ropa(args: RopaArgs) -> anyhow::Result<()> {
    use tombstone::ropa;
    let namespace = args.namespace.as_deref();
    let objects = if args.paths.is_empty() {
        let client = kube::Client::try_default()
            .await
            .context("connecting to the Kubernetes API")?;
        ropa::load_cluster(&client, namespace).await?
    } else {
        ropa::load_files(&args.paths)?.in_namespace(namespace)
    };
    let register = ropa::Register::build(&objects.policies, &objects.stores);
    let text = match args.format {
        RopaFormat::Markdown => register.to_markdown(),
        RopaFormat::Csv => register.to_csv(),
        RopaFormat::Json => register.to_json(),
    };
    std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes())
        .context("writing the register")?;
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn verify_receipts(args: VerifyArgs) -> anyhow::Result<()> {
    use tombstone::audit::chain::{self, StreamKind};
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API")?;
    let sink = args.location.resolve(&client).await?;
    let only = match (&args.policy, &args.request) {
        (Some(p), _) => Some((StreamKind::Policy, p)),
        (None, Some(r)) => Some((StreamKind::Request, r)),
        (None, None) => None,
    };
    let folder = match only {
        Some((kind, object)) => {
            let (namespace, name) = object.split_once('/').context("expected NAMESPACE/NAME")?;
            Some(chain::object_folder(sink.prefix(), kind, namespace, name))
        }
        None => None,
    };
    let reports = tombstone::audit::sink::verify(&sink, Some(&client), folder.as_deref())
        .await
        .context("reading the receipts")?;
    print!("{}", chain::table(&reports));
    let broken = reports.iter().filter(|r| !r.intact()).count();
    if reports.is_empty() {
        println!(
            "no receipts found in s3://{}/{}",
            sink.bucket(),
            folder.as_deref().unwrap_or(sink.prefix())
        );
        if only.is_some() {
            std::process::exit(1);
        }
    } else if broken > 0 {
        println!("{broken} of {} chains are broken", reports.len());
        std::process::exit(1);
    } else {
        println!("{} chains verified", reports.len());
    }
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn print_proof(args: ProofArgs) -> anyhow::Result<()> {
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API")?;
    let sink = args.location.resolve(&client).await?;
    let proof =
        tombstone::audit::proof::proof(client, &sink, &args.request_namespace, &args.request)
            .await
            .context("reading the receipts")?;
    print!("{proof}");
    if !proof.verified() {
        std::process::exit(1);
    }
    Ok(())
}
