//! Restarting the agent without dropping connections: both sides of the handoff
//! conversation defined in [`nodemesh_proxy::handoff`].
//!
//! The new agent ([`Predecessor`], "the agent I take over from") asks right after it has
//! adopted the kernel programs; the old agent ([`Successor`]) stops its registry, admin and
//! accept loop, sends the listening socket, then parks its relays and sends each parked
//! connection with its two sockets. Whatever does not park within `park_timeout` stays with
//! the old agent, which drains it and exits.
use std::{
    net::TcpListener,
    os::fd::{AsRawFd, OwnedFd},
    path::Path,
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, bail};
use nodemesh_http::workers::Workers;
use nodemesh_proxy::{
    Connection, Outbound,
    handoff::{Channel, Message, VERSION},
};
use tokio::net::TcpStream;
use tracing::{info, warn};

/// How long the new agent waits for the old one to answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// The running agent this one takes over from.
#[derive(Debug)]
pub struct Predecessor {
    channel: Channel,
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(f).await.context("handoff task")
}

impl Predecessor {
    /// Asks the agent listening at `path`, if any, to hand over.
    pub async fn connect(path: &Path) -> anyhow::Result<Option<Self>> {
        let path = path.to_owned();
        let Some(channel) = blocking(move || Channel::connect(&path)).await?? else {
            return Ok(None);
        };
        info!("a running agent was found: asking it to hand over");
        let hello = Message::Hello {
            version: VERSION,
            pid: std::process::id(),
        };
        let channel = blocking(move || channel.send(&hello, &[]).map(|()| channel)).await??;
        Ok(Some(Self { channel }))
    }

    /// The proxy's listening socket, once the old agent has stopped accepting. `None` if
    /// it had none left (it was already draining).
    pub async fn take_listener(&mut self) -> anyhow::Result<Option<TcpListener>> {
        let channel = self.channel.try_clone()?;
        let answer = tokio::time::timeout(ANSWER_TIMEOUT, blocking(move || channel.recv()))
            .await
            .context("the running agent did not answer")???;
        match answer {
            Some((Message::Listener { addr }, fds)) => {
                info!(%addr, inherited = !fds.is_empty(), "took over the proxy listener");
                Ok(fds.into_iter().next().map(TcpListener::from))
            }
            Some((Message::Refused { reason }, _)) => {
                bail!("the running agent refused to hand over: {reason}")
            }
            Some((other, _)) => bail!("unexpected handoff message {other:?}"),
            None => bail!("the running agent closed the handoff"),
        }
    }

    /// Receives the parked connections in the background and resumes each on one of
    /// `workers`.
    pub fn receive_connections(self, outbound: Arc<Outbound>, workers: Workers) {
        std::thread::Builder::new()
            .name("nm-handoff".into())
            .spawn(move || {
                let mut taken = 0u64;
                loop {
                    match self.channel.recv() {
                        Ok(Some((Message::Connection { meta }, fds))) => {
                            let Ok([client, upstream]) = <[OwnedFd; 2]>::try_from(fds) else {
                                warn!(?meta, "handoff connection without its two sockets");
                                outbound.handoff_failed();
                                continue;
                            };
                            taken += 1;
                            let outbound = outbound.clone();
                            workers.spawn_counted(async move {
                                let streams = TcpStream::from_std(std::net::TcpStream::from(client))
                                    .and_then(|c| Ok((c, TcpStream::from_std(std::net::TcpStream::from(upstream))?)));
                                match streams {
                                    Ok((client, upstream)) => outbound.resume(Connection { client, upstream, meta }).await,
                                    Err(e) => {
                                        warn!(error = %e, "resuming a handed-over connection failed");
                                        outbound.handoff_failed();
                                    }
                                }
                            });
                        }
                        Ok(Some((Message::Done { handed_off, kept }, _))) => {
                            info!(taken, handed_off, kept_by_previous = kept, "handoff complete");
                            return;
                        }
                        Ok(Some((other, _))) => warn!(?other, "unexpected handoff message"),
                        Ok(None) => {
                            info!(taken, "the previous agent closed the handoff");
                            return;
                        }
                        Err(e) => {
                            warn!(error = %e, taken, "handoff receive failed");
                            return;
                        }
                    }
                }
            })
            .map(drop)
            .unwrap_or_else(|e| warn!(error = %e, "cannot start the handoff receiver"));
    }
}

