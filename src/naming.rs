//! Service-account names from `daemon.account_name_template`, e.g.
//! `"{yy}-{mm}-{target}-{env}-{rotation}"` for the `YY-MM-customer-project-Prod` convention.
//! The rotation id must be in the name: it keeps names unique and lets a restarted daemon
//! find the account of a create whose answer was lost by the name its journal recorded.
//! Ownership still comes from the journals, never from a name that merely fits.

use chrono::{DateTime, Utc};

/// The names the daemon has always used.
pub const DEFAULT_TEMPLATE: &str = "{prefix}-{target}-{rotation}";

/// Longest rendered name accepted. The OpenAPI description states no limit for service
/// account names; this keeps them short enough for any dashboard and log line.
pub const MAX_NAME_LEN: usize = 100;

/// A rotation id of the longest (and only) length, to check rendered lengths at load.
pub const SAMPLE_ROTATION_ID: &str = "20261231235959-ffffff";

const PLACEHOLDERS: &str = "{prefix}, {target}, {rotation}, {env}, {yy}, {yyyy}, {mm}, {dd}";

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Lit(String),
    Prefix,
    Target,
    Rotation,
    Env,
    Yy,
    Yyyy,
    Mm,
    Dd,
}

/// A parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameTemplate {
    parts: Vec<Part>,
}

/// What a name is rendered from.
#[derive(Debug, Clone, Copy)]
pub struct NameVars<'a> {
    pub prefix: &'a str,
    pub target: &'a str,
    pub rotation_id: &'a str,
    /// `daemon.env`; validation makes sure it is set when the template uses `{env}`.
    pub env: Option<&'a str>,
    /// When the rotation was requested (the date placeholders, UTC).
    pub at: DateTime<Utc>,
}

fn literal_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

impl NameTemplate {
    /// Parse `s`; the error says what is wrong (the caller names the field).
    pub fn parse(s: &str) -> Result<NameTemplate, String> {
        let mut parts = Vec::new();
        let mut rest = s;
        while !rest.is_empty() {
            if let Some(after) = rest.strip_prefix('{') {
                let Some((name, tail)) = after.split_once('}') else {
                    return Err(format!("{s:?}: '{{' without a closing '}}'"));
                };
                parts.push(match name {
                    "prefix" => Part::Prefix,
                    "target" => Part::Target,
                    "rotation" => Part::Rotation,
                    "env" => Part::Env,
                    "yy" => Part::Yy,
                    "yyyy" => Part::Yyyy,
                    "mm" => Part::Mm,
                    "dd" => Part::Dd,
                    other => {
                        return Err(format!(
                            "{s:?}: unknown placeholder {{{other}}} (known: {PLACEHOLDERS})"
                        ))
                    }
                });
                rest = tail;
            } else {
                let end = rest.find('{').unwrap_or(rest.len());
                let lit = &rest[..end];
                if let Some(bad) = lit.chars().find(|c| !literal_char(*c)) {
                    return Err(format!(
                        "{s:?}: {bad:?} is not allowed outside placeholders (use a-z, A-Z, 0-9, '-', '_', '.')"
                    ));
                }
                parts.push(Part::Lit(lit.to_string()));
                rest = &rest[end..];
            }
        }
        if !parts.contains(&Part::Rotation) {
            return Err(format!(
                "{s:?} must contain {{rotation}}: the rotation id keeps names unique and findable after a crash"
            ));
        }
        Ok(NameTemplate { parts })
    }

    pub fn uses_env(&self) -> bool {
        self.parts.contains(&Part::Env)
    }

    pub fn render(&self, v: &NameVars<'_>) -> String {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Lit(s) => out.push_str(s),
                Part::Prefix => out.push_str(v.prefix),
                Part::Target => out.push_str(v.target),
                Part::Rotation => out.push_str(v.rotation_id),
                Part::Env => out.push_str(v.env.unwrap_or("")),
                Part::Yy => out.push_str(&v.at.format("%y").to_string()),
                Part::Yyyy => out.push_str(&v.at.format("%Y").to_string()),
                Part::Mm => out.push_str(&v.at.format("%m").to_string()),
                Part::Dd => out.push_str(&v.at.format("%d").to_string()),
            }
        }
        out
    }

    /// Whether `name` could have been rendered from this template with `prefix` and
    /// `env` (any target, rotation id and date). Only for reporting look-alikes: it proves
    /// nothing about ownership.
    pub fn fits(&self, name: &str, prefix: &str, env: Option<&str>) -> bool {
        fits(&self.parts, name, prefix, env.unwrap_or(""))
    }
}

