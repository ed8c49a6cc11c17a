//! KV version 2 at `secret/`: data (read, write with check-and-set, patch, delete),
//! metadata (custom metadata, `max_versions`, `cas_required`, `delete_version_after`),
//! version deletes/undeletes/destroys, listing and the mount's `config`.

use super::error::{envelope, ok, ApiError, ApiResult, Reply};
use super::format::{
    as_u64, bool_field, go_duration, go_kind, go_time, go_type, opt_duration_field, parse_body,
    secs, u64_field,
};
use super::{Request, State};
use chrono::{DateTime, Utc};
use http::{header, Method, StatusCode};
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, BTreeSet};

/// Vault keeps this many versions when neither the key nor the mount sets `max_versions`.
const DEFAULT_MAX_VERSIONS: u64 = 10;

pub(super) const MSG_CAS_MISMATCH: &str =
    "check-and-set parameter did not match the current version";
pub(super) const MSG_CAS_REQUIRED: &str = "check-and-set parameter required for this call";

#[derive(Default)]
pub(super) struct MountConfig {
    pub(super) cas_required: bool,
    pub(super) max_versions: u64,
    pub(super) delete_version_after: u64,
}

/// One KV v2 key: its metadata and every version Vault still keeps.
pub(super) struct Entry {
    pub(super) created: DateTime<Utc>,
    pub(super) updated: DateTime<Utc>,
    pub(super) current_version: u64,
    pub(super) oldest_version: u64,
    pub(super) max_versions: u64,
    pub(super) cas_required: bool,
    pub(super) delete_version_after: u64,
    pub(super) custom_metadata: Option<BTreeMap<String, String>>,
    pub(super) metadata_version: u64,
    pub(super) versions: BTreeMap<u64, Version>,
}

pub(super) struct Version {
    /// None once destroyed.
    pub(super) data: Option<Map<String, Value>>,
    pub(super) created: DateTime<Utc>,
    /// A soft delete, or the expiry `delete_version_after` set at write time (may be future).
    pub(super) deletion: Option<DateTime<Utc>>,
    pub(super) destroyed: bool,
}

impl Version {
    pub(super) fn is_deleted(&self, now: DateTime<Utc>) -> bool {
        self.deletion.is_some_and(|d| d <= now)
    }

    pub(super) fn readable(&self, now: DateTime<Utc>) -> bool {
        !self.destroyed && !self.is_deleted(now) && self.data.is_some()
    }
}

impl Entry {
    pub(super) fn new(now: DateTime<Utc>) -> Self {
        Entry {
            created: now,
            updated: now,
            current_version: 0,
            oldest_version: 0,
            max_versions: 0,
            cas_required: false,
            delete_version_after: 0,
            custom_metadata: None,
            metadata_version: 0,
            versions: BTreeMap::new(),
        }
    }

    pub(super) fn custom_metadata_json(&self) -> Value {
        match &self.custom_metadata {
            Some(m) => json!(m),
            None => Value::Null,
        }
    }

    /// The per-version metadata object data reads and writes return.
    pub(super) fn version_json(&self, number: u64, v: &Version) -> Value {
        json!({
            "created_time": go_time(v.created),
            "custom_metadata": self.custom_metadata_json(),
            "deletion_time": v.deletion.map(go_time).unwrap_or_default(),
            "destroyed": v.destroyed,
            "version": number,
        })
    }

    pub(super) fn metadata_json(&self) -> Value {
        let versions: Map<String, Value> = self
            .versions
            .iter()
            .map(|(n, v)| {
                (
                    n.to_string(),
                    json!({
                        "created_time": go_time(v.created),
                        "deletion_time": v.deletion.map(go_time).unwrap_or_default(),
                        "destroyed": v.destroyed,
                    }),
                )
            })
            .collect();
        json!({
            "cas_required": self.cas_required,
            "created_time": go_time(self.created),
            "current_metadata_version": self.metadata_version,
            "current_version": self.current_version,
            "custom_metadata": self.custom_metadata_json(),
            "delete_version_after": go_duration(self.delete_version_after),
            "max_versions": self.max_versions,
            "metadata_cas_required": false,
            "oldest_version": self.oldest_version,
            "updated_time": go_time(self.updated),
            "versions": versions,
        })
    }
}

