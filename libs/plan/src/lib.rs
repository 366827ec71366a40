//! The plan grammar: what an author model must write and how Dispatch reads it.
//!
//! A plan is an org outline: a `#+TITLE:` line and TODO-family headlines (TODO, NEXT,
//! WAITING, DOING, STARTED, BLOCKED) with real text. Each headline may carry a
//! `:PROPERTIES:` drawer (`:ORDERED: t`), a body, and a `:done-when:` gate line. The
//! leaves are the TODO-family headlines with no TODO-family headline below them; they
//! run in document order.
//!
//! This crate only reads text. Running a plan is the dispatcher's job, and evaluating
//! a `:done-when:` gate is the connectors' job.

use std::fmt;

pub mod gate;

/// Keywords that make a headline a task.
pub const TODO_KEYWORDS: [&str; 6] = ["TODO", "NEXT", "WAITING", "DOING", "STARTED", "BLOCKED"];

/// The most leaves a plan may have: a plan is an errand, not a project.
pub const MAX_LEAVES: usize = 32;

/// The most bytes of plan text accepted from a model.
pub const MAX_PLAN_BYTES: usize = 64 * 1024;

/// The grammar handed to the author model, verbatim.
pub const GRAMMAR: &str = "\
Answer with an org-mode outline and nothing else. Its title and steps come from the
goal; only their shape comes from this example, written for the goal \"Count the lines
of /srv/logs/app.log\":

#+TITLE: Count the lines of app.log
* TODO Read /srv/logs/app.log
  :PROPERTIES:
  :ORDERED: t
  :TOOLS: fs.read_text_file
  :END:
  Read /srv/logs/app.log with fs.read_text_file.
  :done-when: call fs.get_file_info {\"path\": \"/srv/logs/app.log\"}
* TODO Write the count
  :PROPERTIES:
  :ORDERED: t
  :TOOLS: files.write_file
  :END:
  Count the lines read and write the number to scratch/REPORT.org with files.write_file.
  :done-when: test -s scratch/REPORT.org

The rules:
- First line: `#+TITLE: <short title>`.
- Then 1 to 7 top-level headlines, each `* TODO <what to do>`, each once.
- Under each headline, the drawer as in the example, once, its `:TOOLS:` line naming
  the tools from the list below that the step uses (the step is offered those, and
  can search for others).
- Then one or more body lines saying how to do it, naming the tools to use from
  the list below (the files.* tools work on scratch/, relative to the run directory;
  other tools take the paths or arguments their own descriptions ask for).
- Then exactly one gate line, `:done-when: <check>`: a step without one is sent
  back, because a step counts as done only when its check passes. <check> is either
  `test -s|-f|-d|-e <path>` or `grep -q <text> <path>`, combined with `&&` or `||`,
  where <path> is relative to the run directory, such as scratch/REPORT.org (these
  cannot see files anywhere else); or, for a step that acts outside the run, one
  read-only tool call from the list below whose success shows it done:
  `call <tool> <JSON arguments>`, optionally followed by `contains \"<text>\"`, such as
  `:done-when: call fs.get_file_info {\"path\": \"/srv/docs/CHANGELOG.txt\"}`. A gate that
  names any other command, or a tool that writes, never passes.
- The last headline writes the final answer to scratch/REPORT.org, as plain text:
  tools take their arguments literally, and nothing like `$(...)` is ever run.";

/// A validated plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub title: String,
    pub leaves: Vec<Leaf>,
    /// The plan text as accepted (code fences stripped), which is what gets written to
    /// `workflows/<slug>.org`.
    pub text: String,
}

/// One unit of work in a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leaf {
    pub index: u32,
    pub keyword: String,
    pub title: String,
    pub body: String,
    pub done_when: Option<String>,
    pub ordered: bool,
    /// The tools the author named for this leaf (`:TOOLS: fs.read_text_file
    /// files.write_file`), in order, each once; empty when it named none.
    pub tools: Vec<String>,
}

/// Why a plan was rejected. `code()` is the stable machine-readable name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("the answer is empty")]
    Empty,
    #[error("the answer is {0} bytes; a plan may be at most {MAX_PLAN_BYTES}")]
    TooLarge(usize),
    #[error(
        "the outline has no TODO headline with text; write headlines like `* TODO <what to do>`"
    )]
    NoTodoHeadings,
    #[error("the outline has {0} leaves; a plan may have at most {MAX_LEAVES}")]
    TooManyLeaves(usize),
    #[error("line {line}: the :PROPERTIES: drawer is never closed with :END:")]
    UnclosedDrawer { line: usize },
    #[error("line {line}: leaf {title:?} has more than one :done-when: gate")]
    DuplicateGate { line: usize, title: String },
    #[error("leaf {title:?}: {message}")]
    GateTooLarge { title: String, message: String },
}

