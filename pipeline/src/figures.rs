//! Figures: grids of scatter and line panels drawn with plotters as SVG, and
//! the same SVG rendered to PNG with resvg.
//!
//! Text is measured (plotters, through ab_glyph) and drawn (resvg) with the
//! DejaVu Sans font compiled into the binary, so figures look the same on
//! every machine and need no system fonts or fontconfig. A panel with
//! nothing to draw says why in its middle instead of being left blank.

use std::ops::Range;
use std::sync::Once;

use plotters::coord::ranged1d::{KeyPointHint, NoDefaultFormatting, Ranged, ValueFormatter};
use plotters::prelude::*;

use crate::error::{Error, Result};

/// DejaVu Sans (Bitstream Vera licence, `data/fonts/LICENSE.txt`).
pub const FONT: &[u8] = include_bytes!("../../data/fonts/DejaVuSans.ttf");
const FONT_FAMILY: &str = "sans-serif";

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if plotters::style::register_font(FONT_FAMILY, FontStyle::Normal, FONT).is_err() {
            tracing::warn!("the bundled font could not be read; figure text will be missing");
        }
    });
}

/// Point markers, cycled through by group: six shapes, so the paper's five
/// depths (1, 2, 4, 8, 12) each get their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Marker {
    Circle,
    Triangle,
    Square,
    Cross,
    Diamond,
    Ring,
}

impl Marker {
    const ALL: [Marker; 6] = [
        Marker::Circle,
        Marker::Triangle,
        Marker::Square,
        Marker::Cross,
        Marker::Diamond,
        Marker::Ring,
    ];

    pub fn nth(i: usize) -> Marker {
        Self::ALL[i % Self::ALL.len()]
    }
}

/// Expand `$apply!(make)` with `make` a closure `|at, colour| element`
/// drawing `$marker`: the shapes' element types differ, so each arm pastes
/// its own closure into the caller's macro.
macro_rules! each_marker {
    ($marker:expr, $apply:ident) => {
        match $marker {
            Marker::Circle => $apply!(|at, c: RGBColor| Circle::new(at, 4, c.filled())),
            Marker::Triangle => $apply!(|at, c: RGBColor| TriangleMarker::new(at, 5, c.filled())),
            Marker::Square => {
                $apply!(
                    |at, c: RGBColor| EmptyElement::at(at) + Rectangle::new([(-4, -4), (4, 4)], c.filled())
                )
            }
            Marker::Cross => $apply!(|at, c: RGBColor| Cross::new(at, 4, c.stroke_width(2))),
            Marker::Diamond => $apply!(|at, c: RGBColor| EmptyElement::at(at)
                + Polygon::new(vec![(0, -6), (5, 0), (0, 6), (-5, 0)], c.filled())),
            Marker::Ring => $apply!(|at, c: RGBColor| Circle::new(at, 4, c.stroke_width(2))),
        }
    };
}

/// A qualitative palette (Tableau 10), cycled through by group.
pub fn colour(i: usize) -> RGBColor {
    const P: [(u8, u8, u8); 10] = [
        (31, 119, 180),
        (255, 127, 14),
        (44, 160, 44),
        (214, 39, 40),
        (148, 103, 189),
        (140, 86, 75),
        (227, 119, 194),
        (127, 127, 127),
        (188, 189, 34),
        (23, 190, 207),
    ];
    let (r, g, b) = P[i % P.len()];
    RGBColor(r, g, b)
}

/// One set of points of a panel.
#[derive(Debug, Clone)]
pub struct Series {
    pub label: String,
    pub colour: usize,
    pub marker: Marker,
    pub points: Vec<(f64, f64)>,
    /// Join the points (in x order) with a line.
    pub line: bool,
    /// One value per point, drawn in the colour the panel's
    /// [`ColourScale`] gives it (empty: every point in the series' colour).
    pub values: Vec<f64>,
}

/// A continuous, colour-blind-safe colour scale (viridis) over [lo, hi],
/// logarithmic or linear, shown as a colour bar beside the figure.
#[derive(Debug, Clone, PartialEq)]
pub struct ColourScale {
    pub label: String,
    pub lo: f64,
    pub hi: f64,
    pub log: bool,
}

impl ColourScale {
    /// The scale's position of `v`, 0 at lo and 1 at hi (clamped).
    fn position(&self, v: f64) -> f64 {
        let t = |x: f64| if self.log { x.log10() } else { x };
        let (a, b) = (t(self.lo), t(self.hi));
        if b > a {
            ((t(v) - a) / (b - a)).clamp(0.0, 1.0)
        } else {
            0.5
        }
    }

    /// The colour of `v`.
    pub fn colour(&self, v: f64) -> RGBColor {
        viridis(self.position(v))
    }
}

