//! A TCP proxy the test can cut: every forwarded connection is closed and new ones are refused
//! until it is restored, which is what an unreachable dependency looks like to a client.

use std::sync::Mutex;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

/// Forwards `127.0.0.1:port` to an upstream address.
pub struct TcpProxy {
    port: u16,
    upstream: String,
    accept_task: Mutex<Option<JoinHandle<()>>>,
}

impl TcpProxy {
    /// Starts forwarding a fresh local port to `upstream` (`host:port`).
    pub async fn start(upstream: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let proxy = TcpProxy {
            port,
            upstream: upstream.to_owned(),
            accept_task: Mutex::new(None),
        };
        proxy.serve(listener);
        proxy
    }

    /// The local port clients connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    fn serve(&self, listener: TcpListener) {
        let upstream = self.upstream.clone();
        let task = tokio::spawn(async move {
            // Aborting this task drops the set, which aborts every forwarding task.
            let mut connections = JoinSet::new();
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                let upstream = upstream.clone();
                connections.spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        *self.accept_task.lock().expect("proxy lock") = Some(task);
    }

    /// Closes every forwarded connection and refuses new ones.
    pub async fn cut(&self) {
        let task = self.accept_task.lock().expect("proxy lock").take();
        if let Some(task) = task {
            task.abort();
            let _ = task.await;
        }
        // Give the aborted forwarding tasks a moment to close their sockets.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    /// Accepts and forwards connections again, on the same port.
    pub async fn restore(&self) {
        let listener = loop {
            match TcpListener::bind(("127.0.0.1", self.port)).await {
                Ok(listener) => break listener,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        self.serve(listener);
    }
}
