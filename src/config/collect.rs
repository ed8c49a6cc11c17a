//! Every problem in a configuration file at once, not only the first.
//!
//! serde stops at the first error. To go on, the file is parsed once into toml's spanned
//! tree and the target type is deserialized from it again and again: each error is recorded
//! with its span and field path, the node at fault is taken out (a missing field gets a
//! placeholder) and the next pass finds the next error. Nodes taken out or filled in are
//! *tainted*: a semantic check that mentions one judged a default or a placeholder, not the
//! file, so [`mentions_tainted`] lets the caller drop its message.

use serde::de::DeserializeOwned;
use std::borrow::Cow;
use std::fmt::Write as _;
use std::ops::Range;
use toml::de::{DeArray, DeInteger, DeTable, DeValue, ValueDeserializer};
use toml::Spanned;

/// Bound on deserialization passes (each one finds an error or tries a placeholder).
const MAX_PASSES: usize = 256;
/// Bound on the nesting walked (toml bounds its own nesting; this keeps ours bounded too).
const MAX_DEPTH: usize = 64;
/// Placeholder kind of an empty table (see [`placeholder`]).
const TABLE: usize = 5;

/// One step of a field path: a table key or an array index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Seg {
    Key(String),
    Index(usize),
}

pub(super) type FieldPath = Vec<Seg>;

/// A deserialization error: where in the text (when known), which field, what.
#[derive(Debug)]
pub(super) struct Problem {
    pub span: Option<Range<usize>>,
    pub path: FieldPath,
    pub message: String,
}

pub(super) struct Collected<T> {
    /// The value once every problem was taken out; `None` when collecting had to stop.
    pub value: Option<T>,
    pub problems: Vec<Problem>,
    pub tainted: Vec<FieldPath>,
}

struct Placeholder {
    path: FieldPath,
    span: Range<usize>,
    kind: usize,
}

/// Deserialize `doc` as `T`, collecting every error (see the module doc). `text_len` is the
/// length of the text `doc` was parsed from: placeholders get spans past its end, so an
/// error about one is never mistaken for an error about the file.
pub(super) fn collect<T: DeserializeOwned>(
    text_len: usize,
    mut doc: Spanned<DeValue<'_>>,
) -> Collected<T> {
    // Problems name paths in the file as written; elements taken out of an array shift
    // the indices of `doc`, so each path is mapped back to `original` by its node's span.
    let original = doc.clone();
    let mut problems = Vec::new();
    let mut tainted: Vec<FieldPath> = Vec::new();
    let mut placeholders: Vec<Placeholder> = Vec::new();
    let mut next_span = text_len.saturating_add(1);
    let mut fresh_span = move || {
        let s = next_span..next_span;
        next_span = next_span.saturating_add(1);
        s
    };
    for pass in 0..=MAX_PASSES {
        if pass == MAX_PASSES {
            problems.push(Problem {
                span: None,
                path: Vec::new(),
                message: format!("stopped after {MAX_PASSES} passes: fix these and check again"),
            });
            break;
        }
        let err = match T::deserialize(ValueDeserializer::from(doc.clone())) {
            Ok(value) => {
                return Collected {
                    value: Some(value),
                    problems,
                    tainted,
                }
            }
            Err(e) => e,
        };
        let message = err.message().to_string();
        let Some(span) = err.span() else {
            problems.push(Problem {
                span: None,
                path: Vec::new(),
                message,
            });
            break;
        };
        if let Some(field) = quoted_after(&message, "missing field `") {
            let table = locate(&doc, &span);
            let mut path = table.clone();
            path.push(Seg::Key(field.clone()));
            // Missing because we took it out (or its table is a placeholder): already said.
            if !is_tainted(&tainted, &path) {
                let mut in_file = original_path(&original, &doc, &table);
                in_file.push(Seg::Key(field));
                problems.push(Problem {
                    // A missing section has no line of its own.
                    span: Some(span).filter(|_| !table.is_empty()),
                    path: in_file,
                    message,
                });
            }
            let ph = fresh_span();
            if !insert(&mut doc, &path, Spanned::new(ph.clone(), placeholder(0))) {
                break;
            }
            tainted.push(path.clone());
            placeholders.push(Placeholder {
                path,
                span: ph,
                kind: 0,
            });
            continue;
        }
        if let Some(i) = placeholders.iter().position(|p| p.span == span) {
            // A placeholder of the wrong type for its field: try the next kind.
            placeholders[i].kind += 1;
            let kind = placeholders[i].kind;
            let path = placeholders[i].path.clone();
            if kind <= TABLE {
                if !set(&mut doc, &path, Spanned::new(span, placeholder(kind))) {
                    break;
                }
                continue;
            }
            // No kind fits (an enum tag, say): give up the enclosing table instead.
            placeholders.remove(i);
            let Some((_, parent)) = path.split_last() else {
                break;
            };
            let parent = parent.to_vec();
            if parent.is_empty() || !take_out(&mut doc, &parent, &mut placeholders, fresh_span()) {
                break;
            }
            tainted.push(parent);
            continue;
        }
        let mut path = locate(&doc, &span);
        if let Some(i) = element_named(&doc, &path, &message) {
            // A custom error (a bad workload, say) carries the array's span, not the
            // element's; the element is the one the message quotes.
            path.push(Seg::Index(i));
        }
        if let Some(field) = quoted_after(&message, "unknown field `") {
            // Some errors point at the table; name the key itself.
            let mut child = path.clone();
            child.push(Seg::Key(field));
            if get(&doc, &child).is_some() {
                path = child;
            }
        }
        problems.push(Problem {
            span: Some(span),
            path: original_path(&original, &doc, &path),
            message,
        });
        if path.is_empty() || !take_out(&mut doc, &path, &mut placeholders, fresh_span()) {
            break;
        }
        tainted.push(path);
    }
    Collected {
        value: None,
        problems,
        tainted,
    }
}

