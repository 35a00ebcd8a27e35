//! Configuration errors that point at the offending line and key.

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;

/// The class of a configuration error (stable, for tests and tools).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The file could not be read, or is no configuration file at all (not a regular file,
    /// too large).
    Io,
    /// Not valid TOML.
    Syntax,
    /// A key the schema does not know.
    UnknownKey,
    /// A value of the wrong type or an unknown enum value.
    WrongType,
    /// A required key is missing.
    Missing,
    /// Two objects of the same kind share a name.
    DuplicateName,
    /// A reference to a host, VM or app that does not exist.
    UnknownReference,
    /// A `requires` cycle.
    Cycle,
    /// A number or duration outside its allowed range.
    OutOfRange,
    /// A list that must not be empty is empty.
    Empty,
    /// Keys that contradict each other.
    Conflict,
    /// A malformed value (bad name, bad duration, bad URL).
    BadValue,
    /// The file is not UTF-8 text.
    Encoding,
    /// A feature this build does not include (e.g. the `libvirt` driver).
    Unsupported,
}

/// One configuration error with its position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// The file name as given (or `<input>`).
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column (in characters).
    pub column: usize,
    /// 1-based column of the error within `source_line` (differs from `column` when a long
    /// line is shown shortened).
    pub caret: usize,
    /// Error class.
    pub kind: ErrorKind,
    /// What is wrong, naming the key.
    pub message: String,
    /// How to fix it, when we can tell.
    pub hint: Option<String>,
    /// The source line, for display.
    pub source_line: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file, self.line, self.column, self.message
        )?;
        if !self.source_line.is_empty() {
            let gutter = self.line.to_string().len();
            write!(
                f,
                "\n{:gutter$} |\n{} | {}\n{:gutter$} | {:>col$}",
                "",
                self.line,
                self.source_line,
                "",
                "^",
                col = self.caret
            )?;
        }
        if let Some(hint) = &self.hint {
            write!(f, "\n  hint: {hint}")?;
        }
        Ok(())
    }
}

/// Why a configuration was rejected. Nothing of an invalid file is ever applied.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{file}: cannot read: {source}")]
    Io {
        /// The path.
        file: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The path is not a regular file (a directory, a FIFO, a device): refused without
    /// reading it.
    #[error("{file}: is {what}, not a configuration file (a regular file is needed)")]
    NotAFile {
        /// The path.
        file: String,
        /// What it is instead ("a directory", "a named pipe (FIFO)", …).
        what: &'static str,
    },
    /// The file is larger than [`crate::file::MAX_CONFIG_BYTES`]; nothing of it was parsed.
    #[error(
        "{file}: has {size} bytes, more than a configuration file may have ({} bytes)",
        crate::file::MAX_CONFIG_BYTES
    )]
    TooLarge {
        /// The path.
        file: String,
        /// Its size in bytes.
        size: u64,
    },
    /// The file is invalid; the diagnostic says where and why.
    #[error("{0}")]
    Invalid(Box<Diagnostic>),
}

impl ConfigError {
    /// The diagnostic, when the file was readable.
    pub fn diagnostic(&self) -> Option<&Diagnostic> {
        match self {
            ConfigError::Invalid(d) => Some(d),
            ConfigError::Io { .. }
            | ConfigError::NotAFile { .. }
            | ConfigError::TooLarge { .. } => None,
        }
    }

    /// The error class.
    pub fn kind(&self) -> ErrorKind {
        match self {
            ConfigError::Invalid(d) => d.kind,
            ConfigError::Io { .. }
            | ConfigError::NotAFile { .. }
            | ConfigError::TooLarge { .. } => ErrorKind::Io,
        }
    }
}

/// Builds diagnostics for one source text.
pub(crate) struct Source<'a> {
    pub(crate) file: &'a str,
    pub(crate) text: &'a str,
}

