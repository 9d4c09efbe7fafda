//! API keys → tenants: which models a key may call and how many of its
//! requests may be in flight. With no tenants configured, auth is off and
//! every request is the `anonymous` tenant.
//!
//! The config holds only each key's SHA-256. A presented key is hashed and
//! compared with every stored hash in constant time (no early exit, no
//! lookup keyed by it); keys appear in no log line, message or metric.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::HeaderMap;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::body::Budget;
use crate::error::{ApiError, Code};
use crate::rate::{Refused, TokenBucket, retry_after_secs};

#[derive(Debug)]
pub struct Auth {
    /// Every key's SHA-256 and the index of its tenant.
    hashes: Vec<([u8; 32], usize)>,
    tenants: Vec<TenantState>,
}

#[derive(Debug, Clone)]
struct TenantState {
    spec: config::Tenant,
    slots: Option<Arc<Semaphore>>,
    /// Its share of the buffer budget.
    budget: Budget,
    /// `requests_per_s`, `samples_per_s`.
    requests: Option<Arc<TokenBucket>>,
    samples: Option<Arc<TokenBucket>>,
    routes: HashMap<String, Arc<Route>>,
}

/// A route's models, picked by smooth weighted round robin: each model gets
/// exactly its share of every `sum(weights)` requests, spread evenly.
#[derive(Debug)]
struct Route {
    targets: Vec<config::RouteTarget>,
    current: Mutex<Vec<i64>>,
}

impl Route {
    fn new(targets: &[config::RouteTarget]) -> Self {
        Self {
            targets: targets.to_vec(),
            current: Mutex::new(vec![0; targets.len()]),
        }
    }

    fn pick(&self) -> &str {
        let mut cur = self.current.lock().unwrap_or_else(|e| e.into_inner());
        let total: i64 = self.targets.iter().map(|t| i64::from(t.weight)).sum();
        let mut best = 0;
        for (i, t) in self.targets.iter().enumerate() {
            cur[i] += i64::from(t.weight);
            if cur[i] > cur[best] {
                best = i;
            }
        }
        cur[best] -= total;
        &self.targets[best].model
    }
}

impl TenantState {
    fn new(cfg: &config::ServerConfig, t: &config::Tenant) -> Self {
        Self {
            routes: t
                .routes
                .iter()
                .map(|(alias, targets)| (alias.clone(), Arc::new(Route::new(targets))))
                .collect(),
            spec: t.clone(),
            slots: (t.max_concurrency > 0)
                .then(|| Arc::new(Semaphore::new(t.max_concurrency as usize))),
            budget: Budget::for_tenant(cfg.tenant_body_budget(t), &t.name),
            requests: t.request_rate().map(|r| Arc::new(TokenBucket::new(r))),
            samples: t.sample_rate().map(|r| Arc::new(TokenBucket::new(r))),
        }
    }

    /// The same tenant with the same limits: only its keys or models
    /// differ, so its requests in flight, buckets and upload share carry
    /// over a reload.
    fn same_limits(&self, t: &config::Tenant) -> bool {
        let plain = |t: &config::Tenant| config::Tenant {
            key_hashes: Vec::new(),
            models: Vec::new(),
            ..t.clone()
        };
        plain(&self.spec) == plain(t)
    }
}

/// The tenants in force, replaced whole when the config is reloaded
/// (SIGHUP); a request keeps the tenant state it was admitted under.
#[derive(Debug)]
pub struct Tenants(std::sync::RwLock<Arc<Auth>>);

impl Tenants {
    pub fn new(cfg: &config::ServerConfig) -> Self {
        Self(std::sync::RwLock::new(Arc::new(Auth::new(cfg))))
    }

    pub fn current(&self) -> Arc<Auth> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Puts `cfg`'s tenants in force (a validated config); tenants whose
    /// limits did not change keep their state. Returns how many there are.
    pub fn reload(&self, cfg: &config::ServerConfig) -> usize {
        let next = Arc::new(Auth::after(cfg, Some(&self.current())));
        let n = next.tenants.len();
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = next;
        n
    }
}

impl Caller {
    /// A caller under no tenant's limits: everyone when no tenants are
    /// configured (`anonymous`), or the operator's playground on the admin
    /// listener (`admin`).
    pub fn unlimited(tenant: &str, model: &str) -> Caller {
        Caller {
            tenant: tenant.into(),
            class: config::Class::default(),
            weight: 1,
            max_body_bytes: 0,
            served: model.to_string(),
            max_video_frames: 0,
            deadline_ms: 0,
            budget: None,
            samples: None,
            _permit: None,
        }
    }
}

