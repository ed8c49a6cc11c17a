//! The key inventory: every API key of every configured project, one row each, with what
//! the journals and Vault prove about it (ours or not, which target, pending deletion) and
//! flags an operator acts on. Ownership is [`Engine::ownership`]'s (the sweep's evidence),
//! never a name alone. A project whose keys cannot be listed becomes an error row.

use crate::config::Target;
use crate::rotation::ownership::Ownership;
use crate::rotation::ports::{KeyOwner, ProjectKey};
use crate::rotation::{Engine, EngineError};
use chrono::{DateTime, Utc};
use serde::Serialize;
use std::collections::BTreeSet;
use std::fmt::Write as _;

/// Why a key needs a look (a bounded set).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Flag {
    /// No journal or Vault path of ours names it.
    Unmanaged,
    /// No use (or, never used, no creation) within the unused window.
    Unused,
    /// A journal lists its account as still to delete.
    PendingDeletion,
    /// Its `expires_at` is within the expiring window (or past).
    Expiring,
}

impl Flag {
    pub fn as_str(self) -> &'static str {
        match self {
            Flag::Unmanaged => "unmanaged",
            Flag::Unused => "unused",
            Flag::PendingDeletion => "pending_deletion",
            Flag::Expiring => "expiring",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OwnerType {
    User,
    ServiceAccount,
}

/// One key, or (with `error`) a project or Vault path that could not be read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Row {
    pub project_id: String,
    pub key_id: Option<String>,
    /// The service account's name for its key (what `account_name_template` shapes), the
    /// key's own name for a user's.
    pub name: Option<String>,
    pub owner_type: Option<OwnerType>,
    pub service_account_id: Option<String>,
    pub created_at: Option<DateTime<Utc>>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
    pub managed: bool,
    pub target: Option<String>,
    pub flags: Vec<Flag>,
    /// What could not be read; the other fields are then empty.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Row {
    fn error(project_id: &str, target: Option<String>, error: String) -> Row {
        Row {
            project_id: project_id.to_string(),
            key_id: None,
            name: None,
            owner_type: None,
            service_account_id: None,
            created_at: None,
            last_used_at: None,
            expires_at: None,
            managed: false,
            target,
            flags: Vec::new(),
            error: Some(error),
        }
    }

    pub fn has(&self, flag: Flag) -> bool {
        self.flags.contains(&flag)
    }
}

/// What to list and the windows of the flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Only this project (configured or not); `None` = every configured project.
    pub project: Option<String>,
    pub unused_after: chrono::Duration,
    pub expiring_within: chrono::Duration,
}

impl Options {
    /// The configured windows, every project.
    pub fn from_config(d: &crate::config::DaemonConfig) -> Options {
        let days = |v: crate::config::DurationStr| {
            chrono::Duration::from_std(v.get()).unwrap_or(chrono::Duration::MAX)
        };
        Options {
            project: None,
            unused_after: days(d.inventory_unused_after),
            expiring_within: days(d.inventory_expiring_within),
        }
    }
}

/// Longest `--unused-days` / `unused_days` accepted (ten years).
pub const MAX_UNUSED_DAYS: u32 = 3650;

/// `N` days as the unused window, or an error naming `field`.
pub fn unused_days(field: &str, raw: &str) -> Result<chrono::Duration, String> {
    match raw.trim().parse::<u32>() {
        Ok(n) if (1..=MAX_UNUSED_DAYS).contains(&n) => Ok(chrono::Duration::days(i64::from(n))),
        _ => Err(format!(
            "{field}: {:?} must be a whole number of days from 1 to {MAX_UNUSED_DAYS}",
            raw.chars().take(32).collect::<String>()
        )),
    }
}

/// The expiry of the key Vault serves at a configured target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServedExpiry {
    pub target: String,
    /// `None`: the key never expires (or its listing did not say).
    pub expires_at: Option<DateTime<Utc>>,
}

/// A taken inventory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inventory {
    pub taken_at: DateTime<Utc>,
    /// The projects listed (error rows included).
    pub projects: Vec<String>,
    pub rows: Vec<Row>,
    /// Per configured target whose project listed and whose served key was found.
    pub served: Vec<ServedExpiry>,
}

/// Counts of one project, for the metric.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub managed: u64,
    pub unmanaged: u64,
    pub unused: u64,
    /// 1 when the project's keys could not be listed.
    pub error: bool,
}

