//! The crate's modules import each other without a cycle: a type two modules share lives in a
//! leaf both import, never in one of them (a reader must not import the module that
//! dispatches to the readers). The graph is read from the source: one node per file module,
//! an edge for every `crate::…`, `super::…` or `self::…` path and every path through a child
//! module, outside comments and `#[cfg(test)]` code; `mod x;` declarations are not edges.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

type Graph = BTreeMap<String, BTreeSet<String>>;

/// Module path of a source file relative to `src/` (`pack/stage.rs` → `pack::stage`).
fn module_of(rel: &Path) -> String {
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().expect("a file name");
    let stem = last.trim_end_matches(".rs");
    if stem != "mod" && stem != "lib" {
        parts.push(stem.to_string());
    }
    parts.join("::")
}

fn collect(dir: &Path, root: &Path, out: &mut BTreeMap<String, String>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            collect(&p, root, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&p).unwrap();
            out.insert(module_of(p.strip_prefix(root).unwrap()), code_only(&text));
        }
    }
}

/// The text without comments (line, block, doc), string contents, and the trailing
/// `#[cfg(test)] mod tests`, whose imports are not the module's own.
fn code_only(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => text,
    };
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    let mut in_str = false;
    while i < b.len() {
        if in_str {
            if b[i] == b'\\' {
                i += 2;
                continue;
            }
            if b[i] == b'"' {
                in_str = false;
            }
            i += 1;
            continue;
        }
        if text[i..].starts_with("r#\"") {
            i = text[i + 3..].find("\"#").map_or(b.len(), |n| i + 3 + n + 2);
            out.push(' ');
        } else if b[i] == b'"' && (i == 0 || b[i - 1] != b'\'') {
            // String contents are dropped: `"crate::x"` in a message is no import.
            in_str = true;
            out.push(' ');
            i += 1;
        } else if text[i..].starts_with("//") {
            i = text[i..].find('\n').map_or(b.len(), |n| i + n);
        } else if text[i..].starts_with("/*") {
            i = text[i + 2..].find("*/").map_or(b.len(), |n| i + 2 + n + 2);
        } else {
            let ch = text[i..].chars().next().unwrap();
            out.push(ch);
            i += ch.len_utf8();
        }
    }
    out
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The paths of a use tree starting at `s` (after a `::`): `a::b`, `{a, b::{c, d}}`, `a as x`.
fn use_tree(s: &str) -> (Vec<Vec<String>>, usize) {
    let mut prefix = Vec::new();
    let mut i = 0;
    let b = s.as_bytes();
    loop {
        while i < b.len() && (b[i] as char).is_whitespace() {
            i += 1;
        }
        if i < b.len() && b[i] == b'{' {
            let mut paths = Vec::new();
            i += 1;
            loop {
                let (sub, used) = use_tree(&s[i..]);
                i += used;
                for p in sub {
                    let mut full = prefix.clone();
                    full.extend(p.into_iter().filter(|seg| seg != "self"));
                    paths.push(full);
                }
                while i < b.len() && (b[i] as char).is_whitespace() {
                    i += 1;
                }
                match b.get(i) {
                    Some(b',') => i += 1,
                    Some(b'}') => return (paths, i + 1),
                    _ => return (paths, i),
                }
                while i < b.len() && (b[i] as char).is_whitespace() {
                    i += 1;
                }
                if b.get(i) == Some(&b'}') {
                    return (paths, i + 1);
                }
            }
        }
        let start = i;
        while i < b.len() && is_ident(b[i] as char) {
            i += 1;
        }
        if i == start {
            return (vec![prefix], i);
        }
        prefix.push(s[start..i].to_string());
        if s[i..].starts_with("::") {
            i += 2;
        } else {
            return (vec![prefix], i);
        }
    }
}

/// Every path in `code` that starts with `head::` (`crate`, `super`, `self` or a child's
/// name), as segments after the head.
fn paths_from(code: &str, head: &str) -> Vec<Vec<String>> {
    let pat = format!("{head}::");
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(n) = code[from..].find(&pat) {
        let at = from + n;
        from = at + pat.len();
        let before = code[..at].chars().next_back();
        if before.is_some_and(|c| is_ident(c) || c == '$' || c == ':') {
            continue;
        }
        out.extend(use_tree(&code[from..]).0);
    }
    out
}

/// The module a path names: its longest prefix that is a module of the crate.
fn resolve(base: &[String], path: &[String], modules: &BTreeSet<String>) -> Option<String> {
    let mut full: Vec<String> = base.to_vec();
    full.extend(path.iter().cloned());
    (1..=full.len())
        .rev()
        .map(|n| full[..n].join("::"))
        .find(|m| modules.contains(m))
}

