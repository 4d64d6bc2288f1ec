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
        }
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

    pub async fn actor(&self, actor: &str) -> Result<ActorStatus, ClientError> {
        let resp = self
            .http
            .get(format!("{}/v1/actors/{actor}", self.base))
            .send()
            .await
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        Self::decode(resp).await
    }

    /// One data-path request to `actor` at `epoch`.
    pub async fn call(
        &self,
        actor: &str,
        epoch: u64,
        method: reqwest::Method,
        path: &str,
        body: Vec<u8>,
    ) -> Result<DataAnswer, ClientError> {
        let resp = self
            .http
            .request(
                method,
                format!(
                    "{}/v1/actors/{actor}/http/{}",
                    self.base,
                    path.trim_start_matches('/')
                ),
            )
            .header(EPOCH_HEADER, epoch.to_string())
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
