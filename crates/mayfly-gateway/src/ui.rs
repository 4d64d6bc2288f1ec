//! The web UI: a small front end checked into the repo (`ui/`, compiled into the binary,
//! nothing fetched at build or run time) that uses the same `/v1` API as every client, and
//! the browser sessions it logs in with.
//!
//! A session is a gateway-issued cookie (`HttpOnly`, `SameSite=Strict`) that names the API
//! token it was opened with by the token's hash, an expiry, and an HMAC under a key this
//! gateway draws at start. Every request re-checks the token as API requests do (through the
//! token cache: a token the store no longer knows ends its sessions within the cache's
//! time); the token itself never reaches the cookie or the page's scripts.
//! Writes made with a session must carry `x-mayfly-ui: 1`, which a cross-site form cannot
//! send, so a session cannot be ridden by another site (CSRF).

use crate::{ApiResult, Auditor, Gateway, Problem, token_hash};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use mayfly_store::AuditRecord;
use serde::Deserialize;
use serde_json::json;
use sha2::Sha256;
use std::sync::Arc;

/// Name of the session cookie.
pub const COOKIE: &str = "mayfly_session";
/// Header a session-authenticated write must carry.
pub const UI_HEADER: &str = "x-mayfly-ui";
/// How long a session lasts.
pub const SESSION_TTL_MS: u64 = 12 * 3600 * 1000;

const INDEX: &str = include_str!("../ui/index.html");
const APP_JS: &str = include_str!("../ui/app.js");
const APP_CSS: &str = include_str!("../ui/app.css");
/// The UI runs only its own files: no inline script, no third-party origin, no framing.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

/// Signs and checks session cookies. The key lives only in this process: a restart (or
/// another gateway node) asks browsers to log in again.
#[derive(Clone)]
pub struct Sessions {
    key: Arc<[u8]>,
}

impl Sessions {
    /// A fresh random key.
    pub fn random() -> Sessions {
        Sessions {
            key: mayfly_trust::keychain::random_token("").into_bytes().into(),
        }
    }

    fn mac(&self, body: &str) -> Hmac<Sha256> {
        // HMAC takes keys of any length; this cannot fail.
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&self.key)
            .unwrap_or_else(|_| unreachable!("HMAC accepts every key length"));
        m.update(body.as_bytes());
        m
    }

    /// The cookie value of a session for the token hashed as `hash`, ending at `exp_ms`.
    pub fn issue(&self, hash: &str, exp_ms: u64) -> String {
        let body = format!("{hash}.{exp_ms}");
        let tag = URL_SAFE_NO_PAD.encode(self.mac(&body).finalize().into_bytes());
        format!("{body}.{tag}")
    }

    /// The token hash of a valid, unexpired session cookie value.
    pub fn check(&self, value: &str, now_ms: u64) -> Option<String> {
        let (body, tag) = value.rsplit_once('.')?;
        let tag = URL_SAFE_NO_PAD.decode(tag).ok()?;
        self.mac(body).verify_slice(&tag).ok()?;
        let (hash, exp) = body.rsplit_once('.')?;
        (exp.parse::<u64>().ok()? > now_ms).then(|| hash.to_owned())
    }
}

/// The session cookie's value in a request, if any.
pub(crate) fn session_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_owned())
}

fn asset(kind: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "no-cache"),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        body,
    )
        .into_response()
}

pub(crate) async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX)
}

pub(crate) async fn app_js() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}

pub(crate) async fn app_css() -> Response {
    asset("text/css; charset=utf-8", APP_CSS)
}

pub(crate) async fn root() -> Redirect {
    Redirect::to("/ui/")
}

#[derive(Deserialize)]
pub(crate) struct Login {
    token: String,
}

/// Behind a TLS-terminating proxy (`x-forwarded-proto: https`) the cookie is `Secure`.
fn cookie(value: &str, max_age_s: u64, headers: &HeaderMap) -> HeaderValue {
    let secure = headers
        .get("x-forwarded-proto")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"https"));
    let secure = if secure { "; Secure" } else { "" };
    // The value is base64url and hex: always a valid header.
    HeaderValue::from_str(&format!(
        "{COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age_s}{secure}"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static("mayfly_session=; Path=/; Max-Age=0"))
}

/// `POST /ui/session` `{"token": …}` with `x-mayfly-ui: 1`: open a session for an API token
/// (401 for an unknown one, audited like any refused credential). The header keeps another
/// site from logging a browser in to the attacker's tenant (login CSRF).
pub(crate) async fn login(
    State(gw): State<Gateway>,
    axum::Extension(sessions): axum::Extension<Sessions>,
    axum::Extension(audit): axum::Extension<Auditor>,
    headers: HeaderMap,
    body: String,
) -> ApiResult<Response> {
    if headers.get(UI_HEADER).is_none() {
        return Err(Problem::new(
            StatusCode::FORBIDDEN,
            "csrf",
            format!("logging in needs `{UI_HEADER}: 1`"),
        ));
    }
    let req: Login = serde_json::from_str(&body).map_err(|e| {
        Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("body: {e}"),
        )
    })?;
    let hash = token_hash(req.token.trim());
    let grant = match crate::verify_token(&gw, &hash).await {
        Ok(g) => Some(g),
        Err(p) if p.code == "unauthenticated" => None,
        Err(p) => return Err(p),
    };
    let Some(grant) = grant else {
        audit.record(AuditRecord {
            id: 0,
            at_ms: mayfly_types::now_ms(),
            tenant: None,
            actor: None,
            action: "POST /ui/session".into(),
            outcome: "unauthenticated".into(),
            detail: "unknown token".into(),
            request_id: crate::request_id(&headers),
        });
        return Err(Problem::new(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "unknown token",
        ));
    };
    let exp = mayfly_types::now_ms() + SESSION_TTL_MS;
    let mut r = axum::Json(json!({"tenant": grant.tenant, "role": grant.role, "name": grant.name}))
        .into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        cookie(&sessions.issue(&hash, exp), SESSION_TTL_MS / 1000, &headers),
    );
    Ok(r)
}

/// `DELETE /ui/session`: forget the session cookie.
pub(crate) async fn logout(headers: HeaderMap) -> Response {
    let mut r = StatusCode::NO_CONTENT.into_response();
    r.headers_mut()
        .insert(header::SET_COOKIE, cookie("", 0, &headers));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_round_trips_and_rejects_tampering_and_expiry() {
        let s = Sessions::random();
        let v = s.issue("sha256:abc", 2_000);
        assert_eq!(s.check(&v, 1_000).as_deref(), Some("sha256:abc"));
        assert_eq!(s.check(&v, 2_000), None, "expired");
        // Another hash or a later expiry under the same tag is refused.
        let (_, tag) = v.rsplit_once('.').expect("tag");
        assert_eq!(s.check(&format!("sha256:abd.2000.{tag}"), 1_000), None);
        assert_eq!(s.check(&format!("sha256:abc.9000.{tag}"), 1_000), None);
        // Another gateway's key does not verify it.
        assert_eq!(Sessions::random().check(&v, 1_000), None);
        assert_eq!(s.check("garbage", 1_000), None);
        assert_eq!(s.check("a.b.c", 1_000), None);
    }

    #[test]
    fn the_cookie_is_found_among_others() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; mayfly_session=x.y.z; b=2"),
        );
        assert_eq!(session_cookie(&h).as_deref(), Some("x.y.z"));
        assert_eq!(session_cookie(&HeaderMap::new()), None);
    }
}
