//! Who carries out the open records: a bounded pool, fair between namespaces.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use kube::ResourceExt;

use super::{Ctx, decision, dispatch};
use etcd_medic_client::crd::EtcdRemediation;

/// Records carried out at once by this replica, and at most this many of one namespace: a
/// tenant's thousand records wait their turn, and never delay another namespace's.
pub const WORKERS: usize = 32;
pub const WORKERS_PER_NAMESPACE: usize = 4;

/// Starts carrying out the EtcdRemediations that have not ended, and the restores asked of
/// ones that have, unless a task of this replica is already at it: within [`WORKERS`], and
/// [`WORKERS_PER_NAMESPACE`] per namespace, the least served namespaces first, each
/// namespace's oldest records first. The rest wait for a worker to end (each end is a look).
pub(super) fn reconcile(ctx: &Arc<Ctx>) {
    let refused = |r: &EtcdRemediation| decision(r) == Some("refused");
    let mut work: Vec<(EtcdRemediation, bool)> = ctx
        .rems
        .lock()
        .unwrap()
        .values()
        .filter(|r| r.metadata.deletion_timestamp.is_none())
        .filter_map(|r| {
            let open = !refused(r) && !dispatch::is_final(r.status.as_ref());
            (open || dispatch::wants_restore(r)).then(|| (r.clone(), open))
        })
        .collect();
    work.sort_by(|(a, _), (b, _)| {
        a.metadata.creation_timestamp.cmp(&b.metadata.creation_timestamp).then_with(|| a.name_any().cmp(&b.name_any()))
    });
    let mut busy = ctx.busy.lock().unwrap();
    let mut per_ns: HashMap<String, usize> = HashMap::new();
    for (ns, _) in busy.iter() {
        *per_ns.entry(ns.clone()).or_default() += 1;
    }
    for (r, open) in pick_fairly(work, &busy, &mut per_ns, WORKERS.saturating_sub(busy.len())) {
        busy.insert((r.namespace().unwrap_or_default(), r.name_any()));
        if open {
            tokio::spawn(dispatch::carry_out(ctx.clone(), r));
        } else {
            tokio::spawn(dispatch::restore(ctx.clone(), r));
        }
    }
}

/// Up to `room` of `work` (oldest first) not in `busy`: round by round, one more per
/// namespace, the namespaces with the fewest at work first, none above its share. Pure.
fn pick_fairly<T: kube::Resource>(
    work: Vec<(T, bool)>,
    busy: &HashSet<(String, String)>,
    per_ns: &mut HashMap<String, usize>,
    mut room: usize,
) -> Vec<(T, bool)> {
    let mut queues: std::collections::BTreeMap<String, std::collections::VecDeque<(T, bool)>> = Default::default();
    for (r, open) in work {
        let key = (r.meta().namespace.clone().unwrap_or_default(), r.meta().name.clone().unwrap_or_default());
        if !busy.contains(&key) {
            queues.entry(key.0).or_default().push_back((r, open));
        }
    }
    let mut picked = Vec::new();
    while room > 0 {
        let next = queues
            .iter()
            .filter(|(ns, q)| !q.is_empty() && per_ns.get(*ns).copied().unwrap_or(0) < WORKERS_PER_NAMESPACE)
            .min_by_key(|(ns, _)| per_ns.get(*ns).copied().unwrap_or(0))
            .map(|(ns, _)| ns.clone());
        let Some(ns) = next else { break };
        let item = queues.get_mut(&ns).and_then(|q| q.pop_front()).expect("a non-empty queue");
        *per_ns.entry(ns).or_default() += 1;
        picked.push(item);
        room -= 1;
    }
    picked
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(ns: &str, name: &str) -> (EtcdRemediation, bool) {
        let mut r = EtcdRemediation::new(name, Default::default());
        r.metadata.namespace = Some(ns.into());
        (r, true)
    }

    #[test]
    fn a_tenants_thousand_records_never_delay_another_namespace() {
        let mut work: Vec<_> = (0..1000).map(|i| rec("tenant", &format!("r{i:04}"))).collect();
        work.push(rec("apisix", "heal"));
        let mut per_ns = HashMap::new();
        let picked = pick_fairly(work, &HashSet::new(), &mut per_ns, WORKERS);
        let names: Vec<String> = picked.iter().map(|(r, _)| format!("{}/{}", r.namespace().unwrap(), r.name_any())).collect();
        assert_eq!(names.len(), WORKERS_PER_NAMESPACE + 1, "{names:?}");
        assert!(names.contains(&"apisix/heal".to_string()));
        assert_eq!(names[0..2], ["apisix/heal", "tenant/r0000"], "the least served namespace first, the oldest of each");
        // With the tenant at its share already, only others are started.
        let again = pick_fairly(vec![rec("tenant", "r9"), rec("b", "x")], &HashSet::new(), &mut per_ns, WORKERS);
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].0.namespace().as_deref(), Some("b"));
        // Busy ones are never started twice, and room bounds the total.
        let busy: HashSet<(String, String)> = [("c".to_string(), "1".to_string())].into();
        let picked = pick_fairly(vec![rec("c", "1"), rec("c", "2"), rec("d", "1")], &busy, &mut HashMap::new(), 1);
        assert_eq!(picked.len(), 1);
        assert_ne!((picked[0].0.namespace(), picked[0].0.name_any()), (Some("c".to_string()), "1".to_string()));
    }
}
