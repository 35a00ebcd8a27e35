//! Configuration errors that point at the offending line and key.

use std::fmt;
use std::ops::Range;

/// The class of a configuration error (stable, for tests and tools).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The file could not be read.
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
                col = self.column
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
    /// The file is invalid; the diagnostic says where and why.
    #[error("{0}")]
    Invalid(Box<Diagnostic>),
}

impl ConfigError {
    /// The diagnostic, when the file was readable.
    pub fn diagnostic(&self) -> Option<&Diagnostic> {
        match self {
            ConfigError::Invalid(d) => Some(d),
            ConfigError::Io { .. } => None,
        }
    }

    /// The error class.
    pub fn kind(&self) -> ErrorKind {
        match self {
            ConfigError::Invalid(d) => d.kind,
            ConfigError::Io { .. } => ErrorKind::Io,
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
        let source_line = self.text[line_start..]
            .lines()
            .next()
            .unwrap_or("")
            .to_string();
        ConfigError::Invalid(Box::new(Diagnostic {
            file: self.file.to_string(),
            line,
            column,
            kind,
            message: message.into(),
            hint,
            source_line,
        }))
    }

    /// Converts a TOML/serde error, classifying it and suggesting the closest known key or value.
    pub(crate) fn from_toml(&self, err: &toml::de::Error) -> ConfigError {
        let span = err.span().unwrap_or(0..0);
        let msg = err.message().trim().to_string();
        let (kind, message, hint) = classify(&msg);
        self.error(span, kind, message, hint)
    }
}

fn backticked(s: &str) -> Vec<&str> {
    s.split('`').skip(1).step_by(2).collect()
}

fn classify(msg: &str) -> (ErrorKind, String, Option<String>) {
    let first_line = msg.lines().next().unwrap_or(msg);
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
            format!("unknown value \"{bad}\""),
            hint,
        );
    }
    if first_line.starts_with("missing field") {
        let names = backticked(first_line);
        let key = names.first().copied().unwrap_or("?");
        return (
            ErrorKind::Missing,
            format!("missing required key `{key}`"),
            Some(format!("add `{key} = …` to this table")),
        );
    }
    if first_line.starts_with("invalid type") {
        return (ErrorKind::WrongType, first_line.to_string(), None);
    }
    if first_line.starts_with("duplicate key") {
        return (ErrorKind::DuplicateName, first_line.to_string(), None);
    }
    if first_line.starts_with("invalid name") || first_line.contains("is not a valid name") {
        return (ErrorKind::BadValue, first_line.to_string(), None);
    }
    if first_line.starts_with("invalid duration") {
        return (ErrorKind::BadValue, first_line.to_string(), None);
    }
    (ErrorKind::Syntax, first_line.to_string(), None)
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
