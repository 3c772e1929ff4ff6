//! Turns the raw samples of one `make bench` run into `results.json`, a markdown table and a
//! chart.
//!
//! Inputs, both JSON lines in the run directory:
//! - `samples.jsonl`: `{"metric": ID, "who": "squib"|"peer", "value": X}` for each repetition,
//!   or `{"metric": ID, "not_measured": REASON}`, or `{"metric": ID, "note": TEXT}`;
//! - `boot.jsonl`: one object per `squib-bench boot` run (see `boot`).
//!
//! Every metric compares medians: `ratio` is squib's median over the peer's.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Serialize;
use serde_json::{Value, json};

/// `squib-bench report` arguments.
#[derive(Debug, clap::Args)]
pub struct ReportArgs {
    /// The run directory holding samples.jsonl and boot.jsonl; results land there too.
    #[arg(long)]
    pub dir: PathBuf,
    /// Where the run happened: "direct" (hardware KVM) or "vmhost" (nested KVM under TCG).
    #[arg(long)]
    pub mode: String,
}

/// How a metric is judged against its target.
#[derive(Debug, Clone, Copy)]
enum Target {
    /// squib / peer at most this.
    RatioAtMost(f64),
    /// squib / peer at least this.
    RatioAtLeast(f64),
    /// squib's median at most this, in the metric's unit.
    AbsAtMost(f64),
    /// Reported only.
    None,
}

/// What each metric means; the order is the table's.
struct MetricDef {
    id: &'static str,
    title: &'static str,
    unit: &'static str,
    peer: &'static str,
    target: Target,
}

const METRICS: &[MetricDef] = &[
    MetricDef {
        id: "ctr_run_true",
        title: "`ctr run --rm busybox true`",
        unit: "s",
        peer: "runc",
        target: Target::RatioAtMost(1.5),
    },
    MetricDef {
        id: "boot_agent_ready",
        title: "VMM start -> agent answers ping (vsock), 128 MiB, quiet",
        unit: "s",
        peer: "qemu microvm",
        target: Target::RatioAtMost(0.5),
    },
    MetricDef {
        id: "boot_marker",
        title: "VMM start -> agent ready marker on console",
        unit: "s",
        peer: "qemu microvm",
        target: Target::None,
    },
    MetricDef {
        id: "boot_phase_process",
        title: "squib phase: process start -> API socket serving",
        unit: "s",
        peer: "-",
        target: Target::None,
    },
    MetricDef {
        id: "boot_phase_instance_start",
        title: "squib phase: InstanceStart request -> answered",
        unit: "s",
        peer: "-",
        target: Target::None,
    },
    MetricDef {
        id: "boot_phase_kernel",
        title: "squib phase: InstanceStart answered -> init runs",
        unit: "s",
        peer: "-",
        target: Target::None,
    },
    MetricDef {
        id: "boot_phase_agent",
        title: "squib phase: init runs -> agent answers ping",
        unit: "s",
        peer: "-",
        target: Target::None,
    },
    MetricDef {
        id: "boot_verbose_agent_ready",
        title: "VMM start -> agent ready, full kernel console (no `quiet`)",
        unit: "s",
        peer: "qemu microvm",
        target: Target::None,
    },
    MetricDef {
        id: "vmm_overhead_128",
        title: "VMM RSS beyond touched guest RAM, 128 MiB guest",
        unit: "MiB",
        peer: "qemu microvm",
        target: Target::AbsAtMost(5.0),
    },
    MetricDef {
        id: "vmm_overhead_512",
        title: "VMM RSS beyond touched guest RAM, 512 MiB guest",
        unit: "MiB",
        peer: "qemu microvm",
        target: Target::AbsAtMost(5.0),
    },
    MetricDef {
        id: "vmm_guest_touched_128",
        title: "guest RAM touched at agent ready, 128 MiB guest",
        unit: "MiB",
        peer: "qemu microvm",
        target: Target::None,
    },
    MetricDef {
        id: "idle_container_128",
        title: "idle `sleep` container, host RSS (shim+VMM+guest), 128 MiB",
        unit: "MiB",
        peer: "runc",
        target: Target::AbsAtMost(32.0),
    },
    MetricDef {
        id: "idle_container_512",
        title: "idle `sleep` container, host RSS (shim+VMM+guest), 512 MiB",
        unit: "MiB",
        peer: "runc",
        target: Target::AbsAtMost(32.0),
    },
    MetricDef {
        id: "stdout_ctr",
        title: "stdout throughput through the shim to ctr",
        unit: "MiB/s",
        peer: "runc",
        target: Target::RatioAtLeast(0.8),
    },
    MetricDef {
        id: "stdout_cli",
        title: "stdout throughput, `squib run` vs `runc run`",
        unit: "MiB/s",
        peer: "runc",
        target: Target::RatioAtLeast(0.8),
    },
    MetricDef {
        id: "blk_read",
        title: "sequential read: guest virtio-blk vs host dd",
        unit: "MiB/s",
        peer: "host dd",
        target: Target::RatioAtLeast(0.8),
    },
    MetricDef {
        id: "density_10_time",
        title: "density: 10 sleeping containers started concurrently",
        unit: "s",
        peer: "runc",
        target: Target::None,
    },
    MetricDef {
        id: "density_10_mem",
        title: "density: host memory used by 10 containers",
        unit: "MiB",
        peer: "runc",
        target: Target::None,
    },
    MetricDef {
        id: "density_50_time",
        title: "density: 50 sleeping containers started concurrently",
        unit: "s",
        peer: "runc",
        target: Target::None,
    },
    MetricDef {
        id: "density_50_mem",
        title: "density: host memory used by 50 containers",
        unit: "MiB",
        peer: "runc",
        target: Target::None,
    },
    MetricDef {
        id: "density_100_time",
        title: "density: 100 sleeping containers started concurrently",
        unit: "s",
        peer: "runc",
        target: Target::None,
    },
    MetricDef {
        id: "density_100_mem",
        title: "density: host memory used by 100 containers",
        unit: "MiB",
        peer: "runc",
        target: Target::None,
    },
];

