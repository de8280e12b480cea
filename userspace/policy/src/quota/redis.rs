//! The leasing task: talks to Redis for one quota, off the request path.
//!
//! A lease is one `EVALSHA` of [`LEASE_SCRIPT`]: atomically, on the window's counter, grant
//! `min(batch, limit - used)` tokens and add them to `used`. Redis never grants more than
//! `limit` tokens for one window, whichever proxies ask, so the proxies together never
//! admit more than `limit` requests per window while Redis is reachable (see
//! ARCHITECTURE.md, "Quota", for the bound and its exceptions).
//!
//! Every call has a deadline (`timeout`); a failure marks the quota unhealthy at once (so
//! requests that find no token decide by `failure_mode` instead of waiting) and the task
//! retries with back-off, reconnecting, until Redis answers again.
use std::{
    sync::{Arc, Weak, atomic::Ordering},
    time::Duration,
};

use tokio::time::{Instant, sleep, timeout};
use tracing::{debug, info, warn};

use super::{Quota, window_at};
use crate::PolicyError;

/// KEYS[1] the window's counter; ARGV: batch, limit, expiry (ms).
pub const LEASE_SCRIPT: &str = r"
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
local grant = math.min(tonumber(ARGV[1]), tonumber(ARGV[2]) - used)
if grant <= 0 then return 0 end
redis.call('INCRBY', KEYS[1], grant)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return grant
";

const MIN_BACKOFF: Duration = Duration::from_millis(20);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// One Redis connection, opened on demand.
struct Conn {
    addr: std::net::SocketAddr,
    deadline: Duration,
    client: Option<redis::Client>,
    conn: Option<redis::aio::MultiplexedConnection>,
    script: redis::Script,
}

impl Conn {
    fn new(addr: std::net::SocketAddr, deadline: Duration) -> Self {
        Self {
            addr,
            deadline,
            client: None,
            conn: None,
            script: redis::Script::new(LEASE_SCRIPT),
        }
    }

    async fn lease(
        &mut self,
        key: &str,
        batch: u64,
        limit: u64,
        ttl: Duration,
    ) -> Result<u64, PolicyError> {
        let addr = self.addr;
        let redis_err = |source| PolicyError::Redis { addr, source };
        if self.conn.is_none() {
            let client = match &self.client {
                Some(c) => c.clone(),
                None => {
                    let c = redis::Client::open(format!("redis://{addr}/")).map_err(redis_err)?;
                    self.client = Some(c.clone());
                    c
                }
            };
            let conn = timeout(self.deadline, client.get_multiplexed_async_connection())
                .await
                .map_err(|_| PolicyError::RedisTimeout {
                    addr,
                    timeout: self.deadline,
                })?
                .map_err(redis_err)?;
            self.conn = Some(conn);
        }
        let Some(conn) = self.conn.as_mut() else {
            return Err(PolicyError::RedisReply {
                addr,
                reply: "no connection".into(),
            });
        };
        let mut invocation = self.script.key(key);
        invocation.arg(batch).arg(limit).arg(ttl.as_millis() as u64);
        let call = invocation.invoke_async::<i64>(conn);
        let result = match timeout(self.deadline, call).await {
            Err(_) => Err(PolicyError::RedisTimeout {
                addr,
                timeout: self.deadline,
            }),
            Ok(Err(e)) => Err(redis_err(e)),
            Ok(Ok(n)) => u64::try_from(n).map_err(|_| PolicyError::RedisReply {
                addr,
                reply: n.to_string(),
            }),
        };
        if result.is_err() {
            // A timed-out or failed connection is not trusted again.
            self.conn = None;
        }
        result
    }
}

/// Runs until the quota is dropped (its last compiled chain is gone).
pub async fn run(quota: Weak<Quota>) {
    let Some(q) = quota.upgrade() else { return };
    let mut conn = Conn::new(q.redis, q.timeout);
    let name = q.config.name.clone();
    let window = q.config.window;
    let lead = (window / 5).max(q.timeout * 2).min(window / 2);
    drop(q);
    let mut backoff = MIN_BACKOFF;
    info!(quota = %name, "global quota leasing started");
    loop {
        let Some(q) = quota.upgrade() else {
            debug!(quota = %name, "global quota leasing stopped");
            return;
        };
        let now_ms = super::now_ms();
        let current = window_at(now_ms, window);
        let (cur_w, cur_t) = q.current.get();
        let needs_current = q.exhausted.load(Ordering::Acquire) != current
            && (cur_w != current || cur_t < q.low_water);
        let into_next = window_ms(window) - (now_ms % window_ms(window)) <= lead.as_millis() as u64;
        let (next_w, _) = q.next.get();
        let needs_next = into_next && next_w != current + 1;
        let target = if needs_current {
            Some((current, false))
        } else if needs_next {
            Some((current + 1, true))
        } else {
            None
        };
        let Some((w, next)) = target else {
            // Nothing to do: sleep until asked (low water) or until the next window is near.
            let until_lead = (window_ms(window) - now_ms % window_ms(window))
                .saturating_sub(lead.as_millis() as u64);
            let wake = Duration::from_millis(until_lead.max(1));
            let asked = q.wake.clone();
            drop(q);
            tokio::select! {
                _ = asked.notified() => {}
                _ = sleep(wake) => {}
            }
            continue;
        };
        let key = format!("nm:quota:{}:{}:{w}", q.domain, q.config.name);
        // The counter outlives its window a little, for proxies whose clocks lag.
        let ttl = window * 2 + Duration::from_secs(1);
        let batch = q.config.batch.min(super::lease::MAX_LEASE);
        let limit = q.config.limit;
        drop(q);
        let result = conn.lease(&key, batch, limit, ttl).await;
        let Some(q) = quota.upgrade() else { return };
        match result {
            Ok(0) => {
                q.stats.lease(&name, "exhausted");
                if !next {
                    q.exhausted.store(w, Ordering::Release);
                }
                q.mark_healthy(true);
                backoff = MIN_BACKOFF;
                q.refilled.notify_waiters();
                if next {
                    // Mark the next slot as spent so it is not asked for again.
                    q.next.add(w, 0);
                }
            }
            Ok(granted) => {
                q.stats.lease(&name, "granted");
                if next {
                    q.next.add(w, granted);
                } else {
                    q.current.add(w, granted);
                }
                q.mark_healthy(true);
                backoff = MIN_BACKOFF;
                q.refilled.notify_waiters();
            }
            Err(e) => {
                q.stats.lease(&name, "error");
                if q.mark_healthy(false) {
                    warn!(quota = %name, error = %e, fail_open = q.fail_open, "global quota: Redis unreachable; deciding by failure_mode until it answers");
                }
                q.refilled.notify_waiters();
                drop(q);
                let until = Instant::now() + backoff;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                sleep_until_or_dropped(&quota, until).await;
            }
        }
    }
}

fn window_ms(window: Duration) -> u64 {
    (window.as_millis() as u64).max(1)
}

async fn sleep_until_or_dropped(quota: &Weak<Quota>, until: Instant) {
    while Instant::now() < until {
        if quota.strong_count() == 0 {
            return;
        }
        sleep((until - Instant::now()).min(Duration::from_millis(100))).await;
    }
}

/// Keeps the task's handle out of the way of `Arc<Quota>`'s drop.
pub fn spawn(quota: &Arc<Quota>) {
    let weak = Arc::downgrade(quota);
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => {
            rt.spawn(run(weak));
        }
        Err(_) => {
            warn!(quota = %quota.config.name, "no tokio runtime: the global quota cannot lease and decides by failure_mode")
        }
    }
}
