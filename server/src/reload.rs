//! Reloading without a restart: SIGHUP, or `POST /-/reload` on the internal port, reads the
//! tokens file (`--tokens-file`) and the whitelist file (`--whitelist-file`) again.
//!
//! Both are read and parsed before either is replaced, so a reload is all or nothing: a file that
//! cannot be read or parsed keeps the old tokens *and* the old whitelist, logs why, and sets
//! `telemeter_server_config_last_reload_successful` to 0 (as Prometheus's own gauge of that name
//! does), so an alert can catch an edit that did not take. Uploads and authorizations in flight
//! finish with what they started with. A token source other than a file (an authorization
//! service, `--insecure-accept-any-token`) has nothing to reload.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use log::{info, warn};
use telemeter_common::instrument::{Gauge, Registry};
use telemeter_common::selector::Selector;
use telemeter_common::sync::{lock, Swap};

use crate::authorize::{AuthorizeError, ClientAuthorizer, TokensFile};
use crate::config::WhitelistSource;

/// The client authorizer the reloader can replace: every check goes to the current one.
pub struct ReloadableAuthorizer {
    current: Swap<dyn ClientAuthorizer>,
}

impl ClientAuthorizer for ReloadableAuthorizer {
    fn authorize(&self, token: &str, cluster_id: &str) -> Result<String, AuthorizeError> {
        self.current.current().authorize(token, cluster_id)
    }

    fn bundle_keys(&self, cluster_id: &str) -> Option<Vec<[u8; 32]>> {
        self.current.current().bundle_keys(cluster_id)
    }
}

/// Reads the reloadable files again and swaps in what they say.
pub struct Reloader {
    tokens_file: Option<PathBuf>,
    authorizer: Swap<dyn ClientAuthorizer>,
    whitelist_source: WhitelistSource,
    whitelist: Swap<Vec<Selector>>,
    successful: Gauge,
    success_time: Gauge,
    /// One reload at a time: two at once could swap in an older read last.
    running: Mutex<()>,
}

impl Reloader {
    /// A reloader starting from `authorizer` (loaded from `tokens_file`, when the tokens come
    /// from a file) and `whitelist` (from `whitelist_source`); its gauges registered in
    /// `registry`. Returns the authorizer to hand to the `/authorize` handler.
    pub fn new(
        tokens_file: Option<PathBuf>,
        authorizer: Arc<dyn ClientAuthorizer>,
        whitelist_source: WhitelistSource,
        whitelist: Swap<Vec<Selector>>,
        registry: &Registry,
    ) -> (Reloader, Arc<ReloadableAuthorizer>) {
        let authorizer = Swap::new(authorizer);
        let successful = registry
            .gauge(
                "telemeter_server_config_last_reload_successful",
                "Whether the last reload of the tokens and whitelist files (SIGHUP, POST /-/reload) succeeded.",
                &[],
            )
            .with(&[]);
        successful.set(1.0);
        let success_time = registry
            .gauge(
                "telemeter_server_config_last_reload_success_timestamp_seconds",
                "When the tokens and whitelist files were last loaded successfully, in seconds since the epoch.",
                &[],
            )
            .with(&[]);
        success_time.set(now_seconds());
        let reloadable = Arc::new(ReloadableAuthorizer {
            current: authorizer.clone(),
        });
        let reloader = Reloader {
            tokens_file,
            authorizer,
            whitelist_source,
            whitelist,
            successful,
            success_time,
            running: Mutex::new(()),
        };
        (reloader, reloadable)
    }

