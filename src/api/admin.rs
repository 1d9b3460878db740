//! The admin page on the command API's listener: `/admin` shows the pools, every instance and
//! the last audit events, and lets an operator terminate, pause or resume an instance.
//!
//! Access is the API token: a login form trades it for a session cookie (`HttpOnly`,
//! `SameSite=Strict`, path `/admin`), kept in memory for [`SESSION_TTL_MS`]. Actions are
//! `POST`s that carry the session's CSRF token in `X-CSRF-Token`; the page gets it in a
//! `<meta>` tag. Without an API token the command API listens on loopback only (the
//! configuration refuses anything else), and so does the page: open, still with CSRF tokens,
//! since any web page the operator opens could post to a loopback address.

use std::collections::HashMap;
use std::sync::Mutex;

use hmac::{Hmac, KeyInit, Mac};
use http::StatusCode;
use serde_json::{json, Value};
use sha2::Sha256;

use crate::core::access::cookie;
use crate::core::auth::token_matches;
use crate::provider::process::now_ms;

/// The admin session's cookie.
pub const COOKIE: &str = "rstudio_pool_admin";
/// How long an admin session lasts.
pub const SESSION_TTL_MS: u64 = 12 * 3600 * 1000;
/// Sessions kept at most (the oldest go first).
const MAX_SESSIONS: usize = 1024;

/// An answer of the admin page: a status, a content type, a body and extra headers.
pub struct Reply {
    pub status: StatusCode,
    pub content_type: &'static str,
    pub body: Vec<u8>,
    pub headers: Vec<(&'static str, String)>,
}

impl Reply {
    pub fn json(status: StatusCode, value: &Value) -> Self {
        Self {
            status,
            content_type: "application/json",
            body: serde_json::to_vec(value).unwrap_or_default(),
            headers: Vec::new(),
        }
    }

    pub fn html(status: StatusCode, body: String) -> Self {
        Self {
            status,
            content_type: "text/html; charset=utf-8",
            body: body.into_bytes(),
            headers: vec![
                ("X-Frame-Options", "DENY".into()),
                (
                    "Content-Security-Policy",
                    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'unsafe-inline'; frame-ancestors 'none'".into(),
                ),
            ],
        }
    }

    fn redirect(location: &str) -> Self {
        let mut reply = Self::html(StatusCode::SEE_OTHER, String::new());
        reply.headers.push(("Location", location.to_owned()));
        reply
    }
}

/// The admin page's sessions and CSRF key.
pub struct Admin {
    token: Option<String>,
    /// Session id → expiry (ms since the epoch).
    sessions: Mutex<HashMap<String, u64>>,
    csrf_key: [u8; 32],
}

/// Who is asking, once signed in: the session, for its CSRF token.
pub struct Signed(String);

impl Admin {
    pub fn new(token: Option<String>) -> Self {
        Self {
            token,
            sessions: Mutex::new(HashMap::new()),
            csrf_key: rand::random(),
        }
    }

    /// The caller's admin session, from its `Cookie` header; always one without a token.
    pub fn signed_in(&self, cookies: Option<&str>) -> Option<Signed> {
        if self.token.is_none() {
            return Some(Signed(String::new()));
        }
        let presented = cookies.and_then(|c| cookie(c, COOKIE))?;
        let now = now_ms();
        let sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        sessions
            .get(presented)
            .filter(|expiry| now < **expiry)
            .map(|_| Signed(presented.to_owned()))
    }

    /// The CSRF token of a session: an HMAC of it under this process's key.
    pub fn csrf(&self, signed: &Signed) -> String {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.csrf_key).expect("HMAC accepts any key length");
        mac.update(signed.0.as_bytes());
        hex(&mac.finalize().into_bytes())
    }

    /// Whether `presented` is the CSRF token of the session.
    pub fn csrf_matches(&self, signed: &Signed, presented: Option<&str>) -> bool {
        presented.is_some_and(|p| token_matches(p.as_bytes(), self.csrf(signed).as_bytes()))
    }