impl State {
    pub(super) fn config_op(&mut self, req: &Request<'_>) -> ApiResult {
        match *req.method {
            Method::GET => ok(json!({
                "cas_required": self.config.cas_required,
                "delete_version_after": go_duration(self.config.delete_version_after),
                "max_versions": self.config.max_versions,
                "metadata_cas_required": false,
            })),
            Method::POST | Method::PUT => {
                let body = parse_body(req.body)?;
                let max_versions = u64_field(&body, "max_versions")?;
                let cas_required = bool_field(&body, "cas_required")?;
                let dva = opt_duration_field(&body, "delete_version_after")?;
                if let Some(v) = max_versions {
                    self.config.max_versions = v;
                }
                if let Some(v) = cas_required {
                    self.config.cas_required = v;
                }
                if let Some(v) = dva {
                    self.config.delete_version_after = v;
                }
                Ok(Reply::NoContent)
            }
            _ => Err(ApiError::Unsupported),
        }
    }

    pub(super) fn data_op(
        &mut self,
        req: &Request<'_>,
        path: &str,
        now: DateTime<Utc>,
    ) -> ApiResult {
        if req.is_list() {
            return Err(ApiError::Unsupported);
        }
        match *req.method {
            Method::GET => self.read_data(req, path, now),
            Method::POST | Method::PUT => self.write_data(req, path, now),
            Method::PATCH => self.patch_data(req, path, now),
            Method::DELETE => {
                if let Some(e) = self.entries.get_mut(path) {
                    let current = e.current_version;
                    if let Some(v) = e.versions.get_mut(&current) {
                        if !v.destroyed && !v.is_deleted(now) {
                            v.deletion = Some(now);
                        }
                    }
                }
                Ok(Reply::NoContent)
            }
            _ => Err(ApiError::Unsupported),
        }
    }

    pub(super) fn read_data(&self, req: &Request<'_>, path: &str, now: DateTime<Utc>) -> ApiResult {
        let wanted = match req.query("version") {
            None | Some("") => 0,
            Some(s) => s.parse::<i64>().map_err(|_| {
                ApiError::BadRequest(
                    "Field validation failed: error converting input for field \"version\": '' cannot parse value as 'int': strconv.ParseInt: invalid syntax".into(),
                )
            })?,
        };
        let entry = self.entries.get(path).ok_or(ApiError::NotFound)?;
        let number = if wanted <= 0 {
            entry.current_version
        } else {
            wanted.unsigned_abs()
        };
        let v = entry.versions.get(&number).ok_or(ApiError::NotFound)?;
        let meta = entry.version_json(number, v);
        match &v.data {
            Some(data) if v.readable(now) => ok(json!({ "data": data, "metadata": meta })),
            // Deleted or destroyed: 404, but Vault still sends the envelope with metadata.
            _ => Ok(Reply::Enveloped(
                StatusCode::NOT_FOUND,
                envelope(json!({ "data": null, "metadata": meta }), Value::Null),
            )),
        }
    }

    /// The `options.cas` of a write body, checked against the key's current version.
    pub(super) fn check_cas(&self, body: &Map<String, Value>, path: &str) -> Result<(), ApiError> {
        let cas = match body.get("options") {
            None | Some(Value::Null) => None,
            Some(Value::Object(o)) => u64_field(o, "cas")?,
            Some(other) => {
                return Err(ApiError::BadRequest(format!(
                    "error converting input for field \"options\": '' expected type 'map[string]interface {{}}', got unconvertible type '{}'",
                    go_type(other)
                )))
            }
        };
        let entry = self.entries.get(path);
        let required = self.config.cas_required || entry.is_some_and(|e| e.cas_required);
        match cas {
            None if required => Err(ApiError::BadRequest(MSG_CAS_REQUIRED.into())),
            None => Ok(()),
            Some(c) => {
                let current = entry.map_or(0, |e| e.current_version);
                if c != current && !self.faults.ignore_cas {
                    Err(ApiError::BadRequest(MSG_CAS_MISMATCH.into()))
                } else {
                    Ok(())
                }
            }
        }
    }

    pub(super) fn write_data(
        &mut self,
        req: &Request<'_>,
        path: &str,
        now: DateTime<Utc>,
    ) -> ApiResult {
        if path.is_empty() {
            return Err(ApiError::NotFound);
        }
        let body = parse_body(req.body)?;
        let data = match body.get("data") {
            None | Some(Value::Null) => {
                return Err(ApiError::BadRequest("no data provided".into()))
            }
            Some(Value::Object(d)) => d.clone(),
            Some(other) => {
                return Err(ApiError::BadRequest(format!(
                    "error converting input for field \"data\": '' expected type 'map[string]interface {{}}', got unconvertible type '{}'",
                    go_type(other)
                )))
            }
        };
        self.concurrent_writer(&body, path, now);
        self.check_cas(&body, path)?;
        let number = self.write_version(path, data, now);
        self.version_reply(path, number)
    }

