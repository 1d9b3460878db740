//! The command API's wire format, decoded into plain values: `{"command": ..., "payload": {...}}`
//! as the original service took it. Pure, so that it can be table-tested and fuzzed.

use serde_json::Value;

use super::ids::{InstanceId, UserId};

/// A decoded command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    RequestRstudio {
        user: UserId,
        purpose: Option<String>,
        /// Seconds to wait for the instance to be ready before answering.
        wait: Option<u64>,
    },
    /// `GET_STATUS` without an instance lists the assigned instances.
    GetStatus {
        instance: Option<InstanceId>,
    },
    Delete {
        instance: InstanceId,
    },
}

/// A request the caller must fix; always a 400.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error(
        "the body is not valid JSON ({0}): send {{\"command\": \"...\", \"payload\": {{...}}}}"
    )]
    Malformed(String),
    #[error(
        "the body must be a JSON object like {{\"command\": \"GET_STATUS\", \"payload\": {{}}}}"
    )]
    NotAnObject,
    #[error("`command` is missing: use REQUEST_RSTUDIO, GET_STATUS or DELETE")]
    MissingCommand,
    #[error("unknown command `{0}`: use REQUEST_RSTUDIO, GET_STATUS or DELETE")]
    UnknownCommand(String),
    #[error("`payload` must be a JSON object")]
    PayloadNotAnObject,
    #[error("`payload.{0}` is missing: {1}")]
    MissingField(&'static str, &'static str),
    #[error("`payload.{0}` must be {1}")]
    WrongType(&'static str, &'static str),
    #[error("`payload.{field}`: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}

/// The longest `wait` a caller may ask for: an EC2 workspace is ready well within it.
pub const MAX_WAIT_SECONDS: u64 = 900;

/// Decodes one command body.
pub fn decode(body: &[u8]) -> Result<Command, CommandError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        // serde_json's message is precise about where; keep its first line.
        CommandError::Malformed(e.to_string())
    })?;
    let Value::Object(mut top) = value else {
        return Err(CommandError::NotAnObject);
    };
    let command = match top.remove("command") {
        Some(Value::String(c)) => c,
        Some(Value::Null) | None => return Err(CommandError::MissingCommand),
        Some(other) => {
            return Err(CommandError::UnknownCommand(shorten(&other.to_string())));
        }
    };
    let payload = match top.remove("payload") {
        None | Some(Value::Null) => serde_json::Map::new(),
        Some(Value::Object(p)) => p,
        Some(_) => return Err(CommandError::PayloadNotAnObject),
    };
    match command.as_str() {
        "REQUEST_RSTUDIO" => {
            let user = match payload.get("userId") {
                None | Some(Value::Null) => {
                    return Err(CommandError::MissingField(
                        "userId",
                        "send the id of the user the workspace is for",
                    ))
                }
                Some(Value::String(s)) => UserId::parse(s).map_err(|e| CommandError::Invalid {
                    field: "userId",
                    message: e.to_string(),
                })?,
                // The original callers may send numeric ids; they are ids all the same.
                Some(Value::Number(n)) => {
                    UserId::parse(&n.to_string()).map_err(|e| CommandError::Invalid {
                        field: "userId",
                        message: e.to_string(),
                    })?
                }
                Some(_) => return Err(CommandError::WrongType("userId", "a string")),
            };
            let purpose = match payload.get("purpose") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(s.clone()),
                Some(_) => return Err(CommandError::WrongType("purpose", "a string")),
            };
            let wait = match payload.get("wait") {
                None | Some(Value::Null) => None,
                Some(Value::Number(n)) => match n.as_u64() {
                    Some(seconds) if seconds <= MAX_WAIT_SECONDS => Some(seconds),
                    _ => {
                        return Err(CommandError::Invalid {
                            field: "wait",
                            message: format!("must be whole seconds from 0 to {MAX_WAIT_SECONDS}"),
                        })
                    }
                },
                Some(_) => return Err(CommandError::WrongType("wait", "a number of seconds")),
            };
            Ok(Command::RequestRstudio {
                user,
                purpose,
                wait,
            })
        }
        "GET_STATUS" => Ok(Command::GetStatus {
            instance: optional_instance(&payload)?,
        }),
        "DELETE" => match optional_instance(&payload)? {
            Some(instance) => Ok(Command::Delete { instance }),
            None => Err(CommandError::MissingField(
                "instanceId",
                "send the id of the instance to delete",
            )),
        },
        other => Err(CommandError::UnknownCommand(shorten(other))),
    }
}