    /// Reads the files again; on success replaces the tokens and the whitelist, else keeps both
    /// and returns why (also logged). `cause` names what asked, for the log.
    pub fn reload(&self, cause: &str) -> Result<(), String> {
        let _one_at_a_time = lock(&self.running);
        let tokens = match &self.tokens_file {
            Some(path) => match TokensFile::load(path) {
                Ok(file) => Some((file, path)),
                Err(e) => {
                    return self.failed(cause, format!("--tokens-file {}: {e}", path.display()))
                }
            },
            None => None,
        };
        let whitelist = match self.whitelist_source.load() {
            Ok(whitelist) => whitelist,
            Err(e) => return self.failed(cause, e.to_string()),
        };
        let mut what = Vec::new();
        if let Some((file, path)) = tokens {
            what.push(format!(
                "{} client tokens from {}",
                file.len(),
                path.display()
            ));
            self.authorizer.replace(Arc::new(file));
        }
        if let Some(path) = &self.whitelist_source.file {
            what.push(format!(
                "{} whitelist selectors ({} from {})",
                whitelist.len(),
                whitelist.len() - self.whitelist_source.inline.len(),
                path.display()
            ));
        }
        self.whitelist.replace(Arc::new(whitelist));
        self.successful.set(1.0);
        self.success_time.set(now_seconds());
        if what.is_empty() {
            info!("reload ({cause}): no --tokens-file or --whitelist-file to read again");
        } else {
            info!("reload ({cause}): {}", what.join(", "));
        }
        Ok(())
    }

    fn failed(&self, cause: &str, reason: String) -> Result<(), String> {
        self.successful.set(0.0);
        warn!("reload ({cause}) failed, keeping the tokens and whitelist in use: {reason}");
        Err(reason)
    }
}

fn now_seconds() -> f64 {
    telemeter_common::time::unix_millis(SystemTime::now()) as f64 / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str, contents: &str) -> PathBuf {
        let path =
            std::env::temp_dir().join(format!("telemeter-reload-{}-{name}", std::process::id()));
        std::fs::write(&path, contents).unwrap();
        path
    }

    #[test]
    fn a_good_file_replaces_a_bad_one_keeps_both_old_ones() {
        let tokens = temp("tokens", "old a\n");
        let whitelist = temp("whitelist", "up\n");
        let source = WhitelistSource {
            inline: vec![Selector::parse("inline").unwrap()],
            file: Some(whitelist.clone()),
        };
        let current_whitelist = Swap::new(Arc::new(source.load().unwrap()));
        let registry = Registry::new();
        let (reloader, authorizer) = Reloader::new(
            Some(tokens.clone()),
            Arc::new(TokensFile::load(&tokens).unwrap()),
            source,
            current_whitelist.clone(),
            &registry,
        );
        assert!(authorizer.authorize("old", "a").is_ok());
        assert!(authorizer.authorize("new", "b").is_err());

        std::fs::write(&tokens, "new b\n").unwrap();
        std::fs::write(&whitelist, "up\nnode_up\n").unwrap();
        reloader.reload("test").unwrap();
        assert!(authorizer.authorize("new", "b").is_ok());
        assert!(authorizer.authorize("old", "a").is_err());
        assert_eq!(current_whitelist.current().len(), 3);
        assert!(registry
            .render()
            .contains("telemeter_server_config_last_reload_successful 1\n"));

        // A broken tokens file: nothing changes, not even the (good) whitelist.
        std::fs::write(&tokens, "[not json").unwrap();
        std::fs::write(&whitelist, "up\n").unwrap();
        let reason = reloader.reload("test").unwrap_err();
        assert!(reason.contains("--tokens-file"), "{reason}");
        assert!(authorizer.authorize("new", "b").is_ok());
        assert_eq!(current_whitelist.current().len(), 3);
        assert!(registry
            .render()
            .contains("telemeter_server_config_last_reload_successful 0\n"));

        // A broken whitelist: the same.
        std::fs::write(&tokens, "third c\n").unwrap();
        std::fs::write(&whitelist, "up{\n").unwrap();
        assert!(reloader
            .reload("test")
            .unwrap_err()
            .contains("--whitelist-file"));
        assert!(authorizer.authorize("third", "c").is_err());
        assert!(authorizer.authorize("new", "b").is_ok());

        let _ = std::fs::remove_file(tokens);
        let _ = std::fs::remove_file(whitelist);
    }
}
