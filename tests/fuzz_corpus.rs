//! Replays the fuzzing regression corpus (`fuzz/corpus/route/`, `fuzz/corpus/command/` and
//! `fuzz/corpus/answer/`) through the same functions and the same property checks as the
//! cargo-fuzz targets, as a plain `cargo test`: no libFuzzer, no nightly flags.
//!
//! This file is also the single home of the `route` and `command` checks:
//! `fuzz/fuzz_targets/route.rs` and `fuzz/fuzz_targets/command.rs` include it as a module
//! (`#[path]`) and call [`check_route`] and [`check_command`] on every input, so the fuzzers
//! and this replay can never drift apart. Keep it free of anything but the library,
//! `serde_json` and `std` outside `cfg(test)`.
//!
//! The `answer` checks live in `fuzz/checks/answer.rs`, because that target is built without
//! the library: it compiles the pure files of `src/http1/` on their own
//! (`fuzz/checks/http1.rs`). Here both files are included under `cfg(test)`: the checks run
//! against `rstudio_pool::http1`, and the shim is compiled and its limits compared with the
//! library's.

use rstudio_pool::core::command::{decode, Command, CommandError};
use rstudio_pool::core::ids::{is_instance_id, InstanceId, UserId, MAX_USER_ID_LEN};
use rstudio_pool::core::route::{parse, rewrite_location, rewrite_set_cookie, Target};

/// What `fuzz/checks/answer.rs` reads as `super::http1`: here, the library's own module.
#[cfg(test)]
use rstudio_pool::http1;

/// The `answer` target's checks.
#[cfg(test)]
#[path = "../fuzz/checks/answer.rs"]
mod answer_checks;

/// The `answer` target's stand-in for `rstudio_pool::http1` (its three pure files, compiled
/// outside the crate, and copies of the two limits).
#[cfg(test)]
#[allow(dead_code)]
#[path = "../fuzz/checks/http1.rs"]
mod http1_shim;

/// The instance the rewriting checks scope to.
pub const ID: &str = "i-0123456789abcdef0";
/// The upstream the `Location` rewriting recognises as the workspace itself.
pub const HOSTS: [&str; 1] = ["127.0.0.1:4000"];
/// An upper bound on any error message: the library shortens what it echoes back (40
/// characters, escaped), so a huge hostile input never yields a huge message.
const MAX_MESSAGE_LEN: usize = 1024;

/// Whether `path` lies under `/<ID>`: the prefix itself, or the prefix followed by `/`, `?`
/// or `#` (the same rule as the library's private `under_prefix`).
fn under_prefix(path: &str, id: &str) -> bool {
    path.strip_prefix('/')
        .and_then(|p| p.strip_prefix(id))
        .is_some_and(|rest| rest.is_empty() || rest.starts_with(['/', '?', '#']))
}

/// The route properties, on the input read as UTF-8 (invalid sequences become U+FFFD, which
/// keeps multi-byte characters in play for the string slicing in the library).
pub fn check_route(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let input: &str = &text;

    // The path router.
    match parse(input) {
        Target::Instance { id, rest } => {
            assert!(rest.starts_with('/'), "rest {rest:?} of {input:?}");
            let parsed = InstanceId::parse(id).expect("parse returned an invalid id");
            assert_eq!(parsed.as_str(), id);
            assert_eq!(
                input,
                format!("/{id}{rest}"),
                "id and rest rebuild the path"
            );
        }
        Target::InstanceRoot { id } => {
            let parsed = InstanceId::parse(id).expect("parse returned an invalid id");
            assert_eq!(parsed.as_str(), id);
            assert_eq!(input, format!("/{id}"), "a root is the bare prefix");
        }
        Target::Other => {
            // Only paths whose first segment is not an instance id are left to the default.
            if let Some(after) = input.strip_prefix('/') {
                let first = after.split('/').next().unwrap_or_default();
                assert!(!is_instance_id(first), "{input:?} names {first:?}");
            }
        }
    }

    // `Location` rewriting.
    match rewrite_location(input, ID, &HOSTS) {
        Some(out) => {
            assert!(out.starts_with(&format!("/{ID}")), "{input:?} -> {out:?}");
            assert!(under_prefix(&out, ID), "{input:?} -> {out:?}");
            assert_ne!(out, input, "Some means changed");
            // Idempotent: a rewritten location is left alone the second time.
            assert_eq!(
                rewrite_location(&out, ID, &HOSTS),
                None,
                "{input:?} -> {out:?}"
            );
        }
        None => {
            // A root-relative path is only left alone when it already carries the prefix.
            if input.starts_with('/') && !input.starts_with("//") {
                assert!(under_prefix(input, ID), "{input:?} left outside the prefix");
            }
        }
    }

    // `Set-Cookie` scoping.
    if let Some(out) = rewrite_set_cookie(input, ID) {
        assert!(
            out.contains(&format!("Path=/{ID}/")),
            "{input:?} -> {out:?}"
        );
        // Idempotent: a scoped cookie is already scoped.
        assert_eq!(rewrite_set_cookie(&out, ID), None, "{input:?} -> {out:?}");
    }

    // Instance ids.
    match InstanceId::parse(input) {
        Ok(id) => {
            assert!(is_instance_id(input));
            assert_eq!(id.as_str(), input);
            assert!(input.starts_with("i-") && (input.len() == 10 || input.len() == 19));
        }
        Err(e) => {
            assert!(!is_instance_id(input));
            let message = e.to_string();
            assert!(!message.is_empty());
            assert!(message.len() < MAX_MESSAGE_LEN, "{} bytes", message.len());
        }
    }
}

