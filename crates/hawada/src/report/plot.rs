//! Line and scatter charts, drawn by `plotters`: a PNG through its bitmap backend (encoded by
//! `png`) and the same chart as SVG beside it. Text is set in DejaVu Sans, embedded in the binary
//! (the `dejavu` crate) and rasterised by plotters' `ab_glyph` feature, so a chart renders the
//! same on a headless GPU machine and in CI, where no system font may exist.
//!
//! Layout: the title on top, the legend in a strip of its own under it (so it never covers
//! data), then the plot area; ticks fall on 1, 2 or 5 × 10^k and print with just the decimals
//! their step needs.

use crate::error::{Error, Result};
use plotters::coord::ranged1d::{KeyPointHint, NoDefaultFormatting, ValueFormatter};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::ops::Range;
use std::path::Path;
use std::sync::OnceLock;

/// One series: a polyline, or dots (probes, candidates).
pub struct Series<'a> {
    pub label: &'a str,
    /// `0xRRGGBB`.
    pub color: u32,
    pub points: Vec<(f64, f64)>,
    pub dots: bool,
}

/// A chart: title, axis labels (with their unit, e.g. `latency (ms)`), series.
pub struct Chart<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
    pub series: Vec<Series<'a>>,
}

/// Image size, pixels; report.html shows charts at this size.
const WIDTH: u32 = 640;
const HEIGHT: u32 = 400;
/// The family name plotters' text styles ask for; `fonts` registers DejaVu Sans under it.
const FONT: &str = "sans-serif";
/// Font sizes, pixels.
const TITLE_PX: f64 = 17.0;
const TEXT_PX: f64 = 13.0;
/// Legend strip: row height, sample (line or dot) width, gap after each entry; pixels.
const LEGEND_ROW: i32 = 18;
const LEGEND_SAMPLE: i32 = 22;
const LEGEND_GAP: i32 = 18;
/// Share of the data's span left free at each end of an axis, so dots at the extremes stay whole.
const AXIS_MARGIN: f64 = 0.04;
/// At most this many ticks per axis (the smallest 1-2-5 step that keeps to it: 4 to 7).
const MAX_TICKS: f64 = 7.0;

/// Registers the embedded font with plotters once per process. One face only: each embedded
/// face adds about 0.7 MB to the binary, which travels to the GPU machine within a size limit
/// (a bold style falls back to it).
fn fonts() -> Result<()> {
    static REGISTERED: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular())
                .map_err(|_| "the embedded DejaVu Sans did not parse".to_string())
        })
        .clone()
        .map_err(|reason| Error::Data {
            file: "dejavu::sans".into(),
            reason,
        })
}

fn rgb(color: u32) -> RGBColor {
    RGBColor((color >> 16) as u8, (color >> 8) as u8, color as u8)
}

/// An axis: its range (the data's plus `AXIS_MARGIN`), the ticks inside it, their step.
#[derive(Debug, PartialEq)]
struct Axis {
    lo: f64,
    hi: f64,
    ticks: Vec<f64>,
    step: f64,
}

impl Axis {
    /// The axis over data from `min` to `max`; a single value sits mid-axis.
    fn new(min: f64, max: f64) -> Axis {
        let (min, max) = if max > min {
            (min, max)
        } else {
            let half = (0.05 * min.abs()).max(0.5);
            (min - half, max + half)
        };
        let margin = AXIS_MARGIN * (max - min);
        let (lo, hi) = (min - margin, max + margin);
        let step = nice_step((hi - lo) / MAX_TICKS);
        let first = (lo / step).ceil() as i64;
        let last = (hi / step).floor() as i64;
        // `k · step` rather than a running sum: no drift, and exact zeros.
        let ticks = (first..=last).map(|k| k as f64 * step).collect();
        Axis {
            lo,
            hi,
            ticks,
            step,
        }
    }

    /// A tick's label with as many decimals as the step needs (`0.05` → 2), never `-0`.
    fn label(&self, value: f64) -> String {
        let decimals = (-self.step.log10().floor()).max(0.0) as usize;
        let text = format!("{value:.decimals$}");
        match text.strip_prefix('-') {
            Some(rest) if rest.chars().all(|c| c == '0' || c == '.') => rest.to_string(),
            _ => text,
        }
    }
}

