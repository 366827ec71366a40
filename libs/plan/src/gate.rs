//! The `:done-when:` gate language: a tiny, closed subset of shell.
//!
//! A gate is untrusted input written by a model, so it is parsed here into a [`Gate`]
//! and never handed to a shell. What parses: `test`/`[ ]` with `-s -f -d -e -r -n -z`
//! and `=`/`!=`, `grep` with `-q -i -F -E -w -x` (combinable), `true`, `false`, `ls`,
//! `cat`, joined by `&&`/`||` (left to right, as in sh) and prefixed by `!`. Anything
//! else (an unknown command, pipes, redirections, `$`, globs, paths leaving the run
//! directory) is an error, so the gate fails closed.
//!
//! What a run did outside its directory is seen by a gate of another form, whole on
//! its own: `call <connector.tool> <json> [contains <text>]`, a read-only tool call
//! made through the policy like any other ([`CallCheck`]).
//!
//! A gate is also bounded: at most [`MAX_GATE_BYTES`] bytes and [`MAX_COMMANDS`]
//! commands, and `!` may not be stacked more than [`MAX_NEGATIONS`] deep. The parser
//! never recurses, and the bounds keep the tree shallow enough that walking it cannot
//! exhaust a stack, whatever a model writes.

use std::fmt;

/// The longest gate accepted, in bytes: a gate is one line.
pub const MAX_GATE_BYTES: usize = 1024;
/// The most commands one gate may join with `&&` and `||`.
pub const MAX_COMMANDS: usize = 16;
/// The most `!` that may stand before one command.
pub const MAX_NEGATIONS: usize = 4;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GateError {
    #[error(
        "unknown command {0:?}: gates may use test, [, grep, ls, cat, true, false, or be one `call <tool> <json>` of a read-only tool"
    )]
    UnknownCommand(String),
    #[error("unsupported shell syntax {0:?}: gates are not run by a shell")]
    Unsupported(String),
    #[error("path {0:?} is outside the run directory")]
    PathOutsideRun(String),
    #[error("{0}")]
    Syntax(String),
    #[error("{0}")]
    TooLarge(String),
}

impl GateError {
    pub fn code(&self) -> &'static str {
        match self {
            GateError::UnknownCommand(_) => "unknown_command",
            GateError::Unsupported(_) => "unsupported_syntax",
            GateError::PathOutsideRun(_) => "path_outside_run",
            GateError::Syntax(_) => "gate_syntax",
            GateError::TooLarge(_) => "gate_too_large",
        }
    }
}

/// A parsed gate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gate {
    Check(Check),
    Not(Box<Gate>),
    And(Box<Gate>, Box<Gate>),
    Or(Box<Gate>, Box<Gate>),
}

/// One command of a gate. Paths are relative to the run directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    True,
    False,
    /// `test -s`: exists, is a file, and is not empty.
    NonEmpty(String),
    /// `test -f`
    IsFile(String),
    /// `test -d`, `ls`
    IsDir(String),
    /// `test -e`, `test -r`, `ls`
    Exists(String),
    /// `cat`: a readable file.
    Readable(String),
    /// `test -n` (true) / `test -z` (false)
    StringNonEmpty(String, bool),
    /// `test a = b` (true) / `test a != b` (false)
    StringEquals(String, String, bool),
    Grep(Grep),
    /// `call <connector.tool> <json> [contains <text>]`: passes when the read-only call
    /// succeeds (and its result holds the text). It is a whole gate on its own, checked
    /// through the policy and run by the connectors, never by this interpreter.
    Call(CallCheck),
}

impl Check {
    /// The check's result when it looks at nothing but its own text; `None` when it
    /// looks at the world (a file, a tool).
    pub fn constant(&self) -> Option<bool> {
        match self {
            Check::True => Some(true),
            Check::False => Some(false),
            Check::StringNonEmpty(s, want) => Some(s.is_empty() != *want),
            Check::StringEquals(a, b, want) => Some((a == b) == *want),
            _ => None,
        }
    }
}

