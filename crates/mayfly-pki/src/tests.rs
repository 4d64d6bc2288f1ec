use super::*;
use axum::routing::get;

fn install() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[test]
fn civil_dates() {
    assert_eq!(civil(0), (1970, 1, 1));
    assert_eq!(civil(19_723), (2024, 1, 1));
    assert_eq!(civil(11_016), (2000, 2, 29));
}

#[test]
fn a_csr_contributes_only_its_public_key() {
    let (ca, _) = Ca::generate("test CA").unwrap();
    // A CSR that asks to be a CA for another name.
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(vec!["evil.example".to_owned()]).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let csr = p.serialize_request(&key).unwrap().pem().unwrap();
    let pem = ca
        .sign_csr(&csr, &["127.0.0.1".into()], Usage::Provider, "provider:p1")
        .unwrap();
    let (_, parsed) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
    let issued = parsed.parse_x509().unwrap();
    assert!(!issued.is_ca(), "a leaf, never a CA");
    let sans = format!("{:?}", issued.subject_alternative_name().unwrap());
    assert!(
        sans.contains("[127, 0, 0, 1]") && !sans.contains("evil"),
        "{sans}"
    );
    assert!(CertificateSigningRequestParams::from_pem("garbage").is_err());
    assert!(matches!(
        ca.sign_csr("garbage", &[], Usage::Provider, "x"),
        Err(PkiError::Csr(_))
    ));
}

#[test]
fn the_ca_persists_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let a = Ca::load_or_create(dir.path()).unwrap();
    let b = Ca::load_or_create(dir.path()).unwrap();
    assert_eq!(a.cert_pem(), b.cert_pem());
    let mode = std::fs::metadata(dir.path().join("ca.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

struct Setup {
    ca: Ca,
    server: Identity,
    control: Identity,
    url: String,
}

async fn setup(admit: impl FnOnce(&Identity) -> Admit) -> Setup {
    install();
    let (ca, _) = Ca::generate("test CA").unwrap();
    let (csr, key) = new_csr("provider:p1").unwrap();
    let server = Identity {
        cert_pem: ca
            .sign_csr(&csr, &["127.0.0.1".into()], Usage::Provider, "provider:p1")
            .unwrap(),
        key_pem: key,
    };
    let control = ca.issue(&[], Usage::Control, "mayfly-control").unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    let app = axum::Router::new().route(
        "/who",
        get(|axum::Extension(PeerIdentity(fp)): axum::Extension<PeerIdentity>| async move { fp }),
    );
    let tls = server_config(ca.cert_pem(), &server).unwrap();
    tokio::spawn(serve(listener, app, tls, admit(&control)));
    Setup {
        ca,
        server,
        control,
        url,
    }
}

#[tokio::test]
async fn mutual_tls_admits_exactly_the_pinned_peers() {
    let s = setup(|c| Admit::Only([c.fingerprint().unwrap()].into())).await;
    let pin = Some(s.server.fingerprint().unwrap());
    let good = client(s.ca.cert_pem(), &s.control, pin.clone()).unwrap();
    let who = good
        .get(format!("{}/who", s.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        who,
        s.control.fingerprint().unwrap(),
        "the handler sees the peer"
    );

    // No client certificate at all.
    let roots = reqwest::Certificate::from_pem(s.ca.cert_pem().as_bytes()).unwrap();
    let anonymous = reqwest::Client::builder()
        .tls_certs_only([roots])
        .no_proxy()
        .build()
        .unwrap();
    assert!(
        anonymous
            .get(format!("{}/who", s.url))
            .send()
            .await
            .is_err()
    );

    // A certificate from another CA.
    let (other_ca, _) = Ca::generate("other CA").unwrap();
    let stranger = other_ca.issue(&[], Usage::Control, "x").unwrap();
    let c = client(s.ca.cert_pem(), &stranger, pin.clone()).unwrap();
    assert!(c.get(format!("{}/who", s.url)).send().await.is_err());

    // A certificate our CA issued, but to someone else (another provider).
    let other =
        s.ca.issue(&["127.0.0.1".into()], Usage::Provider, "provider:p2")
            .unwrap();
    let c = client(s.ca.cert_pem(), &other, pin.clone()).unwrap();
    assert!(c.get(format!("{}/who", s.url)).send().await.is_err());

    // The right client, but the server is not the enrolled one.
    let c = client(
        s.ca.cert_pem(),
        &s.control,
        Some(other.fingerprint().unwrap()),
    )
    .unwrap();
    assert!(c.get(format!("{}/who", s.url)).send().await.is_err());
}

#[tokio::test]
async fn any_issued_admits_every_certificate_of_the_ca_and_names_it() {
    let s = setup(|_| Admit::AnyIssued).await;
    let p2 = s.ca.issue(&[], Usage::Provider, "provider:p2").unwrap();
    let c = client(s.ca.cert_pem(), &p2, None).unwrap();
    let who = c
        .get(format!("{}/who", s.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(who, p2.fingerprint().unwrap());
    let (other_ca, _) = Ca::generate("other CA").unwrap();
    let stranger = other_ca.issue(&[], Usage::Provider, "x").unwrap();
    let c = client(s.ca.cert_pem(), &stranger, None).unwrap();
    assert!(c.get(format!("{}/who", s.url)).send().await.is_err());
}