/// Viridis (van der Walt & Smith, matplotlib's default map) at t in [0, 1],
/// interpolated between nine of its colours.
pub fn viridis(t: f64) -> RGBColor {
    const STOPS: [(u8, u8, u8); 9] = [
        (68, 1, 84),
        (72, 36, 117),
        (59, 82, 139),
        (44, 114, 142),
        (33, 145, 140),
        (39, 173, 129),
        (92, 200, 99),
        (170, 220, 50),
        (253, 231, 37),
    ];
    let x = t.clamp(0.0, 1.0) * (STOPS.len() - 1) as f64;
    let i = (x.floor() as usize).min(STOPS.len() - 2);
    let f = x - i as f64;
    let mix = |a: u8, b: u8| (f64::from(a) + (f64::from(b) - f64::from(a)) * f).round() as u8;
    let (a, b) = (STOPS[i], STOPS[i + 1]);
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

/// One chart of a figure.
#[derive(Debug, Clone, Default)]
pub struct Panel {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    /// Plot x on a log10 axis.
    pub log_x: bool,
    /// Plot an axis on a log10 scale when its values are all positive and
    /// span more than two decades ([`spans_decades`]).
    pub auto_log: bool,
    pub series: Vec<Series>,
    /// A least-squares line y = slope * x + intercept to draw.
    pub fit: Option<(f64, f64)>,
    /// Why the panel is empty or partial, shown on it.
    pub note: Option<String>,
    /// The scale of the series' per-point values; the figure shows its bar.
    pub colour_scale: Option<ColourScale>,
}

impl Panel {
    fn finite_points(&self) -> Vec<(f64, f64)> {
        self.series
            .iter()
            .flat_map(|s| s.points.iter().copied())
            .filter(|(x, y)| x.is_finite() && y.is_finite() && (!self.log_x || *x > 0.0))
            .collect()
    }

    /// Whether each axis is drawn on a log scale.
    fn log_axes(&self, pts: &[(f64, f64)]) -> (bool, bool) {
        (
            self.log_x || (self.auto_log && spans_decades(pts.iter().map(|p| p.0))),
            self.auto_log && spans_decades(pts.iter().map(|p| p.1)),
        )
    }
}

/// Values all positive whose largest is more than 100 times the smallest:
/// a linear axis would crowd all but the largest into one corner.
pub fn spans_decades(values: impl Iterator<Item = f64>) -> bool {
    let (mut lo, mut hi) = (f64::INFINITY, 0f64);
    for v in values {
        if v <= 0.0 {
            return false;
        }
        lo = lo.min(v);
        hi = hi.max(v);
    }
    hi > 100.0 * lo
}

fn draw_err<E: std::fmt::Debug>(what: &str) -> impl Fn(E) -> Error + '_ {
    move |e| Error::invalid(format!("drawing {what}: {e:?}"))
}

/// Padded data range of values.
fn range(v: impl Iterator<Item = f64>) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for x in v {
        lo = lo.min(x);
        hi = hi.max(x);
    }
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = if hi > lo {
        0.06 * (hi - lo)
    } else {
        0.5 * lo.abs().max(1e-3)
    };
    (lo - pad, hi + pad)
}

/// Pixels beside the panels for a figure's colour bar.
const COLOUR_BAR_WIDTH: u32 = 110;

/// The colour bar of `scale`: the gradient, high values at the top, with
/// its ends (and, on a log scale, the whole decades between) labelled.
fn draw_colour_bar(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    scale: &ColourScale,
) -> Result<()> {
    let (_, h) = area.dim_in_pixel();
    let (top, bottom) = (40i32, (h as i32 - 40).max(60));
    let (left, right) = (14i32, 34i32);
    let what = "colour bar";
    let style = TextStyle::from((FONT_FAMILY, 11).into_font()).color(&BLACK);
    area.draw_text(&scale.label, &style, (8, top - 24))
        .map_err(draw_err(what))?;
    let steps = 64;
    for k in 0..steps {
        let (y0, y1) = (
            bottom - (bottom - top) * (k + 1) / steps,
            bottom - (bottom - top) * k / steps,
        );
        let c = viridis((f64::from(k) + 0.5) / f64::from(steps));
        area.draw(&Rectangle::new([(left, y0), (right, y1)], c.filled()))
            .map_err(draw_err(what))?;
    }
    area.draw(&Rectangle::new(
        [(left, top), (right, bottom)],
        BLACK.stroke_width(1),
    ))
    .map_err(draw_err(what))?;
    let mut marks = vec![scale.lo, scale.hi];
    if scale.log && scale.lo > 0.0 {
        let (a, b) = (scale.lo.log10().ceil() as i32, scale.hi.log10().floor() as i32);
        marks.extend((a..=b).map(|e| 10f64.powi(e)));
    }
    marks.sort_by(f64::total_cmp);
    marks.dedup_by(|a, b| (*a - *b).abs() <= 1e-9 * b.abs());
    for v in marks {
        let y = bottom - ((bottom - top) as f64 * scale.position(v)).round() as i32;
        area.draw(&PathElement::new(vec![(right, y), (right + 4, y)], BLACK))
            .map_err(draw_err(what))?;
        let e = v.log10();
        let text = if scale.log && (e - e.round()).abs() < 1e-9 {
            log_label(e.round())
        } else {
            short(v)
        };
        area.draw_text(&text, &style, (right + 7, y - 6))
            .map_err(draw_err(what))?;
    }
    Ok(())
}

/// Legend entries one panel shows before the figure shows one legend
/// beside all panels instead: a longer legend would hide the data.
const PANEL_LEGEND_ROWS: usize = 6;

/// One entry of a figure-wide legend.
#[derive(Debug, Clone, PartialEq)]
struct LegendKey {
    label: String,
    colour: RGBColor,
    marker: Marker,
    line: bool,
}

/// The distinct legend entries of `panels`, in order of appearance.
fn legend_keys(panels: &[Panel]) -> Vec<LegendKey> {
    let mut keys: Vec<LegendKey> = Vec::new();
    for p in panels {
        for s in p.series.iter().filter(|s| !s.label.is_empty()) {
            if keys.iter().any(|k| k.label == s.label) {
                continue;
            }
            keys.push(LegendKey {
                label: s.label.clone(),
                colour: series_key_colour(p, s),
                marker: s.marker,
                line: s.line,
            });
        }
    }
    keys
}

/// The colour a series shows in a legend: its own, or grey when its points
/// are coloured by value on the panel's scale.
fn series_key_colour(p: &Panel, s: &Series) -> RGBColor {
    if s.values.is_empty() || p.colour_scale.is_none() {
        colour(s.colour)
    } else {
        RGBColor(110, 110, 110)
    }
}