impl Inventory {
    pub fn counts(&self, project: &str) -> Counts {
        let mut c = Counts::default();
        for r in self.rows.iter().filter(|r| r.project_id == project) {
            if r.error.is_some() {
                c.error |= r.key_id.is_none() && r.target.is_none();
                continue;
            }
            if r.managed {
                c.managed += 1;
            } else {
                c.unmanaged += 1;
            }
            if r.has(Flag::Unused) {
                c.unused += 1;
            }
        }
        c
    }

    pub fn has_errors(&self) -> bool {
        self.rows.iter().any(|r| r.error.is_some())
    }

    /// One JSON array of the rows.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(&self.rows).unwrap_or_else(|_| "[]".into())
    }

    /// A table that fits 80 columns: long flag lists continue on the next line, errors
    /// are wrapped.
    pub fn to_table(&self) -> String {
        const W: usize = 80;
        let mut out = String::new();
        for project in &self.projects {
            let rows: Vec<&Row> = self
                .rows
                .iter()
                .filter(|r| &r.project_id == project)
                .collect();
            let keys = rows.iter().filter(|r| r.error.is_none()).count();
            let _ = writeln!(out, "project {}: {keys} key(s)", cut(project, 60));
            let _ = writeln!(
                out,
                "{:<20} {:<4} {:<14} {:<10} {:<10} FLAGS",
                "KEY", "OWN", "NAME", "LAST USED", "TARGET"
            );
            for r in rows {
                if let Some(e) = &r.error {
                    let head = match &r.target {
                        Some(t) => format!("ERROR (target {t}): "),
                        None => "ERROR: ".to_string(),
                    };
                    for line in wrap(&format!("{head}{e}"), W) {
                        let _ = writeln!(out, "{line}");
                    }
                    continue;
                }
                let owner = match r.owner_type {
                    Some(OwnerType::User) => "user",
                    Some(OwnerType::ServiceAccount) => "sa",
                    None => "?",
                };
                let used = r
                    .last_used_at
                    .map_or("never".to_string(), |t| t.format("%Y-%m-%d").to_string());
                let left = format!(
                    "{:<20} {:<4} {:<14} {:<10} {:<10} ",
                    cut(r.key_id.as_deref().unwrap_or(""), 20),
                    owner,
                    cut(r.name.as_deref().unwrap_or(""), 14),
                    used,
                    cut(r.target.as_deref().unwrap_or("-"), 10),
                );
                let room = W - left.len();
                let mut lines: Vec<String> = Vec::new();
                for f in &r.flags {
                    let f = f.as_str();
                    match lines.last_mut() {
                        Some(l) if l.len() + 1 + f.len() <= room => {
                            l.push(',');
                            l.push_str(f);
                        }
                        _ => lines.push(f.to_string()),
                    }
                }
                let _ = writeln!(
                    out,
                    "{left}{}",
                    lines.first().map(String::as_str).unwrap_or("-")
                );
                for l in lines.iter().skip(1) {
                    let _ = writeln!(out, "{:width$}{l}", "", width = left.len());
                }
            }
        }
        out
    }
}

/// `s` cut to `n` characters (`~` marks a cut).
fn cut(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut c: String = s.chars().take(n - 1).collect();
        c.push('~');
        c
    }
}

/// Words of `text` in lines of at most `width` characters (a longer word is cut).
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        let word = cut(word, width);
        if !line.is_empty() && line.chars().count() + 1 + word.chars().count() > width {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(&word);
    }
    if !line.is_empty() {
        lines.push(line);
    }
    lines
}

#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    /// Without the journals nothing can be called ours or not.
    #[error("cannot read the journals to tell managed keys from others: {0}")]
    Ownership(#[source] EngineError),
}

