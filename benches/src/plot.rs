//! PNG charts with plotters. Text needs a TrueType font: the system's default sans-serif
//! font, located with fontconfig's `fc-match` at run time.

use anyhow::{bail, Context, Result};
use plotters::coord::{CoordTranslate, Shift};
use plotters::prelude::*;
use std::path::Path;
use std::sync::OnceLock;

/// Register the system's sans-serif font with plotters (once).
pub fn register_font() -> Result<()> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        let out = std::process::Command::new("fc-match")
            .args(["-f", "%{file}", "sans-serif"])
            .output()
            .map_err(|e| format!("fc-match (fontconfig) not available: {e}"))?;
        let path = String::from_utf8_lossy(&out.stdout).to_string();
        let bytes = std::fs::read(&path).map_err(|e| format!("reading font {path}: {e}"))?;
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| format!("{path} is not a usable font"))
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

/// A white PNG canvas of `size` pixels, written to `path` when presented.
fn canvas(path: &Path, size: (u32, u32)) -> Result<DrawingArea<BitMapBackend<'_>, Shift>> {
    let root = BitMapBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE).context("drawing")?;
    Ok(root)
}

/// A chart on `root` with the caption `title` and room for the axis labels.
fn chart_builder<'a, 'b>(
    root: &'a DrawingArea<BitMapBackend<'b>, Shift>,
    title: &str,
    y_label_area: u32,
) -> ChartBuilder<'a, 'b, BitMapBackend<'b>> {
    let mut b = ChartBuilder::on(root);
    b.caption(title, ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(y_label_area);
    b
}

/// Lines on log-log axes, one per named series of (x, y) points.
pub fn log_lines(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> Result<()> {
    let pts = series.iter().flat_map(|(_, p)| p.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if series.is_empty() || !(x0 > 0.0 && y0 > 0.0) {
        bail!("nothing positive to plot for {title}");
    }
    let root = canvas(path, (1000, 640))?;
    let mut chart = chart_builder(&root, title, 80)
        .build_cartesian_2d(
            (x0 / 1.3..x1 * 1.3).log_scale(),
            (y0 / 2.0..y1 * 2.0).log_scale(),
        )
        .context("building the chart")?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .draw()
        .context("drawing the mesh")?;
    for (i, (name, p)) in series.iter().enumerate() {
        let color = line_with_legend(&mut chart, i, name, p)?;
        chart
            .draw_series(
                p.iter()
                    .map(|&(x, y)| Circle::new((x, y), 4, color.filled())),
            )
            .context("drawing points")?;
    }
    legend_and_present(&mut chart, &root, path)
}

/// A bar chart of `values` indexed 0.. .
pub fn bars(path: &Path, title: &str, x_label: &str, y_label: &str, values: &[f64]) -> Result<()> {
    let top = values.iter().copied().fold(0.0f64, f64::max).max(1.0) * 1.15;
    let root = canvas(path, (1000, 520))?;
    let mut chart = chart_builder(&root, title, 64)
        .build_cartesian_2d(0usize..values.len(), 0.0..top)
        .context("building the chart")?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .disable_x_mesh()
        .draw()
        .context("drawing the mesh")?;
    chart
        .draw_series(
            values
                .iter()
                .enumerate()
                .map(|(i, &v)| Rectangle::new([(i, 0.0), (i + 1, v)], BLUE.mix(0.6).filled())),
        )
        .context("drawing bars")?;
    root.present()
        .with_context(|| format!("writing {}", path.display()))
}

/// Lines on linear axes, one per named series of (x, y) points, with an optional vertical
/// marker line at `marker.0` labelled `marker.1`.
pub fn lines(
    path: &Path,
    title: &str,
    (x_label, y_label): (&str, &str),
    series: &[(String, Vec<(f64, f64)>)],
    marker: Option<(f64, &str)>,
) -> Result<()> {
    let pts = || series.iter().flat_map(|(_, p)| p.iter());
    let x1 = pts().map(|p| p.0).fold(1.0f64, f64::max);
    let y1 = pts().map(|p| p.1).fold(1.0f64, f64::max) * 1.15;
    let root = canvas(path, (1000, 560))?;
    let mut chart = chart_builder(&root, title, 64)
        .build_cartesian_2d(0.0..x1, 0.0..y1)
        .context("building the chart")?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .draw()
        .context("drawing the mesh")?;
    for (i, (name, p)) in series.iter().enumerate() {
        line_with_legend(&mut chart, i, name, p)?;
    }
    if let Some((x, label)) = marker {
        chart
            .draw_series(LineSeries::new([(x, 0.0), (x, y1)], RED.stroke_width(2)))
            .context("drawing the marker")?
            .label(label)
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.stroke_width(2)));
    }
    legend_and_present(&mut chart, &root, path)
}

