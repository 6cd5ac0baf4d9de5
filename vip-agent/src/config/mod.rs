//! The agent's configuration: one TOML file, accepted or rejected whole.
//!
//! Every error names the file, the line, the field and what is allowed, so an operator can fix
//! it without reading code. Parsing (`toml` + serde, [`raw`]) catches types, unknown fields and
//! bad enum values; validation catches what only makes sense across fields (duplicate VIPs,
//! backends of a family without a source address, a table size that is not prime, more VIPs
//! than slots) and turns the file as written into the typed [`Config`].

mod auto;
mod error;
mod expand;
mod raw;
mod types;
mod validate;

use std::path::Path;

pub use auto::HostAddresses;
pub use error::ConfigError;
pub use types::*;

/// Reads a config file, expands `${NAME}` from the environment, and validates it.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.to_owned(),
        line: None,
        field: String::new(),
        message: format!("cannot read: {e}"),
    })?;
    let expanded =
        expand::expand(&text, |name| std::env::var(name).ok()).map_err(|e| ConfigError {
            file: path.to_owned(),
            line: Some(error::line_of(&text, &(e.offset..e.offset))),
            field: error::field_at(&text, e.offset),
            message: e.message,
        })?;
    let host = HostAddresses::read().map_err(|e| ConfigError {
        file: path.to_owned(),
        line: None,
        field: String::new(),
        message: format!("reading this host's addresses (for \"auto\"): {e}"),
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
    let raw: raw::RawConfig = toml::from_str(text).map_err(|e| ConfigError {
        file: path.to_owned(),
        line: e.span().map(|s| error::line_of(text, &s)),
        field: e
            .span()
            .map_or_else(String::new, |s| error::field_at(text, s.start)),
        message: e.message().trim().to_owned(),
    })?;
    validate::validate(path, text, raw, host)
}

#[cfg(test)]
mod tests;