/// An admitted caller; holds its tenant's concurrency permit.
#[derive(Debug)]
pub struct Caller {
    pub tenant: String,
    /// The tenant's class and its weight within it.
    pub class: config::Class,
    pub weight: u32,
    /// The tenant's cap on its request body; 0 = the server's limits.
    pub max_body_bytes: usize,
    /// The tenant's cap on sampled video frames; 0 = the server's.
    pub max_video_frames: u32,
    /// The tenant's default deadline; 0 = none.
    pub deadline_ms: u64,
    /// The model that serves the request: the one called, or the one its
    /// route picked.
    pub served: String,
    /// The tenant's share of the buffer budget; `None` without tenants.
    pub budget: Option<Budget>,
    /// The tenant's `samples_per_s` bucket, if it has one.
    samples: Option<Arc<TokenBucket>>,
    _permit: Option<OwnedSemaphorePermit>,
}

impl Caller {
    /// Takes `n` samples (images, or 1 to start a video) from the tenant's
    /// `samples_per_s` bucket.
    pub fn take_samples(&self, n: u32) -> Result<(), ApiError> {
        let Some(b) = &self.samples else {
            return Ok(());
        };
        b.take(n).map_err(|r| match r {
            Refused::RetryAfter(d) => rate_limited(&self.tenant, "samples_per_s", d),
            Refused::OverBurst => ApiError::new(
                Code::TooManyImages,
                format!(
                    "{n} images are more than tenant {:?}'s samples_burst; send fewer per request",
                    self.tenant
                ),
            ),
        })
    }

    /// Gives back `n` samples taken for work the gateway refused for its own
    /// load (the tenant did not get it).
    pub fn refund_samples(&self, n: u32) {
        if let Some(b) = &self.samples {
            b.refund(n);
        }
    }

    /// Charges `n` samples (a video's frames past the first, as they come)
    /// to the tenant's bucket, which may go into debt.
    pub fn charge_samples(&self, n: u32) {
        if let Some(b) = &self.samples {
            b.charge(n);
        }
    }
}

/// 429 `rate_limited`: `tenant` is over its `limit` bucket, which holds
/// enough again after `wait`.
fn rate_limited(tenant: &str, limit: &str, wait: Duration) -> ApiError {
    ApiError::new(
        Code::RateLimited,
        format!(
            "tenant {tenant:?} is over its {limit}; retry in {} ms",
            wait.as_millis().max(1)
        ),
    )
    .retry_after(retry_after_secs(wait))
}

impl Auth {
    pub fn new(cfg: &config::ServerConfig) -> Self {
        Self::after(cfg, None)
    }

    /// `cfg`'s tenants, reusing `previous`'s state of those whose limits
    /// are unchanged.
    fn after(cfg: &config::ServerConfig, previous: Option<&Auth>) -> Self {
        let hashes = cfg
            .tenants
            .iter()
            .enumerate()
            .flat_map(|(i, t)| {
                t.key_hashes
                    .iter()
                    .filter_map(|h| config::parse_key_hash(h))
                    .map(move |h| (h, i))
            })
            .collect();
        let tenants = cfg
            .tenants
            .iter()
            .map(|t| {
                let kept = previous
                    .and_then(|p| p.tenants.iter().find(|o| o.spec.name == t.name))
                    .filter(|o| o.same_limits(t));
                match kept {
                    Some(o) => TenantState {
                        spec: t.clone(),
                        ..o.clone()
                    },
                    None => TenantState::new(cfg, t),
                }
            })
            .collect();
        Self { hashes, tenants }
    }

