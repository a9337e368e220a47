//! Horizontal bar charts as small standalone SVG files, listed as markdown images.

use std::path::Path;

/// A horizontal bar chart: a title and labelled values.
#[derive(Debug, Clone)]
pub struct Chart {
    title: String,
    bars: Vec<(String, f64)>,
}

const WIDTH: f64 = 720.0;
const LABEL_WIDTH: f64 = 220.0;
const BAR_HEIGHT: f64 = 26.0;
const TOP: f64 = 40.0;
const COLOURS: [&str; 6] = [
    "#2b6cb0", "#c05621", "#2f855a", "#6b46c1", "#b7791f", "#4a5568",
];

fn escape(t: &str) -> String {
    t.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

impl Chart {
    /// A chart titled `title` with `bars` (label, value), top to bottom.
    pub fn new(title: &str, bars: Vec<(String, f64)>) -> Self {
        Self {
            title: title.to_string(),
            bars,
        }
    }

    /// Bar `i`: its label, the bar, and the value after it; `max` is the longest bar's value.
    fn bar(&self, i: usize, max: f64) -> String {
        let (label, v) = &self.bars[i];
        let y = TOP + BAR_HEIGHT * i as f64;
        let len = (WIDTH - LABEL_WIDTH - 110.0) * v / max;
        let value = if *v >= 100.0 {
            format!("{v:.0}")
        } else {
            format!("{v:.2}")
        };
        format!(
            "<text x=\"10\" y=\"{:.1}\">{}</text>\n\
             <rect x=\"{LABEL_WIDTH}\" y=\"{:.1}\" width=\"{len:.1}\" \
             height=\"{:.1}\" fill=\"{}\"/>\n\
             <text x=\"{:.1}\" y=\"{:.1}\">{value}</text>\n",
            y + 17.0,
            escape(label),
            y + 4.0,
            BAR_HEIGHT - 8.0,
            COLOURS[i % COLOURS.len()],
            LABEL_WIDTH + len + 6.0,
            y + 17.0,
        )
    }

    /// The chart as an SVG document.
    pub fn svg(&self) -> String {
        let h = TOP + BAR_HEIGHT * self.bars.len() as f64 + 16.0;
        let max = self
            .bars
            .iter()
            .map(|b| b.1)
            .filter(|v| v.is_finite())
            .fold(0.0_f64, f64::max)
            .max(f64::MIN_POSITIVE);
        let mut out = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{h}\" \
             font-family=\"sans-serif\" font-size=\"13\">\n\
             <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
             <text x=\"10\" y=\"22\" font-size=\"15\" font-weight=\"bold\">{}</text>\n",
            escape(&self.title)
        );
        for i in 0..self.bars.len() {
            out.push_str(&self.bar(i, max));
        }
        out.push_str("</svg>\n");
        out
    }
}

/// Writes `charts` into `dir` as `chart-NN.svg` and prints a "Charts" section linking them
/// as `bench/chart-NN.svg` (where docs/benchmarks.md finds them).
pub fn write_all(dir: &Path, charts: &[Chart]) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    println!("\n## Charts\n");
    for (i, c) in charts.iter().enumerate() {
        let name = format!("chart-{i:02}.svg");
        std::fs::write(dir.join(&name), c.svg()).map_err(|e| format!("{name}: {e}"))?;
        println!("![{}](bench/{name})\n", c.title);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_bar_per_value() {
        let c = Chart::new("a <b>", vec![("x".into(), 1.0), ("y & z".into(), 250.0)]);
        let svg = c.svg();
        assert!(svg.contains("a &lt;b&gt;") && svg.contains("y &amp; z"));
        assert_eq!(svg.matches("<rect x=").count(), 2);
        assert!(svg.contains(">250</text>") && svg.contains(">1.00</text>"));
    }
}
