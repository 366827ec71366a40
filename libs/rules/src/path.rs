//! Paths as the `path_prefix` condition reads them: strictly for a rule that allows,
//! every way a tool might for a rule that stops.
//!
//! Strictly, a path is read as written and percent-decoded once (a tool may do
//! either), and both readings must lie under the prefix. What a tool could read
//! another way is refused rather than guessed at: anything still percent-encoded
//! after one decoding, a backslash, a `.` or `..` step, a control character, a
//! non-ASCII character that is not a letter (lookalikes of `/` and `.` such as
//! `／`, `∕`, `․`, and invisible ones), bytes that do not decode to UTF-8, and
//! paths longer than [`MAX_PATH_BYTES`]. Empty steps (`a//b`, a trailing `/`) are
//! dropped, as every file system does.
//!
//! Every reading, for a rule that denies or asks, is each of: as written, decoded once and
//! twice, with backslashes as separators, with fullwidth forms as ASCII, `..` resolved
//! step by step; a relative path that climbs above where it starts could be
//! anywhere.
//!
//! Percent-decoding is the `percent-encoding` crate's; the rest is splitting on `/`
//! and comparing steps, which no crate does more simply.

use percent_encoding::percent_decode_str;

/// The longest path read (Linux's `PATH_MAX`).
pub(crate) const MAX_PATH_BYTES: usize = 4096;

/// A path as steps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Steps {
    pub absolute: bool,
    pub steps: Vec<String>,
}

impl Steps {
    /// Whether this path is `prefix` or lies under it.
    pub fn is_under(&self, prefix: &Steps) -> bool {
        self.absolute == prefix.absolute
            && self.steps.len() >= prefix.steps.len()
            && self.steps.iter().zip(&prefix.steps).all(|(a, b)| a == b)
    }
}

/// A rule's prefix, as its author wrote it: `.` and empty steps dropped; `None` if it
/// climbs with `..` or holds a backslash or a control character.
pub(crate) fn prefix(text: &str) -> Option<Steps> {
    if text.contains('\\') || text.chars().any(char::is_control) {
        return None;
    }
    let mut steps = Vec::new();
    for step in text.split('/') {
        match step {
            "" | "." => {}
            ".." => return None,
            step => steps.push(step.to_owned()),
        }
    }
    Some(Steps {
        absolute: text.starts_with('/'),
        steps,
    })
}

/// The readings of `raw` that must all lie under a prefix for a rule that allows, or
/// why it is refused.
pub(crate) fn strict(raw: &str) -> Result<Vec<Steps>, &'static str> {
    if raw.is_empty() {
        return Err("empty");
    }
    if raw.len() > MAX_PATH_BYTES {
        return Err("too long");
    }
    plain(raw)?;
    let decoded = percent_decode_str(raw)
        .decode_utf8()
        .map_err(|_| "percent-encodes bytes that are not UTF-8")?;
    plain(&decoded)?;
    if decoded.contains('%') {
        return Err("still percent-encoded after decoding");
    }
    let mut readings = vec![steps_strict(raw)?];
    if decoded != raw {
        readings.push(steps_strict(&decoded)?);
    }
    Ok(readings)
}

/// Refuses characters a tool might read as something else.
fn plain(text: &str) -> Result<(), &'static str> {
    for c in text.chars() {
        if c == '\\' {
            return Err("holds a backslash");
        }
        if c.is_control() {
            return Err("holds a control character");
        }
        if !c.is_ascii() && !c.is_alphabetic() {
            return Err("holds a character that is neither ASCII nor a letter");
        }
    }
    Ok(())
}

fn steps_strict(text: &str) -> Result<Steps, &'static str> {
    let mut steps = Vec::new();
    for step in text.split('/') {
        match step {
            "" => {}
            "." | ".." => return Err("has a '.' or '..' step"),
            step => steps.push(step.to_owned()),
        }
    }
    Ok(Steps {
        absolute: text.starts_with('/'),
        steps,
    })
}