/// A gate that asks a read-only tool what the run did outside its own directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallCheck {
    /// The namespaced tool, `fs.get_file_info`.
    pub tool: String,
    /// The arguments: one JSON object, as written.
    pub args_json: String,
    /// Text the call's result must hold, if any.
    pub contains: Option<String>,
}

/// The word a call gate starts with.
pub const CALL: &str = "call";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grep {
    pub pattern: String,
    pub path: String,
    pub ignore_case: bool,
    pub fixed: bool,
    pub word: bool,
    pub line: bool,
    /// `-E`: the pattern is an extended regular expression; otherwise it is a basic
    /// one, where `+ ? | ( ) { }` are literal unless escaped, as in grep.
    pub extended: bool,
}

/// Parses a gate, checking its syntax, its commands and that its paths stay inside
/// the run directory.
pub fn parse(source: &str) -> Result<Gate, GateError> {
    if source.len() > MAX_GATE_BYTES {
        return Err(GateError::TooLarge(format!(
            "the gate is {} bytes; a gate may be at most {MAX_GATE_BYTES}",
            source.len()
        )));
    }
    if let Some(rest) = source.trim_start().strip_prefix(CALL)
        && rest.starts_with(char::is_whitespace)
    {
        return call(rest).map(Gate::Check);
    }
    // `fs.get_file_info {"path": …}`: a tool and its arguments with `call` left out, as
    // small models write it; no command of the file checks has a dot in its name.
    let trimmed = source.trim_start();
    let first = trimmed.split_whitespace().next().unwrap_or_default();
    if first.contains('.') && trimmed[first.len()..].trim_start().starts_with('{') {
        return call(trimmed).map(Gate::Check);
    }
    let tokens = tokenize(source)?;
    let operators = tokens
        .iter()
        .filter(|t| matches!(t, Token::And | Token::Or))
        .count();
    if operators >= MAX_COMMANDS {
        return Err(GateError::TooLarge(format!(
            "the gate joins {} commands; a gate may join at most {MAX_COMMANDS}",
            operators + 1
        )));
    }
    if tokens.is_empty() {
        return Err(GateError::Syntax("the gate is empty".into()));
    }
    let mut parser = Parser { tokens, pos: 0 };
    let gate = parser.list()?;
    if let Some(extra) = parser.tokens.get(parser.pos) {
        return Err(GateError::Syntax(format!("unexpected {extra}")));
    }
    Ok(gate)
}

/// What a gate that looks outside the run meant to check, when it is one plain
/// command on one absolute path: that a file is there (`test -s /srv/a`, `[ -f /srv/a ]`,
/// `ls`, `cat`), or that it holds a word (`grep -q v1.0 /srv/a`). Such a gate can never
/// pass (the file checks see only the run directory); the author is shown it written as
/// a `call` of a read-only tool instead, which a small model copies where it ignores
/// advice in general terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outside {
    pub path: String,
    /// The text a `grep` looked for, when it is plain text a `contains` can look for.
    pub holds: Option<String>,
}

/// [`Outside`] of `source`, if it is such a gate.
pub fn outside(source: &str) -> Option<Outside> {
    let words: Vec<String> = tokenize(source)
        .ok()?
        .into_iter()
        .map(|token| match token {
            Token::Word(word) => Some(word),
            _ => None,
        })
        .collect::<Option<_>>()?;
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    let (path, holds) = match words.as_slice() {
        ["test", "-s" | "-f" | "-e" | "-r", path]
        | ["[", "-s" | "-f" | "-e" | "-r", path, "]"]
        | ["ls" | "cat", path] => (*path, None),
        ["grep", rest @ ..] => {
            let (options, operands): (Vec<&str>, Vec<&str>) =
                rest.iter().partition(|word| word.starts_with('-'));
            let plain = |word: &str| {
                !word.is_empty()
                    && !word.contains([
                        '"', '\\', '[', ']', '*', '^', '$', '+', '?', '|', '(', ')', '{', '}',
                    ])
            };
            match operands.as_slice() {
                [word, path]
                    if plain(word) && options.iter().all(|o| matches!(*o, "-q" | "-F" | "-s")) =>
                {
                    (*path, Some((*word).to_owned()))
                }
                _ => return None,
            }
        }
        _ => return None,
    };
    path.starts_with('/').then(|| Outside {
        path: path.to_owned(),
        holds,
    })
}

