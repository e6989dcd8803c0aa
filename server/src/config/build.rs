//! Building the [`Config`] from the [`Flags`]: what clap cannot check (durations, label pairs,
//! selector files, URLs, that a client token source exists, the cluster addresses).

use std::net::{Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use telemeter_common::duration;
use telemeter_common::labels;
use telemeter_common::selector::{self, Selector};

use super::*;
use crate::remote_write::RemoteWriteConfig;

impl Flags {
    /// Checks the flags and builds the configuration (reading `--whitelist-file`).
    pub fn into_config(self) -> Result<Config, ConfigError> {
        let authorize = non_empty(self.authorize.clone());
        if authorize.is_none() && non_empty(self.authorize_issuer_url.clone()).is_some() {
            return Err(ConfigError::Invalid {
                flag: "--authorize-issuer-url",
                reason: "the OIDC token is for the authorization service: give --authorize too"
                    .into(),
            });
        }
        let oidc = self.oidc_config()?;
        let token_source = match (&self.tokens_file, authorize) {
            (Some(path), _) => TokenSource::File(path.clone()),
            (None, Some(url)) => {
                check_url("--authorize", &url)?;
                let concurrency = self.authorize_concurrency;
                if concurrency == 0 {
                    return Err(ConfigError::Invalid {
                        flag: "--authorize-concurrency",
                        reason: "must be greater than 0".into(),
                    });
                }
                let timeout = parse_duration("--authorize-timeout", &self.authorize_timeout)?;
                let connect_timeout = parse_duration(
                    "--authorize-connect-timeout",
                    &self.authorize_connect_timeout,
                )?;
                if timeout.is_zero() || connect_timeout.is_zero() {
                    return Err(ConfigError::Invalid {
                        flag: "--authorize-timeout",
                        reason: "--authorize-timeout and --authorize-connect-timeout must be greater than 0s".into(),
                    });
                }
                TokenSource::Tollbooth(TollboothConfig {
                    url,
                    oidc,
                    concurrency,
                    timeout,
                    connect_timeout,
                })
            }
            (None, None) if self.insecure_accept_any_token => TokenSource::AnyToken,
            (None, None) => return Err(ConfigError::NoTokenSource),
        };
        if !labels::is_valid_label_name(&self.partition_label) {
            return Err(ConfigError::Invalid {
                flag: "--partition-label",
                reason: format!("{:?} is not a valid label name", self.partition_label),
            });
        }
        let labels = parse_label_pairs("--label", &self.labels)?;
        let required_labels = parse_label_pairs("--required-label", &self.required_labels)?;
        // Every series carries these: one /federate could not serve would refuse every upload.
        let added = std::iter::once(("--partition-label", &self.partition_label))
            .chain(labels.iter().map(|(name, _)| ("--label", name)))
            .chain(
                required_labels
                    .iter()
                    .map(|(name, _)| ("--required-label", name)),
            );
        for (flag, name) in added {
            if let Some(reason) = crate::ingest::validate::server_label_problem(name) {
                return Err(ConfigError::Invalid { flag, reason });
            }
        }
        for (name, _) in labels.iter().chain(&required_labels) {
            if *name == self.partition_label {
                return Err(ConfigError::Invalid {
                    flag: "--label",
                    reason: format!(
                        "{name:?} is the partition label, which the server sets itself"
                    ),
                });
            }
        }
        // A series would be required to carry one value and then be given the other.
        if let Some((name, _)) = labels
            .iter()
            .find(|(name, _)| required_labels.iter().any(|(r, _)| r == name))
        {
            return Err(ConfigError::Invalid {
                flag: "--label",
                reason: format!("{name:?} is also a --required-label"),
            });
        }

        let whitelist_source = WhitelistSource {
            inline: self
                .whitelist
                .iter()
                .map(|text| {
                    Selector::parse(text).map_err(|e| ConfigError::Invalid {
                        flag: "--whitelist",
                        reason: e.to_string(),
                    })
                })
                .collect::<Result<_, _>>()?,
            file: self.whitelist_file.clone(),
        };
        let whitelist = whitelist_source.load()?;

        let remote_write = match self.remote_write_url {
            None => None,
            Some(url) => {
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    return Err(ConfigError::Invalid {
                        flag: "--remote-write-url",
                        reason: format!("{url:?} is not an http:// or https:// URL"),
                    });
                }
                if self.remote_write_queue == 0 {
                    return Err(ConfigError::Invalid {
                        flag: "--remote-write-queue",
                        reason: "must be greater than 0".into(),
                    });
                }
                let timeout = parse_duration("--remote-write-timeout", &self.remote_write_timeout)?;
                if timeout.is_zero() {
                    return Err(ConfigError::Invalid {
                        flag: "--remote-write-timeout",
                        reason: "must be greater than 0s".into(),
                    });
                }
                let max_backlog_age = parse_duration(
                    "--remote-write-max-backlog-age",
                    &self.remote_write_max_backlog_age,
                )?;
                for (flag, n) in [
                    ("--remote-write-shards", self.remote_write_shards as u64),
                    (
                        "--remote-write-max-samples-per-send",
                        self.remote_write_max_samples_per_send as u64,
                    ),
                    (
                        "--remote-write-max-backlog-bytes",
                        self.remote_write_max_backlog_bytes,
                    ),
                    (
                        "--remote-write-max-backlog-age",
                        u64::from(!max_backlog_age.is_zero()),
                    ),
                ] {
                    if n == 0 {
                        return Err(ConfigError::Invalid {
                            flag,
                            reason: "must be greater than 0".into(),
                        });
                    }
                }
                Some(RemoteWriteConfig {
                    url,
                    queue_capacity: self.remote_write_queue,
                    timeout,
                    ca_file: self.remote_write_ca_file,
                    bearer_token_file: self.remote_write_bearer_token_file,
                    shards: self.remote_write_shards,
                    max_samples_per_send: self.remote_write_max_samples_per_send,
                    max_backlog_bytes: self.remote_write_max_backlog_bytes,
                    max_backlog_age,
                })
            }
        };

        let positive = |flag: &'static str, n: usize| {
            if n == 0 {
                Err(ConfigError::Invalid {
                    flag,
                    reason: "must be greater than 0".into(),
                })
            } else {
                Ok(n)
            }
        };
        let has_shared_key = !self.shared_key.is_empty();
        let receive = crate::receive::ReceiveConfig {
            max_bytes: positive("--receive-max-bytes", self.receive_max_bytes)?,
            max_decompressed_bytes: positive(
                "--receive-max-decompressed-bytes",
                self.receive_max_decompressed_bytes,
            )?,
            rate: match self.receive_ratelimit {
                rate if rate.is_finite() && rate >= 0.0 => rate,
                rate => {
                    return Err(ConfigError::Invalid {
                        flag: "--receive-ratelimit",
                        reason: format!("{rate} is not a rate (0 or more per second)"),
                    })
                }
            },
            elide_labels: {
                for name in &self.elide_labels {
                    if !labels::is_valid_label_name(name) {
                        return Err(ConfigError::Invalid {
                            flag: "--elide-label",
                            reason: format!("{name:?} is not a valid label name"),
                        });
                    }
                    if *name == self.partition_label {
                        return Err(ConfigError::Invalid {
                            flag: "--elide-label",
                            reason: format!(
                                "{name:?} is the partition label, which every series must carry"
                            ),
                        });
                    }
                }
                self.elide_labels.clone()
            },
        };
        let has_internal_tls = self.internal_tls_key.is_some();
        Ok(Config {
            listen: self.listen,
            listen_internal: self.listen_internal,
            tls: pair(self.tls_crt, self.tls_key),
            internal_tls: pair(self.internal_tls_crt, self.internal_tls_key),
            shared_key: self.shared_key,
            token_lifetime: Duration::from_secs(self.token_expire_seconds),
            token_source,
            partition_label: self.partition_label,
            labels,
            required_labels,
            whitelist,
            whitelist_source,
            ratelimit: parse_duration("--ratelimit", &self.ratelimit)?,
            ttl: nonzero_duration("--ttl", &self.ttl)?,
            storage_path: self.storage_path,
            max_upload_bytes: positive("--max-upload-bytes", self.max_upload_bytes)?,
            max_decompressed_bytes: positive(
                "--max-decompressed-bytes",
                self.max_decompressed_bytes,
            )?,
            max_series: positive("--max-series", self.max_series)?,
            max_sample_age: parse_duration("--max-sample-age", &self.max_sample_age)?,
            max_future_skew: parse_duration("--max-future-skew", &self.max_future_skew)?,
            workers: match self.workers {
                Some(n) => Some(positive("--workers", n)?),
                None => None,
            },
            max_connections: positive("--max-connections", self.max_connections)?,
            max_connections_per_peer: positive(
                "--max-connections-per-peer",
                self.max_connections_per_peer,
            )?,
            max_body_bytes_per_peer: positive(
                "--max-body-bytes-per-peer",
                self.max_body_bytes_per_peer,
            )?,
            body_timeout: match parse_duration("--body-timeout", &self.body_timeout)? {
                zero if zero.is_zero() => {
                    return Err(ConfigError::Invalid {
                        flag: "--body-timeout",
                        reason: "must be greater than 0s".into(),
                    })
                }
                timeout => timeout,
            },
            remote_write,
            receive,
            cluster: match self.listen_cluster {
                None => None,
                Some(listen_cluster) => {
                    if !has_shared_key {
                        return Err(ConfigError::Invalid {
                            flag: "--listen-cluster",
                            reason: "clustering needs --shared-key: every server must sign and verify with the same key".into(),
                        });
                    }
                    let name = match self.name {
                        Some(name) => name,
                        None => host_name().ok_or_else(|| ConfigError::Invalid {
                            flag: "--name",
                            reason: "the host name is unavailable: give --name".into(),
                        })?,
                    };
                    if name.is_empty() || name.len() > 255 {
                        return Err(ConfigError::Invalid {
                            flag: "--name",
                            reason: "must be 1 to 255 bytes".into(),
                        });
                    }
                    let gossip_interval =
                        parse_duration("--gossip-interval", &self.gossip_interval)?;
                    let peer_timeout = parse_duration("--peer-timeout", &self.peer_timeout)?;
                    if gossip_interval.is_zero() || peer_timeout <= gossip_interval {
                        return Err(ConfigError::Invalid {
                            flag: "--peer-timeout",
                            reason: "must be longer than --gossip-interval, which must be above 0"
                                .into(),
                        });
                    }
                    let join = join_addresses(&listen_cluster, &self.join)?;
                    Some(ClusterFlags {
                        listen_cluster,
                        join,
                        internal_tls: has_internal_tls,
                        name,
                        advertise_internal: self.advertise_internal,
                        gossip_interval,
                        peer_timeout,
                    })
                }
            },
        })
    }
}

