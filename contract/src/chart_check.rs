//! What the Helm chart's Grafana dashboard and alert rules query, against what a process exports:
//! the check both the operator's and the chat server's tests run on their own metrics.

use std::collections::BTreeSet;

/// The dashboard and the rules file the chart ships, relative to the chart.
pub const CHART_FILES: [&str; 2] = ["dashboards/parley.json", "files/alerts.yaml"];

/// The chart's directory in this repository.
pub fn chart_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/parley-operator")
}

/// The PromQL of `file` of the chart: a dashboard's panel `expr`s and template variables' `query`, or
/// a rules file's `expr`s, with descriptions and everything else left out.
pub fn queries(file: &str) -> Vec<String> {
    fn walk(value: &serde_json::Value, out: &mut Vec<String>) {
        match value {
            serde_json::Value::Object(map) => {
                for (key, value) in map {
                    match (key.as_str(), value) {
                        ("expr" | "query", serde_json::Value::String(q)) => out.push(q.clone()),
                        ("query", serde_json::Value::Object(q)) => {
                            out.extend(q.get("query").and_then(|q| q.as_str()).map(str::to_owned))
                        }
                        _ => walk(value, out),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let path = chart_dir().join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let value: serde_json::Value = if file.ends_with(".json") {
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{file}: {e}"))
    } else {
        serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{file}: {e}"))
    };
    let mut out = Vec::new();
    walk(&value, &mut out);
    out
}

/// The metric names starting with `prefix` in `queries`, leaving out those starting with `except`.
pub fn referenced(queries: &[String], prefix: &str, except: Option<&str>) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for query in queries {
        for (at, _) in query.match_indices(prefix) {
            let before = query[..at].chars().next_back();
            if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
                continue;
            }
            let name: String = query[at..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            if except.is_none_or(|except| !name.starts_with(except)) {
                names.insert(name);
            }
        }
    }
    names
}

/// Every sample name an OpenMetrics or Prometheus text exposition can show, from its `# TYPE` lines: a
/// counter's `_total`, a histogram's `_bucket`, `_sum` and `_count`, any other family's own name. A
/// family with no series yet (no error counted, say) is there too.
pub fn declared(exposition: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for declared in exposition.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
        let Some((family, kind)) = declared.split_once(' ') else { continue };
        let suffixes: &[&str] = match kind {
            "counter" => &["_total"],
            "histogram" => &["_bucket", "_sum", "_count"],
            _ => &[""],
        };
        names.extend(suffixes.iter().map(|suffix| format!("{family}{suffix}")));
    }
    names
}

/// The names each chart file queries (with `prefix`, not `except`) that `exported` lacks, by file.
/// Panics if a file queries none at all: a check that finds nothing to check proves nothing.
pub fn unknown(exported: &BTreeSet<String>, prefix: &str, except: Option<&str>) -> Vec<(String, Vec<String>)> {
    CHART_FILES
        .iter()
        .map(|file| {
            let used = referenced(&queries(file), prefix, except);
            assert!(!used.is_empty(), "{file} queries no {prefix}* metric");
            (file.to_string(), used.difference(exported).cloned().collect::<Vec<_>>())
        })
        .filter(|(_, missing)| !missing.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_read_from_queries_and_type_lines() {
        let q = vec!["sum(rate(parley_x_total[5m])) / my_parley_y + parley_operator_z".to_owned()];
        assert_eq!(referenced(&q, "parley_", Some("parley_operator_")), BTreeSet::from(["parley_x_total".into()]));
        let text = "# TYPE parley_x counter\n# TYPE parley_h histogram\n# TYPE parley_g gauge\nparley_g 1\n";
        let names = declared(text);
        assert!(["parley_x_total", "parley_h_bucket", "parley_h_count", "parley_g"].iter().all(|n| names.contains(*n)));
    }
}
