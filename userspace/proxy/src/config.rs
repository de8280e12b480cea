use std::{net::SocketAddr, time::Duration};

use serde::{Deserialize, Serialize};

/// The node proxy's settings (the `proxy:` section of the agent config).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// The outbound listener the kernel redirects pods' connects to. Must be an IPv4 address
    /// the pods can route to (the node's address on the pod network), not loopback.
    pub listen: SocketAddr,
    /// `SO_MARK` on the proxy's own sockets; the connect hooks leave marked sockets alone.
    pub mark: u32,
    /// How long to wait for the destination to accept.
    #[serde(with = "humantime_serde_compat")]
    pub connect_timeout: Duration,
    /// A connection with no bytes in either direction for this long is closed.
    #[serde(with = "humantime_serde_compat")]
    pub idle_timeout: Duration,
    /// Concurrent proxied connections one source pod may hold; more are refused, so that one
    /// noisy pod cannot starve the others.
    pub max_connections_per_pod: usize,
    /// Bytes buffered per direction of a connection.
    pub buffer_size: usize,
    /// Listen backlog.
    pub backlog: u32,
    /// The L7 proxy: when set, connections whose original destination matches a listener
    /// of this Envoy bootstrap are served by it (HTTP routing, retries, per-pod request
    /// limits); the others are relayed at L4 as before.
    pub l7: Option<L7Config>,
}

/// The `proxy.l7:` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct L7Config {
    /// An Envoy v3 bootstrap (YAML or JSON): its `static_resources`, and with
    /// `dynamic_resources` the ADS control plane that sends the rest. May be left out when
    /// the agent's `control_plane` is set (everything then comes from it).
    #[serde(default)]
    pub bootstrap: std::path::PathBuf,
    /// Per-pod request limits (connections are limited by `max_connections_per_pod`).
    #[serde(default)]
    pub max_requests_per_pod: Option<u32>,
    #[serde(default)]
    pub max_pending_per_pod: Option<u32>,
    /// Close open connections that an updated network RBAC denies (default: yes). Off, a
    /// connection keeps the decision made when it opened; HTTP requests are always checked
    /// against the policy in force when they start.
    #[serde(default = "yes")]
    pub close_denied_on_update: bool,
    /// Entries queued per access log file before entries are dropped (and counted).
    #[serde(default)]
    pub access_log_queue: Option<usize>,
}

fn yes() -> bool {
    true
}

impl Default for L7Config {
    fn default() -> Self {
        Self {
            bootstrap: std::path::PathBuf::new(),
            max_requests_per_pod: None,
            max_pending_per_pod: None,
            close_denied_on_update: yes(),
            access_log_queue: None,
        }
    }
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 15001)),
            mark: nodemesh_loader::addr::DEFAULT_PROXY_MARK,
            connect_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(3600),
            max_connections_per_pod: 1024,
            buffer_size: 64 * 1024,
            backlog: 4096,
            l7: None,
        }
    }
}

/// Durations in config files as strings like `5s`, `250ms`, `1h` (Envoy writes `5s`).
pub mod humantime_serde_compat {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer, de::Error as _};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_duration(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        parse_duration(&s).map_err(D::Error::custom)
    }

    /// Parses `<number><unit>` with unit `ms`, `s`, `m` or `h` (fractions allowed: `0.5s`).
    pub fn parse_duration(s: &str) -> Result<Duration, String> {
        let s = s.trim();
        let split = s
            .find(|c: char| c.is_ascii_alphabetic())
            .ok_or_else(|| format!("duration {s:?} needs a unit (ms, s, m, h)"))?;
        let (num, unit) = s.split_at(split);
        let value: f64 = num
            .trim()
            .parse()
            .map_err(|_| format!("duration {s:?}: bad number"))?;
        if !value.is_finite() || value < 0.0 {
            return Err(format!("duration {s:?} must be a non-negative number"));
        }
        let secs = match unit {
            "ms" => value / 1000.0,
            "s" => value,
            "m" => value * 60.0,
            "h" => value * 3600.0,
            _ => {
                return Err(format!(
                    "duration {s:?}: unknown unit {unit:?} (ms, s, m, h)"
                ));
            }
        };
        Duration::try_from_secs_f64(secs).map_err(|e| format!("duration {s:?}: {e}"))
    }

    pub fn format_duration(d: Duration) -> String {
        if d.subsec_millis() != 0 || d.as_secs() == 0 {
            format!("{}ms", d.as_millis())
        } else {
            format!("{}s", d.as_secs())
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn parses_envoy_style_durations() {
            assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
            assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
            assert_eq!(parse_duration("0.5s"), Ok(Duration::from_millis(500)));
            assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
            assert!(parse_duration("5").is_err());
            assert!(parse_duration("-1s").is_err());
            assert!(parse_duration("1d").is_err());
            assert_eq!(format_duration(Duration::from_millis(250)), "250ms");
            assert_eq!(format_duration(Duration::from_secs(3600)), "3600s");
        }
    }
}
