//! A redacting wrapper for key material.
//!
//! Key values must never reach logs, errors, metrics, the audit trail or the journal
//! (invariant I4). Everything that holds one holds it as [`Secret`], whose `Debug` and
//! `Display` print a fixed placeholder and which deliberately implements no `Serialize`.

use sha2::{Digest, Sha256};
use std::fmt;
use zeroize::Zeroize;

/// Key material (an OpenAI API key value, an admin key, a Vault token).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The raw value. Call only at the boundary that must send it (an HTTP header, a Vault
    /// write); never format the result.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Hex SHA-256 of the value: safe to log or store, used to compare copies of a key.
    pub fn sha256_hex(&self) -> String {
        hex::encode(Sha256::digest(self.0.as_bytes()))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        // Best effort: overwrite the heap copy we own before freeing it (copies made by the
        // HTTP stacks are out of our reach).
        self.0.zeroize();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_never_show_the_value() {
        let s = Secret::new("sk-svcacct-THE-VALUE");
        assert!(!format!("{s:?}").contains("THE-VALUE"));
        assert!(!format!("{s}").contains("THE-VALUE"));
        assert!(!format!("{:?}", Some(&s)).contains("THE-VALUE"));
        assert_eq!(s.expose(), "sk-svcacct-THE-VALUE");
    }

    #[test]
    fn hash_is_stable_hex() {
        let a = Secret::new("abc");
        assert_eq!(
            a.sha256_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
