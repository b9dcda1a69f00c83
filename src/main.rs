use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

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
    /// Print every CRD as YAML, or write them into the repository's CRD directories.
    Crds {
        /// Write crds/, config/crd/bases/ and charts/tombstone/crds/ under this root.
        #[arg(long, value_name = "REPO_ROOT", num_args = 0..=1, default_missing_value = ".")]
        write: Option<PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Crds { write } => print_or_write_crds(write),
    }
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
