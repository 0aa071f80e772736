//! The SVG of `bench --sirius --plot`: three panels a reader takes in at a glance.
//! 1. Decode tokens/s against the window K: Sirius as a line, the full and the sparse model
//!    as flat reference lines (what Sirius must beat, and the most it could reach), and
//!    adaptive windows (`--period auto`, no one K) as a dashed flat line.
//! 2. What the window costs in accuracy of the drafts: AAL / K (the share of each window
//!    kept) and the effective density, both fractions.
//! 3. Where a token's time goes: milliseconds per token in drafts, verifications and the
//!    rest, stacked, one bar per row of the table.

use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::cli::bench_sirius::SweepReport;
use crate::engine::bench_sirius::SweepRow;
use crate::error::{Error, Result};

const FULL: RGBColor = RGBColor(90, 90, 90);
const SPARSE: RGBColor = RGBColor(230, 140, 20);
const SIRIUS: RGBColor = RGBColor(30, 100, 200);
const DRAFT: RGBColor = RGBColor(120, 170, 230);
const VERIFY: RGBColor = RGBColor(30, 100, 200);
const OTHER: RGBColor = RGBColor(190, 190, 190);

fn plot_error(e: impl std::fmt::Display) -> Error {
    Error::InvalidArgument(format!("drawing the --plot SVG failed: {e}"))
}

/// The SVG text of `r`'s plot.
pub fn plot(r: &SweepReport) -> Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (1500, 500)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        let title = format!(
            "Sirius on {} ({}, {} keep {}, threshold {}), {}, commit {}",
            r.model, r.dtype, r.sparsity, r.keep, r.threshold, r.backend, r.commit
        );
        let root = root
            .titled(&title, ("sans-serif", 18))
            .map_err(plot_error)?;
        let panels = root.split_evenly((1, 3));
        speed_panel(&panels[0], &r.rows)?;
        acceptance_panel(&panels[1], &r.rows)?;
        breakdown_panel(&panels[2], &r.rows)?;
        root.present().map_err(plot_error)?;
    }
    Ok(svg)
}

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

/// The fixed-K Sirius rows.
fn fixed_rows(rows: &[SweepRow]) -> impl Iterator<Item = (f64, &SweepRow)> {
    rows.iter()
        .filter(|r| !r.adaptive)
        .filter_map(|r| r.period.map(|k| (k as f64, r)))
}

/// Labels on the K axis: about one per whole K (a short axis would repeat rounded labels).
fn k_labels(xs: &std::ops::Range<f64>) -> usize {
    ((xs.end - xs.start).round() as usize + 1).clamp(2, 12)
}

/// The adaptive Sirius rows, placed at their mean K.
fn adaptive_rows(rows: &[SweepRow]) -> impl Iterator<Item = (f64, &SweepRow)> {
    rows.iter()
        .filter(|r| r.adaptive)
        .filter_map(|r| r.mean_period.map(|k| (k, r)))
}

/// The fixed-K Sirius rows as (K, value) points.
fn sirius_points(rows: &[SweepRow], f: impl Fn(&SweepRow) -> f64) -> Vec<(f64, f64)> {
    fixed_rows(rows).map(|(k, r)| (k, f(r))).collect()
}

/// The K axis: the swept windows with half a step of room either side.
fn k_range(rows: &[SweepRow]) -> std::ops::Range<f64> {
    let mut ks: Vec<f64> = fixed_rows(rows).map(|(k, _)| k).collect();
    ks.extend(adaptive_rows(rows).map(|(k, _)| k));
    let lo = ks.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = ks.iter().copied().fold(0.0, f64::max);
    match lo.is_finite() {
        true => (lo - 1.0).max(0.0)..hi + 1.0,
        false => 0.0..1.0,
    }
}

fn speed_panel(area: &Area<'_>, rows: &[SweepRow]) -> Result<()> {
    let xs = k_range(rows);
    // Headroom above the fastest row for the legend.
    let top = rows.iter().map(|r| r.max_tokens_per_s).fold(0.0, f64::max) * 1.4;
    let mut chart = ChartBuilder::on(area)
        .caption(
            "decode tokens/s (median; bars: min-max)",
            ("sans-serif", 15),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(xs.clone(), 0.0..top.max(1e-3))
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .x_desc("window K")
        .x_labels(k_labels(&xs))
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_desc("tokens/s")
        .draw()
        .map_err(plot_error)?;
    for (mode, color) in [("full", FULL), ("sparse", SPARSE)] {
        if let Some(r) = rows.iter().find(|r| r.mode == mode) {
            let y = r.median_tokens_per_s;
            chart
                .draw_series(LineSeries::new(
                    [(xs.start, y), (xs.end, y)],
                    color.stroke_width(2),
                ))
                .map_err(plot_error)?
                .label(format!("{mode} {y:.1}"))
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color));
        }
    }
    for r in rows.iter().filter(|r| r.adaptive) {
        let (y, k) = (r.median_tokens_per_s, r.mean_period.unwrap_or(0.0));
        let dashes = dashed(xs.clone(), y);
        chart
            .draw_series(
                dashes
                    .into_iter()
                    .map(|d| PathElement::new(d, SIRIUS.stroke_width(2))),
            )
            .map_err(plot_error)?
            .label(format!("sirius auto {y:.1} (mean K {k:.1})"))
            .legend(|(x, y)| PathElement::new([(x, y), (x + 8, y)], SIRIUS.stroke_width(2)));
    }
    let points = sirius_points(rows, |r| r.median_tokens_per_s);
    chart
        .draw_series(LineSeries::new(points.clone(), SIRIUS.stroke_width(3)))
        .map_err(plot_error)?
        .label("sirius")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], SIRIUS));
    chart
        .draw_series(PointSeries::of_element(points, 5, SIRIUS, &|c, s, st| {
            Circle::new(c, s, st.filled())
        }))
        .map_err(plot_error)?;
    // The spread of the rounds.
    let spread = fixed_rows(rows)
        .map(|(x, r)| PathElement::new([(x, r.min_tokens_per_s), (x, r.max_tokens_per_s)], SIRIUS));
    chart.draw_series(spread).map_err(plot_error)?;
    legend(&mut chart, SeriesLabelPosition::UpperRight)
}

