//! The tokens file (`--tokens-file`): client tokens, each allowed for some clusters, kept only as
//! digests, checked without an outside service.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use ring::digest;
use serde::Deserialize;

use super::*;

/// Why a tokens file could not be loaded.
#[derive(Debug)]
pub enum TokensFileError {
    /// The file could not be read.
    Read(std::io::Error),
    /// The JSON form is invalid.
    Json(serde_json::Error),
    /// A line of the line form is invalid.
    Line {
        /// The 1-based line number.
        line: usize,
        /// What was wrong.
        reason: String,
    },
    /// The file names no token.
    Empty,
}

impl fmt::Display for TokensFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokensFileError::Read(e) => write!(f, "{e}"),
            TokensFileError::Json(e) => write!(f, "invalid JSON: {e}"),
            TokensFileError::Line { line, reason } => write!(f, "line {line}: {reason}"),
            TokensFileError::Empty => f.write_str("no token in the file"),
        }
    }
}

impl std::error::Error for TokensFileError {}

/// Client tokens from a file, each allowed for some cluster ids or all (`*`, or a JSON entry
/// without `clusters`, which is upstream's tokens file `[{"token":"a"}]`).
///
/// Tokens are kept as SHA-256 digests, so a lookup's timing says nothing useful about a token.
#[derive(Debug, Default)]
pub struct TokensFile {
    tokens: HashMap<[u8; 32], Allowed>,
}

#[derive(Debug, Clone, Default)]
struct Allowed {
    any: bool,
    clusters: Vec<String>,
}

#[derive(Deserialize)]
struct JsonEntry {
    token: String,
    /// Absent: any cluster (upstream's authorization server knew no restriction).
    #[serde(default)]
    clusters: Option<Vec<String>>,
}

impl TokensFile {
    /// Reads and parses a tokens file.
    pub fn load(path: &Path) -> Result<TokensFile, TokensFileError> {
        let contents = std::fs::read_to_string(path).map_err(TokensFileError::Read)?;
        TokensFile::parse(&contents)
    }

    /// Parses a tokens file: JSON `[{"token":"…","clusters":["id","*"]}]` when the first
    /// non-space character is `[` (an entry without `clusters` may push for any cluster id; other
    /// fields are ignored), else lines `TOKEN ID1,ID2` or `TOKEN *` (`#` comments, blank lines
    /// skipped).
    pub fn parse(contents: &str) -> Result<TokensFile, TokensFileError> {
        let mut file = TokensFile::default();
        if contents.trim_start().starts_with('[') {
            let entries: Vec<JsonEntry> =
                serde_json::from_str(contents).map_err(TokensFileError::Json)?;
            for (i, entry) in entries.into_iter().enumerate() {
                if entry.token.is_empty() {
                    return Err(TokensFileError::Line {
                        line: i + 1,
                        reason: "entry has an empty token".into(),
                    });
                }
                match &entry.clusters {
                    None => file.add(&entry.token, std::iter::once("*")),
                    Some(clusters) if clusters.is_empty() => {
                        return Err(TokensFileError::Line {
                            line: i + 1,
                            reason: "entry has an empty \"clusters\" list: list cluster ids or \"*\", or leave the field out to allow any".into(),
                        })
                    }
                    Some(clusters) => file.add(&entry.token, clusters.iter().map(String::as_str)),
                }
            }
        } else {
            for (i, line) in contents.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let mut words = line.split_whitespace();
                let (Some(token), Some(clusters), None) =
                    (words.next(), words.next(), words.next())
                else {
                    return Err(TokensFileError::Line {
                        line: i + 1,
                        reason: "expected TOKEN CLUSTER1,CLUSTER2 or TOKEN *".into(),
                    });
                };
                file.add(token, clusters.split(',').filter(|c| !c.is_empty()));
            }
        }
        if file.tokens.is_empty() {
            return Err(TokensFileError::Empty);
        }
        Ok(file)
    }

    /// How many tokens the file holds.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether the file holds no token.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// How many tokens may push for any cluster id.
    pub fn unrestricted(&self) -> usize {
        self.tokens.values().filter(|a| a.any).count()
    }

    /// The SHA-256 of every token allowed for `cluster_id` (tokens allowed for any cluster
    /// included): the keys of the tags of that cluster's air-gap bundles (see
    /// `telemeter_common::bundle`). A token removed from the file is gone from here at the next
    /// reload, so its bundles are refused too.
    pub fn hashes_for(&self, cluster_id: &str) -> Vec<[u8; 32]> {
        self.tokens
            .iter()
            .filter(|(_, a)| a.any || a.clusters.iter().any(|c| c == cluster_id))
            .map(|(hash, _)| *hash)
            .collect()
    }

    fn add<'a>(&mut self, token: &str, clusters: impl Iterator<Item = &'a str>) {
        let allowed = self.tokens.entry(token_digest(token)).or_default();
        for cluster in clusters {
            if cluster == "*" {
                allowed.any = true;
            } else {
                allowed.clusters.push(cluster.to_string());
            }
        }
    }
}

fn token_digest(token: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest::digest(&digest::SHA256, token.as_bytes()).as_ref());
    out
}

impl ClientAuthorizer for TokensFile {
    fn authorize(&self, token: &str, cluster_id: &str) -> Result<String, AuthorizeError> {
        let allowed = self
            .tokens
            .get(&token_digest(token))
            .ok_or(AuthorizeError::UnknownToken)?;
        if allowed.any || allowed.clusters.iter().any(|c| c == cluster_id) {
            Ok(cluster_id.to_string())
        } else {
            Err(AuthorizeError::NotAllowed {
                cluster_id: cluster_id.to_string(),
            })
        }
    }

    fn bundle_keys(&self, cluster_id: &str) -> Option<Vec<[u8; 32]>> {
        Some(self.hashes_for(cluster_id))
    }
}