/// The command decoder's properties: it never panics, what it accepts is valid and decodes
/// the same from its canonical form, and what it refuses it explains in a bounded message.
pub fn check_command(data: &[u8]) {
    match decode(data) {
        Ok(command) => {
            assert!(
                serde_json::from_slice::<serde_json::Value>(data).is_ok(),
                "accepted a body that is not JSON"
            );
            let canonical = match &command {
                Command::RequestRstudio { user, purpose, .. } => {
                    assert_eq!(UserId::parse(user.as_str()).as_ref(), Ok(user));
                    assert!(!user.as_str().trim().is_empty());
                    assert!(user.as_str().chars().count() <= MAX_USER_ID_LEN);
                    assert!(!user.as_str().chars().any(char::is_control));
                    serde_json::json!({
                        "command": "REQUEST_RSTUDIO",
                        "payload": {"userId": user.as_str(), "purpose": purpose},
                    })
                }
                Command::GetStatus { instance } => {
                    if let Some(id) = instance {
                        assert!(is_instance_id(id.as_str()), "{id}");
                    }
                    serde_json::json!({
                        "command": "GET_STATUS",
                        "payload": {"instanceId": instance.as_ref().map(InstanceId::as_str)},
                    })
                }
                Command::Delete { instance } => {
                    assert!(is_instance_id(instance.as_str()), "{instance}");
                    serde_json::json!({
                        "command": "DELETE",
                        "payload": {"instanceId": instance.as_str()},
                    })
                }
            };
            let again = decode(canonical.to_string().as_bytes());
            assert_eq!(again.as_ref(), Ok(&command), "{canonical}");
        }
        Err(e) => {
            let message = e.to_string();
            assert!(!message.is_empty());
            assert!(message.len() < MAX_MESSAGE_LEN, "{} bytes", message.len());
            if let CommandError::Malformed(_) = e {
                assert!(serde_json::from_slice::<serde_json::Value>(data).is_err());
                assert!(message.contains("not valid JSON"), "{message}");
            }
        }
    }
}

/// Runs `check` on every file of `fuzz/corpus/<name>/` and returns how many there were.
#[cfg(test)]
fn replay(name: &str, check: fn(&[u8])) -> usize {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(name);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("a corpus entry").path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    let mut failures = Vec::new();
    for path in &files {
        let data = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        if let Err(panic) = std::panic::catch_unwind(|| check(&data)) {
            let message = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("(no message)");
            failures.push(format!(
                "{} ({:?}): {message}",
                path.display(),
                String::from_utf8_lossy(&data[..data.len().min(200)])
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} inputs in {} failed:\n{}",
        failures.len(),
        files.len(),
        dir.display(),
        failures.join("\n")
    );
    files.len()
}

#[test]
fn the_route_corpus_replays() {
    let replayed = replay("route", check_route);
    assert!(replayed > 0, "fuzz/corpus/route/ is empty");
}

#[test]
fn the_command_corpus_replays() {
    let replayed = replay("command", check_command);
    assert!(replayed > 0, "fuzz/corpus/command/ is empty");
}

#[test]
fn the_answer_corpus_replays() {
    let replayed = replay("answer", answer_checks::check_answer);
    assert!(replayed > 0, "fuzz/corpus/answer/ is empty");
}

/// The `answer` target compiles `src/http1/{answer,chunks,request}.rs` outside the crate,
/// with copies of the limits they use: the copies must be the library's.
#[test]
fn the_answer_target_has_the_library_limits() {
    assert_eq!(http1_shim::MAX_HEAD, http1::MAX_HEAD);
    assert_eq!(http1_shim::MAX_HEADERS, http1::MAX_HEADERS);
}

/// The `answer` checks on inputs at the limits, which libFuzzer's 4 KiB inputs never reach
/// and which are too big to keep in the corpus.
#[test]
fn the_answer_checks_hold_at_the_limits() {
    use http1::answer::{read, Refusal};
    let check = |bytes: &[u8]| {
        let mut input = vec![b'@'];
        input.extend_from_slice(bytes);
        answer_checks::check_answer(&input);
    };
    // A bare-LF head under the limit, written as one over it (a CR and a blank a line).
    let mut head = b"HTTP/1.1 200 OK\nContent-Length: 0\n".to_vec();
    let value = "v".repeat((http1::MAX_HEAD - 64) / 126 - 3);
    for _ in 0..126 {
        head.extend_from_slice(format!("X:{value}\n").as_bytes());
    }
    head.push(b'\n');
    let mut out = Vec::new();
    assert!(matches!(read(&head, false, &mut out), Ok(Some(_))));
    assert!(head.len() <= http1::MAX_HEAD && out.len() > http1::MAX_HEAD);
    check(&head);
    // Too long: incomplete at the limit, or complete past it.
    let mut long = b"HTTP/1.1 200 OK\r\nX: ".to_vec();
    long.resize(http1::MAX_HEAD, b'a');
    assert_eq!(read(&long, false, &mut Vec::new()), Err(Refusal::TooLong));
    check(&long);
    long.extend_from_slice(b"\r\n\r\n");
    assert_eq!(read(&long, false, &mut Vec::new()), Err(Refusal::TooLong));
    check(&long);
    // One header too many.
    let mut many = b"HTTP/1.1 200 OK\r\n".to_vec();
    for i in 0..=http1::MAX_HEADERS {
        many.extend_from_slice(format!("X-{i}: {i}\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    assert_eq!(read(&many, false, &mut Vec::new()), Err(Refusal::TooLong));
    check(&many);
    // Trailers over the limit, and just under it.
    let limit = http1::chunks::MAX_TRAILERS;
    for len in [limit, limit - 16] {
        let mut body = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nT: ".to_vec();
        body.extend(std::iter::repeat_n(b'a', len));
        body.extend_from_slice(b"\r\n\r\n");
        check(&body);
    }
}