    /// Checks the key and the tenant's right to call `model`, and takes one
    /// of its concurrency slots.
    /// The caller of a request, or why it is refused, with the tenant label
    /// that refusal is counted under (`unauthenticated` without a known key).
    pub fn admit(&self, headers: &HeaderMap, model: &str) -> Result<Caller, (String, ApiError)> {
        if self.tenants.is_empty() {
            return Ok(Caller::unlimited("anonymous", model));
        }
        let anonymous = |e: ApiError| ("unauthenticated".to_string(), e);
        let key = api_key(headers).ok_or_else(|| {
            anonymous(ApiError::new(
                Code::MissingApiKey,
                "send an API key as `Authorization: Bearer <key>` or `x-api-key: <key>`",
            ))
        })?;
        let t = self
            .tenant_of(key)
            .map(|i| &self.tenants[i])
            .ok_or_else(|| {
                anonymous(ApiError::new(
                    Code::InvalidApiKey,
                    "the API key is not known",
                ))
            })?;
        let refused = |e: ApiError| (t.spec.name.clone(), e);
        if !t.spec.may_call(model) {
            return Err(refused(ApiError::new(
                Code::ModelNotAllowed,
                format!(
                    "tenant {:?} may not call model {:?}",
                    t.spec.name,
                    crate::error::clip(model)
                ),
            )));
        }
        let permit = match &t.slots {
            None => None,
            Some(s) => Some(s.clone().try_acquire_owned().map_err(|_| {
                refused(ApiError::new(
                    Code::TenantConcurrencyLimit,
                    format!(
                        "tenant {:?} already has {} requests in flight, its max_concurrency",
                        t.spec.name, t.spec.max_concurrency
                    ),
                ))
            })?),
        };
        // After the concurrency check: a request refused there spends no
        // token, and one refused here holds no slot. (One token is never
        // over a burst, which is at least 1.)
        if let Some(b) = &t.requests
            && let Err(Refused::RetryAfter(wait)) = b.take(1)
        {
            return Err(refused(rate_limited(&t.spec.name, "requests_per_s", wait)));
        }
        let served = match t.routes.get(model) {
            Some(route) => route.pick().to_string(),
            None => model.to_string(),
        };
        Ok(Caller {
            tenant: t.spec.name.clone(),
            class: t.spec.class,
            weight: t.spec.weight,
            max_body_bytes: t.spec.max_body_bytes,
            served,
            max_video_frames: t.spec.max_video_frames,
            deadline_ms: t.spec.deadline_ms,
            budget: Some(t.budget.clone()),
            samples: t.samples.clone(),
            _permit: permit,
        })
    }
}

impl Auth {
    /// Whether `headers` carry a known key (or no tenants are configured),
    /// and if so the buffer-budget share of their tenant (`None` without
    /// tenants): a cheap check before a message is read, with no permit or
    /// token taken ([`admit`](Self::admit) does the rest), and the share
    /// the message is charged to as it arrives.
    pub fn share_of(&self, headers: &HeaderMap) -> Result<Option<Budget>, ApiError> {
        if self.tenants.is_empty() {
            return Ok(None);
        }
        let i = self.tenant_index(headers)?;
        Ok(Some(self.tenants[i].budget.clone()))
    }

    /// The tenant `headers` authenticate as (`anonymous` when no tenants
    /// are configured), with the same refusals as [`share_of`](Self::share_of).
    pub fn tenant_name(&self, headers: &HeaderMap) -> Result<String, ApiError> {
        if self.tenants.is_empty() {
            return Ok("anonymous".into());
        }
        let i = self.tenant_index(headers)?;
        Ok(self.tenants[i].spec.name.clone())
    }

    /// The configured tenant whose key `headers` present.
    fn tenant_index(&self, headers: &HeaderMap) -> Result<usize, ApiError> {
        let key = api_key(headers).ok_or_else(|| {
            ApiError::new(
                Code::MissingApiKey,
                "send an API key as `Authorization: Bearer <key>` or `x-api-key: <key>`",
            )
        })?;
        self.tenant_of(key)
            .ok_or_else(|| ApiError::new(Code::InvalidApiKey, "the API key is not known"))
    }

    /// The tenant whose key this is: its SHA-256 compared with every stored
    /// hash, each in constant time, with no early exit.
    fn tenant_of(&self, key: &str) -> Option<usize> {
        let h = config::key_digest(key);
        let mut found = None;
        for (stored, i) in &self.hashes {
            if same_digest(stored, &h) {
                found = Some(*i);
            }
        }
        found
    }
}