/// Plotters' view of an axis: linear, with grid lines and labels at exactly our ticks.
impl Ranged for Axis {
    type FormatOption = NoDefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        let share = (value - self.lo) / (self.hi - self.lo);
        limit.0 + (share * f64::from(limit.1 - limit.0)).round() as i32
    }

    fn key_points<Hint: KeyPointHint>(&self, hint: Hint) -> Vec<f64> {
        // Light (minor) grid lines: none.
        if hint.weight().allow_light_points() {
            Vec::new()
        } else {
            self.ticks.clone()
        }
    }

    fn range(&self) -> Range<f64> {
        self.lo..self.hi
    }
}

impl ValueFormatter<f64> for Axis {
    fn format_ext(&self, value: &f64) -> String {
        self.label(*value)
    }
}

/// The 1, 2 or 5 × 10^k nearest above `raw` (a step of at least `raw`).
fn nice_step(raw: f64) -> f64 {
    let magnitude = 10f64.powf(raw.log10().floor());
    let mantissa = raw / magnitude;
    let nice = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .find(|&m| mantissa <= m * (1.0 + 1e-9))
        .unwrap_or(10.0);
    nice * magnitude
}

/// Legend entries laid out in rows across `width` pixels: (series, x offset, row).
fn legend_layout<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    drawn: &[&Series],
    width: i32,
) -> Vec<(usize, i32, i32)> {
    let font = TextStyle::from((FONT, TEXT_PX).into_font());
    let mut placed = Vec::new();
    let (mut x, mut row) = (0, 0);
    for (i, s) in drawn.iter().enumerate() {
        let text_w = root
            .estimate_text_size(s.label, &font)
            .map_or(7 * s.label.len() as u32, |(w, _)| w) as i32;
        let entry = LEGEND_SAMPLE + 6 + text_w;
        if x > 0 && x + entry > width {
            (x, row) = (0, row + 1);
        }
        placed.push((i, x, row));
        x += entry + LEGEND_GAP;
    }
    placed
}

/// Top of the legend strip, under the title and outside the plot area.
const LEGEND_TOP: i32 = 34;

/// Draws the legend strip (one entry per drawn series, wrapped into rows); returns its rows.
fn draw_legend<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    drawn: &[&Series],
    text: &TextStyle,
) -> std::result::Result<i32, DrawingAreaErrorKind<DB::ErrorType>> {
    let (width, _) = root.dim_in_pixel();
    let legend_left = 70;
    let layout = legend_layout(root, drawn, width as i32 - legend_left - 20);
    for &(i, x, row) in &layout {
        let s = drawn[i];
        let color = rgb(s.color);
        let (x, y) = (
            legend_left + x,
            LEGEND_TOP + row * LEGEND_ROW + LEGEND_ROW / 2,
        );
        if s.dots {
            root.draw(&Circle::new((x + LEGEND_SAMPLE / 2, y), 4, color.filled()))?;
        } else {
            root.draw(&PathElement::new(
                vec![(x, y), (x + LEGEND_SAMPLE, y)],
                color.stroke_width(2),
            ))?;
        }
        let label = text.pos(Pos::new(HPos::Left, VPos::Center));
        root.draw(&Text::new(s.label, (x + LEGEND_SAMPLE + 6, y), label))?;
    }
    Ok(layout.iter().map(|&(_, _, row)| row + 1).max().unwrap_or(0))
}

/// A series' points with both coordinates finite.
fn finite_points(s: &Series) -> Vec<(f64, f64)> {
    s.points
        .iter()
        .copied()
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .collect()
}

