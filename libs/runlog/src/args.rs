//! A call's arguments in their one form.
//!
//! The arguments a model writes are canonicalised once, when the dispatcher records
//! the call (`ToolCallRequested`): parsed strictly (one JSON object, no key twice at
//! any depth, bounded), then written again with every object's keys sorted and no
//! whitespace. That text is what the policy checks, what a person is shown (with its
//! digest), what an answer to an approval names, and what a connector executes; each
//! of them refuses arguments that are not in this form. Without it, `{"target": "/srv/
//! cache (routine, safe)", …, "target": "/"}` shows a person one thing and runs another
//! (JSON parsers keep the last of two equal keys).

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use sha2::{Digest as _, Sha256};

/// The largest arguments a call may have, in bytes of their canonical form.
pub const MAX_ARGS_BYTES: usize = 256 * 1024;

/// A call's arguments in canonical form, and their digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Canonical {
    pub json: String,
    /// `sha256:<hex>` of `json`.
    pub digest: String,
}

/// Canonicalises `args_json`; `Err` says why the arguments are refused.
pub fn canonical(args_json: &str) -> Result<Canonical, String> {
    if args_json.len() > MAX_ARGS_BYTES * 2 {
        return Err(format!(
            "the arguments are {} bytes, more than the {MAX_ARGS_BYTES} a call may have",
            args_json.len()
        ));
    }
    let mut deserializer = serde_json::Deserializer::from_str(args_json);
    let value =
        <Strict as de::Deserialize>::deserialize(&mut deserializer).map_err(|e| e.to_string())?;
    deserializer.end().map_err(|e| e.to_string())?;
    let Strict(value) = value;
    if !value.is_object() {
        return Err("the arguments must be one JSON object".into());
    }
    let json = value.to_string();
    if json.len() > MAX_ARGS_BYTES {
        return Err(format!(
            "the arguments are {} bytes, more than the {MAX_ARGS_BYTES} a call may have",
            json.len()
        ));
    }
    let digest = digest(&json);
    Ok(Canonical { json, digest })
}

/// Whether `args_json` is in canonical form (and so what it says is what runs).
pub fn is_canonical(args_json: &str) -> Result<(), String> {
    let canonical = canonical(args_json)?;
    if canonical.json == args_json {
        Ok(())
    } else {
        Err("the arguments are not in the canonical form the call was recorded in".into())
    }
}

/// The digest of canonical arguments: `sha256:<hex>`.
pub fn digest(canonical_json: &str) -> String {
    format!(
        "sha256:{}",
        hex::encode(Sha256::digest(canonical_json.as_bytes()))
    )
}

/// A JSON value whose objects have no key twice, keys sorted.
struct Strict(serde_json::Value);

impl<'de> de::Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = serde_json::Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
        serde_json::Number::from_f64(v)
            .map(serde_json::Value::Number)
            .ok_or_else(|| E::custom("a number JSON cannot hold"))
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(serde_json::Value::Null)
    }
    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(serde_json::Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::new();
        while let Some(Strict(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(items.into())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut entries = BTreeMap::new();
        while let Some(key) = map.next_key::<String>()? {
            if entries.contains_key(&key) {
                return Err(de::Error::custom(format!(
                    "the key {:?} is given twice",
                    crate::slice_chars(&key, 64)
                )));
            }
            let Strict(value) = map.next_value()?;
            entries.insert(key, value);
        }
        // Inserted in sorted order: the object keeps it whether serde_json's map is
        // sorted or keeps insertion order (its `preserve_order` feature, which any
        // crate in the build may turn on).
        Ok(serde_json::Value::Object(entries.into_iter().collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_form_whatever_the_spacing_and_key_order() {
        let a = canonical(r#"{ "b": [1, {"z": 1, "a": 2}], "a": "x" }"#).unwrap();
        let b = canonical(r#"{"a":"x","b":[1,{"a":2,"z":1}]}"#).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.json, r#"{"a":"x","b":[1,{"a":2,"z":1}]}"#);
        assert!(a.digest.starts_with("sha256:") && a.digest.len() == 71);
        assert!(is_canonical(&a.json).is_ok());
        assert!(is_canonical(r#"{"a": "x"}"#).is_err());
    }

    #[test]
    fn a_key_given_twice_anywhere_is_refused() {
        let spoof = format!(
            r#"{{"target": "/srv/cache (routine, safe)", "pad": "{}", "target": "/"}}"#,
            " ".repeat(2000)
        );
        let err = canonical(&spoof).unwrap_err();
        assert!(err.contains("\"target\" is given twice"), "{err}");
        let nested = r#"{"edits": [{"path": "a", "path": "b"}]}"#;
        assert!(canonical(nested).unwrap_err().contains("given twice"));
    }

    #[test]
    fn only_one_bounded_object_is_arguments() {
        for bad in ["[]", "\"x\"", "1", "{} {}", "{", "", "{\"a\": 1e999}"] {
            assert!(canonical(bad).is_err(), "{bad:?}");
        }
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        assert!(canonical(&format!("{{\"a\": {deep}}}")).is_err());
        let huge = format!("{{\"a\": \"{}\"}}", "x".repeat(MAX_ARGS_BYTES));
        assert!(canonical(&huge).unwrap_err().contains("more than"));
        assert!(canonical("{}").is_ok());
    }
}
