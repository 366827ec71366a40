//! What a worker's last answer says about its step: whether the model admits that the
//! step is not done.
//!
//! Once a call's result is in, the worker is told to open such an answer with `NOT
//! DONE:` (told so before any call, the 1.5B model answered it at once, calling no
//! tool, on every errand of the suite). Small models say it
//! in their own words instead ("The step is not done.", "I could not find the file"),
//! and a leaf whose model said so must not pass as done because a file happens to
//! exist. The words are matched in the model's own answer only, never in the step's
//! text; a false match costs a run `blocked` with the model's sentence as its reason,
//! which a person can read, where a miss would call unfinished work done.

use std::sync::OnceLock;

use regex::Regex;

/// The marker the worker prompt asks for.
pub(crate) const MARKER: &str = "NOT DONE:";

/// The most of the admitting sentence a leaf's reason quotes, in characters.
const QUOTED_CHARS: usize = 200;

/// Phrases by which a model says that it did not do what its step asks.
fn admissions() -> &'static Regex {
    static ADMISSIONS: OnceLock<Regex> = OnceLock::new();
    ADMISSIONS.get_or_init(|| {
        Regex::new(
            r"(?ix)
            \b(?:step|task|work|it)\ (?:is|was|has\ been)\ not\ (?:done|finished|complete|completed)\b
            | \b(?:is|was)\ not\ (?:yet\ )?(?:done|finished)\b
            | \bnot\ (?:yet\ )?(?:been\ )?(?:done|completed)\b
            | \bi\ (?:could\ not|couldn't|cannot|can't|can\ not|was\ unable\ to|am\ unable\ to
                    |was\ not\ able\ to|wasn't\ able\ to|am\ not\ able\ to|failed\ to
                    |did\ not\ manage\ to|didn't\ manage\ to)\b
            | \bi'm\ (?:unable|not\ able)\ to\b
            | \b(?:could\ not|couldn't|cannot|can't|unable\ to)\ (?:be\ )?(?:complete|completed|finish|finished|done)\b
            | \b(?:was|is)\ not\ possible\b
            ",
        )
        .expect("the admissions pattern compiles")
    })
}

/// The sentence in which `answer` admits that its step is not done, if it does.
pub(crate) fn admits_unfinished(answer: &str) -> Option<String> {
    // Curly apostrophes as models write them, markdown emphasis around the marker.
    let text = answer.replace(['\u{2019}', '\u{2018}'], "'");
    let opening = text.trim_start_matches(|c: char| c.is_whitespace() || c == '*' || c == '#');
    if opening
        .get(..MARKER.len() - 1)
        .is_some_and(|start| start.eq_ignore_ascii_case(&MARKER[..MARKER.len() - 1]))
    {
        return Some(quote(&text, text.len() - opening.len()));
    }
    let found = admissions().find(&text)?;
    Some(quote(&text, found.start()))
}

/// The sentence of `text` around byte `at`, on one line, cut to [`QUOTED_CHARS`]. A
/// sentence ends at a line end, or at `.`, `!` or `?` before a space (not the dot of
/// `prices.html`).
fn quote(text: &str, at: usize) -> String {
    let bytes = text.as_bytes();
    let ends = |i: usize| {
        bytes[i] == b'\n'
            || (matches!(bytes[i], b'.' | b'!' | b'?')
                && bytes.get(i + 1).is_none_or(|b| b.is_ascii_whitespace()))
    };
    let start = (0..at).rev().find(|&i| ends(i)).map_or(0, |i| i + 1);
    let end = (at..bytes.len())
        .find(|&i| ends(i))
        .map_or(bytes.len(), |i| i + 1);
    let sentence = text[start..end]
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    let mut quoted: String = sentence.chars().take(QUOTED_CHARS).collect();
    if sentence.chars().count() > QUOTED_CHARS {
        quoted.push('…');
    }
    quoted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_that_says_the_step_is_not_done_is_read_as_such() {
        for (answer, quoted) in [
            ("The step is not done.", "The step is not done."),
            (
                "NOT DONE: the folder /srv/docs does not exist",
                "NOT DONE: the folder /srv/docs does not exist",
            ),
            (
                "**Not done:** no file matched.",
                "**Not done:** no file matched.",
            ),
            (
                "I listed the folder. I couldn't find a file that mentions the word.",
                "I couldn't find a file that mentions the word.",
            ),
            (
                "I was unable to read prices.html, so no comparison was made.",
                "I was unable to read prices.html, so no comparison was made.",
            ),
            (
                "The comparison could not be completed because the page was empty.",
                "The comparison could not be completed because the page was empty.",
            ),
            (
                "I can\u{2019}t access that server.",
                "I can't access that server.",
            ),
            (
                "Writing the report was not possible: access denied.",
                "Writing the report was not possible: access denied.",
            ),
            (
                "The report has not been completed yet.",
                "The report has not been completed yet.",
            ),
        ] {
            assert_eq!(
                admits_unfinished(answer).as_deref(),
                Some(quoted),
                "{answer}"
            );
        }
    }

    #[test]
    fn an_answer_that_reports_work_done_is_not_an_admission() {
        for answer in [
            "Finished: Read the notes.",
            "I wrote the summary to scratch/REPORT.org.",
            "Done. The cheaper product is CrateBox at 12.50.",
            "The file notes.org mentions 'kill switch' twice; I listed both lines in the report.",
            "Reading scratch/notes.org.",
            "I compared both prices and noted that shipping is not included.",
            "",
        ] {
            assert_eq!(admits_unfinished(answer), None, "{answer}");
        }
    }

    #[test]
    fn a_long_admission_is_quoted_in_part() {
        let answer = format!("I could not {}.", "x".repeat(500));
        let quoted = admits_unfinished(&answer).unwrap();
        assert_eq!(quoted.chars().count(), QUOTED_CHARS + 1);
        assert!(quoted.starts_with("I could not x"));
    }
}
