//! No import cycles between modules, in every crate of the workspace (`docs/architecture.md`, "Layers").
//!
//! A module may use a sibling (a module with the same parent) only if that sibling does not use it back,
//! directly or through other siblings. The check reads the sources: every `crate::`, `super::` and `self::`
//! path (in `use` trees and inline), outside comments and `#[cfg(test)] mod` blocks, becomes an edge from the
//! file's module to the module the path names, taken at the level where the two paths part (so
//! `meter::actor` → `store::keys` is the edge `meter` → `store`, and `meter::actor` → `meter::registry` is
//! an edge between the two siblings under `meter`). Any cycle at any level fails the test and names it.
//!
//! A plain text scan, no parser: good enough for this code base's import style, and checked against itself
//! by the unit tests at the bottom (a cycle planted in a toy tree is found, its absence is not reported).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The crates whose sources are checked, relative to the workspace root.
const CRATES: [&str; 4] = ["engine/src", "server/src", "loadtest/src", "benches/src"];

/// Cycles that remain, each with the reason and the work that removes it. An entry that no longer occurs
/// fails the test too, so this list only shrinks.
const KNOWN: [(&str, &str); 0] = [
    // ("<crate>: a → b → a", "why it remains and the work that removes it"),
];

#[test]
fn no_module_imports_one_that_imports_it_back() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut report = Vec::new();
    let mut checked = 0;
    for krate in CRATES {
        let src = root.join(krate);
        if !src.is_dir() {
            continue;
        }
        let files = rust_files(&src);
        assert!(!files.is_empty(), "{krate}: no sources found");
        checked += files.len();
        let sources: Vec<(Vec<String>, String)> = files
            .iter()
            .map(|f| {
                let text = std::fs::read_to_string(f).expect("readable source");
                (module_path(&src, f), text)
            })
            .collect();
        for cycle in cycles(&sources) {
            report.push(format!("{krate}: {}", cycle.join(" → ")));
        }
    }
    assert!(checked > 50, "only {checked} files found: wrong root?");
    let stale: Vec<&str> = KNOWN
        .iter()
        .map(|(cycle, _)| *cycle)
        .filter(|known| !report.iter().any(|r| r == known))
        .collect();
    assert!(
        stale.is_empty(),
        "these known cycles are gone: remove them from `KNOWN`:\n{}",
        stale.join("\n")
    );
    report.retain(|r| !KNOWN.iter().any(|(known, _)| known == r));
    assert!(
        report.is_empty(),
        "import cycles between modules (each module in a cycle uses the next; break one edge, e.g. by moving \
         the shared item into a leaf module):\n{}",
        report.join("\n")
    );
}

/// Cycles among sibling modules, each as the list of its modules' full paths (first repeated at the end).
fn cycles(sources: &[(Vec<String>, String)]) -> Vec<Vec<String>> {
    let modules: BTreeSet<Vec<String>> = sources.iter().map(|(m, _)| m.clone()).collect();
    // parent → (child → children it uses)
    let mut graph: BTreeMap<Vec<String>, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for (module, text) in sources {
        for target in referenced_paths(module, text) {
            let common = module
                .iter()
                .zip(&target)
                .take_while(|(a, b)| a == b)
                .count();
            if common == module.len() || common == target.len() {
                continue; // a module using its own descendant or ancestor is not a sibling edge
            }
            let parent = module[..common].to_vec();
            let mut sibling = parent.clone();
            sibling.push(target[common].clone());
            if !modules.contains(&sibling) {
                continue; // an item defined in the parent (e.g. `crate::Foo`), not a module
            }
            graph
                .entry(parent)
                .or_default()
                .entry(module[common].clone())
                .or_default()
                .insert(target[common].clone());
        }
    }
    let mut found = Vec::new();
    for (parent, edges) in &graph {
        for component in strongly_connected(edges) {
            let mut cycle = shortest_cycle(edges, &component);
            cycle.push(cycle[0].clone());
            found.push(
                cycle
                    .iter()
                    .map(|m| {
                        let mut full = parent.clone();
                        full.push(m.clone());
                        full.join("::")
                    })
                    .collect(),
            );
        }
    }
    found
}

