//! `--plot`: the latency distributions of the latency categories, one panel each, as an SVG
//! (cumulative percentile over latency on a log axis). SVG text needs no font files, so this
//! builds without system font libraries.

use std::path::Path;

use plotters::prelude::*;

use super::report::{Category, Report, Side};
use super::BenchError;

const PANEL_HEIGHT: u32 = 420;
/// Distinguishable line colours (no pale yellow, none close to the floor's black), one per
/// series of a panel: more than any category has rows.
const COLORS: [RGBColor; 12] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(23, 190, 207),
    RGBColor(188, 189, 34),
    RGBColor(0, 0, 128),
    RGBColor(0, 128, 128),
];
const WIDTH: u32 = 1100;
/// The legend's column, right of each panel's chart (so it never covers a curve).
const LEGEND_WIDTH: u32 = 330;

/// Refuses a plot path whose extension is not `.svg` (or absent): only SVG is drawn.
pub fn check_extension(path: &Path) -> Result<(), BenchError> {
    match path.extension().and_then(|e| e.to_str()) {
        Some(e) if e.eq_ignore_ascii_case("svg") => Ok(()),
        None => Ok(()),
        Some(e) => Err(BenchError::Output(format!(
            "--plot writes SVG (built without font libraries); `.{e}` is not supported, use a .svg file"
        ))),
    }
}

/// Writes the plot of `report` to `path` (SVG; other extensions are refused).
pub fn write_svg(report: &Report, path: &Path) -> Result<(), BenchError> {
    check_extension(path)?;
    let cats: Vec<Category> = Category::ALL
        .into_iter()
        .filter(|&c| {
            c != Category::Throughput
                && report
                    .rows
                    .iter()
                    .any(|r| r.category == c && r.latency.is_some())
        })
        .collect();
    let err = |e: &dyn std::fmt::Display| BenchError::Output(format!("{}: {e}", path.display()));
    let root =
        SVGBackend::new(path, (WIDTH, PANEL_HEIGHT * cats.len().max(1) as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let panels = root.split_evenly((cats.len().max(1), 1));
    for (cat, area) in cats.iter().zip(panels.iter()) {
        draw_panel(report, *cat, area).map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

fn draw_panel<DB: DrawingBackend>(
    report: &Report,
    cat: Category,
    area: &DrawingArea<DB, plotters::coord::Shift>,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let rows: Vec<_> = report
        .rows
        .iter()
        .filter(|r| r.category == cat || (r.side == Side::Floor && cat != Category::Single))
        .filter_map(|r| r.latency.as_ref().map(|l| (r, l)))
        .collect();
    // x range: from the fastest minimum to the slowest 99.9th percentile (µs).
    let lo = rows
        .iter()
        .map(|(_, l)| l.min_ns / 1000.0)
        .fold(f64::INFINITY, f64::min)
        .max(0.001)
        * 0.8;
    let hi = rows
        .iter()
        .map(|(_, l)| {
            l.cdf
                .iter()
                .find(|p| p[0] >= 99.9)
                .map_or(l.max_ns, |p| p[1])
                / 1000.0
        })
        .fold(0.0, f64::max)
        .max(lo * 10.0)
        * 1.25;
    let (chart_area, legend_area) = area.split_horizontally(WIDTH - LEGEND_WIDTH);
    let mut chart = ChartBuilder::on(&chart_area)
        .caption(
            format!(
                "{} — latency distribution",
                cat.title(report.settings.cores)
            ),
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d((lo..hi).log_scale(), 0.0..100.0)?;
    chart
        .configure_mesh()
        .x_desc("round trip (µs, log scale)")
        .y_desc("percentile")
        .x_label_formatter(&|v| format!("{v:.2}"))
        .draw()?;
    // The floor is black; every other series takes the next palette colour.
    let mut next_color = COLORS.iter().cycle();
    let mut legend = Vec::with_capacity(rows.len());
    for (row, lat) in &rows {
        let color = if row.side == Side::Floor {
            BLACK.to_rgba()
        } else {
            next_color.next().expect("cycle").to_rgba()
        };
        let width = match row.side {
            Side::Ours => 3,
            Side::Floor => 2,
            Side::Peer => 1,
        };
        let style = ShapeStyle::from(color).stroke_width(width);
        let points = lat
            .cdf
            .iter()
            .map(|p| ((p[1] / 1000.0).clamp(lo, hi), p[0]))
            .collect::<Vec<_>>();
        chart.draw_series(LineSeries::new(points, style))?;
        legend.push((row.name.as_str(), style));
    }
    // The legend, in its own column beside the chart, one line per series.
    let (x, mut y) = (8, 40);
    for (name, style) in legend {
        legend_area.draw(&PathElement::new(vec![(x, y), (x + 24, y)], style))?;
        legend_area.draw(&Text::new(
            name.to_string(),
            (x + 32, y - 7),
            ("sans-serif", 13).into_font(),
        ))?;
        y += 22;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every series of a panel gets its own colour: the palette has no repeats, none is the
    /// floor's black, and it covers the largest category of a run.
    #[test]
    fn palette_colours_are_distinct_and_enough() {
        for (i, a) in COLORS.iter().enumerate() {
            assert_ne!(*a, BLACK, "colour {i} is the floor's");
            for b in &COLORS[i + 1..] {
                assert_ne!(a, b, "colour {i} repeats");
            }
        }
        // The largest panel is the first: the single-call rows after the floor, up to the
        // first broadcast row (ROW_IDS is in table order).
        let ids = super::super::ROW_IDS;
        let single = ids.iter().position(|&id| id == "call_others").expect("row") - 1;
        assert!(
            single <= COLORS.len(),
            "{single} series, {} colours",
            COLORS.len()
        );
    }
}