/// `<connector.tool> <json object> [contains <text>]`, after `call`.
fn call(rest: &str) -> Result<Check, GateError> {
    let rest = rest.trim_start();
    let (tool, rest) = rest
        .split_once(char::is_whitespace)
        .ok_or_else(|| GateError::Syntax("call takes a tool and its arguments as JSON".into()))?;
    let named = tool.split_once('.').is_some_and(|(connector, name)| {
        let ok = |part: &str| {
            !part.is_empty()
                && part.len() <= 64
                && part
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        ok(connector) && ok(name)
    });
    if !named {
        return Err(GateError::Syntax(format!(
            "call names {tool:?}; a tool is named <connector>.<tool>, as the catalogue lists it"
        )));
    }
    let mut values = serde_json::Deserializer::from_str(rest).into_iter::<serde_json::Value>();
    let args = match values.next() {
        Some(Ok(value @ serde_json::Value::Object(_))) => value,
        Some(Ok(_)) | None => {
            return Err(GateError::Syntax(
                "call's arguments are one JSON object, such as {\"path\": \"/srv/a.txt\"}".into(),
            ));
        }
        Some(Err(e)) => {
            return Err(GateError::Syntax(format!(
                "call's arguments are not JSON: {e}"
            )));
        }
    };
    let after = rest[values.byte_offset()..].trim();
    let contains = match after {
        "" => None,
        _ => {
            let text = after
                .strip_prefix("contains")
                .filter(|t| t.starts_with(char::is_whitespace))
                .map(str::trim)
                .ok_or_else(|| {
                    GateError::Syntax(format!(
                        "unexpected {after:?} after the call's arguments; only `contains <text>` may follow"
                    ))
                })?;
            let unquoted = match text.as_bytes() {
                [b'"', .., b'"'] | [b'\'', .., b'\''] if text.len() >= 2 => {
                    &text[1..text.len() - 1]
                }
                _ => text,
            };
            if unquoted.is_empty() {
                return Err(GateError::Syntax(
                    "contains needs the text to look for".into(),
                ));
            }
            Some(unquoted.to_owned())
        }
    };
    Ok(Check::Call(CallCheck {
        tool: tool.to_owned(),
        args_json: args.to_string(),
        contains,
    }))
}

impl Gate {
    /// The call this gate makes, if it is a call gate.
    pub fn call(&self) -> Option<&CallCheck> {
        match self {
            Gate::Check(Check::Call(call)) => Some(call),
            _ => None,
        }
    }

    /// True when the gate passes whatever the step did: `true`, `! false`, `test -n x`,
    /// `test -s a || true`. Each check that looks at the world is taken as able to go
    /// either way, so this finds every gate that passes on its constants alone.
    pub fn passes_whatever_happens(&self) -> bool {
        !self.outcomes().1
    }

    /// Whether the gate can pass, and whether it can fail.
    fn outcomes(&self) -> (bool, bool) {
        match self {
            Gate::Check(check) => match check.constant() {
                Some(value) => (value, !value),
                None => (true, true),
            },
            Gate::Not(inner) => {
                let (pass, fail) = inner.outcomes();
                (fail, pass)
            }
            Gate::And(a, b) => {
                let ((a_pass, a_fail), (b_pass, b_fail)) = (a.outcomes(), b.outcomes());
                (a_pass && b_pass, a_fail || b_fail)
            }
            Gate::Or(a, b) => {
                let ((a_pass, a_fail), (b_pass, b_fail)) = (a.outcomes(), b.outcomes());
                (a_pass || b_pass, a_fail && b_fail)
            }
        }
    }

    /// Every path the gate looks at, in order.
    pub fn paths(&self) -> Vec<&str> {
        let mut out = Vec::new();
        self.walk(&mut |check| match check {
            Check::NonEmpty(p)
            | Check::IsFile(p)
            | Check::IsDir(p)
            | Check::Exists(p)
            | Check::Readable(p) => out.push(p.as_str()),
            Check::Grep(g) => out.push(g.path.as_str()),
            _ => {}
        });
        out
    }

    /// Visits every check in the gate.
    pub fn walk<'a>(&'a self, f: &mut impl FnMut(&'a Check)) {
        match self {
            Gate::Check(check) => f(check),
            Gate::Not(inner) => inner.walk(f),
            Gate::And(a, b) | Gate::Or(a, b) => {
                a.walk(f);
                b.walk(f);
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Word(String),
    And,
    Or,
    Bang,
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Token::Word(w) => write!(f, "{w:?}"),
            Token::And => f.write_str("&&"),
            Token::Or => f.write_str("||"),
            Token::Bang => f.write_str("!"),
        }
    }
}

fn tokenize(source: &str) -> Result<Vec<Token>, GateError> {
    let mut tokens = Vec::new();
    let mut chars = source.chars().peekable();
    let mut word: Option<String> = None;
    let unsupported = |s: &str| Err(GateError::Unsupported(s.to_owned()));
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {
                if let Some(w) = word.take() {
                    tokens.push(Token::Word(w));
                }
            }
            '&' if chars.peek() == Some(&'&') => {
                chars.next();
                if let Some(w) = word.take() {
                    tokens.push(Token::Word(w));
                }
                tokens.push(Token::And);
            }
            '|' if chars.peek() == Some(&'|') => {
                chars.next();
                if let Some(w) = word.take() {
                    tokens.push(Token::Word(w));
                }
                tokens.push(Token::Or);
            }
            '!' if word.is_none() && chars.peek().is_none_or(|c| c.is_whitespace()) => {
                tokens.push(Token::Bang);
            }
            '\'' => {
                let w = word.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => w.push(c),
                        None => return Err(GateError::Syntax("unterminated ' quote".into())),
                    }
                }
            }
            '"' => {
                let w = word.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\' | '$' | '`')) => w.push(c),
                            Some(c) => {
                                w.push('\\');
                                w.push(c);
                            }
                            None => return Err(GateError::Syntax("unterminated \" quote".into())),
                        },
                        Some('$') => return unsupported("$"),
                        Some('`') => return unsupported("`"),
                        Some(c) => w.push(c),
                        None => return Err(GateError::Syntax("unterminated \" quote".into())),
                    }
                }
            }
            '\\' => match chars.next() {
                Some(c) => word.get_or_insert_with(String::new).push(c),
                None => return Err(GateError::Syntax("trailing backslash".into())),
            },
            '|' => return unsupported("|"),
            '&' => return unsupported("&"),
            ';' | '<' | '>' | '(' | ')' | '$' | '`' | '*' | '?' | '{' | '}' | '~' => {
                return unsupported(&c.to_string());
            }
            c => word.get_or_insert_with(String::new).push(c),
        }
    }
    if let Some(w) = word {
        tokens.push(Token::Word(w));
    }
    Ok(tokens)
}

