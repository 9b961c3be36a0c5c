//! The shipped build places first in its code the functions a running agent uses
//! (`scripts/symbol-order.txt`, written by `scripts/symbol-order`, handed to the linker by
//! `scripts/build-release`): the kernel maps code 64 KiB around each page fault, so this
//! order is what keeps an idle agent's and each task shim's resident code small
//! (docs/benchmark.md). These tests fail when the list went stale (a dependency update
//! renames every function of the crate) or is no longer applied.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use crate::support::shipped::shipped_binary;

const REGENERATE: &str = "regenerate it from the shipped build: `bash scripts/build-release && \
                          python3 scripts/symbol-order && bash scripts/build-release`";

fn listed() -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/symbol-order.txt");
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Every function symbol of the binary: name -> (address, size).
fn functions(binary: &Path) -> HashMap<String, (u64, u64)> {
    let out = Command::new("nm")
        .args(["-S", "--defined-only"])
        .arg(binary)
        .output()
        .expect("nm (binutils)");
    assert!(out.status.success(), "nm {}", binary.display());
    let mut map = HashMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if let [addr, size, kind, name] = f[..]
            && matches!(kind, "t" | "T" | "w" | "W")
        {
            let hex = |s| u64::from_str_radix(s, 16).unwrap();
            map.entry(name.to_owned()).or_insert((hex(addr), hex(size)));
        }
    }
    map
}

#[test]
fn the_functions_the_order_names_are_in_the_shipped_binary() {
    let listed = listed();
    let functions = functions(&shipped_binary());
    let found = listed.iter().filter(|n| functions.contains_key(*n)).count();
    // A change of code keeps most names (a symbol's hash is its path and signature, not its
    // body); a dependency update changes all of them.
    assert!(
        listed.len() > 1000 && found * 10 >= listed.len() * 9,
        "only {found} of the {} functions scripts/symbol-order.txt names are in the shipped \
         binary: {REGENERATE}",
        listed.len()
    );
}

#[test]
fn the_shipped_binary_starts_its_code_with_the_functions_the_order_names() {
    let listed = listed();
    let functions = functions(&shipped_binary());
    let text_start = functions.values().map(|f| f.0).min().unwrap();
    let found: Vec<(&str, u64, u64)> = listed
        .iter()
        .filter_map(|n| functions.get(n).map(|&(a, s)| (n.as_str(), a, s)))
        .collect();
    assert!(
        !found.is_empty(),
        "none of the order's functions: {REGENERATE}"
    );
    // In the list's order: each Rust function has a section of its own (glibc's functions
    // move with their object file's whole section, so only Rust's are compared).
    let rust: Vec<&(&str, u64, u64)> = found.iter().filter(|f| f.0.starts_with("_ZN")).collect();
    for pair in rust.windows(2) {
        assert!(
            pair[0].1 < pair[1].1,
            "{} is listed before {} but placed after it: the order was not applied \
             (scripts/build-release)",
            pair[0].0,
            pair[1].0
        );
    }
    // Side by side at the start: the code they span is not much more than their own size.
    let size: u64 = found.iter().map(|f| f.2).sum();
    let end = found.iter().map(|f| f.1 + f.2).max().unwrap();
    assert!(
        end - text_start <= size + size / 4 + (64 << 10),
        "the order's {} functions ({size} bytes) end {} bytes into the code: not packed at its \
         start (scripts/build-release)",
        found.len(),
        end - text_start
    );
}
