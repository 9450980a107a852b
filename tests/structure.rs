//! Architecture tests: they read `src/` as text and pin the layering the code is meant to keep.
//! Platform SIMD and candle's CPU storage are touched only under `src/kernels/`; the model
//! families (OPT, T5) are matched on only in `src/model/`, so the rest of the server stays
//! family-agnostic; the model, nn and kernel layers keep no thread-local state (work hops between
//! rayon and worker threads, so a thread-local silently forks); no two files depend on each other
//! in a circle, directly or through others; and every file opens with a `//!` line saying what it
//! is for. These rules are easy to break one innocent `use` at a time and nothing else would
//! notice, so each test names every offending `file:line`. It uses only `std` (no parser crate),
//! so it is a set of deliberate heuristics over source text with comments and string literals
//! blanked out, not a Rust parser: keep code in ordinary rustfmt shape and they hold.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// One file under `src/`: `path` is relative to the crate ("src/model/opt.rs"), `code` is the
/// text with comments and string/char literal contents replaced by spaces (newlines kept, so
/// line numbers of `raw` and `code` agree).
struct SourceFile {
    path: String,
    raw: String,
    code: String,
}

impl SourceFile {
    fn new(path: &str, raw: &str) -> Self {
        SourceFile {
            path: path.to_string(),
            raw: raw.to_string(),
            code: blank_non_code(raw),
        }
    }
    /// (1-based line number, code line, original line) for every line.
    fn lines(&self) -> impl Iterator<Item = (usize, &str, &str)> {
        self.code
            .lines()
            .zip(self.raw.lines())
            .enumerate()
            .map(|(i, (c, r))| (i + 1, c, r))
    }
}

/// Replaces comments (`//`, nested `/* */`) and the insides of string, raw-string and char
/// literals with spaces, so that text in docs or messages never counts as code. Lifetimes (`'a`)
/// are told from char literals by the closing quote two characters on.
fn blank_non_code(src: &str) -> String {
    let c: Vec<char> = src.chars().collect();
    let mut out = c.clone();
    let blank = |out: &mut Vec<char>, from: usize, to: usize| {
        for ch in &mut out[from..to.min(c.len())] {
            if *ch != '\n' {
                *ch = ' ';
            }
        }
    };
    let ident = |ch: char| ch.is_alphanumeric() || ch == '_';
    let at = |i: usize| c.get(i).copied().unwrap_or('\0');
    let mut i = 0;
    while i < c.len() {
        if c[i] == '/' && at(i + 1) == '/' {
            let end = (i..c.len()).find(|&j| c[j] == '\n').unwrap_or(c.len());
            blank(&mut out, i, end);
            i = end;
        } else if c[i] == '/' && at(i + 1) == '*' {
            let (mut depth, mut j) = (1, i + 2);
            while j < c.len() && depth > 0 {
                if c[j] == '/' && at(j + 1) == '*' {
                    depth += 1;
                    j += 1;
                } else if c[j] == '*' && at(j + 1) == '/' {
                    depth -= 1;
                    j += 1;
                }
                j += 1;
            }
            blank(&mut out, i, j);
            i = j;
        } else if c[i] == 'r'
            && (i == 0 || !ident(c[i - 1]) || c[i - 1] == 'b')
            && matches!(at(i + 1), '"' | '#')
            && (i + 1..c.len())
                .find(|&j| c[j] != '#')
                .is_some_and(|j| c[j] == '"')
        {
            // r"..." / r#"..."#: ends at a quote followed by as many hashes as it opened with.
            let hashes = (i + 1..c.len()).take_while(|&j| c[j] == '#').count();
            let open = i + 1 + hashes;
            let mut j = open + 1;
            while j < c.len() && !(c[j] == '"' && (1..=hashes).all(|h| at(j + h) == '#')) {
                j += 1;
            }
            blank(&mut out, open + 1, j);
            i = j + 1 + hashes;
        } else if c[i] == '"' {
            let mut j = i + 1;
            while j < c.len() && c[j] != '"' {
                j += if c[j] == '\\' { 2 } else { 1 };
            }
            blank(&mut out, i + 1, j);
            i = j + 1;
        } else if c[i] == '\'' && (at(i + 1) == '\\' || at(i + 2) == '\'') {
            let mut j = if at(i + 1) == '\\' { i + 3 } else { i + 2 }; // '\'' is a char too
            while j < c.len() && c[j] != '\'' {
                j += 1;
            }
            blank(&mut out, i + 1, j);
            i = j + 1;
        } else {
            i += 1;
        }
    }
    out.into_iter().collect()
}