/// The path in `original` of the node at `path` in `doc` (found by its span); `path`
/// itself when the node is not in the file (a placeholder).
fn original_path(
    original: &Spanned<DeValue<'_>>,
    doc: &Spanned<DeValue<'_>>,
    path: &[Seg],
) -> FieldPath {
    if let Some(node) = get(doc, path).filter(|_| !path.is_empty()) {
        let found = locate(original, &node.span());
        if get(original, &found).is_some_and(|n| n.span() == node.span()) {
            return found;
        }
    }
    path.to_vec()
}

/// When `path` is an array, the first string element that `message` quotes (`"a/b"`).
fn element_named(doc: &Spanned<DeValue<'_>>, path: &[Seg], message: &str) -> Option<usize> {
    let DeValue::Array(a) = get(doc, path)?.get_ref() else {
        return None;
    };
    a.iter().position(|v| {
        v.get_ref()
            .as_str()
            .is_some_and(|s| message.contains(&format!("{s:?}")))
    })
}

/// Placeholders tried in turn for a missing field until one has the field's type.
fn placeholder(kind: usize) -> DeValue<'static> {
    match kind {
        0 => DeValue::String(Cow::Borrowed("")),
        1 => DeValue::Array(DeArray::new()),
        2 => DeValue::String(Cow::Borrowed("1s")),
        3 => DeValue::Integer(DeInteger::default()),
        4 => DeValue::Boolean(false),
        _ => DeValue::Table(DeTable::new()),
    }
}

/// The name between backticks after `prefix`, e.g. `shedule` in "unknown field `shedule`".
fn quoted_after(message: &str, prefix: &str) -> Option<String> {
    let rest = message.strip_prefix(prefix)?;
    rest.split_once('`').map(|(name, _)| name.to_string())
}

fn is_tainted(tainted: &[FieldPath], path: &[Seg]) -> bool {
    tainted.iter().any(|t| path.starts_with(t))
}

fn contains(outer: &Range<usize>, inner: &Range<usize>) -> bool {
    outer.start <= inner.start && inner.end <= outer.end
}