impl Flags {
    /// The OIDC client the `--authorize-*` flags describe, if `--authorize-issuer-url` is set.
    /// Without it the other OIDC flags are ignored, as upstream did.
    fn oidc_config(&self) -> Result<Option<OidcConfig>, ConfigError> {
        let Some(issuer_url) = non_empty(self.authorize_issuer_url.clone()) else {
            return Ok(None);
        };
        check_url("--authorize-issuer-url", &issuer_url)?;
        let client_id =
            non_empty(self.authorize_client_id.clone()).ok_or_else(|| ConfigError::Invalid {
                flag: "--authorize-client-id",
                reason: "required with --authorize-issuer-url".into(),
            })?;
        let secret = |s: &Option<Secret>| s.clone().filter(|s| !s.0.is_empty());
        let password_grant = match (
            non_empty(self.authorize_username.clone()),
            secret(&self.authorize_password),
        ) {
            (Some(user), Some(password)) => Some((user, password)),
            (None, None) => None,
            _ => {
                return Err(ConfigError::Invalid {
                    flag: "--authorize-username",
                    reason: "--authorize-username and --authorize-password go together".into(),
                })
            }
        };
        Ok(Some(OidcConfig {
            issuer_url,
            client_id,
            client_secret: secret(&self.authorize_client_secret),
            password_grant,
        }))
    }
}

