//! The one way out to the terminal. Everything the CLI prints goes through here, so no
//! text from a goal, a plan, a model, a tool, a run or the bus can make a terminal do
//! anything but show it (an OSC 52 sequence in a leaf title once set the clipboard).
//!
//! The rule (the same as `dispatch_runlog::one_line` / `many_lines`):
//! - text output ([`outln!`], [`out!`], [`errln!`], [`err!`]) keeps its line feeds and
//!   tabs; every other C0 control, DEL, every C1 control (U+0080–U+009F, U+009B CSI
//!   among them) and every bidirectional formatting character is written as `\u{…}`;
//! - printers that show one record per line (an event, a table row) also put each
//!   untrusted field on one line ([`crate::format::clip`]), so a line feed in a title
//!   cannot forge a line;
//! - JSON output ([`json`]) is serde's (which escapes C0 controls) with DEL, the C1
//!   controls and the bidirectional characters written as `\uXXXX` too: still valid
//!   JSON that reads back to the same values.
//!
//! `clippy.toml` forbids `println!`, `print!`, `eprintln!` and `eprint!` elsewhere in the
//! crate, so a new printer cannot go around this module.

#![allow(clippy::disallowed_macros)]

/// Prints a line on stdout, escaped (see the module docs).
macro_rules! outln {
    () => { $crate::terminal::write_out("\n") };
    ($($arg:tt)*) => { $crate::terminal::write_out(&(format!($($arg)*) + "\n")) };
}

/// Prints on stdout, escaped, without a line feed.
macro_rules! out {
    ($($arg:tt)*) => { $crate::terminal::write_out(&format!($($arg)*)) };
}

/// Prints a line on stderr, escaped.
macro_rules! errln {
    ($($arg:tt)*) => { $crate::terminal::write_err(&(format!($($arg)*) + "\n")) };
}

/// Prints on stderr, escaped, without a line feed (a prompt).
macro_rules! err {
    ($($arg:tt)*) => { $crate::terminal::write_err(&format!($($arg)*)) };
}

/// Writes `text` to stdout, escaped. A closed pipe panics as `print!` does, which
/// `quiet_on_closed_pipe` turns into exit 141.
pub(crate) fn write_out(text: &str) {
    print!("{}", safe(text));
}

/// Writes `text` to stderr, escaped.
pub(crate) fn write_err(text: &str) {
    eprint!("{}", safe(text));
}

/// `value` as pretty JSON on stdout, a line of its own.
pub(crate) fn json(value: &impl serde::Serialize) {
    println!("{}", json_text(value, true));
}

/// `value` as JSON on one line (for a stream of JSON lines).
pub(crate) fn json_line(value: &impl serde::Serialize) -> String {
    json_text(value, false)
}

/// Text as it may reach a terminal: line feeds and tabs kept, all else a terminal acts
/// on escaped.
pub(crate) fn safe(text: &str) -> String {
    dispatch_runlog::many_lines(text)
}

/// JSON without a character a terminal acts on: serde escapes the C0 controls; DEL,
/// C1 controls and bidirectional characters (only ever inside strings) become `\uXXXX`.
pub(crate) fn json_text(value: &impl serde::Serialize, pretty: bool) -> String {
    let text = if pretty {
        serde_json::to_string_pretty(value)
    } else {
        serde_json::to_string(value)
    }
    .expect("what the CLI prints serializes");
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if dispatch_runlog::is_terminal_control(c) && c != '\n' {
            // Outside a string serde writes no control character but the line feeds
            // of pretty printing; inside one, a `\u` escape is the same character.
            out.push_str(&format!("\\u{:04x}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

/// True when `text` holds nothing a terminal would act on but line feeds and tabs.
#[cfg(test)]
pub(crate) fn is_safe(text: &str) -> bool {
    !text
        .chars()
        .any(|c| dispatch_runlog::is_terminal_control(c) && c != '\n' && c != '\t')
}

#[cfg(test)]
pub(crate) mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Characters a hostile model or tool would use on a terminal, and some it would
    /// hide them among.
    pub(crate) const HOSTILE: &[&str] = &[
        "\u{1b}]52;c;aGVsbG8=\u{7}",
        "\u{1b}]52;c;aGVsbG8=\u{1b}\\",
        "\u{1b}[2J",
        "\u{1b}[31m",
        "\u{9b}2J",
        "\u{9d}52;c;eA==\u{9c}",
        "\u{85}",
        "\u{7}",
        "\u{8}",
        "\u{0}",
        "\u{7f}",
        "\r",
        "\n",
        "\r\n",
        "\t",
        "\u{202e}",
        "\u{2066}",
        "\u{2069}",
        "\u{200f}",
        "\u{61c}",
        "\\u{1b}",
        "\"",
        "ok",
        " ",
        "整理",
        "é",
        "%",
        "{}",
    ];

    /// A string made of hostile pieces.
    pub(crate) fn hostile() -> impl Strategy<Value = String> {
        prop::collection::vec(prop::sample::select(HOSTILE), 0..12).prop_map(|p| p.concat())
    }

    proptest! {
        #[test]
        fn text_output_is_safe_and_keeps_its_lines(text in hostile(), any in ".{0,40}") {
            let text = text + &any;
            let shown = safe(&text);
            prop_assert!(is_safe(&shown), "{shown:?}");
            let lines = |t: &str| t.replace("\r\n", "\n").matches('\n').count();
            prop_assert_eq!(lines(&shown), lines(&text));
        }

        #[test]
        fn json_output_is_safe_and_reads_back_the_same(text in hostile(), any in ".{0,40}") {
            let value = serde_json::json!({"text": text + &any, "n": [1, 2]});
            for pretty in [true, false] {
                let shown = json_text(&value, pretty);
                prop_assert!(is_safe(&shown), "{shown:?}");
                prop_assert!(!shown.contains('\t'));
                let back: serde_json::Value = serde_json::from_str(&shown).unwrap();
                prop_assert_eq!(&back, &value);
            }
        }
    }
}
