//! squib-bench: the measuring and reporting half of `make bench` (`bench/run` drives it).
//!
//! - `boot`: one VMM start -> guest agent ready measurement, squib-vmm or QEMU microvm;
//! - `report`: raw samples of a run -> `results.json`, `results.md`, `chart.png`.

mod boot;
mod chart;
mod report;

use clap::{Parser, Subcommand};

/// Command line.
#[derive(Debug, Parser)]
#[command(
    name = "squib-bench",
    about = "squib measured side by side with its peers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Boot one VM to agent ready and print the measurements as JSON.
    Boot(boot::BootArgs),
    /// Summarise a run directory into results.json, a markdown table and a chart.
    Report(report::ReportArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Boot(a) => boot::run(&a),
        Command::Report(a) => report::run(&a),
    }
}