/// Components of more than one node (Tarjan's algorithm, recursive: module graphs are small).
fn strongly_connected(edges: &BTreeMap<String, BTreeSet<String>>) -> Vec<BTreeSet<String>> {
    struct State<'a> {
        edges: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        out: Vec<BTreeSet<String>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a str) {
        let i = s.index.len();
        s.index.insert(v, i);
        s.low.insert(v, i);
        s.stack.push(v);
        s.on_stack.insert(v);
        if let Some(next) = s.edges.get(v) {
            for w in next {
                let w = w.as_str();
                if !s.index.contains_key(w) {
                    visit(s, w);
                    let lw = s.low[w];
                    let lv = s.low.get_mut(v).expect("visited");
                    *lv = (*lv).min(lw);
                } else if s.on_stack.contains(w) {
                    let iw = s.index[w];
                    let lv = s.low.get_mut(v).expect("visited");
                    *lv = (*lv).min(iw);
                }
            }
        }
        if s.low[v] == s.index[v] {
            let mut component = BTreeSet::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                component.insert(w.to_string());
                if w == v {
                    break;
                }
            }
            if component.len() > 1 {
                s.out.push(component);
            }
        }
    }
    let mut s = State {
        edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in edges.keys() {
        if !s.index.contains_key(v.as_str()) {
            visit(&mut s, v);
        }
    }
    s.out
}

/// A shortest cycle through the component's first node (breadth-first), for a readable report.
fn shortest_cycle(
    edges: &BTreeMap<String, BTreeSet<String>>,
    component: &BTreeSet<String>,
) -> Vec<String> {
    let start = component
        .iter()
        .next()
        .expect("non-empty component")
        .clone();
    let mut previous: BTreeMap<String, String> = BTreeMap::new();
    let mut queue = std::collections::VecDeque::from([start.clone()]);
    while let Some(v) = queue.pop_front() {
        for w in edges.get(&v).into_iter().flatten() {
            if !component.contains(w) {
                continue;
            }
            if *w == start {
                let mut path = vec![v.clone()];
                while let Some(p) = previous.get(path.last().expect("non-empty")) {
                    path.push(p.clone());
                }
                path.reverse();
                return path;
            }
            if !previous.contains_key(w) && *w != start {
                previous.insert(w.clone(), v.clone());
                queue.push_back(w.clone());
            }
        }
    }
    component.iter().cloned().collect()
}

/// Every module path (as segments from the crate root) that the file's code names.
fn referenced_paths(module: &[String], text: &str) -> Vec<Vec<String>> {
    let code = strip_comments_and_tests(text);
    let mut out = Vec::new();
    for path in use_paths(&code).into_iter().chain(inline_paths(&code)) {
        if let Some(resolved) = resolve(module, &path) {
            out.push(resolved);
        }
    }
    out
}

/// `crate::a::b` → `[a, b]`; `super::`/`self::` relative to `module`; anything else (an external crate) → None.
fn resolve(module: &[String], path: &[String]) -> Option<Vec<String>> {
    let mut base: Vec<String> = match path.first().map(String::as_str) {
        Some("crate") => Vec::new(),
        Some("self") => module.to_vec(),
        Some("super") => module.to_vec(),
        _ => return None,
    };
    let mut rest = &path[1..];
    if path[0] == "super" {
        base.pop()?;
        while rest.first().map(String::as_str) == Some("super") {
            base.pop()?;
            rest = &rest[1..];
        }
    }
    base.extend(rest.iter().filter(|s| s.as_str() != "self").cloned());
    Some(base)
}

/// The code without `//` comments (line and doc) and without `#[cfg(test)] mod … { … }` blocks.
fn strip_comments_and_tests(text: &str) -> String {
    let mut code = String::with_capacity(text.len());
    for line in text.lines() {
        let line = match line.find("//") {
            // A `//` inside a string literal (a URL) is rare in paths we care about; cutting it is harmless.
            Some(at) => &line[..at],
            None => line,
        };
        code.push_str(line);
        code.push('\n');
    }
    while let Some(at) = code.find("#[cfg(test)]") {
        let after = &code[at + "#[cfg(test)]".len()..];
        let trimmed = after.trim_start();
        let is_mod = trimmed.starts_with("mod ") || trimmed.starts_with("pub mod ");
        let Some(open) = after.find(['{', ';']) else {
            break;
        };
        let end = if is_mod && after.as_bytes()[open] == b'{' {
            matching_brace(after, open)
                .map_or(code.len(), |close| at + "#[cfg(test)]".len() + close + 1)
        } else {
            // A test-only item other than an inline module: keep it (only its attribute goes).
            at + "#[cfg(test)]".len()
        };
        code.replace_range(at..end, "");
    }
    code
}

fn matching_brace(text: &str, open: usize) -> Option<usize> {
    let mut depth = 0usize;
    for (i, c) in text[open..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(open + i);
                }
            }
            _ => {}
        }
    }
    None
}

