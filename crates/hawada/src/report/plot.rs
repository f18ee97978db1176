//! Line and scatter charts rendered to PNG in pure Rust: shapes and text from
//! embedded-graphics (its built-in bitmap fonts need no system fonts, so a report renders the
//! same on a headless GPU machine and in CI), encoded by `png`.

use crate::error::{Error, Result};
use embedded_graphics::mono_font::{ascii, MonoTextStyle};
use embedded_graphics::pixelcolor::Rgb888;
use embedded_graphics::prelude::*;
use embedded_graphics::primitives::{Circle, Line, PrimitiveStyle};
use embedded_graphics::text::{Alignment, Text};
use std::convert::Infallible;
use std::path::Path;

/// One series: a polyline, or dots (probes, candidates).
pub struct Series<'a> {
    pub label: &'a str,
    /// `0xRRGGBB`.
    pub color: u32,
    pub points: Vec<(f64, f64)>,
    pub dots: bool,
}

/// A chart: title, axis labels (ASCII: the bitmap fonts have no other glyphs), series.
pub struct Chart<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
    pub series: Vec<Series<'a>>,
}

/// An RGB pixel buffer that embedded-graphics draws into.
struct Canvas {
    width: u32,
    height: u32,
    rgb: Vec<u8>,
}

impl OriginDimensions for Canvas {
    fn size(&self) -> Size {
        Size::new(self.width, self.height)
    }
}

impl DrawTarget for Canvas {
    type Color = Rgb888;
    type Error = Infallible;

    fn draw_iter<I: IntoIterator<Item = Pixel<Rgb888>>>(
        &mut self,
        pixels: I,
    ) -> std::result::Result<(), Infallible> {
        for Pixel(p, c) in pixels {
            if p.x >= 0 && p.y >= 0 && (p.x as u32) < self.width && (p.y as u32) < self.height {
                let i = 3 * (p.y as usize * self.width as usize + p.x as usize);
                self.rgb[i..i + 3].copy_from_slice(&[c.r(), c.g(), c.b()]);
            }
        }
        Ok(())
    }
}

fn rgb(color: u32) -> Rgb888 {
    Rgb888::new((color >> 16) as u8, (color >> 8) as u8, color as u8)
}

/// A tick label with enough decimals to tell ticks `span / 4` apart.
fn tick(v: f64, span: f64) -> String {
    let decimals = (2.0 - span.abs().max(1e-9).log10().floor()).clamp(0.0, 5.0) as usize;
    format!("{v:.decimals$}")
}

const WIDTH: u32 = 640;
const HEIGHT: u32 = 360;
// Margins around the plot area, pixels.
const LEFT: i32 = 70;
const RIGHT: i32 = 20;
const TOP: i32 = 40;
const BOTTOM: i32 = 44;

