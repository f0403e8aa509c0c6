//! Names the agent accepts: Kubernetes names from callers, remediation ids that name journal
//! files, and the journal's own fields (the agent's state, yet validated on load).

use crate::contract::Remediation;
use crate::error::{Error, Result};

/// A DNS-1123 label: what Kubernetes requires of a namespace.
pub fn validate_namespace(ns: &str) -> Result<()> {
    if is_dns1123_label(ns) {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "namespace {ns:?} is not a valid Kubernetes name (lower-case letters, digits and '-', at most 63, starting and ending alphanumeric)"
        )))
    }
}

/// A DNS-1123 subdomain: what Kubernetes requires of a pod name.
pub fn validate_pod_name(name: &str) -> Result<()> {
    if !name.is_empty() && name.len() <= 253 && name.split('.').all(is_dns1123_label) {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "pod name {name:?} is not a valid Kubernetes name (lower-case letters, digits, '-' and '.', at most 253)"
        )))
    }
}

fn is_dns1123_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// A remediation id as the engine makes them: it names a file, so nothing else is taken.
pub fn validate_id(id: &str) -> Result<()> {
    if !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_digit() || b.is_ascii_lowercase()) {
        Ok(())
    } else {
        Err(Error::invalid(format!("{id:?} is not a remediation id (lower-case letters and digits)")))
    }
}

/// What a loaded journal must satisfy to be acted on. Pure.
pub fn validate(r: &Remediation, file_id: &str) -> std::result::Result<(), String> {
    if r.id != file_id {
        return Err(format!("names remediation {:?}, not {file_id:?}", r.id));
    }
    validate_id(&r.id).map_err(|e| e.message)?;
    let name_ok = |s: &str| !s.is_empty() && s.len() <= 253 && !s.contains('/') && s != "." && s != "..";
    if !name_ok(&r.namespace) || !name_ok(&r.pod) {
        return Err("namespace or pod is not a Kubernetes name".into());
    }
    if r.steps.len() > 64 {
        return Err(format!("{} steps", r.steps.len()));
    }
    if let Some(q) = &r.quarantine {
        if !crate::retention::is_dir_name(&q.name, &r.id) {
            return Err(format!("quarantine {:?} is not named after the remediation", q.name));
        }
        let known = crate::profile::ALL_MOVED;
        if let Some(bad) = q.items.iter().find(|i| !known.contains(&i.as_str())) {
            return Err(format!("quarantine item {bad:?} is none the agent moves"));
        }
        if q.member_id.as_deref().is_some_and(|m| crate::member::parse_member_id(m.as_bytes()).is_err()) {
            return Err("quarantine member id is not hex".into());
        }
    }
    Ok(())
}
