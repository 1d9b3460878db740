//! The Grafana dashboard (`deploy/grafana-dashboard.json`) asks only for metrics the server
//! exports: every metric name in a panel's queries or a template variable's query is a family
//! of `GET /metrics` on a freshly started server (the `_bucket`, `_sum` and `_count` series of
//! a histogram count for it). The names are read from the PromQL by a small tokenizer, tested
//! here on its own.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::{Options, Server};
use serde_json::{json, Value};

const DASHBOARD: &str = include_str!("../deploy/grafana-dashboard.json");

/// What every panel and query names as its data source: the dashboard's `datasource` variable.
fn datasource() -> Value {
    json!({"type": "prometheus", "uid": "${datasource}"})
}

// ---------------------------------------------------------------------------------------------
// The metric names of a PromQL expression.

/// Words that are no metric names where they stand alone, compared in lower case (PromQL's
/// keywords are case-insensitive, its metric names are not). Functions need no list: an
/// identifier followed by `(` is a call.
const KEYWORDS: &[&str] = &[
    // Aggregation operators: `sum by (x) (...)` puts a grouping between the word and its `(`.
    "sum",
    "avg",
    "min",
    "max",
    "count",
    "topk",
    "bottomk",
    "quantile",
    "stddev",
    "stdvar",
    "count_values",
    "group",
    "limitk",
    "limit_ratio",
    // Binary operators and modifiers.
    "and",
    "or",
    "unless",
    "atan2",
    "bool",
    "offset",
    // Number literals.
    "inf",
    "nan",
];

/// Modifiers followed by a list of label names in parentheses (optional for `group_left` and
/// `group_right`).
const GROUPING: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// The metric names an expression (PromQL, or a Grafana variable query such as
/// `label_values(metric, label)`) names; an error for unbalanced brackets or an unterminated
/// string, so that a malformed query cannot hide its names.
fn metric_names(expr: &str) -> Result<BTreeSet<String>, String> {
    let mut names = BTreeSet::new();
    collect_names(expr, &mut names).map_err(|e| format!("{e} in {expr:?}"))?;
    Ok(names)
}

fn collect_names(expr: &str, names: &mut BTreeSet<String>) -> Result<(), String> {
    let b = expr.as_bytes();
    let (mut i, mut depth) = (0, 0usize);
    while i < b.len() {
        match b[i] {
            b'"' | b'\'' | b'`' => i = string_end(b, i)?,
            b'(' => {
                depth += 1;
                i += 1;
            }
            b')' => {
                depth = depth
                    .checked_sub(1)
                    .ok_or_else(|| format!("unexpected ')' at {i}"))?;
                i += 1;
            }
            c @ (b']' | b'}') => return Err(format!("unexpected {:?} at {i}", c as char)),
            b'#' => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'{' => {
                let end = closing(b, i)?;
                selector_names(&expr[i + 1..end - 1], names)?;
                i = end;
            }
            // Range and subquery durations, `[5m]`, `[$__range]`, `[1h:5m]`, and Grafana's
            // old `[[variable]]`.
            b'[' => i = closing(b, i)?,
            b'$' => i = variable_end(b, i)?,
            b'0'..=b'9' | b'.' => i = number_end(b, i),
            c if is_ident_start(c) => {
                let start = i;
                while i < b.len() && is_ident_char(b[i]) {
                    i += 1;
                }
                let word = &expr[start..i];
                let lower = word.to_ascii_lowercase();
                let next = skip_space(b, i);
                let call = b.get(next) == Some(&b'(');
                if GROUPING.contains(&lower.as_str()) {
                    if call {
                        i = closing(b, next)?;
                    }
                } else if call && word == "label_values" {
                    // Grafana: `label_values(label)` or `label_values(metric{...}, label)`.
                    let end = closing(b, next)?;
                    let args = split_arguments(&expr[next + 1..end - 1])?;
                    if args.len() == 2 {
                        collect_names(args[0], names)?;
                    }
                    i = end;
                } else if call && word == "metrics" {
                    // Grafana: `metrics(regex)` names no metric of its own.
                    i = closing(b, next)?;
                } else if !call && !KEYWORDS.contains(&lower.as_str()) {
                    names.insert(word.to_owned());
                }
            }
            _ => i += 1,
        }
    }
    if depth > 0 {
        return Err(format!("{depth} unclosed '('"));
    }
    Ok(())
}

fn is_ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c == b':'
}

fn is_ident_char(c: u8) -> bool {
    is_ident_start(c) || c.is_ascii_digit()
}