impl Chart<'_> {
    /// Draws the chart into an RGB buffer `[HEIGHT, WIDTH, 3]`.
    fn render(&self) -> Canvas {
        let mut canvas = Canvas {
            width: WIDTH,
            height: HEIGHT,
            rgb: vec![255; (3 * WIDTH * HEIGHT) as usize],
        };
        let black = Rgb888::BLACK;
        let text = MonoTextStyle::new(&ascii::FONT_6X13, black);
        let title = MonoTextStyle::new(&ascii::FONT_7X13_BOLD, black);
        let (w, h) = (WIDTH as i32, HEIGHT as i32);
        let _ = Text::with_alignment(self.title, Point::new(w / 2, 18), title, Alignment::Center)
            .draw(&mut canvas);
        // A series with no points (a metric an older run did not log) gets no legend line.
        let drawn: Vec<&Series> = self
            .series
            .iter()
            .filter(|s| !s.points.is_empty())
            .collect();
        let all: Vec<(f64, f64)> = drawn
            .iter()
            .flat_map(|s| s.points.iter().copied())
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .collect();
        if all.is_empty() {
            let _ =
                Text::with_alignment("no data", Point::new(w / 2, h / 2), text, Alignment::Center)
                    .draw(&mut canvas);
            return canvas;
        }
        let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
        for &(x, y) in &all {
            (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
        }
        // A flat series sits mid-axis.
        if x1 <= x0 {
            (x0, x1) = (x0 - 0.5, x1 + 0.5);
        }
        if y1 <= y0 {
            (y0, y1) = (y0 - 0.5, y1 + 0.5);
        }
        // Room above the data for the legend, one line per series.
        let span = y1 - y0;
        (y0, y1) = (
            y0 - 0.05 * span,
            y1 + (0.05 + 0.08 * drawn.len() as f64) * span,
        );
        let (plot_w, plot_h) = ((w - LEFT - RIGHT) as f64, (h - TOP - BOTTOM) as f64);
        let at = |x: f64, y: f64| {
            Point::new(
                LEFT + ((x - x0) / (x1 - x0) * plot_w).round() as i32,
                h - BOTTOM - ((y - y0) / (y1 - y0) * plot_h).round() as i32,
            )
        };
        let grid = PrimitiveStyle::with_stroke(rgb(0xdddddd), 1);
        let axis = PrimitiveStyle::with_stroke(black, 1);
        for i in 0..=4 {
            let fx = x0 + (x1 - x0) * i as f64 / 4.0;
            let fy = y0 + (y1 - y0) * i as f64 / 4.0;
            let (px, py) = (at(fx, y0).x, at(x0, fy).y);
            let _ = Line::new(Point::new(LEFT, py), Point::new(w - RIGHT, py))
                .into_styled(grid)
                .draw(&mut canvas);
            let _ = Text::with_alignment(
                &tick(fx, x1 - x0),
                Point::new(px, h - BOTTOM + 14),
                text,
                Alignment::Center,
            )
            .draw(&mut canvas);
            let _ = Text::with_alignment(
                &tick(fy, y1 - y0),
                Point::new(LEFT - 5, py + 4),
                text,
                Alignment::Right,
            )
            .draw(&mut canvas);
        }
        let origin = Point::new(LEFT, h - BOTTOM);
        let _ = Line::new(origin, Point::new(w - RIGHT, h - BOTTOM))
            .into_styled(axis)
            .draw(&mut canvas);
        let _ = Line::new(origin, Point::new(LEFT, TOP))
            .into_styled(axis)
            .draw(&mut canvas);
        let _ = Text::with_alignment(
            self.x_label,
            Point::new((LEFT + w - RIGHT) / 2, h - 8),
            text,
            Alignment::Center,
        )
        .draw(&mut canvas);
        let _ = Text::new(self.y_label, Point::new(6, TOP - 8), text).draw(&mut canvas);
        for (i, s) in drawn.iter().enumerate() {
            let color = rgb(s.color);
            let points: Vec<Point> = s
                .points
                .iter()
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .map(|&(x, y)| at(x, y))
                .collect();
            if s.dots {
                for &p in &points {
                    let _ = Circle::with_center(p, 7)
                        .into_styled(PrimitiveStyle::with_fill(color))
                        .draw(&mut canvas);
                }
            } else {
                for pair in points.windows(2) {
                    let _ = Line::new(pair[0], pair[1])
                        .into_styled(PrimitiveStyle::with_stroke(color, 2))
                        .draw(&mut canvas);
                }
            }
            let _ = Text::with_alignment(
                s.label,
                Point::new(w - RIGHT - 4, TOP + 4 + 14 * i as i32),
                MonoTextStyle::new(&ascii::FONT_6X13_BOLD, color),
                Alignment::Right,
            )
            .draw(&mut canvas);
        }
        canvas
    }

    /// Renders the chart and writes it as an 8-bit RGB PNG, atomically.
    pub fn write_png(&self, path: &Path) -> Result<()> {
        let canvas = self.render();
        let mut bytes = Vec::new();
        let mut encoder = png::Encoder::new(&mut bytes, canvas.width, canvas.height);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let bad = |e: png::EncodingError| Error::Data {
            file: path.to_path_buf(),
            reason: format!("PNG encoding failed: {e}"),
        };
        let mut writer = encoder.write_header().map_err(bad)?;
        writer.write_image_data(&canvas.rgb).map_err(bad)?;
        writer.finish().map_err(bad)?;
        crate::io::write_atomic(path, &bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chart_draws_its_series_in_their_colours() {
        let chart = Chart {
            title: "t",
            x_label: "x",
            y_label: "y",
            series: vec![Series {
                label: "s",
                color: 0xff0000,
                points: vec![(0.0, 0.0), (1.0, 1.0)],
                dots: false,
            }],
        };
        let canvas = chart.render();
        let red = canvas
            .rgb
            .chunks(3)
            .filter(|p| p[0] > 200 && p[1] < 50 && p[2] < 50)
            .count();
        assert!(red > 500, "{red} red pixels");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.png");
        chart.write_png(&path).unwrap();
        assert_eq!(&std::fs::read(&path).unwrap()[1..4], b"PNG");
    }
}
