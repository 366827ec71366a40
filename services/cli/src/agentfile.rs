//! The Agentfile: a service declared in a file, one directive per line.
//!
//! ```text
//! # What every wake does.
//! GOAL "Triage the new issue in the payload and write a note"
//! SCHEDULE "0 */15 * * * * *"              # cron, 5, 6 or 7 fields
//! SCHEDULE "0 9 * * MON-FRI" Europe/Lisbon # with a time zone
//! INTERVAL 10m                             # an idle heartbeat
//! SECRET DISPATCH_WEBHOOK_SECRET
//! LISTEN "127.0.0.1:8088"
//! LISTEN_PATH "/hook"
//! LISTEN_METHOD POST
//! LISTEN_SECRET DISPATCH_WEBHOOK_SECRET
//! LISTEN_MAX_BODY_BYTES 8192
//! LISTEN_MAX_HEADER_BYTES 4096
//! ```
//!
//! A directive is a word in capitals followed by its arguments: bare words or double-
//! quoted strings (`\"` and `\\` inside). `#` starts a comment outside quotes. Every
//! mistake is refused with the file, the line and why; nothing is started from a file
//! with one.
//!
//! Hand-written: the format is Dispatch's own and small, and its errors must name the
//! line, which a general-purpose config crate would not let us word.

use std::path::Path;

/// The longest Agentfile read.
pub const MAX_BYTES: usize = 64 * 1024;

/// What an Agentfile declares; `None`/empty for what it leaves out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Agentfile {
    pub goal: Option<String>,
    pub conversation: Option<String>,
    pub timeout: Option<String>,
    /// Expression and time zone (empty: UTC).
    pub schedules: Vec<(String, String)>,
    pub interval: Option<String>,
    pub listen: Vec<String>,
    pub hooks: Vec<String>,
    pub listen_path: Option<String>,
    pub listen_methods: Vec<String>,
    /// The name of a declared `SECRET` holding the shared secret.
    pub listen_secret: Option<String>,
    /// The name of a secret in the secret store holding a Standard Webhooks key.
    pub listen_signing_secret: Option<String>,
    pub listen_max_body_bytes: Option<u32>,
    pub listen_max_header_bytes: Option<u32>,
    /// Declared secret names, in order.
    pub secrets: Vec<String>,
}