impl Source<'_> {
    /// An error at byte offset `span.start` (clamped to the text).
    pub(crate) fn error(
        &self,
        span: Range<usize>,
        kind: ErrorKind,
        message: impl Into<String>,
        hint: Option<String>,
    ) -> ConfigError {
        let offset = span.start.min(self.text.len());
        let before = self.text.get(..offset).unwrap_or("");
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = self
            .text
            .get(line_start..offset)
            .map_or(1, |s| s.chars().count() + 1);
        let full_line = self.text[line_start..].lines().next().unwrap_or("");
        let (source_line, caret) = window(full_line, column);
        ConfigError::Invalid(Box::new(Diagnostic {
            file: self.file.to_string(),
            line,
            column,
            caret,
            kind,
            message: clip(message.into()),
            hint: hint.map(clip),
            source_line,
        }))
    }

    /// Converts a TOML/serde error, classifying it, naming the key it is about and suggesting
    /// the closest known key or value.
    pub(crate) fn toml_error(&self, err: &toml::de::Error) -> ConfigError {
        // Errors about the whole document (a missing top-level table) start at offset 0:
        // show them on the first line that is not a comment.
        let span = match err.span() {
            Some(s) if s.start > 0 => s,
            _ => {
                let start = self.first_content_offset();
                start..start
            }
        };
        let msg = err.message().trim().to_string();
        let key = self.key_at(span.start);
        let (kind, message, hint) = classify(&msg, key.as_deref());
        self.error(span, kind, message, hint)
    }

    /// The offset of the first line that is neither blank nor a comment: where an error about
    /// the whole file (a missing top-level table) is shown.
    pub(crate) fn first_content_offset(&self) -> usize {
        let mut offset = 0;
        for line in self.text.split_inclusive('\n') {
            let t = line.trim();
            if !t.is_empty() && !t.starts_with('#') {
                return offset;
            }
            offset += line.len();
        }
        0
    }

    /// The innermost key whose name or value covers byte `offset`, if the text is valid TOML;
    /// otherwise the bare key written at `offset` (e.g. a duplicate key).
    fn key_at(&self, offset: usize) -> Option<String> {
        match toml::de::DeTable::parse(self.text) {
            Ok(table) => {
                let mut best: Option<(usize, String)> = None;
                innermost_key(table.get_ref(), offset, &mut best);
                best.map(|(_, k)| k)
            }
            Err(_) => {
                // Not parseable: the key that starts the line (`key = <broken value>`, a
                // duplicate key), else the key written at `offset`. Never the broken value
                // itself (`name = shop` is about `name`, not `shop`).
                let bare = |s: &str| {
                    let len = s
                        .bytes()
                        .take_while(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
                        .count();
                    (len > 0).then(|| s[..len].to_string())
                };
                let line_start = self.text.get(..offset)?.rfind('\n').map_or(0, |i| i + 1);
                let line = self.text.get(line_start..)?.trim_start();
                bare(line)
                    .filter(|key| line[key.len()..].trim_start().starts_with('='))
                    .or_else(|| bare(self.text.get(offset..)?))
            }
        }
    }
}

/// Records in `best` the key with the smallest span (its own or its value's) covering `offset`.
fn innermost_key(table: &toml::de::DeTable<'_>, offset: usize, best: &mut Option<(usize, String)>) {
    for (key, value) in table.iter() {
        for span in [key.span(), value.span()] {
            if span.contains(&offset) && best.as_ref().is_none_or(|(len, _)| span.len() <= *len) {
                *best = Some((span.len(), key.get_ref().to_string()));
            }
        }
        innermost_value(value.get_ref(), offset, best);
    }
}

fn innermost_value(
    value: &toml::de::DeValue<'_>,
    offset: usize,
    best: &mut Option<(usize, String)>,
) {
    match value {
        toml::de::DeValue::Table(t) => innermost_key(t, offset, best),
        toml::de::DeValue::Array(items) => {
            for item in items {
                innermost_value(item.get_ref(), offset, best);
            }
        }
        _ => {}
    }
}

/// Characters of a value shown whole in a message; longer ones are shortened by [`shorten`].
pub const SHOWN_CHARS: usize = 120;

/// Characters of a whole message (or hint) shown at most.
const MESSAGE_CHARS: usize = 4 * SHOWN_CHARS;

/// `text` itself when it has at most `max` characters, else its first `max` characters
/// followed by `… (N more bytes)`. Every value a diagnostic quotes goes through here, so a
/// 10 MB line cannot become 10 MB of error message.
pub fn shorten(text: &str, max: usize) -> Cow<'_, str> {
    match text.char_indices().nth(max) {
        None => Cow::Borrowed(text),
        Some((cut, _)) => Cow::Owned(format!(
            "{}… ({} more bytes)",
            &text[..cut],
            text.len() - cut
        )),
    }
}