/// Pixels between the rows of a figure-wide legend.
const KEY_ROW: u32 = 16;

/// Columns and the width in pixels of a figure-wide legend of `keys` in
/// `height` pixels.
fn side_legend_size(keys: &[LegendKey], height: u32) -> (usize, u32) {
    let per_column = (height.saturating_sub(40) / KEY_ROW).max(1) as usize;
    let columns = keys.len().div_ceil(per_column).max(1);
    let longest = keys.iter().map(|k| k.label.chars().count()).max().unwrap_or(0) as u32;
    (columns, columns as u32 * (longest * 13 / 2 + 40))
}

/// The figure-wide legend: `keys` in `columns` columns from the top.
fn draw_side_legend(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    keys: &[LegendKey],
    columns: usize,
) -> Result<()> {
    let what = "legend";
    let (w, _) = area.dim_in_pixel();
    let per_column = keys.len().div_ceil(columns.max(1)).max(1);
    let column_w = (w / columns.max(1) as u32) as i32;
    let style = TextStyle::from((FONT_FAMILY, 11).into_font()).color(&BLACK);
    for (i, key) in keys.iter().enumerate() {
        let x = 10 + column_w * (i / per_column) as i32;
        let y = 40 + (KEY_ROW as usize * (i % per_column)) as i32;
        if key.line {
            area.draw(&PathElement::new(
                vec![(x - 6, y), (x + 14, y)],
                key.colour.stroke_width(2),
            ))
            .map_err(draw_err(what))?;
        }
        macro_rules! key_marker {
            ($make:expr) => {
                area.draw(&$make((x + 4, y), key.colour))
                    .map_err(draw_err(what))?
            };
        }
        each_marker!(key.marker, key_marker);
        area.draw_text(&key.label, &style, (x + 20, y - 6))
            .map_err(draw_err(what))?;
    }
    Ok(())
}

/// A figure of `panels` in a grid of `cols` columns, each panel
/// `panel_w` x `panel_h` pixels, as SVG text. Beside the panels: the colour
/// bar of their scale, if any, and, when a panel's legend would have more
/// than `PANEL_LEGEND_ROWS` entries, one legend for all of them.
pub fn grid_svg(title: &str, panels: &[Panel], cols: usize, panel_w: u32, panel_h: u32) -> Result<String> {
    register_font();
    let cols = cols.max(1).min(panels.len().max(1));
    let rows = panels.len().div_ceil(cols).max(1);
    let header = if title.is_empty() { 0 } else { 40 };
    let scale = panels.iter().find_map(|p| p.colour_scale.as_ref());
    let bar = if scale.is_some() { COLOUR_BAR_WIDTH } else { 0 };
    let keys = legend_keys(panels);
    let side = panels
        .iter()
        .any(|p| p.series.iter().filter(|s| !s.label.is_empty()).count() > PANEL_LEGEND_ROWS);
    let (key_columns, key_w) = if side {
        side_legend_size(&keys, panel_h * rows as u32)
    } else {
        (0, 0)
    };
    let grid_w = panel_w * cols as u32;
    let size = (grid_w + bar + key_w, panel_h * rows as u32 + header);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err(title))?;
        let body = if header > 0 {
            let (top, body) = root.split_vertically(header);
            top.titled(title, (FONT_FAMILY, 22)).map_err(draw_err(title))?;
            body
        } else {
            root.clone()
        };
        let (body, beside) = body.split_horizontally(grid_w);
        let (bar_area, key_area) = beside.split_horizontally(bar);
        if let Some(scale) = scale {
            draw_colour_bar(&bar_area, scale)?;
        }
        if side {
            draw_side_legend(&key_area, &keys, key_columns)?;
        }
        let areas = body.split_evenly((rows, cols));
        for (panel, area) in panels.iter().zip(areas.iter()) {
            draw_panel(area, panel, !side)?;
        }
        root.present().map_err(draw_err(title))?;
    }
    Ok(svg)
}

