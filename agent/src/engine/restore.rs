//! Restore: puts a quarantine back, for a person who wants the old data after all.

use std::path::Path;

use crate::error::{Code, Error, Result};
use crate::failpoint::Failpoint;
use crate::host::processes as guard;
use crate::locate::{Locator, blocking};
use crate::quarantine;
use etcd_medic_core::contract::{QuarantineState, Remediation, Step};

/// A remediation whose Membership step started may have removed the member the quarantined
/// data belongs to (it removes first, then adds the pod again under a new id; a failure or a
/// crash after the removal leaves no Done): put back, that data would be a removed member's
/// (etcd refuses to start it), and a new entry a voter that never comes up. The journal
/// says the step started, whatever the cluster answers now; only a person's `force` goes on.
pub fn membership_gate(r: &Remediation, force: bool) -> Result<()> {
    let changed = r.steps.iter().any(|s| s.name == Step::Membership);
    if !changed || force {
        return Ok(());
    }
    let old = r.plan.as_ref().and_then(|p| p.data.as_ref()).and_then(|d| d.wal.as_ref()).and_then(|w| w.node_id).map(|n| format!("{n:x}"));
    Err(Error::new(
        Code::QuorumAtRisk,
        format!(
            "remediation {} changed membership (member {} removed, the pod added again under a new id, or the step cut short): its data put back would be a removed member's, which etcd refuses to start, and a new entry a voter down; restore with force only to mend membership by hand",
            r.id,
            old.as_deref().unwrap_or("(its old id)")
        ),
    ))
}

/// Puts the quarantine of remediation `id` (or of its quarantine's name) back into the
/// pod's data dir as it is now, refusing while any process holds the data. What is put back
/// and from where comes from the journal; the volume is only checked to hold it. Answers
/// the remediation as journaled afterwards, and what was done. Once the remediation changed
/// membership, only `force` puts the data back (see [`membership_gate`]).
pub async fn restore(locator: &Locator, state_dir: &Path, id: &str, force: bool, failpoint: &Failpoint) -> Result<(Remediation, String)> {
    let id = id.rsplit('-').next().unwrap_or(id);
    let mut r = crate::journal::read(state_dir, id)?;
    let q =
        r.quarantine.clone().ok_or_else(|| Error::invalid(format!("remediation {id} moved nothing: there is no quarantine to restore")))?;
    match q.state {
        QuarantineState::Restored => return Ok((r, format!("quarantine {} was restored already", q.name))),
        QuarantineState::Pruned => return Err(Error::invalid(format!("quarantine {} was removed by retention", q.name))),
        _ => {}
    }
    membership_gate(&r, force)?;
    let located = locator.open(&r.namespace, &r.pod, None, false).await?;
    let (vol, data, proc_root) = (located.volume.clone(), located.data.clone(), locator.layout.proc_root.clone());
    let (name, items) = (q.name.clone(), q.items.clone());
    let failpoint = failpoint.clone();
    let back = blocking(move || {
        // Test hook: the volume stops answering (a hung filesystem) in the middle.
        failpoint.hold("in:Restore");
        let locks = vol.lock(&vol.etcd_lock_files(&data)?)?;
        guard::no_holders(&proc_root, &vol, &data)?;
        let back = quarantine::restore(&vol, &name, &data, &items)?;
        drop(locks);
        Ok(back)
    })
    .await?;
    if let Some(q) = r.quarantine.as_mut() {
        q.state = QuarantineState::Restored;
    }
    crate::journal::write(state_dir, &r)?;
    let said = format!("restored {} into {}", back.join(", "), located.plan.host_path.display());
    Ok((r, said))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A remediation whose steps ended as `steps` say (`Done`, a code, or "" for one cut short).
    fn ran(steps: &[(&str, &str)]) -> Remediation {
        let steps: Vec<_> =
            steps.iter().map(|(name, outcome)| serde_json::json!({"name": name, "start": "", "outcome": (!outcome.is_empty()).then_some(outcome), "message": ""})).collect();
        serde_json::from_value(serde_json::json!({
            "id": "r1", "namespace": "apisix", "pod": "apisix-etcd-0", "podUID": null, "node": "n1", "phase": "Succeeded",
            "step": null, "plan": null, "quarantinePath": null, "steps": steps, "error": null, "createdAt": "", "finishedAt": null
        }))
        .unwrap()
    }

    #[test]
    fn data_of_a_member_removed_and_added_again_goes_back_only_with_force() {
        let quarantined = ran(&[("Check", "Done"), ("Quarantine", "Done")]);
        assert!(membership_gate(&quarantined, false).is_ok(), "membership untouched: the old member is still the cluster's");
        // A step that failed, or was cut short, may have removed the member already.
        for cut in [ran(&[("Quarantine", "Done"), ("Membership", "QuorumAtRisk")]), ran(&[("Quarantine", "Done"), ("Membership", "")])] {
            assert_eq!(membership_gate(&cut, false).unwrap_err().code, Code::QuorumAtRisk);
        }
        let healed = ran(&[("Quarantine", "Done"), ("Membership", "Done"), ("Verify", "Done")]);
        assert_eq!(membership_gate(&healed, false).unwrap_err().code, Code::QuorumAtRisk);
        assert!(membership_gate(&healed, true).is_ok());
    }
}