    /// `POST /admin/login` with a form body `token=<API token>`.
    pub fn login(&self, body: &[u8]) -> Reply {
        let Some(expected) = &self.token else {
            return Reply::redirect("/admin");
        };
        let presented = form_value(body, "token").unwrap_or_default();
        if !token_matches(presented.as_bytes(), expected.as_bytes()) {
            return Reply::html(
                StatusCode::UNAUTHORIZED,
                login_page(Some("That is not the API token (api.token, API_TOKEN).")),
            );
        }
        let session = hex(&rand::random::<[u8; 32]>());
        let now = now_ms();
        {
            let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
            sessions.retain(|_, expiry| *expiry > now);
            if sessions.len() >= MAX_SESSIONS {
                if let Some(oldest) = sessions
                    .iter()
                    .min_by_key(|(_, expiry)| **expiry)
                    .map(|(k, _)| k.clone())
                {
                    sessions.remove(&oldest);
                }
            }
            sessions.insert(session.clone(), now + SESSION_TTL_MS);
        }
        let mut reply = Reply::redirect("/admin");
        reply.headers.push((
            "Set-Cookie",
            format!(
                "{COOKIE}={session}; Path=/admin; HttpOnly; SameSite=Strict; Max-Age={}",
                SESSION_TTL_MS / 1000
            ),
        ));
        reply
    }

    /// `POST /admin/logout`: ends the session.
    pub fn logout(&self, signed: &Signed) -> Reply {
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&signed.0);
        let mut reply = Reply::redirect("/admin");
        reply.headers.push((
            "Set-Cookie",
            format!("{COOKIE}=; Path=/admin; HttpOnly; SameSite=Strict; Max-Age=0"),
        ));
        reply
    }

    /// `GET /admin`: the page, or the login form.
    pub fn page(&self, signed: Option<&Signed>) -> Reply {
        match signed {
            Some(signed) => Reply::html(
                StatusCode::OK,
                with_style(PAGE)
                    .replace("{csrf}", &self.csrf(signed))
                    .replace("{logout}", if self.token.is_some() { LOGOUT } else { "" }),
            ),
            None => Reply::html(StatusCode::OK, login_page(None)),
        }
    }

    /// The answer to an admin request without a session (the page itself shows the form).
    pub fn refused(&self) -> Reply {
        Reply::json(
            StatusCode::UNAUTHORIZED,
            &json!({"error": "sign in at /admin with the API token first"}),
        )
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The value of `name` in a form-urlencoded body.
pub fn form_value(body: &[u8], name: &str) -> Option<String> {
    let text = std::str::from_utf8(body).ok()?;
    text.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(k)? == name).then(|| percent_decode(v))?
    })
}

/// `application/x-www-form-urlencoded` decoding: `+` is a blank, `%XX` a byte.
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = text.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

fn login_page(error: Option<&str>) -> String {
    let error = error
        .map(|e| format!("<p class=\"error\" role=\"alert\">{e}</p>"))
        .unwrap_or_default();
    with_style(LOGIN).replace("{error}", &error)
}