/// Draw panel `p` on `area`, with its legend inside unless the figure
/// shows one legend beside all panels.
fn draw_panel(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    p: &Panel,
    legend_inside: bool,
) -> Result<()> {
    let pts = p.finite_points();
    let (log_x, log_y) = p.log_axes(&pts);
    let tx = |x: f64| if log_x { x.log10() } else { x };
    let ty = |y: f64| if log_y { y.log10() } else { y };
    let what = p.title.as_str();
    if pts.is_empty() {
        // Nothing to plot: the title and why, no empty axes.
        let (w, h) = area.dim_in_pixel();
        let title = TextStyle::from((FONT_FAMILY, 14).into_font()).color(&BLACK);
        area.draw_text(&p.title, &title, (w as i32 / 2 - 4 * p.title.len() as i32, 12))
            .map_err(draw_err(what))?;
        area.draw(&Rectangle::new(
            [(8, 32), (w as i32 - 8, h as i32 - 8)],
            RGBColor(200, 200, 200).stroke_width(1),
        ))
        .map_err(draw_err(what))?;
        let note = p.note.as_deref().unwrap_or("no values to plot");
        let style = TextStyle::from((FONT_FAMILY, 12).into_font()).color(&RGBColor(150, 30, 30));
        for (i, line) in wrap(note, (w as usize / 8).max(20)).iter().enumerate() {
            area.draw_text(line, &style, (24, h as i32 / 2 - 10 + 16 * i as i32))
                .map_err(draw_err(what))?;
        }
        return Ok(());
    }
    let (x0, x1) = range(pts.iter().map(|(x, _)| tx(*x)));
    let (y0, mut y1) = range(pts.iter().map(|(_, y)| ty(*y)));
    let legend = if legend_inside {
        let plotted: Vec<(f64, f64)> = pts
            .iter()
            .map(|&(x, y)| ((tx(x) - x0) / (x1 - x0), (ty(y) - y0) / (y1 - y0)))
            .collect();
        let (w, h) = area.dim_in_pixel();
        legend_place(p, &plotted, (w, h))
    } else {
        None
    };
    if let Some((_, headroom)) = legend {
        // Every corner covers a point: the y axis grows so that the legend
        // sits above the data.
        y1 = y0 + (y1 - y0) / (1.0 - headroom);
    }
    let axis = |lo: f64, hi: f64, log: bool| -> (Vec<f64>, Vec<String>) {
        if log {
            // Ticks at round exponents, labelled with the values.
            let (t, _) = ticks(lo, hi, 4);
            let labels = t.iter().map(|&e| log_label(e)).collect();
            (t, labels)
        } else {
            let (t, step) = ticks(lo, hi, 6);
            let labels = tick_labels(&t, step);
            (t, labels)
        }
    };
    let (x_ticks, x_labels) = axis(x0, x1, log_x);
    let (y_ticks, y_labels) = axis(y0, y1, log_y);
    let described = |label: &str, log: bool| {
        if log && !label.contains("(log") {
            format!("{label} (log scale)")
        } else {
            label.to_string()
        }
    };
    let (x_desc, y_desc) = (described(&p.x_label, log_x), described(&p.y_label, log_y));
    // Room for the longest label (about 6.5 px a character at 11 px).
    let widest = y_labels.iter().map(|l| l.chars().count()).max().unwrap_or(0) as u32;
    let mut chart = ChartBuilder::on(area)
        .caption(&p.title, (FONT_FAMILY, 14))
        .margin(8)
        .x_label_area_size(34)
        .y_label_area_size((widest * 13 / 2 + 22).max(56))
        .build_cartesian_2d(
            TickedAxis {
                range: x0..x1,
                ticks: x_ticks,
                labels: x_labels,
            },
            TickedAxis {
                range: y0..y1,
                ticks: y_ticks,
                labels: y_labels,
            },
        )
        .map_err(draw_err(what))?;
    chart
        .configure_mesh()
        .x_desc(&x_desc)
        .y_desc(&y_desc)
        .label_style((FONT_FAMILY, 11))
        .axis_desc_style((FONT_FAMILY, 12))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(draw_err(what))?;
    for s in &p.series {
        let c = colour(s.colour);
        // Each point with its colour: the series', or its value's on the scale.
        let mut points: Vec<((f64, f64), RGBColor)> = s
            .points
            .iter()
            .enumerate()
            .filter(|(_, (x, y))| {
                x.is_finite() && y.is_finite() && (!log_x || *x > 0.0) && (!log_y || *y > 0.0)
            })
            .map(|(i, &(x, y))| {
                let pc = match (&p.colour_scale, s.values.get(i)) {
                    (Some(scale), Some(&v)) if v.is_finite() => scale.colour(v),
                    _ => c,
                };
                ((tx(x), ty(y)), pc)
            })
            .collect();
        if points.is_empty() {
            continue;
        }
        if s.line {
            points.sort_by(|a, b| a.0.0.total_cmp(&b.0.0));
            chart
                .draw_series(LineSeries::new(points.iter().map(|p| p.0), c.stroke_width(2)))
                .map_err(draw_err(what))?;
        }
        let label = (!s.label.is_empty()).then(|| s.label.clone());
        let key = series_key_colour(p, s);
        macro_rules! markers {
            ($make:expr) => {{
                let drawn = chart
                    .draw_series(points.iter().map(|&(at, pc)| $make(at, pc)))
                    .map_err(draw_err(what))?;
                if let Some(l) = label {
                    drawn.label(l).legend(move |(x, y)| $make((x, y), key));
                }
            }};
        }
        each_marker!(s.marker, markers);
    }
    if let Some((slope, intercept)) = p.fit {
        let line = if log_x || log_y {
            // A straight line in the data is a curve on a log axis: drawn
            // through 96 points, those inside the panel.
            let curve: Vec<(f64, f64)> = (0..96)
                .map(|i| {
                    let u = x0 + (x1 - x0) * i as f64 / 95.0;
                    let x = if log_x { 10f64.powf(u) } else { u };
                    let y = slope * x + intercept;
                    (
                        u,
                        if log_y && y > 0.0 {
                            y.log10()
                        } else if log_y {
                            f64::NAN
                        } else {
                            y
                        },
                    )
                })
                .filter(|(_, v)| v.is_finite() && (y0..=y1).contains(v))
                .collect();
            (curve.len() > 1).then_some(curve)
        } else {
            clip_line(slope, intercept, (x0, x1), (y0, y1))
        };
        if let Some(line) = line {
            chart
                .draw_series(LineSeries::new(line, BLACK.mix(0.6).stroke_width(1)))
                .map_err(draw_err(what))?;
        }
    }
    if let Some((corner, _)) = legend {
        chart
            .configure_series_labels()
            .label_font((FONT_FAMILY, 10))
            .background_style(WHITE.mix(0.8))
            .border_style(RGBColor(200, 200, 200))
            .position(corner)
            .draw()
            .map_err(draw_err(what))?;
    }
    if let Some(note) = &p.note {
        // A partial panel: the note goes under the title.
        let (w, _) = area.dim_in_pixel();
        let style = TextStyle::from((FONT_FAMILY, 10).into_font()).color(&RGBColor(150, 30, 30));
        for (i, line) in wrap(note, (w as usize / 6).max(20)).iter().enumerate() {
            area.draw_text(line, &style, (64, 26 + 12 * i as i32))
                .map_err(draw_err(what))?;
        }
    }
    Ok(())
}