/// Draw `points` as series `i`'s line (its palette colour, returned) with `name` in the
/// legend.
fn line_with_legend<X, Y>(
    chart: &mut ChartContext<'_, BitMapBackend<'_>, Cartesian2d<X, Y>>,
    i: usize,
    name: &str,
    points: &[(f64, f64)],
) -> Result<RGBAColor>
where
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    let color = Palette99::pick(i).to_rgba();
    chart
        .draw_series(LineSeries::new(
            points.iter().copied(),
            color.stroke_width(2),
        ))
        .context("drawing a series")?
        .label(name)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    Ok(color)
}

/// Draw the legend of `chart` in its upper right corner and write `root` to `path`.
pub(crate) fn legend_and_present<'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, BitMapBackend<'a>, CT>,
    root: &DrawingArea<BitMapBackend<'a>, Shift>,
    path: &Path,
) -> Result<()> {
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .context("drawing the legend")?;
    root.present()
        .with_context(|| format!("writing {}", path.display()))
}

/// One line of a chart against context length.
pub struct Line {
    /// Its name in the legend.
    pub name: String,
    /// (context, value) points.
    pub points: Vec<(f64, f64)>,
    /// Drawn dashed (a limit rather than a measurement).
    pub dashed: bool,
}

impl Line {
    /// A measured line.
    pub fn solid(name: String, points: Vec<(f64, f64)>) -> Line {
        Line {
            name,
            points,
            dashed: false,
        }
    }

    /// A limit, drawn dashed.
    pub fn dashed(name: String, points: Vec<(f64, f64)>) -> Line {
        Line {
            name,
            points,
            dashed: true,
        }
    }
}

/// "8K" for 8192, "500" for 500.
fn context_label(x: f64) -> String {
    let n = x.round() as u64;
    if n >= 1024 && n.is_multiple_of(1024) {
        format!("{}K", n / 1024)
    } else {
        n.to_string()
    }
}

/// The 1-2-5 steps of every decade between `lo` and `hi` (at least two of them).
fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let mut ticks = Vec::new();
    let mut decade = 10f64.powf(lo.log10().floor());
    while decade <= hi {
        for m in [1.0, 2.0, 5.0] {
            let t = decade * m;
            if t >= lo && t <= hi {
                ticks.push(t);
            }
        }
        decade *= 10.0;
    }
    if ticks.len() < 2 {
        ticks = vec![lo, hi];
    }
    ticks
}

/// A tick value without trailing zeros: 0.5, 2, 1e+08.
fn value_label(y: f64) -> String {
    if y >= 1e6 {
        format!("{y:.0e}")
    } else if y >= 1.0 {
        format!("{y:.0}")
    } else {
        let s = format!("{y:.3}");
        s.trim_end_matches('0').to_string()
    }
}