fn is_ident_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// Every `.rs` file under `src/`, sorted. `src/bin/` holds separate binaries: out of scope.
fn load_sources() -> Vec<SourceFile> {
    fn walk(dir: &Path, rel: &str, out: &mut Vec<(String, std::path::PathBuf)>) {
        for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("read {dir:?}: {e}")) {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            let rel = format!("{rel}/{name}");
            if path.is_dir() && rel != "src/bin" {
                walk(&path, &rel, out);
            } else if name.ends_with(".rs") {
                out.push((rel, path));
            }
        }
    }
    // Plain `rustc --test` (no cargo) leaves CARGO_MANIFEST_DIR unset: run from the crate root.
    let root = Path::new(option_env!("CARGO_MANIFEST_DIR").unwrap_or("."));
    let mut found = Vec::new();
    walk(&root.join("src"), "src", &mut found);
    found.sort();
    assert!(!found.is_empty(), "no .rs files under {:?}/src", root);
    let read = |(rel, path): (String, std::path::PathBuf)| {
        SourceFile::new(&rel, &std::fs::read_to_string(path).unwrap())
    };
    found.into_iter().map(read).collect()
}

fn fail_if_any(rule: &str, offenders: &[String]) {
    assert!(
        offenders.is_empty(),
        "{rule}:\n  {}\n",
        offenders.join("\n  ")
    );
}

#[test]
fn simd_and_cpu_storage_live_only_under_kernels() {
    // Target-specific intrinsics and reaching into candle's CPU buffers are the unsafe,
    // per-platform part of the code; keeping them in one layer keeps the rest portable.
    let needles = [
        "std::arch",
        "core::arch",
        "Storage::Cpu",
        "storage_and_layout",
    ];
    let mut offenders = Vec::new();
    for file in load_sources()
        .iter()
        .filter(|f| !f.path.starts_with("src/kernels/"))
    {
        for (n, code, raw) in file.lines() {
            for needle in needles.iter().filter(|s| code.contains(*s)) {
                offenders.push(format!("{}:{n}: `{needle}` in `{}`", file.path, raw.trim()));
            }
        }
    }
    fail_if_any("SIMD / CPU storage outside src/kernels/", &offenders);
}

/// Enum-variant uses of a model family on a code line: the whole word `Opt` or `T5` (so
/// `OptConfig(`, `MyOpt(`, `::Options` do not count) right after `::` or right before `(`/`{`.
fn family_variant_uses(code: &str) -> Vec<&'static str> {
    let b = code.as_bytes();
    let mut hits = Vec::new();
    for word in ["Opt", "T5"] {
        for (i, _) in code.match_indices(word) {
            let end = i + word.len();
            let whole = (i == 0 || !is_ident_byte(b[i - 1]))
                && b.get(end).is_none_or(|&c| !is_ident_byte(c));
            let after_path = code[..i].ends_with("::");
            let ctor = matches!(code[end..].trim_start().bytes().next(), Some(b'(' | b'{'));
            if whole && (after_path || ctor) && !hits.contains(&word) {
                hits.push(word); // once per line is enough to point at it
            }
        }
    }
    hits
}

#[test]
fn model_families_are_named_only_in_the_model_layer() {
    // Serving, batching and the API should ask the model layer questions rather than match on
    // which decoder it is; a third family should then be a change under src/model/ only.
    let mut offenders = Vec::new();
    for file in load_sources()
        .iter()
        .filter(|f| !f.path.starts_with("src/model/"))
    {
        for (n, code, raw) in file.lines() {
            for word in family_variant_uses(code) {
                offenders.push(format!(
                    "{}:{n}: `{word}` variant in `{}`",
                    file.path,
                    raw.trim()
                ));
            }
        }
    }
    fail_if_any("model family variants named outside src/model/", &offenders);
}

#[test]
fn no_thread_locals_in_the_model_layers() {
    // The model runs across rayon workers and the engine thread; per-thread state there would
    // differ by which thread a job lands on. Settings must travel as values instead.
    let layers = ["src/model/", "src/nn/", "src/kernels/"];
    let mut offenders = Vec::new();
    for file in load_sources()
        .iter()
        .filter(|f| layers.iter().any(|l| f.path.starts_with(l)))
    {
        for (n, _, raw) in file
            .lines()
            .filter(|(_, code, _)| code.contains("thread_local!"))
        {
            offenders.push(format!("{}:{n}: `{}`", file.path, raw.trim()));
        }
    }
    fail_if_any("thread_local! in the model layers", &offenders);
}

