//! The default EC2 user data, rendered for every preset: valid bash (`bash -n`), clean under
//! shellcheck, and reaching `docker run` on each distribution it supports. EC2 instances do not
//! boot here, so each distribution is stood in for by what decides the script's path through
//! it: which package manager it has, which packages that manager offers (Ubuntu 24.04 offers
//! no `awscli`, which stopped the previous script before `docker run`), whether an AWS CLI
//! comes with the image (Amazon Linux 2023's does), and, for an AMI baked by
//! `rstudio/bake.sh`, that docker and the workspace image are already there. `rstudio/bake.sh`
//! itself is checked the same way (bash, shellcheck, for the builder's user data too) and run
//! against a stand-in AWS CLI.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use common::lint_shell as lint;
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
        lint(&purpose, &path);
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
    /// Whether the workspace image is already in docker (an AMI baked by `rstudio/bake.sh`).
    image_present: bool,
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
        image_present: false,
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
        image_present: false,
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
        image_present: false,
    },
];

/// AMIs baked by `rstudio/bake.sh`: docker and the workspace image are there already, while
/// the package manager would still offer what the script installs elsewhere.
const BAKED: &[Distribution] = &[
    Distribution {
        name: "Amazon Linux 2023, baked",
        manager: "dnf",
        packages: &[
            ("docker", &["docker"]),
            (
                "amazon-ecr-credential-helper",
                &["docker-credential-ecr-login"],
            ),
        ],
        preinstalled: &["aws", "curl", "systemctl", "docker"],
        image_present: true,
    },
    Distribution {
        name: "Ubuntu 24.04, baked",
        manager: "apt-get",
        packages: &[
            ("docker.io", &["docker"]),
            (
                "amazon-ecr-credential-helper",
                &["docker-credential-ecr-login"],
            ),
        ],
        preinstalled: &["curl", "systemctl", "docker"],
        image_present: true,
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
/// as the real one would for the calls the script makes. Docker's images are the lines of
/// `$LOCAL_IMAGES`: a pull adds one, and `docker image inspect` fails for an image not there.
fn program(command: &str) -> &'static str {
    match command {
        "docker" => concat!(
            "echo \"docker $*\" >>\"$LOG\"\n",
            "case \"$1 ${2:-}\" in\n",
            "  login*) echo \"password $(cat)\" >>\"$LOG\" ;;\n",
            "  pull*) echo \"$2\" >>\"$LOCAL_IMAGES\" ;;\n",
            "  'image inspect')\n",
            "    [ -f \"$LOCAL_IMAGES\" ] || exit 1\n",
            "    while read -r image; do [ \"$image\" = \"$3\" ] && exit 0; done <\"$LOCAL_IMAGES\"\n",
            "    echo \"Error: No such image: $3\" >&2; exit 1 ;;\n",
            "esac",
        ),
        "aws" => "echo \"aws $*\" >>\"$LOG\"; echo secret",
        "curl" => "case \"$*\" in *api/token*) echo token ;; *instance-id*) echo i-0123456789abcdef0 ;; *) exit 22 ;; esac",
        _ => "echo \"$(basename \"$0\") $*\" >>\"$LOG\"",
    }
}

/// The workspace image of the rstudio preset, as the rendered user data names it.
fn image() -> String {
    format!("{REGISTRY}/rstudio:latest")
}

/// What a run of the user data left behind on a stand-in distribution.
struct Boot {
    /// Every command the stand-ins ran, one a line (`docker login` also logs its password).
    log: String,
    /// The script's trace (`set -x`) and errors.
    trace: String,
    /// Whether the script exited 0.
    success: bool,
    /// Where the stand-in distribution keeps its commands.
    bin: std::path::PathBuf,
    /// The script's `DOCKER_CONFIG`.
    docker_config: std::path::PathBuf,
    _root: tempfile::TempDir,
}

/// Runs the rstudio preset's user data on a stand-in of `distribution`.
fn boot(distribution: &Distribution) -> Boot {
    let script = rendered().remove("rstudio").unwrap();
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
    let local_images = root.path().join("images");
    if distribution.image_present {
        std::fs::write(&local_images, format!("{}\n", image())).unwrap();
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
        .env("LOCAL_IMAGES", &local_images)
        .env("DOCKER_CONFIG", &docker_config)
        .output()
        .unwrap();
    Boot {
        log: std::fs::read_to_string(&log).unwrap_or_default(),
        trace: String::from_utf8_lossy(&run.stderr).into_owned(),
        success: run.status.success(),
        bin,
        docker_config,
        _root: root,
    }
}

/// Whether the workspace was started with the preset's image.
fn started(log: &str) -> bool {
    log.contains(&format!(
        "docker run -d --name workspace --restart unless-stopped -p 8787:8787 {}",
        image()
    ))
}

#[test]
fn the_user_data_reaches_docker_run_on_each_supported_distribution() {
    for distribution in DISTRIBUTIONS {
        let Boot {
            log,
            trace,
            success,
            bin,
            docker_config,
            _root: _folder, // bound, so that the stand-in is kept until the end of the loop
        } = boot(distribution);
        assert!(success, "{}: the script failed\n{trace}", distribution.name);
        assert!(
            log.contains(&format!("docker pull {}", image())) && started(&log),
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

#[test]
fn on_a_baked_ami_the_user_data_installs_signs_in_and_pulls_nothing() {
    for distribution in BAKED {
        let Boot {
            log,
            trace,
            success,
            bin,
            docker_config,
            _root: _folder, // bound, so that the stand-in is kept until the end of the loop
        } = boot(distribution);
        let name = distribution.name;
        assert!(success, "{name}: the script failed\n{trace}");
        assert!(
            started(&log),
            "{name}: the workspace was not started\n{log}"
        );
        // It looked, and found the image.
        assert!(
            log.contains(&format!("docker image inspect {}", image())),
            "{name}: the image was not looked for\n{log}"
        );
        // Nothing installed: the package manager was not even asked.
        let manager = format!("{} ", distribution.manager);
        assert!(
            !log.lines().any(|line| line.starts_with(&manager)),
            "{name}: the package manager ran\n{log}"
        );
        assert!(
            !bin.join("docker-credential-ecr-login").exists(),
            "{name}: the credential helper was installed\n{log}"
        );
        // No sign-in, by either way.
        assert!(
            !log.contains("aws ecr") && !log.contains("docker login"),
            "{name}: signed in to the registry\n{log}"
        );
        assert!(
            !docker_config.join("config.json").exists(),
            "{name}: the credential helper was configured\n{log}"
        );
        // No pull.
        assert!(
            !log.contains("docker pull"),
            "{name}: the image was pulled again\n{log}"
        );
    }
}

/// `rstudio/bake.sh` in this repository.
fn bake_script() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("rstudio/bake.sh")
}

#[test]
fn the_bake_script_and_its_builder_user_data_pass_bash_and_shellcheck() {
    lint("rstudio/bake.sh", &bake_script());
    // The user data it gives the builder, for an ECR image and a public one.
    let builder = Command::new(real_tool("bash"))
        .arg(bake_script())
        .args(["--region", "eu-west-1", "--print-user-data"])
        .args(["--image", &image()])
        .args(["--image", "quay.io/jupyter/base-notebook:latest"])
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .output()
        .unwrap();
    assert!(
        builder.status.success(),
        "{}",
        String::from_utf8_lossy(&builder.stderr)
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("builder.sh");
    std::fs::write(&path, &builder.stdout).unwrap();
    lint("the builder's user data", &path);
    let text = String::from_utf8(builder.stdout).unwrap();
    assert!(text.contains(&image()) && text.contains("quay.io/jupyter/base-notebook:latest"));
    assert!(text.contains("docker pull \"$image\"") && text.contains("shutdown -h now"));
}

/// A stand-in AWS CLI for `rstudio/bake.sh`: logs each call, keeps the user data it is given,
/// and answers as EC2 would for a builder that powers off (or, with `SCENARIO=fail`, whose
/// user data fails and that stays up).
const FAKE_AWS: &str = r#"echo "aws $*" >>"$LOG"
case "$1 $2" in
  "ssm get-parameter") echo ami-0ba5e0000000000aa ;;
  "ec2 describe-images")
    case "$*" in *RootDeviceName*) echo /dev/xvda ;; *) echo available ;; esac ;;
  "ec2 run-instances")
    for a in "$@"; do
      case "$a" in file://*) cat "${a#file://}" >"$LOG.user-data" ;; esac
    done
    echo i-0b1d0000000000000 ;;
  "ec2 describe-instances")
    if [ "${SCENARIO:-}" = fail ]; then echo running; else echo stopped; fi ;;
  "ec2 get-console-output")
    if [ "${SCENARIO:-}" = fail ]; then echo "rstudio-pool-bake: FAILED (exit status 1)"; fi ;;
  "ec2 create-image") echo ami-0bac3d000000000bb ;;
  "ec2 terminate-instances") ;;
  *) echo "unexpected call: $*" >&2; exit 2 ;;
