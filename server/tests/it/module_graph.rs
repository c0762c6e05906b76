//! No module of `server/src` imports one that imports it back: the `use` lines of every
//! source file, read as a graph of modules, have no circle.
//!
//! Two graphs are checked. Between the crate's top modules (`engine`, `snapshot`,
//! `grpc`, ...): the engine must stay a leaf that knows no transport and no storage.
//! Between files, one level down (`engine::window`, `snapshot::codec`, ...): a
//! child's `use super::X` may name its parent's re-export of a sibling's item, so an
//! edge between a module and its own ancestor is not counted there.
//!
//! Read simply and on purpose: `use` statements only (paths written inline in code are
//! not imports), `crate::`, `super::` and `self::` paths, each resolved to the longest
//! module of the tree it names. An indented `use` is taken to sit in an inline module
//! of its file (`mod tests`), so its `super::` is the file's own module. The crate root
//! (`lib.rs`) is the map of the others, not a node: its re-exports would otherwise tie
//! every module that names one to every module it re-exports from.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

/// A module path, `[]` for the crate root.
type Module = Vec<String>;

/// The module a source file (relative to `src/`) defines; `None` for binaries.
fn module_of(relative: &Path) -> Option<Module> {
    let parts: Vec<String> = relative
        .with_extension("")
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    match parts.as_slice() {
        [root] if root == "lib" => Some(Vec::new()),
        [root] if root == "main" => None,
        [first, ..] if first == "bin" => None,
        _ => Some(parts),
    }
}

/// Every `use` statement of a file: its path text (braces and all) and whether it is
/// indented.
fn use_statements(source: &str) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    let mut lines = source.lines();
    while let Some(line) = lines.next() {
        let trimmed = line.trim_start();
        let indented = trimmed.len() != line.len();
        let rest = trimmed
            .strip_prefix("pub(crate) ")
            .or_else(|| trimmed.strip_prefix("pub(super) "))
            .or_else(|| trimmed.strip_prefix("pub "))
            .unwrap_or(trimmed);
        let Some(rest) = rest.strip_prefix("use ") else {
            continue;
        };
        let mut statement = rest.to_owned();
        while !statement.contains(';') {
            match lines.next() {
                Some(more) => statement.push_str(more.trim()),
                None => break,
            }
        }
        let statement = statement.split(';').next().unwrap_or_default();
        out.push((statement.split_whitespace().collect(), indented));
    }
    out
}

/// The paths a `use` tree names: `a::{b, c::{d, e}}` is `a::b`, `a::c::d`, `a::c::e`.
fn expand(tree: &str) -> Vec<String> {
    let Some(open) = tree.find('{') else {
        return vec![tree.to_owned()];
    };
    let prefix = &tree[..open];
    let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
    let (mut parts, mut depth, mut start) = (Vec::new(), 0, 0);
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&inner[start..]);
    parts
        .into_iter()
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .flat_map(|p| expand(p).into_iter().map(move |e| format!("{prefix}{e}")))
        .collect()
}

/// The module of the tree a path names, from a file of module `from`; `None` for paths
/// into other crates.
fn resolve(
    path: &str,
    from: &Module,
    indented: bool,
    modules: &BTreeSet<Module>,
) -> Option<Module> {
    let path = path.split(" as ").next().unwrap_or(path);
    let mut segments = path.split("::").map(str::trim).peekable();
    let mut at: Module = match *segments.peek()? {
        "crate" => Vec::new(),
        "self" => from.clone(),
        "super" if indented => from.clone(),
        "super" => from[..from.len().saturating_sub(1)].to_vec(),
        _ => return None,
    };
    segments.next();
    while segments.peek() == Some(&"super") {
        segments.next();
        at.pop();
    }
    for segment in segments {
        let mut next = at.clone();
        next.push(segment.to_owned());
        if !modules.contains(&next) {
            break;
        }
        at = next;
    }
    Some(at)
}

/// The module edges of a tree of source files (path relative to `src/`, contents).
fn edges(files: &[(PathBuf, String)]) -> BTreeSet<(Module, Module)> {
    let modules: BTreeSet<Module> = files.iter().filter_map(|(p, _)| module_of(p)).collect();
    let mut edges = BTreeSet::new();
    for (path, source) in files {
        let Some(from) = module_of(path) else {
            continue;
        };
        for (statement, indented) in use_statements(source) {
            for named in expand(&statement) {
                if let Some(to) = resolve(&named, &from, indented, &modules)
                    && to != from
                {
                    edges.insert((from.clone(), to));
                }
            }
        }
    }
    edges
}

/// The edges seen at `depth` module levels: each end cut to its first `depth` parts;
/// self-edges and (below the top) edges between a module and its ancestor dropped.
fn at_depth(edges: &BTreeSet<(Module, Module)>, depth: usize) -> BTreeSet<(Module, Module)> {
    edges
        .iter()
        .map(|(a, b)| {
            (
                a[..a.len().min(depth)].to_vec(),
                b[..b.len().min(depth)].to_vec(),
            )
        })
        .filter(|(a, b)| a != b && !a.is_empty() && !b.is_empty())
        .filter(|(a, b)| depth == 1 || !(a.starts_with(b) || b.starts_with(a)))
        .collect()
}