// ---- the file dependency graph -------------------------------------------------------------
//
// Nodes are files; an edge a -> b means a code line in a names a path (`crate::`, `super::`,
// `self::`, or `blip2_server::`, which src/main.rs uses for the library) whose longest prefix
// that is a file module is b. Deliberately NOT edges:
//   (a) `pub use ...` / `pub(crate) use ...` (any `pub(..)`): a facade re-exporting its
//       children is not a dependency of the facade on them;
//   (b) `mod x;` declarations (they hold no rooted path, so there is nothing to skip).
// Not seen at all: paths with no root keyword (`use child::X`, `child::f()`), which need name
// resolution this text scan does not do; write `self::child::X` to make such an edge visible.
// Deliberately an edge: (c) a child naming its ancestor itself, e.g. `use super::Result` in
// src/model/opt.rs -> src/model/mod.rs: if mod.rs also uses opt.rs, that is a real circle.
// `super`/`self` are resolved against inline `mod x { ... }` blocks too, so `use super::*` in a
// `mod tests` means the file itself (a self edge, dropped).

/// Edges with the first line that makes each: file -> (dependency file -> line).
type Graph = BTreeMap<String, BTreeMap<String, usize>>;

/// src/lib.rs, src/main.rs -> [], src/a.rs and src/a/mod.rs -> [a], src/a/b.rs -> [a, b].
fn module_path(file: &str) -> Vec<String> {
    let rel = file.trim_start_matches("src/").trim_end_matches(".rs");
    let mut segs: Vec<String> = rel.split('/').map(String::from).collect();
    if segs.last().map(String::as_str) == Some("mod") || rel == "lib" || rel == "main" {
        segs.pop();
    }
    segs
}

/// Absolute module path named by `segs` as seen from module `ctx`, or None for paths that do
/// not start at a root keyword (external crates, std, relative names).
fn absolute(ctx: &[String], segs: &[&str]) -> Option<Vec<String>> {
    let (first, rest) = segs.split_first()?;
    let mut base = match *first {
        "crate" | "blip2_server" => Vec::new(),
        "self" | "super" => ctx.to_vec(),
        _ => return None,
    };
    let mut rest = rest;
    if *first == "super" {
        base.pop()?;
        while rest.first() == Some(&"super") {
            base.pop()?;
            rest = &rest[1..];
        }
    }
    base.extend(
        rest.iter()
            .filter(|s| !matches!(**s, "self" | "*" | ""))
            .map(|s| s.to_string()),
    );
    Some(base)
}

/// Paths in a code line that start at a root keyword, each as its `::`-separated segments.
fn rooted_paths(line: &str) -> Vec<Vec<&str>> {
    let b = line.as_bytes();
    let (mut out, mut i) = (Vec::new(), 0);
    while i < b.len() {
        let boundary = i == 0 || !(is_ident_byte(b[i - 1]) || b[i - 1] == b'$');
        let rooted = ["crate::", "super::", "self::", "blip2_server::"]
            .iter()
            .any(|r| line[i..].starts_with(r));
        if !(boundary && rooted) {
            i += 1;
            continue;
        }
        let mut segs = Vec::new();
        loop {
            let start = i;
            while i < b.len() && is_ident_byte(b[i]) {
                i += 1;
            }
            segs.push(&line[start..i]);
            if line[i..].starts_with("::") && b.get(i + 2).is_some_and(|&c| is_ident_byte(c)) {
                i += 2;
            } else {
                break;
            }
        }
        out.push(segs);
    }
    out
}

/// Flattens a use tree (`a::{b, c::{d as e, self}}`) into paths: "a::b", "a::c::d", "a::c::self".
fn expand_use(prefix: &str, tree: &str, out: &mut Vec<String>) {
    let tree = tree.trim();
    let join = |p: &str, s: &str| {
        if p.is_empty() {
            s.to_string()
        } else {
            format!("{p}::{s}")
        }
    };
    if let (Some(open), Some(close)) = (tree.find('{'), tree.rfind('}')) {
        let head = join(prefix, tree[..open].trim().trim_end_matches("::"));
        let (mut depth, mut start, inner) = (0, 0, &tree[open + 1..close]);
        for (i, ch) in inner.char_indices().chain([(inner.len(), ',')]) {
            match ch {
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    expand_use(&head, &inner[start..i], out);
                    start = i + 1;
                }
                _ => {}
            }
        }
    } else if let Some(path) = tree
        .split(" as ")
        .next()
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        out.push(join(prefix, path));
    }
}