impl Error {
    pub fn code(&self) -> &'static str {
        match self {
            Error::Empty => "empty_plan",
            Error::TooLarge(_) => "plan_too_large",
            Error::NoTodoHeadings => "no_todo_headings",
            Error::TooManyLeaves(_) => "too_many_leaves",
            Error::UnclosedDrawer { .. } => "unclosed_drawer",
            Error::DuplicateGate { .. } => "duplicate_gate",
            Error::GateTooLarge { .. } => "gate_too_large",
        }
    }
}

/// `* TODO: x` as `* TODO x`: small models write the colon however the grammar puts
/// it, and nothing else can be meant, so the plan is read and stored without it.
fn drop_keyword_colons(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.split_inclusive('\n') {
        let stars = line.len() - line.trim_start_matches('*').len();
        let rest = &line[stars..];
        let fixed = (stars > 0 && rest.starts_with(' '))
            .then(|| {
                let word_at = rest.len() - rest.trim_start().len();
                TODO_KEYWORDS.iter().find_map(|k| {
                    rest[word_at..]
                        .strip_prefix(k)
                        .and_then(|after| after.strip_prefix(':'))
                        .filter(|after| after.starts_with(char::is_whitespace))
                        .map(|after| format!("{}{}{k}{after}", &line[..stars], &rest[..word_at]))
                })
            })
            .flatten();
        out.push_str(fixed.as_deref().unwrap_or(line));
    }
    out
}

/// Removes Markdown code fences a model may wrap around its answer.
pub fn strip_code_fences(answer: &str) -> String {
    let lines: Vec<&str> = answer
        .lines()
        .filter(|line| !line.trim_start().starts_with("```"))
        .collect();
    let mut text = lines.join("\n").trim().to_owned();
    text.push('\n');
    text
}

/// Parses and validates an author model's answer.
pub fn parse(answer: &str) -> Result<Plan, Error> {
    if answer.len() > MAX_PLAN_BYTES {
        return Err(Error::TooLarge(answer.len()));
    }
    let text = drop_keyword_colons(&strip_code_fences(answer));
    if text.trim().is_empty() {
        return Err(Error::Empty);
    }

    let mut title = None;
    let mut nodes: Vec<Node> = Vec::new();
    let mut in_drawer: Option<usize> = None;
    for (i, raw) in text.lines().enumerate() {
        let line_no = i + 1;
        let line = raw.trim_end();
        if let Some(start) = in_drawer {
            let trimmed = line.trim();
            if trimmed.eq_ignore_ascii_case(":END:") {
                in_drawer = None;
            } else if headline(line).is_some() {
                return Err(Error::UnclosedDrawer { line: start });
            } else if let (Some(node), Some(pair)) = (nodes.last_mut(), property(trimmed)) {
                node.properties.push(pair);
            }
            continue;
        }
        if let Some(rest) = line
            .strip_prefix("#+TITLE:")
            .or_else(|| line.strip_prefix("#+title:"))
        {
            title.get_or_insert_with(|| rest.trim().to_owned());
            continue;
        }
        if let Some((depth, text)) = headline(line) {
            nodes.push(Node::new(depth, text, line_no));
            continue;
        }
        let Some(node) = nodes.last_mut() else {
            continue;
        };
        let trimmed = line.trim();
        if trimmed.eq_ignore_ascii_case(":PROPERTIES:") {
            in_drawer = Some(line_no);
        } else if let Some(gate) = strip_prefix_ci(trimmed, ":done-when:") {
            if node.done_when.is_some() {
                return Err(Error::DuplicateGate {
                    line: line_no,
                    title: node.title.clone(),
                });
            }
            node.done_when = Some(gate.trim().to_owned()).filter(|g| !g.is_empty());
        } else {
            node.body.push(line.to_owned());
        }
    }
    if let Some(start) = in_drawer {
        return Err(Error::UnclosedDrawer { line: start });
    }

    let leaves = leaves(&nodes);
    if leaves.is_empty() {
        return Err(Error::NoTodoHeadings);
    }
    if leaves.len() > MAX_LEAVES {
        return Err(Error::TooManyLeaves(leaves.len()));
    }
    // A gate with an unknown command is kept: it fails closed when checked, as the
    // grammar warns. One beyond the gate language's bounds is a malformed plan.
    for leaf in &leaves {
        let gate = leaf.done_when.as_deref().map(gate::parse);
        if let Some(Err(e @ gate::GateError::TooLarge(_))) = gate {
            return Err(Error::GateTooLarge {
                title: leaf.title.clone(),
                message: e.to_string(),
            });
        }
    }
    let title = title
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| leaves[0].title.clone());
    Ok(Plan {
        title,
        leaves,
        text,
    })
}