/// Reads and parses the Agentfile at `path`.
pub fn read(path: &Path) -> Result<Agentfile, String> {
    let shown = path.display();
    let meta = std::fs::metadata(path).map_err(|e| format!("{shown}: {e}"))?;
    if meta.len() > MAX_BYTES as u64 {
        return Err(format!(
            "{shown}: {} bytes; an Agentfile is at most {MAX_BYTES}",
            meta.len()
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| format!("{shown}: {e}"))?;
    let text = String::from_utf8(bytes).map_err(|_| format!("{shown}: not UTF-8 text"))?;
    parse(&text).map_err(|(line, why)| format!("{shown}:{line}: {why}"))
}

/// Parses an Agentfile's text; an error is the 1-based line and why.
pub fn parse(text: &str) -> Result<Agentfile, (usize, String)> {
    let mut file = Agentfile::default();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let words = split(line).map_err(|why| (n, why))?;
        let Some((directive, args)) = words.split_first() else {
            continue;
        };
        directive_into(&mut file, directive, args)
            .map_err(|why| (n, format!("{directive}: {why}")))?;
    }
    if let Some(name) = &file.listen_secret
        && !file.secrets.contains(name)
    {
        let line = line_of(text, "LISTEN_SECRET");
        return Err((
            line,
            format!("LISTEN_SECRET: {name} is not declared; add `SECRET {name}`"),
        ));
    }
    Ok(file)
}

fn line_of(text: &str, directive: &str) -> usize {
    text.lines()
        .position(|l| l.trim_start().starts_with(directive))
        .map_or(0, |i| i + 1)
}

fn directive_into(file: &mut Agentfile, directive: &str, args: &[String]) -> Result<(), String> {
    let one = || match args {
        [value] => Ok(value.clone()),
        [] => Err("takes one value; it has none".to_owned()),
        _ => Err(format!("takes one value; it has {}", args.len())),
    };
    match directive {
        "GOAL" | "PROMPT" => {
            once(&file.goal)?;
            let goal = one()?;
            if goal.trim().is_empty() {
                return Err("the goal is empty".into());
            }
            file.goal = Some(goal);
        }
        "CONVERSATION" => {
            once(&file.conversation)?;
            file.conversation = Some(one()?);
        }
        "TIMEOUT" => {
            once(&file.timeout)?;
            let timeout = one()?;
            crate::parse_duration(&timeout)?;
            file.timeout = Some(timeout);
        }
        "SCHEDULE" => {
            let (expression, zone) = match args {
                [expression] => (expression.clone(), String::new()),
                [expression, zone] => (expression.clone(), zone.clone()),
                _ => {
                    return Err(
                        "takes a quoted cron expression and, optionally, a time zone".into(),
                    );
                }
            };
            dispatch_cron::Expr::parse(&expression, &zone)?;
            file.schedules.push((expression, zone));
        }
        "INTERVAL" => {
            once(&file.interval)?;
            let interval = one()?;
            crate::parse_duration(&interval)?;
            file.interval = Some(interval);
        }
        "LISTEN" => {
            let addr = one()?;
            addr.parse::<std::net::SocketAddr>().map_err(|_| {
                format!("`{addr}` is not an address to listen on (say `127.0.0.1:8088`)")
            })?;
            if !file.listen.contains(&addr) {
                file.listen.push(addr);
            }
        }
        "HOOK" => {
            let hook = one()?;
            dispatch_runlog::service::check_hook(&hook)?;
            if !file.hooks.contains(&hook) {
                file.hooks.push(hook);
            }
        }
        "LISTEN_PATH" => {
            once(&file.listen_path)?;
            file.listen_path = Some(one()?);
        }
        "LISTEN_METHOD" => {
            if args.is_empty() {
                return Err("takes one or more methods".into());
            }
            for method in args {
                let method = method.to_ascii_uppercase();
                if !file.listen_methods.contains(&method) {
                    file.listen_methods.push(method);
                }
            }
        }
        "LISTEN_SECRET" => {
            once(&file.listen_secret)?;
            let name = one()?;
            dispatch_secrets::check_name(&name).map_err(|e| e.to_string())?;
            file.listen_secret = Some(name);
        }
        "LISTEN_SIGNING_SECRET" => {
            once(&file.listen_signing_secret)?;
            let name = one()?;
            dispatch_secrets::check_name(&name).map_err(|e| e.to_string())?;
            file.listen_signing_secret = Some(name);
        }
        "LISTEN_MAX_BODY_BYTES" => {
            once(&file.listen_max_body_bytes)?;
            file.listen_max_body_bytes = Some(bytes(&one()?)?);
        }
        "LISTEN_MAX_HEADER_BYTES" => {
            once(&file.listen_max_header_bytes)?;
            file.listen_max_header_bytes = Some(bytes(&one()?)?);
        }
        "SECRET" => {
            let name = one()?;
            dispatch_secrets::check_name(&name).map_err(|e| e.to_string())?;
            if !file.secrets.contains(&name) {
                file.secrets.push(name);
            }
        }
        other => {
            return Err(if other.chars().any(|c| c.is_ascii_lowercase()) {
                "directives are in capitals (GOAL, SCHEDULE, LISTEN, …)".into()
            } else {
                format!(
                    "unknown directive; known: GOAL, PROMPT, CONVERSATION, TIMEOUT, SCHEDULE, \
                     INTERVAL, LISTEN, HOOK, LISTEN_PATH, LISTEN_METHOD, LISTEN_SECRET, \
                     LISTEN_SIGNING_SECRET, LISTEN_MAX_BODY_BYTES, LISTEN_MAX_HEADER_BYTES, \
                     SECRET ({})",
                    dispatch_runlog::slice_chars(other, 40)
                )
            });
        }
    }
    Ok(())
}

fn once<T>(slot: &Option<T>) -> Result<(), String> {
    match slot {
        Some(_) => Err("given twice".to_owned()),
        None => Ok(()),
    }
}

fn bytes(text: &str) -> Result<u32, String> {
    text.parse::<u32>()
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("`{text}` is not a positive number of bytes"))
}