fn skip_space(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && b[i].is_ascii_whitespace() {
        i += 1;
    }
    i
}

/// The index after the string literal that starts at `start`.
fn string_end(b: &[u8], start: usize) -> Result<usize, String> {
    let quote = b[start];
    let mut i = start + 1;
    while i < b.len() {
        match b[i] {
            b'\\' if quote != b'`' => i += 2,
            c if c == quote => return Ok(i + 1),
            _ => i += 1,
        }
    }
    Err(format!("unterminated string at {start}"))
}

/// The index after the bracket that closes the one at `open`, skipping strings and nested
/// brackets of every kind.
fn closing(b: &[u8], open: usize) -> Result<usize, String> {
    let mut stack = Vec::new();
    let mut i = open;
    while i < b.len() {
        match b[i] {
            b'"' | b'\'' | b'`' => {
                i = string_end(b, i)?;
                continue;
            }
            b'(' => stack.push(b')'),
            b'[' => stack.push(b']'),
            b'{' => stack.push(b'}'),
            c @ (b')' | b']' | b'}') => {
                if stack.pop() != Some(c) {
                    return Err(format!("unexpected {:?} at {i}", c as char));
                }
                if stack.is_empty() {
                    return Ok(i + 1);
                }
            }
            _ => {}
        }
        i += 1;
    }
    Err(format!("unclosed {:?} at {open}", b[open] as char))
}

/// The index after a Grafana variable: `$name`, `$__range`, `${name}`, `${name:format}`.
fn variable_end(b: &[u8], start: usize) -> Result<usize, String> {
    let mut i = start + 1;
    if b.get(i) == Some(&b'{') {
        return closing(b, i);
    }
    while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
        i += 1;
    }
    Ok(i)
}

/// The index after a number or duration: `3600`, `0.95`, `.5`, `1e-3`, `0x1f`, `5m`, `1h30m`.
fn number_end(b: &[u8], start: usize) -> usize {
    let mut i = start;
    while i < b.len() {
        if b[i].is_ascii_alphanumeric() || b[i] == b'.' || b[i] == b'_' {
            i += 1;
        } else if matches!(b[i], b'+' | b'-')
            && matches!(b[i - 1], b'e' | b'E')
            && b.get(i + 1).is_some_and(u8::is_ascii_digit)
        {
            i += 2;
        } else {
            break;
        }
    }
    i
}

/// Splits a call's arguments at its top-level commas.
fn split_arguments(args: &str) -> Result<Vec<&str>, String> {
    let b = args.as_bytes();
    let mut parts = Vec::new();
    let (mut start, mut i) = (0, 0);
    while i < b.len() {
        match b[i] {
            b'"' | b'\'' | b'`' => i = string_end(b, i)?,
            b'(' | b'[' | b'{' => i = closing(b, i)?,
            b',' => {
                parts.push(args[start..i].trim());
                i += 1;
                start = i;
            }
            _ => i += 1,
        }
    }
    parts.push(args[start..].trim());
    parts.retain(|p| !p.is_empty());
    Ok(parts)
}

/// The metric names inside a selector's braces: label matchers name none, except
/// `__name__="metric"`; a bare quoted string names a metric too (`{"metric", label="x"}`).
fn selector_names(body: &str, names: &mut BTreeSet<String>) -> Result<(), String> {
    let b = body.as_bytes();
    let mut i = skip_space(b, 0);
    while i < b.len() {
        // The label name, bare or quoted.
        let (label, quoted) = if matches!(b[i], b'"' | b'\'' | b'`') {
            let end = string_end(b, i)?;
            let text = &body[i + 1..end - 1];
            i = end;
            (text, true)
        } else {
            let start = i;
            while i < b.len() && is_ident_char(b[i]) {
                i += 1;
            }
            if i == start {
                return Err(format!("no label name at {start} of {{{body}}}"));
            }
            (&body[start..i], false)
        };
        i = skip_space(b, i);
        if quoted && (i == b.len() || b[i] == b',') {
            names.insert(label.to_owned());
        } else {
            let op_start = i;
            while i < b.len() && matches!(b[i], b'=' | b'!' | b'~') {
                i += 1;
            }
            let op = &body[op_start..i];
            if !matches!(op, "=" | "!=" | "=~" | "!~") {
                return Err(format!("bad matcher operator {op:?} in {{{body}}}"));
            }
            i = skip_space(b, i);
            if i == b.len() || !matches!(b[i], b'"' | b'\'' | b'`') {
                return Err(format!("no matcher value in {{{body}}}"));
            }
            let end = string_end(b, i)?;
            if label == "__name__" && op == "=" {
                names.insert(body[i + 1..end - 1].to_owned());
            }
            i = skip_space(b, end);
        }
        if i < b.len() {
            if b[i] != b',' {
                return Err(format!("expected ',' at {i} of {{{body}}}"));
            }
            i = skip_space(b, i + 1);
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The queries of a dashboard.

/// Every `expr` of the panels' targets, panels nested in rows included.
fn panel_exprs(panels: &Value, out: &mut Vec<String>) {
    for panel in panels.as_array().into_iter().flatten() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                out.push(expr.to_owned());
            }
        }
        panel_exprs(&panel["panels"], out);
    }
}

