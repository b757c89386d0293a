//! Server-rendered SVG charts for the dashboard: a line chart of several series over labelled
//! buckets, and horizontal bars of a value against a limit. Both draw axes, gridlines and
//! labels with presentation attributes only (no `style`, no script), so the page's
//! Content-Security-Policy needs nothing for them. Every label passes through
//! [`crate::http::html::escape`].

use crate::http::html::escape;
use std::fmt::Write as _;

/// One line of a [`line_chart`].
pub struct Series<'a> {
    /// Legend text.
    pub name: &'a str,
    /// Stroke colour (a CSS colour literal).
    pub color: &'a str,
    /// One value per bucket; `None` leaves a gap.
    pub values: Vec<Option<f64>>,
}

const WIDTH: f64 = 640.0;
const HEIGHT: f64 = 220.0;
const LEFT: f64 = 48.0;
const RIGHT: f64 = 12.0;
const TOP: f64 = 12.0;
const BOTTOM: f64 = 40.0;
/// Horizontal gridlines (and y-axis labels) besides the axis.
const Y_TICKS: usize = 4;

/// A line chart: `labels` name the buckets along the x axis (about eight are printed),
/// `y_max` fixes the top of the y axis (else the largest value, at least 1), `unit` follows
/// each y label.
pub fn line_chart(
    title: &str,
    labels: &[String],
    series: &[Series<'_>],
    y_max: Option<f64>,
    unit: &str,
) -> String {
    let largest = series
        .iter()
        .flat_map(|s| s.values.iter().flatten())
        .fold(0.0_f64, |a, b| a.max(*b));
    let top = y_max.unwrap_or_else(|| nice_ceiling(largest.max(1.0)));
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let step = plot_w / (labels.len().max(2) - 1) as f64;
    let x = |i: usize| LEFT + i as f64 * step;
    let y = |v: f64| TOP + plot_h * (1.0 - (v / top).clamp(0.0, 1.0));
    let mut svg = open_svg(title);
    for tick in 0..=Y_TICKS {
        let value = top * tick as f64 / Y_TICKS as f64;
        let _ = write!(
            svg,
            "<line x1=\"{LEFT}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#ddd\"/>\
             <text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\" font-size=\"11\">{}{}</text>",
            WIDTH - RIGHT,
            LEFT - 4.0,
            y(value) + 4.0,
            format_number(value),
            escape(unit),
            y = y(value),
        );
    }
    let every = labels.len().div_ceil(8).max(1);
    for (i, label) in labels.iter().enumerate().filter(|(i, _)| i % every == 0) {
        let _ = write!(
            svg,
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\" font-size=\"11\">{}</text>",
            x(i),
            HEIGHT - BOTTOM + 16.0,
            escape(label)
        );
    }
    let _ = write!(
        svg,
        "<line x1=\"{LEFT}\" x2=\"{LEFT}\" y1=\"{TOP}\" y2=\"{}\" stroke=\"#333\"/>\
         <line x1=\"{LEFT}\" x2=\"{}\" y1=\"{0}\" y2=\"{0}\" stroke=\"#333\"/>",
        HEIGHT - BOTTOM,
        WIDTH - RIGHT,
    );
    for (n, s) in series.iter().enumerate() {
        for segment in segments(&s.values) {
            let points: Vec<String> = segment
                .iter()
                .map(|&(i, v)| format!("{:.1},{:.1}", x(i), y(v)))
                .collect();
            let _ = write!(
                svg,
                "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"2\" points=\"{}\"/>",
                escape(s.color),
                points.join(" ")
            );
            // A dot on each value, so a lone value between gaps is seen too.
            for &(i, v) in &segment {
                let _ = write!(
                    svg,
                    "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"2.5\" fill=\"{}\"/>",
                    x(i),
                    y(v),
                    escape(s.color)
                );
            }
        }
        legend(&mut svg, n, s.name, s.color);
    }
    svg.push_str("</svg>");
    svg
}

/// One bar of a [`bar_chart`].
pub struct Bar<'a> {
    /// Label left of the bar.
    pub label: &'a str,
    /// Length of the bar.
    pub value: f64,
    /// A limit drawn as a marker and printed after the value (`None`: no limit).
    pub limit: Option<f64>,
}

