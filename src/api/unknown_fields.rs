//! `?fieldValidation=Ignore|Warn|Strict` on the routes that take tasks, as the Kubernetes
//! API server has it: unknown fields are dropped (`Ignore`), reported in a `Warning: 299`
//! header each (`Warn`, the default), or refused with a 400 listing them all (`Strict`).

use schemars::JsonSchema;
use serde::Deserialize;
use warp::http::HeaderValue;
use warp::reply::Response;

use super::error::ApiError;
use crate::task::fields::{self, FieldValidation};

/// The query of `POST /tasks` and `POST /setTasks`.
#[derive(Clone, Debug, Default, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WriteQuery {
    /// What to do with fields of the body that the agent does not know: `Warn` (default:
    /// accept, with a `Warning` header per field), `Strict` (refuse with 400, listing
    /// them), `Ignore` (drop them silently).
    #[serde(default)]
    pub field_validation: Option<FieldValidation>,
}

impl WriteQuery {
    pub fn parse(query: &str) -> Result<FieldValidation, ApiError> {
        let q: WriteQuery = serde_urlencoded::from_str(query)
            .map_err(|e| ApiError::bad_request(format!("fieldValidation: {e}")))?;
        Ok(q.field_validation.unwrap_or_default())
    }
}

/// The unknown fields to warn about under `mode`; `Strict` refuses any.
pub fn apply(mode: FieldValidation, unknown: Vec<String>) -> Result<Vec<String>, ApiError> {
    match mode {
        FieldValidation::Ignore => Ok(Vec::new()),
        FieldValidation::Warn => Ok(unknown),
        FieldValidation::Strict if unknown.is_empty() => Ok(unknown),
        FieldValidation::Strict => Err(ApiError::bad_request(fields::strict_error(&unknown))),
    }
}

/// Longest warning text, and most warning header bytes per answer, as the API server
/// caps them (it truncates a warning at 256 characters and stops adding them past 4 KiB).
const MAX_WARNING: usize = 256;
const MAX_WARNINGS_TOTAL: usize = 4096;

/// Adds a `Warning: 299 - "unknown field \"...\""` header per unknown field.
pub fn warn(mut resp: Response, unknown: &[String]) -> Response {
    let mut total = 0;
    for (i, path) in unknown.iter().enumerate() {
        let mut text = fields::unknown_field_text(path);
        if text.len() > MAX_WARNING {
            text.truncate(MAX_WARNING - 3);
            text.push_str("...");
        }
        let mut value = warning_value(&text);
        let last = total + value.len() > MAX_WARNINGS_TOTAL;
        if last {
            value = warning_value(&format!(
                "{} more unknown fields not shown",
                unknown.len() - i
            ));
        }
        total += value.len();
        if let Ok(v) = HeaderValue::from_str(&value) {
            resp.headers_mut().append("warning", v);
        }
        if last {
            break;
        }
    }
    resp
}

/// RFC 7234's `warn-code warn-agent "warn-text"`, quoted as the API server quotes it
/// (`"` and `\` escaped); the text is ASCII (see `fields::unknown_field_text`).
fn warning_value(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 10);
    out.push_str("299 - \"");
    for c in text.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_and_modes() {
        assert_eq!(WriteQuery::parse("").unwrap(), FieldValidation::Warn);
        assert_eq!(
            WriteQuery::parse("fieldValidation=Strict").unwrap(),
            FieldValidation::Strict
        );
        assert_eq!(
            WriteQuery::parse("x=1&fieldValidation=Ignore").unwrap(),
            FieldValidation::Ignore
        );
        for bad in [
            "fieldValidation=strict",
            "fieldValidation=",
            "fieldValidation=Warn&fieldValidation=Strict",
        ] {
            let e = WriteQuery::parse(bad).unwrap_err();
            assert_eq!(e.status, 400, "{bad}");
            assert!(e.message.starts_with("fieldValidation: "), "{}", e.message);
        }
        let unknown = vec!["spec.proces".to_string(), "[1].process.foo".to_string()];
        assert!(
            apply(FieldValidation::Ignore, unknown.clone())
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            apply(FieldValidation::Warn, unknown.clone()).unwrap(),
            unknown
        );
        let e = apply(FieldValidation::Strict, unknown).unwrap_err();
        assert_eq!(
            e.message,
            r#"strict decoding error: unknown field "spec.proces", unknown field "[1].process.foo""#
        );
        assert!(
            apply(FieldValidation::Strict, Vec::new())
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn warning_headers_are_quoted_and_capped() {
        let resp = warn(
            Response::new(Vec::new().into()),
            &["spec.process.foo".into(), "a\"b\\c".into()],
        );
        let got: Vec<&str> = resp
            .headers()
            .get_all("warning")
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect();
        assert_eq!(
            got,
            [
                r#"299 - "unknown field \"spec.process.foo\"""#,
                r#"299 - "unknown field \"a\\\"b\\\\c\"""#,
            ]
        );
        let many: Vec<String> = (0..500).map(|i| format!("spec.field{i}")).collect();
        let resp = warn(Response::new(Vec::new().into()), &many);
        let values: Vec<String> = resp
            .headers()
            .get_all("warning")
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect();
        let total: usize = values.iter().map(String::len).sum();
        assert!(total < MAX_WARNINGS_TOTAL + 100, "{total}");
        assert!(
            values
                .last()
                .unwrap()
                .contains("more unknown fields not shown"),
            "{values:?}"
        );
        let long = warn(Response::new(Vec::new().into()), &["x".repeat(1000)]);
        assert!(long.headers()["warning"].len() < MAX_WARNING + 20);
    }
}