/// The queries of the template variables that run one: `query` variables, whose `query` is a
/// string (older Grafana) or an object with a `query` string, and their `definition`.
fn variable_queries(dashboard: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for variable in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if variable["type"] != "query" {
            continue;
        }
        for query in [
            &variable["query"],
            &variable["query"]["query"],
            &variable["definition"],
        ] {
            if let Some(q) = query.as_str().filter(|q| !q.trim().is_empty()) {
                out.push(q.to_owned());
            }
        }
    }
    out
}

/// Every query of the dashboard: panels, annotations, template variables.
fn dashboard_queries(dashboard: &Value) -> Vec<String> {
    let mut out = Vec::new();
    panel_exprs(&dashboard["panels"], &mut out);
    for annotation in dashboard["annotations"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if let Some(expr) = annotation["expr"].as_str() {
            out.push(expr.to_owned());
        }
    }
    out.extend(variable_queries(dashboard));
    out
}

/// How many `expr` keys the document holds anywhere, to check that the walk above missed none.
fn count_expr_keys(value: &Value) -> usize {
    match value {
        Value::Object(map) => map
            .iter()
            .map(|(k, v)| usize::from(k == "expr" && v.is_string()) + count_expr_keys(v))
            .sum(),
        Value::Array(items) => items.iter().map(count_expr_keys).sum(),
        _ => 0,
    }
}

fn dashboard() -> Value {
    serde_json::from_str(DASHBOARD).expect("deploy/grafana-dashboard.json is not JSON")
}

/// The metric names the dashboard asks for.
fn dashboard_metric_names() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for query in dashboard_queries(&dashboard()) {
        names.extend(metric_names(&query).unwrap_or_else(|e| panic!("{e}")));
    }
    names
}

// ---------------------------------------------------------------------------------------------
// The families of the Prometheus text format.

/// Each family's type, from the `# TYPE <name> <type>` lines.
fn exported_types(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| {
            let mut words = rest.split_whitespace();
            Some((words.next()?.to_owned(), words.next()?.to_owned()))
        })
        .collect()
}

/// Whether a query's metric name is a series of an exported family.
fn is_exported(name: &str, types: &BTreeMap<String, String>) -> bool {
    if types.contains_key(name) {
        return true;
    }
    ["_bucket", "_sum", "_count"].iter().any(|suffix| {
        name.strip_suffix(suffix)
            .and_then(|base| types.get(base))
            .is_some_and(|kind| kind == "histogram" || (kind == "summary" && *suffix != "_bucket"))
    })
}

// ---------------------------------------------------------------------------------------------
// The tests.

fn names(expr: &str) -> Vec<String> {
    metric_names(expr).unwrap().into_iter().collect()
}

#[test]
fn extractor_skips_functions_groupings_matchers_and_ranges() {
    assert_eq!(
        names(
            r#"histogram_quantile(0.95, sum by (le, purpose) (rate(rstudio_pool_assignment_duration_seconds_bucket{purpose=~"$purpose"}[5m])))"#
        ),
        ["rstudio_pool_assignment_duration_seconds_bucket"]
    );
    assert_eq!(
        names(
            r#"sum by (purpose) (rate(rstudio_pool_assignments_total{purpose=~"$purpose", outcome=~"pool_full|failed"}[$__rate_interval])) / sum by (purpose) (rate(rstudio_pool_assignments_total{purpose=~"$purpose"}[$__rate_interval]))"#
        ),
        ["rstudio_pool_assignments_total"]
    );
    assert_eq!(
        names(
            r#"sum by (state) (increase(rstudio_pool_instance_seconds_total{purpose=~"$purpose"}[$__range])) / 3600"#
        ),
        ["rstudio_pool_instance_seconds_total"]
    );
    // Postfix grouping, upper-case keywords, a subquery.
    assert_eq!(
        names("SUM(max_over_time(rate(a_total[5m])[1h:5m])) WITHOUT (instance, job)"),
        ["a_total"]
    );
    assert_eq!(names("count (b) by (x)"), ["b"]);
}