/// How many unusable gates [`Plan::unusable_gates`] describes: enough for the author to
/// see the pattern, few enough that the message stays short.
const MAX_GATE_FAULTS_TOLD: usize = 3;
/// The first [`MAX_GATE_FAULTS_TOLD`] of `items` joined by `sep`, and how many more
/// (`<more> N more`) if there are.
fn told(items: &[String], sep: &str, more: &str) -> String {
    let mut out = items
        .iter()
        .take(MAX_GATE_FAULTS_TOLD)
        .cloned()
        .collect::<Vec<_>>()
        .join(sep);
    if items.len() > MAX_GATE_FAULTS_TOLD {
        out.push_str(&format!(
            "{more} {} more",
            items.len() - MAX_GATE_FAULTS_TOLD
        ));
    }
    out
}

/// How much of a leaf's title such a description quotes.
const MAX_TITLE_TOLD: usize = 80;

impl Plan {
    /// The leaves whose gate can never pass: it names a command the gate language does
    /// not have, uses shell syntax, or looks outside the run directory. Such a plan is
    /// well-formed (its gates fail closed when checked, and the other leaves can still
    /// succeed), but an author with a retry left should be told, so the dispatcher sends
    /// this back once as the `unusable_gate` code. A gate that checks one file outside
    /// the run ([`gate::outside`]) is shown as `rewrite` writes it, when it can (the
    /// dispatcher writes it as a `call` of a read-only tool in its catalogue). `None`
    /// when every gate can pass.
    pub fn unusable_gates(
        &self,
        rewrite: impl Fn(&gate::Outside) -> Option<String>,
    ) -> Option<String> {
        let faults: Vec<String> = self
            .leaves
            .iter()
            .filter_map(|leaf| {
                let source = leaf.done_when.as_deref()?;
                let error = gate::parse(source).err()?;
                let title: String = leaf.title.chars().take(MAX_TITLE_TOLD).collect();
                let mut fault = format!(
                    "leaf {title:?}: `:done-when: {source}` can never pass ({}: {error})",
                    error.code()
                );
                if let Some(instead) = gate::outside(source).as_ref().and_then(&rewrite) {
                    fault.push_str(&format!(", so write `:done-when: {instead}` instead"));
                }
                Some(fault)
            })
            .collect();
        if faults.is_empty() {
            return None;
        }
        let mut message = told(&faults, "; ", "; and");
        // Said as the edit to make: told only what was wrong, the 1.5B model wrote its
        // outline again unchanged; told this, it changed the gates.
        message.push_str(
            ". Replace each such check with one of a file under scratch/ that its step \
             writes, such as `test -s scratch/REPORT.org`, or, for a step that acts \
             outside the run, with one read-only tool call that shows it done, such as \
             `call fs.get_file_info {\"path\": \"/srv/docs/CHANGELOG.txt\"}`",
        );
        Some(message)
    }
}

/// The code under which [`Plan::unusable_gates`] is sent back to the author.
pub const UNUSABLE_GATE: &str = "unusable_gate";

/// The code under which [`Plan::unknown_tools`] is sent back to the author.
pub const UNKNOWN_TOOL: &str = "unknown_tool";

impl Plan {
    /// The tools leaves name that `known` does not hold, said as the edit to make;
    /// `None` when every named tool is known.
    pub fn unknown_tools(&self, known: &[&str]) -> Option<String> {
        let mut unknown: Vec<&str> = Vec::new();
        for leaf in &self.leaves {
            for tool in &leaf.tools {
                if !known.contains(&tool.as_str()) && !unknown.contains(&tool.as_str()) {
                    unknown.push(tool);
                }
            }
        }
        if unknown.is_empty() {
            return None;
        }
        let told: Vec<String> = unknown
            .iter()
            .take(MAX_GATE_FAULTS_TOLD)
            .map(|t| format!("{:?}", t.chars().take(MAX_TITLE_TOLD).collect::<String>()))
            .collect();
        Some(format!(
            "`:TOOLS:` names {} that no connector serves; name tools from the list, as it \
             writes them (<connector>.<tool>)",
            told.join(", ")
        ))
    }

    /// The plan with the tools no connector serves left out of its leaves.
    pub fn without_unknown_tools(mut self, known: &[&str]) -> Self {
        for leaf in &mut self.leaves {
            leaf.tools.retain(|t| known.contains(&t.as_str()));
        }
        self
    }
}

/// The code under which [`Plan::gateless_leaves`] is sent back to the author.
pub const NO_GATE: &str = "no_gate";