impl Chart<'_> {
    /// Draws the chart onto `root`, whatever the backend.
    fn draw<DB: DrawingBackend>(
        &self,
        root: &DrawingArea<DB, Shift>,
    ) -> std::result::Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
        root.fill(&WHITE)?;
        let (width, height) = root.dim_in_pixel();
        let (width, height) = (width as i32, height as i32);
        let title = (FONT, TITLE_PX)
            .into_font()
            .color(&BLACK)
            .pos(Pos::new(HPos::Center, VPos::Top));
        root.draw(&Text::new(self.title, (width / 2, 8), title))?;
        let text = (FONT, TEXT_PX).into_font().color(&BLACK);
        // A series with no points (a metric an older run did not log) gets no legend entry.
        let drawn: Vec<&Series> = self
            .series
            .iter()
            .filter(|s| !finite_points(s).is_empty())
            .collect();
        let all: Vec<(f64, f64)> = drawn.iter().flat_map(|s| finite_points(s)).collect();
        if all.is_empty() {
            let centre = text.pos(Pos::new(HPos::Center, VPos::Center));
            return root.draw(&Text::new("no data", (width / 2, height / 2), centre));
        }
        let rows = draw_legend(root, &drawn, &text)?;
        let plot_top = LEGEND_TOP + rows * LEGEND_ROW + 8;
        let (_, area) = root.split_vertically(plot_top);
        self.draw_plot(&area, &drawn, &all, &text)
    }

    /// The axes, grid and series below the legend.
    fn draw_plot<DB: DrawingBackend>(
        &self,
        area: &DrawingArea<DB, Shift>,
        drawn: &[&Series],
        all: &[(f64, f64)],
        text: &TextStyle,
    ) -> std::result::Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
        let (mut x_min, mut x_max, mut y_min, mut y_max) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
        for &(x, y) in all {
            (x_min, x_max) = (x_min.min(x), x_max.max(x));
            (y_min, y_max) = (y_min.min(y), y_max.max(y));
        }
        let (x_axis, y_axis) = (Axis::new(x_min, x_max), Axis::new(y_min, y_max));
        let mut chart = ChartBuilder::on(area)
            .margin_left(8)
            .margin_right(20)
            .margin_bottom(6)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(x_axis, y_axis)?;
        chart
            .configure_mesh()
            .bold_line_style(RGBColor(0xd0, 0xd0, 0xd0))
            .axis_style(BLACK)
            .label_style(text.clone())
            .axis_desc_style(text.clone())
            .x_desc(self.x_label)
            .y_desc(self.y_label)
            .draw()?;
        for s in drawn {
            let color = rgb(s.color);
            let points = finite_points(s);
            if s.dots {
                chart.draw_series(
                    points
                        .into_iter()
                        .map(|p| Circle::new(p, 4, color.filled())),
                )?;
            } else {
                chart.draw_series(LineSeries::new(points, color.stroke_width(2)))?;
            }
        }
        // The frame on top of the series, so a line along an edge does not hide it.
        let plot_area = chart.plotting_area().strip_coord_spec();
        let (plot_w, plot_h) = plot_area.dim_in_pixel();
        plot_area.draw(&Rectangle::new(
            [(0, 0), (plot_w as i32 - 1, plot_h as i32 - 1)],
            BLACK.stroke_width(1),
        ))?;
        Ok(())
    }

    /// The chart as 8-bit RGB pixels, `[HEIGHT, WIDTH, 3]`.
    fn render_rgb(&self, path: &Path) -> Result<Vec<u8>> {
        fonts()?;
        let mut rgb = vec![255; (3 * WIDTH * HEIGHT) as usize];
        {
            let root = BitMapBackend::with_buffer(&mut rgb, (WIDTH, HEIGHT)).into_drawing_area();
            self.draw(&root).map_err(drawing_failed(path))?;
            root.present().map_err(drawing_failed(path))?;
        }
        Ok(rgb)
    }

    /// The chart as an SVG document.
    fn render_svg(&self, path: &Path) -> Result<String> {
        fonts()?;
        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
            self.draw(&root).map_err(drawing_failed(path))?;
            root.present().map_err(drawing_failed(path))?;
        }
        Ok(svg)
    }

    /// Renders the chart and writes it as an 8-bit RGB PNG at `path` and as SVG beside it
    /// (same name, `.svg`), each atomically.
    pub fn write_png(&self, path: &Path) -> Result<()> {
        let rgb = self.render_rgb(path)?;
        let mut bytes = Vec::new();
        let mut encoder = png::Encoder::new(&mut bytes, WIDTH, HEIGHT);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let bad = |e: png::EncodingError| Error::Data {
            file: path.to_path_buf(),
            reason: format!("PNG encoding failed: {e}"),
        };
        let mut writer = encoder.write_header().map_err(bad)?;
        writer.write_image_data(&rgb).map_err(bad)?;
        writer.finish().map_err(bad)?;
        crate::io::write_atomic(path, &bytes)?;
        let svg_path = path.with_extension("svg");
        let svg = self.render_svg(&svg_path)?;
        crate::io::write_atomic(&svg_path, svg.as_bytes())
    }
}

