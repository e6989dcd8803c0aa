//! The operator's view on the internal port, like pushgateway's: `GET /` an HTML status page
//! (plain HTML and CSS, no script, nothing fetched from elsewhere, so it works on an isolated
//! network), `GET /api/v1/clusters` the same as JSON, and `DELETE /api/v1/clusters/<id>` to remove
//! one cluster.
//!
//! Both views list the clusters this server stores and serves (in a cluster of servers, each
//! lists its own; the page names the members to visit): id, last push, series, payload bytes,
//! the owner on the ring, and whether the rate limit would refuse a push now. Counting series
//! reads each payload (a few milliseconds per thousand clusters, from the page cache); the
//! internal port is the operator's, not the clients'.
//!
//! A removal is journaled by the store before it is answered, so it survives a restart; in a
//! cluster, the request is also forwarded (sealed, as pushes are) to the cluster's owner on the
//! ring, which removes its copy. The next push of that cluster stores it again, as with
//! pushgateway: revoke its token first to keep it out.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use telemeter_common::http::{percent_decode, Request, Response};
use telemeter_common::wire;

use crate::cluster::forward::ForwardKind;
use crate::cluster::Cluster;
use crate::ingest::ratelimit::{RateLimiter, Wait};
use crate::store::Store;

/// The API path listing clusters; `<it>/<id>` names one.
pub const CLUSTERS_PATH: &str = "/api/v1/clusters";

/// What the status views need.
pub struct Status {
    /// The store listed.
    pub store: Store,
    /// The cluster of servers, when clustering is on.
    pub cluster: Option<Arc<Cluster>>,
    /// The uploads' rate limiter, for each cluster's state.
    pub limiter: Arc<RateLimiter>,
}

/// One cluster as the views show it.
#[derive(Debug, Serialize)]
pub struct ClusterStatus {
    /// The cluster id.
    pub id: String,
    /// When its stored upload was accepted, seconds since the epoch.
    pub last_push_timestamp_seconds: f64,
    /// Seconds since then.
    pub last_push_age_seconds: f64,
    /// Series in the stored upload (`null` when it could not be read).
    pub series: Option<usize>,
    /// Bytes of the stored payload.
    pub bytes: u64,
    /// The server that owns the cluster on the ring (this one when not clustered).
    pub owner: String,
    /// `ok`, `limited` (one push stored within the window) or `refusals` (too many refused).
    pub rate_limit: &'static str,
    /// Seconds until a push would be read, when limited.
    pub retry_after_seconds: Option<f64>,
}

/// One member of the cluster of servers.
#[derive(Debug, Serialize)]
pub struct MemberStatus {
    /// Its name.
    pub name: String,
    /// `alive`, `suspect` or `dead`.
    pub state: String,
    /// Its internal address (where its own status page is).
    pub internal_addr: String,
    /// Whether it is this server.
    pub is_self: bool,
}

/// Everything both views show.
#[derive(Debug, Serialize)]
pub struct Overview {
    /// This server's name in the cluster (`null` when not clustered).
    pub node: Option<String>,
    /// The version and revision it runs.
    pub version: &'static str,
    /// The members, this one first (empty when not clustered).
    pub members: Vec<MemberStatus>,
    /// The clusters served here, by id.
    pub clusters: Vec<ClusterStatus>,
}

impl Status {
    /// What the views show, now.
    pub fn overview(&self) -> Overview {
        let now = SystemTime::now();
        let now_instant = Instant::now();
        let self_name = self.cluster.as_ref().map(|c| c.name());
        let clusters = self
            .store
            .clusters()
            .into_iter()
            .filter(|entry| {
                self.cluster
                    .as_ref()
                    .is_none_or(|c| c.serves(&entry.cluster_id))
            })
            .map(|entry| {
                let series = match self.store.get(&entry.cluster_id) {
                    Ok(Some(upload)) => wire::count_series(&upload.payload, &unlimited())
                        .ok()
                        .map(|(_, series)| series),
                    _ => None,
                };
                let owner = match &self.cluster {
                    Some(cluster) => cluster
                        .owner_preference(&entry.cluster_id)
                        .first()
                        .map_or_else(String::new, |owner| owner.name.clone()),
                    None => "this server".to_string(),
                };
                let (rate_limit, retry_after) =
                    match self.limiter.peek(&entry.cluster_id, now_instant) {
                        Ok(()) => ("ok", None),
                        Err(Wait::Slot(wait)) => ("limited", Some(wait.as_secs_f64())),
                        Err(Wait::Refusals(wait)) => ("refusals", Some(wait.as_secs_f64())),
                    };
                let pushed = seconds(entry.received);
                ClusterStatus {
                    id: entry.cluster_id,
                    last_push_timestamp_seconds: pushed,
                    last_push_age_seconds: (seconds(now) - pushed).max(0.0),
                    series,
                    bytes: entry.payload_bytes,
                    owner,
                    rate_limit,
                    retry_after_seconds: retry_after,
                }
            })
            .collect();
        let members = match &self.cluster {
            Some(cluster) => members(&cluster.debug_json()),
            None => Vec::new(),
        };
        Overview {
            node: self_name,
            version: crate::VERSION_TEXT,
            members,
            clusters,
        }
    }