struct Parser {
    tokens: Vec<Token>,
    pos: usize,
}

impl Parser {
    fn list(&mut self) -> Result<Gate, GateError> {
        let mut left = self.pipeline()?;
        loop {
            match self.tokens.get(self.pos) {
                Some(Token::And) => {
                    self.pos += 1;
                    left = Gate::And(Box::new(left), Box::new(self.pipeline()?));
                }
                Some(Token::Or) => {
                    self.pos += 1;
                    left = Gate::Or(Box::new(left), Box::new(self.pipeline()?));
                }
                _ => return Ok(left),
            }
        }
    }

    fn pipeline(&mut self) -> Result<Gate, GateError> {
        let mut negations = 0;
        while self.tokens.get(self.pos) == Some(&Token::Bang) {
            self.pos += 1;
            negations += 1;
        }
        if negations > MAX_NEGATIONS {
            return Err(GateError::TooLarge(format!(
                "{negations} `!` before one command; at most {MAX_NEGATIONS}"
            )));
        }
        let mut gate = self.command()?;
        for _ in 0..negations {
            gate = Gate::Not(Box::new(gate));
        }
        Ok(gate)
    }

    fn command(&mut self) -> Result<Gate, GateError> {
        let start = self.pos;
        while let Some(Token::Word(_)) = self.tokens.get(self.pos) {
            self.pos += 1;
        }
        let words: Vec<String> = self.tokens[start..self.pos]
            .iter()
            .map(|t| match t {
                Token::Word(w) => w.clone(),
                _ => unreachable!("only words were taken"),
            })
            .collect();
        if words.is_empty() {
            let found = self
                .tokens
                .get(self.pos)
                .map_or("the end".to_owned(), |t| t.to_string());
            return Err(GateError::Syntax(format!(
                "expected a command before {found}"
            )));
        }
        command(&words).map(Gate::Check)
    }
}