/// A circle of the graph, if it has one.
fn find_circle(edges: &BTreeSet<(Module, Module)>) -> Option<Vec<Module>> {
    let mut next: BTreeMap<&Module, Vec<&Module>> = BTreeMap::new();
    for (a, b) in edges {
        next.entry(a).or_default().push(b);
    }
    // 0: unseen, 1: on the current path, 2: done.
    let mut state: BTreeMap<&Module, u8> = BTreeMap::new();
    fn visit<'a>(
        node: &'a Module,
        next: &BTreeMap<&'a Module, Vec<&'a Module>>,
        state: &mut BTreeMap<&'a Module, u8>,
        path: &mut Vec<&'a Module>,
    ) -> Option<Vec<Module>> {
        state.insert(node, 1);
        path.push(node);
        for &to in next.get(node).into_iter().flatten() {
            match state.get(to).copied().unwrap_or(0) {
                1 => {
                    let start = path.iter().position(|m| *m == to).unwrap_or(0);
                    let mut circle: Vec<Module> =
                        path[start..].iter().map(|m| (*m).clone()).collect();
                    circle.push(to.clone());
                    return Some(circle);
                }
                0 => {
                    if let Some(circle) = visit(to, next, state, path) {
                        return Some(circle);
                    }
                }
                _ => {}
            }
        }
        path.pop();
        state.insert(node, 2);
        None
    }
    let nodes: Vec<&Module> = next.keys().copied().collect();
    for node in nodes {
        if state.get(node).copied().unwrap_or(0) == 0
            && let Some(circle) = visit(node, &next, &mut state, &mut Vec::new())
        {
            return Some(circle);
        }
    }
    None
}

fn read_tree(dir: &Path, root: &Path, out: &mut Vec<(PathBuf, String)>) {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .expect("read src")
        .map(|e| e.expect("dir entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            read_tree(&path, root, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let source = fs::read_to_string(&path).expect("read source");
            let relative = path.strip_prefix(root).expect("under src").to_path_buf();
            out.push((relative, source));
        }
    }
}

fn show(circle: &[Module]) -> String {
    circle
        .iter()
        .map(|m| format!("crate::{}", m.join("::")))
        .collect::<Vec<_>>()
        .join(" -> ")
}

#[test]
fn server_src_has_no_import_circle() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    read_tree(&root, &root, &mut files);
    let found = edges(&files);
    // The reading works: the engine is imported, and it imports its own parts.
    assert!(found.iter().any(|(_, to)| to == &["engine".to_owned()]));
    assert!(
        found
            .iter()
            .any(|(from, _)| from.first().is_some_and(|m| m == "engine"))
    );
    for depth in [1, 2] {
        if let Some(circle) = find_circle(&at_depth(&found, depth)) {
            panic!("import circle in server/src: {}", show(&circle));
        }
    }
}

#[test]
fn a_circle_is_found() {
    let file = |path: &str, source: &str| (PathBuf::from(path), source.to_owned());
    let files = [
        file("lib.rs", "pub mod engine;\npub mod snapshot;\n"),
        file("engine.rs", "mod window;\npub use window::Window;\n"),
        file(
            "engine/window.rs",
            "use crate::snapshot::codec::{\n    DecodeError, get_u32,\n};\n",
        ),
        file("snapshot.rs", "pub mod codec;\n"),
        file("snapshot/codec.rs", "use crate::engine::Window;\n"),
        file(
            "snapshot/store.rs",
            "    use super::*;\nuse super::codec::{self, DecodeError as E};\n",
        ),
    ];
    let found = edges(&files);
    let m = |path: &str| path.split("::").map(str::to_owned).collect::<Module>();
    assert!(found.contains(&(m("engine::window"), m("snapshot::codec"))));
    assert!(found.contains(&(m("snapshot::codec"), m("engine"))));
    assert!(found.contains(&(m("snapshot::store"), m("snapshot::codec"))));
    let circle = find_circle(&at_depth(&found, 1)).expect("engine <-> snapshot");
    assert_eq!(
        show(&circle),
        "crate::engine -> crate::snapshot -> crate::engine"
    );
    // Between files, a parent's re-export named by its child is no circle.
    assert_eq!(find_circle(&at_depth(&found, 2)), None);
    let two = [
        file("lib.rs", "mod a;\n"),
        file("a.rs", "mod b;\nmod c;\n"),
        file("a/b.rs", "use super::c::X;\n"),
        file("a/c.rs", "use crate::a::b::Y;\n"),
    ];
    assert!(find_circle(&at_depth(&edges(&two), 2)).is_some());
}
