//! The `:done-when:` gate interpreter. Gates are parsed by `dispatch_plan::gate` and
//! evaluated here against the run directory, by this code and never by a shell.

use std::path::Path;

use dispatch_plan::gate::{self, Check, Gate};

use dispatch_confine as confine;

/// The largest file `grep` reads.
const MAX_GREP_BYTES: u64 = 8 * 1024 * 1024;

/// The outcome of a gate: whether it passed and what decided it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub passed: bool,
    pub detail: String,
}

/// Parses and evaluates `source` in `run_dir`. Anything that does not parse fails
/// closed, with the reason as the detail.
pub fn check(run_dir: &Path, source: &str) -> Outcome {
    match gate::parse(source) {
        Ok(gate) => {
            let (passed, detail) = eval(run_dir, &gate);
            Outcome { passed, detail }
        }
        Err(e) => Outcome {
            passed: false,
            detail: format!("{}: {e}", e.code()),
        },
    }
}

fn eval(run_dir: &Path, gate: &Gate) -> (bool, String) {
    match gate {
        Gate::Check(check) => check_one(run_dir, check),
        Gate::Not(inner) => {
            let (passed, detail) = eval(run_dir, inner);
            (!passed, format!("not ({detail})"))
        }
        Gate::And(a, b) => {
            let (passed, detail) = eval(run_dir, a);
            if !passed {
                return (false, detail);
            }
            eval(run_dir, b)
        }
        Gate::Or(a, b) => {
            let (passed, detail) = eval(run_dir, a);
            if passed {
                return (true, detail);
            }
            let (passed_b, detail_b) = eval(run_dir, b);
            (
                passed_b,
                if passed_b {
                    detail_b
                } else {
                    format!("{detail}; {detail_b}")
                },
            )
        }
    }
}

fn check_one(run_dir: &Path, check: &Check) -> (bool, String) {
    let root = || confine::Root::open(run_dir, "the run directory");
    let meta = |p: &str| {
        root()
            .and_then(|r| r.metadata(p))
            .map_err(|e| e.to_string())
    };
    let verdict = |ok: bool, yes: String, no: String| (ok, if ok { yes } else { no });
    match check {
        // Made through the policy by the service (`call_gate`), never from here.
        Check::Call(call) => (
            false,
            format!("the call gate {} is not checked on files", call.tool),
        ),
        Check::True => (true, "true".into()),
        Check::False => (false, "false".into()),
        Check::NonEmpty(p) => match meta(p) {
            Ok(Some(m)) if m.is_file() && m.len() > 0 => (true, format!("{p} is a non-empty file")),
            Ok(Some(m)) if m.is_file() => (false, format!("{p} is empty")),
            Ok(Some(_)) => (false, format!("{p} is not a file")),
            Ok(None) => (false, format!("{p} does not exist")),
            Err(e) => (false, e),
        },
        Check::IsFile(p) => match meta(p) {
            Ok(m) => verdict(
                m.is_some_and(|m| m.is_file()),
                format!("{p} is a file"),
                format!("{p} is not a file"),
            ),
            Err(e) => (false, e),
        },
        Check::IsDir(p) => match meta(p) {
            Ok(m) => verdict(
                m.is_some_and(|m| m.is_dir()),
                format!("{p} is a directory"),
                format!("{p} is not a directory"),
            ),
            Err(e) => (false, e),
        },
        Check::Exists(p) => match meta(p) {
            Ok(m) => verdict(
                m.is_some(),
                format!("{p} exists"),
                format!("{p} does not exist"),
            ),
            Err(e) => (false, e),
        },
        // `cat`: a file that opens for reading; a directory fails, as real cat fails.
        Check::Readable(p) => match root().and_then(|r| r.open_file(p)) {
            Ok(_) => (true, format!("{p} is readable")),
            Err(e) => (false, format!("cat: {e}")),
        },
        Check::StringNonEmpty(s, _) => {
            let ok = check.constant().unwrap_or(false);
            (ok, format!("string test on {s:?} is {ok}"))
        }
        Check::StringEquals(a, b, _) => {
            let ok = check.constant().unwrap_or(false);
            (ok, format!("string comparison of {a:?} and {b:?} is {ok}"))
        }
        Check::Grep(g) => grep(run_dir, g),
    }
}