/// Take the inventory of `opts.project` or of every project of `targets`.
pub async fn take(
    engine: &Engine,
    targets: &[Target],
    opts: &Options,
) -> Result<Inventory, InventoryError> {
    let own = engine
        .ownership(targets)
        .await
        .map_err(InventoryError::Ownership)?;
    let now = engine.clock_now();
    let projects: Vec<String> = match &opts.project {
        Some(p) => vec![p.clone()],
        None => targets
            .iter()
            .map(|t| t.project_id.clone())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect(),
    };
    let mut rows = Vec::new();
    let mut listed = BTreeSet::new();
    for project in &projects {
        match engine.project_keys(project).await {
            Ok(keys) => {
                listed.insert(project.clone());
                rows.extend(rows_for(project, &keys, &own, now, opts));
            }
            Err(e) => rows.push(Row::error(project, None, e.to_string())),
        }
    }
    for p in &own.problems {
        let (target, error) = p.split_once(": ").unwrap_or(("", p));
        let project = targets
            .iter()
            .find(|t| t.name == target)
            .map(|t| t.project_id.clone())
            .unwrap_or_default();
        if projects.contains(&project) {
            rows.push(Row::error(
                &project,
                Some(target.to_string()),
                format!("Vault: {error} (what it serves is unknown; managed may be understated)"),
            ));
        }
    }
    let served = targets
        .iter()
        .filter(|t| listed.contains(&t.project_id))
        .filter_map(|t| {
            let key = own
                .served
                .iter()
                .find(|s| s.target == t.name)?
                .key_id
                .clone()?;
            let row = rows
                .iter()
                .find(|r| r.project_id == t.project_id && r.key_id.as_deref() == Some(&key))?;
            Some(ServedExpiry {
                target: t.name.clone(),
                expires_at: row.expires_at,
            })
        })
        .collect();
    Ok(Inventory {
        taken_at: now,
        projects,
        rows,
        served,
    })
}

