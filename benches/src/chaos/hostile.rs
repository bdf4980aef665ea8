//! The hostile clients of the chaos phase: slowloris connections on the HTTP API, an
//! HTTP/2 rapid-reset flood on gRPC, and prompts too large to admit. Each runs until the
//! deadline and counts what the server did to it.

use instinfer_proto::v1 as pb;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

/// What the slowloris connections saw.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Slowloris {
    /// Connections opened.
    pub opened: usize,
    /// Connections the server closed before the client finished its headers.
    pub cut_by_server: usize,
    /// The longest a connection was held open by the server, in seconds.
    pub longest_held_s: f64,
}

/// `conns` connections at a time to the HTTP API, each sending a request's headers one byte
/// every `gap`, reopened when the server cuts them, until `deadline`.
pub async fn slowloris(
    http: SocketAddr,
    conns: usize,
    gap: Duration,
    deadline: Instant,
) -> Slowloris {
    let mut tasks = Vec::new();
    for _ in 0..conns {
        tasks.push(tokio::spawn(async move {
            let mut s = Slowloris::default();
            while Instant::now() < deadline {
                let Ok(mut tcp) = tokio::net::TcpStream::connect(http).await else {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                };
                s.opened += 1;
                let opened = Instant::now();
                let head = b"POST /v1/completions HTTP/1.1\r\nHost: chaos\r\nX-Slow: ";
                let mut cut = tcp.write_all(head).await.is_err();
                while !cut && Instant::now() < deadline {
                    tokio::time::sleep(gap).await;
                    cut = tcp.write_all(b"a").await.is_err() || closed(&mut tcp).await;
                }
                if cut {
                    s.cut_by_server += 1;
                    s.longest_held_s = s.longest_held_s.max(opened.elapsed().as_secs_f64());
                }
            }
            s
        }));
    }
    let mut total = Slowloris::default();
    for t in tasks {
        if let Ok(s) = t.await {
            total.opened += s.opened;
            total.cut_by_server += s.cut_by_server;
            total.longest_held_s = total.longest_held_s.max(s.longest_held_s);
        }
    }
    total
}

/// Whether the server has closed `tcp` (a read returns at once with EOF or an error).
async fn closed(tcp: &mut tokio::net::TcpStream) -> bool {
    let mut buf = [0u8; 512];
    match tokio::time::timeout(Duration::from_millis(1), tcp.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        // Data (an error response) or nothing yet.
        Ok(Ok(_)) | Err(_) => false,
    }
}

/// What the reset flood did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ResetFlood {
    /// Generate streams opened and reset at once.
    pub resets_sent: usize,
    /// Connections used (a new one after each GOAWAY or failure).
    pub connections: usize,
    /// Connections the server ended (GOAWAY or closed).
    pub ended_by_server: usize,
}

/// A gRPC message frame: no compression, the length, the encoded message.
fn grpc_frame(msg: &impl prost::Message) -> bytes::Bytes {
    let body = msg.encode_to_vec();
    let mut out = vec![0u8];
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend(body);
    out.into()
}