/// Splits a line into words: bare words, and double-quoted strings with `\"` and `\\`.
fn split(line: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut chars = line.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        match chars.peek() {
            None | Some('#') => return Ok(words),
            Some('"') => {
                chars.next();
                let mut word = String::new();
                loop {
                    match chars.next() {
                        None => return Err("a quoted string is not closed".into()),
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\')) => word.push(c),
                            Some(c) => {
                                return Err(format!(
                                    "`\\{c}` is not an escape (only `\\\"` and `\\\\` are)"
                                ));
                            }
                            None => return Err("a quoted string is not closed".into()),
                        },
                        Some(c) if c.is_control() => {
                            return Err("a control character in a quoted string".into());
                        }
                        Some(c) => word.push(c),
                    }
                }
                if chars
                    .peek()
                    .is_some_and(|c| !c.is_whitespace() && *c != '#')
                {
                    return Err("a quoted string runs into the next word".into());
                }
                words.push(word);
            }
            Some(_) => {
                let mut word = String::new();
                while let Some(&c) = chars.peek() {
                    if c.is_whitespace() || c == '#' {
                        break;
                    }
                    if c == '"' {
                        return Err("a quote inside a word; quote the whole word".into());
                    }
                    if c.is_control() {
                        return Err("a control character".into());
                    }
                    word.push(c);
                    chars.next();
                }
                words.push(word);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_agentfile_reads() {
        let text = include_str!("../../../examples/Agentfile");
        let file = parse(text).unwrap();
        assert!(file.goal.is_some());
        assert!(!file.schedules.is_empty());
        assert_eq!(file.listen_methods, vec!["POST"]);
        assert_eq!(
            file.listen_secret.as_deref(),
            Some("DISPATCH_WEBHOOK_SECRET")
        );
    }

    #[test]
    fn directives_read_as_written() {
        let file = parse(concat!(
            "# a service\n",
            "\n",
            "GOAL \"Say \\\"hi\\\" # not a comment\"  # a comment\n",
            "SCHEDULE \"*/5 * * * * * *\"\n",
            "SCHEDULE \"0 9 * * MON-FRI\" Europe/Lisbon\n",
            "INTERVAL 30s\n",
            "LISTEN 127.0.0.1:0\n",
            "LISTEN \"127.0.0.1:0\"\n",
            "HOOK acme/triage/github\n",
            "LISTEN_METHOD post PUT\n",
            "LISTEN_METHOD POST\n",
            "SECRET HOOK_TOKEN\n",
            "LISTEN_SECRET HOOK_TOKEN\n",
            "LISTEN_MAX_BODY_BYTES 1024\n",
        ))
        .unwrap();
        assert_eq!(file.goal.as_deref(), Some("Say \"hi\" # not a comment"));
        assert_eq!(
            file.schedules,
            vec![
                ("*/5 * * * * * *".to_owned(), String::new()),
                ("0 9 * * MON-FRI".to_owned(), "Europe/Lisbon".to_owned()),
            ]
        );
        assert_eq!(file.interval.as_deref(), Some("30s"));
        assert_eq!(file.listen, vec!["127.0.0.1:0"], "no duplicates");
        assert_eq!(file.hooks, vec!["acme/triage/github"]);
        assert_eq!(file.listen_methods, vec!["POST", "PUT"], "merged");
        assert_eq!(file.listen_max_body_bytes, Some(1024));
    }

    #[test]
    fn every_mistake_names_its_line() {
        let cases = [
            (
                "GOAL \"a\"\nSCHEDULE \"61 * * * *\"\n",
                2,
                "SCHEDULE: `61 * * * *` is not a cron",
            ),
            ("GOAL \"a\"\nGOAL \"b\"\n", 2, "GOAL: given twice"),
            ("GOAL\n", 1, "GOAL: takes one value; it has none"),
            ("GOAL \"unclosed\n", 1, "not closed"),
            ("GOAL a\"b\n", 1, "a quote inside a word"),
            (
                "\n\nLISTEN localhost\n",
                3,
                "LISTEN: `localhost` is not an address",
            ),
            (
                "SCHEDULE \"* * * * *\" Mars/Base\n",
                1,
                "not an IANA time zone",
            ),
            ("INTERVAL soon\n", 1, "INTERVAL:"),
            ("LISTEN_MAX_BODY_BYTES -1\n", 1, "not a positive number"),
            ("goal \"x\"\n", 1, "directives are in capitals"),
            ("ENTRYPOINT http\n", 1, "unknown directive"),
            ("HOOK acme/../x\n", 1, "HOOK: hook"),
            (
                "GOAL \"x\"\nLISTEN_SECRET TOKEN\n",
                2,
                "TOKEN is not declared",
            ),
            ("GOAL \"bad \\n escape\"\n", 1, "not an escape"),
        ];
        for (text, line, said) in cases {
            let (at, why) = parse(text).unwrap_err();
            assert_eq!(at, line, "{text:?}: {why}");
            assert!(why.contains(said), "{text:?}: {why}");
        }
    }
}
