//! The control plane's certificate authority and the mTLS both sides of the provider seam
//! speak (DESIGN §6, seed "trust and tenancy").
//!
//! * The CA key never leaves the control plane. A provider enrolls with a CSR; the CA keeps
//!   only the CSR's public key and writes every other field itself (names, usages, a
//!   one-year validity, never `is_ca`), so a CSR cannot ask for more than a leaf.
//! * Identity is the sha256 fingerprint of the leaf certificate: a ProviderRegistration
//!   records it at enrollment, and each side pins the other's fingerprint on top of the CA
//!   chain check. A certificate from another CA, none at all, or a valid one that is not
//!   the pinned peer is refused at the handshake (or the connection is dropped before any
//!   request is read).

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::RootCertStore;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

/// PKI failures.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate: {0}")]
    Cert(String),
    #[error("csr refused: {0}")]
    Csr(String),
    #[error("tls: {0}")]
    Tls(String),
    #[error("{path}: {error}")]
    Io { path: String, error: std::io::Error },
}

fn cert_err(e: impl std::fmt::Display) -> PkiError {
    PkiError::Cert(e.to_string())
}

/// `sha256:<hex>` of a certificate's DER: the identity a registration pins.
pub fn fingerprint_der(der: &[u8]) -> String {
    mayfly_trust::sha256_digest(der)
}

/// The fingerprint of the first certificate in a PEM bundle.
pub fn fingerprint(cert_pem: &str) -> Result<String, PkiError> {
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(cert_err)?;
    Ok(fingerprint_der(&der))
}

/// What a certificate may be used for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Usage {
    /// A provider: serves the provider API and calls the control plane.
    Provider,
    /// The control plane calling providers.
    Control,
}

fn validity(params: &mut CertificateParams, years: i32) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = (now / 86_400) as i64;
    let (y, m, d) = civil(days);
    // One day of slack for clock skew between the CA and its peers.
    let (py, pm, pd) = civil(days - 1);
    params.not_before = rcgen::date_time_ymd(py, pm, pd);
    params.not_after = rcgen::date_time_ymd(y + years, m, d.min(28));
}

/// Days since the epoch → (year, month, day), proleptic Gregorian (Howard Hinnant's).
fn civil(z: i64) -> (i32, u8, u8) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let y = (yoe + era * 400 + i64::from(m <= 2)) as i32;
    (y, m, d)
}

/// The control plane's certificate authority.
pub struct Ca {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    /// A new CA (ECDSA P-256, ten years).
    pub fn generate(name: &str) -> Result<(Ca, String), PkiError> {
        let key = KeyPair::generate().map_err(cert_err)?;
        let mut p = CertificateParams::new(Vec::<String>::new()).map_err(cert_err)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        p.distinguished_name = dn;
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        validity(&mut p, 10);
        let cert = p.self_signed(&key).map_err(cert_err)?;
        let key_pem = key.serialize_pem();
        let cert_pem = cert.pem();
        let ca = Ca::from_pem(&cert_pem, &key_pem)?;
        Ok((ca, key_pem))
    }

    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Ca, PkiError> {
        let key = KeyPair::from_pem(key_pem).map_err(cert_err)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(cert_err)?;
        Ok(Ca {
            cert_pem: cert_pem.to_owned(),
            issuer,
        })
    }

    /// The CA in `dir` (`ca.crt`, `ca.key` with mode 0600), created on first use.
    pub fn load_or_create(dir: &Path) -> Result<Ca, PkiError> {
        let crt = dir.join("ca.crt");
        let key = dir.join("ca.key");
        let io = |p: &Path| {
            let path = p.display().to_string();
            move |error| PkiError::Io { path, error }
        };
        if crt.exists() && key.exists() {
            let c = std::fs::read_to_string(&crt).map_err(io(&crt))?;
            let k = std::fs::read_to_string(&key).map_err(io(&key))?;
            return Ca::from_pem(&c, &k);
        }
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let (ca, key_pem) = Ca::generate("mayfly control plane CA")?;
        write_private(&key, key_pem.as_bytes())?;
        std::fs::write(&crt, &ca.cert_pem).map_err(io(&crt))?;
        Ok(ca)
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    fn leaf(
        &self,
        names: &[String],
        usage: Usage,
        cn: &str,
    ) -> Result<CertificateParams, PkiError> {
        let mut p = CertificateParams::new(names.to_vec()).map_err(cert_err)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        p.distinguished_name = dn;
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = match usage {
            Usage::Provider => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            Usage::Control => vec![ExtendedKeyUsagePurpose::ClientAuth],
        };
        p.use_authority_key_identifier_extension = true;
        validity(&mut p, 1);
        Ok(p)
    }

    /// Sign a CSR: only its public key is used; names come from `names` (the endpoint host
    /// the registration records), never from the CSR.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        names: &[String],
        usage: Usage,
        cn: &str,
    ) -> Result<String, PkiError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| PkiError::Csr(e.to_string()))?;
        let params = self.leaf(names, usage, cn)?;
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(cert_err)?;
        Ok(cert.pem())
    }

    /// Issue a key and certificate directly (the control plane's own client identity).
    pub fn issue(&self, names: &[String], usage: Usage, cn: &str) -> Result<Identity, PkiError> {
        let key = KeyPair::generate().map_err(cert_err)?;
        let cert = self
            .leaf(names, usage, cn)?
            .signed_by(&key, &self.issuer)
            .map_err(cert_err)?;
        Ok(Identity {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// A new private key and a CSR for it (the key stays with the caller).
pub fn new_csr(cn: &str) -> Result<(String, String), PkiError> {
    let key = KeyPair::generate().map_err(cert_err)?;
    let mut p = CertificateParams::new(Vec::<String>::new()).map_err(cert_err)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    p.distinguished_name = dn;
    let csr = p.serialize_request(&key).map_err(cert_err)?;
    Ok((csr.pem().map_err(cert_err)?, key.serialize_pem()))
}

/// A certificate and its key, PEM.
#[derive(Clone)]
pub struct Identity {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field(
                "fingerprint",
                &fingerprint(&self.cert_pem).unwrap_or_default(),
            )
            .finish_non_exhaustive()
    }
}

impl Identity {
    pub fn fingerprint(&self) -> Result<String, PkiError> {
        fingerprint(&self.cert_pem)
    }

    /// Read `<dir>/<name>.crt` and `<dir>/<name>.key`.
    pub fn load(dir: &Path, name: &str) -> Result<Identity, PkiError> {
        let read = |p: std::path::PathBuf| {
            std::fs::read_to_string(&p).map_err(|error| PkiError::Io {
                path: p.display().to_string(),
                error,
            })
        };
        Ok(Identity {
            cert_pem: read(dir.join(format!("{name}.crt")))?,
            key_pem: read(dir.join(format!("{name}.key")))?,
        })
    }

    /// Write `<dir>/<name>.crt` and `<dir>/<name>.key` (0600).
    pub fn save(&self, dir: &Path, name: &str) -> Result<(), PkiError> {
        std::fs::create_dir_all(dir).map_err(|error| PkiError::Io {
            path: dir.display().to_string(),
            error,
        })?;
        write_private(&dir.join(format!("{name}.key")), self.key_pem.as_bytes())?;
        let crt = dir.join(format!("{name}.crt"));
        std::fs::write(&crt, &self.cert_pem).map_err(|error| PkiError::Io {
            path: crt.display().to_string(),
            error,
        })
    }

    fn chain(&self) -> Result<Vec<CertificateDer<'static>>, PkiError> {
        CertificateDer::pem_slice_iter(self.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(cert_err)
    }

    fn key(&self) -> Result<PrivateKeyDer<'static>, PkiError> {
        PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).map_err(cert_err)
    }
}

