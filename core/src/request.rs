//! The body of `POST /v1/remediations`, parsed strictly: unknown fields, wrong types and
//! names Kubernetes would not accept are `InvalidRequest`, each with what was wrong.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::names::{validate_namespace, validate_pod_name};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateRequest {
    /// The pod's namespace.
    #[schema(example = "apisix", min_length = 1, max_length = 63, pattern = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")]
    pub namespace: String,
    /// The failing etcd pod.
    #[schema(
        example = "apisix-etcd-1",
        min_length = 1,
        max_length = 253,
        pattern = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
    )]
    pub pod: String,
    /// Act only on this instance of the pod (its `metadata.uid`): a replacement is refused
    /// with PodUIDMismatch.
    #[serde(rename = "podUID", default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = "^[A-Za-z0-9-]{1,128}$")]
    pub pod_uid: Option<String>,
    /// Check every gate and answer with the plan (200, phase Planned); change nothing.
    #[serde(default)]
    pub dry_run: bool,
    /// Act even though the pod does not look failing. Never overrides quorum, path safety
    /// or a running etcd process.
    #[serde(default)]
    pub force: bool,
    /// Why the caller asks, kept with the remediation and in its Events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 1024)]
    pub reason: Option<String>,
    /// etcd client URLs (`http(s)://host:port`) of the cluster instead of discovering them
    /// from the sibling pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(min_items = 1, max_items = 16)]
    pub etcd_endpoints: Option<Vec<String>>,
}

const MAX_REASON: usize = 1024;
const MAX_ENDPOINTS: usize = 16;

impl CreateRequest {
    pub fn parse(body: &[u8]) -> Result<Self> {
        if body.iter().all(u8::is_ascii_whitespace) {
            return Err(Error::invalid("the body is empty; send a JSON object with \"namespace\" and \"pod\""));
        }
        let req: CreateRequest =
            serde_json::from_slice(body).map_err(|e| Error::invalid(format!("the body is not a remediation request: {e}")))?;
        req.validate()?;
        Ok(req)
    }

    /// What the agent requires of a request, also checked by a client before it sends one.
    pub fn validate(&self) -> Result<()> {
        validate_namespace(&self.namespace)?;
        validate_pod_name(&self.pod)?;
        if let Some(uid) = &self.pod_uid
            && (uid.is_empty() || uid.len() > 128 || !uid.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
        {
            return Err(Error::invalid(format!("podUID {uid:?} is not a Kubernetes UID")));
        }
        if let Some(r) = &self.reason
            && (r.chars().count() > MAX_REASON || r.chars().any(|c| c.is_control() && c != '\n' && c != '\t'))
        {
            return Err(Error::invalid(format!("reason must be at most {MAX_REASON} characters of text")));
        }
        if let Some(eps) = &self.etcd_endpoints {
            if eps.is_empty() || eps.len() > MAX_ENDPOINTS {
                return Err(Error::invalid(format!("etcdEndpoints must list 1 to {MAX_ENDPOINTS} URLs, or be left out")));
            }
            for e in eps {
                validate_endpoint(e)?;
            }
        }
        Ok(())
    }
}

/// `http(s)://host:port`, nothing more: the agent dials it.
fn validate_endpoint(e: &str) -> Result<()> {
    let bad = || Error::invalid(format!("etcd endpoint {e:?} is not a URL like https://10.0.0.5:2379"));
    let rest = e.strip_prefix("https://").or_else(|| e.strip_prefix("http://")).ok_or_else(bad)?;
    let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
    let host_ok = !host.is_empty()
        && host.len() <= 253
        && host.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '[' | ']' | ':'));
    if !host_ok || port.parse::<u16>().map_or(true, |p| p == 0) {
        return Err(bad());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Code;

    fn parse(s: &str) -> Result<CreateRequest> {
        CreateRequest::parse(s.as_bytes())
    }

    #[test]
    fn a_minimal_and_a_full_request_parse() {
        let r = parse(r#"{"namespace":"apisix","pod":"apisix-etcd-1"}"#).unwrap();
        assert_eq!((r.namespace.as_str(), r.pod.as_str(), r.dry_run, r.force), ("apisix", "apisix-etcd-1", false, false));
        let r = parse(
            r#"{"namespace":"apisix","pod":"apisix-etcd-1","podUID":"6f1c-22","dryRun":true,"force":true,
                "reason":"alert EtcdMemberCrashLoop","etcdEndpoints":["https://10.0.0.5:2379","http://[::1]:2379"]}"#,
        )
        .unwrap();
        assert!(r.dry_run && r.force);
        assert_eq!(r.pod_uid.as_deref(), Some("6f1c-22"));
        assert_eq!(r.etcd_endpoints.unwrap().len(), 2);
    }

    #[test]
    fn bad_bodies_are_invalid_requests_that_say_why() {
        for (body, says) in [
            ("", "empty"),
            ("  ", "empty"),
            ("{", "not a remediation request"),
            ("[]", "not a remediation request"),
            ("null", "not a remediation request"),
            (r#"{"namespace":"apisix"}"#, "missing field `pod`"),
            (r#"{"namespace":"apisix","pod":"p","extra":1}"#, "unknown field `extra`"),
            (r#"{"namespace":"apisix","pod":7}"#, "invalid type"),
            (r#"{"namespace":"apisix","pod":"p","dryRun":"yes"}"#, "invalid type"),
            (r#"{"namespace":"","pod":"p"}"#, "namespace"),
            (r#"{"namespace":"apisix","pod":""}"#, "pod name"),
            (r#"{"namespace":"Apisix","pod":"p"}"#, "namespace"),
            (r#"{"namespace":"apisix","pod":"../etc"}"#, "pod name"),
            (r#"{"namespace":"apisix","pod":"p","podUID":""}"#, "podUID"),
            (r#"{"namespace":"apisix","pod":"p","podUID":"a/b"}"#, "podUID"),
            (r#"{"namespace":"apisix","pod":"p","etcdEndpoints":[]}"#, "etcdEndpoints"),
            (r#"{"namespace":"apisix","pod":"p","etcdEndpoints":["10.0.0.1:2379"]}"#, "etcd endpoint"),
            (r#"{"namespace":"apisix","pod":"p","etcdEndpoints":["http://h:0"]}"#, "etcd endpoint"),
            (r#"{"namespace":"apisix","pod":"p","etcdEndpoints":["http://h:2379/x"]}"#, "etcd endpoint"),
            (r#"{"namespace":"apisix","pod":"p","reason":"a\u0000b"}"#, "reason"),
        ] {
            let e = parse(body).expect_err(body);
            assert_eq!(e.code, Code::InvalidRequest, "{body}");
            assert!(e.message.contains(says), "{body}: {}", e.message);
        }
        let long = format!(r#"{{"namespace":"apisix","pod":"p","reason":"{}"}}"#, "x".repeat(MAX_REASON + 1));
        assert!(parse(&long).is_err());
    }
}