    /// `GET /`: the HTML page.
    pub fn page(&self, request: &Request) -> Response {
        if request.method != "GET" && request.method != "HEAD" {
            return Response::text(405, "only GET is allowed").with_header("Allow", "GET");
        }
        Response::bytes(
            200,
            "text/html; charset=utf-8",
            render_page(&self.overview()).into_bytes(),
        )
    }

    /// `/api/v1/clusters` and `/api/v1/clusters/<id>`.
    pub fn api(&self, request: &Request) -> Response {
        let rest = request.path.strip_prefix(CLUSTERS_PATH).unwrap_or("");
        if rest.is_empty() || rest == "/" {
            return match request.method.as_str() {
                "GET" => Response::json(200, &self.overview()),
                _ => Response::text(405, "only GET is allowed").with_header("Allow", "GET"),
            };
        }
        let Some(id) = rest.strip_prefix('/').and_then(percent_decode) else {
            return Response::text(404, "not found");
        };
        match request.method.as_str() {
            "DELETE" => self.delete(&id),
            _ => Response::text(405, "only DELETE is allowed").with_header("Allow", "DELETE"),
        }
    }

    /// Removes cluster `id` here (journaled) and, in a cluster, at its owner.
    fn delete(&self, id: &str) -> Response {
        if id.is_empty() {
            return Response::text(400, "empty cluster id");
        }
        let stored_here = self.store.clusters().iter().any(|e| e.cluster_id == id);
        let mut removed_at = Vec::new();
        if stored_here {
            if let Err(e) = self.store.remove(id) {
                log::error!("status: removing cluster {id:?} failed: {e}");
                return Response::text(503, &format!("removing cluster {id:?} failed: {e}"));
            }
            removed_at.push("here".to_string());
        }
        if let Some(cluster) = &self.cluster {
            let owner = cluster.owner_preference(id).into_iter().next();
            if let Some(owner) = owner.filter(|owner| !owner.is_self) {
                if let Err(e) =
                    cluster.forward(&owner, id, SystemTime::now(), ForwardKind::Remove, b"")
                {
                    log::error!(
                        "status: removing cluster {id:?} at its owner {} failed: {e}",
                        owner.name
                    );
                    return Response::text(
                        502,
                        &format!(
                            "removing cluster {id:?} at its owner {} failed: {e}",
                            owner.name
                        ),
                    );
                }
                removed_at.push(format!("at its owner {}", owner.name));
            }
        }
        if removed_at.is_empty() {
            return Response::text(404, &format!("no cluster {id:?} is stored"));
        }
        log::info!("status: removed cluster {id:?} ({})", removed_at.join(", "));
        Response::text(
            200,
            &format!("removed cluster {id:?} ({})", removed_at.join(", ")),
        )
    }
}

/// Counting limits for our own stored payloads: validated on the way in.
fn unlimited() -> telemeter_common::delimited::Limits {
    telemeter_common::delimited::Limits {
        max_message_bytes: usize::MAX,
        max_total_bytes: usize::MAX,
        max_families: usize::MAX,
        max_series: usize::MAX,
    }
}