esac"#;

/// What a run of `rstudio/bake.sh` against the stand-in AWS CLI left behind.
struct Bake {
    success: bool,
    stdout: String,
    stderr: String,
    /// The AWS CLI calls, one a line.
    log: String,
    /// The user data given to the builder.
    user_data: String,
}

/// Runs `rstudio/bake.sh` against the stand-in AWS CLI.
fn bake(scenario: &str) -> Bake {
    let root = tempfile::tempdir().unwrap();
    let bin = root.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    write_program(&bin.join("aws"), FAKE_AWS);
    let log = root.path().join("log");
    let run = Command::new(real_tool("bash"))
        .arg(bake_script())
        .args(["--region", "eu-west-1", "--account", "123456789012"])
        .args(["--instance-profile", "rstudio-workspace"])
        .args(["--subnet", "subnet-0abc", "--security-group", "sg-0abc"])
        .env_clear()
        .env("PATH", format!("{}:/usr/bin:/bin", bin.display()))
        .env("LOG", &log)
        .env("SCENARIO", scenario)
        .env("BAKE_POLL_SECONDS", "0")
        .output()
        .unwrap();
    let user_data = std::fs::read_to_string(root.path().join("log.user-data")).unwrap_or_default();
    Bake {
        success: run.status.success(),
        stdout: String::from_utf8_lossy(&run.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&run.stderr).into_owned(),
        log: std::fs::read_to_string(&log).unwrap_or_default(),
        user_data,
    }
}