/// A reading for a rule that stops: the steps, or `None` for a relative path that
/// climbs above where it starts (it could be anywhere).
pub(crate) fn readings(raw: &str) -> Vec<Option<Steps>> {
    let raw = if raw.len() > MAX_PATH_BYTES {
        // Long text is still read, as far as a path can go.
        let mut end = MAX_PATH_BYTES;
        while !raw.is_char_boundary(end) {
            end -= 1;
        }
        &raw[..end]
    } else {
        raw
    };
    let once = percent_decode_str(raw).decode_utf8_lossy().into_owned();
    let twice = percent_decode_str(&once).decode_utf8_lossy().into_owned();
    let mut texts = vec![raw.to_owned(), once, twice];
    for i in 0..texts.len() {
        let backslashed = texts[i].replace('\\', "/");
        let narrowed = ascii_of_fullwidth(&backslashed);
        texts.push(backslashed);
        texts.push(narrowed);
    }
    texts.sort();
    texts.dedup();
    texts.iter().map(|t| steps_resolved(t)).collect()
}

/// `..` resolved against the steps before it; `None` when a relative path climbs
/// above its start. An absolute path cannot climb above `/`.
fn steps_resolved(text: &str) -> Option<Steps> {
    let absolute = text.starts_with('/');
    let mut steps: Vec<String> = Vec::new();
    for step in text.split('/') {
        match step {
            "" | "." => {}
            ".." => {
                if steps.pop().is_none() && !absolute {
                    return None;
                }
            }
            step => steps.push(step.to_owned()),
        }
    }
    Some(Steps { absolute, steps })
}

/// Fullwidth forms (U+FF01–U+FF5E: `／`, `．`, `ｅ`, …) as the ASCII they stand for.
fn ascii_of_fullwidth(text: &str) -> String {
    text.chars()
        .map(|c| match c as u32 {
            0xFF01..=0xFF5E => char::from_u32(c as u32 - 0xFEE0).unwrap_or(c),
            _ => c,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn steps(absolute: bool, s: &[&str]) -> Steps {
        Steps {
            absolute,
            steps: s.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    #[test]
    fn strict_readings_refuse_what_could_be_read_otherwise() {
        assert_eq!(
            strict("scratch//a/").unwrap(),
            vec![steps(false, &["scratch", "a"])]
        );
        assert_eq!(
            strict("scratch/a%20b").unwrap(),
            vec![
                steps(false, &["scratch", "a%20b"]),
                steps(false, &["scratch", "a b"])
            ]
        );
        assert_eq!(strict("scratch/résumé").unwrap().len(), 1);
        for (bad, why) in [
            ("", "empty"),
            ("scratch/%2e%2e/x", "'.'"),
            ("scratch/%252e%252e/x", "still percent-encoded"),
            ("scratch/%ff", "not UTF-8"),
            ("scratch/\\..\\..\\x", "backslash"),
            ("scratch/%5c..", "backslash"),
            ("./scratch/a", "'.'"),
            ("scratch/../x", "'.'"),
            ("scratch/a\n", "control"),
            ("scratch/a\u{0}", "control"),
            ("scratch\u{ff0f}..\u{ff0f}x", "neither ASCII nor a letter"),
            ("scratch/\u{2024}\u{2024}/x", "neither ASCII nor a letter"),
            ("scratch\u{2215}x", "neither ASCII nor a letter"),
            ("scratch/\u{200b}", "neither ASCII nor a letter"),
        ] {
            let err = strict(bad).unwrap_err();
            assert!(err.contains(why), "{bad:?}: {err}");
        }
        assert!(strict(&"a/".repeat(MAX_PATH_BYTES)).is_err());
    }

    #[test]
    fn every_reading_finds_where_a_tool_might_go() {
        let under_etc = |raw: &str| {
            let etc = prefix("/etc").unwrap();
            readings(raw)
                .iter()
                .any(|r| r.as_ref().is_none_or(|r| r.is_under(&etc)))
        };
        for raw in [
            "/etc/shadow",
            "/tmp/../etc/shadow",
            "/tmp/%2e%2e/etc/x",
            "/tmp/%252e%252e/etc/x",
            "\\etc\\shadow",
            "/tmp/..\\..\\etc/x",
            "\u{ff0f}etc\u{ff0f}shadow",
            "/../../etc/x",
            "../x",
        ] {
            assert!(under_etc(raw), "{raw}");
        }
        for raw in ["/tmp/etc/x", "etc/x", "/etcetera", "hello"] {
            assert!(!under_etc(raw), "{raw}");
        }
    }
}