/// `value`, unless it is empty: upstream's manifests pass `--flag=$(VAR)`, and an unset variable
/// meant "not set" there.
fn non_empty(value: Option<String>) -> Option<String> {
    value.filter(|v| !v.is_empty())
}

fn check_url(flag: &'static str, url: &str) -> Result<(), ConfigError> {
    if url.starts_with("http://") || url.starts_with("https://") {
        Ok(())
    } else {
        Err(ConfigError::Invalid {
            flag,
            reason: format!("{url:?} is not an http:// or https:// URL"),
        })
    }
}

/// The `--join` entries as "host:port": an entry without a port gets the port of
/// `listen_cluster` (every node of a cluster usually listens on the same one, and upstream's
/// memberlist did the same), or [`DEFAULT_CLUSTER_PORT`] when that is 0. Empty entries are
/// dropped.
pub fn join_addresses(listen_cluster: &str, join: &[String]) -> Result<Vec<String>, ConfigError> {
    let port = listen_cluster
        .parse::<SocketAddr>()
        .map(|a| a.port())
        .ok()
        .or_else(|| listen_cluster.rsplit_once(':')?.1.parse().ok())
        .filter(|port| *port != 0)
        .unwrap_or(DEFAULT_CLUSTER_PORT);
    let mut out = Vec::new();
    for entry in join.iter().map(|e| e.trim()).filter(|e| !e.is_empty()) {
        let address = if entry.parse::<SocketAddr>().is_ok() {
            entry.to_owned()
        } else if entry.starts_with('[') && entry.ends_with(']') {
            format!("{entry}:{port}")
        } else if entry.parse::<Ipv6Addr>().is_ok() {
            format!("[{entry}]:{port}")
        } else {
            match entry.rsplit_once(':') {
                None => format!("{entry}:{port}"),
                Some((host, p))
                    if !host.is_empty() && !host.contains(':') && p.parse::<u16>().is_ok() =>
                {
                    entry.to_owned()
                }
                Some(_) => {
                    return Err(ConfigError::Invalid {
                        flag: "--join",
                        reason: format!("{entry:?} is not HOST or HOST:PORT"),
                    })
                }
            }
        };
        out.push(address);
    }
    Ok(out)
}