/// min / median / max of a sample set.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Stats {
    /// Smallest sample.
    pub min: f64,
    /// Median (mean of the middle two for an even count).
    pub median: f64,
    /// Largest sample.
    pub max: f64,
}

/// Computes min, median and max; `None` for no samples.
pub fn stats(samples: &[f64]) -> Option<Stats> {
    let mut v: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let mid = |i: usize| v.get(i).copied().unwrap_or(f64::NAN);
    let median = if n % 2 == 1 {
        mid(n / 2)
    } else {
        f64::midpoint(mid(n / 2 - 1), mid(n / 2))
    };
    Some(Stats {
        min: mid(0),
        median,
        max: mid(n - 1),
    })
}

/// Samples and remarks gathered for one metric.
#[derive(Debug, Default)]
pub struct Collected {
    /// squib's samples.
    pub squib: Vec<f64>,
    /// The peer's samples.
    pub peer: Vec<f64>,
    /// Why (part of) the metric was not measured.
    pub not_measured: Vec<String>,
    /// Remarks (sizes used, method).
    pub notes: Vec<String>,
}

fn read_jsonl(path: &Path) -> anyhow::Result<Vec<Value>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .collect())
}

fn f(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64)
}

/// Adds the boot runs' measurements to the metrics they feed.
fn collect_boots(boots: &[Value], out: &mut BTreeMap<String, Collected>) {
    const MIB: f64 = 1024.0;
    for b in boots {
        let vmm = b.get("vmm").and_then(Value::as_str).unwrap_or("");
        let mem = b.get("mem_mib").and_then(Value::as_u64).unwrap_or(0);
        let verbose = b.get("verbose").and_then(Value::as_bool).unwrap_or(false);
        let push = |out: &mut BTreeMap<String, Collected>, id: &str, x: Option<f64>| {
            if let Some(x) = x {
                let c = out.entry(id.to_owned()).or_default();
                if vmm == "squib" {
                    c.squib.push(x);
                } else {
                    c.peer.push(x);
                }
            }
        };
        let overhead = f(b, "rss_total_kib")
            .zip(f(b, "rss_guest_kib"))
            .map(|(t, g)| (t - g) / MIB);
        push(out, &format!("vmm_overhead_{mem}"), overhead);
        if verbose {
            push(out, "boot_verbose_agent_ready", f(b, "agent_ready_s"));
            continue;
        }
        if mem != 128 {
            continue;
        }
        push(out, "boot_agent_ready", f(b, "agent_ready_s"));
        push(out, "boot_marker", f(b, "marker_s"));
        push(
            out,
            "vmm_guest_touched_128",
            f(b, "rss_guest_kib").map(|g| g / MIB),
        );
        if vmm == "squib" {
            let api = f(b, "api_ready_s");
            let conf = f(b, "configured_s");
            let started = f(b, "instance_started_s");
            let init = f(b, "init_s");
            let ready = f(b, "agent_ready_s");
            push(out, "boot_phase_process", api);
            push(
                out,
                "boot_phase_instance_start",
                started.zip(conf).map(|(s, c)| s - c),
            );
            push(
                out,
                "boot_phase_kernel",
                init.zip(started).map(|(i, s)| i - s),
            );
            push(out, "boot_phase_agent", ready.zip(init).map(|(r, i)| r - i));
        }
    }
}