/// `use` statements start a line (after visibility); Some(is_re_export, text after `use`).
fn use_statement(code_line: &str) -> Option<(bool, &str)> {
    let t = code_line.trim_start();
    let (public, t) = match t.strip_prefix("pub") {
        Some(r) if r.starts_with('(') => (true, r[r.find(')')? + 1..].trim_start()),
        Some(r) if r.starts_with(' ') => (true, r.trim_start()),
        _ => (false, t),
    };
    t.strip_prefix("use ").map(|rest| (public, rest))
}

fn build_graph(files: &[SourceFile]) -> Graph {
    // Module path -> file. Both crate roots are [], and src/lib.rs wins: `blip2_server::` and a
    // library file's `crate::` both mean the library.
    let mut modules: BTreeMap<Vec<String>, String> = BTreeMap::new();
    for f in files {
        let m = module_path(&f.path);
        if !modules.contains_key(&m) || f.path == "src/lib.rs" {
            modules.insert(m, f.path.clone());
        }
    }
    let owner = |abs: &[String]| (0..=abs.len()).rev().find_map(|n| modules.get(&abs[..n]));
    let mut graph = Graph::new();
    for f in files {
        let deps = graph.entry(f.path.clone()).or_default();
        let mut add = |ctx: &[String], segs: &[&str], line: usize| {
            if let Some(dep) = absolute(ctx, segs).as_deref().and_then(owner) {
                if *dep != f.path {
                    deps.entry(dep.clone()).or_insert(line);
                }
            }
        };
        // ctx = the file's module plus the inline `mod x {` blocks open on this line.
        let file_mod = module_path(&f.path);
        let (mut inline, mut depth): (Vec<(String, i32)>, i32) = (Vec::new(), 0);
        let mut stmt: Option<(usize, bool, String)> = None; // a `use` not yet closed by `;`
        for (n, code, _) in f.lines() {
            let words: Vec<&str> = code.split_whitespace().collect();
            if let Some(k) = words.iter().position(|w| *w == "mod") {
                if words.get(k + 2).is_some_and(|w| w.starts_with('{')) {
                    inline.push((words[k + 1].to_string(), depth));
                }
            }
            let ctx: Vec<String> = file_mod
                .iter()
                .cloned()
                .chain(inline.iter().map(|m| m.0.clone()))
                .collect();
            depth += code.matches('{').count() as i32 - code.matches('}').count() as i32;
            while inline.last().is_some_and(|(_, d)| *d >= depth) {
                inline.pop();
            }
            match (&mut stmt, use_statement(code)) {
                // Multi-line `use` statements are joined until their `;`.
                (Some((_, _, text)), _) => text.push_str(&format!(" {code}")),
                (None, Some((public, rest))) => stmt = Some((n, public, rest.to_string())),
                (None, None) => rooted_paths(code)
                    .iter()
                    .for_each(|segs| add(&ctx, segs, n)),
            }
            if let Some((start, public, text)) = stmt.take_if(|s| s.2.contains(';')) {
                if public {
                    continue; // (a) re-exports are not edges
                }
                let mut paths = Vec::new();
                expand_use("", &text[..text.find(';').unwrap()], &mut paths);
                for p in &paths {
                    add(
                        &ctx,
                        &p.split("::").map(str::trim).collect::<Vec<_>>(),
                        start,
                    );
                }
            }
        }
    }
    graph
}

/// Every distinct cycle a depth-first search closes, as file paths with the first repeated at
/// the end, rotated to start at its smallest file.
fn find_cycles(graph: &Graph) -> Vec<Vec<String>> {
    fn dfs<'g>(
        node: &'g str,
        graph: &'g Graph,
        on_stack: &mut Vec<&'g str>,
        done: &mut BTreeSet<&'g str>,
        found: &mut BTreeSet<Vec<String>>,
    ) {
        on_stack.push(node);
        for dep in graph.get(node).into_iter().flat_map(|d| d.keys()) {
            if let Some(pos) = on_stack.iter().position(|n| *n == dep.as_str()) {
                let ring = &on_stack[pos..];
                let min = (0..ring.len()).min_by_key(|&i| ring[i]).unwrap();
                let mut cycle: Vec<String> = ring[min..]
                    .iter()
                    .chain(&ring[..min])
                    .map(|s| s.to_string())
                    .collect();
                cycle.push(cycle[0].clone());
                found.insert(cycle);
            } else if !done.contains(dep.as_str()) {
                dfs(dep, graph, on_stack, done, found);
            }
        }
        on_stack.pop();
        done.insert(node);
    }
    let (mut done, mut found) = (BTreeSet::new(), BTreeSet::new());
    for node in graph.keys() {
        if !done.contains(node.as_str()) {
            dfs(node, graph, &mut Vec::new(), &mut done, &mut found);
        }
    }
    found.into_iter().collect()
}

