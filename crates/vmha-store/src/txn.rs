//! Checks shared by every store before a [`ClusterStore::txn`](crate::ClusterStore::txn) touches
//! anything, and key-range helpers.

use crate::store::{Compare, MAX_TXN_OPS, Op, StoreError};

/// The key span one write of a transaction covers.
enum Span<'a> {
    Key(&'a str),
    /// `[start, end)`.
    Range(&'a str, &'a str),
}

impl Span<'_> {
    fn overlaps(&self, other: &Span<'_>) -> bool {
        match (self, other) {
            (Span::Key(a), Span::Key(b)) => a == b,
            (Span::Key(k), Span::Range(s, e)) | (Span::Range(s, e), Span::Key(k)) => {
                s <= k && k < e
            }
            (Span::Range(s1, e1), Span::Range(s2, e2)) => s1 < e2 && s2 < e1,
        }
    }
}

fn invalid(message: String) -> StoreError {
    StoreError::InvalidArgument(message)
}

/// Validates a transaction: at most [`MAX_TXN_OPS`] writes and as many compares, no empty key,
/// every `DeleteRange` with `start < end`, and no key written by two writes (a key inside a
/// `DeleteRange` counts, as do overlapping ranges). Errors are
/// [`StoreError::InvalidArgument`].
pub(crate) fn validate(compares: &[Compare], ops: &[Op]) -> Result<(), StoreError> {
    if ops.len() > MAX_TXN_OPS {
        return Err(invalid(format!(
            "a transaction carries at most {MAX_TXN_OPS} writes, not {}",
            ops.len()
        )));
    }
    if compares.len() > MAX_TXN_OPS {
        return Err(invalid(format!(
            "a transaction carries at most {MAX_TXN_OPS} conditions, not {}",
            compares.len()
        )));
    }
    for compare in compares {
        if compare_key(compare).is_empty() {
            return Err(invalid("empty key in a transaction condition".into()));
        }
    }
    let mut spans: Vec<Span<'_>> = Vec::with_capacity(ops.len());
    for op in ops {
        let span = match op {
            Op::Put { key, .. } | Op::Delete { key } => {
                if key.is_empty() {
                    return Err(invalid("empty key in a transaction write".into()));
                }
                Span::Key(key)
            }
            Op::DeleteRange { start, end } => {
                if start.is_empty() {
                    return Err(invalid("empty start key of a DeleteRange".into()));
                }
                if start >= end {
                    return Err(invalid(format!(
                        "DeleteRange start {start:?} is not before its end {end:?}"
                    )));
                }
                Span::Range(start, end)
            }
        };
        if let Some(clash) = spans.iter().find(|s| s.overlaps(&span)) {
            let name = |s: &Span<'_>| match s {
                Span::Key(k) => format!("{k:?}"),
                Span::Range(s, e) => format!("[{s:?}, {e:?})"),
            };
            return Err(invalid(format!(
                "a transaction writes a key twice: {} and {} overlap",
                name(clash),
                name(&span)
            )));
        }
        spans.push(span);
    }
    Ok(())
}

/// The key a condition is about.
pub(crate) fn compare_key(compare: &Compare) -> &str {
    match compare {
        Compare::Absent { key }
        | Compare::ModRevision { key, .. }
        | Compare::CreateRevision { key, .. } => key,
    }
}

/// The smallest string greater than every string starting with `prefix`, or `None` if there is
/// none (the empty prefix, or one made only of `char::MAX`). UTF-8 preserves code point order, so
/// this is also the byte-order bound.
pub(crate) fn prefix_end(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        let next = (u32::from(last) + 1..=u32::from(char::MAX)).find_map(char::from_u32);
        if let Some(next) = next {
            chars.push(next);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn put(key: &str) -> Op {
        Op::Put {
            key: key.into(),
            value: Vec::new(),
            lease: None,
        }
    }

    fn range(start: &str, end: &str) -> Op {
        Op::DeleteRange {
            start: start.into(),
            end: end.into(),
        }
    }

    #[test]
    fn overlapping_writes_are_refused() {
        assert!(validate(&[], &[put("a"), put("b"), range("c", "d")]).is_ok());
        assert!(validate(&[], &[put("a"), put("a")]).is_err());
        assert!(validate(&[], &[put("b"), range("a", "c")]).is_err());
        assert!(
            validate(&[], &[range("a", "c"), put("c")]).is_ok(),
            "end excluded"
        );
        assert!(validate(&[], &[range("a", "c"), range("b", "d")]).is_err());
        assert!(validate(&[], &[range("a", "b"), range("b", "c")]).is_ok());
        assert!(validate(&[], &[range("b", "b")]).is_err());
        assert!(validate(&[], &[range("", "b")]).is_err());
        assert!(validate(&[], &[put("")]).is_err());
        let many: Vec<Op> = (0..=MAX_TXN_OPS).map(|i| put(&i.to_string())).collect();
        assert!(validate(&[], &many).is_err());
        assert!(validate(&[], &many[1..]).is_ok());
    }

    #[test]
    fn prefix_end_bounds_the_prefix() {
        assert_eq!(prefix_end("/a/").as_deref(), Some("/a0"));
        assert_eq!(prefix_end(""), None);
        assert_eq!(prefix_end("a\u{10FFFF}").as_deref(), Some("b"));
        assert_eq!(prefix_end("\u{D7FF}").as_deref(), Some("\u{E000}"));
        assert_eq!(prefix_end("\u{10FFFF}"), None);
    }
}
