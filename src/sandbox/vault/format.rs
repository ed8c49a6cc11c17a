//! Vault's input decoding (JSON bodies, mapstructure-style fields, Go durations) and Go's
//! output formats (durations, RFC 3339 times), so errors and bodies read like OpenBao's.

use super::error::ApiError;
use chrono::{DateTime, Duration, Utc};
use rand::Rng;
use serde_json::{Map, Value};

/// A request body as a JSON object (empty body = empty object), as Vault decodes it.
pub(super) fn parse_body(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(Value::Null) => Ok(Map::new()),
        Ok(other) => Err(ApiError::BadRequest(format!(
            "failed to decode JSON input: json: cannot unmarshal {} into Go value of type map[string]interface {{}}",
            go_kind(&other)
        ))),
        // serde_json's syntax errors name a position, never the offending text.
        Err(e) => Err(ApiError::BadRequest(format!(
            "failed to decode JSON input: {e}"
        ))),
    }
}

pub(super) fn as_u64(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

pub(super) fn u64_field(body: &Map<String, Value>, field: &str) -> Result<Option<u64>, ApiError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => as_u64(v).map(Some).ok_or_else(|| {
            ApiError::BadRequest(format!(
                "error converting input for field \"{field}\": '' cannot parse value as 'int': strconv.ParseInt: invalid syntax"
            ))
        }),
    }
}

pub(super) fn bool_field(body: &Map<String, Value>, field: &str) -> Result<Option<bool>, ApiError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(Value::String(s)) if matches!(s.as_str(), "true" | "1" | "t" | "T" | "TRUE" | "True") => {
            Ok(Some(true))
        }
        Some(Value::String(s))
            if matches!(s.as_str(), "false" | "0" | "f" | "F" | "FALSE" | "False") =>
        {
            Ok(Some(false))
        }
        Some(Value::Number(n)) => Ok(Some(n.as_f64().is_some_and(|f| f != 0.0))),
        Some(_) => Err(ApiError::BadRequest(format!(
            "error converting input for field \"{field}\": '' cannot parse value as 'bool': strconv.ParseBool: invalid syntax"
        ))),
    }
}

pub(super) fn opt_duration_field(
    body: &Map<String, Value>,
    field: &str,
) -> Result<Option<u64>, ApiError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => duration_field(field, v).map(Some),
    }
}

/// Vault's duration inputs: integer seconds (number or string) or Go syntax (`1h30m`, `90s`).
pub(super) fn duration_field(field: &str, v: &Value) -> Result<u64, ApiError> {
    let bad = || {
        ApiError::BadRequest(format!(
            "error converting input for field \"{field}\": invalid duration"
        ))
    };
    match v {
        Value::Number(n) => n.as_u64().ok_or_else(bad),
        Value::String(s) => parse_go_duration(s).ok_or_else(bad),
        _ => Err(bad()),
    }
}

pub(super) fn parse_go_duration(s: &str) -> Option<u64> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    if let Ok(n) = s.parse::<u64>() {
        return Some(n);
    }
    let mut total = 0u64;
    let mut num = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let n: u64 = num.parse().ok()?;
        num.clear();
        let unit = match c {
            'd' => 86_400,
            'h' => 3_600,
            'm' if chars.peek() == Some(&'s') => {
                chars.next();
                // Milliseconds: round down to whole seconds, as Vault's TTLs are in seconds.
                total = total.checked_add(n / 1000)?;
                continue;
            }
            'm' => 60,
            's' => 1,
            _ => return None,
        };
        total = total.checked_add(n.checked_mul(unit)?)?;
    }
    num.is_empty().then_some(total)
}

/// Go's `time.Duration.String()` for whole seconds: `0s`, `45s`, `2m5s`, `1h0m0s`.
pub(super) fn go_duration(total: u64) -> String {
    let (h, m, s) = (total / 3600, (total % 3600) / 60, total % 60);
    if h > 0 {
        format!("{h}h{m}m{s}s")
    } else if m > 0 {
        format!("{m}m{s}s")
    } else {
        format!("{s}s")
    }
}

/// Go's `time.RFC3339Nano`: nanoseconds with trailing zeros trimmed, `Z` suffix.
pub(super) fn go_time(t: DateTime<Utc>) -> String {
    let base = t.format("%Y-%m-%dT%H:%M:%S").to_string();
    let nanos = t.timestamp_subsec_nanos();
    if nanos == 0 {
        return format!("{base}Z");
    }
    let frac = format!("{nanos:09}");
    format!("{base}.{}Z", frac.trim_end_matches('0'))
}

/// The Go type name Vault's mapstructure errors print for a JSON value.
pub(super) fn go_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "<nil>",
        Value::Bool(_) => "bool",
        Value::Number(_) => "json.Number",
        Value::String(_) => "string",
        Value::Array(_) => "[]interface {}",
        Value::Object(_) => "map[string]interface {}",
    }
}

/// The JSON kind Go's decoder names in "cannot unmarshal X" errors.
pub(super) fn go_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

pub(super) fn secs(n: u64) -> Duration {
    Duration::seconds(i64::try_from(n).unwrap_or(i64::MAX / 1000))
}

pub(super) fn random_alnum(len: usize) -> String {
    rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(len)
        .map(char::from)
        .collect()
}

/// Decode `%XX` escapes in a URL path (Vault sees decoded paths); invalid escapes stay as-is.
pub(super) fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let hex = |b: u8| (b as char).to_digit(16);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                // Both digits are < 16, so this fits a byte.
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
