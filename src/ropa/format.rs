//! The register rendered for a DPO: a Markdown table, CSV (RFC 4180) or JSON.

use super::model::{Activity, Register};

impl Register {
    /// A GitHub-flavoured Markdown table. The Namespace column is left out when no row has
    /// a namespace (objects read from files without one).
    pub fn to_markdown(&self) -> String {
        let with_ns = self.activities.iter().any(|a| !a.namespace.is_empty());
        let mut headers = COLUMNS.to_vec();
        if !with_ns {
            headers.remove(0);
        }
        let mut out = String::new();
        out.push_str(&format!("| {} |\n", headers.join(" | ")));
        out.push_str(&format!("|{}\n", "---|".repeat(headers.len())));
        for a in &self.activities {
            let mut cells = a.cells(markdown_cell, "<br>");
            if !with_ns {
                cells.remove(0);
            }
            out.push_str(&format!("| {} |\n", cells.join(" | ")));
        }
        out
    }

    /// CSV as RFC 4180 has it: a header row, CRLF line ends, fields quoted when they hold a
    /// comma, a quote or a line break, quotes doubled.
    pub fn to_csv(&self) -> String {
        let mut out = String::new();
        let row = |cells: &[String]| {
            let fields: Vec<String> = cells.iter().map(|c| csv_field(c)).collect();
            format!("{}\r\n", fields.join(","))
        };
        let headers: Vec<String> = COLUMNS.iter().map(|c| c.to_string()).collect();
        out.push_str(&row(&headers));
        for a in &self.activities {
            out.push_str(&row(&a.cells(str::to_string, "; ")));
        }
        out
    }

    /// Pretty JSON: `{"activities": [...]}`, with a trailing newline.
    pub fn to_json(&self) -> String {
        let mut out = serde_json::to_string_pretty(self).expect("the register serializes");
        out.push('\n');
        out
    }
}

const COLUMNS: [&str; 11] = [
    "Namespace",
    "Processing activity",
    "Description",
    "Purpose",
    "Legal basis",
    "Data subjects",
    "Categories of data",
    "Storage",
    "Retention",
    "Last sweep",
    "Compliant",
];

impl Activity {
    /// The cells in the order of `COLUMNS`, each text passed through `escape`; storage
    /// entries are escaped one by one and joined by `sep`.
    fn cells(&self, escape: fn(&str) -> String, sep: &str) -> Vec<String> {
        let locations: Vec<String> = self.storage.iter().map(|s| escape(&s.location)).collect();
        let last_sweep = match (&self.last_sweep, self.status_known) {
            (Some(l), _) => format!("{} ({})", l.completion_time, l.outcome),
            (None, true) => "never".to_string(),
            (None, false) => "unknown".to_string(),
        };
        let compliant = match &self.compliant {
            Some(c) if c.reason.is_empty() => c.status.clone(),
            Some(c) => format!("{} ({})", c.status, c.reason),
            None => "unknown".to_string(),
        };
        let mut cells: Vec<String> = [
            &self.namespace,
            &self.name,
            &self.description,
            &self.purpose,
            &self.legal_basis_text,
            &self.data_subjects.join(", "),
            &self.data_categories.join(", "),
        ]
        .into_iter()
        .map(|c| escape(c))
        .collect();
        cells.push(locations.join(sep));
        cells.extend([&self.retention_text, &last_sweep, &compliant].map(|c| escape(c)));
        cells
    }
}

