//! `${NAME}` in the config's strings, replaced by environment variables before parsing: one
//! config for a fleet, with what differs per node (its address, a secret) passed in by the
//! environment (a DaemonSet's downward API, a systemd `Environment=`).
//!
//! Only double-quoted strings (basic and multi-line basic) are expanded, and the value is
//! escaped for them, so a value with quotes or backslashes stays one string and cannot add
//! keys. Literal strings ('...') and comments are taken as written; `$${` is a literal `${`.
//! Expansion never adds a line, so errors still point at the right line.

use std::fmt;

/// A `${NAME}` that cannot be expanded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ExpandError {
    /// Byte offset of the `${` in the text.
    pub(super) offset: usize,
    pub(super) message: String,
}

impl fmt::Display for ExpandError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum In {
    Code,
    Comment,
    Basic,
    MultiBasic,
    Literal,
    MultiLiteral,
}

/// `text` with every `${NAME}` inside double-quoted strings replaced by `env(NAME)`.
pub(super) fn expand(
    text: &str,
    env: impl Fn(&str) -> Option<String>,
) -> Result<String, ExpandError> {
    let mut out = String::with_capacity(text.len());
    let mut state = In::Code;
    let mut i = 0;
    while i < text.len() {
        let rest = &text[i..];
        let next = |s: &str| rest.starts_with(s);
        let (step, new_state) = match state {
            In::Code if next("#") => (1, In::Comment),
            In::Code if next("\"\"\"") => (3, In::MultiBasic),
            In::Code if next("\"") => (1, In::Basic),
            In::Code if next("'''") => (3, In::MultiLiteral),
            In::Code if next("'") => (1, In::Literal),
            In::Comment if next("\n") => (1, In::Code),
            // An escaped character (a quote, a backslash) never ends the string.
            In::Basic | In::MultiBasic if next("\\") => (
                1 + rest[1..].chars().next().map_or(0, char::len_utf8),
                state,
            ),
            In::Basic if next("\"") || next("\n") => (1, In::Code),
            In::MultiBasic if next("\"\"\"") => (3, In::Code),
            In::Literal if next("'") || next("\n") => (1, In::Code),
            In::MultiLiteral if next("'''") => (3, In::Code),
            In::Basic | In::MultiBasic if next("$${") => {
                out.push_str("${");
                i += 3;
                continue;
            }
            In::Basic | In::MultiBasic if next("${") => {
                let (name, len) = variable(rest).ok_or_else(|| ExpandError {
                    offset: i,
                    message: "`${` starts no variable: write ${NAME} (letters, digits, _) or $${ for a literal ${".into(),
                })?;
                let value = env(name).ok_or_else(|| ExpandError {
                    offset: i,
                    message: format!("environment variable {name} is not set"),
                })?;
                escape_into(&mut out, &value);
                i += len;
                continue;
            }
            _ => (rest.chars().next().map_or(1, char::len_utf8), state),
        };
        let step = step.min(rest.len());
        out.push_str(&rest[..step]);
        i += step;
        state = new_state;
    }
    Ok(out)
}

/// `${NAME}` at the start of `s`: the name and the length of the whole reference.
fn variable(s: &str) -> Option<(&str, usize)> {
    let body = s.strip_prefix("${")?;
    let end = body.find('}')?;
    let name = &body[..end];
    let valid = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    valid.then_some((name, end + 3))
}

/// `value` escaped for a TOML basic string (on one line).
fn escape_into(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "NODE_IP" => Some("192.0.2.11".into()),
            "TRICKY" => Some("a\"b\\c\nd".into()),
            _ => None,
        }
    }

    #[test]
    fn expands_in_double_quoted_strings_only() {
        let text = "# ${NOT_SET} in a comment\nsource_v4 = \"${NODE_IP}\"\n\
                    note = 'literal ${NOT_SET}'\nid = \"x-${NODE_IP}-y\" # ${NOT_SET}\n";
        let out = expand(text, env).unwrap();
        assert_eq!(
            out,
            "# ${NOT_SET} in a comment\nsource_v4 = \"192.0.2.11\"\n\
             note = 'literal ${NOT_SET}'\nid = \"x-192.0.2.11-y\" # ${NOT_SET}\n"
        );
    }

    #[test]
    fn values_stay_one_string_and_lines_stay_put() {
        let out = expand("password = \"${TRICKY}\"\nasn = 1\n", env).unwrap();
        let parsed: toml::Table = toml::from_str(&out).unwrap();
        assert_eq!(parsed["password"].as_str(), Some("a\"b\\c\nd"));
        assert_eq!(out.lines().count(), 2);
        // An escaped quote does not end the string; `$${` is a literal `${`.
        let out = expand("a = \"\\\"${NODE_IP}$${X}\"", env).unwrap();
        assert_eq!(out, "a = \"\\\"192.0.2.11${X}\"");
    }

    #[test]
    fn unset_or_malformed_references_are_errors_at_their_place() {
        let e = expand("a = 1\nb = \"${MISSING}\"\n", env).unwrap_err();
        assert_eq!(e.offset, 11);
        assert!(e.message.contains("MISSING"), "{e}");
        assert!(expand("b = \"${1X}\"", env).is_err());
        assert!(expand("b = \"${OPEN\"", env).is_err());
    }
}