fn grep(run_dir: &Path, g: &dispatch_plan::gate::Grep) -> (bool, String) {
    let bytes = match confine::Root::open(run_dir, "the run directory")
        .and_then(|root| root.read(&g.path, MAX_GREP_BYTES))
    {
        Ok(bytes) => bytes,
        Err(e) => return (false, format!("grep: {e}")),
    };
    let text = String::from_utf8_lossy(&bytes);
    let mut pattern = if g.fixed {
        regex::escape(&g.pattern)
    } else if g.extended {
        g.pattern.clone()
    } else {
        basic_to_extended(&g.pattern)
    };
    if g.word {
        pattern = format!(r"\b(?:{pattern})\b");
    }
    if g.line {
        pattern = format!("^(?:{pattern})$");
    }
    let regex = match regex::RegexBuilder::new(&pattern)
        .case_insensitive(g.ignore_case)
        .size_limit(1 << 20)
        .build()
    {
        Ok(regex) => regex,
        Err(e) => {
            return (
                false,
                format!("grep pattern {:?} is invalid: {e}", g.pattern),
            );
        }
    };
    let found = text.lines().any(|line| regex.is_match(line));
    if found {
        (true, format!("{} matches {:?}", g.path, g.pattern))
    } else {
        (false, format!("{} does not match {:?}", g.path, g.pattern))
    }
}

/// Rewrites a POSIX basic regular expression in the syntax of the `regex` crate: in a
/// basic expression `+ ? | ( ) { }` are literal and their escaped forms are operators.
fn basic_to_extended(pattern: &str) -> String {
    const SWAPPED: &[char] = &['+', '?', '|', '(', ')', '{', '}'];
    let mut out = String::with_capacity(pattern.len() + 8);
    let mut chars = pattern.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(next) if SWAPPED.contains(&next) => out.push(next),
                Some(next) => {
                    out.push('\\');
                    out.push(next);
                }
                None => out.push_str("\\\\"),
            },
            c if SWAPPED.contains(&c) => {
                out.push('\\');
                out.push(c);
            }
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("scratch")).unwrap();
        std::fs::write(
            dir.path().join("scratch/REPORT.org"),
            "#+TITLE: x\nTotal: 3 items\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("scratch/empty"), "").unwrap();
        dir
    }

    #[test]
    fn evaluates_the_supported_checks() {
        let dir = run_dir();
        let pass = |g: &str| check(dir.path(), g).passed;
        assert!(pass("test -s scratch/REPORT.org"));
        assert!(!pass("test -s scratch/empty"));
        assert!(pass("test -f scratch/empty && test -d scratch"));
        assert!(pass("grep -q '#+TITLE' scratch/REPORT.org"));
        assert!(pass("grep -qiE 'total: [0-9]+' scratch/REPORT.org"));
        assert!(pass("grep -qi 'total: [0-9]\\+' scratch/REPORT.org"));
        assert!(!pass("grep -qi 'total: [0-9]+' scratch/REPORT.org"));
        assert!(!pass("grep -qF 'total: [0-9]+' scratch/REPORT.org"));
        assert!(pass("grep -qx 'Total: 3 items' scratch/REPORT.org"));
        assert!(pass("test -e scratch/missing || [ -s scratch/REPORT.org ]"));
        assert!(pass("! test -e scratch/missing"));
        assert!(!pass("test -e scratch/missing"));
    }

    #[test]
    fn fails_closed_with_a_reason() {
        let dir = run_dir();
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("scratch/pw")).unwrap();
        let cases = [
            ("curl -sL https://example.com", "unknown_command"),
            ("test -s /etc/passwd", "path_outside_run"),
            ("grep -q root ../../etc/passwd", "path_outside_run"),
            ("test -s scratch/pw", "symlink"),
            ("grep -q root scratch/pw", "symlink"),
            ("test -s scratch/REPORT.org; rm -rf /", "unsupported_syntax"),
            ("grep -qE '(' scratch/REPORT.org", "invalid"),
            // As real cat fails on a directory.
            ("cat scratch", "directory"),
        ];
        for (gate, expect) in cases {
            let outcome = check(dir.path(), gate);
            assert!(!outcome.passed, "{gate} passed");
            assert!(
                outcome.detail.contains(expect),
                "{gate}: {}",
                outcome.detail
            );
        }
    }
}