fn optional_instance(
    payload: &serde_json::Map<String, Value>,
) -> Result<Option<InstanceId>, CommandError> {
    match payload.get("instanceId") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => {
            InstanceId::parse(s)
                .map(Some)
                .map_err(|e| CommandError::Invalid {
                    field: "instanceId",
                    message: e.to_string(),
                })
        }
        Some(_) => Err(CommandError::WrongType("instanceId", "a string")),
    }
}

fn shorten(text: &str) -> String {
    let cut: String = text.chars().take(40).collect();
    if cut.len() < text.len() {
        format!("{cut}...")
    } else {
        cut
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "i-0123456789abcdef0";

    #[test]
    fn the_original_commands_decode() {
        assert_eq!(
            decode(br#"{"command":"REQUEST_RSTUDIO","payload":{"userId":"1234-abcd"}}"#),
            Ok(Command::RequestRstudio {
                user: UserId::parse("1234-abcd").unwrap(),
                purpose: None,
                wait: None
            })
        );
        assert_eq!(
            decode(br#"{"command":"REQUEST_RSTUDIO","payload":{"userId":42,"purpose":"jupyter","wait":30}}"#),
            Ok(Command::RequestRstudio {
                user: UserId::parse("42").unwrap(),
                purpose: Some("jupyter".into()),
                wait: Some(30)
            })
        );
        assert_eq!(
            decode(br#"{"command":"GET_STATUS","payload":{}}"#),
            Ok(Command::GetStatus { instance: None })
        );
        assert_eq!(
            decode(br#"{"command":"GET_STATUS"}"#),
            Ok(Command::GetStatus { instance: None })
        );
        assert_eq!(
            decode(
                format!(r#"{{"command":"DELETE","payload":{{"instanceId":"{ID}"}}}}"#).as_bytes()
            ),
            Ok(Command::Delete {
                instance: InstanceId::parse(ID).unwrap()
            })
        );
    }

    #[test]
    fn bad_bodies_say_what_to_fix() {
        let nested = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        let cases: Vec<(&[u8], &str)> = vec![
            (b"{not json", "not valid JSON"),
            (b"", "not valid JSON"),
            (b"[1,2]", "JSON object"),
            (b"{}", "`command` is missing"),
            (br#"{"command":"REBOOT"}"#, "unknown command `REBOOT`"),
            (br#"{"command":7}"#, "unknown command `7`"),
            (
                br#"{"command":"REQUEST_RSTUDIO","payload":[]}"#,
                "must be a JSON object",
            ),
            (
                br#"{"command":"REQUEST_RSTUDIO","payload":{}}"#,
                "`payload.userId` is missing",
            ),
            (
                br#"{"command":"REQUEST_RSTUDIO","payload":{"userId":{}}}"#,
                "must be a string",
            ),
            (
                br#"{"command":"REQUEST_RSTUDIO","payload":{"userId":""}}"#,
                "userId is empty",
            ),
            (
                br#"{"command":"DELETE","payload":{}}"#,
                "`payload.instanceId` is missing",
            ),
            (
                br#"{"command":"DELETE","payload":{"instanceId":"../etc"}}"#,
                "not an instance id",
            ),
            (
                br#"{"command":"GET_STATUS","payload":{"instanceId":5}}"#,
                "must be a string",
            ),
            (nested.as_bytes(), "not valid JSON"),
            (
                br#"{"command":"REQUEST_RSTUDIO","payload":{"userId":"a","wait":"soon"}}"#,
                "a number of seconds",
            ),
            (
                br#"{"command":"REQUEST_RSTUDIO","payload":{"userId":"a","wait":-1}}"#,
                "whole seconds",
            ),
            (
                br#"{"command":"REQUEST_RSTUDIO","payload":{"userId":"a","wait":100000}}"#,
                "whole seconds",
            ),
        ];
        for (body, expected) in cases {
            let err = decode(body).unwrap_err().to_string();
            assert!(
                err.contains(expected),
                "{:?}: `{err}` lacks `{expected}`",
                String::from_utf8_lossy(&body[..body.len().min(40)])
            );
        }
    }
}