/// The rows of one project's keys.
pub fn rows_for(
    project: &str,
    keys: &[ProjectKey],
    own: &Ownership,
    now: DateTime<Utc>,
    opts: &Options,
) -> Vec<Row> {
    keys.iter()
        .map(|k| {
            let (owner_type, account, name) = match &k.owner {
                KeyOwner::User { .. } => (OwnerType::User, None, k.name.clone()),
                KeyOwner::ServiceAccount { id, name } => {
                    (OwnerType::ServiceAccount, Some(id.as_str()), name.clone())
                }
            };
            let by_account = account.and_then(|a| own.owner_of(project, a, &name));
            let by_key = own
                .keys
                .get(&k.id)
                .filter(|o| o.project.as_deref().is_none_or(|p| p == project));
            let owner = by_account.or(by_key);
            let mut flags = Vec::new();
            if owner.is_none() {
                flags.push(Flag::Unmanaged);
            }
            if now - k.last_used_at.unwrap_or(k.created_at) >= opts.unused_after {
                flags.push(Flag::Unused);
            }
            if account.is_some_and(|a| own.pending.contains(a)) {
                flags.push(Flag::PendingDeletion);
            }
            if k.expires_at
                .is_some_and(|e| e - now <= opts.expiring_within)
            {
                flags.push(Flag::Expiring);
            }
            Row {
                project_id: project.to_string(),
                key_id: Some(k.id.clone()),
                name: Some(name),
                owner_type: Some(owner_type),
                service_account_id: account.map(str::to_string),
                created_at: Some(k.created_at),
                last_used_at: k.last_used_at,
                expires_at: k.expires_at,
                managed: owner.is_some(),
                target: owner.map(|o| o.target.clone()),
                flags,
                error: None,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rotation::ownership::Owned;

    fn t(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    fn opts() -> Options {
        Options {
            project: None,
            unused_after: chrono::Duration::days(30),
            expiring_within: chrono::Duration::days(7),
        }
    }

    fn sa_key(id: &str, account: &str, name: &str) -> ProjectKey {
        ProjectKey {
            id: id.into(),
            name: "Secret Key".into(),
            owner: KeyOwner::ServiceAccount {
                id: account.into(),
                name: name.into(),
            },
            created_at: t("2026-11-01T00:00:00Z"),
            last_used_at: Some(t("2026-11-30T00:00:00Z")),
            expires_at: None,
        }
    }

    fn owned(target: &str, project: &str) -> Owned {
        Owned {
            target: target.into(),
            project: Some(project.into()),
        }
    }

    #[test]
    fn flags_follow_the_evidence_and_the_windows() {
        let now = t("2026-12-02T00:00:00Z");
        let mut own = Ownership::default();
        own.accounts
            .insert("svc_acct_ours".into(), owned("chat", "proj_a"));
        own.names.insert(
            "okr-chat-20261201000000-abcdef".into(),
            owned("chat", "proj_a"),
        );
        own.pending.insert("svc_acct_old".into());
        own.accounts
            .insert("svc_acct_old".into(), owned("chat", "proj_a"));
        let mut unused_user = ProjectKey {
            id: "key_user".into(),
            name: "laptop".into(),
            owner: KeyOwner::User {
                id: "user_1".into(),
            },
            created_at: t("2026-01-01T00:00:00Z"),
            last_used_at: None,
            expires_at: None,
        };
        let mut expiring = sa_key("key_exp", "svc_acct_ours", "whatever");
        expiring.expires_at = Some(t("2026-12-05T00:00:00Z"));
        let keys = [
            expiring,
            // Found by name only (a create whose answer was lost).
            sa_key("key_byname", "svc_acct_x", "okr-chat-20261201000000-abcdef"),
            sa_key("key_old", "svc_acct_old", "okr-chat-1"),
            unused_user.clone(),
            // Same name, another project's journal: proves nothing here.
            sa_key(
                "key_lookalike",
                "svc_acct_y",
                "okr-chat-20261201000000-abcdef",
            ),
        ];
        let rows = rows_for("proj_a", &keys[..4], &own, now, &opts());
        assert_eq!(rows[0].flags, vec![Flag::Expiring]);
        assert!(rows[0].managed);
        assert_eq!(rows[0].target.as_deref(), Some("chat"));
        assert!(rows[1].managed, "found by the journal's minted name");
        assert_eq!(rows[2].flags, vec![Flag::PendingDeletion]);
        assert_eq!(rows[3].flags, vec![Flag::Unmanaged, Flag::Unused]);
        assert_eq!(rows[3].owner_type, Some(OwnerType::User));
        assert_eq!(rows[3].service_account_id, None);
        let other = rows_for("proj_b", &keys[4..], &own, now, &opts());
        assert_eq!(other[0].flags, vec![Flag::Unmanaged]);
        assert!(!other[0].managed);

        // Negative controls: recent use is not unused; a far expiry is not expiring.
        unused_user.last_used_at = Some(t("2026-11-20T00:00:00Z"));
        let mut far = sa_key("key_far", "svc_acct_ours", "n");
        far.expires_at = Some(t("2026-12-20T00:00:00Z"));
        let rows = rows_for("proj_a", &[unused_user, far], &own, now, &opts());
        assert_eq!(rows[0].flags, vec![Flag::Unmanaged]);
        assert!(rows[1].flags.is_empty(), "{:?}", rows[1].flags);
    }

    #[test]
    fn the_table_fits_80_columns_and_json_is_one_array() {
        let now = t("2026-12-02T00:00:00Z");
        let mut k = sa_key(
            "key_0123456789abcdef",
            "svc_acct_old",
            "a-very-long-name-indeed",
        );
        k.expires_at = Some(now);
        k.last_used_at = None;
        let mut own = Ownership::default();
        own.pending.insert("svc_acct_old".into());
        let mut rows = rows_for("proj_a", &[k], &own, now, &opts());
        rows.push(Row::error(
            "proj_b",
            None,
            "openai: api_keys.list (project proj_b): 403 Forbidden: the admin key may not read this project's keys, ask an owner".into(),
        ));
        let inv = Inventory {
            taken_at: now,
            projects: vec!["proj_a".into(), "proj_b".into()],
            rows,
            served: Vec::new(),
        };
        let table = inv.to_table();
        for line in table.lines() {
            assert!(line.chars().count() <= 80, "{} > 80: {line:?}", line.len());
        }
        for f in [
            "unmanaged",
            "unused",
            "pending_deletion",
            "expiring",
            "ERROR",
        ] {
            assert!(table.contains(f), "{f} missing:\n{table}");
        }
        let json: serde_json::Value = serde_json::from_str(&inv.to_json()).unwrap();
        let arr = json.as_array().expect("one array");
        assert_eq!(arr.len(), 2);
        assert_eq!(arr[0]["owner_type"], "service_account");
        assert_eq!(arr[0]["flags"][0], "unmanaged");
        assert!(arr[0].get("error").is_none());
        assert_eq!(arr[1]["project_id"], "proj_b");
        assert!(arr[1]["error"].as_str().unwrap().contains("403"));
        assert!(inv.has_errors());
        assert!(inv.counts("proj_b").error);
        assert_eq!(inv.counts("proj_a").unmanaged, 1);
    }

    #[test]
    fn unused_days_names_the_field() {
        assert_eq!(
            unused_days("--unused-days", "30").unwrap(),
            chrono::Duration::days(30)
        );
        for bad in ["0", "-1", "x", "3651", ""] {
            let e = unused_days("--unused-days", bad).unwrap_err();
            assert!(e.starts_with("--unused-days: "), "{e}");
        }
    }
}