/// Path of the deepest node whose key or value span holds `span` (empty: the root).
fn locate(doc: &Spanned<DeValue<'_>>, span: &Range<usize>) -> FieldPath {
    fn walk(
        v: &DeValue<'_>,
        span: &Range<usize>,
        path: &mut FieldPath,
        best: &mut Option<FieldPath>,
    ) {
        if path.len() >= MAX_DEPTH {
            return;
        }
        let mut visit = |seg: Seg, key_span: Option<Range<usize>>, child: &Spanned<DeValue<'_>>| {
            path.push(seg);
            let here =
                key_span.is_some_and(|k| contains(&k, span)) || contains(&child.span(), span);
            if here && best.as_ref().is_none_or(|b| path.len() > b.len()) {
                *best = Some(path.clone());
            }
            walk(child.get_ref(), span, path, best);
            path.pop();
        };
        match v {
            DeValue::Table(t) => {
                for (k, child) in t.iter() {
                    visit(Seg::Key(k.get_ref().to_string()), Some(k.span()), child);
                }
            }
            DeValue::Array(a) => {
                for (i, child) in a.iter().enumerate() {
                    visit(Seg::Index(i), None, child);
                }
            }
            _ => {}
        }
    }
    let mut best = None;
    walk(doc.get_ref(), span, &mut Vec::new(), &mut best);
    best.unwrap_or_default()
}

fn get<'a, 'i>(doc: &'a Spanned<DeValue<'i>>, path: &[Seg]) -> Option<&'a Spanned<DeValue<'i>>> {
    let mut node = doc;
    for seg in path {
        node = match (node.get_ref(), seg) {
            (DeValue::Table(t), Seg::Key(k)) => t.get(k.as_str())?,
            (DeValue::Array(a), Seg::Index(i)) => a.get(*i)?,
            _ => return None,
        };
    }
    Some(node)
}

fn get_mut<'a, 'i>(
    doc: &'a mut Spanned<DeValue<'i>>,
    path: &[Seg],
) -> Option<&'a mut Spanned<DeValue<'i>>> {
    let mut node = doc;
    for seg in path {
        node = match (node.get_mut(), seg) {
            (DeValue::Table(t), Seg::Key(k)) => t.get_mut(k.as_str())?,
            (DeValue::Array(a), Seg::Index(i)) => a.get_mut(*i)?,
            _ => return None,
        };
    }
    Some(node)
}

/// Replace the node at `path`.
fn set<'i>(doc: &mut Spanned<DeValue<'i>>, path: &[Seg], value: Spanned<DeValue<'i>>) -> bool {
    match get_mut(doc, path) {
        Some(node) => {
            *node = value;
            true
        }
        None => false,
    }
}

/// Add a key to the table holding it.
fn insert<'i>(doc: &mut Spanned<DeValue<'i>>, path: &[Seg], value: Spanned<DeValue<'i>>) -> bool {
    let Some((Seg::Key(key), parent)) = path.split_last() else {
        return false;
    };
    let span = value.span();
    match get_mut(doc, parent).map(|p| p.get_mut()) {
        Some(DeValue::Table(t)) => {
            t.insert(Spanned::new(span, Cow::Owned(key.clone())), value);
            true
        }
        _ => false,
    }
}

/// Take the node at `path` out: a table key is removed; an array element is removed too,
/// except among tables (`[[targets]]`), where an empty placeholder table keeps the indices
/// of the later elements (they name targets in messages).
fn take_out(
    doc: &mut Spanned<DeValue<'_>>,
    path: &[Seg],
    placeholders: &mut Vec<Placeholder>,
    span: Range<usize>,
) -> bool {
    let Some((last, parent)) = path.split_last() else {
        return false;
    };
    let Some(parent) = get_mut(doc, parent) else {
        return false;
    };
    match (parent.get_mut(), last) {
        (DeValue::Table(t), Seg::Key(k)) => t.remove(k.as_str()).is_some(),
        (DeValue::Array(a), Seg::Index(i)) if *i < a.len() => {
            if a.iter().any(|v| v.get_ref().is_table()) {
                if let Some(slot) = a.get_mut(*i) {
                    *slot = Spanned::new(span.clone(), placeholder(TABLE));
                }
                placeholders.push(Placeholder {
                    path: path.to_vec(),
                    span,
                    kind: TABLE,
                });
            } else {
                let kept: Vec<_> = a
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| j != i)
                    .map(|(_, v)| v.clone())
                    .collect();
                *a = kept.into_iter().collect();
            }
            true
        }
        _ => false,
    }
}

