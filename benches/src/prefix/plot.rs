//! The run's chart: time to first token of every request, in run order, on a log scale,
//! one colour per phase.

use super::record::{Phase, PhaseRecord};
use crate::plot::register_font;
use anyhow::{bail, Context, Result};
use plotters::prelude::*;
use std::path::Path;

/// One colour per phase, in run order: red, green, blue, orange, purple.
const COLORS: [RGBColor; 5] = [
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
];

/// Write the TTFT chart of `phases` to `path` (PNG).
pub fn ttft_chart(path: &Path, title: &str, phases: &[PhaseRecord]) -> Result<()> {
    register_font()?;
    let mut points: Vec<(Phase, Vec<(f64, f64)>)> = Vec::new();
    let mut x = 0usize;
    for p in phases {
        let pts = p
            .requests
            .iter()
            .map(|r| {
                x += 1;
                (x as f64, r.ttft_ms.max(1e-3))
            })
            .collect();
        points.push((p.phase, pts));
    }
    let all = points.iter().flat_map(|(_, p)| p.iter());
    let (lo, hi) = all.fold((f64::MAX, f64::MIN), |(lo, hi), &(_, y)| {
        (lo.min(y), hi.max(y))
    });
    if x == 0 {
        bail!("no requests to plot");
    }
    let root = BitMapBackend::new(path, (1100, 640)).into_drawing_area();
    root.fill(&WHITE).context("drawing")?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(80)
        // Headroom above the highest point for the legend.
        .build_cartesian_2d(0.5..(x as f64 + 0.5), (lo / 2.0..hi * 8.0).log_scale())
        .context("building the chart")?;
    chart
        .configure_mesh()
        .x_labels(x.min(25))
        .x_label_formatter(&|v| format!("{}", v.round() as i64))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .x_desc("request (run order, across phases)")
        .y_desc("time to first token, ms (log)")
        .draw()
        .context("drawing the mesh")?;
    for (phase, pts) in &points {
        if pts.is_empty() {
            continue;
        }
        let i = Phase::ALL.iter().position(|p| p == phase).unwrap_or(0);
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(
                pts.iter()
                    .map(|&(x, y)| Circle::new((x, y), 5, color.filled())),
            )
            .context("drawing points")?
            .label(phase.name())
            .legend(move |(x, y)| Circle::new((x + 10, y), 5, color.filled()));
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(1)))
            .context("drawing a series")?;
    }
    crate::plot::legend_and_present(&mut chart, &root, path)
}
