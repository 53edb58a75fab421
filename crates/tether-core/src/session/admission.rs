//! Admission: how many sessions this process holds, per principal and in all, and how fast
//! new ones may be created per principal and per client address. A session holds a
//! [`Slot`] from creation (or rehydration) until it closes or leaves this process, so the
//! counts are exact and never drift.
//!
//! The creation rate is limited with `governor`; a refusal is a `Failure` of kind `Limit`
//! or `Rate` with its retry delay. A server's admission (`for_server`) has the gateway's as `parent`: its own place first,
//! then the gateway's (a server at its limit never holds a gateway place), its refusals
//! name the server (`data.server`).
//!
//! Must not: count a session twice or forget to release it (a `Slot` releases on drop).

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::{Failure, Kind, Retry};

/// Admission settings.
#[derive(Debug, Clone)]
pub struct AdmissionConfig {
    /// Sessions held in all.
    pub max_sessions: usize,
    /// Sessions held per authenticated principal.
    pub max_per_principal: usize,
    /// New sessions per second per principal and per client address (0: not limited
    /// here, as for a server without its own `session-rate`; the gateway's still applies).
    pub rate: u32,
    /// Burst above the rate.
    pub burst: u32,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        AdmissionConfig {
            max_sessions: 1000,
            max_per_principal: 250,
            rate: 20,
            burst: 40,
        }
    }
}

impl Admission {
    /// A full count (`Kind::Limit`), with when to try again.
    fn capacity(&self, limit: &str, max: usize, what: &str) -> Failure {
        let f = match &self.server {
            None => Failure::new(
                Kind::Limit,
                format!(
                    "the gateway holds {max} {what}, the most allowed (--{limit}); try again later"
                ),
                Retry::Safe(Some(Duration::from_secs(5))),
            ),
            Some(server) => Failure::new(
                Kind::Limit,
                format!(
                    "server {server:?} holds {max} {what}, the most allowed for it (tether.{limit} in the servers file); its other users wait, the gateway's other servers are not affected; try again later"
                ),
                Retry::Safe(Some(Duration::from_secs(5))),
            )
            .with("server", server.as_str()),
        };
        f.with("limit", limit).with("max", max)
    }

    /// A creation rate exceeded (`Kind::Rate`), with when to try again.
    fn rate(&self, limit: &str, wait: Duration) -> Failure {
        let retry_after = wait.max(Duration::from_millis(1));
        let per_sec = self.cfg.rate;
        let (whose, setting) = match &self.server {
            None => (String::new(), "--session-rate".to_owned()),
            Some(s) => (
                format!(" to server {s:?}"),
                "tether.session-rate in the servers file".to_owned(),
            ),
        };
        let f = Failure::new(
            Kind::Rate,
            format!(
                "too many new sessions{whose} from this {limit}: at most {per_sec} per second ({setting}); retry in {} ms",
                retry_after.as_millis()
            ),
            Retry::Safe(Some(retry_after)),
        )
        .with("limit", format!("session-rate per {limit}"));
        match &self.server {
            Some(s) => f.with("server", s.as_str()),
            None => f,
        }
    }
}

/// The session counts and creation rates of one process, or of one of its servers (whose
/// slots are also taken from the gateway's: `parent`).
pub struct Admission {
    cfg: AdmissionConfig,
    slots: Arc<Semaphore>,
    per_principal: Mutex<HashMap<String, usize>>,
    by_principal: DefaultKeyedRateLimiter<String>,
    by_addr: DefaultKeyedRateLimiter<IpAddr>,
    /// The gateway's counts, when these are one server's.
    parent: Option<Arc<Admission>>,
    /// The server these counts are of (messages), when they are one server's.
    server: Option<String>,
}

/// One held session's place in the counts; released on drop.
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    principal: Option<String>,
    admission: Arc<Admission>,
    /// Its place in the gateway's counts, when this is a server's.
    _parent: Option<Box<Slot>>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(p) = &self.principal {
            let mut map = self.admission.lock();
            if let Some(n) = map.get_mut(p) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    map.remove(p);
                }
            }
        }
    }
}

/// Keyed rate limiters keep a cell per key; past this many keys the stale ones are dropped.
const RATE_KEYS: usize = 10_000;