/// `daemon.leader_election.lease_duration`, `targets[1] ("chatbot").drain.quiet_for`: the
/// field path as messages print it, with the target's name from the file.
pub(super) fn describe(doc: &Spanned<DeValue<'_>>, path: &[Seg]) -> String {
    let mut out = String::new();
    let mut rest = path;
    if let [Seg::Key(t), Seg::Index(i), tail @ ..] = path {
        if t == "targets" {
            let name = get(doc, &path[..2])
                .and_then(|v| v.get_ref().as_table())
                .and_then(|t| t.get("name"))
                .and_then(|n| n.get_ref().as_str())
                .unwrap_or_default();
            let _ = write!(out, "targets[{i}] ({name:?})");
            rest = tail;
        }
    }
    for seg in rest {
        match seg {
            Seg::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                let bare = !k.is_empty()
                    && k.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
                if bare {
                    out.push_str(k);
                } else {
                    let _ = write!(out, "{k:?}");
                }
            }
            Seg::Index(j) => {
                let _ = write!(out, "[{j}]");
            }
        }
    }
    out
}

/// The field path a message starts with (`targets[0] ("chat").drain.max_wait: ...`).
pub(super) fn message_path(message: &str) -> FieldPath {
    let mut path = Vec::new();
    let mut rest = message;
    if let Some(r) = rest.strip_prefix("targets[") {
        let Some((index, r)) = r.split_once(']') else {
            return path;
        };
        let Ok(index) = index.parse::<usize>() else {
            return path;
        };
        path.push(Seg::Key("targets".into()));
        path.push(Seg::Index(index));
        // Skip ` ("name")`: a Debug-quoted string, so `\` escapes the next character.
        rest = match r.strip_prefix(" (\"") {
            Some(quoted) => {
                let mut chars = quoted.char_indices();
                let mut end = None;
                while let Some((i, c)) = chars.next() {
                    match c {
                        '\\' => {
                            chars.next();
                        }
                        '"' => {
                            end = Some(i);
                            break;
                        }
                        _ => {}
                    }
                }
                match end.and_then(|e| quoted[e + 1..].strip_prefix(')')) {
                    Some(r) => r,
                    None => return path,
                }
            }
            None => r,
        };
    }
    let end = rest
        .find(|c: char| c == ':' || c.is_whitespace())
        .unwrap_or(rest.len());
    for part in rest[..end].split('.') {
        let (key, mut indices) = match part.split_once('[') {
            Some((k, i)) => (k, Some(i)),
            None => (part, None),
        };
        if !key.is_empty() {
            path.push(Seg::Key(key.to_string()));
        }
        while let Some(i) = indices {
            let Some((n, r)) = i.split_once(']') else {
                break;
            };
            match n.parse() {
                Ok(n) => path.push(Seg::Index(n)),
                Err(_) => break,
            }
            indices = r.strip_prefix('[');
        }
    }
    path
}

/// Span of the deepest node of `path` found in `doc` (the key's span when it is a key).
pub(super) fn span_of(doc: &Spanned<DeValue<'_>>, path: &[Seg]) -> Option<Range<usize>> {
    let mut node = doc;
    let mut found = None;
    for seg in path {
        match (node.get_ref(), seg) {
            (DeValue::Table(t), Seg::Key(k)) => match t.get_key_value(k.as_str()) {
                Some((key, v)) => {
                    found = Some(key.span());
                    node = v;
                }
                None => break,
            },
            (DeValue::Array(a), Seg::Index(i)) => match a.get(*i) {
                Some(v) => {
                    found = Some(v.span());
                    node = v;
                }
                None => break,
            },
            _ => break,
        }
    }
    found
}

