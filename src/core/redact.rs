//! What a user may see of a workspace's log: the last lines, each cut short, with anything
//! that looks like a credential replaced. A failed start shows them on its page and in the
//! pool's log, so the words must not carry a token, a password or a key.

/// Names whose values are secrets when they appear as `name=value` or `name: value`.
const SECRET_NAMES: [&str; 11] = [
    "authorization",
    "cookie",
    "token",
    "secret",
    "password",
    "passwd",
    "pwd",
    "key",
    "credential",
    "auth",
    "session",
];

/// Longest line shown, in characters.
const MAX_LINE: usize = 240;

const REDACTED: &str = "[redacted]";

/// The last `lines` lines of `log`, redacted (see [`redact_line`]); `secrets` are values
/// known to be secret (the pool's own), replaced wherever they appear.
pub fn log_tail(log: &str, lines: usize, secrets: &[&str]) -> Vec<String> {
    let all: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    all[all.len().saturating_sub(lines)..]
        .iter()
        .map(|line| redact_line(line, secrets))
        .collect()
}

/// One line with the values of secret-looking names (`token=...`, `password: ...`,
/// `Authorization: Bearer ...`) and every known secret replaced, control characters
/// dropped, and cut at [`MAX_LINE`] characters.
pub fn redact_line(line: &str, secrets: &[&str]) -> String {
    let mut line: String = line
        .chars()
        .filter(|c| !c.is_control() || *c == '\t')
        .collect();
    for secret in secrets.iter().filter(|s| s.len() >= 4) {
        line = line.replace(secret, REDACTED);
    }
    let mut out = String::with_capacity(line.len());
    let mut rest = line.as_str();
    // Each `name=value` / `name: value` whose name ends in a secret word loses its value.
    while let Some(at) = rest.find(['=', ':']) {
        let (before, after) = rest.split_at(at);
        let sep = &after[..1];
        let after = &after[1..];
        out.push_str(before);
        out.push_str(sep);
        let name: String = before
            .chars()
            .rev()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-')
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<String>()
            .to_ascii_lowercase();
        let secret = !name.is_empty() && SECRET_NAMES.iter().any(|s| name.ends_with(s));
        if secret {
            // Skip blanks, a scheme word such as `Bearer`, then the value up to a separator.
            let trimmed = after.trim_start();
            let blanks = after.len() - trimmed.len();
            let mut value_start = blanks;
            let lower = trimmed.to_ascii_lowercase();
            for scheme in ["bearer ", "basic ", "token "] {
                if lower.starts_with(scheme) {
                    value_start += scheme.len();
                    break;
                }
            }
            let value = &after[value_start..];
            let end = value
                .find(|c: char| c.is_whitespace() || matches!(c, '&' | ',' | ';' | '"' | '\''))
                .unwrap_or(value.len());
            if end > 0 {
                out.push_str(&after[..value_start]);
                out.push_str(REDACTED);
                rest = &value[end..];
                continue;
            }
        }
        rest = after;
    }
    out.push_str(rest);
    if out.chars().count() > MAX_LINE {
        out = out.chars().take(MAX_LINE).collect::<String>() + "…";
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_replaced() {
        let cases = [
            (
                "  http://127.0.0.1:8888/lab?token=abc123def",
                "  http://127.0.0.1:8888/lab?token=[redacted]",
            ),
            ("PASSWORD=hunter2 next", "PASSWORD=[redacted] next"),
            (
                "Authorization: Bearer eyJ.abc.def",
                "Authorization: Bearer [redacted]",
            ),
            (
                "api_key: AKIA123, region: x",
                "api_key: [redacted], region: x",
            ),
            ("Error: no such file", "Error: no such file"),
            ("port=8080 host=0.0.0.0", "port=8080 host=0.0.0.0"),
            ("a=1&auth=zz&b=2", "a=1&auth=[redacted]&b=2"),
        ];
        for (line, want) in cases {
            assert_eq!(redact_line(line, &[]), want, "{line}");
        }
    }

    #[test]
    fn known_secrets_are_replaced_anywhere() {
        assert_eq!(
            redact_line("started with s3cr3t-value inside", &["s3cr3t-value"]),
            "started with [redacted] inside"
        );
    }

    #[test]
    fn the_tail_is_the_last_lines_cut_short() {
        let log = format!("one\n\ntwo\nthree\n{}\n", "x".repeat(500));
        let tail = log_tail(&log, 2, &[]);
        assert_eq!(tail.len(), 2);
        assert_eq!(tail[0], "three");
        assert_eq!(tail[1].chars().count(), MAX_LINE + 1);
        assert!(log_tail("a\u{1b}[31mred\n", 5, &[])[0] == "a[31mred");
    }
}
