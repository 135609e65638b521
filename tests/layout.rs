//! The shape of `src/`, checked: no import cycle between modules, and no file past 1,000 lines
//! of non-test code. Reads the sources; needs no service.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Lines of code (not blank, not comments) a file may hold before its tests.
const MAX_CODE_LINES: usize = 1_000;

struct Module {
    file: PathBuf,
    /// The source up to its unit tests, comments removed.
    code: String,
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            out.push(path);
        }
    }
}

/// `src/ingest/decode/mod.rs` is `ingest::decode`; `lib.rs`, `main.rs` and test files are none.
fn module_path(src: &Path, file: &Path) -> Option<String> {
    let relative = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = relative
        .iter()
        .map(|part| part.to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|last| last == "mod") {
        parts.pop();
    }
    match parts.as_slice() {
        [only] if only == "lib" || only == "main" => None,
        [.., last] if last == "tests" => None,
        _ => Some(parts.join("::")),
    }
}

fn modules() -> BTreeMap<String, Module> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut modules = BTreeMap::new();
    for file in files {
        let Some(path) = module_path(&src, &file) else {
            continue;
        };
        let text = std::fs::read_to_string(&file).unwrap();
        let before_tests = text
            .split("#[cfg(test)]\nmod tests")
            .next()
            .unwrap_or_default();
        let code: Vec<&str> = before_tests
            .lines()
            .filter(|line| {
                let line = line.trim_start();
                !line.is_empty() && !line.starts_with("//")
            })
            .collect();
        modules.insert(
            path,
            Module {
                file,
                code: code.join("\n"),
            },
        );
    }
    modules
}

/// Expands `a::{b, c::{d}}` into `a::b`, `a::c::d`.
fn expand(prefix: &str, tree: &str, out: &mut Vec<String>) {
    let tree = tree.trim();
    let Some(open) = tree.find('{') else {
        let path = tree.split(" as ").next().unwrap_or(tree).trim();
        out.push(format!("{prefix}{path}"));
        return;
    };
    let head = &tree[..open];
    let inner = &tree[open + 1..tree.rfind('}').unwrap()];
    let (mut depth, mut start) = (0, 0);
    for (index, character) in inner.char_indices() {
        match character {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                expand(&format!("{prefix}{head}"), &inner[start..index], out);
                start = index + 1;
            }
            _ => {}
        }
    }
    if !inner[start..].trim().is_empty() {
        expand(&format!("{prefix}{head}"), &inner[start..], out);
    }
}

/// The crate paths a module's code names: `use crate::…` trees, inline `crate::…` paths and
/// `super::…` paths (resolved against the module's parent).
fn references(path: &str, code: &str) -> Vec<String> {
    let mut out = Vec::new();
    for statement in code.split("use crate::").skip(1) {
        let tree = statement.split(';').next().unwrap_or_default();
        expand("", tree, &mut out);
    }
    let parent: Vec<&str> = path.split("::").collect();
    let parent = parent[..parent.len() - 1].join("::");
    for (marker, base) in [("crate::", String::new()), ("super::", parent)] {
        for rest in code.split(marker).skip(1) {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            if name.starts_with('{') || name.is_empty() {
                continue;
            }
            out.push(if base.is_empty() {
                name
            } else {
                format!("{base}::{name}")
            });
        }
    }
    out
}

/// The longest module path that is a prefix of `reference`.
fn resolve<'m>(modules: &'m BTreeMap<String, Module>, reference: &str) -> Option<&'m str> {
    let parts: Vec<&str> = reference.split("::").collect();
    (1..=parts.len()).rev().find_map(|len| {
        modules
            .get_key_value(&parts[..len].join("::"))
            .map(|(key, _)| key.as_str())
    })
}

fn related(a: &str, b: &str) -> bool {
    a == b || a.starts_with(&format!("{b}::")) || b.starts_with(&format!("{a}::"))
}

fn find_cycle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(node.to_owned(), 1);
        stack.push(node.to_owned());
        for next in edges.get(node).into_iter().flatten() {
            match state.get(next.as_str()) {
                Some(1) => {
                    let start = stack.iter().position(|n| n == next).unwrap();
                    let mut cycle = stack[start..].to_vec();
                    cycle.push(next.clone());
                    return Some(cycle);
                }
                Some(_) => {}
                None => {
                    if let Some(cycle) = visit(next, edges, state, stack) {
                        return Some(cycle);
                    }
                }
            }
        }
        stack.pop();
        state.insert(node.to_owned(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for node in edges.keys() {
        if !state.contains_key(node) {
            if let Some(cycle) = visit(node, edges, &mut state, &mut Vec::new()) {
                return Some(cycle);
            }
        }
    }
    None
}

#[test]
fn no_import_cycle_between_modules_at_any_depth() {
    let modules = modules();
    assert!(modules.contains_key("ingest::sink"), "read the sources");
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (path, module) in &modules {
        for reference in references(path, &module.code) {
            if let Some(target) = resolve(&modules, &reference) {
                if !related(path, target) {
                    edges
                        .entry(path.clone())
                        .or_default()
                        .insert(target.to_owned());
                }
            }
        }
    }
    assert!(
        edges["ingest::sink"].contains("ingest::store"),
        "edges are found: {:?}",
        edges["ingest::sink"]
    );
    // Files, then each level of folders (`ingest`, `ingest::decode`, ...).
    for depth in [usize::MAX, 1, 2] {
        let mut level: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let cut = |path: &str| path.split("::").take(depth).collect::<Vec<_>>().join("::");
        for (from, targets) in &edges {
            for to in targets {
                let (from, to) = (cut(from), cut(to));
                if !related(&from, &to) {
                    level.entry(from).or_default().insert(to);
                }
            }
        }
        if let Some(cycle) = find_cycle(&level) {
            panic!("import cycle (depth {depth}): {}", cycle.join(" -> "));
        }
    }
}

#[test]
fn configuration_depends_on_nothing_of_the_pipeline() {
    let modules = modules();
    let config = &modules["config"];
    for reference in references("config", &config.code) {
        let target = resolve(&modules, &reference).unwrap_or_default();
        for forbidden in ["ingest", "ops", "tools", "service", "observe"] {
            assert!(!related(target, forbidden), "config uses {reference}");
        }
    }
}

#[test]
fn no_file_holds_more_than_a_thousand_lines_of_code_before_its_tests() {
    for module in modules().values() {
        let lines = module.code.lines().count();
        assert!(
            lines <= MAX_CODE_LINES,
            "{} has {lines} lines of code",
            module.file.display()
        );
    }
}
