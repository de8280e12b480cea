//! Kernel-side metrics, read from the pinned maps at scrape time.
use std::{path::PathBuf, sync::Mutex};

use nodemesh_loader::maps::{ConfigMap, PinnedMaps};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    program: &'static str,
    event: &'static str,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabels {
    map: &'static str,
}

/// `nodemesh_ebpf_events_total{program,event,kind}`, `nodemesh_ebpf_map_entries{map}` and
/// `nodemesh_ebpf_sockmap_enabled`.
#[derive(Debug)]
pub struct EbpfCollector {
    maps: Mutex<Option<PinnedMaps>>,
    pin_dir: PathBuf,
}

impl EbpfCollector {
    pub fn new(pin_dir: PathBuf) -> Self {
        Self {
            maps: Mutex::new(None),
            pin_dir,
        }
    }
}

impl Collector for EbpfCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut guard = self.maps.lock().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            *guard = PinnedMaps::open(&self.pin_dir).ok();
        }
        let Some(maps) = guard.as_ref() else {
            return Ok(());
        };
        if let Ok(counters) = maps.stats.read() {
            let mut family = encoder.encode_descriptor(
                "nodemesh_ebpf_events",
                "Events counted by the kernel programs (hit: did its job, miss: correctly left \
                 alone, fallback: took the slow path, failure: should not happen)",
                None,
                MetricType::Counter,
            )?;
            for (info, value) in counters {
                let labels = EventLabels {
                    program: info.program,
                    event: info.name,
                    kind: match info.kind {
                        nodemesh_common::CounterKind::Hit => "hit",
                        nodemesh_common::CounterKind::Miss => "miss",
                        nodemesh_common::CounterKind::Fallback => "fallback",
                        nodemesh_common::CounterKind::Failure => "failure",
                    },
                };
                ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
            }
        }
        let sizes = maps.sizes();
        let mut family = encoder.encode_descriptor(
            "nodemesh_ebpf_map_entries",
            "Entries in the kernel maps",
            None,
            MetricType::Gauge,
        )?;
        for (map, n) in [
            ("pods", sizes.pods),
            ("pending", sizes.pending),
            ("orig_dst", sizes.orig_dst),
            ("sockhash", sizes.sockhash),
            ("accelerated", sizes.accelerated),
        ] {
            ConstGauge::new(n as i64).encode(family.encode_family(&MapLabels { map })?)?;
        }
        if let Ok(cfg) = ConfigMap::open(&self.pin_dir).and_then(|c| c.get()) {
            let family = encoder.encode_descriptor(
                "nodemesh_ebpf_sockmap_enabled",
                "Whether the sockmap fast path is switched on",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(i64::from(cfg.flags & nodemesh_common::CONFIG_SOCKMAP != 0))
                .encode(family)?;
        }
        Ok(())
    }
}