fn command(words: &[String]) -> Result<Check, GateError> {
    let args: Vec<&str> = words[1..].iter().map(String::as_str).collect();
    match words[0].as_str() {
        "true" if args.is_empty() => Ok(Check::True),
        "false" if args.is_empty() => Ok(Check::False),
        "test" => test(&args),
        "[" => match args.split_last() {
            Some((&"]", inner)) => test(inner),
            _ => Err(GateError::Syntax("`[` without a closing `]`".into())),
        },
        "grep" => grep(&args),
        "ls" => match args.as_slice() {
            [path] => Ok(Check::Exists(path_arg(path)?)),
            _ => Err(GateError::Syntax("ls takes exactly one path".into())),
        },
        "cat" => match args.as_slice() {
            [path] => Ok(Check::Readable(path_arg(path)?)),
            _ => Err(GateError::Syntax("cat takes exactly one path".into())),
        },
        other => Err(GateError::UnknownCommand(other.to_owned())),
    }
}

fn test(args: &[&str]) -> Result<Check, GateError> {
    match args {
        ["-s", p] => Ok(Check::NonEmpty(path_arg(p)?)),
        ["-f", p] => Ok(Check::IsFile(path_arg(p)?)),
        ["-d", p] => Ok(Check::IsDir(path_arg(p)?)),
        ["-e", p] | ["-r", p] => Ok(Check::Exists(path_arg(p)?)),
        ["-n", s] => Ok(Check::StringNonEmpty((*s).to_owned(), true)),
        ["-z", s] => Ok(Check::StringNonEmpty((*s).to_owned(), false)),
        [a, "=", b] => Ok(Check::StringEquals((*a).to_owned(), (*b).to_owned(), true)),
        [a, "!=", b] => Ok(Check::StringEquals((*a).to_owned(), (*b).to_owned(), false)),
        _ => Err(GateError::Syntax(format!(
            "unsupported test expression {:?}: use -s, -f, -d, -e, -r, -n, -z, = or !=",
            args.join(" ")
        ))),
    }
}