fn collect(dir: &Path) -> anyhow::Result<BTreeMap<String, Collected>> {
    let mut out: BTreeMap<String, Collected> = BTreeMap::new();
    for s in read_jsonl(&dir.join("samples.jsonl"))? {
        let Some(id) = s.get("metric").and_then(Value::as_str) else {
            continue;
        };
        let c = out.entry(id.to_owned()).or_default();
        // A section that a fresh L1 runs again after the first died writes its notes again.
        if let Some(r) = s.get("not_measured").and_then(Value::as_str) {
            if !c.not_measured.iter().any(|x| x == r) {
                c.not_measured.push(r.to_owned());
            }
        } else if let Some(n) = s.get("note").and_then(Value::as_str) {
            if !c.notes.iter().any(|x| x == n) {
                c.notes.push(n.to_owned());
            }
        } else if let Some(x) = f(&s, "value") {
            match s.get("who").and_then(Value::as_str) {
                Some("squib") => c.squib.push(x),
                Some("peer") => c.peer.push(x),
                _ => {}
            }
        }
    }
    collect_boots(&read_jsonl(&dir.join("boot.jsonl"))?, &mut out);
    Ok(out)
}

fn target_text(t: Target, unit: &str) -> String {
    match t {
        Target::RatioAtMost(r) => format!("ratio <= {r}"),
        Target::RatioAtLeast(r) => format!("ratio >= {r}"),
        Target::AbsAtMost(x) => format!("squib <= {x} {unit}"),
        Target::None => "-".to_owned(),
    }
}

fn meets(t: Target, squib: Option<Stats>, ratio: Option<f64>) -> Option<bool> {
    match t {
        Target::RatioAtMost(r) => ratio.map(|x| x <= r),
        Target::RatioAtLeast(r) => ratio.map(|x| x >= r),
        Target::AbsAtMost(x) => squib.map(|s| s.median <= x),
        Target::None => None,
    }
}

fn fmt_stats(s: Option<Stats>) -> String {
    s.map_or_else(
        || "-".to_owned(),
        |s| format!("{:.3} ({:.3}-{:.3})", s.median, s.min, s.max),
    )
}

