//! Step Verify, and the evidence that an unfinished remediation reached its goal already.

use std::time::Instant;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::{WatchStreamExt, watcher};

use super::check::Checked;
use super::{Engine, Remediation, Step};
use crate::error::{Code, Error, Result};
use crate::lease::Kept;
use crate::locate::{blocking, container};
use crate::profile::Profile;
use etcd_medic_core::member::rejoined;
use etcd_medic_core::verify::{PodSeen, Verdict, Verifier, poll_interval};

impl Engine<'_> {
    pub(super) async fn verify(&self, c: &Checked, lock: &Kept) -> Result<((), String)> {
        let deadline = Instant::now() + self.opts.verify_timeout;
        let started = Instant::now();
        let old_uid = Some(c.plan.pod_uid.clone());
        let mut verifier = Verifier::new(c.plan.profile, &c.peer_url, c.stale);
        let mut seen = String::from("nothing yet");
        let mut cleaned = String::new();
        // The pod's changes wake the next look at once (its Ready turning True is usually the
        // last thing to come); the poll stays for etcd's side and for an API server that
        // refuses the watch.
        let pods: kube::Api<Pod> = kube::Api::namespaced(self.locator.api.client().clone(), &c.plan.namespace);
        let mut changes =
            Some(watcher(pods, watcher::Config::default().fields(&format!("metadata.name={}", c.plan.pod))).default_backoff().boxed());
        while Instant::now() < deadline {
            if self.stopping() {
                return Err(Error::new(Code::NotReady, format!("the agent is shutting down; verification resumes on restart ({seen})")));
            }
            // A lease lost while waiting fails the remediation: another agent may act now.
            lock.check().map_err(|e| Error::new(e.code, format!("{} (while verifying: {seen})", e.message)))?;
            let members = match self.opts.etcd.members(&c.target).await {
                Ok((_, members)) => members,
                // Another cluster answers at the set's pods: nothing more is asked of it.
                Err(e) if e.code == Code::ForeignMember => return Err(e),
                Err(_) => Vec::new(),
            };
            let pod = self.locator.api.pod(&c.plan.namespace, &c.plan.pod).await.ok().map(|p| PodSeen {
                replaced: p.metadata.uid != old_uid,
                ready: pod_ready(&p),
                running: container_running(&p, &c.plan.container),
            });
            match verifier.observe(&members, pod, Instant::now()) {
                Verdict::Rejoined { message, .. } => return Ok(((), format!("{message}{cleaned}"))),
                Verdict::Promote(id) => match self.opts.etcd.promote_member(&c.target, id).await {
                    Ok(true) => {
                        verifier.promoted(id);
                        continue;
                    }
                    Ok(false) => seen = format!("learner {id:x} started, catching up before its promotion"),
                    Err(e) => seen = e.message,
                },
                Verdict::RemoveOrphan(id) => {
                    cleaned = match self.opts.etcd.remove_member(&c.target, id).await {
                        Ok(()) => {
                            tracing::warn!("removed member {id:x}: added by an interrupted start of the image, never started");
                            format!("; removed unstarted member {id:x} left by an interrupted `member add`")
                        }
                        Err(e) => format!("; unstarted member {id:x} left by an interrupted `member add`: {}", e.message),
                    };
                    verifier.orphan_handled();
                }
                Verdict::Wait(s) => seen = s,
            }
            let pause = tokio::time::sleep(poll_interval(started.elapsed()));
            match changes.as_mut() {
                Some(stream) => tokio::select! {
                    _ = pause => {}
                    change = stream.next() => match change {
                        // Changes that come together are one look.
                        Some(Ok(_)) => tokio::time::sleep(std::time::Duration::from_millis(2)).await,
                        Some(Err(e)) => tracing::debug!("the pod's watch failed: {e}; polling"),
                        None => changes = None,
                    },
                },
                None => pause.await,
            }
        }
        Err(Error::new(Code::NotReady, format!("the member did not rejoin within {:?}: {seen}{cleaned}", self.opts.verify_timeout)))
    }

    /// Whether an unfinished remediation already reached its goal, from evidence: it had
    /// restarted the pod, the pod was replaced since, and etcd wrote new member data on the
    /// volume after the quarantine (a WAL, or a `member_id` other than the stale one) or the
    /// member list shows the member started under a new id. `None`: resume it.
    pub(super) async fn reached_goal(&self, r: &Remediation) -> Option<String> {
        let plan = r.plan.as_ref().filter(|_| r.step_done(Step::Restart))?;
        let pod = self.locator.api.pod(&plan.namespace, &plan.pod).await.ok()?;
        if pod.metadata.uid.as_deref() == Some(plan.pod_uid.as_str()) {
            return None;
        }
        let stale = r.recorded_member_id();
        // The volume speaks for the Bitnami image, which starts etcd only once its member was
        // added as a voter; a plain set's member comes back as the agent's learner, so only
        // the member list (started and voting) speaks for it.
        if plan.profile != Profile::Plain
            && let Ok(located) = self.locator.open(&plan.namespace, &plan.pod, None, false).await
        {
            let (vol, data) = (located.volume.clone(), located.data.clone());
            let found = blocking(move || {
                let wal = data.join("member/wal");
                let new_wal = vol.entry(&wal)?.is_some_and(|e| e.kind == crate::host::volume::Kind::Dir)
                    && vol
                        .list(&wal, 10_000)?
                        .iter()
                        .any(|(n, k)| *k == crate::host::volume::Kind::File && n.to_string_lossy().ends_with(".wal"));
                Ok((new_wal, super::act::member_id_on(&vol, &data)))
            })
            .await;
            match found {
                Ok((true, _)) => return Some("etcd wrote a new WAL on the volume since the quarantine".into()),
                Ok((_, Some(id))) if Some(id) != stale => {
                    return Some(format!("the volume holds member id {id:x}, not the stale one, since the quarantine"));
                }
                _ => {}
            }
        }
        let (_, flags) = container::start_flags(&pod, &plan.container, &plan.pod)?;
        let target = self.target_of(r, &pod).await.ok()?;
        let (_, members) = self.opts.etcd.members(&target).await.ok()?;
        rejoined(&members, &flags.peer_url?, stale)
            .filter(|m| !m.is_learner)
            .map(|m| format!("member {:x} started and voting with the pod's peer URL after the restart", m.id))
    }

    /// The pod of `r`, as it is now, is failing: its etcd container crash-loops or its last
    /// run failed, and it is not running (or the pod cannot be read: let the checks say why).
    pub(super) async fn fails_now(&self, r: &Remediation) -> bool {
        let Some(plan) = r.plan.as_ref() else { return true };
        match self.locator.api.pod(&plan.namespace, &plan.pod).await {
            Ok(pod) => matches!(super::gates::pod_failure(&pod, &plan.container, false), Ok(Some(_))),
            Err(_) => true,
        }
    }
}

fn pod_ready(p: &Pod) -> bool {
    p.status.as_ref().and_then(|s| s.conditions.as_ref()).is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The etcd container of `pod` runs now.
fn container_running(pod: &Pod, container: &str) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.name == container))
        .is_some_and(|c| c.state.as_ref().is_some_and(|s| s.running.is_some()))
}
