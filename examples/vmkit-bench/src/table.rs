//! Markdown tables, and the ratio columns that follow the per-VMM columns.

use crate::stats::ratio;
use crate::vmm::Vmm;

/// A markdown table: a header row, the separator, rows; printed at once.
#[derive(Debug, Default)]
pub struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column headings.
    pub fn new<S: Into<String>>(header: impl IntoIterator<Item = S>) -> Self {
        let mut t = Self::default();
        t.row(header);
        t
    }

    /// Appends a row.
    pub fn row<S: Into<String>>(&mut self, cells: impl IntoIterator<Item = S>) {
        self.rows.push(cells.into_iter().map(Into::into).collect());
    }

    /// The table as markdown, one line per row, `|---|` under the header.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (i, row) in self.rows.iter().enumerate() {
            out.push_str(&line(row));
            out.push('\n');
            if i == 0 {
                out.push_str(&format!("|{}\n", "---|".repeat(row.len())));
            }
        }
        out
    }

    /// Prints [`render`](Self::render).
    pub fn print(&self) {
        print!("{}", self.render());
    }
}

fn line(cells: &[String]) -> String {
    let mut s = String::from("|");
    for c in cells {
        if c.is_empty() {
            s.push_str(" |");
        } else {
            s.push_str(&format!(" {c} |"));
        }
    }
    s
}

/// The VMMs vmkit is compared against, in the order of their ratio columns.
pub const OTHERS: [Vmm; 2] = [Vmm::Qemu, Vmm::Baseline];

/// The heading of the ratio of vmkit to `other`.
pub fn ratio_head(other: Vmm) -> &'static str {
    match other {
        Vmm::Qemu => "vmkit / QEMU",
        Vmm::Baseline => "vmkit / baseline",
        Vmm::Vmkit => "vmkit / vmkit",
    }
}

/// The ratio columns after one column per VMM of `vmms`: `vmkit / QEMU` and
/// `vmkit / baseline`, those whose VMM is there.
pub fn ratio_heads(vmms: &[Vmm]) -> Vec<String> {
    OTHERS
        .into_iter()
        .filter(|o| vmms.contains(o))
        .map(|o| ratio_head(o).to_string())
        .collect()
}

/// The cells under [`ratio_heads`] for `values`, one per VMM of `vmms` in the same order,
/// with `digits` decimals.
pub fn ratio_cells(vmms: &[Vmm], values: &[f64], digits: usize) -> Vec<String> {
    let of = |vmm: Vmm| {
        vmms.iter()
            .position(|&v| v == vmm)
            .and_then(|i| values.get(i).copied())
    };
    let vmkit = of(Vmm::Vmkit).unwrap_or(f64::NAN);
    OTHERS
        .into_iter()
        .filter_map(|other| of(other).map(|v| ratio(vmkit, v, digits)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markdown() {
        let mut t = Table::new(["a", "b"]);
        t.row(["1", ""]);
        assert_eq!(t.render(), "| a | b |\n|---|---|\n| 1 | |\n");
    }

    #[test]
    fn ratios() {
        let all = [Vmm::Vmkit, Vmm::Baseline, Vmm::Qemu];
        assert_eq!(ratio_heads(&all), ["vmkit / QEMU", "vmkit / baseline"]);
        assert_eq!(ratio_cells(&all, &[1.0, 2.0, 4.0], 2), ["0.25", "0.50"]);
        assert!(ratio_heads(&[Vmm::Vmkit]).is_empty());
        assert_eq!(
            ratio_cells(&[Vmm::Vmkit, Vmm::Qemu], &[3.0, 2.0], 1),
            ["1.5"]
        );
    }
}