const STYLE: &str = "<style>
body{font-family:system-ui,sans-serif;margin:0;color:#222;background:#f6f7f9}
header{background:#1f3a5f;color:#fff;padding:.6em 1.2em;display:flex;align-items:center;gap:1em}
header h1{font-size:1.2em;margin:0;flex:1}
main{padding:1em 1.2em;max-width:1400px}
section{background:#fff;border:1px solid #dde;border-radius:6px;padding:.6em 1em;margin-bottom:1em}
h2{font-size:1em;margin:.3em 0 .6em}
table{border-collapse:collapse;width:100%;font-size:.9em}
th,td{text-align:left;padding:.3em .6em;border-bottom:1px solid #eee;white-space:nowrap}
th{color:#555;font-weight:600}
td.cause{white-space:normal}
button{font:inherit;padding:.15em .6em;margin-right:.3em;cursor:pointer}
.state{display:inline-block;padding:0 .5em;border-radius:1em;font-size:.85em;background:#eee}
.state-free{background:#e3f4e3}.state-assigned{background:#dde9fb}.state-launching,.state-resuming{background:#fff3cd}
.state-paused{background:#ece3f7}.state-terminating{background:#f8d7da}
.error{color:#a00}.muted{color:#777}
form.login{max-width:26em;margin:5em auto;background:#fff;padding:1.5em;border:1px solid #dde;border-radius:6px}
form.login input{width:100%;box-sizing:border-box;padding:.4em;margin:.5em 0 1em;font:inherit}
</style>";

const LOGIN: &str = concat!(
    "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>rstudio-pool admin: sign in</title>",
    "<meta name=\"viewport\" content=\"width=device-width\">",
    "{style}",
    "</head><body><form class=\"login\" method=\"post\" action=\"/admin/login\">",
    "<h1>rstudio-pool admin</h1>{error}",
    "<label for=\"token\">API token</label>",
    "<input id=\"token\" name=\"token\" type=\"password\" autocomplete=\"current-password\" autofocus required>",
    "<button id=\"sign-in\" type=\"submit\">Sign in</button></form></body></html>\n"
);

const LOGOUT: &str = "<form method=\"post\" action=\"/admin/logout\"><input type=\"hidden\" name=\"csrf\" id=\"logout-csrf\"><button id=\"sign-out\" type=\"submit\">Sign out</button></form>";

const PAGE: &str = concat!(
    "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>rstudio-pool admin</title>",
    "<meta name=\"viewport\" content=\"width=device-width\"><meta name=\"csrf-token\" content=\"{csrf}\">",
    "{style}",
    "</head><body><header><h1>rstudio-pool</h1><span id=\"updated\" class=\"muted\"></span>{logout}</header><main>",
    "<section><h2>Pools</h2><table id=\"pools\"><thead><tr><th>Purpose</th><th>Free</th><th>Assigned</th>",
    "<th>Launching</th><th>Paused</th><th>Terminating</th><th>Min free</th><th>Max</th><th>Launches</th></tr></thead><tbody></tbody></table></section>",
    "<section><h2>Costs <span id=\"costs-since\" class=\"muted\"></span></h2><table id=\"costs\"><thead><tr><th>Purpose</th><th>Warm policy</th>",
    "<th>Keep free now</th><th>Today</th><th>Today, idle warm</th><th>Since the books opened</th><th>Instance-hours</th></tr></thead><tbody></tbody></table>",
    "<h3>Per user, this month <span id=\"period\" class=\"muted\"></span></h3><table id=\"user-costs\"><thead><tr><th>User</th><th>Purpose</th>",
    "<th>Hours in use</th><th>Hours idle</th><th>Hours paused</th><th>Cost</th></tr></thead><tbody></tbody></table></section>",
    "<section><h2>Instances <span id=\"count\" class=\"muted\"></span></h2><p id=\"message\" role=\"status\"></p>",
    "<table id=\"instances\"><thead><tr><th>Instance</th><th>Purpose</th><th>Owner</th><th>State</th>",
    "<th>Age</th><th>Idle for</th><th>Address</th><th>Actions</th></tr></thead><tbody></tbody></table></section>",
    "<section><h2>Last events</h2><table id=\"events\"><thead><tr><th>When</th><th>Event</th><th>User</th>",
    "<th>Instance</th><th>Purpose</th><th>Cause</th></tr></thead><tbody></tbody></table></section>",
    "</main><script>",
    include_str!("admin.js"),
    "</script></body></html>\n"
);

/// Fills the shared style in (the pages are constants but for their tokens).
pub fn with_style(page: &str) -> String {
    page.replace("{style}", STYLE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_are_decoded() {
        assert_eq!(
            form_value(b"a=1&token=s3%2Bc+r%3Dt", "token").as_deref(),
            Some("s3+c r=t")
        );
        assert_eq!(form_value(b"token=%zz", "token"), None);
        assert_eq!(form_value(b"other=1", "token"), None);
    }

    #[test]
    fn sessions_come_from_the_token_only() {
        let admin = Admin::new(Some("t0ken".into()));
        assert!(admin.signed_in(None).is_none());
        let refused = admin.login(b"token=wrong");
        assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
        let reply = admin.login(b"token=t0ken");
        assert_eq!(reply.status, StatusCode::SEE_OTHER);
        let set = &reply
            .headers
            .iter()
            .find(|(n, _)| *n == "Set-Cookie")
            .unwrap()
            .1;
        assert!(set.contains("HttpOnly") && set.contains("SameSite=Strict"));
        let pair = set.split(';').next().unwrap();
        let signed = admin.signed_in(Some(pair)).expect("signed in");
        let csrf = admin.csrf(&signed);
        assert!(admin.csrf_matches(&signed, Some(&csrf)));
        assert!(!admin.csrf_matches(&signed, Some("nope")));
        assert!(!admin.csrf_matches(&signed, None));
        admin.logout(&signed);
        assert!(admin.signed_in(Some(pair)).is_none());
    }
}
