//! A TCP proxy in front of a real server (Postgres or Redis) that can cut the network:
//! `set_down(true)` closes every proxied connection and stops listening (new connections
//! are refused), as a stopped server looks to clients; `set_latency` delays every answer, as a slow server.
//! The servers behind it are real; only the network between is made faulty.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
};

/// A running proxy.
pub struct FaultProxy {
    /// Port clients connect to.
    pub port: u16,
    upstream: String,
    latency_us: Arc<AtomicU64>,
    cut: watch::Sender<u64>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl FaultProxy {
    /// Proxies `127.0.0.1:port` → `upstream`.
    pub async fn start(upstream: String) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = FaultProxy {
            port: listener.local_addr().unwrap().port(),
            upstream,
            latency_us: Arc::new(AtomicU64::new(0)),
            cut: watch::channel(0u64).0,
            task: Mutex::new(None),
        };
        proxy.listen(listener);
        proxy
    }

    fn listen(&self, listener: TcpListener) {
        let (upstream, latency, cut) = (
            self.upstream.clone(),
            self.latency_us.clone(),
            self.cut.clone(),
        );
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (upstream, latency, cut) = (upstream.clone(), latency.clone(), cut.subscribe());
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(&upstream).await {
                        pipe(client, server, latency, cut).await;
                    }
                });
            }
        });
        *self.task.lock().unwrap() = Some(task);
    }

    /// Cuts every connection and stops listening (true), or listens again (false).
    pub fn set_down(&self, down: bool) {
        if down {
            if let Some(task) = self.task.lock().unwrap().take() {
                task.abort();
            }
            self.cut.send_modify(|g| *g += 1);
        } else if self.task.lock().unwrap().is_none() {
            let std = std::net::TcpListener::bind(("127.0.0.1", self.port)).unwrap();
            std.set_nonblocking(true).unwrap();
            self.listen(TcpListener::from_std(std).unwrap());
        }
    }

    /// Delays every chunk the server sends by `latency`.
    pub fn set_latency(&self, latency: Duration) {
        self.latency_us
            .store(latency.as_micros() as u64, Ordering::SeqCst);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(task) = self.task.lock().unwrap().take() {
            task.abort();
        }
        self.cut.send_modify(|g| *g += 1);
    }
}

async fn pipe(
    client: TcpStream,
    server: TcpStream,
    latency: Arc<AtomicU64>,
    mut cut: watch::Receiver<u64>,
) {
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let up = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match cr.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if sw.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            }
        }
    };
    let down = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match sr.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let delay = latency.load(Ordering::SeqCst);
                    if delay > 0 {
                        tokio::time::sleep(Duration::from_micros(delay)).await;
                    }
                    if cw.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            }
        }
    };
    tokio::select! {
        _ = up => {}
        _ = down => {}
        _ = cut.changed() => {}
    }
}
