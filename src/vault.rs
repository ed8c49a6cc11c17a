//! Vault KV v2 access.
//!
//! Each published key version carries custom metadata naming the service account and key
//! it belongs to, so the daemon (or a human with `vault kv metadata get`) can tell which
//! OpenAI account a Vault version holds without ever reading the value.

/// Custom-metadata keys written beside every key version. Values are ids and times only.
pub mod meta {
    /// `svc_acct_...` of the account whose key this version holds.
    pub const SERVICE_ACCOUNT_ID: &str = "okr_service_account_id";
    /// `key_...` of the key this version holds.
    pub const KEY_ID: &str = "okr_key_id";
    /// Rotation that published this version ("seed" for keys put there by hand).
    pub const ROTATION_ID: &str = "okr_rotation_id";
    /// RFC 3339 creation time of the key (key age is measured from it).
    pub const KEY_CREATED_AT: &str = "okr_key_created_at";
}