/// Open Generate streams and reset each at once, over raw HTTP/2 connections, until
/// `deadline` or `max_resets`.
pub async fn reset_flood(grpc: SocketAddr, max_resets: usize, deadline: Instant) -> ResetFlood {
    let body = grpc_frame(&pb::GenerateRequest {
        prompt: Some(pb::generate_request::Prompt::Text(
            "Tell me a story.".into(),
        )),
        max_tokens: Some(64),
        ..Default::default()
    });
    let mut r = ResetFlood::default();
    while r.resets_sent < max_resets && Instant::now() < deadline {
        let Ok(tcp) = tokio::net::TcpStream::connect(grpc).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let Ok((mut send, conn)) = h2::client::handshake(tcp).await else {
            r.ended_by_server += 1;
            continue;
        };
        r.connections += 1;
        let driver = tokio::spawn(conn);
        loop {
            if r.resets_sent >= max_resets || Instant::now() >= deadline {
                break;
            }
            match open_and_reset(&mut send, &body).await {
                Ok(()) => r.resets_sent += 1,
                Err(_) => {
                    r.ended_by_server += 1;
                    break;
                }
            }
            // Spread the flood over the run rather than all at its start.
            if r.resets_sent % 100 == 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        drop(send);
        driver.abort();
    }
    r
}

async fn open_and_reset(
    send: &mut h2::client::SendRequest<bytes::Bytes>,
    body: &bytes::Bytes,
) -> Result<(), h2::Error> {
    let req = http::Request::post("/instinfer.v1.Inference/Generate")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .expect("a valid request");
    *send = send.clone().ready().await?;
    let (_resp, mut stream) = send.send_request(req, false)?;
    stream.send_data(body.clone(), false)?;
    stream.send_reset(h2::Reason::CANCEL);
    Ok(())
}

/// What the oversized prompts got back.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Oversized {
    /// Requests sent.
    pub sent: usize,
    /// Refused with RESOURCE_EXHAUSTED (the prompt is over the token limit), as they must be.
    pub refused_right: usize,
    /// Refused with UNAVAILABLE while the daemon was down (not a verdict on the prompt).
    pub daemon_down: usize,
    /// Transport errors of requests in flight when the daemon was killed.
    pub cut_by_kill: usize,
    /// Any other answer (the first few are kept).
    pub other: Vec<String>,
    /// Answers other than the two above, with when they came (sorted by [`Oversized::settle`]).
    #[serde(skip)]
    unsorted: Vec<(Instant, String)>,
}

impl Oversized {
    /// Sort the other answers: those between `kill` and a second after `back` were cut by
    /// the kill; the rest are kept as examples of wrong answers (all are counted).
    pub fn settle(&mut self, kill: Instant, back: Instant) {
        for (at, what) in std::mem::take(&mut self.unsorted) {
            if at >= kill && at <= back + Duration::from_secs(1) {
                self.cut_by_kill += 1;
            } else {
                self.other.push(what);
            }
        }
    }
}

/// `clients` clients each sending prompts of `bytes` bytes of text back to back until
/// `deadline`.
pub async fn oversized(
    grpc: SocketAddr,
    clients: usize,
    bytes: usize,
    deadline: Instant,
) -> Oversized {
    let text = "lighthouse ".repeat(bytes / 11);
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let text = text.clone();
        tasks.push(tokio::spawn(async move {
            let mut o = Oversized::default();
            let Ok(mut client) = super::streams::channel(grpc) else {
                return o;
            };
            while Instant::now() < deadline {
                let req = pb::GenerateRequest {
                    prompt: Some(pb::generate_request::Prompt::Text(text.clone())),
                    max_tokens: Some(8),
                    ..Default::default()
                };
                o.sent += 1;
                let answer = match client.generate(req).await {
                    Err(s) => Err(s),
                    Ok(mut r) => r.get_mut().message().await.map(|_| ()),
                };
                match answer {
                    Err(s) if s.code() == Code::ResourceExhausted => {
                        o.refused_right += 1;
                        // A flood, but one that leaves the CPUs to the streams under test.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Err(s) if s.code() == Code::Unavailable => {
                        o.daemon_down += 1;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(s) => o
                        .unsorted
                        .push((Instant::now(), format!("{:?}: {}", s.code(), s.message()))),
                    Ok(()) => o.unsorted.push((Instant::now(), "accepted".into())),
                }
            }
            o
        }));
    }
    let mut total = Oversized::default();
    for t in tasks {
        if let Ok(o) = t.await {
            total.sent += o.sent;
            total.refused_right += o.refused_right;
            total.daemon_down += o.daemon_down;
            total.unsorted.extend(o.unsorted);
        }
    }
    total
}