/// Lines against context on log-log axes: the x ticks are exactly `contexts` ("8K",
/// "16K"...), the y ticks 1-2-5 steps, so that no label repeats; dashed lines are limits.
pub fn context_lines(
    path: &Path,
    title: &str,
    y_label: &str,
    contexts: &[usize],
    lines: &[Line],
) -> Result<()> {
    let ys = || lines.iter().flat_map(|l| l.points.iter().map(|p| p.1));
    let y0 = ys().fold(f64::MAX, f64::min);
    let y1 = ys().fold(f64::MIN, f64::max);
    let (x0, x1) = match (contexts.first(), contexts.last()) {
        (Some(&a), Some(&b)) if a > 0 => (a as f64, b as f64),
        _ => bail!("no contexts to plot for {title}"),
    };
    if !(y0 > 0.0 && y1.is_finite()) {
        bail!("nothing positive to plot for {title}");
    }
    // Room above the lines for the legend.
    let (ylo, yhi) = (y0 / 1.6, y1 * 5.0);
    let xs: Vec<f64> = contexts.iter().map(|&c| c as f64).collect();
    let root = canvas(path, (1000, 640))?;
    let mut chart = chart_builder(&root, title, 80)
        .build_cartesian_2d(
            (x0 / 1.25..x1 * 1.25).log_scale().with_key_points(xs),
            (ylo..yhi).log_scale().with_key_points(log_ticks(ylo, yhi)),
        )
        .context("building the chart")?;
    chart
        .configure_mesh()
        .x_desc("context (tokens)")
        .y_desc(y_label)
        .x_label_formatter(&|x| context_label(*x))
        .y_label_formatter(&|y| value_label(*y))
        .draw()
        .context("drawing the mesh")?;
    for (i, l) in lines.iter().enumerate() {
        if l.dashed {
            let style = BLACK.stroke_width(2);
            chart
                .draw_series(DashedLineSeries::new(
                    l.points.iter().copied(),
                    10,
                    6,
                    style,
                ))
                .context("drawing a limit")?
                .label(&l.name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
            continue;
        }
        let color = line_with_legend(&mut chart, i, &l.name, &l.points)?;
        chart
            .draw_series(
                l.points
                    .iter()
                    .map(|&(x, y)| Circle::new((x, y), 4, color.filled())),
            )
            .context("drawing points")?;
    }
    legend_and_present(&mut chart, &root, path)
}

/// One bar of a stacked bar chart: its label and its parts, bottom first.
pub struct Stack {
    /// The label under the bar.
    pub label: String,
    /// The parts' values, in the order of the part names.
    pub parts: Vec<f64>,
}

/// Stacked bars of shares (each bar's parts sum to 100), one per `bars` entry, each split
/// into the parts `names` (one colour each, in the legend). A label `"name|note"` puts `name`
/// under the bar and `note` above it.
pub fn stacked_bars(
    path: &Path,
    title: &str,
    y_label: &str,
    names: &[&str],
    bars: &[Stack],
) -> Result<()> {
    let split = |l: &str| -> (String, String) {
        match l.split_once('|') {
            Some((a, b)) => (a.to_string(), b.to_string()),
            None => (l.to_string(), String::new()),
        }
    };
    let labels: Vec<(String, String)> = bars.iter().map(|b| split(&b.label)).collect();
    let width = (160 + 92 * bars.len() as u32).max(900);
    let root = canvas(path, (width, 620))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(72)
        .build_cartesian_2d((0..bars.len().max(1) - 1).into_segmented(), 0.0..145.0)
        .context("building the chart")?;
    chart
        .configure_mesh()
        .y_desc(y_label)
        .disable_x_mesh()
        .y_labels(6)
        .y_label_formatter(&|y| {
            if *y <= 100.0 {
                format!("{y:.0}")
            } else {
                String::new()
            }
        })
        .x_labels(bars.len())
        .x_label_style(("sans-serif", 12))
        .x_label_formatter(&|x| match x {
            SegmentValue::CenterOf(i) => labels.get(*i).map(|l| l.0.clone()).unwrap_or_default(),
            _ => String::new(),
        })
        .draw()
        .context("drawing the mesh")?;
    for (k, name) in names.iter().enumerate() {
        let color = Palette99::pick(k).to_rgba();
        let rects = bars.iter().enumerate().map(|(i, b)| {
            let below: f64 = b.parts[..k].iter().sum();
            let v = b.parts.get(k).copied().unwrap_or(0.0);
            Rectangle::new(
                [
                    (SegmentValue::Exact(i), below),
                    (SegmentValue::Exact(i + 1), below + v),
                ],
                color.filled(),
            )
        });
        chart
            .draw_series(rects)
            .context("drawing bars")?
            .label(*name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 16, y + 6)], color.filled()));
    }
    chart
        .draw_series(labels.iter().enumerate().map(|(i, l)| {
            Text::new(
                l.1.clone(),
                (SegmentValue::Exact(i), 104.0),
                ("sans-serif", 12).into_font(),
            )
        }))
        .context("drawing the notes")?;
    legend_and_present(&mut chart, &root, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_ticks_read_as_token_counts() {
        assert_eq!(context_label(8192.0), "8K");
        assert_eq!(context_label(32768.0), "32K");
        assert_eq!(context_label(500.0), "500");
    }

    #[test]
    fn value_ticks_are_one_two_five_steps_and_never_repeat() {
        let t = log_ticks(0.3, 40.0);
        assert_eq!(t, vec![0.5, 1.0, 2.0, 5.0, 10.0, 20.0]);
        let labels: Vec<String> = t.iter().map(|&y| value_label(y)).collect();
        assert_eq!(labels, ["0.5", "1", "2", "5", "10", "20"]);
        let mut unique = labels.clone();
        unique.dedup();
        assert_eq!(unique, labels);
        // A narrow range still gets two distinct ticks.
        assert_eq!(log_ticks(3.0, 4.0).len(), 2);
        assert_eq!(value_label(2e8), "2e8");
    }
}
