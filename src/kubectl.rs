//! The command line of `kubectl tombstone` (the binary installed as `kubectl-tombstone`, or
//! `tombstone kubectl`). The work is done in the library's `plugin` module.

use std::io::Read;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tombstone::api::erasurerequest::ErasureGround;
use tombstone::plugin;

/// The name kubectl finds the plugin by.
pub const PLUGIN_BINARY: &str = "kubectl-tombstone";

#[derive(Parser)]
#[command(
    name = "kubectl tombstone",
    bin_name = "kubectl tombstone",
    version,
    about = "The Data Protection Officer's commands: file erasures, see where they stand, hold subjects, prove an erasure"
)]
pub struct PluginCli {
    #[command(subcommand)]
    pub command: PluginCommand,
}

#[derive(Subcommand)]
pub enum PluginCommand {
    /// File one data subject's erasure request. Identifiers are read as `type=value` lines
    /// from a file or standard input (never from the command line); prints the subject's
    /// digest and the deadline once the operator has taken the request.
    Erase(EraseArgs),
    /// Erasure requests by phase; those overdue, due soon and stalled.
    Status(StatusArgs),
    /// Put a data subject under a LegalHold, by digest (as `erase` or `tombstone digest`
    /// print it) or by identifiers read like `erase` reads them.
    Hold(HoldArgs),
    /// The proof of one erasure request for an auditor: its receipts fetched from the
    /// receipt sink, each hash recomputed, the chain and the digest in status checked, and a
    /// summary to keep. Exits 1 unless it verifies.
    Proof(ProofArgs),
}

#[derive(clap::Args)]
pub struct ProofArgs {
    /// The erasure request.
    #[arg(value_name = "REQUEST")]
    request: String,
    /// Its namespace (default: the kubeconfig context's).
    #[arg(long, short = 'n')]
    namespace: Option<String>,
    /// Namespace of the operator, where the sink's DataStore lives.
    #[arg(long, env = "POD_NAMESPACE", default_value = "tombstone-system")]
    operator_namespace: String,
    /// The sink's DataStore, as the operator is given it.
    #[arg(long, env = "RECEIPT_SINK_DATASTORE")]
    receipt_sink_datastore: String,
    #[command(flatten)]
    sink: super::SinkArgs,
    /// Let a sink DataStore without a credentials Secret use this process's cloud identity.
    #[arg(long, env = "ALLOW_AMBIENT_CREDENTIALS", default_value_t = false)]
    allow_ambient_credentials: bool,
}

#[derive(clap::Args)]
pub struct EraseArgs {
    /// Namespace of the request (default: the kubeconfig context's).
    #[arg(long, short = 'n')]
    namespace: Option<String>,
    /// File of `type=value` lines (`email=…`, `userId=…`); `-` is standard input.
    #[arg(long, short = 'f', value_name = "PATH", default_value = "-")]
    from_file: PathBuf,
    /// The Art. 17(1) ground: noLongerNecessary, consentWithdrawn, objection,
    /// unlawfulProcessing, legalObligation or childConsent.
    #[arg(long, value_parser = parse_ground)]
    ground: ErasureGround,
    /// The request's name (default: `erasure-` and random digits).
    #[arg(long)]
    name: Option<String>,
    /// An external ticket id.
    #[arg(long)]
    reference: Option<String>,
    /// Erase only from these policies (repeatable; default: every policy of the namespace
    /// with a subject locator).
    #[arg(long = "policy", value_name = "NAME")]
    policies: Vec<String>,
    /// Find and count only.
    #[arg(long)]
    dry_run: bool,
    /// One request for the whole organisation: it searches every namespace that has not
    /// opted out. It is filed, with its identifiers Secret, in the operator's namespace
    /// (`--operator-namespace`), and the identifiers go nowhere else. `--policy` then takes
    /// `namespace/name`.
    #[arg(long, conflicts_with = "namespace")]
    cluster_wide: bool,
    /// Namespace of the operator, where cluster-wide requests are filed.
    #[arg(long, env = "POD_NAMESPACE", default_value = "tombstone-system")]
    operator_namespace: String,
    /// How long to wait for the operator to take the request; 0s does not wait.
    #[arg(long, default_value = "30s")]
    wait: tombstone::api::Duration,
}

#[derive(clap::Args)]
pub struct StatusArgs {
    /// Only this namespace (default: every namespace).
    #[arg(long, short = 'n')]
    namespace: Option<String>,
    /// A request whose deadline is this close is due soon.
    #[arg(long, default_value = "7d")]
    due_within: tombstone::api::Duration,
    /// As the operator's `--stall-after`.
    #[arg(long, default_value = "24h")]
    stall_after: tombstone::api::Duration,
    /// As the operator's `--stall-failing-after`.
    #[arg(long, default_value = "1h")]
    stall_failing_after: tombstone::api::Duration,
}

