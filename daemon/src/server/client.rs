//! A small client of a running `instinferd`, used by `instinfer generate --server`.

use instinfer_proto::v1 as pb;
use instinfer_proto::v1::inference_client::InferenceClient;
use std::path::PathBuf;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// Errors talking to a server.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid server address {addr:?}: {message}")]
    Address { addr: String, message: String },
    #[error("reading the CA certificate {path}: {source}")]
    Ca {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot connect to {addr}: {message}")]
    Connect { addr: String, message: String },
    #[error("the server answered {code:?}: {message}")]
    Status { code: tonic::Code, message: String },
    #[error("the bearer token cannot be sent in a header (visible ASCII only)")]
    Token,
    #[error("the stream ended without its finish message")]
    Truncated,
    #[error("starting the async runtime: {0}")]
    Runtime(std::io::Error),
}

impl From<tonic::Status> for ClientError {
    fn from(s: tonic::Status) -> Self {
        ClientError::Status {
            code: s.code(),
            message: s.message().to_string(),
        }
    }
}

/// Where the server is and how to talk to it.
#[derive(Clone, Debug, Default)]
pub struct Target {
    /// `host:port`, `http://host:port` or `https://host:port`.
    pub addr: String,
    /// Sent as `authorization: Bearer <token>`.
    pub bearer_token: Option<String>,
    /// CA certificate (PEM) that signed the server's certificate; implies TLS.
    pub ca_cert_path: Option<PathBuf>,
    /// Keep retrying a refused connection this long (a server that is still starting).
    pub connect_wait: std::time::Duration,
}

impl Target {
    fn uri(&self) -> String {
        if self.addr.contains("://") {
            self.addr.clone()
        } else if self.ca_cert_path.is_some() {
            format!("https://{}", self.addr)
        } else {
            format!("http://{}", self.addr)
        }
    }

    /// Open a channel to the server.
    pub async fn connect(&self) -> Result<InferenceClient<Channel>, ClientError> {
        let uri = self.uri();
        let bad = |message: String| ClientError::Address {
            addr: self.addr.clone(),
            message,
        };
        let mut ep = Endpoint::from_shared(uri.clone()).map_err(|e| bad(e.to_string()))?;
        if uri.starts_with("https://") {
            let Some(path) = &self.ca_cert_path else {
                return Err(bad(
                    "an https server needs the CA certificate that signed its certificate (--server-ca)"
                        .into(),
                ));
            };
            let pem = std::fs::read(path).map_err(|source| ClientError::Ca {
                path: path.clone(),
                source,
            })?;
            ep = ep
                .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)))
                .map_err(|e| bad(e.to_string()))?;
        }
        let deadline = std::time::Instant::now() + self.connect_wait;
        loop {
            match ep.connect().await {
                Ok(channel) => return Ok(InferenceClient::new(channel)),
                Err(e) if std::time::Instant::now() >= deadline => {
                    return Err(ClientError::Connect {
                        addr: self.addr.clone(),
                        message: error_chain(&e),
                    })
                }
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(200)).await,
            }
        }
    }

    /// `msg` as a request carrying the bearer token.
    pub fn request<T>(&self, msg: T) -> Result<tonic::Request<T>, ClientError> {
        let mut req = tonic::Request::new(msg);
        if let Some(t) = &self.bearer_token {
            let v = format!("Bearer {t}")
                .parse()
                .map_err(|_| ClientError::Token)?;
            req.metadata_mut().insert("authorization", v);
        }
        Ok(req)
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// A generation streamed from a server.
#[derive(Clone, Debug)]
pub struct RemoteOutput {
    pub request_id: String,
    pub ids: Vec<u32>,
    /// All text: the tokens' text and the finish message's.
    pub text: String,
    pub finished: pb::Finished,
}

/// Run `req` on the server, calling `on_text` with each piece of text as it arrives.
pub async fn generate(
    target: &Target,
    req: pb::GenerateRequest,
    mut on_text: impl FnMut(&str),
) -> Result<RemoteOutput, ClientError> {
    let mut client = target.connect().await?;
    let mut stream = client.generate(target.request(req)?).await?.into_inner();
    let (mut ids, mut text) = (Vec::new(), String::new());
    while let Some(msg) = stream.message().await? {
        match msg.event {
            Some(pb::generate_response::Event::Token(t)) => {
                ids.push(t.id);
                on_text(&t.text);
                text.push_str(&t.text);
            }
            Some(pb::generate_response::Event::Finished(f)) => {
                on_text(&f.text);
                text.push_str(&f.text);
                return Ok(RemoteOutput {
                    request_id: msg.request_id,
                    ids,
                    text,
                    finished: f,
                });
            }
            None => {}
        }
    }
    Err(ClientError::Truncated)
}

/// [`generate`] on a runtime of its own, for synchronous callers.
pub fn generate_blocking(
    target: &Target,
    req: pb::GenerateRequest,
    on_text: impl FnMut(&str),
) -> Result<RemoteOutput, ClientError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ClientError::Runtime)?
        .block_on(generate(target, req, on_text))
}