impl Plan {
    /// The leaves with no `:done-when:` gate, said as the edit to make. A leaf is done
    /// only when a check shows it done, so a plan with such a leaf cannot succeed: it
    /// goes back to the author (and, on its last attempt, is refused). `None` when every
    /// leaf has a gate.
    pub fn gateless_leaves(&self) -> Option<String> {
        let titles: Vec<String> = self
            .leaves
            .iter()
            .filter(|leaf| leaf.done_when.is_none())
            .map(|leaf| {
                format!(
                    "{:?}",
                    leaf.title.chars().take(MAX_TITLE_TOLD).collect::<String>()
                )
            })
            .collect();
        if titles.is_empty() {
            return None;
        }
        let named = told(&titles, ", ", " and");
        Some(format!(
            "{} of {} steps have no `:done-when:` line ({named}); a step counts as done \
             only when its check passes, so give each step one line such as \
             `:done-when: test -s scratch/REPORT.org` naming what that step makes",
            titles.len(),
            self.leaves.len()
        ))
    }
}

/// The code under which [`Plan::borrowed_gates`] is sent back to the author.
pub const BORROWED_GATE: &str = "borrowed_gate";

impl Plan {
    /// The steps that make no file in the run directory (no tool they name is one
    /// `writes_in_run` says writes there) whose gate checks a file that a later step's
    /// gate checks too: that file is the later step's to make, so the step can pass its
    /// check only on work it was not asked to do, and a small model told that check gives
    /// the step up (`NOT DONE: REPORT.org does not exist`). Said as the edit to make:
    /// a check of what the step itself does, as `rewrite` writes it for the first
    /// absolute path the step names, when it can. `None` when no step borrows a gate.
    pub fn borrowed_gates(
        &self,
        writes_in_run: impl Fn(&str) -> bool,
        rewrite: impl Fn(&gate::Outside) -> Option<String>,
    ) -> Option<String> {
        let borrowed: Vec<String> = self
            .leaves
            .iter()
            .enumerate()
            .filter_map(|(at, leaf)| {
                let source = leaf.done_when.as_deref()?.trim();
                let own = gate::parse(source).ok().filter(|g| {
                    !g.passes_whatever_happens()
                        && !matches!(g, gate::Gate::Check(gate::Check::Call(_)))
                })?;
                let makes_none =
                    !leaf.tools.is_empty() && !leaf.tools.iter().any(|tool| writes_in_run(tool));
                // The same check, or another of the same file (`grep -q … scratch/R.org`
                // after `test -s scratch/R.org`).
                let checked = own.paths();
                let later = self.leaves[at + 1..].iter().any(|next| {
                    let Some(next) = next.done_when.as_deref() else {
                        return false;
                    };
                    next.contains(source)
                        || gate::parse(next)
                            .is_ok_and(|g| g.paths().iter().any(|p| checked.contains(p)))
                });
                if !(makes_none && later) {
                    return None;
                }
                let title: String = leaf.title.chars().take(MAX_TITLE_TOLD).collect();
                let instead = first_absolute_path(&format!("{}\n{}", leaf.title, leaf.body))
                    .and_then(|path| rewrite(&gate::Outside { path, holds: None }));
                Some(match instead {
                    Some(check) => format!(
                        "{title:?} makes no file here, yet its check `{source}` is a later \
                         step's, so write `:done-when: {check}` instead"
                    ),
                    None => format!(
                        "{title:?} makes no file here, yet its check `{source}` is a later \
                         step's, so check what this step itself does"
                    ),
                })
            })
            .collect();
        if borrowed.is_empty() {
            return None;
        }
        Some(format!(
            "a step is checked on its own work: {}",
            told(&borrowed, "; ", "; and")
        ))
    }
}

/// The first word of `text` that is an absolute path (`/srv/docs`), without the
/// punctuation a sentence puts after it.
fn first_absolute_path(text: &str) -> Option<String> {
    text.split_whitespace()
        .map(|word| {
            word.trim_start_matches(['"', '\'', '`', '('])
                .trim_end_matches(['"', '\'', '`', ')', ',', ';', ':', '.'])
        })
        .find(|word| word.len() > 1 && word.starts_with('/') && !word.starts_with("//"))
        .map(str::to_owned)
}

/// The code under which [`Plan::blind_gates`] is sent back to the author.
pub const BLIND_GATE: &str = "blind_gate";

impl Plan {
    /// The leaves whose gate passes whatever the step did (`true`, `test -s a || true`),
    /// said as the edit to make: such a gate shows nothing done. A
    /// model's plan with one goes back like a plan with a step without a gate; a plan a
    /// person wrote (the offline provider runs it as given) may use one on purpose.
    /// `None` when every gate can fail, or cannot be read (that is
    /// [`Plan::unusable_gates`]' to say).
    pub fn blind_gates(&self) -> Option<String> {
        let blind: Vec<String> = self
            .leaves
            .iter()
            .filter_map(|leaf| {
                let source = leaf.done_when.as_deref()?;
                let blind = gate::parse(source).ok()?.passes_whatever_happens();
                blind.then(|| {
                    let title: String = leaf.title.chars().take(MAX_TITLE_TOLD).collect();
                    format!("{title:?} (`:done-when: {source}`)")
                })
            })
            .collect();
        if blind.is_empty() {
            return None;
        }
        let named = told(&blind, ", ", " and");
        Some(format!(
            "{} of {} steps have a check that passes whatever the step did ({named}); \
             check what the step makes, such as `:done-when: test -s scratch/REPORT.org`, \
             or, for a step that acts outside the run, one read-only tool call that shows \
             it done",
            blind.len(),
            self.leaves.len()
        ))
    }
}

