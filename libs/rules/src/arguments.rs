//! What a call's arguments name: every string in them, each with what the tool's
//! schema says it is, for the `path_prefix` and `url_host` conditions to judge.
//!
//! A schema "says so" with `format`: `"path"` marks a path, `"uri"`, `"url"`,
//! `"iri"` (and their `-reference` forms) a URL. When a tool's schema marks any path,
//! its other declared string arguments are taken at its word as not being paths;
//! when it marks none, every string is a path, because any string names a file
//! relative to some directory and nothing tells which ones do not. URLs the same way,
//! except that without marks only strings written as URLs (`scheme://…`, `//…`)
//! count for a rule that allows.
//!
//! Whatever the schema marks, a value it does not describe (an argument it does not
//! declare, a value of another type than declared, composition it does not resolve)
//! is read as unknown: every string in it, and every key of an object in it, counts
//! as both. Argument names themselves are not paths. What is read is bounded in depth
//! and count; past the bounds the arguments are unreadable.

use serde_json::Value;

/// Deepest nesting of arguments (and of `$ref`s in the schema) read.
const MAX_DEPTH: usize = 32;
/// Most strings read from one call's arguments.
const MAX_STRINGS: usize = 1024;
/// Most schema nodes looked at when finding its marks.
const MAX_SCHEMA_NODES: usize = 4096;

/// What the schema says a string is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// Marked `format: path`.
    Path,
    /// Marked with a URL format.
    Url,
    /// Declared by the schema, with no mark.
    Declared,
    /// Not described by the schema, or under a value that is not.
    Unknown,
}

/// The strings of a call's arguments and what each is.
#[derive(Debug, Default)]
pub(crate) struct Named<'a> {
    pub strings: Vec<(&'a str, Role)>,
    /// The schema marks some argument a path (so its unmarked ones are not).
    pub paths_marked: bool,
    /// The schema marks some argument a URL.
    pub urls_marked: bool,
    /// A marked path that is not a string (nor null): nothing to judge it by.
    pub odd_path: bool,
    /// A marked URL that is not a string (nor null).
    pub odd_url: bool,
}

impl Named<'_> {
    /// The strings a path condition judges.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.strings.iter().filter_map(|(s, role)| {
            let is = match role {
                Role::Path | Role::Unknown => true,
                Role::Declared | Role::Url => !self.paths_marked,
            };
            is.then_some(*s)
        })
    }

    /// The strings a URL condition judges, and whether each is certainly meant as a
    /// URL (marked so) rather than a string that may be one.
    pub fn urls(&self) -> impl Iterator<Item = (&str, bool)> {
        self.strings.iter().filter_map(|(s, role)| match role {
            Role::Url => Some((*s, true)),
            Role::Unknown => Some((*s, false)),
            Role::Declared if !self.urls_marked => Some((*s, false)),
            Role::Declared | Role::Path => None,
        })
    }
}

/// Why the arguments could not be read.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Unreadable;

/// Reads `args` (a call's arguments, a JSON object) against `schema` (the tool's
/// input schema, if known).
pub(crate) fn read<'a>(args: &'a Value, schema: Option<&Value>) -> Result<Named<'a>, Unreadable> {
    let Value::Object(top) = args else {
        return Err(Unreadable);
    };
    let schema = schema.filter(|s| s.is_object());
    let mut named = Named::default();
    if let Some(schema) = schema {
        let mut budget = MAX_SCHEMA_NODES;
        named.paths_marked = marks(schema, &|f| f == "path", &mut budget);
        named.urls_marked = marks(schema, &is_url_format, &mut budget);
    }
    let mut walk = Walk {
        root: schema,
        named,
    };
    // The top level's keys are argument names, never data.
    match schema {
        Some(schema) => walk.object(top, schema, 0)?,
        None => {
            for value in top.values() {
                walk.unknown(value, 1)?;
            }
        }
    }
    Ok(walk.named)
}

fn is_url_format(format: &str) -> bool {
    matches!(
        format,
        "uri" | "url" | "iri" | "uri-reference" | "iri-reference"
    )
}

/// Whether any node of `schema` has a `format` that `is` accepts.
fn marks(schema: &Value, is: &dyn Fn(&str) -> bool, budget: &mut usize) -> bool {
    if *budget == 0 {
        return false;
    }
    *budget -= 1;
    match schema {
        Value::Object(map) => {
            map.get("format").and_then(Value::as_str).is_some_and(is)
                || map.values().any(|v| marks(v, is, budget))
        }
        Value::Array(items) => items.iter().any(|v| marks(v, is, budget)),
        _ => false,
    }
}

struct Walk<'a, 's> {
    /// The whole schema, where `$ref`s point.
    root: Option<&'s Value>,
    named: Named<'a>,
}