/// Writes results.json, results.md and chart.png into the run directory and prints the table.
pub fn run(args: &ReportArgs) -> anyhow::Result<()> {
    let collected = collect(&args.dir)?;
    let mut results = Vec::new();
    let mut md = String::new();
    let where_ = if args.mode == "direct" {
        "directly on this host's hardware KVM: absolute numbers and ratios both mean something"
    } else {
        "inside the VM test host (QEMU TCG L1 with nested KVM): only ratios against the peer \
         measured in the same run mean something; absolute times are 30-50x slower than \
         hardware"
    };
    md.push_str(&format!("squib benchmarks, run {where_}.\n\n"));
    md.push_str(
        "| metric | unit | squib median (min-max) | peer | peer median (min-max) | ratio | \
         target | meets | runs |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for m in METRICS {
        let empty = Collected::default();
        let c = collected.get(m.id).unwrap_or(&empty);
        let s = stats(&c.squib);
        let p = stats(&c.peer);
        let ratio = s.zip(p).and_then(|(s, p)| {
            let r = s.median / p.median;
            r.is_finite().then_some(r)
        });
        let ok = meets(m.target, s, ratio);
        let missing = if c.not_measured.is_empty() {
            if s.is_none() && p.is_none() {
                Some("not measured: no samples (see bench.log)".to_owned())
            } else {
                None
            }
        } else {
            Some(format!("not measured: {}", c.not_measured.join("; ")))
        };
        results.push(json!({
            "metric": m.id,
            "title": m.title,
            "unit": m.unit,
            "squib": s,
            "peer_name": m.peer,
            "peer": p,
            "ratio": ratio,
            "target": target_text(m.target, m.unit),
            "meets_target": ok,
            "runs": {"squib": c.squib, "peer": c.peer},
            "not_measured": missing,
            "notes": c.notes,
        }));
        let meets = match ok {
            Some(true) => "yes",
            Some(false) => "NO",
            None => "-",
        };
        let ratio_text = ratio.map_or_else(|| "-".to_owned(), |r| format!("{r:.2}"));
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {}/{} |\n",
            m.title,
            m.unit,
            fmt_stats(s),
            m.peer,
            fmt_stats(p),
            ratio_text,
            target_text(m.target, m.unit),
            meets,
            c.squib.len(),
            c.peer.len()
        ));
        if let Some(why) = &missing {
            md.push_str(&format!("|  | | {why} | | | | | | |\n"));
        }
    }
    let mut notes = String::new();
    for m in METRICS {
        if let Some(c) = collected.get(m.id) {
            for n in &c.notes {
                notes.push_str(&format!("- {}: {n}\n", m.id));
            }
        }
    }
    if !notes.is_empty() {
        md.push_str("\nNotes:\n");
        md.push_str(&notes);
    }
    let doc = json!({"mode": args.mode, "metrics": results});
    std::fs::write(
        args.dir.join("results.json"),
        serde_json::to_vec_pretty(&doc).context("encoding results.json")?,
    )
    .context("writing results.json")?;
    std::fs::write(args.dir.join("results.md"), &md).context("writing results.md")?;
    let chart = args.dir.join("chart.png");
    match crate::chart::draw(&chart, &collected) {
        Ok(()) => md.push_str(&format!("\nChart: {}\n", chart.display())),
        Err(e) => md.push_str(&format!("\nChart not drawn: {e:#}\n")),
    }
    print!("{md}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_collect_keeps_one_copy_of_a_repeated_note() {
        let dir = std::env::temp_dir().join(format!("squib-bench-notes-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let lines = [
            json!({"metric": "stdout_ctr", "note": "64 MiB"}),
            json!({"metric": "stdout_ctr", "note": "64 MiB"}),
            json!({"metric": "stdout_ctr", "note": "other"}),
            json!({"metric": "stdout_ctr", "who": "squib", "value": 1.0}),
            json!({"metric": "stdout_ctr", "who": "squib", "value": 1.0}),
        ];
        let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
        std::fs::write(dir.join("samples.jsonl"), text).unwrap();
        let out = collect(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let c = &out["stdout_ctr"];
        assert_eq!(c.notes, ["64 MiB", "other"]);
        assert_eq!(c.squib, [1.0, 1.0]);
    }

    #[test]
    fn test_stats_median_of_even_and_odd_counts() {
        let s = stats(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.min, s.median, s.max), (1.0, 2.0, 3.0));
        let s = stats(&[4.0, 1.0, 2.0, 3.0]).unwrap();
        assert_eq!(s.median, 2.5);
        assert!(stats(&[]).is_none());
    }

    #[test]
    fn test_collect_boots_splits_squib_phases_and_overhead() {
        let boots = vec![
            json!({"vmm": "squib", "mem_mib": 128, "api_ready_s": 0.1, "configured_s": 0.2,
                   "instance_started_s": 0.5, "init_s": 2.5, "agent_ready_s": 3.0,
                   "rss_total_kib": 40960, "rss_guest_kib": 36864}),
            json!({"vmm": "qemu", "mem_mib": 128, "agent_ready_s": 5.0,
                   "rss_total_kib": 102400, "rss_guest_kib": 40960}),
        ];
        let mut out = BTreeMap::new();
        collect_boots(&boots, &mut out);
        assert_eq!(out["boot_agent_ready"].squib, vec![3.0]);
        assert_eq!(out["boot_agent_ready"].peer, vec![5.0]);
        assert_eq!(out["vmm_overhead_128"].squib, vec![4.0]);
        assert_eq!(out["vmm_overhead_128"].peer, vec![60.0]);
        assert!((out["boot_phase_instance_start"].squib[0] - 0.3).abs() < 1e-9);
        assert!((out["boot_phase_kernel"].squib[0] - 2.0).abs() < 1e-9);
        assert!((out["boot_phase_agent"].squib[0] - 0.5).abs() < 1e-9);
    }
}
