//! The engine's side of `account_name_template`: the name a rotation mints (recorded in
//! its journal before the create, so recovery finds the account by that exact name) and
//! the look-alike check of the sweep's report.

use super::engine::Engine;
use crate::naming::{NameVars, Naming};
use crate::sync::RwLockExt;
use chrono::{DateTime, Utc};

impl Engine {
    /// Use `naming` for rotations started from now on.
    pub fn set_naming(&self, naming: Naming) {
        *self.naming.write_now() = naming;
    }

    /// The service-account name of rotation `rotation_id` of `target`, requested at `at`.
    pub fn account_name_for(&self, target: &str, rotation_id: &str, at: DateTime<Utc>) -> String {
        let prefix = self.account_prefix();
        let naming = self.naming.read_now();
        naming.template.render(&NameVars {
            prefix: &prefix,
            target,
            rotation_id,
            env: naming.env.as_deref(),
            at,
        })
    }

    /// Whether `name` fits our naming (reported, never proof of ownership).
    pub(super) fn named_like_ours(&self, name: &str) -> bool {
        let naming = self.naming.read_now();
        naming
            .template
            .fits(name, &self.account_prefix(), naming.env.as_deref())
    }
}
