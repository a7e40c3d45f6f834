//! `octo swarm-bench`: real `octo share`/`octo get` processes in network namespaces.

use anyhow::{bail, Result};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[arg(long)]
    pub json: bool,
}

pub async fn run(_args: Args) -> Result<()> {
    bail!("swarm-bench is not implemented yet")
}
