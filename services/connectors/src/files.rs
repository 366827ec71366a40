//! Built-in file tools, confined to a run's `scratch/` directory: the `files`
//! connector (`files.read_file`, `files.write_file`, `files.list_files`).
//!
//! Paths are relative to the run directory and must lie under `scratch/`
//! (`scratch/notes.org`), the workspace the leaves of one run share.

use std::path::Path;

use dispatch_bus::catalogue::{Risk, ToolEntry};
use serde::Deserialize;

use dispatch_confine as confine;

/// The largest file `write_file` writes and `read_file` returns.
pub const MAX_FILE_BYTES: usize = 256 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("unknown tool {0:?}; the files connector has read_file, write_file and list_files")]
    UnknownTool(String),
    #[error("bad arguments for {tool}: {message}")]
    BadArgs { tool: String, message: String },
    #[error(transparent)]
    Confine(#[from] confine::Error),
    #[error("{path} is {size} bytes; tools handle files up to {MAX_FILE_BYTES} bytes")]
    TooLarge { path: String, size: usize },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PathArgs {
    path: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WriteArgs {
    path: String,
    content: String,
}

/// The connector's name: the namespace of its tools.
pub const CONNECTOR: &str = "files";

/// The catalogue entries of the file tools. `write_file` replaces a file, but only
/// inside the run's own scratch directory, which nothing outside the run reads: it is
/// a `write`, not a `destructive`, tool. Each `path` is marked `"format": "path"`, so
/// the policy's `path_prefix` judges it and not the content written.
pub fn entries() -> Vec<ToolEntry> {
    let path =
        |what: &str| serde_json::json!({"type": "string", "format": "path", "description": what});
    let object = |properties: serde_json::Value, required: &[&str]| {
        serde_json::json!({
            "type": "object",
            "properties": properties,
            "required": required,
            "additionalProperties": false,
        })
    };
    let entry = |tool, description, parameters, risk| {
        ToolEntry::builtin(CONNECTOR, tool, description, parameters, risk)
    };
    vec![
        entry(
            "read_file",
            "Read a text file under scratch/.",
            object(
                serde_json::json!({"path": path("the file, e.g. scratch/notes.org")}),
                &["path"],
            ),
            Risk::Read,
        ),
        entry(
            "write_file",
            "Write a text file under scratch/, replacing it if it exists.",
            object(
                serde_json::json!({
                    "path": path("the file, e.g. scratch/REPORT.org"),
                    "content": {"type": "string", "description": "the whole new content"},
                }),
                &["path", "content"],
            ),
            Risk::Write,
        ),
        entry(
            "list_files",
            "List a directory under scratch/.",
            object(
                serde_json::json!({"path": path("the directory, e.g. scratch")}),
                &["path"],
            ),
            Risk::Read,
        ),
    ]
}

/// Runs built-in `tool` (its name inside the connector) with `args_json` in the run directory `run_dir`.
pub fn call(run_dir: &Path, tool: &str, args_json: &str) -> Result<String, Error> {
    match tool {
        "read_file" => {
            let args: PathArgs = parse(tool, args_json)?;
            read_file(run_dir, &args.path)
        }
        "write_file" => {
            let args: WriteArgs = parse(tool, args_json)?;
            write_file(run_dir, &args.path, &args.content)
        }
        "list_files" => {
            let args: PathArgs = parse(tool, args_json)?;
            list_files(run_dir, &args.path)
        }
        other => Err(Error::UnknownTool(other.to_owned())),
    }
}

fn parse<T: serde::de::DeserializeOwned>(tool: &str, args_json: &str) -> Result<T, Error> {
    serde_json::from_str(args_json).map_err(|e| Error::BadArgs {
        tool: tool.to_owned(),
        message: e.to_string(),
    })
}

/// The run's `scratch/` directory and `path` (relative to the run directory) inside it.
fn in_scratch<'p>(run_dir: &Path, path: &'p str) -> Result<(confine::Root, &'p str), Error> {
    let trimmed = path.trim_start_matches("./");
    let rest = match trimmed.strip_prefix("scratch") {
        Some("" | "/") => ".",
        Some(rest) if rest.starts_with('/') => &rest[1..],
        _ => return Err(confine::Error::Outside(path.to_owned(), "scratch/").into()),
    };
    let run = confine::Root::open(run_dir, "the run directory")?;
    Ok((run.subdir("scratch", "scratch/")?, rest))
}

fn read_file(run_dir: &Path, path: &str) -> Result<String, Error> {
    let (scratch, rest) = in_scratch(run_dir, path)?;
    let bytes = scratch
        .read(rest, MAX_FILE_BYTES as u64)
        .map_err(|e| named(e, path))?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

fn write_file(run_dir: &Path, path: &str, content: &str) -> Result<String, Error> {
    if content.len() > MAX_FILE_BYTES {
        return Err(Error::TooLarge {
            path: path.to_owned(),
            size: content.len(),
        });
    }
    let (scratch, rest) = in_scratch(run_dir, path)?;
    scratch
        .write(rest, content.as_bytes())
        .map_err(|e| named(e, path))?;
    Ok(format!("wrote {} bytes to {path}", content.len()))
}

fn list_files(run_dir: &Path, path: &str) -> Result<String, Error> {
    let (scratch, rest) = in_scratch(run_dir, path)?;
    Ok(scratch.list(rest).map_err(|e| named(e, path))?.join("\n"))
}

/// A confinement error about the path inside `scratch/`, told with the path the
/// model gave (relative to the run directory).
fn named(error: confine::Error, path: &str) -> Error {
    use confine::Error as C;
    let path = path.to_owned();
    Error::Confine(match error {
        C::Outside(_, root) => C::Outside(path, root),
        C::Symlink(_) => C::Symlink(path),
        C::Missing(_) => C::Missing(path),
        C::IsDirectory(_) => C::IsDirectory(path),
        C::NotAFile(_) => C::NotAFile(path),
        C::TooLarge { size, max, .. } => C::TooLarge { path, size, max },
        C::Io(_, message) => C::Io(path, message),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_reads_and_lists_inside_scratch() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path();
        std::fs::create_dir_all(run.join("scratch")).unwrap();
        call(
            run,
            "write_file",
            r#"{"path":"scratch/a/b.org","content":"hi"}"#,
        )
        .unwrap();
        assert_eq!(
            call(run, "read_file", r#"{"path":"scratch/a/b.org"}"#).unwrap(),
            "hi"
        );
        assert_eq!(
            call(run, "list_files", r#"{"path":"scratch"}"#).unwrap(),
            "a/"
        );
        assert_eq!(
            call(run, "list_files", r#"{"path":"scratch/a"}"#).unwrap(),
            "b.org"
        );
    }

    #[test]
    fn refuses_paths_outside_scratch_and_bad_arguments() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path();
        std::fs::create_dir_all(run.join("scratch")).unwrap();
        std::os::unix::fs::symlink("/etc", run.join("scratch/etc")).unwrap();
        let cases = [
            ("write_file", r#"{"path":"../x","content":""}"#, "outside"),
            (
                "write_file",
                r#"{"path":"scratch/../../x","content":""}"#,
                "outside",
            ),
            (
                "write_file",
                r#"{"path":"TASKS.org","content":""}"#,
                "outside",
            ),
            ("read_file", r#"{"path":"/etc/passwd"}"#, "outside"),
            ("read_file", r#"{"path":"scratch/etc/passwd"}"#, "symlink"),
            (
                "write_file",
                r#"{"path":"scratch/etc/x","content":""}"#,
                "symlink",
            ),
            ("read_file", r#"{"path":1}"#, "bad arguments"),
            (
                "write_file",
                r#"{"path":"scratch/x","content":"","mode":"0777"}"#,
                "unknown field",
            ),
            ("shell", r#"{}"#, "unknown tool"),
        ];
        for (tool, args, expect) in cases {
            let err = call(run, tool, args).unwrap_err().to_string();
            assert!(err.contains(expect), "{tool} {args}: {err}");
        }
        assert!(!dir.path().join("x").exists());
    }
}
