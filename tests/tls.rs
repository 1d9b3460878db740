//! TLS at the edge (issue 19): the proxy presents a certificate from files, clients that check
//! it (a test CA made here, and nothing else trusted) reach workspaces over HTTPS and WSS, on
//! the edge's own path for HTTP/1.1 and through Pingora for HTTP/2; a wrong-host or expired
//! certificate is refused by the client; a renewed certificate on disk is served without a
//! restart; plain HTTP can be redirected.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::{eventually, Options, Server};
use futures_util::{SinkExt, StreamExt};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::json;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

const WAIT: Duration = Duration::from_secs(30);

/// A certificate authority of the test's own, the only one its clients trust.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    fn new() -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "rstudio-pool test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    /// A server certificate for `names`, valid now unless `expired`; its chain and key as PEM.
    fn issue(&self, names: &[&str], expired: bool) -> (String, String, CertificateDer<'static>) {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name.push(DnType::CommonName, names[0]);
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        let der = cert.der().clone();
        (
            format!("{}{}", cert.pem(), self.cert.pem()),
            key.serialize_pem(),
            der,
        )
    }

    fn roots(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert.der().clone()).unwrap();
        roots
    }
}

/// Writes a chain and key where the proxy reads them, replacing the files at once (as
/// certbot and friends do), so the proxy never reads half a file.
fn install(dir: &Path, chain: &str, key: &str) -> (PathBuf, PathBuf) {
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    for (path, text) in [(&cert_path, chain), (&key_path, key)] {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }
    (cert_path, key_path)
}

fn tls_yaml(cert: &Path, key: &Path) -> String {
    format!(
        "  tls:\n    cert: {}\n    key: {}\n",
        cert.display(),
        key.display()
    )
}

/// A client that trusts the test CA only, reaching `name` at the proxy's address.
fn client(ca: &Ca, server: &Server, name: &str, http2: bool) -> reqwest::Client {
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_der(ca.cert.der()).unwrap())
        .resolve(name, server.proxy)
        .redirect(reqwest::redirect::Policy::none());
    if !http2 {
        builder = builder.http1_only();
    }
    builder.build().unwrap()
}

fn https(server: &Server, name: &str, path: &str) -> String {
    format!("https://{name}:{}{path}", server.proxy.port())
}

/// A TLS connection to the proxy as `name`, checked against the test CA: the certificate
/// the proxy presented, or the client's reason to refuse it.
async fn handshake(
    ca: &Ca,
    server: &Server,
    name: &str,
) -> Result<
    (
        CertificateDer<'static>,
        tokio_rustls::client::TlsStream<TcpStream>,
    ),
    String,