/// A URL- and file-safe name for a goal: lowercase words joined by `-`, at most 48
/// characters, never empty.
pub fn slug(goal: &str) -> String {
    let mut slug = String::new();
    for word in goal
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
    {
        let word = word.to_ascii_lowercase();
        let extra = if slug.is_empty() {
            word.len()
        } else {
            word.len() + 1
        };
        if slug.len() + extra > 48 {
            if slug.is_empty() {
                slug.push_str(&word[..48]);
            }
            break;
        }
        if !slug.is_empty() {
            slug.push('-');
        }
        slug.push_str(&word);
    }
    if slug.is_empty() {
        slug.push_str("goal");
    }
    slug
}

struct Node {
    depth: usize,
    keyword: Option<String>,
    title: String,
    body: Vec<String>,
    properties: Vec<(String, String)>,
    done_when: Option<String>,
}

impl Node {
    fn new(depth: usize, text: &str, _line: usize) -> Self {
        let (keyword, title) = match text.split_once(char::is_whitespace) {
            Some((first, rest)) if TODO_KEYWORDS.contains(&first) => {
                (Some(first.to_owned()), strip_tags(rest))
            }
            None if TODO_KEYWORDS.contains(&text) => (Some(text.to_owned()), String::new()),
            _ => (None, strip_tags(text)),
        };
        Self {
            depth,
            keyword,
            title,
            body: Vec::new(),
            properties: Vec::new(),
            done_when: None,
        }
    }

    /// A task headline with real text: a keyword alone or with only tags is not a task.
    fn is_task(&self) -> bool {
        self.keyword.is_some() && self.title.chars().any(char::is_alphanumeric)
    }
}

/// Which nodes have a task below them, in one pass: each task marks its open
/// ancestors, stopping at the first one already marked (everything above it is too),
/// so the work stays linear however a hostile outline nests.
fn with_task_below(nodes: &[Node]) -> Vec<bool> {
    let mut marked = vec![false; nodes.len()];
    let mut open: Vec<usize> = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        while open.last().is_some_and(|&j| nodes[j].depth >= node.depth) {
            open.pop();
        }
        if node.is_task() {
            for &j in open.iter().rev() {
                if marked[j] {
                    break;
                }
                marked[j] = true;
            }
        }
        open.push(i);
    }
    marked
}

fn leaves(nodes: &[Node]) -> Vec<Leaf> {
    let mut out = Vec::new();
    let task_below = with_task_below(nodes);
    for (i, node) in nodes.iter().enumerate() {
        if !node.is_task() || task_below[i] {
            continue;
        }
        let property = |key: &str| {
            node.properties
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(key))
                .map(|(_, v)| v.clone())
        };
        let done_when = node
            .done_when
            .clone()
            .or_else(|| property("DONE-WHEN").filter(|g| !g.is_empty()));
        out.push(Leaf {
            index: out.len() as u32,
            keyword: node.keyword.clone().unwrap_or_default(),
            title: node.title.clone(),
            body: trim_lines(&node.body),
            done_when,
            ordered: property("ORDERED").is_some_and(|v| v == "t"),
            tools: property("TOOLS").map_or_else(Vec::new, |v| tool_names(&v)),
        });
    }
    out
}

/// The most tools one leaf may name.
pub const MAX_LEAF_TOOLS: usize = 16;

/// `fs.read_text_file, files.write_file` or the same with spaces: each name once, at
/// most [`MAX_LEAF_TOOLS`].
fn tool_names(value: &str) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for name in value
        .split(|c: char| c == ',' || c.is_whitespace())
        .map(|n| n.trim_matches(|c: char| c == '`' || c == '"' || c == '\''))
        .filter(|n| !n.is_empty())
    {
        if !names.iter().any(|n| n == name) && names.len() < MAX_LEAF_TOOLS {
            names.push(name.to_owned());
        }
    }
    names
}

fn headline(line: &str) -> Option<(usize, &str)> {
    let depth = line.bytes().take_while(|&b| b == b'*').count();
    if depth == 0 {
        return None;
    }
    let rest = &line[depth..];
    rest.starts_with(' ').then(|| (depth, rest.trim()))
}

fn property(line: &str) -> Option<(String, String)> {
    let rest = line.strip_prefix(':')?;
    let (key, value) = rest.split_once(':')?;
    if key.is_empty() || key.contains(char::is_whitespace) {
        return None;
    }
    Some((key.to_owned(), value.trim().to_owned()))
}