/// Where a panel's legend goes, if it has one: the corner where it covers
/// no point, and 0 headroom; when every corner covers some, the upper
/// right with the fraction of the plot's height the y axis must grow by
/// above the data to hold it (or, for a legend too tall for that, the
/// corner covering the fewest points and no headroom). `plotted` are the
/// points as fractions of the plot (y up) in an area of `size` pixels.
fn legend_place(p: &Panel, plotted: &[(f64, f64)], size: (u32, u32)) -> Option<(SeriesLabelPosition, f64)> {
    let labelled = p.series.iter().filter(|s| !s.label.is_empty());
    let rows = labelled.clone().count();
    let longest = labelled.map(|s| s.label.chars().count()).max()?;
    // The legend box as a fraction of the plot (about 18 px a row and
    // 6 px a character at 10 px, with its margins), generously.
    let plot_w = f64::from(size.0.saturating_sub(80).max(1));
    let plot_h = f64::from(size.1.saturating_sub(80).max(1));
    let wide = ((longest as f64 * 6.0 + 50.0) / plot_w).min(1.0);
    let tall = ((rows as f64 * 18.0 + 20.0) / plot_h).min(1.0);
    let (corner, covered) = legend_corner(plotted, wide, tall);
    Some(if covered == 0 || tall > 0.45 {
        (corner, 0.0)
    } else {
        (SeriesLabelPosition::UpperRight, tall)
    })
}

/// The corner of the plot where a legend `wide` x `tall` (fractions of the
/// plot) covers the fewest of the points (x, y in 0..1, y up), and how many
/// it covers; upper right when several cover none.
fn legend_corner(points: &[(f64, f64)], wide: f64, tall: f64) -> (SeriesLabelPosition, usize) {
    let corners = [
        (
            SeriesLabelPosition::UpperRight,
            1.0 - wide..=1.0,
            1.0 - tall..=1.0,
        ),
        (SeriesLabelPosition::UpperLeft, 0.0..=wide, 1.0 - tall..=1.0),
        (SeriesLabelPosition::LowerRight, 1.0 - wide..=1.0, 0.0..=tall),
        (SeriesLabelPosition::LowerLeft, 0.0..=wide, 0.0..=tall),
    ];
    let covered = |xs: &std::ops::RangeInclusive<f64>, ys: &std::ops::RangeInclusive<f64>| {
        points
            .iter()
            .filter(|(x, y)| xs.contains(x) && ys.contains(y))
            .count()
    };
    corners
        .into_iter()
        .map(|(corner, xs, ys)| (corner, covered(&xs, &ys)))
        .min_by_key(|c| c.1)
        .unwrap_or((SeriesLabelPosition::UpperRight, 0))
}

/// The part of y = slope x + intercept inside the box, if any.
fn clip_line(
    slope: f64,
    intercept: f64,
    (x0, x1): (f64, f64),
    (y0, y1): (f64, f64),
) -> Option<Vec<(f64, f64)>> {
    if !(slope.is_finite() && intercept.is_finite()) {
        return None;
    }
    let (mut a, mut b) = (x0, x1);
    if slope != 0.0 {
        let (xa, xb) = ((y0 - intercept) / slope, (y1 - intercept) / slope);
        a = a.max(xa.min(xb));
        b = b.min(xa.max(xb));
    } else if !(y0..=y1).contains(&intercept) {
        return None;
    }
    (a < b).then(|| vec![(a, slope * a + intercept), (b, slope * b + intercept)])
}

/// A linear axis over `range` with ticks and labels of our choosing
/// ([`ticks`], [`tick_labels`]) instead of plotters' own, whose labels
/// carried float residue (-1.1e-19 for zero) and repeated neighbours.
struct TickedAxis {
    range: Range<f64>,
    ticks: Vec<f64>,
    labels: Vec<String>,
}

impl Ranged for TickedAxis {
    type FormatOption = NoDefaultFormatting;
    type ValueType = f64;

    fn map(&self, v: &f64, limit: (i32, i32)) -> i32 {
        let (lo, hi) = (self.range.start, self.range.end);
        let along = if hi > lo { (v - lo) / (hi - lo) } else { 0.5 };
        limit.0 + (f64::from(limit.1 - limit.0) * along).round() as i32
    }

    fn key_points<Hint: KeyPointHint>(&self, hint: Hint) -> Vec<f64> {
        // One grid line per tick: no light lines between them.
        if hint.weight().allow_light_points() {
            Vec::new()
        } else {
            self.ticks.clone()
        }
    }

    fn range(&self) -> Range<f64> {
        self.range.clone()
    }
}

impl ValueFormatter<f64> for TickedAxis {
    fn format_ext(&self, v: &f64) -> String {
        self.ticks
            .iter()
            .position(|t| t == v)
            .map_or_else(|| short(*v), |i| self.labels[i].clone())
    }
}

/// Tick positions for an axis over [lo, hi]: about `target` multiples of a
/// 1-2-5 step, each computed as an integer times the step, so a tick at
/// zero is exactly 0 (never a residue such as -1.1e-19 that summing steps
/// leaves). Returns the ticks and the step.
fn ticks(lo: f64, hi: f64, target: usize) -> (Vec<f64>, f64) {
    // Below f64's resolution at this magnitude no two ticks differ.
    let floor = lo.abs().max(hi.abs()) * 1e-13;
    let (lo, hi) = if hi - lo < floor {
        let mid = 0.5 * (lo + hi);
        (mid - floor, mid + floor)
    } else {
        (lo, hi)
    };
    let raw = (hi - lo) / target.max(1) as f64;
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = magnitude
        * match raw / magnitude {
            r if r < 1.5 => 1.0,
            r if r < 3.5 => 2.0,
            r if r < 7.5 => 5.0,
            _ => 10.0,
        };
    let (first, last) = ((lo / step).ceil() as i64, (hi / step).floor() as i64);
    ((first..=last).map(|k| k as f64 * step).collect(), step)
}