fn graph(files: &BTreeMap<String, String>) -> Graph {
    let modules: BTreeSet<String> = files.keys().filter(|m| !m.is_empty()).cloned().collect();
    let mut g = Graph::new();
    for (module, code) in files {
        if module.is_empty() {
            continue; // lib.rs: the facade re-exports every module by design.
        }
        let me: Vec<String> = module.split("::").map(String::from).collect();
        let parent = &me[..me.len() - 1];
        let mut deps = BTreeSet::new();
        let mut add = |base: &[String], paths: Vec<Vec<String>>| {
            for p in paths {
                if let Some(m) = resolve(base, &p, &modules) {
                    if &m != module {
                        deps.insert(m);
                    }
                }
            }
        };
        add(&[], paths_from(code, "crate"));
        add(parent, paths_from(code, "super"));
        add(&me, paths_from(code, "self"));
        // Paths through a child module by its bare name (`use fastbpe::FastBpe`).
        for child in modules
            .iter()
            .filter_map(|m| m.strip_prefix(&format!("{module}::")))
        {
            if !child.contains("::") {
                add(
                    &me,
                    paths_from(code, child)
                        .into_iter()
                        .map(|p| {
                            let mut v = vec![child.to_string()];
                            v.extend(p);
                            v
                        })
                        .collect(),
                );
            }
        }
        g.insert(module.clone(), deps);
    }
    g
}

/// A cycle of `g` as its modules in order (first repeated at the end), if there is one.
fn find_cycle(g: &Graph) -> Option<Vec<String>> {
    // 0 = unseen, 1 = on the current path, 2 = done.
    fn visit(
        n: &str,
        g: &Graph,
        state: &mut BTreeMap<String, u8>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(n.to_string(), 1);
        path.push(n.to_string());
        for d in g.get(n).into_iter().flatten() {
            match state.get(d.as_str()).copied().unwrap_or(0) {
                1 => {
                    let start = path.iter().position(|p| p == d).unwrap();
                    let mut cycle = path[start..].to_vec();
                    cycle.push(d.clone());
                    return Some(cycle);
                }
                0 => {
                    if let Some(c) = visit(d, g, state, path) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        path.pop();
        state.insert(n.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in g.keys() {
        if state.get(n.as_str()).copied().unwrap_or(0) == 0 {
            if let Some(c) = visit(n, g, &mut state, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

fn crate_files() -> BTreeMap<String, String> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = BTreeMap::new();
    collect(&src, &src, &mut files);
    files
}

#[test]
fn modules_import_each_other_without_a_cycle() {
    let g = graph(&crate_files());
    if let Some(cycle) = find_cycle(&g) {
        panic!("module import cycle: {}", cycle.join(" -> "));
    }
}

#[test]
fn the_graph_sees_the_crate_as_it_is() {
    // The reader finds the edges the pipeline is built on, so an empty graph cannot pass.
    let g = graph(&crate_files());
    let deps = |m: &str| g.get(m).unwrap_or_else(|| panic!("no module {m}"));
    assert!(deps("pipeline").contains("pack::stage"));
    assert!(deps("source::csv").contains("source::record"));
    assert!(deps("source::csv").contains("source::span"));
    assert!(deps("source").contains("source::csv"));
    assert!(deps("tokenize").contains("tokenize::fastbpe"));
    assert!(deps("tokenize::fastbpe").contains("tokenize::split"));
    assert!(
        !deps("source::csv").contains("source"),
        "a reader imports the dispatcher"
    );
}

#[test]
fn a_cycle_is_found_and_named() {
    let files: BTreeMap<String, String> = [
        ("", "mod a; mod b; mod c;"),
        ("a", "use crate::b::{self, Thing};"),
        ("b", "pub struct Thing; fn f() { super::c::g(); }"),
        ("c", "// use crate::a;\nuse crate::{a::X, b};"),
    ]
    .into_iter()
    .map(|(m, t)| (m.to_string(), code_only(t)))
    .collect();
    let cycle = find_cycle(&graph(&files)).expect("a -> b -> c -> a");
    assert_eq!(cycle.first(), cycle.last());
    assert_eq!(cycle.len(), 4, "{cycle:?}");
    let mut acyclic = files.clone();
    acyclic.insert(
        "c".into(),
        code_only("// use crate::a;\nlet s = \"crate::a\";"),
    );
    assert_eq!(find_cycle(&graph(&acyclic)), None);
}
