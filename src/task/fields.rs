//! Field validation as the Kubernetes API server does it (`fieldValidation`): a request's
//! fields that the agent does not know are collected while it is decoded (serde_ignored)
//! and then ignored, warned about, or refused; never dropped without a word.
//!
//! Paths are written as Kubernetes writes them: `spec.process.foo`,
//! `spec.containers[0].foo`, and for an array body `[1].process.foo`.

use schemars::JsonSchema;
use serde::Deserialize;
use serde::de::DeserializeOwned;

/// What to do with unknown fields (the `fieldValidation` query parameter of the API
/// server, with its names and its default).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, JsonSchema)]
pub enum FieldValidation {
    /// Drop them silently (the agent's behaviour before this option existed).
    Ignore,
    /// Accept the request and say which fields were dropped.
    #[default]
    Warn,
    /// Refuse the request, listing every unknown field.
    Strict,
}

impl FieldValidation {
    pub const NAMES: [&'static str; 3] = ["Ignore", "Warn", "Strict"];

    /// The API server's spelling, case-sensitive as it is there.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "Ignore" => Ok(FieldValidation::Ignore),
            "Warn" => Ok(FieldValidation::Warn),
            "Strict" => Ok(FieldValidation::Strict),
            _ => Err(format!(
                "fieldValidation: unsupported value {s:?}: supported values: \"Ignore\", \"Strict\", \"Warn\""
            )),
        }
    }
}

/// A decoded value and the paths of the fields it did not take.
#[derive(Debug)]
pub struct Decoded<T> {
    pub value: T,
    pub unknown: Vec<String>,
}

/// Decodes JSON, collecting the paths of unknown fields. A decoding error names the
/// field it is in (`spec.process.execMode: unknown variant ...`).
pub fn decode<T: DeserializeOwned>(json: &[u8]) -> Result<Decoded<T>, String> {
    let mut unknown = Vec::new();
    let mut track = serde_path_to_error::Track::new();
    let mut de = serde_json::Deserializer::from_slice(json);
    let value = {
        let mut note = |p: serde_ignored::Path<'_>| unknown.push(render(&p));
        let tracked = serde_path_to_error::Deserializer::new(&mut de, &mut track);
        T::deserialize(serde_ignored::Deserializer::new(tracked, &mut note))
    };
    let value = value
        .and_then(|v| de.end().map(|()| v))
        .map_err(|e| at_path(&track.path().to_string(), &e.to_string()))?;
    Ok(Decoded { value, unknown })
}

/// Decodes a JSON value already parsed, with the same rules as [`decode`].
pub fn decode_value<T: DeserializeOwned>(v: &serde_json::Value) -> Result<Decoded<T>, String> {
    let mut unknown = Vec::new();
    let mut track = serde_path_to_error::Track::new();
    let value = {
        let mut note = |p: serde_ignored::Path<'_>| unknown.push(render(&p));
        let tracked = serde_path_to_error::Deserializer::new(v, &mut track);
        T::deserialize(serde_ignored::Deserializer::new(tracked, &mut note))
    };
    let value = value.map_err(|e| at_path(&track.path().to_string(), &e.to_string()))?;
    Ok(Decoded { value, unknown })
}

fn at_path(path: &str, err: &str) -> String {
    if path.is_empty() || path == "." {
        err.to_string()
    } else {
        format!("{path}: {err}")
    }
}

/// `a.b[0].c`, the way Kubernetes names a field; wrappers (`Option`, newtypes) add nothing.
fn render(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path;
    match path {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", render(parent)),
        Path::Map { parent, key } => join(&render(parent), key),
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => render(parent),
    }
}

/// `prefix.field`, or `field` at the top.
pub fn join(prefix: &str, field: &str) -> String {
    if prefix.is_empty() {
        field.to_string()
    } else {
        format!("{prefix}.{field}")
    }
}

/// The text the API server gives an unknown field: `unknown field "spec.foo"`. The path is
/// quoted as Go's `%q` does, in ASCII (`\"`, `\\`, `\n`, `\u00e9`), so it is printable
/// wherever it goes.
pub fn unknown_field_text(path: &str) -> String {
    format!("unknown field {}", go_quote(path))
}

/// The API server's Strict answer: `strict decoding error: unknown field "a", unknown field "b"`.
pub fn strict_error(unknown: &[String]) -> String {
    let fields: Vec<String> = unknown.iter().map(|p| unknown_field_text(p)).collect();
    format!("strict decoding error: {}", fields.join(", "))
}

/// Go's `strconv.QuoteToASCII`.
fn go_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            ' '..='~' => out.push(c),
            c if (c as u32) < 0x80 => out.push_str(&format!("\\x{:02x}", c as u32)),
            c if (c as u32) < 0x10000 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push_str(&format!("\\U{:08x}", c as u32)),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Inner {
        #[serde(default)]
        command: Vec<String>,
    }

    #[derive(Debug, Deserialize)]
    struct Outer {
        name: String,
        #[serde(default)]
        process: Option<Inner>,
    }

    #[test]
    fn unknown_fields_are_named_by_path() {
        let d: Decoded<Outer> =
            decode(br#"{"name":"a","proces":1,"process":{"command":["x"],"foo":{"deep":[1]}}}"#)
                .unwrap();
        assert_eq!(d.value.name, "a");
        assert_eq!(d.value.process.unwrap().command, ["x"]);
        assert_eq!(d.unknown, ["proces", "process.foo"]);
        let d: Decoded<Option<Vec<Outer>>> =
            decode(br#"[{"name":"a"},{"name":"b","process":{"bar":true}}]"#).unwrap();
        assert_eq!(d.unknown, ["[1].process.bar"]);
    }

    #[test]
    fn errors_name_the_field() {
        let e = decode::<Outer>(br#"{"name":"a","process":{"command":"x"}}"#).unwrap_err();
        assert!(e.starts_with("process.command: invalid type"), "{e}");
        let e = decode::<Outer>(br#"{"name":"a"} x"#).unwrap_err();
        assert!(e.contains("trailing characters"), "{e}");
    }

    #[test]
    fn texts_are_the_api_servers() {
        assert_eq!(
            unknown_field_text("spec.process.foo"),
            r#"unknown field "spec.process.foo""#
        );
        assert_eq!(
            go_quote("a\"b\\c\nd\u{e9}\u{1f600}\u{7f}"),
            r#""a\"b\\c\nd\u00e9\U0001f600\x7f""#
        );
        assert_eq!(
            strict_error(&["a".into(), "b.c".into()]),
            r#"strict decoding error: unknown field "a", unknown field "b.c""#
        );
        assert_eq!(
            FieldValidation::parse("Strict"),
            Ok(FieldValidation::Strict)
        );
        assert!(FieldValidation::parse("strict").is_err());
        assert!(FieldValidation::parse("").is_err());
    }
}