/// One Markdown table cell: Markdown's own characters backslash-escaped (a pipe would end
/// the cell, `*` or `_` start emphasis), line breaks as `<br>`.
fn markdown_cell(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' | '|' | '*' | '_' | '`' | '<' | '[' | '~' => {
                out.push('\\');
                out.push(c);
            }
            '\r' => {
                if chars.peek() == Some(&'\n') {
                    chars.next();
                }
                out.push_str("<br>");
            }
            '\n' => out.push_str("<br>"),
            _ => out.push(c),
        }
    }
    out
}

/// One RFC 4180 field: quoted when it holds a comma, a quote or a line break, quotes doubled.
fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\r', '\n']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_string()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::*;
    use crate::ropa::fixtures::{cache, policy, redis_target, spec};

    /// The `|` of a Markdown row that separate cells (not the escaped ones).
    fn cell_separators(row: &str) -> usize {
        let mut n = 0;
        let mut escaped = false;
        for c in row.chars() {
            match c {
                '\\' if !escaped => escaped = true,
                '|' if !escaped => n += 1,
                _ => escaped = false,
            }
            if c != '\\' {
                escaped = false;
            }
        }
        n
    }

    #[test]
    fn markdown_escapes_pipes_line_breaks_and_emphasis() {
        let mut s = spec(redis_target());
        s["description"] = json!("Sessions | carts\nand more\r\nstill");
        s["purpose"] = json!("*very* important_stuff `code` <b> [link] back\\slash");
        let register = Register::build(&[policy("shop", "p", s, None)], &[cache("shop")]);
        let md = register.to_markdown();
        let lines: Vec<&str> = md.lines().collect();
        assert_eq!(lines.len(), 3, "header, rule, one row: {md}");
        let columns = cell_separators(lines[0]);
        assert_eq!(columns, COLUMNS.len() + 1);
        assert_eq!(lines[1], format!("|{}", "---|".repeat(COLUMNS.len())));
        assert_eq!(cell_separators(lines[2]), columns, "{}", lines[2]);
        assert!(lines[2].contains("| Sessions \\| carts<br>and more<br>still |"));
        assert!(lines[2]
            .contains("| \\*very\\* important\\_stuff \\`code\\` \\<b> \\[link] back\\\\slash |"));
        assert!(lines[2].contains("redis keys session:\\* (DataStore cache)"));
    }

    #[test]
    fn markdown_leaves_out_an_empty_namespace_column() {
        let register = Register::build(&[policy("", "p", spec(redis_target()), None)], &[]);
        let md = register.to_markdown();
        assert!(
            md.starts_with("| Processing activity | Description |"),
            "{md}"
        );
        let with_ns = Register::build(&[policy("shop", "p", spec(redis_target()), None)], &[]);
        assert!(with_ns
            .to_markdown()
            .starts_with("| Namespace | Processing activity |"));
        assert!(with_ns
            .to_markdown()
            .contains("\n| shop | p | Web sessions |"));
    }

    #[test]
    fn status_absent_never_swept_and_swept() {
        let none = policy("shop", "a", spec(redis_target()), None);
        let never = policy(
            "shop",
            "b",
            spec(redis_target()),
            Some(json!({"conditions": []})),
        );
        let swept = policy(
            "shop",
            "c",
            spec(redis_target()),
            Some(json!({
                "lastSweep": {"startTime": "2026-11-20T03:00:00Z",
                              "completionTime": "2026-11-20T03:00:12Z",
                              "outcome": "PartiallyFailed", "deleted": 5},
                "conditions": [{"type": "Compliant", "status": "False", "reason": "SweepFailed",
                                "lastTransitionTime": "2026-11-20T03:00:12Z"}],
            })),
        );
        let register = Register::build(&[swept, never, none], &[cache("shop")]);
        let rows: Vec<Vec<String>> = register
            .activities
            .iter()
            .map(|a| a.cells(str::to_string, "; "))
            .collect();
        let (sweep, compliant) = (COLUMNS.len() - 2, COLUMNS.len() - 1);
        assert_eq!(
            (&*rows[0][sweep], &*rows[0][compliant]),
            ("unknown", "unknown")
        );
        assert_eq!(
            (&*rows[1][sweep], &*rows[1][compliant]),
            ("never", "unknown")
        );
        assert_eq!(rows[2][sweep], "2026-11-20T03:00:12Z (PartiallyFailed)");
        assert_eq!(rows[2][compliant], "False (SweepFailed)");
        assert!(!register.activities[0].status_known);
        assert!(register.activities[1].status_known);
    }

    #[test]
    fn csv_follows_rfc_4180() {
        assert_eq!(csv_field("plain text"), "plain text");
        assert_eq!(csv_field("a, b"), "\"a, b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("two\nlines"), "\"two\nlines\"");
        assert_eq!(csv_field("cr\rhere"), "\"cr\rhere\"");
        assert_eq!(csv_field(""), "");

        let mut s = spec(redis_target());
        s["description"] = json!("Sessions, \"carts\"\nand more");
        let csv = Register::build(&[policy("shop", "p", s, None)], &[cache("shop")]).to_csv();
        assert!(csv.ends_with("\r\n"));
        let records: Vec<&str> = csv.split("\r\n").collect();
        assert_eq!(
            records.len(),
            3,
            "header, one record, and the final CRLF: {csv:?}"
        );
        assert_eq!(records[0], COLUMNS.join(","));
        assert_eq!(
            records[1],
            "shop,p,\"Sessions, \"\"carts\"\"\nand more\",Keep customers signed in,\
             Contract (Art. 6(1)(b)),\"customers, visitors\",\"user ID, session data\",\
             redis keys session:* (DataStore cache),30 days,unknown,unknown"
        );
    }

    #[test]
    fn json_has_one_object_per_activity() {
        let register = Register::build(
            &[policy("shop", "p", spec(redis_target()), None)],
            &[cache("shop")],
        );
        let value: Value = serde_json::from_str(&register.to_json()).expect("valid JSON");
        assert_eq!(
            value,
            json!({"activities": [{
                "namespace": "shop",
                "name": "p",
                "description": "Web sessions",
                "purpose": "Keep customers signed in",
                "legalBasis": "contract",
                "legalBasisText": "Contract (Art. 6(1)(b))",
                "dataSubjects": ["customers", "visitors"],
                "dataCategories": ["user ID", "session data"],
                "storage": [{"target": "sessions", "store": "cache", "kind": "redis",
                             "storeFound": true,
                             "location": "redis keys session:* (DataStore cache)",
                             "insecure": false}],
                "retention": "30d",
                "retentionText": "30 days",
                "statusKnown": false,
                "lastSweep": null,
                "compliant": null,
            }]})
        );
    }
}
