//! A config error and where in the file it is.

use std::{
    fmt,
    ops::Range,
    path::{Path, PathBuf},
};

/// A configuration error, located in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// Where in the file, when known.
    pub place: Option<Box<Place>>,
    /// Dotted path of the field, e.g. `vip[2].backend[0].weight`.
    pub field: String,
    pub message: String,
    /// The other mistakes found in the same file, each with its place.
    pub also: Vec<ConfigError>,
}

/// A place in the config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Place {
    /// 1-based.
    pub line: usize,
    /// 1-based, in characters.
    pub column: usize,
    /// The line as written, shown under the message.
    pub source_line: String,
}

impl ConfigError {
    /// An error about the whole file (it cannot be read, say).
    pub(super) fn file(file: &Path, message: String) -> Self {
        Self {
            file: file.to_owned(),
            place: None,
            field: String::new(),
            message,
            also: Vec::new(),
        }
    }

    /// One error that carries every error in `errors` (the first leads); `None` if empty.
    pub(super) fn all(errors: Vec<ConfigError>) -> Option<Self> {
        let mut errors = errors.into_iter();
        let mut first = errors.next()?;
        first.also.extend(errors);
        Some(first)
    }

    /// The 1-based line, when known.
    pub fn line(&self) -> Option<usize> {
        self.place.as_ref().map(|p| p.line)
    }

    /// An error at `span` of `text` (`0..0`: no place in the file, e.g. a missing key).
    pub(super) fn at(
        file: &Path,
        text: &str,
        span: &Range<usize>,
        field: String,
        message: String,
    ) -> Self {
        let mut e = Self::file(file, message);
        e.field = field;
        if span.end > 0 {
            let start = span.start.min(text.len());
            let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
            e.place = Some(Box::new(Place {
                line: line_of(text, span),
                column: text[line_start..start].chars().count() + 1,
                source_line: text[line_start..]
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .to_owned(),
            }));
        }
        e
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(p) = &self.place {
            write!(f, ":{}:{}", p.line, p.column)?;
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.message)?;
        // The line itself, with a caret under the place.
        if let Some(p) = &self.place {
            let number = p.line.to_string();
            write!(
                f,
                "\n {number} | {}\n {} | {}^",
                p.source_line,
                " ".repeat(number.len()),
                " ".repeat(p.column - 1)
            )?;
        }
        for other in &self.also {
            write!(f, "\n{other}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// The dotted path of the field at byte `offset`, e.g. `vip[1].backend[0].weight`: the key on
/// that line inside the table whose header precedes it (array tables counted).
pub(super) fn field_at(text: &str, offset: usize) -> String {
    let offset = offset.min(text.len());
    let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next().unwrap_or_default().trim();
    let key = match line.split_once('=') {
        Some((k, _)) if !line.starts_with('[') => k.trim(),
        _ => "",
    };
    // Index of each array table seen so far; a new parent resets its children.
    let mut path: Vec<(String, Option<usize>)> = Vec::new();
    let mut counts: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for header in text[..line_start].lines().map(str::trim) {
        let (name, array) =
            if let Some(n) = header.strip_prefix("[[").and_then(|h| h.strip_suffix("]]")) {
                (n.trim(), true)
            } else if let Some(n) = header.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
                (n.trim(), false)
            } else {
                continue;
            };
        let index = array.then(|| {
            let c = counts.entry(name.to_owned()).or_insert(0);
            *c += 1;
            *c - 1
        });
        counts.retain(|k, _| !k.starts_with(&format!("{name}.")));
        path = name
            .split('.')
            .map(|part| (part.to_owned(), None))
            .collect();
        if let Some(last) = path.last_mut() {
            last.1 = index;
        }
        // Parents of a nested array table take their current index.
        let parts: Vec<&str> = name.split('.').collect();
        for depth in 1..parts.len() {
            let parent = parts[..depth].join(".");
            if let Some(&c) = counts.get(&parent) {
                path[depth - 1].1 = Some(c - 1);
            }
        }
    }
    let mut out: Vec<String> = path
        .into_iter()
        .map(|(name, index)| match index {
            Some(i) => format!("{name}[{i}]"),
            None => name,
        })
        .collect();
    if !key.is_empty() {
        out.push(key.to_owned());
    }
    out.join(".")
}

pub(super) fn line_of(text: &str, span: &Range<usize>) -> usize {
    text[..span.start.min(text.len())].matches('\n').count() + 1
}