fn seconds(time: SystemTime) -> f64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The members from the cluster's debug document.
fn members(debug: &serde_json::Value) -> Vec<MemberStatus> {
    debug["members"]
        .as_array()
        .map(|members| {
            members
                .iter()
                .map(|m| MemberStatus {
                    name: m["name"].as_str().unwrap_or("").to_string(),
                    state: m["state"].as_str().unwrap_or("").to_string(),
                    internal_addr: m["internal_addr"].as_str().unwrap_or("").to_string(),
                    is_self: m["self"].as_bool().unwrap_or(false),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// `text` with the characters HTML gives meaning to escaped (cluster ids come from tokens).
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// An age as people read it: `42s`, `3m 5s`, `2h 10m`, `3d 4h`.
fn age(seconds: f64) -> String {
    let s = seconds.max(0.0) as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m {}s", s / 60, s % 60),
        3600..=86399 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86400, s % 86400 / 3600),
    }
}

/// The page: a table of clusters and one of members.
pub fn render_page(overview: &Overview) -> String {
    let mut html = String::from(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>telemeter-server</title>\n<style>\nbody{font-family:sans-serif;margin:2em;color:#222}\ntable{border-collapse:collapse;margin-bottom:2em}\nth,td{border:1px solid #ccc;padding:.3em .7em;text-align:left}\nth{background:#eee}\ntd.num{text-align:right}\n.limited{color:#a60}\n.refusals{color:#c00}\n</style>\n</head>\n<body>\n<h1>telemeter-server</h1>\n",
    );
    let _ = writeln!(
        html,
        "<p>{}{}</p>",
        escape(overview.version),
        overview
            .node
            .as_deref()
            .map(|n| format!(" &middot; node <b>{}</b>", escape(n)))
            .unwrap_or_default()
    );
    let _ = writeln!(html, "<h2>Clusters ({})</h2>", overview.clusters.len());
    html.push_str("<table id=\"clusters\">\n<thead><tr><th>cluster</th><th>last push</th><th>age</th><th>series</th><th>bytes</th><th>owner</th><th>rate limit</th></tr></thead>\n<tbody>\n");
    for c in &overview.clusters {
        let pushed_millis = (c.last_push_timestamp_seconds * 1000.0) as u64;
        let pushed =
            telemeter_common::logging::rfc3339(pushed_millis / 1000, (pushed_millis % 1000) as u32);
        let limit = match c.retry_after_seconds {
            Some(wait) => format!("{} (next in {})", c.rate_limit, age(wait)),
            None => c.rate_limit.to_string(),
        };
        let _ = writeln!(
            html,
            "<tr class=\"cluster\" data-id=\"{id}\"><td>{id}</td><td>{pushed}</td><td class=\"num\">{age}</td><td class=\"num\">{series}</td><td class=\"num\">{bytes}</td><td>{owner}</td><td class=\"{class}\">{limit}</td></tr>",
            id = escape(&c.id),
            pushed = escape(&pushed),
            age = age(c.last_push_age_seconds),
            series = c.series.map_or_else(|| "?".to_string(), |n| n.to_string()),
            bytes = c.bytes,
            owner = escape(&c.owner),
            class = c.rate_limit,
            limit = escape(&limit),
        );
    }
    html.push_str("</tbody>\n</table>\n");
    if !overview.members.is_empty() {
        let _ = writeln!(
            html,
            "<h2>Cluster members ({})</h2>",
            overview.members.len()
        );
        html.push_str("<table id=\"members\">\n<thead><tr><th>name</th><th>state</th><th>internal address</th></tr></thead>\n<tbody>\n");
        for m in &overview.members {
            let _ = writeln!(
                html,
                "<tr class=\"member\"><td>{}{}</td><td>{}</td><td><a href=\"http://{addr}/\">{addr}</a></td></tr>",
                escape(&m.name),
                if m.is_self { " (this server)" } else { "" },
                escape(&m.state),
                addr = escape(&m.internal_addr),
            );
        }
        html.push_str("</tbody>\n</table>\n");
    }
    html.push_str("<p><a href=\"/api/v1/clusters\">/api/v1/clusters</a> (JSON; <code>DELETE /api/v1/clusters/&lt;id&gt;</code> removes one) &middot; <a href=\"/federate\">/federate</a> &middot; <a href=\"/metrics\">/metrics</a></p>\n</body>\n</html>\n");
    html
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_ids_are_escaped_and_ages_read() {
        assert_eq!(
            escape("<a href='x'>&\""),
            "&lt;a href=&#39;x&#39;&gt;&amp;&quot;"
        );
        assert_eq!(age(5.0), "5s");
        assert_eq!(age(185.0), "3m 5s");
        assert_eq!(age(7800.0), "2h 10m");
        let page = render_page(&Overview {
            node: None,
            version: "v",
            members: Vec::new(),
            clusters: vec![ClusterStatus {
                id: "<script>".into(),
                last_push_timestamp_seconds: 1_700_000_000.0,
                last_push_age_seconds: 3.0,
                series: Some(7),
                bytes: 100,
                owner: "this server".into(),
                rate_limit: "limited",
                retry_after_seconds: Some(60.0),
            }],
        });
        assert!(!page.contains("<script>"), "{page}");
        assert!(page.contains("<td>&lt;script&gt;</td>"), "{page}");
        assert!(page.contains("2023-11-14T22:13:20"), "{page}");
        assert!(page.contains("limited (next in 1m 0s)"), "{page}");
    }
}
