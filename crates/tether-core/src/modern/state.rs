//! Sealed `requestState` (the 2026-07-28 era's multi-round-trip calls): HMAC-SHA256 over
//! who may continue a parked call, where it is held, and until when.
//! Must not: do I/O or read a clock (the caller passes the time).

use super::*;

/// What a `requestState` stands for: whose call, on which instance, which waiting call,
/// which request may continue it, until when.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateClaims {
    /// Principal id.
    pub p: String,
    /// The gateway instance that holds the call.
    pub i: String,
    /// The waiting call's key on that instance.
    pub w: String,
    /// Method of the request it continues.
    pub m: String,
    /// Its tool, prompt or resource name, if any.
    pub n: Option<String>,
    /// Expiry, Unix milliseconds.
    pub x: i64,
}

/// Why a `requestState` is refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StateError {
    /// Not one the gateway sealed (altered, truncated, another key, another principal).
    #[error(
        "requestState failed integrity verification (it was altered, or belongs to another client)"
    )]
    Tampered,
    /// Sealed, but its time is over.
    #[error("requestState has expired; send the request again without it")]
    Expired,
    /// Sealed for another request.
    #[error("requestState belongs to another request (method or name differ)")]
    Foreign,
}

/// The key that seals `requestState` (HMAC-SHA256): kept in the state directory or the
/// shared store, so any instance can verify a state another one sealed.
#[derive(Clone)]
pub struct StateKey(pub(super) [u8; 32]);

impl std::fmt::Debug for StateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StateKey(..)")
    }
}

type HmacSha256 = Hmac<Sha256>;

impl StateKey {
    /// A key from its bytes.
    pub fn new(bytes: [u8; 32]) -> StateKey {
        StateKey(bytes)
    }

    /// A key from the 64 hex characters it is kept as (in the state dir or the shared
    /// store); `None` for anything else.
    pub fn from_hex(text: &str) -> Option<StateKey> {
        let text = text.trim();
        if text.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(StateKey(out))
    }

    fn mac(&self, payload: &str) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(payload.as_bytes());
        mac
    }

    /// `base64url(claims JSON) "." base64url(HMAC)`: opaque to the client, verifiable by
    /// any instance with the key.
    pub fn seal(&self, claims: &StateClaims) -> String {
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).unwrap_or_default());
        let tag = URL_SAFE_NO_PAD.encode(self.mac(&payload).finalize().into_bytes());
        format!("{payload}.{tag}")
    }

    /// Verifies a state for `principal` retrying `method`/`name` at `now_ms`.
    pub fn open(
        &self,
        token: &str,
        principal: &str,
        method: &str,
        name: Option<&str>,
        now_ms: i64,
    ) -> Result<StateClaims, StateError> {
        let (payload, tag) = token.split_once('.').ok_or(StateError::Tampered)?;
        let tag = URL_SAFE_NO_PAD
            .decode(tag)
            .map_err(|_| StateError::Tampered)?;
        self.mac(payload)
            .verify_slice(&tag)
            .map_err(|_| StateError::Tampered)?;
        let claims: StateClaims = URL_SAFE_NO_PAD
            .decode(payload)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or(StateError::Tampered)?;
        if claims.p != principal {
            return Err(StateError::Tampered);
        }
        if claims.m != method || claims.n.as_deref() != name {
            return Err(StateError::Foreign);
        }
        if now_ms >= claims.x {
            return Err(StateError::Expired);
        }
        Ok(claims)
    }
}