/// Whether `message` (a semantic check's) is about a field that was taken out or filled in:
/// it starts in the same section or target and names the field (or its table).
pub(super) fn mentions_tainted(tainted: &[FieldPath], message: &str) -> bool {
    tainted.iter().any(|t| {
        let (scope, words) = match t.as_slice() {
            [Seg::Key(k), Seg::Index(i), rest @ ..] if k == "targets" => {
                (format!("targets[{i}] ("), rest)
            }
            [Seg::Key(k), rest @ ..] => (k.clone(), rest),
            _ => return false,
        };
        let in_scope = match scope.strip_suffix('(') {
            Some(_) => message.starts_with(&scope),
            None => message
                .strip_prefix(&scope)
                .is_some_and(|r| r.starts_with('.') || r.starts_with(':')),
        };
        let words: Vec<&str> = words
            .iter()
            .filter_map(|s| match s {
                Seg::Key(k) => Some(k.as_str()),
                Seg::Index(_) => None,
            })
            .collect();
        in_scope && (words.is_empty() || words.iter().any(|w| has_word(message, w)))
    })
}

/// `word` occurs in `text` not as part of a longer identifier (`timeout` is not in
/// `rollout_timeout`).
fn has_word(text: &str, word: &str) -> bool {
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    text.match_indices(word).any(|(i, _)| {
        let before = text[..i].chars().next_back();
        let after = text[i + word.len()..].chars().next();
        !before.is_some_and(ident) && !after.is_some_and(ident)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collecting_is_bounded_and_says_so() {
        let text: String = (0..MAX_PASSES + 10)
            .map(|i| format!("k{i} = 1\n"))
            .collect();
        let doc = DeTable::parse(&text).unwrap();
        let doc = Spanned::new(doc.span(), DeValue::Table(doc.into_inner()));
        let c = collect::<crate::config::AuditConfig>(text.len(), doc);
        assert!(c.value.is_none());
        assert_eq!(c.problems.len(), MAX_PASSES + 1);
        assert!(c.problems[MAX_PASSES].message.starts_with("stopped after"));
    }

    #[test]
    fn message_paths_parse() {
        let k = |s: &str| Seg::Key(s.into());
        assert_eq!(
            message_path("targets[2] (\"a\\\"):b\").smoke_probes[1].interval: must"),
            vec![
                k("targets"),
                Seg::Index(2),
                k("smoke_probes"),
                Seg::Index(1),
                k("interval")
            ]
        );
        assert_eq!(
            message_path("daemon.leader_election: namespace"),
            vec![k("daemon"), k("leader_election")]
        );
        assert_eq!(message_path("targets[x"), vec![]);
    }

    #[test]
    fn tainted_fields_silence_checks_that_mention_them() {
        let k = |s: &str| Seg::Key(s.into());
        let t = vec![
            vec![k("daemon"), k("delete_retry_base")],
            vec![k("targets"), Seg::Index(1), k("grace_period")],
        ];
        assert!(mentions_tainted(
            &t,
            "daemon.delete_max_backoff: must be at least daemon.delete_retry_base"
        ));
        assert!(mentions_tainted(
            &t,
            "targets[1] (\"x\").max_key_age: (1d) must exceed grace_period + rollout_timeout"
        ));
        assert!(!mentions_tainted(
            &t,
            "targets[0] (\"x\").max_key_age: (1d) must exceed grace_period + rollout_timeout"
        ));
        assert!(!mentions_tainted(&t, "daemon.poll_interval: must be"));
        assert!(!has_word("rollout_timeout: x", "timeout"));
        assert!(has_word("a timeout, b", "timeout"));
    }
}
