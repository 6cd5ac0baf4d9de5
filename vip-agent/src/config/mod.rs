//! The agent's configuration: one TOML file, accepted or rejected whole.
//!
//! Every error names the file, the line, the field and what is allowed, so an operator can fix
//! it without reading code. Parsing (`toml` + serde, [`raw`]) catches types, unknown fields and
//! bad enum values; validation catches what only makes sense across fields (duplicate VIPs,
//! backends of a family without a source address, a table size that is not prime, more VIPs
//! than slots) and turns the file as written into the typed [`Config`].

mod auto;
mod egress;
mod error;
mod expand;
mod raw;
mod sync;
mod types;
mod validate;

use std::path::Path;

pub use auto::HostAddresses;
pub use error::{ConfigError, Place};
pub use types::*;

/// Reads a config file, expands `${NAME}` from the environment, and validates it.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::file(path, format!("cannot read: {e}")))?;
    let expanded = expand::expand(&text, |name| std::env::var(name).ok()).map_err(|e| {
        let place = e.offset..e.offset + 2;
        ConfigError::at(
            path,
            &text,
            &place,
            error::field_at(&text, e.offset),
            e.message,
        )
    })?;
    let host = HostAddresses::read().map_err(|e| {
        ConfigError::file(
            path,
            format!("reading this host's addresses (for \"auto\"): {e}"),
        )
    })?;
    parse_on(path, &expanded, &host)
}

/// Parses and validates config text (`path` only names it in errors), on a host without
/// addresses (`"auto"` finds none).
pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
    parse_on(path, text, &HostAddresses::default())
}

/// Parses and validates config text; `"auto"` takes addresses from `host`.
pub fn parse_on(path: &Path, text: &str, host: &HostAddresses) -> Result<Config, ConfigError> {
    let syntax = |e: toml::de::Error| {
        let span = e.span().unwrap_or(0..0);
        let field = e
            .span()
            .map_or_else(String::new, |s| error::field_at(text, s.start));
        ConfigError::at(path, text, &span, field, e.message().trim().to_owned())
    };
    let deserializer = toml::Deserializer::parse(text).map_err(syntax)?;
    // The path serde was at names the field, even where the span is the whole table (a
    // missing key).
    let raw: raw::RawConfig = serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let at = dotted(e.path());
        let mut located = syntax(e.into_inner());
        if !at.is_empty() {
            let missing = located
                .message
                .strip_prefix("missing field `")
                .and_then(|m| m.split('`').next())
                .map(str::to_owned);
            located.field = match missing {
                Some(key) => format!("{at}.{key}"),
                None => at,
            };
        }
        located
    })?;
    validate::validate(path, text, raw, host)
}

/// `vip[0].backend[1]`: serde's path as the file names it (without `Spanned`'s inner field).
fn dotted(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for segment in path.iter() {
        match segment {
            Segment::Seq { index } => out += &format!("[{index}]"),
            Segment::Map { key } if key.starts_with("$__") => {}
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out += key;
            }
            Segment::Unknown => {}
        }
    }
    out
}

#[cfg(test)]
mod tests;
