//! Who is calling: API keys (stored as SHA-256 hashes) mapped to users.
//!
//! Keys are 32 random bytes, so a fast hash is enough: nobody can brute-force the preimage,
//! and hashing keeps a leaked config file from leaking usable keys.
//!
//! Must not: keep a key in memory or on disk other than as its hash, or tell a wrong key from an unknown one in its answer.

use std::collections::HashMap;

use serde::Deserialize;
use sha2::{Digest, Sha256};

/// The user behind a request.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Principal {
    /// User id; `anonymous` when no keys are configured.
    pub id: String,
    /// Email, if configured.
    pub email: Option<String>,
    /// Display name, if configured.
    pub name: Option<String>,
}

impl Principal {
    /// The principal of every request when no keys are configured.
    pub fn anonymous() -> Principal {
        Principal {
            id: "anonymous".into(),
            email: None,
            name: None,
        }
    }
}

/// One `[[keys]]` entry of the config file.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KeyEntry {
    /// `sha256:<hex>` of the key.
    pub hash: String,
    /// User id.
    pub user: String,
    /// Email.
    pub email: Option<String>,
    /// Display name.
    pub name: Option<String>,
}

/// The configured keys, by hash.
#[derive(Debug, Clone, Default)]
pub struct Keys {
    by_hash: HashMap<String, Principal>,
}

/// Whether a presented secret (the admin token) is the expected one.
pub fn same_secret(given: &str, expected: &str) -> bool {
    // Comparing digests: the time taken says nothing about how much of the secret matched.
    use sha2::{Digest, Sha256};
    Sha256::digest(given.as_bytes()) == Sha256::digest(expected.as_bytes())
}

/// `sha256:<hex>` of a key.
pub fn hash_key(key: &str) -> String {
    let digest = Sha256::digest(key.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// A new random API key (`tk_` and 64 hex characters).
pub fn generate_key() -> String {
    use rand::RngCore;
    let mut buf = [0u8; 32];
    rand::rng().fill_bytes(&mut buf);
    let hex: String = buf.iter().map(|b| format!("{b:02x}")).collect();
    format!("tk_{hex}")
}

impl Keys {
    /// Builds the lookup table; reports malformed entries.
    pub fn new(entries: &[KeyEntry]) -> Result<Keys, Vec<String>> {
        let mut errors = Vec::new();
        let mut by_hash = HashMap::new();
        for e in entries {
            let ok = e
                .hash
                .strip_prefix("sha256:")
                .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()));
            if !ok {
                errors.push(format!(
                    "keys: entry for user {:?} has a hash that is not sha256:<64 hex digits>",
                    e.user
                ));
            }
            if e.user.is_empty() || e.user == "anonymous" {
                errors.push(format!("keys: user id {:?} is not allowed", e.user));
            }
            by_hash.insert(
                e.hash.to_ascii_lowercase(),
                Principal {
                    id: e.user.clone(),
                    email: e.email.clone(),
                    name: e.name.clone(),
                },
            );
        }
        if errors.is_empty() {
            Ok(Keys { by_hash })
        } else {
            Err(errors)
        }
    }

    /// Whether any key is configured (then every request must present one).
    pub fn enabled(&self) -> bool {
        !self.by_hash.is_empty()
    }

    /// The principal of an `Authorization` header value, if it carries a known key.
    pub fn authenticate(&self, authorization: Option<&str>) -> Option<Principal> {
        let key = authorization?
            .strip_prefix("Bearer ")
            .or_else(|| authorization?.strip_prefix("bearer "))?;
        self.by_hash.get(&hash_key(key.trim())).cloned()
    }

    /// Every configured user (deduplicated by id).
    pub fn users(&self) -> Vec<Principal> {
        let mut seen = HashMap::new();
        for p in self.by_hash.values() {
            seen.entry(p.id.clone()).or_insert_with(|| p.clone());
        }
        let mut users: Vec<Principal> = seen.into_values().collect();
        users.sort_by(|a, b| a.id.cmp(&b.id));
        users
    }
}

/// The keys in force, replaced whole when the config file is reloaded (`tether keys
/// revoke`, then SIGHUP or the file's change): requests read the current table, and a
/// replacement says which users lost every key, so their sessions can be closed.
#[derive(Debug, Default)]
pub struct KeyRing(std::sync::RwLock<std::sync::Arc<Keys>>);

impl KeyRing {
    /// A ring holding `keys`.
    pub fn new(keys: Keys) -> KeyRing {
        KeyRing(std::sync::RwLock::new(std::sync::Arc::new(keys)))
    }

    /// The keys in force.
    pub fn get(&self) -> std::sync::Arc<Keys> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Puts `keys` in force; returns the users who had a key and have none now.
    pub fn replace(&self, keys: Keys) -> Vec<String> {
        let mut cur = self.0.write().unwrap_or_else(|p| p.into_inner());
        let now: std::collections::HashSet<String> =
            keys.by_hash.values().map(|p| p.id.clone()).collect();
        let mut gone: Vec<String> = cur
            .by_hash
            .values()
            .map(|p| p.id.clone())
            .filter(|u| !now.contains(u))
            .collect();
        gone.sort();
        gone.dedup();
        *cur = std::sync::Arc::new(keys);
        gone
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_authenticate_by_hash() {
        let key = generate_key();
        assert!(key.starts_with("tk_") && key.len() == 67);
        let entry = KeyEntry {
            hash: hash_key(&key),
            user: "alice".into(),
            email: Some("a@x".into()),
            name: None,
        };
        let keys = Keys::new(&[entry]).unwrap();
        assert!(keys.enabled());
        assert_eq!(
            keys.authenticate(Some(&format!("Bearer {key}")))
                .unwrap()
                .id,
            "alice"
        );
        assert!(keys.authenticate(Some("Bearer tk_wrong")).is_none());
        assert!(keys.authenticate(Some(&key)).is_none(), "scheme required");
        assert!(keys.authenticate(None).is_none());
        assert!(
            Keys::new(&[KeyEntry {
                hash: "md5:x".into(),
                user: "b".into(),
                email: None,
                name: None
            }])
            .is_err()
        );
        // Replaced: a user whose every key went is named, one who kept one is not.
        let (k2, k3) = (generate_key(), generate_key());
        let ring = KeyRing::new(
            Keys::new(&[
                KeyEntry {
                    hash: hash_key(&key),
                    user: "alice".into(),
                    email: None,
                    name: None,
                },
                KeyEntry {
                    hash: hash_key(&k2),
                    user: "bob".into(),
                    email: None,
                    name: None,
                },
            ])
            .unwrap(),
        );
        let gone = ring.replace(
            Keys::new(&[KeyEntry {
                hash: hash_key(&k3),
                user: "bob".into(),
                email: None,
                name: None,
            }])
            .unwrap(),
        );
        assert_eq!(gone, ["alice"]);
        assert!(
            ring.get()
                .authenticate(Some(&format!("Bearer {key}")))
                .is_none()
        );
        assert!(
            ring.get()
                .authenticate(Some(&format!("Bearer {k3}")))
                .is_some()
        );
    }
}