/// Labels for `ticks` spaced `step` apart: as many decimals (or, beyond
/// 1e-3..1e5, significant digits in scientific notation) as the step needs,
/// more only where neighbours would still read the same, and no trailing
/// zeros.
fn tick_labels(ticks: &[f64], step: f64) -> Vec<String> {
    let largest = ticks.iter().fold(0f64, |m, t| m.max(t.abs()));
    let scientific = largest != 0.0 && !(1e-3..1e5).contains(&largest);
    let step_digit = step.abs().log10().floor();
    let base = if scientific {
        (largest.log10().floor() - step_digit).max(0.0) as usize
    } else {
        (-step_digit).max(0.0) as usize
    };
    // Trailing zeros go (0.10 -> 0.1, 2.0e11 -> 2e11): no two values share
    // a shortened form.
    let trim = |m: &str| -> String {
        if m.contains('.') {
            m.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            m.to_string()
        }
    };
    let write = |v: f64, digits: usize| {
        if v == 0.0 {
            "0".to_string()
        } else if scientific {
            let s = format!("{v:.digits$e}");
            let (mantissa, exponent) = s.split_once('e').unwrap_or((&s, "0"));
            format!("{}e{exponent}", trim(mantissa))
        } else {
            trim(&format!("{v:.digits$}"))
        }
    };
    let mut digits = base;
    loop {
        let labels: Vec<String> = ticks.iter().map(|&t| write(t, digits)).collect();
        if digits >= 17 || labels.windows(2).all(|w| w[0] != w[1]) {
            return labels;
        }
        digits += 1;
    }
}

/// The label of a tick at exponent `e` of a log axis: 10^e as a decimal
/// from 0.001 to 10000, `1e-6` beyond; between whole exponents, three
/// significant digits.
fn log_label(e: f64) -> String {
    let v = 10f64.powf(e);
    if e.fract() != 0.0 {
        return short(v);
    }
    match e as i32 {
        k @ -3..=4 => format!("{v:.*}", (-k).max(0) as usize),
        k => format!("1e{k}"),
    }
}

/// A number in at most ~7 characters (the linear fit's, and log ticks).
fn short(v: f64) -> String {
    let a = v.abs();
    if a != 0.0 && !(1e-3..1e4).contains(&a) {
        // 2e8 rather than 2.0e8.
        format!("{v:.1e}").replace(".0e", "e")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else {
        let s = format!("{v:.3}");
        let s = s.trim_end_matches('0').trim_end_matches('.').to_string();
        if s == "-0" { "0".into() } else { s }
    }
}

/// Words of `text` in lines of at most `width` characters.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = vec![String::new()];
    for w in text.split_whitespace() {
        let cur = lines.last_mut().expect("non-empty");
        if !cur.is_empty() && cur.len() + 1 + w.len() > width {
            lines.push(w.to_string());
        } else {
            if !cur.is_empty() {
                cur.push(' ');
            }
            cur.push_str(w);
        }
    }
    lines
}

