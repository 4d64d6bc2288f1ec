//! A client of the provider API (the control plane's side, and the conformance suite's).

use mayfly_actor_api::{
    ActorStatus, EPOCH_HEADER, OpRequest, OpStatus, ProviderInfo, Refusal, RefusalCode,
};
use std::time::Duration;

/// Why a call did not produce an answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The provider refused synchronously, with a typed reason.
    #[error("refused: {0}")]
    Refused(Refusal),
    #[error("provider unreachable: {0}")]
    Transport(String),
    #[error("provider answered something unexpected: {0}")]
    Protocol(String),
}

impl ClientError {
    /// The refusal code, if the provider refused.
    pub fn code(&self) -> Option<RefusalCode> {
        match self {
            ClientError::Refused(r) => Some(r.code),
            _ => None,
        }
    }
}

/// A provider endpoint.
#[derive(Clone)]
pub struct ProviderClient {
    base: String,
    http: reqwest::Client,
    /// The enrolled provider's id, when the control plane calls it (its ops get blob grants).
    provider: Option<String>,
}

/// A data-path answer.
#[derive(Debug)]
pub struct DataAnswer {
    pub status: u16,
    pub body: bytes::Bytes,
    pub content_type: Option<String>,
    /// The refusal, when the provider (not the actor) refused.
    pub refusal: Option<Refusal>,
}

impl ProviderClient {
    /// `base` like `https://127.0.0.1:7443`; `http` carries the transport (mTLS identity).
    pub fn new(base: impl Into<String>, http: reqwest::Client) -> Self {
        ProviderClient {
            base: base.into().trim_end_matches('/').to_owned(),
            http,
            provider: None,
        }
    }

    /// This client calls enrolled provider `id`.
    pub fn with_provider(mut self, id: &str) -> Self {
        self.provider = Some(id.to_owned());
        self
    }

    pub fn provider(&self) -> Option<&str> {
        self.provider.as_deref()
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// The transport (shared by clients of the same identity).
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    async fn decode<T: serde::de::DeserializeOwned>(
        resp: reqwest::Response,
    ) -> Result<T, ClientError> {
        let status = resp.status();
        let body = resp
            .bytes()
            .await
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        if status.is_success() {
            return serde_json::from_slice(&body)
                .map_err(|e| ClientError::Protocol(format!("{status}: {e}")));
        }
        Err(refusal_of(status.as_u16(), &body))
    }

    /// Submit an op and wait up to `wait` for its outcome (the answer may still be running).
    pub async fn submit(&self, req: &OpRequest, wait: Duration) -> Result<OpStatus, ClientError> {
        let resp = self
            .http
            .post(format!("{}/v1/ops?wait_ms={}", self.base, wait.as_millis()))
            .json(req)
            .send()
            .await
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        Self::decode(resp).await
    }

    /// The durable status of an op, waiting up to `wait` while it runs.
    pub async fn status(&self, op_id: &str, wait: Duration) -> Result<OpStatus, ClientError> {
        let resp = self
            .http
            .get(format!(
                "{}/v1/ops/{op_id}?wait_ms={}",
                self.base,
                wait.as_millis()
            ))
            .send()
            .await
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        Self::decode(resp).await
    }

    /// Submit and poll until the op is terminal (or `deadline` passes).
    pub async fn run(&self, req: &OpRequest, deadline: Duration) -> Result<OpStatus, ClientError> {
        let end = tokio::time::Instant::now() + deadline;
        let mut st = self.submit(req, deadline).await?;
        while st.state == mayfly_actor_api::OpState::Running {
            let left = end.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Err(ClientError::Protocol(format!(
                    "op {} still running after {deadline:?}",
                    req.op_id
                )));
            }
            st = self.status(&req.op_id, left).await?;
        }
        Ok(st)
    }

    pub async fn info(&self) -> Result<ProviderInfo, ClientError> {
        let resp = self
            .http
            .get(format!("{}/v1/provider", self.base))
            .send()
            .await
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        Self::decode(resp).await
    }

    pub async fn actor(&self, tenant: &str, actor: &str) -> Result<ActorStatus, ClientError> {
        let resp = self
            .http
            .get(self.url(&["v1", "actors", tenant, actor], "", None)?)
            .send()
            .await
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        Self::decode(resp).await
    }

    /// `base` + the segments (each percent-encoded) + `path` (plain segments only: `.`,
    /// `..` and empty ones are refused, so no path climbs out of where it is put).
    fn url(
        &self,
        segs: &[&str],
        path: &str,
        query: Option<&str>,
    ) -> Result<reqwest::Url, ClientError> {
        if !crate::http::clean_data_path(path) {
            return Err(ClientError::Refused(Refusal::invalid(
                "the path has `.`, `..` or empty segments",
            )));
        }
        let mut url =
            reqwest::Url::parse(&self.base).map_err(|e| ClientError::Protocol(e.to_string()))?;
        {
            let mut p = url
                .path_segments_mut()
                .map_err(|_| ClientError::Protocol("base URL cannot take a path".into()))?;
            p.pop_if_empty();
            for s in segs {
                p.push(s);
            }
            let trimmed = path.trim_matches('/');
            if !trimmed.is_empty() {
                for s in trimmed.split('/') {
                    p.push(s);
                }
            }
            if path.len() > 1 && path.ends_with('/') {
                p.push("");
            }
        }
        url.set_query(query.filter(|q| !q.is_empty()));
        Ok(url)
    }

    /// One data-path request to `tenant`'s `actor` at `epoch`.
    pub async fn call(
        &self,
        tenant: &str,
        actor: &str,
        epoch: u64,
        method: reqwest::Method,
        path: &str,
        body: Vec<u8>,
    ) -> Result<DataAnswer, ClientError> {
        self.call_with(tenant, actor, epoch, method, path, None, &[], body)
            .await
    }

    /// The same, with a query string and request headers (already filtered by the caller).
    #[allow(clippy::too_many_arguments)]
    pub async fn call_with(
        &self,
        tenant: &str,
        actor: &str,
        epoch: u64,
        method: reqwest::Method,
        path: &str,
        query: Option<&str>,
        headers: &[(String, String)],
        body: Vec<u8>,
    ) -> Result<DataAnswer, ClientError> {
        let mut rb = self
            .http
            .request(
                method,
                self.url(&["v1", "actors", tenant, actor, "http"], path, query)?,
            )
            .header(EPOCH_HEADER, epoch.to_string());
        for (k, v) in headers {
            rb = rb.header(k, v);
        }
        let resp = rb
            .body(body)
            .send()
            .await
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        let status = resp.status().as_u16();
        let content_type = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let problem = resp
            .headers()
            .get("content-type")
            .is_some_and(|v| v.as_bytes().starts_with(b"application/problem+json"));
        let body = resp
            .bytes()
            .await
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        let refusal = match refusal_of(status, &body) {
            ClientError::Refused(r) if problem => Some(r),
            _ => None,
        };
        Ok(DataAnswer {
            status,
            body,
            content_type,
            refusal,
        })
    }
}

fn refusal_of(status: u16, body: &[u8]) -> ClientError {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let code = v
        .get("code")
        .cloned()
        .and_then(|c| serde_json::from_value::<RefusalCode>(c).ok());
    match code {
        Some(code) => ClientError::Refused(Refusal::new(
            code,
            v.get("detail").and_then(|d| d.as_str()).unwrap_or_default(),
        )),
        None => ClientError::Protocol(format!(
            "{status}: {}",
            String::from_utf8_lossy(&body[..body.len().min(300)])
        )),
    }
}
