//! The PNG chart: start latency distributions (squib vs runc through containerd, squib-vmm vs
//! QEMU microvm to agent ready) and squib's boot-phase breakdown.
//!
//! plotters' bitmap backend draws shapes without any font; its text needs a font backend that
//! reads system fonts. Labels are therefore drawn with the small built-in 5x7 pixel font below,
//! so the chart renders the same on a bare machine.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use plotters::prelude::*;

use crate::report::{Collected, stats};

const WIDTH: u32 = 1100;
const HEIGHT: u32 = 520;
const SCALE: i32 = 2;

/// 5x7 glyphs, row-major, `#` = ink. Lowercase letters are drawn as uppercase.
const GLYPHS: &[(char, &str)] = &[
    ('0', ".###.#...##..###.#.###..##...#.###."),
    ('1', "..#...##....#....#....#....#...###."),
    ('2', ".###.#...#....#...#...#...#...#####"),
    ('3', "#####....#...#...##.....##...#.###."),
    ('4', "...#...##..#.#.#..#.#####...#....#."),
    ('5', "######....####.....#....##...#.###."),
    ('6', "..##..#...#....####.#...##...#.###."),
    ('7', "#####....#...#...#...#....#....#..."),
    ('8', ".###.#...##...#.###.#...##...#.###."),
    ('9', ".###.#...##...#.####....#...#..##.."),
    ('A', ".###.#...##...#######...##...##...#"),
    ('B', "####.#...##...#####.#...##...#####."),
    ('C', ".###.#...##....#....#....#...#.###."),
    ('D', "###..#..#.#...##...##...##..#.###.."),
    ('E', "######....#....####.#....#....#####"),
    ('F', "######....#....####.#....#....#...."),
    ('G', ".###.#...##....#.####...##...#.####"),
    ('H', "#...##...##...#######...##...##...#"),
    ('I', ".###...#....#....#....#....#...###."),
    ('J', "..###...#....#....#....##..#..##..."),
    ('K', "#...##..#.#.#..##...#.#..#..#.#...#"),
    ('L', "#....#....#....#....#....#....#####"),
    ('M', "#...###.###.#.##...##...##...##...#"),
    ('N', "#...##...###..##.#.##..###...##...#"),
    ('O', ".###.#...##...##...##...##...#.###."),
    ('P', "####.#...##...#####.#....#....#...."),
    ('Q', ".###.#...##...##...##.#.##..#..##.#"),
    ('R', "####.#...##...#####.#.#..#..#.#...#"),
    ('S', ".####.....#.....###.....#....#####."),
    ('T', "#####..#....#....#....#....#....#.."),
    ('U', "#...##...##...##...##...##...#.###."),
    ('V', "#...##...##...##...##...#.#.#...#.."),
    ('W', "#...##...##...##.#.##.#.##.#.#.#.#."),
    ('X', "#...##...#.#.#...#...#.#.#...##...#"),
    ('Y', "#...##...#.#.#...#....#....#....#.."),
    ('Z', "#####....#...#...#...#...#....#####"),
    ('.', "..............................##..."),
    (',', ".........................##...#..#."),
    ('-', "...............###................."),
    ('/', ".........#...#...#...#...#........."),
    (':', ".....##...##.........##...##......."),
    ('(', "...#...#...#....#....#.....#.....#."),
    (')', ".#.....#.....#....#....#...#...#..."),
    ('>', ".#.....#.....#.....#...#...#...#..."),
    ('%', "##...##..#...#...#...#...#..##...##"),
    ('=', "..........#####.....#####.........."),
    ('+', ".......#....#..#####..#....#......."),
    ('x', ".......#...#.#.#...#...#.#.#...#..."),
];

fn glyph(c: char) -> Option<&'static str> {
    let c = if c == 'x' { c } else { c.to_ascii_uppercase() };
    GLYPHS.iter().find(|(g, _)| *g == c).map(|(_, g)| *g)
}

/// Draws `text` with its top-left corner at (x, y), each font pixel a SCALE x SCALE square.
fn text<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    x: i32,
    y: i32,
    s: &str,
    color: &RGBColor,
) -> anyhow::Result<()> {
    let mut cx = x;
    for c in s.chars() {
        if let Some(g) = glyph(c) {
            for (i, b) in g.bytes().enumerate() {
                if b != b'#' {
                    continue;
                }
                let i = i32::try_from(i).unwrap_or(0);
                let (px, py) = (cx + (i % 5) * SCALE, y + (i / 5) * SCALE);
                area.draw(&Rectangle::new(
                    [(px, py), (px + SCALE, py + SCALE)],
                    color.filled(),
                ))
                .map_err(|e| anyhow::anyhow!("drawing text: {e:?}"))?;
            }
        }
        cx += 6 * SCALE;
    }
    Ok(())
}

fn samples<'a>(c: &'a BTreeMap<String, Collected>, id: &str, squib: bool) -> &'a [f64] {
    c.get(id)
        .map_or(&[], |m| if squib { &m.squib } else { &m.peer })
}

#[expect(
    clippy::cast_possible_truncation,
    reason = "pixel coordinates of values already scaled into the chart's width"
)]
fn px(v: f64, max: f64, x0: i32, w: i32) -> i32 {
    x0 + ((v / max) * f64::from(w)).round() as i32
}