impl Admission {
    /// Admission with these limits.
    pub fn new(cfg: AdmissionConfig) -> Arc<Admission> {
        Arc::new(Admission::build(cfg, None, None))
    }

    /// One server's admission: its own limits, and every session also counted in the
    /// gateway's (`parent`), so one busy server cannot take every place.
    pub fn for_server(
        cfg: AdmissionConfig,
        server: &str,
        parent: Arc<Admission>,
    ) -> Arc<Admission> {
        Arc::new(Admission::build(cfg, Some(parent), Some(server.to_owned())))
    }

    fn build(
        cfg: AdmissionConfig,
        parent: Option<Arc<Admission>>,
        server: Option<String>,
    ) -> Admission {
        let quota = Quota::per_second(NonZeroU32::new(cfg.rate.max(1)).expect("at least one"))
            .allow_burst(NonZeroU32::new(cfg.burst.max(1)).expect("at least one"));
        Admission {
            slots: Arc::new(Semaphore::new(cfg.max_sessions)),
            per_principal: Mutex::default(),
            by_principal: RateLimiter::keyed(quota),
            by_addr: RateLimiter::keyed(quota),
            cfg,
            parent,
            server,
        }
    }

    /// The gateway's counts, when these are one server's.
    pub fn parent(&self) -> Option<&Arc<Admission>> {
        self.parent.as_ref()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        self.per_principal.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sessions holding a slot now.
    pub fn held(&self) -> usize {
        self.cfg.max_sessions - self.slots.available_permits()
    }

    /// The configured limits.
    pub fn config(&self) -> &AdmissionConfig {
        &self.cfg
    }

    /// Counts a new session creation against the principal's and the address's rate. The
    /// anonymous principal (no API keys) is everyone, so only its address is limited.
    pub fn check_rate(&self, principal: &str, addr: Option<IpAddr>) -> Result<(), Failure> {
        if self.cfg.rate > 0 {
            self.check_own_rate(principal, addr)?;
        }
        match &self.parent {
            Some(p) => p.check_rate(principal, addr),
            None => Ok(()),
        }
    }

    fn check_own_rate(&self, principal: &str, addr: Option<IpAddr>) -> Result<(), Failure> {
        let now = DefaultClock::default().now();
        if principal != crate::auth::Principal::anonymous().id {
            if self.by_principal.len() > RATE_KEYS {
                self.by_principal.retain_recent();
            }
            if let Err(not_until) = self.by_principal.check_key(&principal.to_owned()) {
                return Err(self.rate("user", not_until.wait_time_from(now)));
            }
        }
        if let Some(addr) = addr {
            if self.by_addr.len() > RATE_KEYS {
                self.by_addr.retain_recent();
            }
            if let Err(not_until) = self.by_addr.check_key(&addr) {
                return Err(self.rate("client address", not_until.wait_time_from(now)));
            }
        }
        Ok(())
    }

    /// Takes a place for one more session of `principal`, or says which limit is full.
    pub fn reserve(self: &Arc<Self>, principal: &str) -> Result<Slot, Failure> {
        let permit =
            self.slots.clone().try_acquire_owned().map_err(|_| {
                self.capacity("max-sessions", self.cfg.max_sessions, "live sessions")
            })?;
        // The gateway's place after the server's own: a server at its limit must not take
        // (even briefly) a place another server's session needs.
        let parent = match &self.parent {
            Some(p) => Some(Box::new(p.reserve(principal)?)),
            None => None,
        };
        let counted = principal != crate::auth::Principal::anonymous().id;
        if counted {
            let mut map = self.lock();
            let n = map.entry(principal.to_owned()).or_default();
            if *n >= self.cfg.max_per_principal {
                return Err(self.capacity(
                    "max-sessions-per-principal",
                    self.cfg.max_per_principal,
                    "live sessions of this user",
                ));
            }
            *n += 1;
        }
        Ok(Slot {
            _permit: permit,
            principal: counted.then(|| principal.to_owned()),
            admission: self.clone(),
            _parent: parent,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn slots_bound_sessions_in_all_and_per_principal() {
        let a = Admission::new(AdmissionConfig {
            max_sessions: 3,
            max_per_principal: 2,
            rate: 100,
            burst: 100,
        });
        let s1 = a.reserve("alice").unwrap();
        let _s2 = a.reserve("alice").unwrap();
        let r = a.reserve("alice").err().unwrap();
        assert_eq!(
            (r.kind(), r.field("limit").and_then(|l| l.as_str())),
            (Kind::Limit, Some("max-sessions-per-principal"))
        );
        let _s3 = a.reserve("bob").unwrap();
        let r = a.reserve("carol").err().unwrap();
        assert_eq!(r.field("limit").unwrap(), "max-sessions");
        assert_eq!(a.held(), 3);
        drop(s1);
        assert_eq!(a.held(), 2);
        let _again = a.reserve("alice").unwrap();
        // The anonymous principal is only bounded by the total.
        let b = Admission::new(AdmissionConfig {
            max_sessions: 3,
            max_per_principal: 1,
            ..AdmissionConfig::default()
        });
        let _x: Vec<Slot> = (0..3).map(|_| b.reserve("anonymous").unwrap()).collect();
    }

    #[test]
    fn a_server_at_its_limit_leaves_the_gateways_other_places() {
        let gateway = Admission::new(AdmissionConfig {
            max_sessions: 3,
            ..AdmissionConfig::default()
        });
        let own = |max| AdmissionConfig {
            max_sessions: max,
            max_per_principal: usize::MAX,
            rate: 0,
            burst: 1,
        };
        let busy = Admission::for_server(own(2), "busy", gateway.clone());
        let calm = Admission::for_server(own(3), "calm", gateway.clone());
        let first = busy.reserve("alice").unwrap();
        let _second = busy.reserve("alice").unwrap();
        let r = busy.reserve("alice").err().unwrap();
        assert_eq!(
            (r.field("limit").unwrap(), r.field("server").unwrap()),
            (&json!("max-sessions"), &json!("busy"))
        );
        assert!(r.message().contains("tether.max-sessions"), "{r:?}");
        // The refusal took nothing from the gateway's places.
        assert_eq!((busy.held(), gateway.held()), (2, 2));
        let _c = calm.reserve("bob").unwrap();
        // The gateway is full now: the calm server's next session meets the gateway's limit.
        let r = calm.reserve("bob").err().unwrap();
        assert_eq!(r.field("limit").unwrap(), "max-sessions");
        assert!(r.field("server").is_none(), "{r:?}");
        assert_eq!(calm.held(), 1, "a refused place is given back");
        drop(first);
        assert_eq!(gateway.held(), 2);
        let _d = calm.reserve("bob").unwrap();
        // Rates: a server without its own rate is bounded only by the gateway's.
        let limited = Admission::new(AdmissionConfig {
            rate: 1,
            burst: 1,
            ..AdmissionConfig::default()
        });
        let s = Admission::for_server(own(10), "s", limited);
        assert!(s.check_rate("u", None).is_ok());
        assert!(s.check_rate("u", None).is_err());
    }

    #[test]
    fn creation_rate_is_limited_per_principal_and_address() {
        let a = Admission::new(AdmissionConfig {
            rate: 1,
            burst: 2,
            ..AdmissionConfig::default()
        });
        let addr: IpAddr = "127.0.0.1".parse().unwrap();
        assert!(a.check_rate("anonymous", Some(addr)).is_ok());
        assert!(a.check_rate("anonymous", Some(addr)).is_ok());
        let r = a.check_rate("anonymous", Some(addr)).unwrap_err();
        assert_eq!(r.kind(), Kind::Rate);
        let Retry::Safe(Some(after)) = r.retry() else {
            panic!("a rate says when: {r:?}")
        };
        assert!(after > Duration::ZERO && after <= Duration::from_secs(1));
        // Another address is not affected.
        assert!(
            a.check_rate("anonymous", Some("127.0.0.2".parse().unwrap()))
                .is_ok()
        );
        // A user is limited wherever they come from.
        assert!(a.check_rate("u1", None).is_ok());
        assert!(a.check_rate("u1", None).is_ok());
        assert!(
            a.check_rate("u1", Some("10.0.0.9".parse().unwrap()))
                .is_err()
        );
    }
}