/// Render SVG text to PNG bytes (resvg, the bundled font).
pub fn svg_to_png(svg: &str) -> Result<Vec<u8>> {
    let mut opt = resvg::usvg::Options {
        font_family: "DejaVu Sans".into(),
        ..Default::default()
    };
    {
        let db = opt.fontdb_mut();
        db.load_font_data(FONT.to_vec());
        db.set_sans_serif_family("DejaVu Sans");
    }
    let tree = resvg::usvg::Tree::from_str(svg, &opt)
        .map_err(|e| Error::invalid(format!("the figure's SVG does not parse: {e}")))?;
    let size = tree.size().to_int_size();
    let mut pixmap = resvg::tiny_skia::Pixmap::new(size.width(), size.height())
        .ok_or_else(|| Error::invalid("a figure of zero size"))?;
    resvg::render(
        &tree,
        resvg::tiny_skia::Transform::default(),
        &mut pixmap.as_mut(),
    );
    pixmap
        .encode_png()
        .map_err(|e| Error::invalid(format!("encoding PNG: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panel_renders_to_svg_and_png_and_empty_ones_explain() {
        let p = Panel {
            title: "t".into(),
            x_label: "x".into(),
            y_label: "y".into(),
            series: vec![Series {
                label: "a".into(),
                colour: 0,
                marker: Marker::Triangle,
                points: vec![(1.0, 2.0), (2.0, 3.0), (3.0, 5.0)],
                line: true,
                values: Vec::new(),
            }],
            fit: Some((1.5, 0.3)),
            ..Default::default()
        };
        let empty = Panel {
            title: "nothing".into(),
            note: Some("no model has this metric".into()),
            ..Default::default()
        };
        let svg = grid_svg("fig", &[p, empty], 2, 300, 220).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("no model has this metric"));
        let png = svg_to_png(&svg).unwrap();
        assert_eq!(&png[1..4], b"PNG");
        assert_eq!(short(0.000123), "1.2e-4");
        assert_eq!(
            (short(2e8), short(3.4e6), short(-1e-5)),
            ("2e8".into(), "3.4e6".into(), "-1e-5".into())
        );
        assert_eq!(short(12.5), "12.5");
        assert_eq!(wrap("a bb ccc dddd", 6), vec!["a bb", "ccc", "dddd"]);
    }

    /// Tick labels carry no floating residue and never repeat a neighbour:
    /// ranges through zero, 1e-12 wide, and 1e12 wide.
    #[test]
    fn tick_labels_are_clean_and_distinct() {
        let labelled = |lo: f64, hi: f64| {
            let (t, step) = ticks(lo, hi, 6);
            assert!(t.len() >= 3 && t.len() <= 12, "{lo}..{hi}: {t:?}");
            let slack = 1e-9 * step;
            assert!(
                t.iter().all(|v| (lo - slack..=hi + slack).contains(v)),
                "{lo}..{hi}: {t:?}"
            );
            tick_labels(&t, step)
        };
        let distinct = |l: &[String]| l.windows(2).all(|w| w[0] != w[1]);
        // Through zero: the zero tick is exactly "0", not -1.1e-19.
        let l = labelled(-0.3, 0.7);
        assert_eq!(l, ["-0.2", "0", "0.2", "0.4", "0.6"]);
        let l = labelled(-1.1e-19 - 0.05, 1.0);
        assert!(l.contains(&"0".to_string()) && distinct(&l), "{l:?}");
        // A hair-thin range (the quickstart's ETF error): every label differs.
        let l = labelled(1.399, 1.399 + 1e-12);
        assert!(distinct(&l), "{l:?}");
        assert!(l.iter().all(|s| s.starts_with("1.399")), "{l:?}");
        // Huge and tiny magnitudes in scientific notation.
        let l = labelled(0.0, 1e12);
        assert_eq!(l, ["0", "2e11", "4e11", "6e11", "8e11", "1e12"]);
        let l = labelled(3e12, 3e12 + 1e9);
        assert!(distinct(&l) && l.iter().all(|s| s.contains('e')), "{l:?}");
        let l = labelled(1e-9, 6e-9);
        assert_eq!(l, ["1e-9", "2e-9", "3e-9", "4e-9", "5e-9", "6e-9"]);
        let l = labelled(1e-9, 5e-9);
        assert_eq!(l[..3], ["1e-9", "1.5e-9", "2e-9"]);
        // No residue in ordinary decimals: 0.1 * 3 is "0.3".
        let l = labelled(0.0, 0.5);
        assert_eq!(l, ["0", "0.1", "0.2", "0.3", "0.4", "0.5"]);
        for l in [
            labelled(-7.3, 12.9),
            labelled(-1e-12, 1e-12),
            labelled(0.9999, 1.0001),
        ] {
            assert!(distinct(&l), "{l:?}");
            assert!(
                l.iter().all(|s| !s.contains("0000000") && !s.contains("9999999")),
                "{l:?}"
            );
        }
    }

    /// An axis over more than two decades of positive values turns log by
    /// itself (when the panel allows it), with its ticks at round values;
    /// the fit is still drawn, as a curve.
    #[test]
    fn axes_spanning_decades_turn_log() {
        assert!(spans_decades([0.5, 3.0, 51.0].into_iter()));
        assert!(!spans_decades([0.5, 3.0, 50.0].into_iter()));
        assert!(!spans_decades([0.0, 3.0, 1e6].into_iter()));
        let panel = |auto_log| Panel {
            title: "cdnv".into(),
            x_label: "CDNV".into(),
            y_label: "loss".into(),
            auto_log,
            series: vec![Series {
                label: String::new(),
                colour: 0,
                marker: Marker::Circle,
                points: vec![(1e-3, 4.0), (2e-2, 3.5), (0.7, 3.1), (9.0, 2.0)],
                line: false,
                values: Vec::new(),
            }],
            fit: Some((-0.2, 3.5)),
            ..Default::default()
        };
        let log = grid_svg("", &[panel(true)], 1, 400, 300).unwrap();
        assert!(log.contains("CDNV (log scale)") && !log.contains("loss (log scale)"));
        let texts = svg_texts;
        let labels = texts(&log);
        for tick in ["0.001", "0.01", "0.1", "1", "10", "2.5", "4"] {
            assert!(labels.iter().any(|l| l == tick), "{tick} missing from {labels:?}");
        }
        let linear = texts(&grid_svg("", &[panel(false)], 1, 400, 300).unwrap());
        assert!(linear.iter().all(|l| !l.contains("(log scale)")), "{linear:?}");
        assert!(
            linear.iter().any(|l| l == "0") && linear.iter().any(|l| l == "8"),
            "{linear:?}"
        );
        assert_eq!(&svg_to_png(&log).unwrap()[1..4], b"PNG");
    }

    #[test]
    fn log_ticks_and_legend_corners() {
        let labels: Vec<String> = [-6.0, -3.0, -1.0, 0.0, 2.0, 4.0, 5.0, 0.5]
            .map(log_label)
            .to_vec();
        assert_eq!(
            labels,
            ["1e-6", "0.001", "0.1", "1", "100", "10000", "1e5", "3.162"]
        );
        // Points along the rising diagonal leave the upper left and lower
        // right free; the upper right is taken.
        let diagonal: Vec<(f64, f64)> = (0..20).map(|i| (i as f64 / 19.0, i as f64 / 19.0)).collect();
        let (corner, covered) = legend_corner(&diagonal, 0.45, 0.3);
        assert!(matches!(
            corner,
            SeriesLabelPosition::UpperLeft | SeriesLabelPosition::LowerRight
        ));
        assert_eq!(covered, 0);
        assert!(matches!(
            legend_corner(&[], 0.45, 0.3),
            (SeriesLabelPosition::UpperRight, 0)
        ));
        let high: Vec<(f64, f64)> = (0..10).map(|i| (i as f64 / 9.0, 0.95)).collect();
        assert!(matches!(
            legend_corner(&high, 0.45, 0.3),
            (SeriesLabelPosition::LowerRight, 0)
        ));
    }

    /// The texts of an SVG's `<text>` elements.
    fn svg_texts(svg: &str) -> Vec<String> {
        svg.split("<text")
            .skip(1)
            .filter_map(|t| Some(t.split_once('>')?.1.split_once("</text>")?.0.trim().to_string()))
            .collect()
    }

    fn labelled(label: &str, marker: Marker, points: Vec<(f64, f64)>) -> Series {
        Series {
            label: label.into(),
            colour: 0,
            marker,
            points,
            line: false,
            values: Vec::new(),
        }
    }

    /// A legend that would cover points in every corner gets room above
    /// the data instead: the y axis grows by the legend's height, so no
    /// point lies under it.
    #[test]
    fn a_legend_never_covers_a_point() {
        // A 5 x 5 lattice filling the plot, corners included.
        let lattice: Vec<(f64, f64)> = (0..25)
            .map(|i| ((i % 5) as f64 / 4.0, (i / 5) as f64 / 4.0))
            .collect();
        let panel = Panel {
            series: vec![
                labelled("L=1", Marker::Circle, lattice.clone()),
                labelled("L=12", Marker::Diamond, vec![(0.5, 0.5)]),
            ],
            ..Default::default()
        };
        let (corner, headroom) = legend_place(&panel, &lattice, (380, 300)).unwrap();
        assert!(matches!(corner, SeriesLabelPosition::UpperRight));
        // Two rows: (2 x 18 + 20) px of a 220 px plot.
        assert!((headroom - 56.0 / 220.0).abs() < 1e-12, "{headroom}");
        // A free corner needs no room.
        let diagonal: Vec<(f64, f64)> = (0..20).map(|i| (i as f64 / 19.0, i as f64 / 19.0)).collect();
        assert_eq!(legend_place(&panel, &diagonal, (380, 300)).unwrap().1, 0.0);
        // No labels, no legend.
        let bare = Panel {
            series: vec![labelled("", Marker::Circle, lattice.clone())],
            ..Default::default()
        };
        assert!(legend_place(&bare, &lattice, (380, 300)).is_none());
    }

    /// Panels with more legend entries than fit beside their data share one
    /// legend outside them, each entry once; six marker shapes are distinct.
    #[test]
    fn dense_legends_go_beside_the_figure() {
        let shapes: Vec<Marker> = (0..6).map(Marker::nth).collect();
        for (i, a) in shapes.iter().enumerate() {
            assert!(shapes[i + 1..].iter().all(|b| b != a), "{shapes:?}");
        }
        let panel = |entries: usize| Panel {
            title: "p".into(),
            series: (0..entries)
                .map(|i| {
                    labelled(
                        &format!("family {i}"),
                        Marker::nth(i),
                        vec![(i as f64, 1.0 + i as f64)],
                    )
                })
                .collect(),
            ..Default::default()
        };
        let few = grid_svg("f", &[panel(3), panel(3)], 2, 300, 240).unwrap();
        let many = grid_svg("f", &[panel(40), panel(40)], 2, 300, 240).unwrap();
        let count = |svg: &str, text: &str| svg_texts(svg).iter().filter(|t| *t == text).count();
        // Few: each panel its own legend, the figure as wide as its panels.
        assert_eq!(count(&few, "family 2"), 2);
        assert!(few.starts_with("<svg width=\"600\""));
        // Many: one legend beside both panels, in columns that fit the height.
        assert_eq!(count(&many, "family 39"), 1);
        assert_eq!(count(&many, "family 0"), 1);
        let keys = legend_keys(&[panel(40)]);
        assert_eq!(keys.len(), 40);
        let (columns, width) = side_legend_size(&keys, 240);
        assert_eq!(columns, 4, "12 rows of 16 px a column in 240 - 40 px");
        assert!(many.starts_with(&format!("<svg width=\"{}\"", 600 + width)));
        assert_eq!(&svg_to_png(&many).unwrap()[1..4], b"PNG");
    }

    /// Points coloured by value on a viridis scale, with the colour bar
    /// beside the panels; without a scale, neither.
    #[test]
    fn a_colour_scale_colours_points_and_draws_its_bar() {
        assert_eq!(viridis(0.0), RGBColor(68, 1, 84));
        assert_eq!(viridis(1.0), RGBColor(253, 231, 37));
        assert_eq!(viridis(0.5), RGBColor(33, 145, 140));
        let scale = ColourScale {
            label: "parameters".into(),
            lo: 1e6,
            hi: 1e8,
            log: true,
        };
        assert_eq!(scale.position(1e7), 0.5);
        let panel = |colour_scale: Option<ColourScale>| Panel {
            title: "t".into(),
            series: vec![Series {
                label: "L=2".into(),
                colour: 0,
                marker: Marker::Circle,
                points: vec![(1.0, 1.0), (2.0, 3.0), (3.0, 2.0)],
                line: false,
                values: vec![1e6, 1e7, 1e8],
            }],
            colour_scale,
            ..Default::default()
        };
        let with = grid_svg("f", &[panel(Some(scale))], 1, 300, 240).unwrap();
        let without = grid_svg("f", &[panel(None)], 1, 300, 240).unwrap();
        assert!(with.contains("parameters") && !without.contains("parameters"));
        // The largest value's point is the top of the map; the bar's decades.
        assert!(with.contains("#FDE725") && !without.contains("#FDE725"));
        assert!(with.contains("1e7"), "the bar labels its decades");
        assert!(with.starts_with("<svg width=\"410\""));
        assert_eq!(&svg_to_png(&with).unwrap()[1..4], b"PNG");
    }
}
