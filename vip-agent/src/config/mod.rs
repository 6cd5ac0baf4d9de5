//! The agent's configuration: one TOML file, accepted or rejected whole.
//!
//! Every error names the file, the line, the field and what is allowed, so an operator can fix
//! it without reading code. Parsing (`toml` + serde, [`raw`]) catches types, unknown fields and
//! bad enum values; validation catches what only makes sense across fields (duplicate VIPs,
//! backends of a family without a source address, a table size that is not prime, more VIPs
//! than slots) and turns the file as written into the typed [`Config`].

mod error;
mod raw;
mod types;
mod validate;

use std::path::Path;

pub use error::ConfigError;
pub use types::*;

/// Reads and validates a config file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.to_owned(),
        line: None,
        field: String::new(),
        message: format!("cannot read: {e}"),
    })?;
    parse(path, &text)
}

/// Parses and validates config text (`path` only names it in errors).
pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
    let raw: raw::RawConfig = toml::from_str(text).map_err(|e| ConfigError {
        file: path.to_owned(),
        line: e.span().map(|s| error::line_of(text, &s)),
        field: e
            .span()
            .map_or_else(String::new, |s| error::field_at(text, s.start)),
        message: e.message().trim().to_owned(),
    })?;
    validate::validate(path, text, raw)
}

#[cfg(test)]
mod tests;