    pub(super) fn patch_data(
        &mut self,
        req: &Request<'_>,
        path: &str,
        now: DateTime<Utc>,
    ) -> ApiResult {
        let ct = req
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if ct.trim().is_empty() {
            return Err(ApiError::BadRequest("mime: no media type".into()));
        }
        if ct.split(';').next().map(str::trim) != Some("application/merge-patch+json") {
            return Err(ApiError::UnsupportedMediaType(format!(
                "PATCH requires Content-Type of application/merge-patch+json, provided {ct}"
            )));
        }
        let body = parse_body(req.body)?;
        let patch = match body.get("data") {
            Some(p @ Value::Object(_)) => p.clone(),
            None | Some(Value::Null) => {
                return Err(ApiError::BadRequest("no data provided".into()))
            }
            Some(other) => {
                return Err(ApiError::BadRequest(format!(
                    "error converting input for field \"data\": '' expected type 'map[string]interface {{}}', got unconvertible type '{}'",
                    go_type(other)
                )))
            }
        };
        let current = self
            .entries
            .get(path)
            .and_then(|e| e.versions.get(&e.current_version))
            .filter(|v| v.readable(now))
            .and_then(|v| v.data.clone());
        // Vault answers a PATCH of a missing or deleted key with a bare 404.
        let Some(current) = current else {
            return Ok(Reply::Empty(StatusCode::NOT_FOUND));
        };
        self.concurrent_writer(&body, path, now);
        self.check_cas(&body, path)?;
        let mut doc = Value::Object(current);
        json_patch::merge(&mut doc, &patch);
        let Value::Object(merged) = doc else {
            return Err(ApiError::BadRequest("no data provided".into()));
        };
        let number = self.write_version(path, merged, now);
        self.version_reply(path, number)
    }

    pub(super) fn version_reply(&self, path: &str, number: u64) -> ApiResult {
        let entry = self.entries.get(path).ok_or(ApiError::NotFound)?;
        let v = entry.versions.get(&number).ok_or(ApiError::NotFound)?;
        ok(entry.version_json(number, v))
    }

    /// Append a version (creating the key if needed), then drop what `max_versions` no longer
    /// keeps, exactly as Vault counts: after writing version N with limit M, versions up to
    /// N-M go and `oldest_version` becomes N-M+1 (it stays 0 until the first trim).
    pub(super) fn write_version(
        &mut self,
        path: &str,
        data: Map<String, Value>,
        now: DateTime<Utc>,
    ) -> u64 {
        let mount_max = self.config.max_versions;
        let mount_dva = self.config.delete_version_after;
        let entry = self
            .entries
            .entry(path.to_string())
            .or_insert_with(|| Entry::new(now));
        let dva = if entry.delete_version_after > 0 {
            entry.delete_version_after
        } else {
            mount_dva
        };
        entry.current_version += 1;
        let number = entry.current_version;
        entry.versions.insert(
            number,
            Version {
                data: Some(data),
                created: now,
                deletion: (dva > 0).then(|| now + secs(dva)),
                destroyed: false,
            },
        );
        entry.updated = now;
        // The key's own limit wins over the mount's, even when larger (as OpenBao does).
        let max = [entry.max_versions, mount_max, DEFAULT_MAX_VERSIONS]
            .into_iter()
            .find(|m| *m > 0)
            .unwrap_or(DEFAULT_MAX_VERSIONS);
        if number >= max && number - max >= entry.oldest_version {
            let last_dropped = number - max;
            entry.versions.retain(|n, _| *n > last_dropped);
            entry.oldest_version = last_dropped + 1;
        }
        number
    }

    pub(super) fn metadata_op(
        &mut self,
        req: &Request<'_>,
        path: &str,
        now: DateTime<Utc>,
    ) -> ApiResult {
        if req.is_list() {
            return self.list(path);
        }
        match *req.method {
            Method::GET => {
                let entry = self.entries.get(path).ok_or(ApiError::NotFound)?;
                ok(entry.metadata_json())
            }
            Method::POST | Method::PUT => self.write_metadata(req, path, now),
            Method::DELETE => {
                self.entries.remove(path);
                Ok(Reply::NoContent)
            }
            _ => Err(ApiError::Unsupported),
        }
    }

