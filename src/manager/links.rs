//! The links users open: the proxy's public URL (or the instance's own host under host
//! routing), with a signed single-use token when the proxy checks access with tokens.

use std::sync::Arc;

use crate::config::{AuthConfig, ProxyConfig};
use crate::core::access::LINK_PARAM;
use crate::core::ids::{InstanceId, UserId};
use crate::core::token::{Claims, Kind, Signer};

pub struct UserLinks {
    public_url: String,
    /// `(scheme, domain, ":port" or "")` under host routing.
    host_routing: Option<(String, String, String)>,
    signer: Option<(Arc<Signer>, u64)>,
}

impl UserLinks {
    pub fn new(proxy: &ProxyConfig, auth: &AuthConfig, signer: Option<Arc<Signer>>) -> Self {
        let (scheme, rest) = proxy
            .public_url
            .split_once("://")
            .unwrap_or(("http", proxy.public_url.as_str()));
        let authority = rest.split('/').next().unwrap_or_default();
        let port = match authority.rsplit_once(':') {
            Some((_, p)) if p.bytes().all(|b| b.is_ascii_digit()) => format!(":{p}"),
            _ => String::new(),
        };
        let link_ttl = match auth {
            AuthConfig::Token { link_ttl, .. } => link_ttl.as_millis() as u64,
            _ => 0,
        };
        Self {
            public_url: proxy.public_url.clone(),
            host_routing: proxy
                .host_domain
                .as_ref()
                .map(|d| (scheme.to_owned(), d.clone(), port)),
            signer: signer.map(|s| (s, link_ttl)),
        }
    }

    /// The workspace's address, without credentials.
    pub fn base(&self, id: &InstanceId) -> String {
        match &self.host_routing {
            Some((scheme, domain, port)) => format!("{scheme}://{id}.{domain}{port}/"),
            None => format!("{}/{id}/", self.public_url),
        }
    }

    /// What `REQUEST_RSTUDIO` answers as `url`: the base, with a fresh link token for `user`.
    pub fn for_user(&self, id: &InstanceId, user: &UserId, now_ms: u64) -> String {
        let base = self.base(id);
        match &self.signer {
            Some((signer, ttl)) => {
                let token = signer.sign(&Claims {
                    kind: Kind::Link,
                    instance: id.as_str().to_owned(),
                    user: user.as_str().to_owned(),
                    expires_ms: now_ms + ttl,
                    nonce: rand::random(),
                });
                format!("{base}?{LINK_PARAM}={token}")
            }
            None => base,
        }
    }
}
