//! What the tool writes for people: CSV tables and SVG line charts (plotters).

use std::path::Path;

use plotters::prelude::*;

use crate::error::{Error, Result};

/// One line of a chart.
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

/// Writes a CSV file: a header row, then rows of already formatted cells ([`csv_text`]).
pub fn write_csv(path: &Path, header: &[&str], rows: &[Vec<String>]) -> Result<()> {
    write_text(path, &csv_text(header, rows))
}

/// Writes `text` to `path`, whole or not at all (as the weights are: a resumed run reads its
/// tables back); a failure is [`Error::Io`] naming the path.
pub fn write_text(path: &Path, text: &str) -> Result<()> {
    crate::io::replace_file(path, text.as_bytes())
}

/// A CSV table as text: a header row, then rows of already formatted cells; a cell holding a
/// comma, a quote or a line break is quoted (RFC 4180: a label naming a path may hold any).
pub fn csv_text(header: &[&str], rows: &[Vec<String>]) -> String {
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let quoted: Vec<String> = cells
            .map(|c| match c.contains([',', '"', '\n', '\r']) {
                true => format!("\"{}\"", c.replace('"', "\"\"")),
                false => c.to_string(),
            })
            .collect();
        quoted.join(",") + "\n"
    };
    let mut text = line(&mut header.iter().copied());
    for r in rows {
        text += &line(&mut r.iter().map(String::as_str));
    }
    text
}

/// The rows of a CSV table of ours after its header, as numbers (NaN where a cell is not one).
pub fn csv_numbers(text: &str) -> Vec<Vec<f64>> {
    text.lines().skip(1).map(|line| line.split(',').map(|c| c.parse().unwrap_or(f64::NAN)).collect()).collect()
}

/// Draws `series` as lines into an SVG file; `log_y` puts the y axis on a log scale (values
/// that are not positive are dropped there).
pub fn line_chart(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    log_y: bool,
) -> Result<()> {
    let plot_err = |e: String| Error::Format { path: path.display().to_string(), msg: format!("plotting: {e}") };
    let keep = |&(x, y): &(f64, f64)| x.is_finite() && y.is_finite() && (!log_y || y > 0.0);
    let pts: Vec<(f64, f64)> = series.iter().flat_map(|s| s.points.iter().copied().filter(keep)).collect();
    if pts.is_empty() {
        return Err(plot_err("nothing to plot".into()));
    }
    let (mut x0, mut x1) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (mut y0, mut y1) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    if x1 <= x0 {
        x1 = x0 + 1.0;
        x0 -= 1.0;
    }
    if log_y {
        (y0, y1) = (y0 / 1.5, y1 * 1.5);
    } else {
        let pad = ((y1 - y0) * 0.05).max(1e-6);
        (y0, y1) = (y0 - pad, y1 + pad);
    }
    let root = SVGBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot_err(e.to_string()))?;
    let mut builder = ChartBuilder::on(&root);
    builder.caption(title, ("sans-serif", 22)).margin(12).x_label_area_size(45).y_label_area_size(70);
    // Twelve distinguishable colours (the variants' analysis draws eleven series).
    let colours = [
        RGBColor(31, 119, 180),
        RGBColor(214, 39, 40),
        RGBColor(44, 160, 44),
        RGBColor(148, 103, 189),
        RGBColor(255, 127, 14),
        RGBColor(23, 190, 207),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
        RGBColor(188, 189, 34),
        RGBColor(0, 0, 0),
        RGBColor(255, 187, 120),
    ];
    macro_rules! draw {
        ($chart:expr) => {{
            let mut chart = $chart.map_err(|e| plot_err(e.to_string()))?;
            chart.configure_mesh().x_desc(x_label).y_desc(y_label).draw().map_err(|e| plot_err(e.to_string()))?;
            for (i, s) in series.iter().enumerate() {
                let c = colours[i % colours.len()];
                let line: Vec<(f64, f64)> = s.points.iter().copied().filter(keep).collect();
                chart
                    .draw_series(LineSeries::new(line, c.stroke_width(2)))
                    .map_err(|e| plot_err(e.to_string()))?
                    .label(s.label.clone())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()
                .map_err(|e| plot_err(e.to_string()))?;
        }};
    }
    if log_y {
        draw!(builder.build_cartesian_2d(x0..x1, (y0..y1).log_scale()));
    } else {
        draw!(builder.build_cartesian_2d(x0..x1, y0..y1));
    }
    root.present().map_err(|e| plot_err(e.to_string()))
}

#[cfg(test)]
mod tests {
    /// analyze's labels name the weights' path, which may hold a comma: such a cell is quoted,
    /// so that every row keeps its header's columns.
    #[test]
    fn cells_with_commas_or_quotes_are_quoted() {
        let rows = [
            vec!["preact from runs/lr0.1,wd1e-4/checkpoint.safetensors".to_string(), "1e0".to_string()],
            vec!["a \"b\"".to_string(), "2".to_string()],
        ];
        let want = "label,x\n\"preact from runs/lr0.1,wd1e-4/checkpoint.safetensors\",1e0\n\"a \"\"b\"\"\",2\n";
        assert_eq!(super::csv_text(&["label", "x"], &rows), want);
    }
}
