//! The SVG of `bench --sirius --plot`: three panels a reader takes in at a glance. Against
//! the window K here (a sweep of --keep, --threads or --resident-mem: `bench_plot_axis`):
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
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::cli::bench_plot_axis::plot_against;
use crate::cli::bench_report::SweepReport;
use crate::engine::bench_sirius::SweepRow;
use crate::error::{Error, Result};

pub(crate) const FULL: RGBColor = RGBColor(90, 90, 90);
pub(crate) const SPARSE: RGBColor = RGBColor(230, 140, 20);
pub(crate) const SIRIUS: RGBColor = RGBColor(30, 100, 200);
const DRAFT: RGBColor = RGBColor(120, 170, 230);
const VERIFY: RGBColor = RGBColor(30, 100, 200);
const OTHER: RGBColor = RGBColor(190, 190, 190);

/// What the plot's x axis shows: the window K, or the one other option swept as a list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlotAxis {
    Period,
    Threads,
    Keep,
    Budget,
}

impl PlotAxis {
    /// The axis of a sweep with these many thread counts, keeps and budgets: the one given
    /// as a list, else the window; two lists are refused (one plot, one x axis).
    pub fn choose(threads: usize, keeps: usize, budgets: usize) -> Result<PlotAxis> {
        let lists: Vec<(&str, PlotAxis)> = [
            (threads, "--threads", PlotAxis::Threads),
            (keeps, "--keep", PlotAxis::Keep),
            (budgets, "--resident-mem/--gpu-mem", PlotAxis::Budget),
        ]
        .into_iter()
        .filter(|(n, _, _)| *n > 1)
        .map(|(_, option, axis)| (option, axis))
        .collect();
        match lists[..] {
            [] => Ok(PlotAxis::Period),
            [(_, axis)] => Ok(axis),
            _ => Err(Error::InvalidArgument(format!(
                "--plot draws one swept option besides --period, got lists for {}: sweep one \
                 of them, or drop --plot (the table and --csv hold any sweep)",
                lists.iter().map(|l| l.0).collect::<Vec<_>>().join(" and ")
            ))),
        }
    }
}

pub(crate) fn plot_error(e: impl std::fmt::Display) -> Error {
    Error::InvalidArgument(format!("drawing the --plot SVG failed: {e}"))
}

/// The SVG text of `r`'s plot against `axis`.
pub fn plot(r: &SweepReport, axis: PlotAxis) -> Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (1500, 500)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        // A model path is named by its file (the table and CSV keep the whole path).
        let model = std::path::Path::new(&r.model)
            .file_name()
            .map_or(r.model.clone(), |f| f.to_string_lossy().into_owned());
        // Two lines: what ran where, then the settings every row shares.
        let title = format!(
            "Sirius on {model} ({}), {}, commit {}",
            r.dtype, r.backend, r.commit
        );
        let root = (root.titled(&title, ("sans-serif", 18)))
            .and_then(|area| area.titled(&r.fixed_settings(), ("sans-serif", 14)))
            .map_err(plot_error)?;
        let panels = root.split_evenly((1, 3));
        let labels: Vec<String> = match axis {
            PlotAxis::Period => {
                speed_panel(&panels[0], &r.rows)?;
                acceptance_panel(&panels[1], &r.rows)?;
                r.rows.iter().map(window_label).collect()
            }
            _ => {
                plot_against(&panels[0], &panels[1], &r.rows, axis)?;
                r.rows
                    .iter()
                    .map(|row| format!("{} {}", axis.short(row), window_label(row)))
                    .collect()
            }
        };
        breakdown_panel(&panels[2], &r.rows, &labels)?;
        root.present().map_err(plot_error)?;
    }
    Ok(svg)
}

/// A row's short name under its bar: its window, or its mode.
fn window_label(r: &SweepRow) -> String {
    match (r.period, r.adaptive) {
        (Some(_), true) => "auto".to_string(),
        (Some(k), false) => format!("K={k}"),
        (None, _) => r.mode.to_string(),
    }
}

pub(crate) type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

/// The caption of the tokens/s panels.
pub(crate) const SPEED_CAPTION: &str = "decode tokens/s (median; bars: min-max)";

/// One panel's chart on `area`: its caption, room for the x labels (`label_height` pixels)
/// and its ranges.
pub(crate) fn panel<'a, 'b>(
    area: &'a Area<'b>,
    caption: &str,
    label_height: u32,
    xs: std::ops::Range<f64>,
    ys: std::ops::Range<f64>,
) -> Result<Chart<'a, 'b>> {
    ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 15))
        .margin(12)
        .x_label_area_size(label_height)
        .y_label_area_size(50)
        .build_cartesian_2d(xs, ys)
        .map_err(plot_error)
}

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
    let mut chart = panel(area, SPEED_CAPTION, 40, xs.clone(), 0.0..top.max(1e-3))?;
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
    let caption = "acceptance and weights read";
    let mut chart = panel(area, caption, 40, xs.clone(), 0.0..highest * 1.4)?;
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

/// Stacked bars of a token's time, one per row, labelled `labels`.
fn breakdown_panel(area: &Area<'_>, rows: &[SweepRow], labels: &[String]) -> Result<()> {
    let total = |r: &SweepRow| r.draft_ms_per_token + r.verify_ms_per_token + r.other_ms_per_token;
    let top = rows.iter().map(total).fold(0.0, f64::max) * 1.4;
    let n = rows.len();
    // Many bars: labels turned upright (drawn below, anchored at their start: the mesh
    // centres a label on its tick, which would put half of an upright one in the chart).
    let upright = n > 6;
    let longest = labels.iter().map(|l| l.chars().count()).max().unwrap_or(0) as u32;
    let label_height = if upright { 12 + 7 * longest } else { 40 };
    let xs = -0.5..n as f64 - 0.5;
    let mut chart = panel(
        area,
        "milliseconds per token",
        label_height,
        xs,
        0.0..top.max(1e-3),
    )?;
    chart
        .configure_mesh()
        .x_labels(n.max(2))
        .x_label_formatter(&|x| {
            let i = x.round();
            match (i - x).abs() < 1e-6 && i >= 0.0 && !upright {
                true => labels.get(i as usize).cloned().unwrap_or_default(),
                false => String::new(),
            }
        })
        .y_desc("ms / token")
        .disable_x_mesh()
        .draw()
        .map_err(plot_error)?;
    if upright {
        let style = TextStyle::from(
            ("sans-serif", 12)
                .into_font()
                .transform(FontTransform::Rotate90),
        )
        .pos(Pos::new(HPos::Left, VPos::Center));
        let (left, top) = area.get_base_pixel();
        for (i, label) in labels.iter().enumerate() {
            let (x, y) = chart.backend_coord(&(i as f64, 0.0));
            area.draw(&Text::new(
                label.clone(),
                (x - left, y - top + 9),
                style.clone(),
            ))
            .map_err(plot_error)?;
        }
    }
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

pub(crate) type Chart<'a, 'b> =
    ChartContext<'a, SVGBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

pub(crate) fn legend<'a, 'b: 'a>(chart: &mut Chart<'a, 'b>, at: SeriesLabelPosition) -> Result<()> {
    chart
        .configure_series_labels()
        .position(at)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(plot_error)
}