    pub(super) fn write_metadata(
        &mut self,
        req: &Request<'_>,
        path: &str,
        now: DateTime<Utc>,
    ) -> ApiResult {
        if path.is_empty() {
            return Err(ApiError::NotFound);
        }
        let body = parse_body(req.body)?;
        let max_versions = u64_field(&body, "max_versions")?;
        let cas_required = bool_field(&body, "cas_required")?;
        let dva = opt_duration_field(&body, "delete_version_after")?;
        let custom = match body.get("custom_metadata") {
            None | Some(Value::Null) => None,
            Some(Value::Object(m)) => {
                let mut out = BTreeMap::new();
                for (k, v) in m {
                    let s = match v {
                        Value::String(s) => s.clone(),
                        Value::Number(n) => n.to_string(),
                        Value::Bool(b) => if *b { "1" } else { "0" }.to_string(),
                        Value::Null => String::new(),
                        other => {
                            return Err(ApiError::BadRequest(format!(
                                "custom_metadata validation failed: '' expected type 'string', got unconvertible type '{}'",
                                go_type(other)
                            )))
                        }
                    };
                    out.insert(k.clone(), s);
                }
                Some(out)
            }
            Some(other) => {
                return Err(ApiError::BadRequest(format!(
                "error converting input for field \"custom_metadata\": '' expected a map, got '{}'",
                go_kind(other)
            )))
            }
        };
        let entry = self
            .entries
            .entry(path.to_string())
            .or_insert_with(|| Entry::new(now));
        if let Some(v) = max_versions {
            entry.max_versions = v;
        }
        if let Some(v) = cas_required {
            entry.cas_required = v;
        }
        if let Some(v) = dva {
            entry.delete_version_after = v;
        }
        if let Some(c) = custom {
            // An empty map clears it; Vault then reports `null`.
            entry.custom_metadata = (!c.is_empty()).then_some(c);
        }
        entry.metadata_version += 1;
        entry.updated = now;
        Ok(Reply::NoContent)
    }

    /// Keys directly under `path`, sub-folders with a trailing `/`; 404 when there are none.
    pub(super) fn list(&self, path: &str) -> ApiResult {
        let prefix = match path.trim_end_matches('/') {
            "" => String::new(),
            p => format!("{p}/"),
        };
        let keys: BTreeSet<String> = self
            .entries
            .range(prefix.clone()..)
            .map(|(k, _)| k)
            .take_while(|k| k.starts_with(&prefix))
            .map(|k| {
                let rest = &k[prefix.len()..];
                match rest.find('/') {
                    Some(i) => rest[..=i].to_string(),
                    None => rest.to_string(),
                }
            })
            .filter(|k| !k.is_empty())
            .collect();
        if keys.is_empty() {
            return Err(ApiError::NotFound);
        }
        ok(json!({ "keys": keys }))
    }

    pub(super) fn versions_op(
        &mut self,
        req: &Request<'_>,
        op: &str,
        path: &str,
        now: DateTime<Utc>,
    ) -> ApiResult {
        if !matches!(*req.method, Method::POST | Method::PUT) {
            return Err(ApiError::Unsupported);
        }
        let body = parse_body(req.body)?;
        let versions: Vec<u64> = match body.get("versions") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| as_u64(v).ok_or(()))
                .collect::<Result<_, _>>()
                .map_err(|_| {
                    ApiError::BadRequest(
                        "error converting input for field \"versions\": '' cannot parse value as 'int': strconv.ParseInt: invalid syntax".into(),
                    )
                })?,
            Some(v) => vec![as_u64(v).ok_or_else(|| {
                ApiError::BadRequest(
                    "error converting input for field \"versions\": '' cannot parse value as 'int': strconv.ParseInt: invalid syntax".into(),
                )
            })?],
        };
        if versions.is_empty() {
            let msg = if op == "destroy" {
                "no version number provided"
            } else {
                "No version number provided"
            };
            return Err(ApiError::BadRequest(msg.into()));
        }
        let Some(entry) = self.entries.get_mut(path) else {
            return Ok(Reply::NoContent);
        };
        for n in versions {
            let Some(v) = entry.versions.get_mut(&n) else {
                continue;
            };
            match op {
                "delete" if !v.destroyed && !v.is_deleted(now) => v.deletion = Some(now),
                "undelete" if !v.destroyed => v.deletion = None,
                "destroy" => {
                    v.destroyed = true;
                    v.data = None;
                }
                _ => {}
            }
        }
        Ok(Reply::NoContent)
    }
}
