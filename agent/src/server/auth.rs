//! Callers are authenticated and authorized as the kubelet does it: the bearer token by a
//! TokenReview, then a SubjectAccessReview for the verb on `remediations.etcd-medic.io` in
//! the pod's namespace. Answers are cached briefly; an API server that cannot be asked
//! means NotReady (fail closed), never "allowed".

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReviewSpec};

use crate::error::{Code, Error, Result};
use crate::kubeapi::KubeApi;

pub const GROUP: &str = "etcd-medic.io";
pub const RESOURCE: &str = "remediations";
/// The quorum recovery's steps on a member's volume: the controller's alone.
pub const RECOVERY_STEPS: &str = "recoverysteps";

/// How long a review's answer is reused: short, so revoking access takes effect quickly.
const TTL: Duration = Duration::from_secs(10);
const MAX_ENTRIES: usize = 1024;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: Option<String>,
    pub groups: Vec<String>,
    pub extra: std::collections::BTreeMap<String, Vec<String>>,
}

impl User {
    fn anonymous() -> Self {
        User { name: "system:anonymous".into(), uid: None, groups: vec!["system:unauthenticated".into()], extra: Default::default() }
    }
}

/// The token of `Authorization: Bearer <token>`.
pub fn bearer(headers: &HeaderMap) -> Result<&str> {
    let value = headers.get(axum::http::header::AUTHORIZATION).ok_or_else(|| {
        Error::new(Code::Unauthenticated, "no Authorization header; send `Authorization: Bearer <service account token>`")
    })?;
    let token = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim)
        .filter(|t| !t.is_empty() && !t.contains(' '))
        .ok_or_else(|| Error::new(Code::Unauthenticated, "the Authorization header is not `Bearer <token>`"))?;
    Ok(token)
}

struct Cache<K, V> {
    entries: Mutex<HashMap<K, (Instant, V)>>,
}

impl<K: std::hash::Hash + Eq, V: Clone> Cache<K, V> {
    fn new() -> Self {
        Cache { entries: Mutex::new(HashMap::new()) }
    }

    fn get(&self, k: &K) -> Option<V> {
        let entries = self.entries.lock().unwrap();
        entries.get(k).filter(|(at, _)| at.elapsed() < TTL).map(|(_, v)| v.clone())
    }

    fn put(&self, k: K, v: V) {
        let mut entries = self.entries.lock().unwrap();
        if entries.len() >= MAX_ENTRIES {
            entries.retain(|_, (at, _)| at.elapsed() < TTL);
            if entries.len() >= MAX_ENTRIES {
                entries.clear();
            }
        }
        entries.insert(k, (Instant::now(), v));
    }
}

/// `None`: every caller is anonymous and allowed (only on loopback, see `ServeArgs`).
pub struct Auth {
    reviews: Option<Reviews>,
}

struct Reviews {
    api: KubeApi,
    audiences: Vec<String>,
    /// Tokens the API server accepted, and apart from them those it refused (by a keyed hash):
    /// a flood of made-up tokens fills only the second, never evicting a caller's good one.
    tokens: Cache<String, User>,
    refused: Cache<u64, String>,
    hasher: std::collections::hash_map::RandomState,
    access: Cache<(String, String, &'static str, &'static str), std::result::Result<(), String>>,
}

impl Auth {
    pub fn none() -> Self {
        Auth { reviews: None }
    }

    pub fn kubernetes(api: KubeApi, audiences: Vec<String>) -> Self {
        Auth {
            reviews: Some(Reviews {
                api,
                audiences,
                tokens: Cache::new(),
                refused: Cache::new(),
                hasher: Default::default(),
                access: Cache::new(),
            }),
        }
    }