/// The paths of every `use` tree, expanded (`use a::{b, c::d}` → `a::b`, `a::c::d`).
fn use_paths(code: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(at) = find_word(rest, "use") {
        let tree_start = at + 3;
        let Some(len) = rest[tree_start..].find(';') else {
            break;
        };
        let tree = rest[tree_start..tree_start + len]
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        expand(&[], &tree, &mut out);
        rest = &rest[tree_start + len..];
    }
    out
}

fn expand(prefix: &[String], tree: &str, out: &mut Vec<Vec<String>>) {
    let tree = tree.trim().trim_start_matches("::");
    if let Some(open) = tree.find('{') {
        let mut base = prefix.to_vec();
        base.extend(segments(&tree[..open]));
        let close = tree.rfind('}').filter(|&c| c > open).unwrap_or(tree.len());
        let inner = &tree[open + 1..close];
        for part in split_top_level(inner) {
            if !part.is_empty() {
                expand(&base, part, out);
            }
        }
    } else {
        let path = tree.split(" as ").next().unwrap_or(tree);
        let mut full = prefix.to_vec();
        full.extend(segments(path).into_iter().filter(|s| s != "*"));
        if !full.is_empty() {
            out.push(full);
        }
    }
}

fn split_top_level(s: &str) -> Vec<&str> {
    let (mut parts, mut depth, mut start) = (Vec::new(), 0, 0);
    for (i, c) in s.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

fn segments(path: &str) -> Vec<String> {
    path.split("::")
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// Paths written inline in code (`crate::meter::Meter::new(…)`, `super::conn::run(…)`).
fn inline_paths(code: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for root in ["crate::", "super::", "self::"] {
        let mut from = 0;
        while let Some(found) = code[from..].find(root) {
            let at = from + found;
            from = at + root.len();
            let before = code[..at].chars().next_back();
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                continue; // the middle of a longer path: its start was (or will be) seen
            }
            let path: String = code[at..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            out.push(segments(&path));
        }
    }
    out
}

/// The byte offset of `word` standing alone (not part of a longer identifier).
fn find_word(text: &str, word: &str) -> Option<usize> {
    let mut from = 0;
    while let Some(found) = text[from..].find(word) {
        let at = from + found;
        let before = text[..at].chars().next_back();
        let after = text[at + word.len()..].chars().next();
        let ident = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
        if !ident(before) && after.is_some_and(char::is_whitespace) {
            return Some(at);
        }
        from = at + word.len();
    }
    None
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("readable source dir") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// `src/lib.rs` → `[]`, `src/a/mod.rs` → `[a]`, `src/a/b.rs` → `[a, b]`. `main.rs` is its own crate root;
/// its `crate::` paths name the binary's modules, which in this workspace are none (it uses the library).
fn module_path(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).expect("file under src");
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    parts
}

mod checker {
    use super::*;

    fn tree(files: &[(&str, &str)]) -> Vec<(Vec<String>, String)> {
        files
            .iter()
            .map(|(m, t)| (segments(m), t.to_string()))
            .collect()
    }

    #[test]
    fn a_cycle_through_three_modules_is_found_and_named() {
        let sources = tree(&[
            ("", "pub mod a; pub mod b; pub mod c;"),
            ("a", "use crate::b::Thing;"),
            ("b", "use crate::{c::{self, Other}};"),
            ("c", "fn f() { crate::a::inner::g(); }"),
            ("a::inner", ""),
        ]);
        let found = cycles(&sources);
        assert_eq!(found, vec![vec!["a", "b", "c", "a"]]);
    }

    #[test]
    fn layered_modules_children_and_test_modules_are_not_cycles() {
        let sources = tree(&[
            ("", "pub mod low; pub mod high;"),
            (
                "low",
                "pub mod leaf; use self::leaf::X; // use crate::high::Y;",
            ),
            ("low::leaf", "use super::super::low::Z;"),
            (
                "high",
                "use crate::low::leaf::X;\n#[cfg(test)]\nmod tests {\n    use crate::high::*;\n}\n",
            ),
        ]);
        assert!(cycles(&sources).is_empty(), "{:?}", cycles(&sources));
    }

    #[test]
    fn super_paths_resolve_from_the_files_module() {
        let sources = tree(&[
            ("", ""),
            ("p", ""),
            ("p::x", "use super::y::Thing;"),
            ("p::y", "pub fn f() { super::x::g() }"),
        ]);
        assert_eq!(cycles(&sources), vec![vec!["p::x", "p::y", "p::x"]]);
    }
}