/// A message with every over-long word (a quoted value without spaces) shortened; if it is
/// still too long (a long value with spaces), its middle is cut so that its start and its end
/// (what is wrong with the value) stay readable.
fn clip(message: String) -> String {
    if message.chars().count() <= SHOWN_CHARS {
        return message;
    }
    let words: Vec<Cow<'_, str>> = message
        .split(' ')
        .map(|w| shorten(w, SHOWN_CHARS))
        .collect();
    let joined = words.join(" ");
    let chars = joined.chars().count();
    if chars <= MESSAGE_CHARS {
        return joined;
    }
    let byte = |c: usize| {
        joined
            .char_indices()
            .nth(c)
            .map_or(joined.len(), |(i, _)| i)
    };
    let (head, tail) = (byte(2 * SHOWN_CHARS), byte(chars - SHOWN_CHARS));
    format!(
        "{}… ({} more bytes) …{}",
        &joined[..head],
        tail - head,
        &joined[tail..]
    )
}

/// The part of `line` shown under a diagnostic: the whole line when short, else
/// [`SHOWN_CHARS`] characters around `column`, marked `…` where cut. Returns it with the
/// caret's column inside it.
fn window(line: &str, column: usize) -> (String, usize) {
    let chars = line.chars().count();
    if chars <= SHOWN_CHARS {
        return (line.to_string(), column);
    }
    let start = column
        .saturating_sub(1 + SHOWN_CHARS / 2)
        .min(chars - SHOWN_CHARS);
    let byte = |c: usize| line.char_indices().nth(c).map_or(line.len(), |(i, _)| i);
    let (from, to) = (byte(start), byte(start + SHOWN_CHARS));
    let mut shown = String::new();
    let mut caret = column - start;
    if start > 0 {
        shown.push('…');
        caret += 1;
    }
    shown.push_str(&line[from..to]);
    if to < line.len() {
        shown.push_str(&format!("… ({} more bytes)", line.len() - to));
    }
    (shown, caret)
}

fn backticked(s: &str) -> Vec<&str> {
    s.split('`').skip(1).step_by(2).collect()
}

/// Rewrites serde's type names ("i64", "a sequence") in the words of a config file.
fn plain_type(expected: &str) -> &str {
    match expected {
        "i64" | "u64" | "u32" | "an integer" => "a whole number",
        "a sequence" => "a list",
        "a boolean" | "bool" => "true or false",
        other => other,
    }
}

fn type_hint(expected: &str) -> Option<String> {
    let hint = if expected.starts_with("a duration") {
        "durations are quoted strings with a unit (ms, s, m, h, d), e.g. \"2s\" or \"1m30s\""
    } else if expected == "a whole number" {
        "write a whole number without quotes, e.g. 3"
    } else if expected == "a list" {
        "write a list in brackets, e.g. [\"a\", \"b\"]"
    } else if expected == "true or false" {
        "write true or false, without quotes"
    } else if expected.contains("string") {
        "put the value in double quotes"
    } else if expected.starts_with("struct") || expected.contains("table") {
        "write a table: [name] on its own line, or { key = value } inline"
    } else {
        return None;
    };
    Some(hint.to_string())
}

fn classify(msg: &str, key: Option<&str>) -> (ErrorKind, String, Option<String>) {
    let first_line = msg.lines().next().unwrap_or(msg);
    let for_key = key.map(|k| format!(" for `{k}`")).unwrap_or_default();
    if let Some(rest) = first_line.strip_prefix("unknown field ") {
        let names = backticked(rest);
        let (bad, known) = names.split_first().map_or(("", &[][..]), |(b, k)| (*b, k));
        let hint = suggest(bad, known)
            .map(|s| format!("did you mean `{s}`?"))
            .or_else(|| {
                (!known.is_empty()).then(|| format!("known keys here: {}", known.join(", ")))
            });
        return (ErrorKind::UnknownKey, format!("unknown key `{bad}`"), hint);
    }
    if let Some(rest) = first_line.strip_prefix("unknown variant ") {
        let names = backticked(rest);
        let (bad, known) = names.split_first().map_or(("", &[][..]), |(b, k)| (*b, k));
        let hint = suggest(bad, known)
            .map(|s| format!("did you mean \"{s}\"?"))
            .or_else(|| Some(format!("expected one of: {}", known.join(", "))));
        return (
            ErrorKind::WrongType,
            format!("unknown value \"{bad}\"{for_key}"),
            hint,
        );
    }
    if first_line.starts_with("missing field") {
        let names = backticked(first_line);
        let key = names.first().copied().unwrap_or("?");
        let hint = if key == "cluster" {
            "add a [cluster] table with a `name`".to_string()
        } else {
            format!("add `{key} = …` to this table")
        };
        return (
            ErrorKind::Missing,
            format!("missing required key `{key}`"),
            Some(hint),
        );
    }
    if let Some(rest) = first_line.strip_prefix("invalid type: ") {
        let (found, expected) = rest.split_once(", expected ").unwrap_or((rest, "?"));
        let expected = plain_type(expected);
        return (
            ErrorKind::WrongType,
            format!("wrong type{for_key}: expected {expected}, found {found}"),
            type_hint(expected),
        );
    }
    if first_line.starts_with("invalid value: integer") {
        return (
            ErrorKind::OutOfRange,
            format!("number out of range{for_key}: {first_line}"),
            None,
        );
    }
    if first_line.starts_with("duplicate key") {
        return (
            ErrorKind::DuplicateName,
            format!(
                "duplicate key{}: a key may appear once per table",
                key.map(|k| format!(" `{k}`")).unwrap_or_default()
            ),
            Some("remove one of the two, or start a new [[table]] entry first".into()),
        );
    }
    if first_line.contains("is not a valid name")
        || first_line.starts_with("a name ")
        || first_line.starts_with("invalid duration")
    {
        return (
            ErrorKind::BadValue,
            format!("bad value{for_key}: {first_line}"),
            None,
        );
    }
    let message = match key {
        Some(k) => format!("invalid TOML in `{k}`: {first_line}"),
        None => format!("invalid TOML: {first_line}"),
    };
    (
        ErrorKind::Syntax,
        message,
        Some(syntax_hint(first_line).into()),
    )
}

