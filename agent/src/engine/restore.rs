//! Restore: puts a quarantine back, for a person who wants the old data after all.

use std::path::Path;

use crate::error::{Error, Result};
use crate::failpoint::Failpoint;
use crate::host::processes as guard;
use crate::locate::{Locator, blocking};
use crate::quarantine;
use etcd_medic_core::contract::{QuarantineState, Remediation};

/// Puts the quarantine of remediation `id` (or of its quarantine's name) back into the
/// pod's data dir as it is now, refusing while any process holds the data. What is put back
/// and from where comes from the journal; the volume is only checked to hold it. Answers
/// the remediation as journaled afterwards, and what was done.
pub async fn restore(locator: &Locator, state_dir: &Path, id: &str, failpoint: &Failpoint) -> Result<(Remediation, String)> {
    let id = id.rsplit('-').next().unwrap_or(id);
    let mut r = crate::journal::read(state_dir, id)?;
    let q =
        r.quarantine.clone().ok_or_else(|| Error::invalid(format!("remediation {id} moved nothing: there is no quarantine to restore")))?;
    match q.state {
        QuarantineState::Restored => return Ok((r, format!("quarantine {} was restored already", q.name))),
        QuarantineState::Pruned => return Err(Error::invalid(format!("quarantine {} was removed by retention", q.name))),
        _ => {}
    }
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
