//! `tidewatch-eval --plot DIR`: one SVG per replayed series, so that a user tuning a
//! detector can see what it did: the values, the labelled windows shaded, a dot on
//! every `anomaly` and a vertical line at every `alert`.

use std::path::{Path, PathBuf};

use plotters::prelude::*;

use super::Judged;

/// Size of every plot, in pixels.
const SIZE: (u32, u32) = (1600, 420);
/// Shade of a labelled window.
const WINDOW: RGBColor = RGBColor(255, 205, 110);
/// Colour of an `anomaly` dot.
const ANOMALY: RGBColor = RGBColor(230, 120, 0);
/// Colour of the value line.
const VALUE: RGBColor = RGBColor(40, 90, 180);

/// A plot that could not be written.
#[derive(Debug, thiserror::Error)]
#[error("cannot draw {path}: {message}")]
pub struct PlotError {
    /// The file being written.
    pub path: PathBuf,
    /// What went wrong.
    pub message: String,
}

/// One series to draw.
#[derive(Debug, Clone, Copy)]
pub struct PlotInput<'a> {
    /// Title (series and detector).
    pub title: &'a str,
    /// The values, one per row.
    pub values: &'a [f64],
    /// Labelled windows as inclusive row ranges.
    pub windows: &'a [(usize, usize)],
    /// What the detector said about every row.
    pub judged: &'a Judged,
}

/// A file name for `series` judged by `detector`: path separators and anything
/// unusual become `_`, and `.svg` is appended.
pub fn file_name(detector: &str, series: &str) -> String {
    let clean = |s: &str| -> String {
        s.trim_end_matches(".csv")
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    };
    format!("{}__{}.svg", clean(detector), clean(series))
}

/// Draws `input` into the SVG file `path`.
pub fn draw(path: &Path, input: &PlotInput<'_>) -> Result<(), PlotError> {
    draw_inner(path, input).map_err(|e| PlotError {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

fn draw_inner(path: &Path, input: &PlotInput<'_>) -> Result<(), Box<dyn std::error::Error>> {
    let values = input.values;
    let rows = values.len().max(2);
    let (mut lo, mut hi) = values
        .iter()
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| {
            (a.min(v), b.max(v))
        });
    if !lo.is_finite() || !hi.is_finite() {
        (lo, hi) = (0.0, 1.0);
    }
    if lo >= hi {
        (lo, hi) = (lo - 1.0, hi + 1.0);
    }
    let pad = (hi - lo) * 0.05;
    let (lo, hi) = (lo - pad, hi + pad);

    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(input.title, ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(80)
        .build_cartesian_2d(0..rows, lo..hi)?;
    chart.configure_mesh().disable_mesh().x_desc("row").draw()?;
    chart
        .draw_series(
            input
                .windows
                .iter()
                .map(|&(s, e)| Rectangle::new([(s, lo), (e + 1, hi)], WINDOW.mix(0.6).filled())),
        )?
        .label("labelled window")
        .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 15, y + 5)], WINDOW.filled()));
    chart
        .draw_series(LineSeries::new(
            values.iter().enumerate().map(|(i, &v)| (i, v)),
            VALUE.stroke_width(1),
        ))?
        .label("value")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 15, y)], VALUE));
    let flagged = |flags: &'_ [bool]| -> Vec<usize> {
        flags
            .iter()
            .enumerate()
            .filter(|(_, f)| **f)
            .map(|(i, _)| i)
            .collect()
    };
    chart
        .draw_series(
            flagged(&input.judged.anomaly)
                .into_iter()
                .filter(|&i| i < values.len())
                .map(|i| Circle::new((i, values[i]), 2, ANOMALY.filled())),
        )?
        .label("anomaly")
        .legend(|(x, y)| Circle::new((x + 7, y), 3, ANOMALY.filled()));
    chart
        .draw_series(
            flagged(&input.judged.alert)
                .into_iter()
                .map(|i| PathElement::new(vec![(i, lo), (i, hi)], RED.stroke_width(1))),
        )?
        .label("alert")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 15, y)], RED));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_values_windows_and_marks() {
        let dir = std::env::temp_dir().join(format!("tidewatch-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let values: Vec<f64> = (0..300).map(|i| f64::from(i % 17)).collect();
        let mut judged = Judged::default();
        for i in 0..300 {
            judged.anomaly.push(i == 100 || i == 101);
            judged.alert.push(i == 100);
            judged.score.push(0.0);
        }
        let path = dir.join(file_name("robust", "realKnownCause/nyc taxi.csv"));
        assert!(
            path.ends_with("robust__realKnownCause_nyc_taxi.svg"),
            "{path:?}"
        );
        draw(
            &path,
            &PlotInput {
                title: "nyc taxi / robust",
                values: &values,
                windows: &[(90, 120)],
                judged: &judged,
            },
        )
        .unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..60.min(svg.len())]);
        assert!(svg.contains("nyc taxi / robust"));
        // Two anomaly dots and the legend's.
        assert_eq!(svg.matches("<circle").count(), 3, "{svg}");
        for label in ["labelled window", "value", "anomaly", "alert"] {
            assert!(svg.contains(label), "legend lacks {label}");
        }
    }
}