/// How to fix a TOML syntax error, from the parser's message; a general reminder of the
/// syntax when the message is not one of the common mistakes.
fn syntax_hint(msg: &str) -> &'static str {
    const HINTS: &[(&str, &str)] = &[
        (
            "string values must be quoted",
            "put text in double quotes, e.g. name = \"shop\"; a key needs a value after `=`",
        ),
        (
            "key with no value",
            "write `key = value` on one line; to start a table write [name] or [[name]]",
        ),
        (
            "unclosed array table",
            "close the header with `]]`, e.g. [[vm]]",
        ),
        (
            "unclosed table",
            "close the header with `]`, e.g. [cluster]",
        ),
        (
            "unclosed inline table",
            "close the inline table with `}` on the same line, e.g. { path = \"/a\" }",
        ),
        (
            "unclosed array",
            "close the list with `]`, with commas between the items, e.g. [\"a\", \"b\"]",
        ),
        (
            "missing comma",
            "separate the items of a list with commas, e.g. [\"a\", \"b\"]",
        ),
        (
            "extra comma",
            "remove the extra comma: items are separated by exactly one comma",
        ),
        (
            "invalid basic string",
            "close the string with `\"` on the same line (use \"\"\" for text over several lines)",
        ),
        (
            "invalid literal string",
            "close the string with `'` on the same line (use ''' for text over several lines)",
        ),
        (
            "escape",
            "a backslash starts an escape in \"…\" strings: write \\\\ for one backslash, or use '…' for text taken literally",
        ),
        (
            "unexpected key or value, expected newline",
            "one `key = value` per line, nothing after the value but a # comment (no trailing comma; a list goes in brackets)",
        ),
        (
            "invalid boolean",
            "write true or false, in lower case and without quotes",
        ),
        (
            "keys cannot be empty",
            "a key is letters, digits, `-` and `_`, followed by `= value`",
        ),
        (
            "may only go between digits",
            "write whole numbers as plain digits, e.g. 1024; put text in double quotes",
        ),
        (
            "leading zero",
            "write whole numbers without leading zeros, e.g. 12; put text in double quotes",
        ),
        (
            "invalid date",
            "dates are not used in vmha files: put the value in double quotes",
        ),
    ];
    HINTS
        .iter()
        .find(|(pattern, _)| msg.contains(pattern))
        .map_or(
            "check the TOML syntax at the caret: `key = value` per line, text in double quotes, lists in [ ], tables as [name] or [[name]]",
            |(_, hint)| hint,
        )
}

/// The candidate closest to `bad` by edit distance, if close enough to be a typo.
pub(crate) fn suggest<'a>(bad: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let limit = (bad.chars().count() / 3).max(1) + 1;
    candidates
        .iter()
        .map(|c| (edit_distance(bad, c), *c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_close_keys_only() {
        assert_eq!(
            suggest("intervall", &["interval", "timeout"]),
            Some("interval")
        );
        assert_eq!(
            suggest("prority", &["priority", "policy"]),
            Some("priority")
        );
        assert_eq!(suggest("zzzzzz", &["interval", "timeout"]), None);
    }
}