#[test]
fn no_import_circles_between_files() {
    // A circle means neither file can be understood, tested or moved without the other; the
    // layers should point one way (api -> engine -> generation -> model -> kernels).
    let graph = build_graph(&load_sources());
    let offenders: Vec<String> = find_cycles(&graph)
        .iter()
        .map(|cycle| {
            let why: Vec<String> = cycle
                .windows(2)
                .map(|e| format!("{}:{} uses {}", e[0], graph[&e[0]][&e[1]], e[1]))
                .collect();
            format!("{}\n      ({})", cycle.join(" -> "), why.join("; "))
        })
        .collect();
    fail_if_any("import circles between files", &offenders);
}

#[test]
fn import_graph_checker_finds_cycles_and_ignores_reexports() {
    // The graph code on fake files, to show the check above is able to fail.
    let files = [
        SourceFile::new("src/lib.rs", "//! root\npub mod a;\npub mod b;\npub mod m;\n"),
        SourceFile::new("src/a.rs", "//! a\nuse crate::b::Thing;\nmod tests {\n    use super::*;\n}\n"),
        SourceFile::new("src/b.rs", "//! b\nuse crate::{\n    m::k::Inner,\n};\nfn f() { crate::a::helper(\"crate::m\") }\n"),
        SourceFile::new("src/m/mod.rs", "//! m\nmod k;\npub use self::k::K;\npub(crate) use crate::m::k::{\n    K as K2,\n};\n"),
        SourceFile::new("src/m/k.rs", "//! k\nuse super::{Shared, other::X};\n// use crate::a::Commented;\n"),
    ];
    let graph = build_graph(&files);
    let deps = |f: &str| graph[f].keys().cloned().collect::<Vec<_>>();
    assert_eq!(
        find_cycles(&graph),
        vec![vec!["src/a.rs", "src/b.rs", "src/a.rs"]]
    );
    assert_eq!(
        deps("src/a.rs"),
        ["src/b.rs"],
        "inline `mod tests {{ use super::* }}` is a self edge"
    );
    assert_eq!(
        deps("src/b.rs"),
        ["src/a.rs", "src/m/k.rs"],
        "multi-line braces; strings ignored"
    );
    assert!(deps("src/m/mod.rs").is_empty(), "re-exports are not edges");
    assert_eq!(
        deps("src/m/k.rs"),
        ["src/m/mod.rs"],
        "child -> ancestor is an edge; comments ignored"
    );
    assert_eq!(
        family_variant_uses("x::TextConfig::T5(_) | Opt { .. } | OptConfig(a) | a::Options"),
        ["Opt", "T5"]
    );
}

#[test]
fn every_source_file_says_what_it_is_for() {
    // The first thing a reader sees should be the file's purpose, not its imports.
    let offenders: Vec<String> = load_sources()
        .iter()
        .filter_map(|f| {
            let (n, first) = f
                .raw
                .lines()
                .enumerate()
                .find(|(_, l)| !l.trim().is_empty())
                .unwrap_or((0, ""));
            (!first.trim_start().starts_with("//!"))
                .then(|| format!("{}:{}: starts with `{}`", f.path, n + 1, first.trim()))
        })
        .collect();
    fail_if_any("files not opening with a `//!` doc comment", &offenders);
}

/// `.unwrap()` / `.expect(` in `code` before its first `#[cfg(test)]`, as `line: text`.
fn panicking_calls(code: &str) -> Vec<String> {
    code.lines()
        .take_while(|l| !l.contains("#[cfg(test)]"))
        .enumerate()
        .filter(|(_, l)| l.contains(".unwrap()") || l.contains(".expect("))
        .map(|(n, l)| format!("{}: {}", n + 1, l.trim()))
        .collect()
}

#[test]
fn no_unwrap_or_expect_on_a_request_path() {
    // A request must get an answer, never a panic: the HTTP layer and the server around it
    // return errors instead (tests below `#[cfg(test)]` may unwrap).
    assert_eq!(
        panicking_calls(&blank_non_code(
            "fn a() { x.unwrap(); }\n// .unwrap() in a comment\n#[cfg(test)]\nfn t() { y.expect(\"\"); }"
        )),
        ["1: fn a() { x.unwrap(); }"]
    );
    let offenders: Vec<String> = load_sources()
        .iter()
        .filter(|f| f.path.starts_with("src/api/") || f.path == "src/server.rs")
        .flat_map(|f| {
            panicking_calls(&f.code)
                .into_iter()
                .map(move |l| format!("{}:{l}", f.path))
        })
        .collect();
    fail_if_any("unwrap/expect on a request path", &offenders);
}
