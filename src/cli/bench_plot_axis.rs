//! The first two panels of `bench --sirius --plot` when the sweep is over --threads, --keep or
//! --resident-mem (`--gpu-mem`) instead of the window: one line per mode (the full model, the
//! sparse model, Sirius at each window) against the swept option.
//! 1. Decode tokens/s (bars: min-max over the rounds; offloaded rows: the planner's predicted
//!    tokens/s as hollow marks).
//! 2. Sirius's AAL / K (solid) and the effective density of every mode (dashed): what the
//!    drafts kept and what a token read, as fractions of a window and of the weights.

use plotters::prelude::*;

use crate::cli::bench_plot::{
    legend, panel, plot_error, Area, PlotAxis, FULL, SIRIUS, SPARSE, SPEED_CAPTION,
};
use crate::cli::bench_report::mode_label;
use crate::engine::bench_sirius::SweepRow;
use crate::error::Result;
use crate::units::format_bytes;

/// Colours of the Sirius lines, one per window, in row order.
const WINDOWS: [RGBColor; 5] = [
    SIRIUS,
    RGBColor(140, 60, 170),
    RGBColor(20, 150, 130),
    RGBColor(200, 40, 60),
    RGBColor(100, 140, 30),
];

impl PlotAxis {
    /// The row's value of the swept option, short (under its bar).
    pub fn short(self, r: &SweepRow) -> String {
        match self {
            PlotAxis::Threads => format!("{}t", r.point.threads),
            PlotAxis::Keep => r.point.keep.to_string(),
            PlotAxis::Budget => r.point.budget_bytes.map_or("-".into(), format_bytes),
            PlotAxis::Period => String::new(),
        }
    }
}

/// The x axis of a sweep: what it shows and, for budgets, its unit (GiB from 2 GiB on).
#[derive(Debug, Clone, Copy)]
struct Scale {
    axis: PlotAxis,
    budget_unit: (f64, &'static str),
}

impl Scale {
    fn new(axis: PlotAxis, rows: &[SweepRow]) -> Scale {
        let largest = rows
            .iter()
            .filter_map(|r| r.point.budget_bytes)
            .max()
            .unwrap_or(0);
        let budget_unit = match largest >= 2 << 30 {
            true => ((1u64 << 30) as f64, "GiB"),
            false => ((1u64 << 20) as f64, "MiB"),
        };
        Scale { axis, budget_unit }
    }

    /// A row's position on the axis.
    fn x(self, r: &SweepRow) -> f64 {
        match self.axis {
            PlotAxis::Threads => r.point.threads as f64,
            PlotAxis::Keep => f64::from(r.point.keep),
            PlotAxis::Budget => r.point.budget_bytes.unwrap_or(0) as f64 / self.budget_unit.0,
            PlotAxis::Period => r.period.unwrap_or(1) as f64,
        }
    }