impl<'a, 's> Walk<'a, 's> {
    fn push(&mut self, s: &'a str, role: Role) -> Result<(), Unreadable> {
        if self.named.strings.len() == MAX_STRINGS {
            return Err(Unreadable);
        }
        self.named.strings.push((s, role));
        Ok(())
    }

    /// A value the schema does not describe: every string and key in it is unknown.
    fn unknown(&mut self, value: &'a Value, depth: usize) -> Result<(), Unreadable> {
        if depth > MAX_DEPTH {
            return Err(Unreadable);
        }
        match value {
            Value::String(s) => self.push(s, Role::Unknown),
            Value::Array(items) => items.iter().try_for_each(|v| self.unknown(v, depth + 1)),
            Value::Object(map) => map.iter().try_for_each(|(k, v)| {
                self.push(k, Role::Unknown)?;
                self.unknown(v, depth + 1)
            }),
            Value::Null | Value::Bool(_) | Value::Number(_) => Ok(()),
        }
    }

    /// A value the schema `schema` describes.
    fn value(
        &mut self,
        value: &'a Value,
        schema: &'s Value,
        depth: usize,
    ) -> Result<(), Unreadable> {
        if depth > MAX_DEPTH {
            return Err(Unreadable);
        }
        let Some(schema) = self.resolve(schema, depth) else {
            return self.unknown(value, depth);
        };
        let mark = mark_of(schema);
        match (value, mark) {
            (Value::Null, _) => Ok(()),
            (Value::String(s), Some(role)) => self.push(s, role),
            (Value::String(s), None) if declares(schema, "string") => self.push(s, Role::Declared),
            (_, Some(role)) => {
                match role {
                    Role::Path => self.named.odd_path = true,
                    _ => self.named.odd_url = true,
                }
                self.unknown(value, depth)
            }
            (Value::Bool(_) | Value::Number(_), None) => Ok(()),
            (Value::Array(items), None) => match schema.get("items") {
                Some(items_schema) if items_schema.is_object() => items
                    .iter()
                    .try_for_each(|v| self.value(v, items_schema, depth + 1)),
                _ => self.unknown(value, depth),
            },
            (Value::Object(map), None) if declares(schema, "object") => {
                self.object(map, schema, depth)
            }
            _ => self.unknown(value, depth),
        }
    }

    /// An object described by `schema`: declared properties by their schemas, keys of
    /// a declared map as declared strings, anything else unknown (its key too, below
    /// the top level).
    fn object(
        &mut self,
        map: &'a serde_json::Map<String, Value>,
        schema: &'s Value,
        depth: usize,
    ) -> Result<(), Unreadable> {
        let properties = schema.get("properties").and_then(Value::as_object);
        let additional = schema.get("additionalProperties").filter(|a| a.is_object());
        let key_role = match schema
            .get("propertyNames")
            .and_then(|p| self.resolve(p, depth))
            .and_then(mark_of)
        {
            Some(role) => role,
            None => Role::Declared,
        };
        for (key, value) in map {
            if let Some(declared) = properties.and_then(|p| p.get(key)) {
                self.value(value, declared, depth + 1)?;
            } else if let Some(additional) = additional {
                if depth > 0 {
                    self.push(key, key_role)?;
                }
                self.value(value, additional, depth + 1)?;
            } else {
                if depth > 0 {
                    self.push(key, Role::Unknown)?;
                }
                self.unknown(value, depth + 1)?;
            }
        }
        Ok(())
    }

