//! Figures: grids of scatter and line panels drawn with plotters as SVG, and
//! the same SVG rendered to PNG with resvg.
//!
//! Text is measured (plotters, through ab_glyph) and drawn (resvg) with the
//! DejaVu Sans font compiled into the binary, so figures look the same on
//! every machine and need no system fonts or fontconfig. A panel with
//! nothing to draw says why in its middle instead of being left blank.

use std::sync::Once;

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

/// Point markers, cycled through by group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Marker {
    Circle,
    Triangle,
    Square,
    Cross,
}

impl Marker {
    pub fn nth(i: usize) -> Marker {
        [Marker::Circle, Marker::Triangle, Marker::Square, Marker::Cross][i % 4]
    }
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
}

/// One chart of a figure.
#[derive(Debug, Clone, Default)]
pub struct Panel {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    /// Plot x on a log10 axis.
    pub log_x: bool,
    pub series: Vec<Series>,
    /// A least-squares line y = slope * x + intercept to draw.
    pub fit: Option<(f64, f64)>,
    /// Why the panel is empty or partial, shown on it.
    pub note: Option<String>,
}

impl Panel {
    fn finite_points(&self) -> Vec<(f64, f64)> {
        self.series
            .iter()
            .flat_map(|s| s.points.iter().copied())
            .filter(|(x, y)| x.is_finite() && y.is_finite() && (!self.log_x || *x > 0.0))
            .collect()
    }
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

/// A figure of `panels` in a grid of `cols` columns, each panel
/// `panel_w` x `panel_h` pixels, as SVG text.
pub fn grid_svg(title: &str, panels: &[Panel], cols: usize, panel_w: u32, panel_h: u32) -> Result<String> {
    register_font();
    let cols = cols.max(1).min(panels.len().max(1));
    let rows = panels.len().div_ceil(cols).max(1);
    let header = if title.is_empty() { 0 } else { 40 };
    let size = (panel_w * cols as u32, panel_h * rows as u32 + header);
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
        let areas = body.split_evenly((rows, cols));
        for (panel, area) in panels.iter().zip(areas.iter()) {
            draw_panel(area, panel)?;
        }
        root.present().map_err(draw_err(title))?;
    }
    Ok(svg)
}

fn draw_panel(area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>, p: &Panel) -> Result<()> {
    let tx = |x: f64| if p.log_x { x.log10() } else { x };
    let pts = p.finite_points();
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
    let (y0, y1) = range(pts.iter().map(|(_, y)| *y));
    let mut chart = ChartBuilder::on(area)
        .caption(&p.title, (FONT_FAMILY, 14))
        .margin(8)
        .x_label_area_size(34)
        .y_label_area_size(56)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(draw_err(what))?;
    let log_x = p.log_x;
    let x_fmt = move |v: &f64| if log_x { short(10f64.powf(*v)) } else { short(*v) };
    chart
        .configure_mesh()
        .x_desc(&p.x_label)
        .y_desc(&p.y_label)
        .x_label_formatter(&x_fmt)
        .y_label_formatter(&|v| short(*v))
        .label_style((FONT_FAMILY, 11))
        .axis_desc_style((FONT_FAMILY, 12))
        .x_labels(6)
        .y_labels(6)
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(draw_err(what))?;
    for s in &p.series {
        let mut points: Vec<(f64, f64)> = s
            .points
            .iter()
            .copied()
            .filter(|(x, y)| x.is_finite() && y.is_finite() && (!log_x || *x > 0.0))
            .map(|(x, y)| (tx(x), y))
            .collect();
        if points.is_empty() {
            continue;
        }
        let c = colour(s.colour);
        if s.line {
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            chart
                .draw_series(LineSeries::new(points.clone(), c.stroke_width(2)))
                .map_err(draw_err(what))?;
        }
        let label = (!s.label.is_empty()).then(|| s.label.clone());
        // One arm per marker shape: the element types differ.
        macro_rules! markers {
            ($make:expr) => {{
                let drawn = chart
                    .draw_series(points.iter().map(|&at| $make(at)))
                    .map_err(draw_err(what))?;
                if let Some(l) = label {
                    drawn.label(l).legend(move |(x, y)| $make((x, y)));
                }
            }};
        }
        let style = c.filled();
        match s.marker {
            Marker::Circle => markers!(|at| Circle::new(at, 4, style)),
            Marker::Triangle => markers!(|at| TriangleMarker::new(at, 5, style)),
            Marker::Square => markers!(|at| EmptyElement::at(at) + Rectangle::new([(-4, -4), (4, 4)], style)),
            Marker::Cross => markers!(|at| Cross::new(at, 4, c.stroke_width(2))),
        }
    }
    if let Some((slope, intercept)) = p.fit
        && !log_x
        && let Some(line) = clip_line(slope, intercept, (x0, x1), (y0, y1))
    {
        chart
            .draw_series(LineSeries::new(line, BLACK.mix(0.6).stroke_width(1)))
            .map_err(draw_err(what))?;
    }
    if p.series.iter().any(|s| !s.label.is_empty()) && !pts.is_empty() {
        chart
            .configure_series_labels()
            .label_font((FONT_FAMILY, 10))
            .background_style(WHITE.mix(0.8))
            .border_style(RGBColor(200, 200, 200))
            .position(SeriesLabelPosition::UpperRight)
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

/// A number in at most ~7 characters for tick labels.
fn short(v: f64) -> String {
    let a = v.abs();
    if a != 0.0 && !(1e-3..1e4).contains(&a) {
        format!("{v:.1e}")
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
        assert_eq!(short(12.5), "12.5");
        assert_eq!(wrap("a bb ccc dddd", 6), vec!["a bb", "ccc", "dddd"]);
    }
}