#[derive(clap::Args)]
pub struct HoldArgs {
    /// Namespace of the hold: it holds the subject in this namespace's datasets (default:
    /// the kubeconfig context's).
    #[arg(long, short = 'n')]
    namespace: Option<String>,
    /// Why the data must be kept (shown to everyone who reads the hold).
    #[arg(long)]
    reason: String,
    /// A subject's digest (repeatable).
    #[arg(
        long = "digest",
        value_name = "DIGEST",
        required_unless_present = "from_file"
    )]
    digests: Vec<String>,
    /// Identifiers as `type=value` lines instead of digests; `-` is standard input. Their
    /// digests need the operator's digest key.
    #[arg(long, short = 'f', value_name = "PATH", conflicts_with = "digests")]
    from_file: Option<PathBuf>,
    /// Namespace of the operator, where the digest key Secret lives.
    #[arg(long, env = "POD_NAMESPACE", default_value = "tombstone-system")]
    operator_namespace: String,
    /// Hold only these policies' datasets (repeatable).
    #[arg(long = "policy", value_name = "NAME")]
    policies: Vec<String>,
    /// When the hold lapses (RFC 3339).
    #[arg(long, value_parser = parse_time)]
    expires_at: Option<tombstone::api::Timestamp>,
    /// The hold's name (default: `hold-` and random digits).
    #[arg(long)]
    name: Option<String>,
}

fn parse_ground(text: &str) -> Result<ErasureGround, String> {
    serde_json::from_value(serde_json::Value::String(text.to_string())).map_err(|_| {
        "expected noLongerNecessary, consentWithdrawn, objection, unlawfulProcessing, \
         legalObligation or childConsent"
            .to_string()
    })
}

fn parse_time(text: &str) -> Result<tombstone::api::Timestamp, String> {
    chrono::DateTime::parse_from_rfc3339(text)
        .map(|t| tombstone::api::Timestamp(t.with_timezone(&chrono::Utc)))
        .map_err(|e| format!("expected an RFC 3339 time such as 2027-06-30T00:00:00Z: {e}"))
}

/// Reads identifiers from a file or standard input.
fn read_identifiers(
    path: &std::path::Path,
) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
    let mut text = String::new();
    if path.as_os_str() == "-" {
        std::io::stdin()
            .read_to_string(&mut text)
            .context("reading identifiers from standard input")?;
    } else {
        text = std::fs::read_to_string(path)
            .with_context(|| format!("reading identifiers from {}", path.display()))?;
    }
    Ok(plugin::parse_identifiers(&text)?)
}

fn none_if_empty(list: Vec<String>) -> Option<Vec<String>> {
    (!list.is_empty()).then_some(list)
}

#[tokio::main(flavor = "current_thread")]
pub async fn run(cli: PluginCli) -> anyhow::Result<()> {
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API")?;
    let namespace =
        |given: Option<String>| given.unwrap_or_else(|| client.default_namespace().to_string());
    match cli.command {
        PluginCommand::Erase(args) => {
            let identifiers = read_identifiers(&args.from_file)?;
            let request_namespace = if args.cluster_wide {
                args.operator_namespace
            } else {
                namespace(args.namespace)
            };
            let options = plugin::erase::EraseOptions {
                namespace: request_namespace,
                cluster_wide: args.cluster_wide,
                name: args.name,
                ground: args.ground,
                reference: args.reference,
                policies: none_if_empty(args.policies),
                dry_run: args.dry_run,
                wait: args.wait.as_std(),
            };
            let filed = plugin::erase::erase(&client, &options, &identifiers).await?;
            print!("{filed}");
        }
        PluginCommand::Status(args) => {
            let stall_after = tombstone::controller::erasurerequest::plan::StallAfter {
                no_progress: args.stall_after.as_std(),
                failing: args.stall_failing_after.as_std(),
            };
            let summary = plugin::status::status(
                &client,
                args.namespace.as_deref(),
                args.due_within.as_std(),
                &stall_after,
            )
            .await?;
            print!("{summary}");
        }
        PluginCommand::Hold(args) => {
            let digests = match &args.from_file {
                Some(path) => {
                    let identifiers = read_identifiers(path)?;
                    let key = tombstone::audit::load_key(&client, &args.operator_namespace)
                        .await
                        .map_err(plugin::Error::from)?;
                    plugin::hold::digests_of(&key, &identifiers)
                }
                None => args.digests,
            };
            let options = plugin::hold::HoldOptions {
                namespace: namespace(args.namespace),
                name: args.name,
                reason: args.reason,
                policies: none_if_empty(args.policies),
                expires_at: args.expires_at,
            };
            let name = plugin::hold::hold(&client, &options, &digests).await?;
            println!("legalhold {}/{name} created, holding:", options.namespace);
            for digest in &digests {
                println!("  {digest}");
            }
        }
        PluginCommand::Proof(args) => {
            let settings = args.sink.settings(
                args.receipt_sink_datastore.clone(),
                &args.operator_namespace,
                args.allow_ambient_credentials,
            );
            let sink = tombstone::audit::sink::Sink::resolve(&client, &settings)
                .await
                .context("resolving the receipt sink")?;
            let namespace = namespace(args.namespace);
            let proof =
                tombstone::audit::proof::proof(client.clone(), &sink, &namespace, &args.request)
                    .await
                    .context("reading the receipts")?;
            print!("{proof}");
            if !proof.verified() {
                std::process::exit(1);
            }
        }
    }
    Ok(())
}