> {
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(ca.roots())
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(server.proxy).await.unwrap();
    let stream = connector
        .connect(ServerName::try_from(name.to_owned()).unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    let presented = stream.get_ref().1.peer_certificates().unwrap()[0].clone();
    Ok((presented, stream))
}

async fn metric(server: &Server, name: &str, labels: &str) -> f64 {
    let text = server
        .client()
        .get(format!("http://{}/metrics", server.api))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    // Summed over the labels not named (status classes).
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn https_and_wss_reach_a_workspace_on_the_edges_path_and_http2_through_pingora() {
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    let (chain, key, _) = ca.issue(&["localhost"], false);
    let (cert_path, key_path) = install(dir.path(), &chain, &key);
    let server = Server::start(Options {
        extra_yaml: tls_yaml(&cert_path, &key_path),
        ..Options::default()
    })
    .await;
    let id = server.request("ana").await;
    let h1 = client(&ca, &server, "localhost", false);
    let url = https(&server, "localhost", &format!("/{id}/"));
    let page = eventually("the workspace answers over HTTPS", WAIT, || async {
        let r = h1.get(&url).send().await.ok()?;
        (r.status() == 200).then_some(r)
    })
    .await;
    assert_eq!(page.version(), reqwest::Version::HTTP_11);
    assert!(page.text().await.unwrap().contains(&id));

    // HTTP/1.1 over TLS is carried by the edge itself, HTTP/2 by Pingora.
    let edge_before = metric(
        &server,
        "rstudio_pool_proxy_requests_total",
        "path=\"edge\"",
    )
    .await;
    for _ in 0..5 {
        let r = h1.get(&url).send().await.unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
    }
    let edge_after = eventually("the edge counted its requests", WAIT, || async {
        let now = metric(
            &server,
            "rstudio_pool_proxy_requests_total",
            "path=\"edge\"",
        )
        .await;
        (now >= edge_before + 5.0).then_some(now)
    })
    .await;
    assert!(edge_after >= edge_before + 5.0);
    let pingora_before = metric(
        &server,
        "rstudio_pool_proxy_requests_total",
        "path=\"pingora\"",
    )
    .await;
    let h2 = client(&ca, &server, "localhost", true);
    let r = h2.get(&url).send().await.unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2, "ALPN chose HTTP/2");
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains(&id));
    eventually("Pingora counted the HTTP/2 request", WAIT, || async {
        let now = metric(
            &server,
            "rstudio_pool_proxy_requests_total",
            "path=\"pingora\"",
        )
        .await;
        (now > pingora_before).then_some(())
    })
    .await;

    // A WebSocket over TLS, tunnelled by the edge.
    let (_, tls) = handshake(&ca, &server, "localhost").await.unwrap();
    let ws_url = format!("wss://localhost:{}/{id}/ws", server.proxy.port());
    let (mut socket, response) = tokio_tungstenite::client_async(&ws_url, tls).await.unwrap();
    assert_eq!(response.status().as_u16(), 101);
    for text in ["over", "tls"] {
        socket.send(Message::text(text)).await.unwrap();
        let reply = tokio::time::timeout(WAIT, socket.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(reply.into_text().unwrap().as_str(), text);
    }
    let opened = metric(&server, "rstudio_pool_open_websockets", "").await;
    assert!(opened >= 1.0, "{opened}");

    // The public URL is https:// by default, so links are too.
    let (status, body) = server
        .command("REQUEST_RSTUDIO", json!({"userId": "bo"}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body["url"].as_str().unwrap().starts_with("https://"),
        "{body}"
    );
}

#[tokio::test]
async fn certificates_are_checked_by_the_client_and_renewed_without_a_restart() {
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    let (chain, key, first) = ca.issue(&["localhost"], false);
    let (cert_path, key_path) = install(dir.path(), &chain, &key);
    let mut server = Server::start(Options {
        min_free: 0,
        extra_yaml: tls_yaml(&cert_path, &key_path),
        ..Options::default()
    })
    .await;
    let (presented, _) = handshake(&ca, &server, "localhost").await.unwrap();
    assert_eq!(presented, first);

    // A name the certificate does not carry: the client refuses it.
    let refused = handshake(&ca, &server, "other.example").await.unwrap_err();
    assert!(refused.contains("not valid for name"), "{refused}");
    let wrong_host = client(&ca, &server, "other.example", false)
        .get(https(&server, "other.example", "/"))
        .send()
        .await;
    assert!(wrong_host.is_err(), "{wrong_host:?}");

    // A renewal written to disk is served without a restart.
    let (chain, key, renewed) = ca.issue(&["localhost", "renewed.test"], false);
    install(dir.path(), &chain, &key);
    eventually("the renewed certificate is served", WAIT, || async {
        let (presented, _) = handshake(&ca, &server, "localhost").await.ok()?;
        (presented == renewed).then_some(())
    })
    .await;

    // A renewal whose key does not belong to it is not loaded: the proxy keeps the one it has.
    let (chain_a, _, _) = ca.issue(&["localhost"], false);
    let (_, key_b, _) = ca.issue(&["localhost"], false);
    install(dir.path(), &chain_a, &key_b);
    eventually("the proxy says it kept its certificate", WAIT, || async {
        server
            .log()
            .contains("TLS: kept the certificate in use")
            .then_some(())
    })
    .await;
    let (presented, _) = handshake(&ca, &server, "localhost").await.unwrap();
    assert_eq!(presented, renewed);

    // An expired certificate, loaded on SIGHUP: the client refuses it (the proxy does not
    // hide it), and the signal does not end the process.
    let (chain, key, _) = ca.issue(&["localhost"], true);
    install(dir.path(), &chain, &key);
    unsafe {
        libc::kill(server.pid().expect("the server runs") as i32, libc::SIGHUP);
    }
    let refused = eventually("the expired certificate is refused", WAIT, || async {
        handshake(&ca, &server, "localhost").await.err()
    })
    .await;
    assert!(refused.contains("certificate expired"), "{refused}");
    assert!(
        server.is_alive(),
        "SIGHUP ended the server:\n{}",
        server.log()
    );
}

#[tokio::test]
async fn plain_http_is_redirected_to_https() {
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    let (chain, key, _) = ca.issue(&["localhost"], false);
    let (cert_path, key_path) = install(dir.path(), &chain, &key);
    let redirect_port = common::free_port();
    let server = Server::start(Options {
        min_free: 0,
        extra_yaml: format!(
            "{}  redirect_http: 127.0.0.1:{redirect_port}\n",
            tls_yaml(&cert_path, &key_path)
        ),
        ..Options::default()
    })
    .await;
    let plain = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .resolve("localhost", ([127, 0, 0, 1], redirect_port).into())
        .build()
        .unwrap();
    for (method, status) in [(reqwest::Method::GET, 301), (reqwest::Method::POST, 308)] {
        let r = plain
            .request(
                method.clone(),
                format!("http://localhost:{redirect_port}/i-0123456789abcdef0/?x=1"),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), status, "{method}");
        assert_eq!(
            r.headers()["location"],
            format!(
                "https://localhost:{}/i-0123456789abcdef0/?x=1",
                server.proxy.port()
            )
        );
    }
    // Followed, the redirect lands on the TLS proxy, which answers for itself.
    let r = client(&ca, &server, "localhost", false)
        .get(https(&server, "localhost", "/.rstudio-pool/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn links_over_tls_are_https_and_their_session_cookies_secure() {
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    let (chain, key, _) = ca.issue(&["localhost", "127.0.0.1"], false);
    let (cert_path, key_path) = install(dir.path(), &chain, &key);
    let server = Server::start(Options {
        auth_yaml: Some(
            "auth:\n  mode: token\n  secrets: [\"a-secret-of-sixteen-or-more\"]\n".into(),
        ),
        extra_yaml: tls_yaml(&cert_path, &key_path),
        ..Options::default()
    })
    .await;
    let (status, body) = server
        .command("REQUEST_RSTUDIO", json!({"userId": "ana"}))
        .await;
    assert_eq!(status, 200, "{body}");
    let link = body["url"].as_str().unwrap();
    assert!(
        link.starts_with(&format!("https://127.0.0.1:{}/", server.proxy.port())),
        "{link}"
    );
    let r = client(&ca, &server, "localhost", false)
        .get(link)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 302);
    let cookie = r.headers()["set-cookie"].to_str().unwrap();
    assert!(cookie.contains("; Secure"), "{cookie}");
    assert!(cookie.contains("HttpOnly"), "{cookie}");
}