    /// Who is calling (401 when the token is missing or not valid).
    pub async fn authenticate(&self, headers: &HeaderMap) -> Result<User> {
        let Some(r) = &self.reviews else { return Ok(User::anonymous()) };
        let token = bearer(headers)?;
        let hash = std::hash::BuildHasher::hash_one(&r.hasher, token);
        let verdict = if let Some(user) = r.tokens.get(&token.to_string()) {
            Ok(user)
        } else if let Some(why) = r.refused.get(&hash) {
            Err(why)
        } else {
            let status = r.api.token_review(token, &r.audiences).await?;
            // An API server that ignored the audiences asked for must not pass a token
            // issued for someone else (as kube-apiserver's own webhook client checks).
            let audience_ok =
                r.audiences.is_empty() || status.audiences.as_ref().is_some_and(|a| a.iter().any(|x| r.audiences.contains(x)));
            let v = match (status.authenticated, status.user) {
                (Some(true), _) if !audience_ok => Err(format!("the token is not for audience {:?}", r.audiences)),
                (Some(true), Some(u)) => Ok(User {
                    name: u.username.unwrap_or_default(),
                    uid: u.uid,
                    groups: u.groups.unwrap_or_default(),
                    extra: u.extra.unwrap_or_default(),
                }),
                _ => Err(status.error.filter(|e| !e.is_empty()).unwrap_or_else(|| "the token is not valid".into())),
            };
            match &v {
                Ok(user) => r.tokens.put(token.to_string(), user.clone()),
                Err(why) => r.refused.put(hash, why.clone()),
            }
            v
        };
        verdict.map_err(|why| Error::new(Code::Unauthenticated, format!("TokenReview refused the token: {why}")))
    }

    /// May `user` do `verb` on remediations in `namespace` ("" for every namespace)? 403 if not.
    pub async fn authorize(&self, user: &User, verb: &'static str, namespace: &str) -> Result<()> {
        self.authorize_on(user, RESOURCE, verb, namespace).await
    }

    /// May `user` do `verb` on `resource` (of the group etcd-medic.io) in `namespace`? 403 if not.
    pub async fn authorize_on(&self, user: &User, resource: &'static str, verb: &'static str, namespace: &str) -> Result<()> {
        let Some(r) = &self.reviews else { return Ok(()) };
        // The whole identity: two users of one name with other groups are not one user.
        let key = (format!("{user:?}"), namespace.to_string(), resource, verb);
        let verdict = match r.access.get(&key) {
            Some(v) => v,
            None => {
                let spec = SubjectAccessReviewSpec {
                    user: Some(user.name.clone()),
                    uid: user.uid.clone(),
                    groups: Some(user.groups.clone()),
                    extra: Some(user.extra.clone()),
                    resource_attributes: Some(ResourceAttributes {
                        group: Some(GROUP.into()),
                        resource: Some(resource.into()),
                        verb: Some(verb.into()),
                        namespace: (!namespace.is_empty()).then(|| namespace.to_string()),
                        ..Default::default()
                    }),
                    ..Default::default()
                };
                let status = r.api.subject_access_review(spec).await?;
                let v = if status.allowed && status.denied != Some(true) {
                    Ok(())
                } else {
                    Err(status.reason.filter(|s| !s.is_empty()).unwrap_or_else(|| "no RBAC rule allows it".into()))
                };
                r.access.put(key, v.clone());
                v
            }
        };
        let scope = if namespace.is_empty() { "in every namespace".to_string() } else { format!("in namespace {namespace}") };
        verdict.map_err(|why| {
            Error::new(
                Code::Forbidden,
                format!("{} may not {verb} {resource}.{GROUP} {scope} ({why}); bind the etcd-medic-caller ClusterRole", user.name),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(axum::http::header::AUTHORIZATION, v.parse().unwrap());
        h
    }

    #[test]
    fn only_a_bearer_token_is_taken() {
        assert_eq!(bearer(&headers("Bearer abc.def")).unwrap(), "abc.def");
        for bad in ["Basic dXNlcjpwYXNz", "Bearer", "Bearer ", "Bearer a b", "abc"] {
            assert_eq!(bearer(&headers(bad)).unwrap_err().code, Code::Unauthenticated, "{bad}");
        }
        assert_eq!(bearer(&HeaderMap::new()).unwrap_err().code, Code::Unauthenticated);
    }

    #[test]
    fn the_cache_forgets_after_its_ttl_and_stays_bounded() {
        let c: Cache<u32, bool> = Cache::new();
        c.put(1, true);
        assert_eq!(c.get(&1), Some(true));
        c.entries.lock().unwrap().get_mut(&1).unwrap().0 -= TTL;
        assert_eq!(c.get(&1), None, "expired");
        for i in 0..(MAX_ENTRIES as u32 * 2) {
            c.put(i, true);
        }
        assert!(c.entries.lock().unwrap().len() <= MAX_ENTRIES);
    }
}