/// Horizontal bars, each with its value (and limit) printed after it; `prefix` goes before
/// every number (`$`). Bars past their limit are drawn in red.
pub fn bar_chart(title: &str, bars: &[Bar<'_>], prefix: &str) -> String {
    let row = 34.0;
    let height = row * bars.len() as f64 + 8.0;
    let label_w = 110.0;
    let bar_w = WIDTH - label_w - 180.0;
    let scale = bars
        .iter()
        .flat_map(|b| [Some(b.value), b.limit])
        .flatten()
        .fold(0.0_f64, f64::max)
        .max(f64::MIN_POSITIVE);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {WIDTH} {height}\" \
         role=\"img\" aria-label=\"{0}\"><title>{0}</title>",
        escape(title)
    );
    for (i, bar) in bars.iter().enumerate() {
        let top = 4.0 + row * i as f64;
        let over = bar.limit.is_some_and(|l| bar.value > l);
        let length = bar_w * (bar.value / scale).clamp(0.0, 1.0);
        let caption = match bar.limit {
            Some(limit) => format!(
                "{prefix}{} of {prefix}{}",
                format_number(bar.value),
                format_number(limit)
            ),
            None => format!("{prefix}{} (no budget)", format_number(bar.value)),
        };
        let _ = write!(
            svg,
            "<text x=\"0\" y=\"{:.1}\" font-size=\"12\">{}</text>\
             <rect x=\"{label_w}\" y=\"{top:.1}\" width=\"{bar_w:.1}\" height=\"22\" fill=\"#eee\"/>\
             <rect x=\"{label_w}\" y=\"{top:.1}\" width=\"{length:.1}\" height=\"22\" fill=\"{}\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"12\">{}</text>",
            top + 15.0,
            escape(bar.label),
            if over { "#c0392b" } else { "#2e86de" },
            label_w + bar_w + 8.0,
            top + 15.0,
            escape(&caption),
        );
        if let Some(limit) = bar.limit {
            let at = label_w + bar_w * (limit / scale).clamp(0.0, 1.0);
            let _ = write!(
                svg,
                "<line x1=\"{at:.1}\" x2=\"{at:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#000\" stroke-width=\"2\"/>",
                top - 2.0,
                top + 24.0
            );
        }
    }
    svg.push_str("</svg>");
    svg
}

fn open_svg(title: &str) -> String {
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {WIDTH} {height}\" role=\"img\" \
         aria-label=\"{title}\"><title>{title}</title>",
        height = HEIGHT + 4.0,
        title = escape(title)
    )
}

/// A legend entry below the x labels.
fn legend(svg: &mut String, n: usize, name: &str, color: &str) {
    let x = LEFT + 130.0 * n as f64;
    let y = HEIGHT - 8.0;
    let _ = write!(
        svg,
        "<rect x=\"{x}\" y=\"{}\" width=\"12\" height=\"4\" fill=\"{}\"/>\
         <text x=\"{}\" y=\"{y}\" font-size=\"11\">{}</text>",
        y - 5.0,
        escape(color),
        x + 16.0,
        escape(name)
    );
}

/// Runs of consecutive present values, with their bucket index.
fn segments(values: &[Option<f64>]) -> Vec<Vec<(usize, f64)>> {
    let mut runs = vec![Vec::new()];
    for (i, value) in values.iter().enumerate() {
        match value {
            Some(v) => runs.last_mut().expect("never empty").push((i, *v)),
            None => runs.push(Vec::new()),
        }
    }
    runs.into_iter().filter(|r| !r.is_empty()).collect()
}

/// The smallest of 1, 2 or 5 times a power of ten at or above `x`.
fn nice_ceiling(x: f64) -> f64 {
    let magnitude = 10f64.powf(x.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * magnitude)
        .find(|&c| c >= x)
        .unwrap_or(10.0 * magnitude)
}

/// A number as short as it stays readable: integers without decimals, else two.
fn format_number(x: f64) -> String {
    if (x - x.round()).abs() < 1e-9 {
        format!("{x:.0}")
    } else {
        format!("{x:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axes_round_up_to_readable_values() {
        assert_eq!(nice_ceiling(1.0), 1.0);
        assert_eq!(nice_ceiling(3.2), 5.0);
        assert_eq!(nice_ceiling(17.0), 20.0);
        assert_eq!(nice_ceiling(0.031), 0.05);
        assert_eq!(format_number(20.0), "20");
        assert_eq!(format_number(0.126), "0.13");
    }

    #[test]
    fn a_line_chart_draws_each_series_and_escapes_labels() {
        let labels: Vec<String> = ["<a>", "b", "c"].map(String::from).to_vec();
        let svg = line_chart(
            "jobs & more",
            &labels,
            &[Series {
                name: "ok",
                color: "#080",
                values: vec![Some(1.0), None, Some(4.0)],
            }],
            None,
            "",
        );
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
        assert!(svg.contains("jobs &amp; more") && svg.contains("&lt;a&gt;"));
        assert!(!svg.contains("<a>"));
        assert_eq!(svg.matches("<polyline").count(), 2, "a gap splits the line");
        assert!(svg.contains(">5</text>"), "the axis tops at 5: {svg}");
    }

    #[test]
    fn bars_past_their_limit_are_red() {
        let svg = bar_chart(
            "spend",
            &[
                Bar {
                    label: "day",
                    value: 12.0,
                    limit: Some(10.0),
                },
                Bar {
                    label: "month",
                    value: 3.0,
                    limit: None,
                },
            ],
            "$",
        );
        assert!(svg.contains("#c0392b"));
        assert!(svg.contains("$12 of $10"));
        assert!(svg.contains("$3 (no budget)"));
    }
}
