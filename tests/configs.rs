//! Every configuration file we ship passes `rstudio-pool -t`, and a bad one is refused with a
//! message that names the key and the fix, without starting anything.

use std::process::Command;

fn check(args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_rstudio-pool"));
    command.args(args);
    for name in [
        "MIN_FREE_INSTANCES",
        "MAX_INSTANCES",
        "PORT",
        "API_LISTEN",
        "API_TOKEN",
        "PROVIDER",
    ] {
        command.env_remove(name);
    }
    for (k, v) in env {
        command.env(k, v);
    }
    let out = command.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn every_shipped_config_is_valid() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/conf");
    let mut checked = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let (ok, text) = check(&["-t", "-c", path.to_str().unwrap()], &[]);
            assert!(ok, "{}: {text}", path.display());
            assert!(text.contains("is valid"), "{text}");
            checked += 1;
        }
    }
    assert!(checked > 0, "no configuration files in {dir}");
    let (ok, text) = check(&["-t"], &[]);
    assert!(ok && text.contains("embedded default"), "{text}");
}

#[test]
fn a_bad_config_is_refused_with_the_key_and_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.yaml");
    std::fs::write(&file, "pool:\n  max_instance: 3\n").unwrap();
    let (ok, text) = check(&["-t", "-c", file.to_str().unwrap()], &[]);
    assert!(!ok);
    assert!(
        text.contains("max_instance") && text.contains("max_instances"),
        "{text}"
    );

    let (ok, text) = check(&["-t"], &[("MAX_INSTANCES", "lots")]);
    assert!(!ok);
    assert!(text.contains("MAX_INSTANCES"), "{text}");

    let (ok, text) = check(&["-t"], &[("API_LISTEN", "0.0.0.0:3001")]);
    assert!(!ok);
    assert!(text.contains("API_TOKEN"), "{text}");

    let (ok, text) = check(&["-t", "-c", "/nonexistent/rstudio-pool.yaml"], &[]);
    assert!(!ok);
    assert!(
        text.contains("cannot read /nonexistent/rstudio-pool.yaml"),
        "{text}"
    );
}