/// Whether two key digests are equal, in constant time (no early exit).
pub(crate) fn same_digest(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// The key a request presents (`x-api-key`, else the bearer token); an
/// empty one is no key.
fn api_key(headers: &HeaderMap) -> Option<&str> {
    match headers.get("x-api-key").and_then(|v| v.to_str().ok()) {
        Some(v) => Some(v.trim()).filter(|k| !k.is_empty()),
        None => bearer(headers),
    }
}

/// The token of `Authorization: Bearer <token>`; an empty one is none.
pub(crate) fn bearer(headers: &HeaderMap) -> Option<&str> {
    let auth = headers.get("authorization")?.to_str().ok()?;
    let (scheme, key) = auth.split_once(' ')?;
    let key = key.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !key.is_empty()).then_some(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> Auth {
        Auth::new(&config::ServerConfig {
            tenants: vec![config::Tenant {
                name: "acme".into(),
                key_hashes: vec![config::key_hash("k1")],
                keys: vec![],
                models: vec!["open_nsfw".into()],
                max_concurrency: 1,
                class: config::Class::Standard,
                weight: 1,
                max_body_bytes: 0,
                max_video_frames: 0,
                max_inflight_body_bytes: 0,
                routes: Default::default(),
                deadline_ms: 0,
                requests_per_s: 0.0,
                requests_burst: 0,
                samples_per_s: 0.0,
                samples_burst: 0,
            }],
            ..Default::default()
        })
    }

    fn with(h: &str, v: &str) -> HeaderMap {
        let mut m = HeaderMap::new();
        m.insert(
            axum::http::HeaderName::from_bytes(h.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
        m
    }

    #[test]
    fn keys_models_and_concurrency_are_enforced() {
        let a = auth();
        // The error, and the tenant label it is counted under.
        let code = |r: Result<Caller, (String, ApiError)>| {
            let (tenant, e) = r.unwrap_err();
            (tenant, e.code)
        };
        let anon = || "unauthenticated".to_string();
        assert_eq!(
            code(a.admit(&HeaderMap::new(), "open_nsfw")),
            (anon(), Code::MissingApiKey)
        );
        assert_eq!(
            code(a.admit(&with("x-api-key", "nope"), "open_nsfw")),
            (anon(), Code::InvalidApiKey)
        );
        assert_eq!(
            code(a.admit(&with("x-api-key", " "), "open_nsfw")),
            (anon(), Code::MissingApiKey)
        );
        assert_eq!(
            code(a.admit(&with("authorization", "Bearer "), "open_nsfw")),
            (anon(), Code::MissingApiKey)
        );
        assert_eq!(
            code(a.admit(&with("authorization", "Bearer k1"), "other")),
            ("acme".to_string(), Code::ModelNotAllowed)
        );
        let first = a
            .admit(&with("authorization", "bearer k1"), "open_nsfw")
            .unwrap();
        assert_eq!(first.tenant, "acme");
        assert_eq!(
            code(a.admit(&with("x-api-key", "k1"), "open_nsfw")),
            ("acme".to_string(), Code::TenantConcurrencyLimit)
        );
        drop(first);
        assert!(a.admit(&with("x-api-key", "k1"), "open_nsfw").is_ok());
    }

    #[test]
    fn a_reload_keeps_the_state_of_tenants_whose_limits_did_not_change() {
        let cfg = |rate: f64, key: &str| config::ServerConfig {
            tenants: vec![config::Tenant {
                key_hashes: vec![config::key_hash(key)],
                requests_per_s: rate,
                requests_burst: 1,
                max_concurrency: 0,
                ..auth().tenants[0].spec.clone()
            }],
            ..Default::default()
        };
        let t = Tenants::new(&cfg(0.001, "k1"));
        let admit =
            |t: &Tenants, key: &str| t.current().admit(&with("x-api-key", key), "open_nsfw");
        assert!(admit(&t, "k1").is_ok());
        assert!(admit(&t, "k1").is_err(), "the burst of 1 is spent");
        // A new key, same limits: the spent bucket carries over.
        assert_eq!(t.reload(&cfg(0.001, "k2")), 1);
        assert!(admit(&t, "k1").is_err(), "k1 was removed");
        let (_, e) = admit(&t, "k2").unwrap_err();
        assert_eq!(e.code, Code::RateLimited);
        // New limits: a fresh bucket.
        t.reload(&cfg(0.002, "k2"));
        assert!(admit(&t, "k2").is_ok());
    }

    #[test]
    fn a_route_gives_each_model_its_exact_share_spread_evenly() {
        let target = |model: &str, weight| config::RouteTarget {
            model: model.into(),
            weight,
        };
        let r = Route::new(&[target("main", 90), target("canary", 10)]);
        let picks: Vec<&str> = (0..1000).map(|_| r.pick()).collect();
        let at: Vec<usize> = (0..1000).filter(|&i| picks[i] == "canary").collect();
        assert_eq!(at.len(), 100);
        assert!(at.windows(2).all(|w| w[1] - w[0] == 10), "{at:?}");
        let r = Route::new(&[target("a", 1), target("b", 2)]);
        let picks: Vec<&str> = (0..3).map(|_| r.pick()).collect();
        assert_eq!(picks.iter().filter(|m| **m == "b").count(), 2);
    }

    #[test]
    fn no_tenants_means_anonymous() {
        let a = Auth::new(&config::ServerConfig::default());
        assert_eq!(a.admit(&HeaderMap::new(), "x").unwrap().tenant, "anonymous");
    }
}