#[test]
fn the_bake_script_makes_an_ami_of_a_builder_no_pool_adopts_and_terminates_it() {
    let Bake {
        success,
        stdout,
        stderr,
        log,
        user_data,
    } = bake("ok");
    assert!(success, "{stderr}\n{log}");
    assert_eq!(stdout, "ami-0bac3d000000000bb\n", "{stderr}");
    let calls: Vec<&str> = log.lines().collect();
    let launch = calls
        .iter()
        .find(|c| c.starts_with("aws ec2 run-instances"))
        .unwrap_or_else(|| panic!("no launch\n{log}"));
    for wanted in [
        "--image-id ami-0ba5e0000000000aa",
        "HttpTokens=required",
        "--instance-initiated-shutdown-behavior stop",
        "--iam-instance-profile Name=rstudio-workspace",
        "--subnet-id subnet-0abc",
        "--security-group-ids sg-0abc",
        "Key=rstudio-pool-bake,",
    ] {
        assert!(launch.contains(wanted), "launch lacks {wanted}: {launch}");
    }
    // Never the pool's own tag (the key `rstudio-pool`): no pool may adopt the builder.
    assert!(
        !launch.contains("Key=rstudio-pool,") && !launch.contains("Key=rstudio-pool}"),
        "{launch}"
    );
    assert!(
        user_data.contains(&format!(" {} ", image())) && user_data.contains("shutdown -h now"),
        "{user_data}"
    );
    // Stopped, then imaged, then available, then the builder is gone.
    let at = |prefix: &str| {
        calls
            .iter()
            .position(|c| c.starts_with(prefix))
            .unwrap_or_else(|| panic!("no `{prefix}`\n{log}"))
    };
    assert!(at("aws ec2 describe-instances") < at("aws ec2 create-image"));
    assert!(at("aws ec2 create-image") < at("aws ec2 terminate-instances"));
    assert_eq!(
        calls.last().copied(),
        Some("aws ec2 terminate-instances --region eu-west-1 --instance-ids i-0b1d0000000000000"),
        "{log}"
    );
}

#[test]
fn a_failed_bake_makes_no_ami_and_still_terminates_the_builder() {
    let Bake {
        success,
        stdout,
        stderr,
        log,
        ..
    } = bake("fail");
    assert!(!success, "{stdout}\n{log}");
    assert!(stdout.is_empty(), "{stdout}");
    assert!(stderr.contains("user data failed"), "{stderr}");
    assert!(!log.contains("create-image"), "{log}");
    assert!(
        log.contains(
            "aws ec2 terminate-instances --region eu-west-1 --instance-ids i-0b1d0000000000000"
        ),
        "{log}"
    );
}
