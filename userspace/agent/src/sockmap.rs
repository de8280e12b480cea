//! The sockmap switch: the `CONFIG_SOCKMAP` bit in `NM_CONFIG`, decided at start by the
//! configured mode and the self-test, and flippable at run time (admin `POST /sockmap`).
//!
//! Turning it off takes effect at each accelerated socket's next send (it falls back to the
//! stack for good, see `ebpf/programs/src/sk_msg.rs`); no connection is dropped. Turning it
//! on affects connections established afterwards.
use std::{path::Path, sync::Mutex, time::Duration};

use nodemesh_common::{CONFIG_SOCKMAP, Config};
use nodemesh_loader::{LoaderError, addr, maps::ConfigMap, selftest::SelfTestReport};
use nodemesh_proxy::ProxyConfig;
use tracing::{error, info, warn};

use crate::config::SockmapMode;

#[derive(Debug)]
pub struct SockmapSwitch {
    config: Mutex<ConfigMap>,
    mode: SockmapMode,
    selftest: Option<SelfTestReport>,
}

impl SockmapSwitch {
    /// Writes the proxy address into `NM_CONFIG` (which starts capture for enabled pods) and
    /// decides the sockmap bit. Blocking: the self-test moves a few MiB.
    pub fn init(
        pin_dir: &Path,
        proxy: &ProxyConfig,
        mode: SockmapMode,
        selftest_timeout: Duration,
    ) -> Result<Self, LoaderError> {
        let mut config = ConfigMap::open(pin_dir)?;
        let base = Config {
            proxy_ip: addr::ip_words(proxy.listen.ip()),
            proxy_port: proxy.listen.port(),
            proxy_mark: proxy.mark,
            ..Config::default()
        };
        let mut selftest = None;
        let enabled = match mode {
            SockmapMode::Off => false,
            SockmapMode::Auto | SockmapMode::On => {
                config.set(Config {
                    flags: CONFIG_SOCKMAP,
                    ..base
                })?;
                let report = nodemesh_loader::selftest::run(pin_dir, selftest_timeout)?;
                let safe = report.passed && report.blocking_recv_ok;
                if safe {
                    info!(detail = %report.detail, elapsed_ms = report.elapsed_ms, "sockmap self-test passed");
                } else if !report.passed {
                    error!(detail = %report.detail, ?mode, "sockmap self-test FAILED: data did not move correctly");
                } else {
                    warn!(
                        detail = %report.detail,
                        ?mode,
                        "sockmap moves data correctly, but on this kernel a blocking recv on an \
                         accelerated socket can fail with EAGAIN; `sockmap.mode: on` accelerates \
                         anyway (safe for non-blocking applications), `auto` keeps it off"
                    );
                }
                let on = match mode {
                    SockmapMode::Auto => safe,
                    SockmapMode::On => true,
                    SockmapMode::Off => false,
                };
                selftest = Some(report);
                on
            }
        };
        config.set(Config {
            flags: if enabled { CONFIG_SOCKMAP } else { 0 },
            ..base
        })?;
        info!(enabled, ?mode, "sockmap fast path");
        Ok(Self {
            config: Mutex::new(config),
            mode,
            selftest,
        })
    }

    pub fn enabled(&self) -> bool {
        self.config
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get()
            .is_ok_and(|c| c.flags & CONFIG_SOCKMAP != 0)
    }

    /// Switches the fast path at run time.
    pub fn set(&self, enabled: bool) -> Result<(), LoaderError> {
        let mut config = self.config.lock().unwrap_or_else(|p| p.into_inner());
        let mut cfg = config.get()?;
        cfg.flags = if enabled {
            cfg.flags | CONFIG_SOCKMAP
        } else {
            cfg.flags & !CONFIG_SOCKMAP
        };
        config.set(cfg)?;
        info!(enabled, "sockmap switched at run time");
        Ok(())
    }

    pub fn mode(&self) -> SockmapMode {
        self.mode
    }

    pub fn selftest(&self) -> Option<&SelfTestReport> {
        self.selftest.as_ref()
    }
}