impl Default for NameTemplate {
    fn default() -> Self {
        NameTemplate::parse(DEFAULT_TEMPLATE).expect("the default template is valid")
    }
}

fn digits(s: &str, n: usize) -> Option<&str> {
    (s.len() >= n && s.as_bytes()[..n].iter().all(u8::is_ascii_digit)).then(|| &s[n..])
}

fn fits(parts: &[Part], name: &str, prefix: &str, env: &str) -> bool {
    let Some((first, rest)) = parts.split_first() else {
        return name.is_empty();
    };
    let fixed = |s: &str| {
        name.strip_prefix(s)
            .is_some_and(|n| fits(rest, n, prefix, env))
    };
    let after = |n: Option<&str>| n.is_some_and(|n| fits(rest, n, prefix, env));
    match first {
        Part::Lit(s) => fixed(s),
        Part::Prefix => fixed(prefix),
        Part::Env => fixed(env),
        Part::Yy | Part::Mm | Part::Dd => after(digits(name, 2)),
        Part::Yyyy => after(digits(name, 4)),
        Part::Rotation => {
            name.len() >= SAMPLE_ROTATION_ID.len()
                && name.is_char_boundary(SAMPLE_ROTATION_ID.len())
                && crate::rotation::journal::is_rotation_id(&name[..SAMPLE_ROTATION_ID.len()])
                && fits(rest, &name[SAMPLE_ROTATION_ID.len()..], prefix, env)
        }
        Part::Target => (1..=name.len().min(40)).any(|n| {
            name.is_char_boundary(n)
                && name[..n]
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && fits(rest, &name[n..], prefix, env)
        }),
    }
}

/// The naming in force: the template and the values it is rendered with.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Naming {
    pub template: NameTemplate,
    pub env: Option<String>,
}

impl Naming {
    /// From a validated configuration (an invalid template falls back to the default; the
    /// configuration check refuses one before it gets here).
    pub fn from_config(d: &crate::config::DaemonConfig) -> Naming {
        Naming {
            template: d
                .account_name_template
                .as_deref()
                .and_then(|t| NameTemplate::parse(t).ok())
                .unwrap_or_default(),
            env: d.env.clone(),
        }
    }
}

/// `daemon.env`: 1-20 of a-z, A-Z, 0-9 and '-'.
pub fn valid_env(s: &str) -> bool {
    (1..=20).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars<'a>(target: &'a str, id: &'a str) -> NameVars<'a> {
        NameVars {
            prefix: "okr",
            target,
            rotation_id: id,
            env: Some("Prod"),
            at: "2026-03-09T10:00:00Z".parse().unwrap(),
        }
    }

    #[test]
    fn renders_the_guides_convention_and_the_default() {
        let t = NameTemplate::parse("{yy}-{mm}-{target}-{env}-{rotation}").unwrap();
        let id = "20260309100000-abc123";
        let name = t.render(&vars("acme-chat", id));
        assert_eq!(name, "26-03-acme-chat-Prod-20260309100000-abc123");
        assert!(t.fits(&name, "okr", Some("Prod")));
        // Negative controls: another env, no rotation id, an upper-case id.
        assert!(!t.fits(&name, "okr", Some("Staging")));
        assert!(!t.fits("26-03-acme-chat-Prod", "okr", Some("Prod")));
        assert!(!t.fits(
            "26-03-acme-chat-Prod-20260309100000-ABC123",
            "okr",
            Some("Prod")
        ));
        let d = NameTemplate::default();
        assert_eq!(
            d.render(&vars("chat", id)),
            crate::rotation::journal::account_name("okr", "chat", id)
        );
        assert!(d.fits("okr-chat-20260309100000-abc123", "okr", None));
        assert!(!d.fits("okrx-chat-20260309100000-abc123", "okr", None));
    }

    #[test]
    fn bad_templates_say_what_is_wrong() {
        for (t, says) in [
            ("{target}-{env}", "must contain {rotation}"),
            (
                "{target}-{rotation}-{region}",
                "unknown placeholder {region}",
            ),
            ("{target}-{rotation", "without a closing"),
            ("my key {rotation}", "' ' is not allowed"),
            ("", "must contain {rotation}"),
        ] {
            let e = NameTemplate::parse(t).unwrap_err();
            assert!(e.contains(says), "{t:?}: {e}");
        }
    }
}