fn acceptance_panel(area: &Area<'_>, rows: &[SweepRow]) -> Result<()> {
    let xs = k_range(rows);
    // Effective density passes 1 where drafts and verifications read more than plain steps.
    let highest = sirius_points(rows, |r| r.effective_density.max(1.0))
        .iter()
        .fold(1.0, |m: f64, p| m.max(p.1));
    let mut chart = ChartBuilder::on(area)
        .caption("acceptance and weights read", ("sans-serif", 15))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(xs.clone(), 0.0..highest * 1.4)
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .x_desc("window K")
        .x_labels(k_labels(&xs))
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_desc("fraction (1 = a full step)")
        .draw()
        .map_err(plot_error)?;
    let kept = |r: &SweepRow| r.aal.unwrap_or(0.0) / r.period.unwrap_or(1).max(1) as f64;
    let series = [
        (
            "AAL / K (share of a window kept)",
            SIRIUS,
            sirius_points(rows, kept),
        ),
        (
            "effective density (weights read per token)",
            SPARSE,
            sirius_points(rows, |r| r.effective_density),
        ),
    ];
    for (label, color, points) in series {
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(3)))
            .map_err(plot_error)?
            .label(label)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color));
        chart
            .draw_series(PointSeries::of_element(points, 5, color, &|c, s, st| {
                Circle::new(c, s, st.filled())
            }))
            .map_err(plot_error)?;
    }
    // Adaptive windows have no one K: hollow marks at their mean K, for AAL / mean K and
    // the effective density.
    for (k, r) in adaptive_rows(rows) {
        let kept = r.aal.unwrap_or(0.0) / k.max(1.0);
        chart
            .draw_series(
                [(kept, SIRIUS), (r.effective_density, SPARSE)]
                    .map(|(y, color)| Circle::new((k, y), 7, color.stroke_width(2))),
            )
            .map_err(plot_error)?
            .label(format!("auto, at its mean K {k:.1} (hollow)"))
            .legend(|(x, y)| Circle::new((x + 10, y), 5, SIRIUS.stroke_width(2)));
    }
    legend(&mut chart, SeriesLabelPosition::UpperRight)
}

/// One layer of the stacked bars: its label, colour and value per row.
type StackPart = (&'static str, RGBColor, fn(&SweepRow) -> f64);

fn breakdown_panel(area: &Area<'_>, rows: &[SweepRow]) -> Result<()> {
    let total = |r: &SweepRow| r.draft_ms_per_token + r.verify_ms_per_token + r.other_ms_per_token;
    let top = rows.iter().map(total).fold(0.0, f64::max) * 1.4;
    let labels: Vec<String> = rows
        .iter()
        .map(|r| match (r.period, r.adaptive) {
            (Some(_), true) => "auto".to_string(),
            (Some(k), false) => format!("K={k}"),
            (None, _) => r.mode.to_string(),
        })
        .collect();
    let n = rows.len();
    let mut chart = ChartBuilder::on(area)
        .caption("milliseconds per token", ("sans-serif", 15))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(-0.5..n as f64 - 0.5, 0.0..top.max(1e-3))
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .x_labels(n.max(2))
        .x_label_formatter(&|x| {
            let i = x.round();
            match (i - x).abs() < 1e-6 && i >= 0.0 {
                true => labels.get(i as usize).cloned().unwrap_or_default(),
                false => String::new(),
            }
        })
        .y_desc("ms / token")
        .disable_x_mesh()
        .draw()
        .map_err(plot_error)?;
    let parts: [StackPart; 3] = [
        ("draft", DRAFT, |r| r.draft_ms_per_token),
        ("verify", VERIFY, |r| r.verify_ms_per_token),
        ("other (plain steps: all)", OTHER, |r| r.other_ms_per_token),
    ];
    let mut base = vec![0.0; n];
    for (label, color, part) in parts {
        let bars: Vec<Rectangle<(f64, f64)>> = rows
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let (x, y0) = (i as f64, base[i]);
                base[i] += part(r);
                Rectangle::new([(x - 0.35, y0), (x + 0.35, base[i])], color.filled())
            })
            .collect();
        chart
            .draw_series(bars)
            .map_err(plot_error)?
            .label(label)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 15, y + 5)], color.filled()));
    }
    legend(&mut chart, SeriesLabelPosition::UpperLeft)
}

/// Dashes of a flat line at `y` across `xs` (20 dashes, gaps between).
fn dashed(xs: std::ops::Range<f64>, y: f64) -> Vec<[(f64, f64); 2]> {
    let step = (xs.end - xs.start) / 40.0;
    (0..20)
        .map(|i| {
            let x = xs.start + 2.0 * i as f64 * step;
            [(x, y), (x + step, y)]
        })
        .collect()
}

type Chart<'a, 'b> = ChartContext<'a, SVGBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

fn legend<'b>(chart: &mut Chart<'b, 'b>, at: SeriesLabelPosition) -> Result<()> {
    chart
        .configure_series_labels()
        .position(at)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(plot_error)
}
