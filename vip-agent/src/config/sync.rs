//! `[sync]`: flow-state sharing's settings, checked.

use std::{path::Path, time::Duration};

use toml::Spanned;

use super::{
    error::ConfigError,
    raw::RawSync,
    types::{MIN_SYNC_KEY_LEN, Role, SyncConfig},
    validate::Located,
};

/// Longest wait for peers at start.
const MAX_FETCH_TIMEOUT_SECS: u64 = 60;

pub(super) fn validate(
    raw: Spanned<RawSync>,
    role: Role,
    err: &Located,
) -> Result<SyncConfig, ConfigError> {
    let span = raw.span();
    let s = raw.into_inner();
    if role != Role::Lb {
        return Err(err(
            &span,
            "sync".into(),
            "flow-state sharing is between LB nodes: remove [sync] from a backend".into(),
        ));
    }
    let listen = *s.listen.get_ref();
    let peers = s.peers.get_ref().clone();
    if peers.is_empty() {
        return Err(err(
            &s.peers.span(),
            "sync.peers".into(),
            "list the other LB nodes of the tier (their sync.listen addresses)".into(),
        ));
    }
    if peers.contains(&listen) {
        return Err(err(
            &s.peers.span(),
            "sync.peers".into(),
            format!("{listen} is this node's own sync.listen: list the other nodes only"),
        ));
    }
    let key = match (s.key, s.key_file) {
        (Some(k), None) => k.into_inner().into_bytes(),
        (None, Some(path)) => {
            read_key(path.get_ref()).map_err(|m| err(&path.span(), "sync.key_file".into(), m))?
        }
        _ => {
            return Err(err(
                &span,
                "sync.key".into(),
                "give the tier's shared key: `key` (e.g. \"${VIP_SYNC_KEY}\") or `key_file`, \
                 one of them"
                    .into(),
            ));
        }
    };
    if key.len() < MIN_SYNC_KEY_LEN {
        return Err(err(
            &span,
            "sync.key".into(),
            format!(
                "a key of {} bytes: use at least {MIN_SYNC_KEY_LEN} random bytes (e.g. \
                 `openssl rand -hex 32`)",
                key.len()
            ),
        ));
    }
    if s.fetch_timeout > MAX_FETCH_TIMEOUT_SECS || *s.refresh.get_ref() == 0 {
        return Err(err(
            &s.refresh.span(),
            "sync.refresh".into(),
            format!(
                "refresh must be at least 1 s and fetch_timeout at most \
                 {MAX_FETCH_TIMEOUT_SECS} s"
            ),
        ));
    }
    Ok(SyncConfig {
        listen,
        peers,
        key,
        max_entries_per_second: s.max_entries_per_second.max(1),
        fetch_timeout: Duration::from_secs(s.fetch_timeout),
        refresh: Duration::from_secs(*s.refresh.get_ref()),
    })
}

/// A key file's content; a trailing newline is not part of the key.
fn read_key(path: &Path) -> Result<Vec<u8>, String> {
    let mut key = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    while key.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        key.pop();
    }
    Ok(key)
}
