//! In-process simulators of the OpenAI Admin API, Vault KV v2 and the Kubernetes API.
//!
//! Used by `demo`, the `sandbox` command, the integration tests and the benchmarks. Each
//! simulator keeps its state in memory and serves real HTTP on 127.0.0.1, so the daemon's
//! real clients (and clients nobody here wrote: kubectl, vaultrs, Prism) talk to it.

pub mod consumers;
mod control;

pub use control::{Block, Blocked};
pub mod kube;
pub mod openai;
pub mod scenario;
pub mod vault;

use std::net::SocketAddr;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A simulator's HTTP server. Dropping it (or calling [`Server::shutdown`]) stops serving.
pub struct Server {
    addr: SocketAddr,
    cancel: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl Server {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, no trailing slash.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stop accepting and drop open connections (long watches included).
    pub async fn shutdown(mut self) {
        self.cancel.cancel();
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.cancel.cancel();
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Bind `bind` (port 0 = random) and serve `router` until `cancel` fires or the returned
/// [`Server`] is dropped.
pub async fn serve(
    router: axum::Router,
    bind: SocketAddr,
    cancel: CancellationToken,
) -> std::io::Result<Server> {
    let listener = TcpListener::bind(bind).await?;
    let addr = listener.local_addr()?;
    let stop = cancel.clone();
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, router)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
    });
    Ok(Server {
        addr,
        cancel,
        task: Some(task),
    })
}

/// `127.0.0.1:port` (port 0 picks a free one).
pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}