    fn description(self) -> String {
        match self.axis {
            PlotAxis::Threads => "compute threads".into(),
            PlotAxis::Keep => "keep (fraction of FFN neurons)".into(),
            PlotAxis::Budget => format!("memory budget ({})", self.budget_unit.1),
            PlotAxis::Period => "window K".into(),
        }
    }
}

/// One line: a mode (and window) across the sweep's points, in x order.
struct Line<'a> {
    label: String,
    color: RGBColor,
    rows: Vec<(f64, &'a SweepRow)>,
}

/// The rows grouped by mode label (`full`, `sparse`, `sirius K=4`), first-seen order.
fn lines(rows: &[SweepRow], axis: Scale) -> Vec<Line<'_>> {
    let mut lines: Vec<Line<'_>> = Vec::new();
    let mut windows = 0;
    for r in rows {
        let label = mode_label(r);
        match lines.iter_mut().find(|l| l.label == label) {
            Some(line) => line.rows.push((axis.x(r), r)),
            None => {
                let color = match r.mode {
                    "full" => FULL,
                    "sparse" => SPARSE,
                    _ => {
                        windows += 1;
                        WINDOWS[(windows - 1) % WINDOWS.len()]
                    }
                };
                lines.push(Line {
                    label,
                    color,
                    rows: vec![(axis.x(r), r)],
                });
            }
        }
    }
    for line in &mut lines {
        line.rows.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    lines
}

/// The swept values with a tenth of the span of room either side.
fn x_range(rows: &[SweepRow], axis: Scale) -> std::ops::Range<f64> {
    let xs = rows.iter().map(|r| axis.x(r));
    let lo = xs.clone().fold(f64::INFINITY, f64::min);
    let hi = xs.fold(f64::NEG_INFINITY, f64::max);
    if !lo.is_finite() {
        return 0.0..1.0;
    }
    let pad = ((hi - lo) * 0.1).max(match axis.axis {
        PlotAxis::Keep => 0.02,
        _ => 0.5,
    });
    (lo - pad).max(0.0)..hi + pad
}

/// Draws the speed and the acceptance panels against `axis` into `speed` and `acceptance`.
pub fn plot_against(
    speed: &Area<'_>,
    acceptance: &Area<'_>,
    rows: &[SweepRow],
    axis: PlotAxis,
) -> Result<()> {
    let axis = Scale::new(axis, rows);
    let lines = lines(rows, axis);
    speed_panel(speed, &lines, rows, axis)?;
    acceptance_panel(acceptance, &lines, rows, axis)
}

fn x_format(axis: Scale) -> impl Fn(&f64) -> String {
    move |x| match axis.axis {
        PlotAxis::Keep => format!("{x:.2}"),
        PlotAxis::Budget if axis.budget_unit.1 == "GiB" => format!("{x:.1}"),
        // Thread counts are whole: no label between them (it would repeat a rounded one).
        PlotAxis::Threads if (x - x.round()).abs() > 1e-6 => String::new(),
        _ => format!("{x:.0}"),
    }
}

fn speed_panel(area: &Area<'_>, lines: &[Line<'_>], rows: &[SweepRow], axis: Scale) -> Result<()> {
    let xs = x_range(rows, axis);
    // Headroom above the fastest row for the legend.
    let top = rows.iter().map(|r| r.max_tokens_per_s).fold(0.0, f64::max) * 1.5;
    let mut chart = panel(area, SPEED_CAPTION, 40, xs, 0.0..top.max(1e-3))?;
    chart
        .configure_mesh()
        .x_desc(axis.description())
        .x_label_formatter(&x_format(axis))
        .y_desc("tokens/s")
        .draw()
        .map_err(plot_error)?;
    for line in lines {
        let color = line.color;
        let points: Vec<(f64, f64)> = line
            .rows
            .iter()
            .map(|(x, r)| (*x, r.median_tokens_per_s))
            .collect();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(3)))
            .map_err(plot_error)?
            .label(line.label.clone())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(3)));
        chart
            .draw_series(PointSeries::of_element(points, 5, color, &|c, s, st| {
                Circle::new(c, s, st.filled())
            }))
            .map_err(plot_error)?;
        // Offloaded rows: the planner's prediction as a hollow mark of the line's colour.
        let predicted = line.rows.iter().filter_map(|(x, r)| {
            let ms = r.predicted_ms_per_token.filter(|ms| *ms > 0.0)?;
            Some(Circle::new((*x, 1e3 / ms), 7, color.stroke_width(2)))
        });
        chart.draw_series(predicted).map_err(plot_error)?;
        let spread = line.rows.iter().map(|(x, r)| {
            PathElement::new([(*x, r.min_tokens_per_s), (*x, r.max_tokens_per_s)], color)
        });
        chart.draw_series(spread).map_err(plot_error)?;
    }
    if rows.iter().any(|r| r.predicted_ms_per_token.is_some()) {
        chart
            .draw_series(std::iter::empty::<Circle<(f64, f64), i32>>())
            .map_err(plot_error)?
            .label("hollow: the planner's prediction")
            .legend(|(x, y)| Circle::new((x + 10, y), 5, FULL.stroke_width(2)));
    }
    legend(&mut chart, SeriesLabelPosition::UpperRight)
}

fn acceptance_panel(
    area: &Area<'_>,
    lines: &[Line<'_>],
    rows: &[SweepRow],
    axis: Scale,
) -> Result<()> {
    let xs = x_range(rows, axis);
    // Effective density passes 1 where drafts and verifications read more than plain steps.
    let highest = rows.iter().map(|r| r.effective_density).fold(1.0, f64::max);
    let caption = "AAL / K (solid), effective density (dashed)";
    let mut chart = panel(area, caption, 40, xs, 0.0..highest * 1.5)?;
    chart
        .configure_mesh()
        .x_desc(axis.description())
        .x_label_formatter(&x_format(axis))
        .y_desc("fraction (1 = a full step)")
        .draw()
        .map_err(plot_error)?;
    for line in lines
        .iter()
        .filter(|l| l.rows.iter().any(|(_, r)| r.mode != "full"))
    {
        let color = line.color;
        let density: Vec<(f64, f64)> = line
            .rows
            .iter()
            .map(|(x, r)| (*x, r.effective_density))
            .collect();
        chart
            .draw_series(DashedLineSeries::new(density, 8, 5, color.stroke_width(2)))
            .map_err(plot_error)?;
        // AAL / K: the share of each window the drafts kept (Sirius only; adaptive windows
        // out of their mean K).
        let kept: Vec<(f64, f64)> = line
            .rows
            .iter()
            .filter_map(|(x, r)| {
                let k = r
                    .mean_period
                    .filter(|_| r.adaptive)
                    .or(r.period.map(|k| k as f64))?;
                Some((*x, r.aal? / k.max(1.0)))
            })
            .collect();
        let series = chart
            .draw_series(LineSeries::new(kept.clone(), color.stroke_width(3)))
            .map_err(plot_error)?;
        series
            .label(line.label.clone())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(3)));
        chart
            .draw_series(PointSeries::of_element(kept, 5, color, &|c, s, st| {
                Circle::new(c, s, st.filled())
            }))
            .map_err(plot_error)?;
    }
    legend(&mut chart, SeriesLabelPosition::UpperRight)
}