/// Drops trailing org tags (`:tag1:tag2:`) from a headline's text.
fn strip_tags(text: &str) -> String {
    let text = text.trim();
    if let Some((head, last)) = text.rsplit_once(char::is_whitespace) {
        if last.len() > 2 && last.starts_with(':') && last.ends_with(':') {
            return head.trim().to_owned();
        }
    } else if text.len() > 2 && text.starts_with(':') && text.ends_with(':') {
        return String::new();
    }
    text.to_owned()
}

fn strip_prefix_ci<'a>(line: &'a str, prefix: &str) -> Option<&'a str> {
    let head = line.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &line[prefix.len()..])
}

fn trim_lines(lines: &[String]) -> String {
    let start = lines.iter().position(|l| !l.trim().is_empty());
    let end = lines.iter().rposition(|l| !l.trim().is_empty());
    match (start, end) {
        (Some(s), Some(e)) => lines[s..=e]
            .iter()
            .map(|l| l.trim())
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

impl fmt::Display for Leaf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.keyword, self.title)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const SEED_PLAN: &str = "```org
#+TITLE: Research E2B and Daytona Pricing

* TODO Gather E2B Pricing Information
  :PROPERTIES:
  :ORDERED: t
  :END:
  - Use `curl` to download the official E2B pricing page
  :done-when: test -s scratch/e2b_pricing.html

* TODO Consolidate Findings into Report
  :PROPERTIES:
  :ORDERED: t
  :END:
  - Combine the per-source files into `scratch/REPORT.org`
  :done-when: test -s scratch/REPORT.org
```";

    #[test]
    fn reads_a_fenced_plan() {
        let plan = parse(SEED_PLAN).unwrap();
        assert_eq!(plan.title, "Research E2B and Daytona Pricing");
        assert_eq!(plan.leaves.len(), 2);
        let first = &plan.leaves[0];
        assert_eq!(first.title, "Gather E2B Pricing Information");
        assert_eq!(
            first.done_when.as_deref(),
            Some("test -s scratch/e2b_pricing.html")
        );
        assert!(first.ordered);
        assert_eq!(
            first.body,
            "- Use `curl` to download the official E2B pricing page"
        );
        assert!(!plan.text.contains("```"));
        assert!(plan.text.starts_with("#+TITLE:"));
    }

    #[test]
    fn tells_which_gates_can_never_pass() {
        assert_eq!(parse(SEED_PLAN).unwrap().unusable_gates(|_| None), None);
        let plan = parse(
            "#+TITLE: t\n\
             * TODO List /srv/data\n  :done-when: test -s /srv/data\n\
             * TODO Fetch\n  :done-when: curl -s https://example.com\n\
             * TODO Ungated\n\
             * TODO Report\n  :done-when: test -s scratch/REPORT.org\n",
        )
        .unwrap();
        let told = plan.unusable_gates(|_| None).unwrap();
        assert!(
            told.starts_with(
                "leaf \"List /srv/data\": `:done-when: test -s /srv/data` can never pass \
                 (path_outside_run: path \"/srv/data\" is outside the run directory); \
                 leaf \"Fetch\": `:done-when: curl -s https://example.com` can never pass \
                 (unknown_command: "
            ),
            "{told}"
        );
        assert!(
            !told.contains("Report") && !told.contains("Ungated"),
            "{told}"
        );
        assert!(
            told.ends_with(
                "such as `call fs.get_file_info {\"path\": \"/srv/docs/CHANGELOG.txt\"}`"
            ),
            "{told}"
        );

        // A file check outside the run is shown as the rewrite offered for it.
        let rewrite = |o: &gate::Outside| {
            Some(format!(
                "call fs.get_file_info {{\"path\": {:?}}}{}",
                o.path,
                o.holds
                    .as_ref()
                    .map(|h| format!(" contains {h:?}"))
                    .unwrap_or_default()
            ))
        };
        let told = plan.unusable_gates(rewrite).unwrap();
        assert!(
            told.contains(
                "outside the run directory), so write \
                 `:done-when: call fs.get_file_info {\"path\": \"/srv/data\"}` instead; \
                 leaf \"Fetch\""
            ),
            "{told}"
        );

        let many: String = (0..10)
            .map(|i| {
                format!(
                    "* TODO Step {i} {}\n  :done-when: rm -rf /\n",
                    "x".repeat(500)
                )
            })
            .collect();
        let told = parse(&many).unwrap().unusable_gates(|_| None).unwrap();
        assert!(told.contains("; and 7 more."), "{told}");
        assert!(told.len() < 1_200, "{} bytes", told.len());
    }

    #[test]
    fn tells_which_steps_borrow_a_later_step_s_gate() {
        // As the 1.5B model wrote it (recorded): the reading step is checked on the
        // report the writing step makes.
        let plan = parse(
            "#+TITLE: Count the files\n\
             * TODO Read /srv/docs\n  :PROPERTIES:\n  :TOOLS: fs.list_directory\n  :END:\n  \
             Read /srv/docs with fs.list_directory.\n  :done-when: test -s scratch/REPORT.org\n\
             * TODO Write the count\n  :PROPERTIES:\n  :TOOLS: files.write_file\n  :END:\n  \
             Write it.\n  :done-when: test -s scratch/REPORT.org\n",
        )
        .unwrap();
        let writes = |tool: &str| tool == "files.write_file";
        let rewrite =
            |o: &gate::Outside| Some(format!("call fs.get_file_info {{\"path\": {:?}}}", o.path));
        assert_eq!(
            plan.borrowed_gates(writes, rewrite).unwrap(),
            "a step is checked on its own work: \"Read /srv/docs\" makes no file here, yet its \
             check `test -s scratch/REPORT.org` is a later step's, so write \
             `:done-when: call fs.get_file_info {\"path\": \"/srv/docs\"}` instead"
        );
        assert!(
            plan.borrowed_gates(writes, |_| None)
                .unwrap()
                .ends_with("so check what this step itself does")
        );
        // A step that writes there, or names no tools, or the last step: its own.
        assert_eq!(plan.borrowed_gates(|_| true, rewrite), None);
        let plan = parse(
            "#+TITLE: t\n\
             * TODO Read\n  :done-when: test -s scratch/REPORT.org\n\
             * TODO Write\n  :PROPERTIES:\n  :TOOLS: fs.read_text_file\n  :END:\n  \
             :done-when: test -s scratch/REPORT.org\n",
        )
        .unwrap();
        assert_eq!(plan.borrowed_gates(writes, rewrite), None);
        assert_eq!(
            parse(SEED_PLAN).unwrap().borrowed_gates(writes, rewrite),
            None
        );
        // Another check of the same file (recorded: the fetching step checked the
        // report that the writing step greps).
        let plan = parse(
            "#+TITLE: t\n\
             * TODO Fetch the name from http://127.0.0.1:36795/about\n  :PROPERTIES:\n  \
             :TOOLS: http.request\n  :END:\n  :done-when: test -s scratch/REPORT.org\n\
             * TODO Write the name\n  :PROPERTIES:\n  :TOOLS: files.write_file\n  :END:\n  \
             :done-when: grep -q \"About us\" scratch/REPORT.org && grep -q Name scratch/REPORT.org\n",
        )
        .unwrap();
        assert!(
            plan.borrowed_gates(writes, rewrite)
                .unwrap()
                .contains("check `test -s scratch/REPORT.org` is a later step's"),
        );
        assert_eq!(
            first_absolute_path("Read \"/srv/my-docs/a.txt\". Then /b").as_deref(),
            Some("/srv/my-docs/a.txt")
        );
        assert_eq!(first_absolute_path("Use scratch/a and http://x/y"), None);
    }

    #[test]
    fn tells_which_steps_have_no_gate() {
        assert_eq!(parse(SEED_PLAN).unwrap().gateless_leaves(), None);
        let plan = parse(
            "#+TITLE: t\n\
             * TODO Read\n  :done-when: test -s scratch/notes.org\n\
             * TODO Think it over\n  Nothing to check.\n\
             * TODO Report\n",
        )
        .unwrap();
        assert_eq!(
            plan.gateless_leaves().unwrap(),
            "2 of 3 steps have no `:done-when:` line (\"Think it over\", \"Report\"); a step \
             counts as done only when its check passes, so give each step one line such as \
             `:done-when: test -s scratch/REPORT.org` naming what that step makes"
        );
        let many: String = (0..10).map(|i| format!("* TODO Step {i}\n")).collect();
        let told = parse(&many).unwrap().gateless_leaves().unwrap();
        assert!(
            told.starts_with("10 of 10 steps have no `:done-when:` line (\"Step 0\", \"Step 1\", \"Step 2\" and 7 more)"),
            "{told}"
        );
    }

    #[test]
    fn tells_which_steps_have_a_gate_that_looks_at_nothing() {
        assert_eq!(parse(SEED_PLAN).unwrap().blind_gates(), None);
        let plan = parse(
            "#+TITLE: t\n\
             * TODO Read\n  :done-when: test -s scratch/notes.org && ! false\n\
             * TODO Nod\n  :done-when: test -s scratch/notes.org || true\n\
             * TODO Agree\n  :done-when: ! false && test -n yes && test a = a\n\
             * TODO Look\n  :done-when: call fs.get_file_info {\"path\": \"/srv\"}\n\
             * TODO Broken\n  :done-when: rm -rf /\n\
             * TODO None\n",
        )
        .unwrap();
        assert_eq!(
            plan.blind_gates().unwrap(),
            "2 of 6 steps have a check that passes whatever the step did (\"Nod\" \
             (`:done-when: test -s scratch/notes.org || true`), \"Agree\" (`:done-when: ! \
             false && test -n yes && test a = a`)); check what the step makes, such as `:done-when: \
             test -s scratch/REPORT.org`, or, for a step that acts outside the run, one \
             read-only tool call that shows it done"
        );
    }

    #[test]
    fn rejects_outlines_without_real_tasks() {
        for answer in [
            "#+TITLE: nothing\n* Notes\nsome text",
            "* TODO\n* TODO :tag:",
            "* TODO   !!!",
            "TODO not a headline",
            "*TODO missing space",
        ] {
            let err = parse(answer).unwrap_err();
            assert_eq!(err.code(), "no_todo_headings", "{answer:?}");
        }
        assert_eq!(parse("```\n```").unwrap_err().code(), "empty_plan");
    }

    #[test]
    fn parents_are_not_leaves() {
        let colon =
            parse("#+TITLE: t\n* TODO: Write hello\n** NEXT:\tand then\nTODO: not a headline\n")
                .unwrap();
        assert_eq!(colon.leaves[0].keyword, "NEXT");
        assert_eq!(colon.leaves[0].title, "and then");
        assert_eq!(
            colon.text,
            "#+TITLE: t\n* TODO Write hello\n** NEXT\tand then\nTODO: not a headline\n"
        );
        assert!(parse("* TODO:Write\n").is_err(), "no space: not a keyword");
        let plan = parse("* TODO Parent\n** TODO Child one\n** NEXT Child two\n* DOING Sibling\n")
            .unwrap();
        let titles: Vec<_> = plan.leaves.iter().map(|l| l.title.as_str()).collect();
        assert_eq!(titles, ["Child one", "Child two", "Sibling"]);
        assert_eq!(plan.leaves[2].index, 2);
        assert_eq!(plan.title, "Child one");
    }

    #[test]
    fn reports_structural_mistakes_with_their_line() {
        let err = parse("* TODO a\n:PROPERTIES:\n:ORDERED: t\n* TODO b\n").unwrap_err();
        assert_eq!(err, Error::UnclosedDrawer { line: 2 });
        let err = parse("* TODO a\n:done-when: test -e x\n:done-when: test -e y\n").unwrap_err();
        assert_eq!(err.code(), "duplicate_gate");
        let many: String = (0..40).map(|i| format!("* TODO task {i}\n")).collect();
        assert_eq!(parse(&many).unwrap_err().code(), "too_many_leaves");
        assert_eq!(
            parse(&"x".repeat(MAX_PLAN_BYTES + 1)).unwrap_err().code(),
            "plan_too_large"
        );
        let poison = format!("* TODO x\n  :done-when: {}true\n", "! ".repeat(3950));
        assert_eq!(parse(&poison).unwrap_err().code(), "gate_too_large");
        // An unknown command is not a malformed plan: the gate fails when checked.
        assert!(parse("* TODO x\n  :done-when: curl example.com\n").is_ok());
    }

    #[test]
    fn leaves_are_the_tasks_with_no_task_below() {
        let nested = "* TODO a\n** TODO b\n*** TODO c\n** TODO d\n*** note\n* TODO e\n";
        let titles: Vec<_> = parse(nested)
            .unwrap()
            .leaves
            .into_iter()
            .map(|l| l.title)
            .collect();
        assert_eq!(titles, ["c", "d", "e"]);
        // A long chain of nested tasks (the whole byte budget) still parses; its
        // deepest task is its one leaf.
        let chain: String = (1..=200)
            .map(|d| format!("{} TODO t{d}\n", "*".repeat(d)))
            .collect();
        let plan = parse(&chain).unwrap();
        assert_eq!(plan.leaves.len(), 1);
        assert_eq!(plan.leaves[0].title, "t200");
    }

    #[test]
    fn slugs_are_short_and_safe() {
        assert_eq!(
            slug("Research E2B (e2b.dev) and Daytona pricing!"),
            "research-e2b-e2b-dev-and-daytona-pricing"
        );
        assert_eq!(slug("¿¿??"), "goal");
        assert!(slug(&"word ".repeat(40)).len() <= 48);
        assert_eq!(slug(&"a".repeat(100)).len(), 48);
    }

    proptest! {
        #[test]
        fn parse_never_panics(answer in ".{0,400}") {
            let _ = parse(&answer);
        }

        #[test]
        fn slug_is_always_a_safe_file_name(goal in ".{0,200}") {
            let s = slug(&goal);
            prop_assert!(!s.is_empty() && s.len() <= 48);
            prop_assert!(s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'));
        }
    }
}
