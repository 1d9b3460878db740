//! The default EC2 user data, rendered for every preset: valid bash (`bash -n`), clean under
//! shellcheck, and reaching `docker run` on each distribution it supports. EC2 instances do not
//! boot here, so each distribution is stood in for by what decides the script's path through
//! it: which package manager it has, which packages that manager offers (Ubuntu 24.04 offers
//! no `awscli`, which stopped the previous script before `docker run`), and whether an AWS CLI
//! comes with the image (Amazon Linux 2023's does).

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use rstudio_pool::config::{Config, ProviderConfig};

const REGISTRY: &str = "123456789012.dkr.ecr.eu-west-1.amazonaws.com";

/// The user data of each preset, rendered as the ec2 provider sends it.
fn rendered() -> BTreeMap<String, String> {
    let yaml = "purposes:\n  rstudio: {}\n  jupyter: {}\n  code-server: {}\n  shiny: {}\n";
    let env = |key: &str| {
        match key {
            "PROVIDER" => Some("ec2"),
            "IMAGE_ID" => Some("ami-0123456789abcdef0"),
            "ACCOUNT" => Some("123456789012"),
            "REGION" => Some("eu-west-1"),
            _ => None,
        }
        .map(str::to_owned)
    };
    let config = Config::from_yaml(yaml, &env).unwrap();
    let ProviderConfig::Ec2(ec2) = config.provider else {
        panic!("not the ec2 provider")
    };
    assert_eq!(ec2.user_data.len(), 4);
    ec2.user_data
}

#[test]
fn every_preset_renders_to_a_script_bash_and_shellcheck_accept() {
    let dir = tempfile::tempdir().unwrap();
    for (purpose, script) in rendered() {
        assert!(!script.contains("{{"), "{purpose}: unfilled placeholder");
        let path = dir.path().join(format!("{purpose}.sh"));
        std::fs::write(&path, &script).unwrap();
        let syntax = Command::new("bash").arg("-n").arg(&path).output().unwrap();
        assert!(
            syntax.status.success(),
            "{purpose}: {}",
            String::from_utf8_lossy(&syntax.stderr)
        );
        let lint = Command::new("shellcheck")
            .args(["--shell=bash", "--severity=style"])
            .arg(&path)
            .output()
            .unwrap_or_else(|e| panic!("cannot run shellcheck ({e}): scripts/test.sh installs it"));
        assert!(
            lint.status.success(),
            "{purpose}: shellcheck says\n{}",
            String::from_utf8_lossy(&lint.stdout)
        );
    }
}

/// One distribution as the script meets it.
struct Distribution {
    name: &'static str,
    /// The package manager it has.
    manager: &'static str,
    /// Packages its manager offers, with the commands each brings.
    packages: &'static [(&'static str, &'static [&'static str])],
    /// Commands on the image from the start.
    preinstalled: &'static [&'static str],
}

const DISTRIBUTIONS: &[Distribution] = &[
    Distribution {
        name: "Amazon Linux 2023",
        manager: "dnf",
        packages: &[
            ("docker", &["docker"]),
            (
                "amazon-ecr-credential-helper",
                &["docker-credential-ecr-login"],
            ),
        ],
        preinstalled: &["aws", "curl", "systemctl"],
    },
    Distribution {
        name: "Ubuntu 22.04",
        manager: "apt-get",
        packages: &[
            ("docker.io", &["docker"]),
            ("awscli", &["aws"]),
            (
                "amazon-ecr-credential-helper",
                &["docker-credential-ecr-login"],
            ),
        ],
        preinstalled: &["curl", "systemctl"],
    },
    Distribution {
        name: "Ubuntu 24.04",
        manager: "apt-get",
        packages: &[
            ("docker.io", &["docker"]),
            (
                "amazon-ecr-credential-helper",
                &["docker-credential-ecr-login"],
            ),
        ],
        preinstalled: &["curl", "systemctl"],
    },
];

/// Where this machine has `tool`.
fn real_tool(tool: &str) -> String {
    let found = Command::new("bash")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .unwrap();
    String::from_utf8(found.stdout).unwrap().trim().to_owned()
}

