//! Helpers for the cluster's unit tests: temporary stores and started clusters.

use super::*;
use crate::store::{Store, StoreConfig};
use std::path::PathBuf;
use std::sync::atomic::AtomicUsize;
use std::thread;

/// The shared key of the tests.
pub fn key() -> SharedKey {
    SharedKey::from_bytes(&[7u8; 32]).unwrap()
}

/// A store in a fresh temporary directory, removed on drop.
pub struct TempStore {
    pub store: Store,
    dir: PathBuf,
}

impl TempStore {
    /// The store's directory.
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    pub fn new(tag: &str) -> TempStore {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "telemeter-cluster-{}-{tag}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Store::open(StoreConfig {
            dir: dir.clone(),
            ttl: Duration::from_secs(3600),
            max_batch: 16,
        })
        .unwrap();
        TempStore { store, dir }
    }
}

impl Drop for TempStore {
    fn drop(&mut self) {
        self.store.close();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A cluster node on a free UDP port, fast timings, advertising `internal`.
pub fn node(name: &str, internal: &str, join: Vec<String>) -> Cluster {
    let mut config = ClusterConfig::new(name, SocketAddr::from(([127, 0, 0, 1], 0)), internal);
    config.join = join;
    config.gossip_interval = Duration::from_millis(50);
    config.peer_timeout = Duration::from_millis(1_000);
    config.forward_timeout = Duration::from_secs(5);
    Cluster::start(config, &[key()]).unwrap()
}

/// Polls `cond` for up to 10 s.
pub fn wait_for(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        thread::sleep(Duration::from_millis(20));
    }
    cond()
}

/// An internal address where nothing listens (bound, then closed).
pub fn closed_addr() -> String {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string()
}

/// Two nodes `a` and `b` that see each other; `b` advertises `b_internal`.
pub fn pair(b_internal: &str) -> (Cluster, Cluster) {
    let a = node("a", "127.0.0.1:1", vec![]);
    let b = node("b", b_internal, vec![a.gossip_addr().to_string()]);
    assert!(wait_for(
        || a.alive() == ["a", "b"] && b.alive() == ["a", "b"]
    ));
    (a, b)
}

/// A cluster id the ring gives to `owner` in `cluster`'s view.
pub fn id_owned_by(cluster: &Cluster, owner: &str) -> String {
    (0..1000)
        .map(|i| format!("id-{i}"))
        .find(|id| lock(&cluster.membership).ring().owner(id) == Some(owner))
        .unwrap()
}

/// `up` series of `jobs` sampled at `at`, as remote write builds them (`help` is
/// [`crate::receive::merge::REMOTE_WRITE_HELP`]) or as an upload sends them.
pub fn up_series(help: &str, jobs: &[&str], at: SystemTime) -> Vec<u8> {
    use telemeter_common::model::{LabelPair, MetricFamily, MetricType};
    telemeter_common::delimited::encode(&[MetricFamily {
        name: Some("up".into()),
        help: Some(help.into()),
        r#type: Some(MetricType::Untyped as i32),
        metric: jobs
            .iter()
            .map(|job| {
                crate::receive::merge::untyped_series(
                    vec![LabelPair::new("job", job)],
                    1.0,
                    telemeter_common::time::sample_millis(at),
                )
            })
            .collect(),
    }])
}
