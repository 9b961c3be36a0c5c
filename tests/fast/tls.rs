//! `--tls-cert-file` / `--tls-key-file` against the real binary: HTTPS with a token,
//! plain HTTP refused on the TLS port, and a renewed certificate used without a restart.
//! Certificates are made by rcgen; the client is rustls with that certificate as its
//! only trust anchor, so a handshake that succeeds proves which certificate was served.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use crate::support::agent::{BIN, free_addr};
use crate::support::wait_for;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};

const TOKEN: &str = "tls-test-token";

struct Cert {
    der: CertificateDer<'static>,
    cert_pem: String,
    key_pem: String,
}

fn new_cert() -> Cert {
    let c =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    Cert {
        der: c.cert.der().clone(),
        cert_pem: c.cert.pem(),
        key_pem: c.signing_key.serialize_pem(),
    }
}

/// Replaces both files at once, as kubelet does for a Secret volume (rename over).
fn install(cert: &Cert, dir: &Path) {
    for (name, text) in [("tls.crt", &cert.cert_pem), ("tls.key", &cert.key_pem)] {
        let tmp = dir.join(format!("{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, dir.join(name)).unwrap();
    }
}

struct TlsAgent {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
    data: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for TlsAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        crate::support::agent::kill_leftover_shims(&self.data);
    }
}

impl TlsAgent {
    fn start(certs: &Path, trusted: &Cert) -> TlsAgent {
        let dir = tempfile::tempdir().unwrap();
        let tokens = dir.path().join("tokens");
        std::fs::write(&tokens, format!("{TOKEN}\n")).unwrap();
        let addr = free_addr();
        let log = dir.path().join("agent.log");
        let data = dir.path().join("data");
        let child = Command::new(BIN)
            .arg("--data-dir")
            .arg(&data)
            .args(["--listen-addr", &addr.to_string(), "--auth-mode=token"])
            .arg("--auth-token-file")
            .arg(&tokens)
            .arg("--tls-cert-file")
            .arg(certs.join("tls.crt"))
            .arg("--tls-key-file")
            .arg(certs.join("tls.key"))
            .env("LOG_LEVEL", "debug")
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::options().append(true).open(&log).unwrap())
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let mut agent = TlsAgent {
            child,
            addr,
            log,
            data,
            _dir: dir,
        };
        wait_for(Duration::from_secs(20), "agent /health over TLS", || {
            if let Ok(Some(st)) = agent.child.try_wait() {
                panic!("agent exited with {st}: {}", agent.log_text());
            }
            https(addr, trusted, "GET", "/health", None)
                .ok()
                .filter(|r| r.0 == 200)
        });
        agent
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// One HTTPS request trusting only `trusted`; (status, body as JSON or text).
fn https(
    addr: SocketAddr,
    trusted: &Cert,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<(u16, Value), String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(trusted.der.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(config), name).map_err(|e| e.to_string())?;
    let sock =
        TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut tls = rustls::StreamOwned::new(conn, sock);
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    tls.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    match tls.read_to_end(&mut buf) {
        Ok(_) => {}
        // The answer is complete when the server closes after it.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !buf.is_empty() => {}
        Err(e) => return Err(e.to_string()),
    }
    parse(&buf)
}

fn parse(buf: &[u8]) -> Result<(u16, Value), String> {
    let text = String::from_utf8_lossy(buf);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no header end: {text:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line: {head:?}"))?;
    let value = serde_json::from_str(body).unwrap_or_else(|_| Value::String(body.to_string()));
    Ok((status, value))
}

/// A plain-text request to the TLS port; the raw answer.
fn plain(addr: SocketAddr, request: &str) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    buf
}

#[test]
fn https_with_a_token_and_plain_http_refused() {
    let certs = tempfile::tempdir().unwrap();
    let cert = new_cert();
    install(&cert, certs.path());
    let agent = TlsAgent::start(certs.path(), &cert);
    let a = agent.addr;

    let task = json!({"name": "over-tls", "spec": {"process": {"command": ["true"]}}}).to_string();
    let (status, body) = https(a, &cert, "POST", "/tasks", Some(&task)).unwrap();
    assert_eq!(status, 201, "{body}");
    let (status, body) = https(a, &cert, "GET", "/tasks/over-tls?wait=20s", None).unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body["status"]["state"]["terminated"].is_object(), "{body}");

    // Plain HTTP on the TLS port: a clear 400, and the request is not served.
    let req = format!(
        "POST /tasks HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: {}\r\n\r\n{}",
        task.len(),
        task.replace("over-tls", "in-clear-text")
    );
    let (status, body) = parse(&plain(a, &req)).unwrap();
    assert_eq!(status, 400);
    assert_eq!(body["code"], "Bad Request");
    assert!(
        body["message"].as_str().unwrap().contains("https://"),
        "{body}"
    );
    assert!(
        !agent.data.join("in-clear-text").exists(),
        "a plain-HTTP request was served"
    );
    // That answer is logged like any other (without the token the request carried).
    assert!(
        crate::support::access_lines(&agent.log_text())
            .iter()
            .any(|l| crate::support::access_line_of(l, "unknown", "unmatched", 400)),
        "{}",
        agent.log_text()
    );
    // A client that trusts another certificate fails the handshake.
    let other = new_cert();
    let err = https(a, &other, "GET", "/health", None).unwrap_err();
    assert!(
        err.contains("certificate") || err.contains("Certificate"),
        "{err}"
    );
    assert!(
        !agent.log_text().contains(TOKEN),
        "the token reached the log"
    );
}

#[test]
fn a_renewed_certificate_is_used_without_a_restart() {
    let certs = tempfile::tempdir().unwrap();
    let first = new_cert();
    install(&first, certs.path());
    let agent = TlsAgent::start(certs.path(), &first);
    let pid = agent.child.id();
    let renewed = new_cert();
    assert!(https(agent.addr, &renewed, "GET", "/health", None).is_err());

    install(&renewed, certs.path());
    let (status, _) = https(agent.addr, &renewed, "GET", "/health", None).unwrap();
    assert_eq!(status, 200);
    assert!(
        https(agent.addr, &first, "GET", "/health", None).is_err(),
        "the old certificate is still served"
    );

    // A broken renewal (a key that is not the certificate's) keeps the last good pair.
    std::fs::write(certs.path().join("tls.key"), new_cert().key_pem).unwrap();
    let (status, _) = https(agent.addr, &renewed, "GET", "/health", None).unwrap();
    assert_eq!(status, 200);
    assert_eq!(agent.child.id(), pid);
    let log = agent.log_text();
    assert!(log.contains("TLS certificate changed; reloaded"), "{log}");
    assert!(log.contains("keeping the previous certificate"), "{log}");
}

#[test]
fn bad_tls_files_keep_the_agent_from_starting() {
    let certs = tempfile::tempdir().unwrap();
    let a = new_cert();
    let b = new_cert();
    let dir = certs.path();
    std::fs::write(dir.join("a.crt"), &a.cert_pem).unwrap();
    std::fs::write(dir.join("b.key"), &b.key_pem).unwrap();
    std::fs::write(dir.join("empty"), "").unwrap();
    let p = |n: &str| dir.join(n).to_str().unwrap().to_string();
    for (cert, key, why) in [
        (p("a.crt"), p("b.key"), "key"),
        (p("missing.crt"), p("b.key"), "missing.crt"),
        (p("empty"), p("b.key"), "no PEM certificate"),
        (p("a.crt"), p("empty"), "no PEM private key"),
    ] {
        let data = tempfile::tempdir().unwrap();
        let out = Command::new(BIN)
            .arg("--data-dir")
            .arg(data.path())
            .args(["--listen-addr", &free_addr().to_string()])
            .args(["--tls-cert-file", &cert, "--tls-key-file", &key])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{cert} + {key} started");
        assert!(
            text.contains(why),
            "{cert} + {key}: expected {why:?} in {text}"
        );
    }
}
