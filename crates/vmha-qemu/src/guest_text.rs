//! Guest-derived text made safe for errors, logs, events and API answers.
//!
//! A guest controls every byte it sends. Before any of it reaches a human or a log line it is
//! cut to [`MAX_GUEST_TEXT`] characters and every control character (general category `Cc`),
//! format character (`Cf`: bidi overrides such as U+202E, zero-width U+200B, U+FEFF, …) and
//! line or paragraph separator (`Zl`/`Zp`: U+2028, U+2029) becomes a space: no terminal escape,
//! forged log line or text that reads differently from what it is.

/// Longest guest-derived text kept, in characters (a `…` marks a cut).
pub const MAX_GUEST_TEXT: usize = 200;

/// The characters of general category `Cf` (Unicode 15), as inclusive ranges.
const FORMAT: &[(u32, u32)] = &[
    (0x00AD, 0x00AD),
    (0x0600, 0x0605),
    (0x061C, 0x061C),
    (0x06DD, 0x06DD),
    (0x070F, 0x070F),
    (0x0890, 0x0891),
    (0x08E2, 0x08E2),
    (0x180E, 0x180E),
    (0x200B, 0x200F),
    (0x202A, 0x202E),
    (0x2060, 0x2064),
    (0x2066, 0x206F),
    (0xFEFF, 0xFEFF),
    (0xFFF9, 0xFFFB),
    (0x110BD, 0x110BD),
    (0x110CD, 0x110CD),
    (0x13430, 0x1343F),
    (0x1BCA0, 0x1BCA3),
    (0x1D173, 0x1D17A),
    (0xE0001, 0xE0001),
    (0xE0020, 0xE007F),
];

/// True for characters that must never reach a log, event or answer: `Cc`, `Cf`, `Zl`, `Zp`.
pub fn is_unsafe(c: char) -> bool {
    let u = u32::from(c);
    c.is_control()
        || u == 0x2028
        || u == 0x2029
        || FORMAT.iter().any(|&(lo, hi)| (lo..=hi).contains(&u))
}

/// `text` cut to [`MAX_GUEST_TEXT`] characters (plus `…` if cut), every unsafe character
/// (see [`is_unsafe`]) replaced by a space. Reads at most `MAX_GUEST_TEXT + 1` characters.
pub fn guest_text(text: &str) -> String {
    let mut chars = text.chars();
    let mut out: String = chars
        .by_ref()
        .take(MAX_GUEST_TEXT)
        .map(|c| if is_unsafe(c) { ' ' } else { c })
        .collect();
    if chars.next().is_some() {
        out.push('…');
    }
    out
}

/// [`guest_text`] of bytes that may not be UTF-8 (invalid sequences become U+FFFD).
pub fn guest_bytes(bytes: &[u8]) -> String {
    // Four bytes per character at most: decode only what can be kept (+1 char to see a cut).
    let head = &bytes[..bytes.len().min((MAX_GUEST_TEXT + 1) * 4)];
    let mut out = guest_text(&String::from_utf8_lossy(head));
    if head.len() < bytes.len() && !out.ends_with('…') {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removes_control_format_and_separators() {
        let hostile =
            "a\u{1b}[2Jb\u{202E}c\u{2028}d\u{2029}e\u{200B}f\u{FEFF}g\u{7f}h\u{85}i\u{E0041}j";
        let out = guest_text(hostile);
        assert_eq!(out, "a [2Jb c d e f g h i j");
        assert!(!out.chars().any(is_unsafe));
    }

    #[test]
    fn keeps_ordinary_text_and_caps_it() {
        assert_eq!(guest_text("Grüße, 世界 ok"), "Grüße, 世界 ok");
        let long = "x".repeat(10_000);
        let out = guest_text(&long);
        assert_eq!(out.chars().count(), MAX_GUEST_TEXT + 1);
        assert!(out.ends_with('…'));
        assert_eq!(
            guest_text(&"y".repeat(MAX_GUEST_TEXT)),
            "y".repeat(MAX_GUEST_TEXT)
        );
    }

    #[test]
    fn bytes_are_capped_before_decoding() {
        let out = guest_bytes(&vec![0xFF; 1 << 20]);
        assert!(out.chars().count() <= MAX_GUEST_TEXT + 1);
        assert!(out.ends_with('…'));
        assert_eq!(guest_bytes(b"ok\n"), "ok ");
    }
}