/// The host name, if the system has a usable one.
pub fn host_name() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates when it fits.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return None;
    }
    let len = buf.iter().position(|&b| b == 0)?;
    let name = std::str::from_utf8(buf.get(..len)?).ok()?;
    (!name.is_empty()).then(|| name.to_owned())
}

fn pair(cert: Option<PathBuf>, key: Option<PathBuf>) -> Option<TlsFiles> {
    match (cert, key) {
        (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
        _ => None,
    }
}

fn parse_duration(flag: &'static str, text: &str) -> Result<Duration, ConfigError> {
    duration::parse(text).map_err(|e| ConfigError::Invalid {
        flag,
        reason: e.to_string(),
    })
}

/// As [`parse_duration`], refusing zero: a `--ttl` of 0s was accepted, and then every cluster
/// was expired on arrival and nothing was ever served.
fn nonzero_duration(flag: &'static str, text: &str) -> Result<Duration, ConfigError> {
    let value = parse_duration(flag, text)?;
    if value.is_zero() {
        return Err(ConfigError::Invalid {
            flag,
            reason: "must be greater than 0s (a cluster would be expired as soon as it pushed, and nothing served)".to_string(),
        });
    }
    Ok(value)
}

/// Parses `NAME=VALUE` pairs, checking the name is a valid label name and the value non-empty.
pub fn parse_label_pairs(
    flag: &'static str,
    pairs: &[String],
) -> Result<Vec<(String, String)>, ConfigError> {
    let mut out: Vec<(String, String)> = Vec::new();
    for text in pairs {
        let invalid = |reason: String| ConfigError::Invalid { flag, reason };
        let Some((name, value)) = text.split_once('=') else {
            return Err(invalid(format!("{text:?} is not NAME=VALUE")));
        };
        if !labels::is_valid_label_name(name) {
            return Err(invalid(format!("{name:?} is not a valid label name")));
        }
        if value.is_empty() || value.len() > labels::MAX_VALUE_BYTES {
            return Err(invalid(format!(
                "the value of {name:?} must be 1 to {} bytes",
                labels::MAX_VALUE_BYTES
            )));
        }
        if out.iter().any(|(n, _)| n == name) {
            return Err(invalid(format!("{name:?} is given twice")));
        }
        out.push((name.to_string(), value.to_string()));
    }
    Ok(out)
}

impl WhitelistSource {
    /// The whitelist: the `--whitelist` selectors, then those of `--whitelist-file` read now.
    pub fn load(&self) -> Result<Vec<Selector>, ConfigError> {
        let mut whitelist = self.inline.clone();
        if let Some(path) = &self.file {
            let contents = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
                flag: "--whitelist-file",
                path: path.clone(),
                reason: e.to_string(),
            })?;
            whitelist.extend(selector::parse_file(&contents).map_err(|e| {
                ConfigError::Invalid {
                    flag: "--whitelist-file",
                    reason: e.to_string(),
                }
            })?);
        }
        Ok(whitelist)
    }
}
