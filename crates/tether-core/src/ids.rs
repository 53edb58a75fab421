//! Random identifiers: instances, sessions, streams, generated secrets. On the ground floor
//! so every layer (the stores included) can mint them without importing the session layer.
//! Must not: hold state, or produce anything but visible ASCII.

/// `bytes` random bytes as lowercase hex.
pub fn random_hex(bytes: usize) -> String {
    use rand::RngCore;
    let mut buf = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buf);
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// A new instance id: 48 random bits as 12 hex characters.
pub fn new_instance_id() -> String {
    random_hex(6)
}

/// A new session id: 160 random bits as 40 lowercase hex characters (visible ASCII).
pub fn new_session_id() -> String {
    random_hex(20)
}

/// A new stream id within a session: 64 random bits as 16 hex characters.
pub fn new_stream_id() -> String {
    random_hex(8)
}

/// Characters of a session id that logs show: enough to find the session (the dashboard
/// and `tether sessions` search by prefix), too few to use it. A full id is a bearer
/// credential for an anonymous session, and log files travel further than the state dir.
pub const SHOWN: usize = 8;

/// The part of a session id a log line may carry (issue 26: every session's full id was
/// logged at INFO); also cuts what a client sent as an id before it reaches a log.
pub fn shown(id: &str) -> &str {
    match id.char_indices().nth(SHOWN) {
        Some((i, _)) => &id[..i],
        None => id,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_have_their_length_and_alphabet() {
        for (id, len) in [
            (new_instance_id(), 12),
            (new_session_id(), 40),
            (new_stream_id(), 16),
        ] {
            assert_eq!(id.len(), len);
            assert!(
                id.bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
            );
        }
        assert_ne!(new_session_id(), new_session_id());
        let id = new_session_id();
        assert_eq!(shown(&id), &id[..8]);
        assert_eq!(shown("ab"), "ab");
        assert_eq!(shown("ééééééééé"), "éééééééé");
    }
}