/// Draws the chart into `path` (PNG).
///
/// # Errors
///
/// The backend's drawing or encoding error.
pub fn draw(path: &Path, c: &BTreeMap<String, Collected>) -> anyhow::Result<()> {
    let root = BitMapBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE)
        .map_err(|e| anyhow::anyhow!("filling the chart: {e:?}"))?;
    let ink = RGBColor(20, 20, 20);
    let squib_color = RGBColor(200, 60, 30);
    let peer_color = RGBColor(40, 90, 200);
    let de = |e| anyhow::anyhow!("drawing: {e:?}");

    // Left: start latency distributions, each row on its own scale (seconds).
    text(
        &root,
        20,
        12,
        "START LATENCY, SECONDS (DOTS: RUNS, BAR: MEDIAN)",
        &ink,
    )?;
    let rows: [(&str, &str, bool, &RGBColor); 4] = [
        ("SQUIB CTR RUN", "ctr_run_true", true, &squib_color),
        ("RUNC CTR RUN", "ctr_run_true", false, &peer_color),
        ("SQUIB-VMM BOOT", "boot_agent_ready", true, &squib_color),
        ("QEMU MICROVM", "boot_agent_ready", false, &peer_color),
    ];
    let (x0, w) = (200, 380);
    for (pair, ids) in [(0, "ctr_run_true"), (1, "boot_agent_ready")] {
        let max = samples(c, ids, true)
            .iter()
            .chain(samples(c, ids, false))
            .copied()
            .fold(0.0f64, f64::max)
            .max(1e-3)
            * 1.1;
        let rows_here = rows.iter().skip(pair * 2).take(2);
        let base_y = 60 + i32::try_from(pair).unwrap_or(0) * 200;
        for (k, (label, id, squib, color)) in rows_here.enumerate() {
            let y = base_y + i32::try_from(k).unwrap_or(0) * 55;
            text(&root, 20, y - 6, label, &ink)?;
            root.draw(&PathElement::new(
                vec![(x0, y), (x0 + w, y)],
                RGBColor(200, 200, 200),
            ))
            .map_err(de)?;
            let xs = samples(c, id, *squib);
            if xs.is_empty() {
                text(&root, x0 + 10, y - 6, "NOT MEASURED", &ink)?;
            }
            for v in xs {
                root.draw(&Circle::new((px(*v, max, x0, w), y), 5, color.filled()))
                    .map_err(de)?;
            }
            if let Some(s) = stats(xs) {
                let mx = px(s.median, max, x0, w);
                root.draw(&Rectangle::new(
                    [(mx - 1, y - 14), (mx + 2, y + 14)],
                    ink.filled(),
                ))
                .map_err(de)?;
                text(&root, x0 + w + 10, y - 6, &format!("{:.2}", s.median), &ink)?;
            }
        }
        // Axis: 0 and max.
        let ay = base_y + 95;
        root.draw(&PathElement::new(vec![(x0, ay), (x0 + w, ay)], ink))
            .map_err(de)?;
        for i in 0..=4 {
            let v = max * f64::from(i) / 4.0;
            let x = px(v, max, x0, w);
            root.draw(&PathElement::new(vec![(x, ay), (x, ay + 5)], ink))
                .map_err(de)?;
            text(&root, x - 12, ay + 10, &format!("{v:.1}"), &ink)?;
        }
    }

    // Right: squib's boot phases, medians stacked.
    let rx = 620;
    text(&root, rx, 12, "SQUIB BOOT PHASES, MEDIAN SECONDS", &ink)?;
    let phases = [
        (
            "PROCESS START",
            "boot_phase_process",
            RGBColor(120, 120, 120),
        ),
        (
            "INSTANCESTART",
            "boot_phase_instance_start",
            RGBColor(230, 160, 40),
        ),
        ("KERNEL TO INIT", "boot_phase_kernel", RGBColor(60, 140, 60)),
        ("INIT TO AGENT", "boot_phase_agent", RGBColor(150, 60, 170)),
    ];
    let medians: Vec<f64> = phases
        .iter()
        .map(|(_, id, _)| stats(samples(c, id, true)).map_or(0.0, |s| s.median.max(0.0)))
        .collect();
    let total: f64 = medians.iter().sum::<f64>().max(1e-3);
    let (bw, by) = (440, 60);
    let mut acc = 0.0;
    for ((label, _, color), m) in phases.iter().zip(&medians) {
        let a = px(acc, total, rx, bw);
        acc += m;
        let b = px(acc, total, rx, bw);
        root.draw(&Rectangle::new(
            [(a, by), (b.max(a + 1), by + 40)],
            color.filled(),
        ))
        .map_err(de)?;
        let _ = label;
    }
    for (i, ((label, _, color), m)) in phases.iter().zip(&medians).enumerate() {
        let y = by + 70 + i32::try_from(i).unwrap_or(0) * 30;
        root.draw(&Rectangle::new(
            [(rx, y), (rx + 16, y + 14)],
            color.filled(),
        ))
        .map_err(de)?;
        text(&root, rx + 26, y, &format!("{label} {m:.3}"), &ink)?;
    }
    text(
        &root,
        rx,
        by + 200,
        &format!("TOTAL {total:.3} (VMM START TO AGENT PING)"),
        &ink,
    )?;
    root.present()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_glyphs_are_five_by_seven() {
        for (c, g) in GLYPHS {
            assert_eq!(g.len(), 35, "glyph {c:?}");
        }
        assert!(glyph('a').is_some());
    }

    #[test]
    fn test_draw_writes_a_png() {
        let mut c = BTreeMap::new();
        c.insert(
            "ctr_run_true".to_owned(),
            Collected {
                squib: vec![1.0, 1.2],
                peer: vec![0.3],
                ..Collected::default()
            },
        );
        let dir = std::env::temp_dir().join(format!("squib-bench-chart-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("c.png");
        draw(&p, &c).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(&bytes[..4], b"\x89PNG");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