#[test]
fn extractor_skips_binary_operators_modifiers_and_numbers() {
    assert_eq!(
        names(
            "rstudio_pool_users / on (purpose) group_left (state) rstudio_pool_max_instances offset 1h30m \
             > bool 0.5e-3 and ignoring(x) up unless rstudio_pool_recovered @ 1700000000 \
             or vector(1) * Inf + 0x1F - .5 atan2 c:recorded:rate5m"
        ),
        [
            "c:recorded:rate5m",
            "rstudio_pool_max_instances",
            "rstudio_pool_recovered",
            "rstudio_pool_users",
            "up",
        ]
    );
    assert_eq!(
        names("a * on(x) group_right b / ignoring (y) group_left c"),
        ["a", "b", "c"]
    );
    assert_eq!(
        names("topk(3, d) + bottomk by (p) (2, e) + quantile(0.9, f) + limitk(1, g)"),
        ["d", "e", "f", "g"]
    );
}

#[test]
fn extractor_skips_strings_and_grafana_variables() {
    assert_eq!(
        names(
            r#"label_replace(rstudio_pool_open_websockets, "dst", "$1 not_a_metric", "src", '(.*)') + count_values(`value`, h)"#
        ),
        ["h", "rstudio_pool_open_websockets"]
    );
    assert_eq!(
        names(
            r#"sum(increase(i{a="x\"y}z", b!~'q'}[$__range])) / $__range_s * ${datasource} + ${purpose:regex} + $purpose + [[old]]"#
        ),
        ["i"]
    );
    assert_eq!(names("# a comment names nothing\nj"), ["j"]);
}

