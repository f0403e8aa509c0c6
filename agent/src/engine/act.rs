//! The steps that change something: Quarantine, Membership, Restart; and Retention.

use std::path::Path;
use std::sync::Arc;

use super::check::Checked;
use super::{Engine, QuarantineRecord, Remediation, Step};
use crate::error::{Code, Result};
use crate::host::processes as guard;
use crate::host::volume::Volume;
use crate::kubeapi::Deleted;
use crate::locate::{Plan, blocking};
use crate::profile::Profile;
use crate::quarantine;
use etcd_medic_core::contract::QuarantineState;
use etcd_medic_core::member::{Add, plain_add};
use etcd_medic_core::resume::Halt;

/// The dot-file that keeps the Bitnami image from ever seeing an empty data dir.
pub const KEEP_FILE: &str = ".etcd-medic-keep";

const KEEP_TEXT: &[u8] = b"kept by etcd-medic so that data/ never looks empty to the start script\n";

impl Engine<'_> {
    /// Step Quarantine: names the quarantine in the journal, then moves the member's files.
    pub(super) async fn quarantine(&self, r: &mut Remediation, c: &Checked) -> std::result::Result<(), Halt> {
        let plan = &c.plan;
        if r.quarantine.is_none() {
            // Named and journaled before anything moves: a resume, a restore and retention
            // find it by this record, never by what is on the volume.
            let member_id = match c.stale {
                Some(i) => Some(format!("{i:x}")),
                None => stored_member_id(&c.vol, &c.data).await,
            };
            r.quarantine = Some(QuarantineRecord {
                name: quarantine::dir_name(&jiff::Timestamp::now(), &r.id),
                items: plan.r#move.iter().map(|m| m.path.clone()).collect(),
                member_id,
                state: QuarantineState::Moving,
            });
        }
        let record = r.quarantine.clone().expect("set above");
        let (vol, data, proc_root) = (c.vol.clone(), c.data.clone(), self.locator.layout.proc_root.clone());
        let (id, ns, pod, uid, profile) = (r.id.clone(), plan.namespace.clone(), plan.pod.clone(), plan.pod_uid.clone(), plan.profile);
        let failpoint = self.opts.failpoint.clone();
        let sizes: Vec<(String, u64)> =
            record.items.iter().map(|i| (i.clone(), plan.r#move.iter().find(|m| &m.path == i).map_or(0, |m| m.bytes))).collect();
        let dir = vol.shown(&quarantine::rel_dir(&record.name));
        self.step(
            r,
            Step::Quarantine,
            true,
            blocking(move || {
                if profile == Profile::BitnamiMemberId {
                    // Before anything moves: the crash-looping container restarts on its own, and
                    // the image empties data/ before its single `member add`; this dot-file keeps
                    // data/ from ever looking empty, so a failed add is retried on the next start
                    // instead of bootstrapping a new cluster (FIELD-NOTES.md).
                    vol.write_file(&data.join(KEEP_FILE), KEEP_TEXT)?;
                }
                // etcd's own locks first, then the process scan: an etcd that starts from here on
                // cannot open the data, and one that runs already holds a lock or shows in /proc.
                let locks = vol.lock(&vol.etcd_lock_files(&data)?)?;
                guard::no_holders(&proc_root, &vol, &data)?;
                let req = quarantine::Request {
                    id: &id,
                    name: &record.name,
                    namespace: &ns,
                    pod: &pod,
                    pod_uid: &uid,
                    member_id: record.member_id.as_deref(),
                    profile: profile.as_str(),
                    data: &data,
                    items: &sizes,
                    failpoint: &failpoint,
                };
                let m = quarantine::quarantine(&vol, &req, jiff::Timestamp::now())?;
                let held = locks.count();
                drop(locks);
                let moved = m.items.iter().filter(|i| i.present).map(|i| i.path.as_str()).collect::<Vec<_>>().join(", ");
                let into = vol.shown(&quarantine::rel_dir(&record.name));
                Ok(((), format!("moved {moved} into {} ({held} of etcd's locks held through the moves)", into.display())))
            }),
        )
        .await?;
        if let Some(q) = r.quarantine.as_mut() {
            q.state = QuarantineState::Quarantined;
        }
        r.quarantine_path = Some(dir);
        Ok(())
    }

    /// Step Membership: the stale entry goes; a plain set's member is added back (a learner
    /// where the cluster has learners), a Bitnami image re-adds itself.
    pub(super) async fn membership(&self, c: &Checked) -> Result<((), String)> {
        let etcd = &self.opts.etcd;
        let mut done = Vec::new();
        if let Some(id) = c.stale {
            etcd.remove_member(&c.target, id).await?;
            done.push(format!("removed stale member {id:x}"));
        }
        match c.plan.profile {
            Profile::BitnamiMemberId => {
                done.push(format!("data/{KEEP_FILE} keeps data/ non-empty; the image re-adds the member"));
            }
            Profile::Bitnami => done.push("data/ is left empty: the image removes any entry with its peer URL and re-adds itself".into()),
            Profile::Plain => {
                let (_, members) = etcd.members(&c.target).await?;
                match plain_add(&members, &c.peer_url, c.stale)? {
                    Add::Already(id) => done.push(format!("{} is already member {id:x}", c.member_name)),
                    Add::Add => {
                        let learner = etcd.supports_learners(&c.target).await?;
                        let id = etcd.add_member(&c.target, &c.peer_url, learner).await?;
                        let what = if learner { "learner" } else { "voting member" };
                        done.push(format!("added {} as {what} {id:x}", c.member_name));
                    }
                }
            }
        }
        if c.stale.is_some() {
            tokio::time::sleep(self.opts.settle).await;
        }
        // Test hook: the changes made, the step not yet journaled as done.
        self.opts.failpoint.hold("in:Membership");
        Ok(((), done.join("; ")))
    }

    /// Step Restart: deletes this instance of the pod (by UID) so its StatefulSet starts it
    /// afresh on the emptied data dir.
    pub(super) async fn restart(&self, plan: &Plan, resumed: bool) -> Result<((), String)> {
        let deleted = self.locator.api.delete_pod(&plan.namespace, &plan.pod, &plan.pod_uid).await;
        self.opts.failpoint.hold("in:Restart");
        let who = format!("pod {}/{}", plan.namespace, plan.pod);
        match deleted {
            Ok(Deleted::Now) => Ok(((), format!("deleted {who} (uid {})", plan.pod_uid))),
            Ok(Deleted::Earlier(why)) => Ok(((), format!("{who} (uid {}) deleted: {why}", plan.pod_uid))),
            // Resumed after the delete went through: the pod was already replaced.
            Err(e) if resumed && matches!(e.code, Code::PodUIDMismatch | Code::PodNotFound) => {
                Ok(((), format!("{who} was already replaced")))
            }
            Err(e) => Err(e),
        }
    }

    /// Retention: this pod's quarantines as its journals recorded them, oldest first; those
    /// `to_prune` picks are removed, each only if it is, on the volume, a real directory
    /// named exactly as recorded. Names on the volume are never taken from the volume.
    pub(super) async fn prune(&self, ns: &str, pod: &str, id: &str) -> Result<((), String)> {
        let located = self.locator.open(ns, pod, None, false).await?;
        let state_dir = self.opts.state_dir.clone();
        let keep = self.opts.keep_quarantines;
        let (ns, pod, id) = (ns.to_string(), pod.to_string(), id.to_string());
        blocking(move || {
            let mut mine: Vec<Remediation> = crate::journal::list_where(&state_dir, |j| {
                j.namespace == ns
                    && j.pod == pod
                    && j.quarantine.as_ref().is_some_and(|q| q.state == QuarantineState::Quarantined || j.id == id)
            });
            mine.sort_by(|a, b| a.quarantine.as_ref().map(|q| &q.name).cmp(&b.quarantine.as_ref().map(|q| &q.name)));
            let names: Vec<String> = mine.iter().filter_map(|j| j.quarantine.as_ref().map(|q| q.name.clone())).collect();
            let Some(succeeded) = mine.iter().find(|j| j.id == id).and_then(|j| j.quarantine.as_ref()).map(|q| q.name.clone()) else {
                return Ok(((), "no quarantine recorded; nothing to prune".into()));
            };
            let gone = quarantine::to_prune(&names, &succeeded, keep);
            let vol = &located.volume;
            let mut pruned = 0;
            for mut j in mine.into_iter().filter(|j| j.quarantine.as_ref().is_some_and(|q| gone.contains(&q.name))) {
                let name = j.quarantine.as_ref().map(|q| q.name.clone()).unwrap_or_default();
                match quarantine::check_exists(vol, &name) {
                    Ok(()) => {
                        vol.remove_tree(&quarantine::rel_dir(&name), crate::host::volume::Limits::default())?;
                        pruned += 1;
                    }
                    // Gone already (a person removed it): the record says so from now on.
                    Err(e) if e.code == Code::DataDirNotFound => {}
                    Err(e) => return Err(e),
                }
                if let Some(q) = j.quarantine.as_mut() {
                    q.state = QuarantineState::Pruned;
                }
                crate::journal::write(&state_dir, &j)?;
            }
            Ok(((), format!("kept {} quarantine(s), pruned {pruned}", names.len() - gone.len())))
        })
        .await
    }
}

/// The member id the image stored in `data/member_id`, if it is one (1-16 hex digits in a
/// small regular file); anything else is ignored with the reason, never copied anywhere.
pub(super) fn member_id_on(vol: &Volume, data: &Path) -> Option<u64> {
    let file = data.join("member_id");
    let bytes = vol.read_small(&file, 64).unwrap_or_else(|e| {
        tracing::warn!(code = %e.code, "ignoring {}: {}", file.display(), e.message);
        None
    })?;
    etcd_medic_core::member::parse_member_id(&bytes).map_err(|why| tracing::warn!("ignoring {}: {why}", file.display())).ok()
}

async fn stored_member_id(vol: &Arc<Volume>, data: &Path) -> Option<String> {
    let (vol, data) = (vol.clone(), data.to_path_buf());
    blocking(move || Ok(member_id_on(&vol, &data))).await.ok().flatten().map(|id| format!("{id:x}"))
}