fn write_program(path: &Path, body: &str) {
    std::fs::write(path, format!("#!/bin/bash\n{body}\n")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// What each command does on the stand-in: log its arguments (and standard input) and answer
/// as the real one would for the calls the script makes.
fn program(command: &str) -> &'static str {
    match command {
        "docker" => "echo \"docker $*\" >>\"$LOG\"; if [ \"$1\" = login ]; then echo \"password $(cat)\" >>\"$LOG\"; fi",
        "aws" => "echo \"aws $*\" >>\"$LOG\"; echo secret",
        "curl" => "case \"$*\" in *api/token*) echo token ;; *instance-id*) echo i-0123456789abcdef0 ;; *) exit 22 ;; esac",
        _ => "echo \"$(basename \"$0\") $*\" >>\"$LOG\"",
    }
}

#[test]
fn the_user_data_reaches_docker_run_on_each_supported_distribution() {
    let script = rendered().remove("rstudio").unwrap();
    for distribution in DISTRIBUTIONS {
        let root = tempfile::tempdir().unwrap();
        let (bin, base, log) = (
            root.path().join("bin"),
            root.path().join("base"),
            root.path().join("log"),
        );
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::create_dir_all(&base).unwrap();
        // Only the basic tools of the machine: nothing the script should install itself.
        for tool in ["cat", "mkdir", "basename", "cp"] {
            std::os::unix::fs::symlink(real_tool(tool), base.join(tool)).unwrap();
        }
        for command in distribution.preinstalled {
            write_program(&bin.join(command), program(command));
        }
        // The package manager installs a package's commands, and refuses what it lacks.
        let packages = root.path().join("packages");
        let mut cases = String::new();
        for (package, commands) in distribution.packages {
            let files = packages.join(package);
            std::fs::create_dir_all(&files).unwrap();
            for command in *commands {
                write_program(&files.join(command), program(command));
            }
            cases.push_str(&format!(
                "    {package}) cp \"$PACKAGES/{package}/\"* \"$BIN/\" ;;\n"
            ));
        }
        write_program(
            &bin.join(distribution.manager),
            &format!(
                "echo \"{manager} $*\" >>\"$LOG\"\n[ \"$1\" = install ] || exit 0\nfor p in \"$@\"; do\n  case \"$p\" in\n    -*|install) ;;\n{cases}    *) echo \"no package $p\" >&2; exit 100 ;;\n  esac\ndone",
                manager = distribution.manager
            ),
        );
        let docker_config = root.path().join("docker-config");
        let path = root.path().join("user-data.sh");
        std::fs::write(&path, &script).unwrap();
        let run = Command::new(real_tool("bash"))
            .arg(&path)
            .env_clear()
            .env("PATH", format!("{}:{}", bin.display(), base.display()))
            .env("LOG", &log)
            .env("BIN", &bin)
            .env("PACKAGES", &packages)
            .env("DOCKER_CONFIG", &docker_config)
            .output()
            .unwrap();
        let trace = String::from_utf8_lossy(&run.stderr);
        assert!(
            run.status.success(),
            "{}: the script failed\n{trace}",
            distribution.name
        );
        let log = std::fs::read_to_string(&log).unwrap();
        let image = format!("{REGISTRY}/rstudio:latest");
        assert!(
            log.contains(&format!("docker pull {image}"))
                && log.contains(&format!(
                    "docker run -d --name workspace --restart unless-stopped -p 8787:8787 {image}"
                )),
            "{}: the workspace was not started\n{log}",
            distribution.name
        );
        // Signed in to the registry: with the AWS CLI, or through the credential helper.
        let with_cli = log.contains("aws ecr get-login-password --region eu-west-1")
            && log.contains(&format!(
                "docker login --username AWS --password-stdin {REGISTRY}"
            ))
            && log.contains("password secret");
        let helper = std::fs::read_to_string(docker_config.join("config.json"))
            .is_ok_and(|c| c.contains(&format!("\"{REGISTRY}\": \"ecr-login\"")))
            && bin.join("docker-credential-ecr-login").exists();
        assert!(
            with_cli || helper,
            "{}: not signed in to the registry\n{log}",
            distribution.name
        );
        // An image with the AWS CLI uses it rather than installing anything.
        if distribution.preinstalled.contains(&"aws") {
            assert!(with_cli, "{}: {log}", distribution.name);
        }
    }
}
