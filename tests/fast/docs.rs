//! The documentation as a reader follows it: every relative link in README.md, docs/ and
//! the chart's README leads to a file that exists, every `#anchor` to a heading of that
//! file (as GitHub names headings), and the README, being the map, links every page of
//! docs/.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The Markdown files a reader starts from or is sent to, sorted.
fn pages() -> Vec<PathBuf> {
    let mut docs: Vec<PathBuf> = std::fs::read_dir(repo().join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    let mut all = vec![
        repo().join("README.md"),
        repo().join("charts/task-executor/README.md"),
    ];
    all.extend(docs);
    all
}

/// The text outside fenced code blocks (a fence's lines become empty).
fn prose(text: &str) -> String {
    let mut fenced = false;
    let mut out = String::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        } else if !fenced {
            out.push_str(line);
        }
        out.push('\n');
    }
    out
}

/// The anchors GitHub gives a file's headings: lowercased, punctuation dropped, spaces
/// turned into hyphens, a repeated one suffixed `-1`, `-2`, ...
fn anchors(text: &str) -> HashSet<String> {
    let mut seen = HashSet::new();
    for line in prose(text).lines() {
        let hashes = line.chars().take_while(|&c| c == '#').count();
        if !(1..=6).contains(&hashes) || !line[hashes..].starts_with(' ') {
            continue;
        }
        let slug: String = line[hashes..]
            .trim()
            .to_lowercase()
            .chars()
            .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
            .map(|c| if c == ' ' { '-' } else { c })
            .collect();
        let mut unique = slug.clone();
        let mut n = 0;
        while seen.contains(&unique) {
            n += 1;
            unique = format!("{slug}-{n}");
        }
        seen.insert(unique);
    }
    seen
}

/// Targets of inline links (`[text](target)`, the text may span lines), outside code.
fn link_targets(text: &str) -> Vec<String> {
    let text = prose(text);
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(i) = text[at..].find("](") {
        let start = at + i + 2;
        let Some(len) = text[start..].find(')') else {
            break;
        };
        let target = &text[start..start + len];
        if !target.is_empty() && !target.contains(char::is_whitespace) {
            out.push(target.to_string());
        }
        at = start + len;
    }
    out
}

fn shown(p: &Path) -> String {
    p.strip_prefix(repo()).unwrap_or(p).display().to_string()
}

#[test]
fn every_relative_link_and_anchor_in_the_docs_leads_somewhere() {
    let mut broken = Vec::new();
    let mut checked = 0;
    for page in pages() {
        let text = std::fs::read_to_string(&page).unwrap();
        for target in link_targets(&text) {
            if target.starts_with("http://")
                || target.starts_with("https://")
                || target.starts_with("mailto:")
            {
                continue;
            }
            checked += 1;
            let (path, anchor) = match target.split_once('#') {
                Some((p, a)) => (p, Some(a)),
                None => (target.as_str(), None),
            };
            let file = if path.is_empty() {
                page.clone()
            } else {
                page.parent().unwrap().join(path)
            };
            if !file.exists() {
                broken.push(format!("{}: {target}: no such file", shown(&page)));
                continue;
            }
            if let Some(anchor) = anchor {
                let headings = anchors(&std::fs::read_to_string(&file).unwrap());
                if !headings.contains(anchor) {
                    broken.push(format!(
                        "{}: {target}: {} has no heading #{anchor}",
                        shown(&page),
                        shown(&file)
                    ));
                }
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
    assert!(checked >= 50, "only {checked} relative links found");
}

#[test]
fn the_readme_links_every_page_of_the_docs_and_each_page_has_a_title() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let linked: HashSet<String> = link_targets(&readme)
        .into_iter()
        .map(|t| t.split('#').next().unwrap().to_string())
        .collect();
    let docs: Vec<PathBuf> = pages()
        .into_iter()
        .filter(|p| p.parent() == Some(&repo().join("docs")))
        .collect();
    assert!(!docs.is_empty(), "docs/ has no pages");
    for page in docs {
        let name = format!("docs/{}", page.file_name().unwrap().to_str().unwrap());
        assert!(linked.contains(&name), "README.md does not link {name}");
        let text = std::fs::read_to_string(&page).unwrap();
        assert!(text.starts_with("# "), "{name} does not open with a title");
    }
}

#[test]
fn anchors_are_named_as_github_names_them() {
    let text = "# In a pod: `task-executor init`\n## Task resources (`--watch-tasks`)\n\
                ## Upstream's Pool sample\n```sh\n# not a heading\n```\n## Events\n## Events\n";
    let got = anchors(text);
    for a in [
        "in-a-pod-task-executor-init",
        "task-resources---watch-tasks",
        "upstreams-pool-sample",
        "events",
        "events-1",
    ] {
        assert!(got.contains(a), "{a} not in {got:?}");
    }
    assert!(!got.contains("not-a-heading"));
}