    /// `schema` with a local `$ref` followed and a nullable union (`anyOf`/`oneOf`
    /// of one schema and `null`) taken as its one schema; `None` for what cannot be
    /// read that way.
    fn resolve(&self, schema: &'s Value, depth: usize) -> Option<&'s Value> {
        if depth > MAX_DEPTH || !schema.is_object() {
            return None;
        }
        if let Some(reference) = schema.get("$ref") {
            let pointer = reference.as_str()?.strip_prefix('#')?;
            let target = self.root?.pointer(pointer)?;
            return self.resolve(target, depth + 1);
        }
        for union in ["anyOf", "oneOf"] {
            if let Some(choices) = schema.get(union) {
                let choices = choices.as_array()?;
                let mut real = choices.iter().filter(|c| !is_null_schema(c));
                let one = real.next()?;
                return match real.next() {
                    None => self.resolve(one, depth + 1),
                    // Choices that disagree are not guessed between, but a choice
                    // marked a path or URL keeps its mark.
                    Some(_) => choices
                        .iter()
                        .filter_map(|c| self.resolve(c, depth + 1))
                        .find(|c| mark_of(c).is_some()),
                };
            }
        }
        if schema.get("allOf").is_some() || schema.get("not").is_some() {
            return None;
        }
        Some(schema)
    }
}

fn is_null_schema(schema: &Value) -> bool {
    schema.get("type").and_then(Value::as_str) == Some("null")
}

/// The mark a (resolved) schema puts on its value.
fn mark_of(schema: &Value) -> Option<Role> {
    match schema.get("format").and_then(Value::as_str) {
        Some("path") => Some(Role::Path),
        Some(f) if is_url_format(f) => Some(Role::Url),
        _ => None,
    }
}

/// Whether `schema` allows a value of JSON type `ty` (`type` left out allows any).
fn declares(schema: &Value, ty: &str) -> bool {
    match schema.get("type") {
        None => true,
        Some(Value::String(t)) => t == ty,
        Some(Value::Array(ts)) => ts.iter().any(|t| t == ty),
        Some(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn roles(args: Value, schema: Option<Value>) -> Vec<(String, Role)> {
        read(&args, schema.as_ref())
            .unwrap()
            .strings
            .into_iter()
            .map(|(s, r)| (s.to_owned(), r))
            .collect()
    }

    #[test]
    fn without_a_schema_every_string_below_the_argument_names_is_unknown() {
        let got = roles(
            json!({"path": "a", "edits": [{"path": "b", "n": 1}], "x": null}),
            None,
        );
        let want = [
            ("a", Role::Unknown),
            ("path", Role::Unknown),
            ("b", Role::Unknown),
            ("n", Role::Unknown),
        ];
        for (s, r) in want {
            assert!(got.contains(&(s.to_owned(), r)), "{s}: {got:?}");
        }
        assert!(!got.iter().any(|(s, _)| s == "edits"), "{got:?}");
    }

    #[test]
    fn a_schema_marks_paths_and_urls_and_leaves_undeclared_values_unknown() {
        let schema = json!({
            "type": "object",
            "properties": {
                "path": {"type": "string", "format": "path"},
                "content": {"type": "string"},
                "edits": {"type": "array", "items": {"$ref": "#/$defs/Edit"}},
                "link": {"anyOf": [{"type": "string", "format": "uri"}, {"type": "null"}]},
                "env": {"type": "object", "additionalProperties": {"type": "string"}}
            },
            "$defs": {"Edit": {"type": "object", "properties": {
                "path": {"type": "string", "format": "path"}, "oldText": {"type": "string"}}}}
        });
        let args = json!({
            "path": "p", "content": "c", "target": "/etc/shadow",
            "edits": [{"path": "e", "oldText": "o", "dest": "d"}],
            "link": "https://x", "env": {"K": "v"}
        });
        let named = read(&args, Some(&schema)).unwrap();
        assert!(named.paths_marked && named.urls_marked);
        let paths: Vec<&str> = named.paths().collect();
        for p in ["p", "e", "/etc/shadow", "dest", "d"] {
            assert!(paths.contains(&p), "{p}: {paths:?}");
        }
        for not in ["c", "o", "https://x", "K", "v"] {
            assert!(!paths.contains(&not), "{not}: {paths:?}");
        }
        let urls: Vec<(&str, bool)> = named.urls().collect();
        assert!(urls.contains(&("https://x", true)), "{urls:?}");
        assert!(urls.contains(&("/etc/shadow", false)), "{urls:?}");
        assert!(!urls.iter().any(|(u, _)| *u == "c"), "{urls:?}");
    }

    #[test]
    fn values_of_another_type_than_declared_are_unknown_and_odd_marks_are_said() {
        let schema = json!({"type": "object", "properties": {
            "path": {"type": "string", "format": "path"},
            "n": {"type": "integer"}}});
        let args = json!({"path": ["a", "b"], "n": {"x": "y"}});
        let named = read(&args, Some(&schema)).unwrap();
        assert!(named.odd_path);
        let paths: Vec<&str> = named.paths().collect();
        for p in ["a", "b", "x", "y"] {
            assert!(paths.contains(&p), "{p}: {paths:?}");
        }
        let args = json!({"path": null});
        let named = read(&args, Some(&schema)).unwrap();
        assert!(!named.odd_path && named.strings.is_empty());
    }

    #[test]
    fn what_is_read_is_bounded() {
        let mut deep = json!("x");
        for _ in 0..(MAX_DEPTH + 2) {
            deep = json!([deep]);
        }
        assert_eq!(read(&json!({"a": deep}), None).unwrap_err(), Unreadable);
        let many: Vec<String> = (0..=MAX_STRINGS).map(|i| i.to_string()).collect();
        assert_eq!(read(&json!({"a": many}), None).unwrap_err(), Unreadable);
        assert_eq!(read(&json!("not an object"), None).unwrap_err(), Unreadable);
        // A $ref that points at itself ends at the depth bound, read as unknown.
        let schema = json!({"type": "object", "properties": {"p": {"$ref": "#/properties/p"}}});
        let args = json!({"p": "v"});
        let named = read(&args, Some(&schema)).unwrap();
        assert_eq!(named.strings, vec![("v", Role::Unknown)]);
    }
}
