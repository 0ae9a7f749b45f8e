//! A network partition for one cluster member: the member runs in a network namespace of
//! its own (`ip netns`), whose only way out is a forwarder in the test process. The
//! forwarder opens its sockets inside the namespace with `setns`, so every byte the member
//! sends or receives passes through it, and it can cut the member's links to the other
//! members while its links to Kafka, Cassandra, its metrics and the test's own client
//! stay up.

use std::os::fd::AsFd;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A network namespace with its loopback up, deleted when dropped.
pub struct Netns {
    pub name: String,
    file: std::fs::File,
}

impl Netns {
    /// Creates namespace `name` (replacing a leftover of that name). `Err` says why it
    /// cannot be made here (not root, no `ip`).
    pub fn create(name: &str) -> Result<Netns, String> {
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        let run = |args: &[&str]| -> Result<(), String> {
            let out = Command::new("ip")
                .args(args)
                .output()
                .map_err(|e| format!("ip {args:?}: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "ip {args:?}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ))
            }
        };
        run(&["netns", "add", name])?;
        run(&["netns", "exec", name, "ip", "link", "set", "lo", "up"])?;
        let file = std::fs::File::open(format!("/var/run/netns/{name}"))
            .map_err(|e| format!("opening namespace {name}: {e}"))?;
        Ok(Netns {
            name: name.to_string(),
            file,
        })
    }

    /// Runs `f` on a thread inside the namespace (sockets it makes stay there).
    fn inside<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let fd = self.file.try_clone().expect("namespace fd");
        std::thread::spawn(move || {
            rustix::thread::move_into_link_name_space(
                fd.as_fd(),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )
            .expect("setns");
            f()
        })
        .join()
        .expect("namespace thread")
    }

    /// A script that runs `binary` inside the namespace with the arguments it is given
    /// (for `TIMERDB_BIN`).
    pub fn wrapper(&self, dir: &std::path::Path, binary: &str) -> String {
        let path = dir.join(format!("in-{}.sh", self.name));
        std::fs::write(
            &path,
            format!(
                "#!/bin/sh\nexec ip netns exec {} {binary} \"$@\"\n",
                self.name
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path.display().to_string()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Which way a forwarded port goes.
#[derive(Clone, Copy)]
pub enum Way {
    /// Listens inside the namespace, connects out on the host (the member calling out).
    Out,
    /// Listens on the host, connects inside the namespace (calls to the member).
    In,
}

/// Forwards loopback ports between the host and a namespace; the ones marked cuttable
/// drop every connection, open and new, while cut.
pub struct Bridge {
    ns: Arc<Netns>,
    cut: Arc<AtomicBool>,
    cuttable_links: Arc<Mutex<Vec<JoinHandle<()>>>>,
    listeners: Vec<JoinHandle<()>>,
}

impl Bridge {
    pub fn new(ns: Netns) -> Bridge {
        Bridge {
            ns: Arc::new(ns),
            cut: Arc::new(AtomicBool::new(false)),
            cuttable_links: Arc::new(Mutex::new(Vec::new())),
            listeners: Vec::new(),
        }
    }

    /// Forwards `listen_port` (on the side `way` listens on) to `to_port` on the other
    /// side, both on 127.0.0.1.
    pub async fn forward(&mut self, way: Way, listen_port: u16, to_port: u16, cuttable: bool) {
        let listener = match way {
            Way::In => TcpListener::bind(("127.0.0.1", listen_port))
                .await
                .unwrap_or_else(|e| panic!("bridge: host port {listen_port}: {e}")),
            Way::Out => {
                let std_listener = self.ns.inside(move || {
                    let l = std::net::TcpListener::bind(("127.0.0.1", listen_port));
                    l.and_then(|l| l.set_nonblocking(true).map(|()| l))
                });
                TcpListener::from_std(
                    std_listener
                        .unwrap_or_else(|e| panic!("bridge: namespace port {listen_port}: {e}")),
                )
                .unwrap()
            }
        };
        let ns = self.ns.clone();
        let cut = self.cut.clone();
        let links = self.cuttable_links.clone();
        self.listeners.push(tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    continue;
                };
                if cuttable && cut.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let ns = ns.clone();
                let link = tokio::spawn(async move {
                    let outbound = match way {
                        Way::Out => TcpStream::connect(("127.0.0.1", to_port)).await,
                        Way::In => {
                            let s = tokio::task::spawn_blocking(move || {
                                ns.inside(move || {
                                    let s = std::net::TcpStream::connect(("127.0.0.1", to_port));
                                    s.and_then(|s| s.set_nonblocking(true).map(|()| s))
                                })
                            })
                            .await
                            .expect("connect thread");
                            s.and_then(TcpStream::from_std)
                        }
                    };
                    let (Ok(mut outbound), mut inbound) = (outbound, inbound) else {
                        return;
                    };
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                });
                if cuttable {
                    let mut l = links.lock().unwrap();
                    l.retain(|h| !h.is_finished());
                    l.push(link);
                }
            }
        }));
    }

    /// Cuts the cuttable links: open connections are dropped, new ones refused.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for link in self.cuttable_links.lock().unwrap().drain(..) {
            link.abort();
        }
    }

    /// Lets the cuttable links through again.
    pub fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        for l in &self.listeners {
            l.abort();
        }
        self.cut();
    }
}