#[test]
fn extractor_reads_name_matchers_and_label_values() {
    assert_eq!(
        names(r#"{__name__="rstudio_pool_users", purpose="x"} + {__name__=~"rstudio_.*"}"#),
        ["rstudio_pool_users"]
    );
    assert_eq!(names(r#"{"k.dotted", a="b"}"#), ["k.dotted"]);
    assert_eq!(names(r#"{"quoted.label"="v"}"#), Vec::<String>::new());
    assert_eq!(
        names("label_values(rstudio_pool_instances, purpose)"),
        ["rstudio_pool_instances"]
    );
    assert_eq!(
        names(r#"label_values(rstudio_pool_instances{state="free", purpose=~"a,b"}, purpose)"#),
        ["rstudio_pool_instances"]
    );
    assert_eq!(names("label_values(purpose)"), Vec::<String>::new());
    assert_eq!(names("metrics(rstudio_pool_.*)"), Vec::<String>::new());
    assert_eq!(
        names("query_result(topk(1, rstudio_pool_users))"),
        ["rstudio_pool_users"]
    );
}

#[test]
fn extractor_refuses_malformed_expressions() {
    for bad in [
        r#"rate(x{a="b}[5m])"#,
        "rate(x{a=\"b\"}[5m]",
        "sum(x]",
        "sum(x))",
        "x}",
        r#"x{a}"#,
        r#"x{a=~b}"#,
        r#"x{a="b" c="d"}"#,
        "${datasource",
    ] {
        assert!(metric_names(bad).is_err(), "accepted {bad:?}");
    }
}

#[test]
fn queries_are_collected_from_rows_annotations_and_variables() {
    let dashboard = json!({
        "panels": [
            {"type": "timeseries", "targets": [{"expr": "a"}, {"expr": "b"}]},
            {"type": "row", "collapsed": true, "panels": [
                {"type": "stat", "targets": [{"expr": "c"}]},
            ]},
            {"type": "text"},
        ],
        "annotations": {"list": [{"expr": "d"}]},
        "templating": {"list": [
            {"type": "datasource", "name": "datasource", "query": "prometheus"},
            {"type": "query", "query": {"query": "label_values(e, x)"}, "definition": "label_values(e, x)"},
            {"type": "query", "query": "label_values(f, y)"},
            {"type": "custom", "query": "one,two"},
        ]},
    });
    let queries = dashboard_queries(&dashboard);
    assert_eq!(count_expr_keys(&dashboard), 4);
    let mut found = BTreeSet::new();
    for q in &queries {
        found.extend(metric_names(q).unwrap());
    }
    assert_eq!(
        found.into_iter().collect::<Vec<_>>(),
        ["a", "b", "c", "d", "e", "f"]
    );
}

#[test]
fn exported_families_count_histogram_series() {
    let text =
        "# HELP h_seconds A histogram.\n# TYPE h_seconds histogram\nh_seconds_bucket{le=\"1\"} 0\n\
                # TYPE c_total counter\nc_total 1\n# TYPE g gauge\n# TYPE s summary\n";
    let types = exported_types(text);
    for name in [
        "h_seconds",
        "h_seconds_bucket",
        "h_seconds_sum",
        "h_seconds_count",
        "c_total",
        "g",
        "s_sum",
        "s_count",
    ] {
        assert!(is_exported(name, &types), "{name}");
    }
    for name in [
        "c_total_count",
        "g_bucket",
        "s_bucket",
        "h_seconds_total",
        "missing",
    ] {
        assert!(!is_exported(name, &types), "{name}");
    }
}

#[test]
fn the_dashboard_is_importable_and_uses_its_variables() {
    let dashboard = dashboard();
    assert!(dashboard["schemaVersion"].as_u64().unwrap() >= 36);
    assert!(dashboard["uid"].is_string() && dashboard["title"].is_string());
    let variables = dashboard["templating"]["list"].as_array().unwrap();
    let variable = |name: &str| {
        variables
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no variable {name}"))
    };
    let ds = variable("datasource");
    assert_eq!(ds["type"], "datasource");
    assert_eq!(ds["query"], "prometheus");
    let purpose = variable("purpose");
    assert_eq!(purpose["type"], "query");
    assert_eq!(purpose["datasource"], datasource());
    assert_eq!(purpose["multi"], true);
    assert_eq!(purpose["includeAll"], true);
    assert_eq!(
        variable_queries(&json!({"templating": {"list": [purpose]}}))
            .iter()
            .map(|q| metric_names(q).unwrap())
            .collect::<Vec<_>>(),
        vec![BTreeSet::from(["rstudio_pool_instances".to_owned()]); 2]
    );

    // Every panel queries through the variable; panel ids are unique.
    fn check(panels: &Value, ids: &mut BTreeSet<u64>, count: &mut usize) {
        for panel in panels.as_array().into_iter().flatten() {
            let id = panel["id"].as_u64().expect("a panel without id");
            assert!(ids.insert(id), "panel id {id} twice");
            if panel["type"] != "row" {
                *count += 1;
                let title = &panel["title"];
                assert_eq!(panel["datasource"], datasource(), "{title}");
                let targets = panel["targets"].as_array().unwrap();
                assert!(!targets.is_empty(), "{title} has no query");
                for target in targets {
                    assert_eq!(target["datasource"], datasource(), "{title}");
                    let expr = target["expr"].as_str().unwrap();
                    assert!(
                        !metric_names(expr).unwrap().is_empty(),
                        "{title}: no metric in {expr}"
                    );
                }
            }
            check(&panel["panels"], ids, count);
        }
    }
    let (mut ids, mut count) = (BTreeSet::new(), 0);
    check(&dashboard["panels"], &mut ids, &mut count);
    assert!(count >= 20, "only {count} panels");

    // The walk sees every query of the document, and the document names enough metrics that
    // an empty parse cannot pass.
    let queries = dashboard_queries(&dashboard);
    assert_eq!(
        queries.len() - variable_queries(&dashboard).len(),
        count_expr_keys(&dashboard)
    );
    let names = dashboard_metric_names();
    assert!(
        names.len() >= 15,
        "only {} metric names: {names:?}",
        names.len()
    );
    for name in &names {
        assert!(name.starts_with("rstudio_pool_"), "{name} is not ours");
    }
}

#[tokio::test]
async fn every_metric_of_the_dashboard_is_exported() {
    let wanted = dashboard_metric_names();
    assert!(
        wanted.len() >= 15,
        "only {} names: {wanted:?}",
        wanted.len()
    );

    let server = Server::start(Options::default()).await;
    let response = server
        .client()
        .get(format!("http://{}/metrics", server.api))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let text = response.text().await.unwrap();
    assert_eq!(status, 200, "GET /metrics: {text}");
    // Prometheus 3 refuses a scrape without a valid Content-Type.
    assert!(
        content_type.starts_with("text/plain"),
        "GET /metrics answered Content-Type {content_type:?}"
    );

    let types = exported_types(&text);
    let missing: Vec<&String> = wanted.iter().filter(|n| !is_exported(n, &types)).collect();
    assert!(
        missing.is_empty(),
        "the dashboard asks for metrics that GET /metrics does not export: {missing:?}\n\
         (a labelled family appears only once one of its series exists: create its label \
         values at start)\nexported: {types:?}"
    );
}
