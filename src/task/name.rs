//! Task names follow Kubernetes object-name rules (DNS-1123 subdomain), which also
//! guarantees a name is a single, harmless path component under the data dir.

pub const MAX_NAME_LEN: usize = 253;
/// The same rules as a regular expression (the API document states them with it).
pub const NAME_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";

/// Returns why `name` is not a valid task name, or `None` when it is.
pub fn invalid_reason(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("task name is required".into());
    }
    if name.len() > MAX_NAME_LEN {
        return Some(format!(
            "task name must be no more than {MAX_NAME_LEN} characters"
        ));
    }
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.';
    let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    let first = name.chars().next().unwrap_or('-');
    let last = name.chars().last().unwrap_or('-');
    if !name.chars().all(ok_char) || !alnum(first) || !alnum(last) {
        return Some(format!(
            "invalid task name {name:?}: a lowercase RFC 1123 subdomain must consist of lower case \
             alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"
        ));
    }
    // Each dot-separated label must itself start and end alphanumerically.
    if name
        .split('.')
        .any(|label| label.is_empty() || !label.starts_with(alnum) || !label.ends_with(alnum))
    {
        return Some(format!(
            "invalid task name {name:?}: each '.'-separated part must start and end with an alphanumeric character"
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::invalid_reason;

    #[test]
    fn accepts_kubernetes_names() {
        for n in ["a", "bs-0", "my.task-1", "0abc", &"a".repeat(253)] {
            assert_eq!(invalid_reason(n), None, "{n}");
        }
    }

    #[test]
    fn rejects_everything_else() {
        for n in [
            "",
            ".",
            "..",
            "a/b",
            "/etc/passwd",
            "A",
            "-a",
            "a-",
            "a..b",
            "a.-b",
            "a_b",
            "a b",
            "ä",
            &"a".repeat(254),
        ] {
            assert!(invalid_reason(n).is_some(), "{n:?} should be invalid");
        }
    }
}
