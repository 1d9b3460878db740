//! The README's configuration table lists exactly the keys the code reads: every documented
//! key exists, and every key of our sections is documented.

use std::collections::BTreeSet;

use rstudio_pool::config::Config;

/// The keys serde expects in one section, read from its "unknown field" error.
fn expected_keys(yaml_path: &[&str]) -> BTreeSet<String> {
    let mut yaml = String::new();
    for (depth, part) in yaml_path.iter().enumerate() {
        yaml.push_str(&format!("{}{part}:\n", "  ".repeat(depth)));
    }
    yaml.push_str(&format!("{}not_a_key: 1\n", "  ".repeat(yaml_path.len())));
    let err = Config::from_yaml(&yaml, &|_| None).unwrap_err().to_string();
    let list = err
        .split("expected one of ")
        .nth(1)
        .or_else(|| err.split("expected ").nth(1))
        .unwrap_or_else(|| panic!("no list of fields in: {err}"));
    // "`a`, `b`" or "`a` or `b`": every name between backticks.
    list.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_configuration_table_matches_the_code() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let documented: BTreeSet<String> = readme
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .filter(|k| k.contains('.'))
        .map(str::to_owned)
        .collect();

    let mut code = BTreeSet::new();
    for (section, prefix) in [
        (vec!["pool"], "pool"),
        (vec!["pool", "warm_policy"], "pool.warm_policy"),
        (vec!["simulate"], "simulate"),
        (vec!["provider"], "provider"),
        (vec!["provider", "ec2"], "provider.ec2"),
        (vec!["api"], "api"),
        (vec!["proxy"], "proxy"),
        (vec!["proxy", "tls"], "proxy.tls"),
        (vec!["auth"], "auth"),
        (vec!["log"], "log"),
        (vec!["purposes", "rstudio"], "purposes.<name>"),
    ] {
        for key in expected_keys(&section) {
            if (prefix == "provider" && key == "ec2")
                || (prefix == "proxy" && key == "tls")
                || (prefix == "pool" && key == "warm_policy")
            {
                continue;
            }
            code.insert(format!("{prefix}.{key}"));
        }
    }
    let undocumented: Vec<_> = code.difference(&documented).collect();
    let unknown: Vec<_> = documented.difference(&code).collect();
    assert!(
        undocumented.is_empty(),
        "keys missing from README.md: {undocumented:?}"
    );
    assert!(
        unknown.is_empty(),
        "README.md documents keys the code does not read: {unknown:?}"
    );
}