/// Write a file readable by its owner only.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), PkiError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |error| PkiError::Io {
        path: path.display().to_string(),
        error,
    };
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    f.write_all(bytes).map_err(io)
}

fn roots(ca_pem: &str) -> Result<Arc<RootCertStore>, PkiError> {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.map_err(cert_err)?).map_err(cert_err)?;
    }
    Ok(Arc::new(roots))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A server config that requires a client certificate chaining to `ca_pem`.
pub fn server_config(ca_pem: &str, id: &Identity) -> Result<Arc<rustls::ServerConfig>, PkiError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(ca_pem)?, provider())
        .build()
        .map_err(|e| PkiError::Tls(e.to_string()))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| PkiError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(id.chain()?, id.key()?)
        .map_err(|e| PkiError::Tls(e.to_string()))?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Checks the server's chain against the CA and, when pinned, its exact certificate.
#[derive(Debug)]
struct Pinned {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    pin: Option<String>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ok =
            self.inner
                .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)?;
        if let Some(pin) = &self.pin
            && &fingerprint_der(end_entity) != pin
        {
            return Err(rustls::Error::General(
                "the server's certificate is not the enrolled one".into(),
            ));
        }
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// An HTTP client that presents `id`, trusts only `ca_pem`, and (with `pin`) accepts only
/// the server certificate with that fingerprint.
pub fn client(
    ca_pem: &str,
    id: &Identity,
    pin: Option<String>,
) -> Result<reqwest::Client, PkiError> {
    let inner =
        rustls::client::WebPkiServerVerifier::builder_with_provider(roots(ca_pem)?, provider())
            .build()
            .map_err(|e| PkiError::Tls(e.to_string()))?;
    let cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| PkiError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Pinned { inner, pin }))
        .with_client_auth_cert(id.chain()?, id.key()?)
        .map_err(|e| PkiError::Tls(e.to_string()))?;
    reqwest::Client::builder()
        .use_preconfigured_tls(cfg)
        .no_proxy()
        .build()
        .map_err(|e| PkiError::Tls(e.to_string()))
}

/// Which client certificates a server admits (beyond chaining to the CA).
#[derive(Clone, Debug)]
pub enum Admit {
    /// Any certificate the CA issued; handlers see the fingerprint and decide.
    AnyIssued,
    /// Only these fingerprints.
    Only(BTreeSet<String>),
}

/// The verified client certificate's fingerprint, as a request extension.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerIdentity(pub String);

/// Serve `app` over mTLS on `listener` until the listener fails. Each connection's client
/// certificate is checked against `admit`; handlers receive [`PeerIdentity`].
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    tls: Arc<rustls::ServerConfig>,
    admit: Admit,
) -> std::io::Result<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let (tcp, peer) = listener.accept().await?;
        let acceptor = acceptor.clone();
        let app = app.clone();
        let admit = admit.clone();
        tokio::spawn(async move {
            let stream = match acceptor.accept(tcp).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "mTLS handshake refused");
                    return;
                }
            };
            let Some(fp) = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| fingerprint_der(c))
            else {
                return;
            };
            if let Admit::Only(set) = &admit
                && !set.contains(&fp)
            {
                tracing::warn!(%peer, fingerprint = %fp, "client certificate not admitted");
                return;
            }
            let app = app.layer(axum::Extension(PeerIdentity(fp)));
            let svc = hyper_util::service::TowerToHyperService::new(app);
            let _ =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
        });
    }
}

#[cfg(test)]
mod tests;
