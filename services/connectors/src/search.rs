//! `tools.search`: finds tools in the catalogue by words.
//!
//! A step whose author named its tools is offered those and this one, instead of every
//! tool's schema on every turn (18 schemas were ~2,800 prompt tokens a request, and 53 s
//! of prompt evaluation for a 1.5B model on two cores). The model searches when it
//! needs another; the dispatcher offers what a search in the step found from then on.
//! It reads the catalogue only, so it is a read.

use dispatch_bus::async_nats::jetstream::kv;
use dispatch_bus::catalogue::{Risk, Snapshot, ToolEntry};
use serde::Deserialize;

pub const CONNECTOR: &str = "tools";
pub const TOOL: &str = "search";

/// The most tools one search names.
const MAX_FOUND: usize = 8;
/// The most of a tool's description a search quotes, in characters.
const DESCRIPTION_CHARS: usize = 160;
/// The longest query read, in characters.
const MAX_QUERY_CHARS: usize = 200;

pub fn entry() -> ToolEntry {
    ToolEntry::builtin(
        CONNECTOR,
        TOOL,
        "Find more tools by words, such as \"read file\" or \"fetch web page\": lists the \
         tools that match, which you can call from then on.",
        serde_json::json!({
            "type": "object",
            "properties": {"query": {"type": "string", "description": "words saying what the tool should do"}},
            "required": ["query"],
            "additionalProperties": false,
        }),
        Risk::Read,
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Args {
    query: String,
}

/// The tools of `store`'s catalogue that match the query in `args_json`, one per line
/// (`- <name> (<risk>): <description>`), best first.
pub async fn search(store: &kv::Store, args_json: &str) -> Result<String, String> {
    let args: Args = serde_json::from_str(args_json)
        .map_err(|e| format!("tools.search takes {{\"query\": \"words\"}}: {e}"))?;
    let snapshot = Snapshot::read(store)
        .await
        .map_err(|e| format!("cannot read the tool catalogue: {e}"))?;
    Ok(answer(&args.query, snapshot.tools.values()))
}

/// What a search for `query` among `tools` says.
fn answer<'a>(query: &str, tools: impl Iterator<Item = &'a ToolEntry>) -> String {
    let query: String = query.chars().take(MAX_QUERY_CHARS).collect();
    let words = words(&query);
    let mut scored: Vec<(usize, &ToolEntry)> = tools
        .filter(|t| t.name != format!("{CONNECTOR}.{TOOL}"))
        .map(|t| (score(&words, t), t))
        .filter(|(score, _)| *score > 0)
        .collect();
    // Best first; equal scores by name, so the answer is the same every time.
    scored.sort_by(|(a, x), (b, y)| b.cmp(a).then_with(|| x.name.cmp(&y.name)));
    if scored.is_empty() {
        return format!("no tool matches {query:?}; try other words");
    }
    let mut out = format!("tools that match {query:?}:\n");
    for (_, tool) in scored.into_iter().take(MAX_FOUND) {
        let description: String = tool
            .description
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .chars()
            .take(DESCRIPTION_CHARS)
            .collect();
        out.push_str(&format!(
            "- {} ({}): {description}\n",
            tool.name,
            tool.risk.word()
        ));
    }
    out
}

/// The words of `text` that say something: lowercase, two letters or more, split at
/// anything but letters and digits (so `read_text_file` is three words).
fn words(text: &str) -> Vec<String> {
    const SAID_OF_EVERY_TOOL: [&str; 8] = ["the", "a", "an", "to", "of", "and", "or", "tool"];
    let mut out: Vec<String> = Vec::new();
    for word in text
        .split(|c: char| !c.is_alphanumeric())
        .map(str::to_lowercase)
        .filter(|w| w.chars().count() >= 2 && !SAID_OF_EVERY_TOOL.contains(&w.as_str()))
    {
        if !out.contains(&word) {
            out.push(word);
        }
    }
    out
}

/// How well `tool` matches: each query word in its name counts 3, in its description 1.
fn score(query: &[String], tool: &ToolEntry) -> usize {
    let name = words(&tool.name);
    let description = words(&tool.description);
    let holds = |list: &[String], word: &str| {
        list.iter()
            .any(|w| w == word || (word.len() >= 4 && w.starts_with(word)))
    };
    query
        .iter()
        .map(|w| 3 * usize::from(holds(&name, w)) + usize::from(holds(&description, w)))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tool(name: &str, description: &str, risk: Risk) -> ToolEntry {
        let (connector, tool) = name.split_once('.').unwrap();
        ToolEntry::builtin(connector, tool, description, serde_json::json!({}), risk)
    }

    #[test]
    fn finds_tools_by_the_words_of_their_names_and_descriptions() {
        let tools = [
            tool(
                "fs.read_text_file",
                "Read the complete contents of a file as text.",
                Risk::Read,
            ),
            tool(
                "fs.write_file",
                "Create a new file or overwrite an existing file.",
                Risk::Destructive,
            ),
            tool(
                "fs.list_directory",
                "Get a detailed listing of all files and directories.",
                Risk::Read,
            ),
            tool(
                "http.request",
                "Send an HTTP request to an allowed host and read the response.",
                Risk::External,
            ),
            entry(),
        ];
        let found = answer("read a file", tools.iter());
        let lines: Vec<&str> = found.lines().collect();
        assert_eq!(lines[0], "tools that match \"read a file\":");
        assert!(
            lines[1].starts_with("- fs.read_text_file (read): Read the complete"),
            "{found}"
        );
        assert!(!found.contains("tools.search"), "{found}");
        let web = answer("fetch a web page over http", tools.iter());
        assert!(
            web.lines()
                .nth(1)
                .unwrap()
                .starts_with("- http.request (external)"),
            "{web}"
        );
        assert_eq!(
            answer("compress an archive", tools.iter()),
            "no tool matches \"compress an archive\"; try other words"
        );
        // However long the catalogue, an answer names at most a few tools.
        let many: Vec<ToolEntry> = (0..50)
            .map(|i| tool(&format!("x.read_{i}"), "read things", Risk::Read))
            .collect();
        assert_eq!(answer("read", many.iter()).lines().count(), 1 + MAX_FOUND);
    }
}