fn grep(args: &[&str]) -> Result<Check, GateError> {
    let mut g = Grep {
        pattern: String::new(),
        path: String::new(),
        ignore_case: false,
        fixed: false,
        word: false,
        line: false,
        extended: false,
    };
    let mut rest = Vec::new();
    let mut options_done = false;
    for arg in args {
        if !options_done && *arg == "--" {
            options_done = true;
        } else if !options_done && arg.len() > 1 && arg.starts_with('-') {
            for flag in arg[1..].chars() {
                match flag {
                    'q' | 's' => {}
                    'E' => g.extended = true,
                    'i' => g.ignore_case = true,
                    'F' => g.fixed = true,
                    'w' => g.word = true,
                    'x' => g.line = true,
                    other => {
                        return Err(GateError::Unsupported(format!("grep -{other}")));
                    }
                }
            }
        } else {
            options_done = true;
            rest.push(*arg);
        }
    }
    match rest.as_slice() {
        [pattern, path] => {
            g.pattern = (*pattern).to_owned();
            g.path = path_arg(path)?;
            Ok(Check::Grep(g))
        }
        _ => Err(GateError::Syntax(
            "grep takes a pattern and exactly one file".into(),
        )),
    }
}

/// Accepts only relative paths that never climb out of the run directory.
fn path_arg(path: &str) -> Result<String, GateError> {
    let escapes =
        path.is_empty() || path.starts_with('/') || path.split('/').any(|part| part == "..");
    if escapes {
        return Err(GateError::PathOutsideRun(path.to_owned()));
    }
    Ok(path.to_owned())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn a_file_check_outside_the_run_is_told_apart() {
        let outside_at = |path: &str, holds: Option<&str>| {
            Some(Outside {
                path: path.into(),
                holds: holds.map(Into::into),
            })
        };
        for (source, want) in [
            (
                "test -s /srv/docs/a.txt",
                outside_at("/srv/docs/a.txt", None),
            ),
            (
                "[ -f '/srv/my docs/a' ]",
                outside_at("/srv/my docs/a", None),
            ),
            ("ls /srv/docs", outside_at("/srv/docs", None)),
            (
                "grep -q v1.0 /srv/CHANGELOG.txt",
                outside_at("/srv/CHANGELOG.txt", Some("v1.0")),
            ),
            (
                "grep -F -q \"BoxFleet Pro\" /srv/p.html",
                outside_at("/srv/p.html", Some("BoxFleet Pro")),
            ),
            // Inside the run, more than one command, a pattern or an option a plain
            // `contains` does not mean, a glob: not such a gate.
            ("test -s scratch/REPORT.org", None),
            ("test -s /a && test -s /b", None),
            ("! test -s /a", None),
            ("grep -q 'v1.*' /srv/a", None),
            ("grep -i word /srv/a", None),
            ("grep -q word /srv/docs/*", None),
            ("test -d /srv", None),
            ("call fs.get_file_info {\"path\": \"/srv/a\"}", None),
        ] {
            assert_eq!(outside(source), want, "{source}");
        }
    }

    #[test]
    fn parses_the_gates_plans_use() {
        assert_eq!(
            parse("test -s scratch/REPORT.org").unwrap(),
            Gate::Check(Check::NonEmpty("scratch/REPORT.org".into()))
        );
        let gate = parse("[ -f scratch/a ] && grep -qi 'total: 3' scratch/a || ! test -d scratch")
            .unwrap();
        assert!(matches!(gate, Gate::Or(_, _)));
        assert_eq!(gate.paths(), ["scratch/a", "scratch/a", "scratch"]);
        let Gate::Check(Check::Grep(g)) = parse(r#"grep -q "a \"b\"" x"#).unwrap() else {
            panic!("not a grep")
        };
        assert_eq!(g.pattern, "a \"b\"");
    }

    #[test]
    fn rejects_everything_else_with_a_reason() {
        let long = "x".repeat(MAX_GATE_BYTES + 1);
        let cases = [
            ("curl -sL https://e2b.dev", "unknown_command"),
            ("mkdir -p scratch", "unknown_command"),
            ("test -s a; rm -rf /", "unsupported_syntax"),
            ("test -s a | cat", "unsupported_syntax"),
            ("test -s $HOME/x", "unsupported_syntax"),
            ("test -s \"$(whoami)\"", "unsupported_syntax"),
            ("test -s a > b", "unsupported_syntax"),
            ("test -s scratch/*.org", "unsupported_syntax"),
            ("test -s /etc/passwd", "path_outside_run"),
            ("grep -q root ../../etc/passwd", "path_outside_run"),
            ("test -s scratch/../../x", "path_outside_run"),
            ("test -x a", "gate_syntax"),
            ("[ -s a", "gate_syntax"),
            ("test -s a &&", "gate_syntax"),
            ("", "gate_syntax"),
            ("grep -q x", "gate_syntax"),
            ("grep -r x dir", "unsupported_syntax"),
            (long.as_str(), "gate_too_large"),
            ("! ! ! ! ! true", "gate_too_large"),
        ];
        for (source, code) in cases {
            let err = parse(source).unwrap_err();
            assert_eq!(err.code(), code, "{source:?}: {err}");
        }
    }

    #[test]
    fn a_call_gate_names_a_tool_its_arguments_and_what_the_result_holds() {
        let call = |source: &str| parse(source).map(|g| g.call().cloned());
        assert_eq!(
            call(r#"call fs.get_file_info {"path": "/srv/docs/CHANGELOG.txt"}"#).unwrap(),
            Some(CallCheck {
                tool: "fs.get_file_info".into(),
                args_json: r#"{"path":"/srv/docs/CHANGELOG.txt"}"#.into(),
                contains: None,
            })
        );
        let with_text =
            call(r#"  call fs.read_text_file {"path": "/a b/c"} contains "v1.0 (final)""#).unwrap();
        assert_eq!(with_text.unwrap().contains.as_deref(), Some("v1.0 (final)"));
        let bare = call(r#"call web.fetch {"url": "http://x/"} contains BoxFleet"#).unwrap();
        assert_eq!(bare.unwrap().contains.as_deref(), Some("BoxFleet"));
        assert_eq!(call("test -s scratch/a").unwrap(), None);
        // With `call` left out, as small models write it.
        assert_eq!(
            call(r#"fs.get_file_info {"path": "/a"}"#)
                .unwrap()
                .unwrap()
                .tool,
            "fs.get_file_info"
        );
        for (source, said) in [
            ("call", "unknown command"),
            ("call fs.get_file_info", "a tool and its arguments"),
            (r#"call get_file_info {"path": "/a"}"#, "<connector>.<tool>"),
            (r#"call fs.x ["/a"]"#, "one JSON object"),
            (r#"call fs.x {"path": "/a""#, "not JSON"),
            (
                r#"call fs.x {"path": "/a"} && rm -rf /"#,
                "only `contains <text>` may follow",
            ),
            (
                r#"call fs.x {} contains"#,
                "only `contains <text>` may follow",
            ),
            (r#"call fs.x {} contains """#, "the text to look for"),
        ] {
            let error = parse(source).unwrap_err().to_string();
            assert!(error.contains(said), "{source}: {error}");
        }
        // A call is no file the offline worker or the interpreter could make pass.
        assert!(parse(r#"call fs.x {}"#).unwrap().paths().is_empty());
    }

    #[test]
    fn hostile_nesting_is_refused_without_recursing() {
        // The goal that once overflowed the parser's stack: thousands of `!`.
        let bangs = format!("{}true", "! ".repeat(3950));
        assert_eq!(parse(&bangs).unwrap_err().code(), "gate_too_large");
        let chain = vec!["true"; 400].join(" && ");
        assert_eq!(parse(&chain).unwrap_err().code(), "gate_too_large");
        let most = vec!["true"; MAX_COMMANDS].join(" || ");
        assert!(parse(&most).is_ok());
        assert!(matches!(parse("! ! ! ! true").unwrap(), Gate::Not(_)));
    }

    proptest! {
        #[test]
        fn parse_never_panics(source in ".{0,120}") {
            let _ = parse(&source);
        }
    }
}
