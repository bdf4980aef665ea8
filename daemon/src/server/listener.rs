//! Serving a tower service (an axum router) on a TCP listener, as the HTTP API and the
//! metrics endpoint do: plaintext or TLS, HTTP/1.1 and HTTP/2 with the configured
//! [`ConnectionLimits`] (header read timeout, HTTP/2 stream, reset, header-list and
//! keepalive limits), a cap on open connections, and a bounded graceful close.

use crate::config::ConnectionLimits;
use axum::Router;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

/// How long a TLS handshake may take.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long open connections may take to finish after the stop, before they are cut.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// An HTTP/1 and HTTP/2 connection builder with `limits`: header read timeout, and HTTP/2
/// stream, reset, header-list and keepalive limits.
pub(crate) fn conn_builder(
    limits: &ConnectionLimits,
) -> hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor> {
    use hyper_util::rt::{TokioExecutor, TokioTimer};
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.request_read_timeout());
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.http2_max_concurrent_streams)
        .max_pending_accept_reset_streams(limits.http2_max_pending_reset_streams)
        .max_local_error_reset_streams(limits.http2_max_local_error_reset_streams)
        .max_header_list_size(limits.http2_max_header_list_bytes)
        .keep_alive_interval(limits.keepalive_interval())
        .keep_alive_timeout(limits.keepalive_timeout());
    builder
}

/// Serve `router` on `listener` until `stop` fires, then give open connections
/// [`CLOSE_TIMEOUT`] to finish their requests (a stream ends when the scheduler has drained
/// it) and cut the rest. At most `limits.max_http_connections` are open at once.
pub(crate) async fn serve(
    what: &'static str,
    listener: tokio::net::TcpListener,
    router: Router,
    tls: Option<tokio_rustls::TlsAcceptor>,
    limits: ConnectionLimits,
    mut stop: oneshot::Receiver<()>,
) {
    use hyper_util::server::graceful::GracefulShutdown;

    let graceful = GracefulShutdown::new();
    let builder = Arc::new(conn_builder(&limits));
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_http_connections));
    let mut conns = tokio::task::JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        let accepted = tokio::select! {
            a = accept(what, &listener, &slots) => a,
            _ = &mut stop => break,
        };
        let Some((tcp, peer, slot)) = accepted else {
            continue;
        };
        let conn = Connection {
            what,
            builder: builder.clone(),
            watcher: graceful.watcher(),
            service: router.clone(),
            peer,
        };
        let tls = tls.clone();
        conns.spawn(async move {
            conn.run(tcp, tls).await;
            drop(slot);
        });
    }
    drop(listener);
    if tokio::time::timeout(CLOSE_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            listener = what,
            open = conns.len(),
            "connections still open {} s after the drain; closing them",
            CLOSE_TIMEOUT.as_secs()
        );
    }
    conns.shutdown().await;
}

/// The next connection and its slot, or `None` after a failed accept (logged, and
/// retried after a pause, as when the process is out of file descriptors).
async fn accept(
    what: &'static str,
    listener: &tokio::net::TcpListener,
    slots: &Arc<tokio::sync::Semaphore>,
) -> Option<(
    tokio::net::TcpStream,
    std::net::SocketAddr,
    tokio::sync::OwnedSemaphorePermit,
)> {
    let slot = slots.clone().acquire_owned().await.ok()?;
    match listener.accept().await {
        Ok((tcp, peer)) => {
            // Tokens are small writes: send each at once.
            let _ = tcp.set_nodelay(true);
            Some((tcp, peer, slot))
        }
        Err(e) => {
            tracing::warn!(listener = what, error = %e, "accept failed");
            tokio::time::sleep(Duration::from_millis(100)).await;
            None
        }
    }
}

/// One accepted connection, served until it closes or the server stops.
struct Connection {
    what: &'static str,
    builder: Arc<hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor>>,
    watcher: hyper_util::server::graceful::Watcher,
    service: Router,
    peer: std::net::SocketAddr,
}

impl Connection {
    async fn run(self, tcp: tokio::net::TcpStream, tls: Option<tokio_rustls::TlsAcceptor>) {
        let (peer, what) = (self.peer, self.what);
        let result = match tls {
            None => self.serve(tcp).await,
            Some(acceptor) => {
                match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => self.serve(stream).await,
                    Ok(Err(e)) => {
                        tracing::debug!(listener = what, %peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(listener = what, %peer, "TLS handshake timed out");
                        return;
                    }
                }
            }
        };
        if let Err(e) = result {
            tracing::debug!(listener = what, %peer, error = %e, "connection ended with an error");
        }
    }

    async fn serve<IO>(self, io: IO) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        use hyper_util::rt::TokioIo;
        use hyper_util::service::TowerToHyperService;
        let service = TowerToHyperService::new(self.service);
        let conn = self
            .builder
            .serve_connection_with_upgrades(TokioIo::new(io), service);
        self.watcher.watch(conn.into_owned()).await
    }
}