/// Maps a plotters error to ours, naming the file being drawn.
fn drawing_failed<E: std::error::Error + Send + Sync>(
    path: &Path,
) -> impl Fn(DrawingAreaErrorKind<E>) -> Error + '_ {
    move |e| Error::Data {
        file: path.to_path_buf(),
        reason: format!("drawing the chart failed: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chart(series: Vec<Series<'static>>) -> Chart<'static> {
        Chart {
            title: "Latency vs step",
            x_label: "step",
            y_label: "latency (ms)",
            series,
        }
    }

    /// Pixels of `rgb` (RGB bytes) inside rows `rows` that `keep` accepts.
    fn count(rgb: &[u8], rows: std::ops::Range<u32>, keep: impl Fn(&[u8]) -> bool) -> usize {
        let row_bytes = 3 * WIDTH as usize;
        rgb[rows.start as usize * row_bytes..rows.end as usize * row_bytes]
            .chunks(3)
            .filter(|p| keep(p))
            .count()
    }

    #[test]
    fn a_chart_draws_its_series_in_their_colours_and_its_text() {
        let chart = chart(vec![Series {
            label: "s",
            color: 0xff0000,
            points: vec![(0.0, 0.0), (1.0, 1.0)],
            dots: false,
        }]);
        let rgb = chart.render_rgb(Path::new("c.png")).unwrap();
        let red = count(&rgb, 0..HEIGHT, |p| p[0] > 200 && p[1] < 50 && p[2] < 50);
        assert!(red > 500, "{red} red pixels");
        // The title's glyphs: dark pixels in the top rows, where nothing else is drawn.
        let title = count(&rgb, 0..28, |p| p[0] < 100 && p[1] < 100 && p[2] < 100);
        assert!(title > 100, "{title} dark pixels in the title");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.png");
        chart.write_png(&path).unwrap();
        assert_eq!(&std::fs::read(&path).unwrap()[1..4], b"PNG");
        let svg = std::fs::read_to_string(dir.path().join("c.svg")).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.contains("latency (ms)"),
            "{svg}"
        );
    }

    #[test]
    fn the_legend_sits_above_the_plot_area() {
        // A series filling the whole plot area: none of its colour may reach the legend's rows,
        // and the legend's own sample line is there.
        let points = (0..=100).map(|i| (i as f64, (i % 2) as f64)).collect();
        let chart = chart(vec![Series {
            label: "a long legend label that would cover data inside the plot",
            color: 0x00ff00,
            points,
            dots: false,
        }]);
        let rgb = chart.render_rgb(Path::new("c.png")).unwrap();
        let green = |p: &[u8]| p[1] > 200 && p[0] < 50 && p[2] < 50;
        let legend_rows = 34..34 + LEGEND_ROW as u32;
        let in_legend = count(&rgb, legend_rows.clone(), green);
        // The sample: a line `LEGEND_SAMPLE` pixels long, 2 to 3 pixels thick.
        assert!(
            in_legend > 0 && in_legend <= 3 * (LEGEND_SAMPLE as usize + 1),
            "{in_legend}"
        );
        let plot = count(&rgb, legend_rows.end..HEIGHT, green);
        assert!(plot > 2000, "{plot}");
    }

    #[test]
    fn ticks_fall_on_one_two_five_steps() {
        let axis = Axis::new(0.0, 200.0);
        assert_eq!(axis.step, 50.0);
        assert_eq!(axis.ticks, vec![0.0, 50.0, 100.0, 150.0, 200.0]);
        let axis = Axis::new(1.234, 1.31);
        assert_eq!(axis.step, 0.02);
        assert_eq!(axis.label(1.26), "1.26");
        let axis = Axis::new(0.87, 0.95);
        assert_eq!(axis.step, 0.02);
        for (raw, nice) in [
            (0.3, 0.5),
            (7.0, 10.0),
            (1.0, 1.0),
            (0.012, 0.02),
            (45.0, 50.0),
        ] {
            assert!(
                (nice_step(raw) - nice).abs() < 1e-12,
                "{raw} → {}",
                nice_step(raw)
            );
        }
        // One value sits mid-axis; a tick at zero reads `0`, never `-0`.
        let axis = Axis::new(3.4, 3.4);
        assert!(axis.lo < 3.4 && axis.hi > 3.4);
        let axis = Axis::new(-1.0, 1.0);
        assert_eq!(axis.label(-0.0), "0.0");
        assert!(axis.ticks.contains(&0.0));
    }
}
