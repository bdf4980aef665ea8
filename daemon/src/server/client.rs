//! A small client of a running `instinferd`, used by `instinfer generate --server`.

use instinfer_proto::v1 as pb;
use instinfer_proto::v1::inference_client::InferenceClient;
use std::path::PathBuf;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// Errors talking to a server.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The address is not a valid URI, or TLS cannot be set up for it.
    #[error("invalid server address {addr:?}: {message}")]
    Address {
        /// The address as given.
        addr: String,
        /// What is wrong.
        message: String,
    },
    /// The CA certificate file could not be read.
    #[error("reading the CA certificate {path}: {source}")]
    Ca {
        /// The file.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// The connection failed (after retrying for the target's `connect_wait`).
    #[error("cannot connect to {addr}: {message}")]
    Connect {
        /// The address as given.
        addr: String,
        /// The connection error and its causes.
        message: String,
    },
    /// The server answered with an error status.
    #[error("the server answered {code:?}: {message}")]
    Status {
        /// The gRPC status code.
        code: tonic::Code,
        /// The status message.
        message: String,
    },
    /// The bearer token is not a valid header value.
    #[error("the bearer token cannot be sent in a header (visible ASCII only)")]
    Token,
    /// The response stream ended before its `Finished` message.
    #[error("the stream ended without its finish message")]
    Truncated,
    /// The client's tokio runtime could not be started.
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
    /// The request's id, as the server reported it (assigned by the server when the request
    /// had none).
    pub request_id: String,
    /// The streamed token ids, in order.
    pub ids: Vec<u32>,
    /// All text: the tokens' text and the finish message's.
    pub text: String,
    /// The stream's final message: finish reason, usage and any error.
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