/// The new agent this one hands over to.
#[derive(Debug)]
pub struct Successor<'a> {
    channel: Channel,
    outbound: &'a Arc<Outbound>,
    park_timeout: Duration,
}

impl<'a> Successor<'a> {
    pub fn new(channel: Channel, outbound: &'a Arc<Outbound>, park_timeout: Duration) -> Self {
        Self {
            channel,
            outbound,
            park_timeout,
        }
    }

    /// Runs the old agent's side; returns when everything that could park was sent.
    pub async fn hand_over(self, listener: Option<TcpListener>) {
        if let Err(e) = self.try_hand_over(listener).await {
            warn!(error = %format!("{e:#}"), "handoff failed; keeping the remaining connections");
            self.outbound.set_pause(false);
        }
    }

    async fn try_hand_over(&self, listener: Option<TcpListener>) -> anyhow::Result<()> {
        let channel = self.channel.try_clone()?;
        let hello = tokio::time::timeout(ANSWER_TIMEOUT, blocking(move || channel.recv()))
            .await
            .context("the new agent said nothing")???;
        match hello {
            Some((Message::Hello { version, pid }, _)) if version == VERSION => {
                info!(successor_pid = pid, "handing over to a new agent");
            }
            Some((Message::Hello { version, .. }, _)) => {
                let reason = format!("handoff version {version}, this agent speaks {VERSION}");
                let _ = self.channel.send(
                    &Message::Refused {
                        reason: reason.clone(),
                    },
                    &[],
                );
                bail!(reason);
            }
            other => bail!("expected a hello, got {other:?}"),
        }

        let addr = listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
            .map(|a| a.to_string())
            .unwrap_or_default();
        let fds: Vec<i32> = listener.iter().map(AsRawFd::as_raw_fd).collect();
        self.channel
            .send(&Message::Listener { addr }, &fds)
            .context("sending the listener")?;
        drop(listener);

        let mut parked = self
            .outbound
            .take_parked()
            .context("the parked-connection stream was taken")?;
        self.outbound.set_pause(true);
        let deadline = tokio::time::Instant::now() + self.park_timeout;
        let mut handed_off = 0u64;
        loop {
            tokio::select! {
                conn = parked.recv() => match conn {
                    Some(conn) => { self.send(conn)?; handed_off += 1; }
                    None => break,
                },
                () = tokio::time::sleep(Duration::from_millis(20)) => {
                    if self.outbound.active_connections() == 0 { break; }
                }
                () = tokio::time::sleep_until(deadline) => break,
            }
        }
        self.outbound.set_pause(false);
        // Relays that parked just before the pause was withdrawn.
        tokio::time::sleep(Duration::from_millis(20)).await;
        while let Ok(conn) = parked.try_recv() {
            self.send(conn)?;
            handed_off += 1;
        }
        let kept = self.outbound.active_connections();
        self.channel
            .send(&Message::Done { handed_off, kept }, &[])
            .context("sending done")?;
        info!(handed_off, kept, "handoff done");
        Ok(())
    }

    fn send(&self, conn: Connection) -> anyhow::Result<()> {
        let Connection {
            client,
            upstream,
            meta,
        } = conn;
        let client = client.into_std().context("detaching the client socket")?;
        let upstream = upstream
            .into_std()
            .context("detaching the upstream socket")?;
        self.channel
            .send(
                &Message::Connection { meta },
                &[client.as_raw_fd(), upstream.as_raw_fd()],
            )
            .context("sending a connection")
        // Our copies close here; the new agent holds the sockets now.
    }
}
