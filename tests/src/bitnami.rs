//! The Bitnami etcd image's start-up decisions, as FIELD-NOTES.md records them: chart 9.7.3
//! (image 3.5.x, `member_id`) and charts 11/12 (no `member_id`; a removed member wipes and
//! re-adds itself). The decisions are pure; the simulator carries out their effects with
//! real etcd.

use std::path::Path;

/// What the setup script looks at on the volume before it decides.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VolumeFacts {
    /// `data/` has no entry at all, dot-files included (the image checks with `ls -A`).
    pub data_empty: bool,
    /// What `data/member_id` holds (trimmed; empty when the image wrote an empty id), if
    /// the file exists.
    pub member_id: Option<String>,
    /// `data/member/snap` exists.
    pub has_snap: bool,
    /// `member_removal.log` (volume root) holds `Member <member_id> removed from cluster …`.
    pub removal_logged: bool,
}

impl VolumeFacts {
    pub fn read(volume: &Path, data_subdir: &str) -> Self {
        let data = volume.join(data_subdir);
        let data_empty = std::fs::read_dir(&data).map(|mut d| d.next().is_none()).unwrap_or(true);
        let member_id = std::fs::read_to_string(data.join("member_id")).ok().map(|s| s.trim().to_string());
        let has_snap = data.join("member/snap").is_dir();
        let log = std::fs::read_to_string(volume.join("member_removal.log")).unwrap_or_default();
        let removal_logged = member_id.as_ref().is_some_and(|id| !id.is_empty() && removal_logged(&log, id));
        VolumeFacts { data_empty, member_id, has_snap, removal_logged }
    }
}

/// `Member <id> removed from cluster <cluster>` for this id, as etcdctl prints it.
pub fn removal_logged(log: &str, id: &str) -> bool {
    log.lines().any(|l| l.trim().starts_with(&format!("Member {id} removed from cluster")))
}

/// What the script does on this start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Empty data dir and `ETCD_INITIAL_CLUSTER_STATE=new`: bootstrap a new cluster.
    Bootstrap,
    /// Empty data dir, state `existing`: `member add`, then start with `existing`.
    AddAsNew,
    /// The member "was removed": `rm -rf data/*` (dot-files stay), one `member add`, start
    /// with `existing`, store the new id.
    ReAdd,
    /// Data present and an id stored: `member update <id> --peer-urls=…`, then start.
    Update(String),
    /// Data present, no id stored, snap present: nothing to update, start on the data.
    StartOnData,
    /// The other members did not answer: "Cluster not responding!", start on the data as is
    /// (disaster recovery is off in the chart's defaults).
    StartUnchecked,
}

/// The decision of the setup script. `cluster_size` is the number of members in
/// `ETCD_INITIAL_CLUSTER`; `cluster_healthy` the script's health check of the others.
pub fn decide(facts: &VolumeFacts, cluster_size: usize, initial_state_new: bool, cluster_healthy: bool) -> Decision {
    if facts.data_empty {
        return if initial_state_new { Decision::Bootstrap } else { Decision::AddAsNew };
    }
    if cluster_size <= 1 {
        return Decision::StartOnData;
    }
    if !cluster_healthy {
        return Decision::StartUnchecked;
    }
    let was_removed = facts.removal_logged || (!facts.has_snap && facts.member_id.is_none());
    if was_removed {
        return Decision::ReAdd;
    }
    match &facts.member_id {
        Some(id) => Decision::Update(id.clone()),
        None => Decision::StartOnData,
    }
}

/// What the chart 11/12 script does on this start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision11 {
    /// One member: start on the data.
    StartOnData,
    /// Empty data dir and a registered member's client URL does not answer
    /// (`endpoint status --cluster` fails): a new cluster.
    Bootstrap,
    /// Empty data dir, every registered member answers: remove an entry with this peer URL,
    /// `member add` (never as a learner), write `new_member_envs`, start with `existing`.
    AddAsNew,
    /// Data present, the others healthy: start etcd and watch its log; "permanently
    /// removed" or an id mismatch wipes the whole data dir and goes to `AddAsNew`.
    StartWatching,
    /// Data present, the others unhealthy: start etcd as it is.
    StartUnchecked,
}

/// The chart 11/12 decision. `registered_answer`: every registered member's client URL
/// answers; `cluster_healthy`: enough of the others pass a health check.
pub fn decide_11(data_empty: bool, cluster_size: usize, registered_answer: bool, cluster_healthy: bool) -> Decision11 {
    match (cluster_size <= 1, data_empty) {
        (true, _) => Decision11::StartOnData,
        (false, true) if registered_answer => Decision11::AddAsNew,
        (false, true) => Decision11::Bootstrap,
        (false, false) if cluster_healthy => Decision11::StartWatching,
        (false, false) => Decision11::StartUnchecked,
    }
}

/// The lines the chart 11/12 script's log watch acts on: the member was removed, or its
/// peers serve another cluster.
pub fn removed_in_log(log: &str) -> bool {
    log.contains("permanently removed") || log.contains("ID mismatch")
}

/// The script's `is_healthy_etcd_cluster`: enough of the *other* members answer a health
/// check. It counts the others against half the cluster, rounded up.
pub fn cluster_healthy(others_healthy: usize, cluster_size: usize) -> bool {
    others_healthy >= cluster_size.div_ceil(2)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(empty: bool, id: Option<&str>, snap: bool, logged: bool) -> VolumeFacts {
        VolumeFacts { data_empty: empty, member_id: id.map(String::from), has_snap: snap, removal_logged: logged }
    }

    #[test]
    fn stale_id_with_data_goes_to_update_the_seed_failure() {
        assert_eq!(decide(&facts(false, Some("abc"), true, false), 3, true, true), Decision::Update("abc".into()));
    }

    #[test]
    fn deleting_snap_and_wal_alone_still_updates_while_member_id_stays() {
        assert_eq!(decide(&facts(false, Some("abc"), false, false), 3, true, true), Decision::Update("abc".into()));
    }

    #[test]
    fn no_id_and_no_snap_means_removed() {
        assert_eq!(decide(&facts(false, None, false, false), 3, true, true), Decision::ReAdd);
    }

    #[test]
    fn an_empty_member_id_file_still_goes_to_update() {
        // The script tests the file, not its content: `member update ""` fails in etcdctl.
        assert_eq!(decide(&facts(false, Some(""), true, false), 3, true, true), Decision::Update(String::new()));
    }

    #[test]
    fn removal_log_means_removed() {
        assert_eq!(decide(&facts(false, Some("abc"), true, true), 3, true, true), Decision::ReAdd);
    }

    #[test]
    fn empty_data_bootstraps_on_a_release_only_ever_installed() {
        assert_eq!(decide(&facts(true, None, false, false), 3, true, true), Decision::Bootstrap);
        assert_eq!(decide(&facts(true, None, false, false), 3, false, true), Decision::AddAsNew);
    }

    #[test]
    fn unhealthy_cluster_starts_unchecked() {
        assert_eq!(decide(&facts(false, Some("abc"), true, false), 3, true, false), Decision::StartUnchecked);
    }

    #[test]
    fn chart_11_decides_by_data_and_by_who_answers() {
        assert_eq!(decide_11(true, 3, true, true), Decision11::AddAsNew);
        assert_eq!(decide_11(true, 3, false, true), Decision11::Bootstrap, "a registered member that does not answer means new");
        assert_eq!(decide_11(false, 3, true, true), Decision11::StartWatching);
        assert_eq!(decide_11(false, 3, true, false), Decision11::StartUnchecked);
        assert_eq!(decide_11(true, 1, false, false), Decision11::StartOnData);
        assert!(removed_in_log("{\"msg\":\"server error\",\"error\":\"the member has been permanently removed from the cluster\"}"));
        assert!(!removed_in_log("established TCP streaming connection with remote peer"));
    }

    #[test]
    fn health_counts_the_others() {
        assert!(cluster_healthy(2, 3));
        assert!(!cluster_healthy(1, 3));
        assert!(cluster_healthy(3, 5));
        assert!(!cluster_healthy(2, 5));
    }

    #[test]
    fn removal_log_matches_the_stored_id_only() {
        let log = "Member 8e9e05c52164694d removed from cluster cdf818194e3a8c32\n";
        assert!(removal_logged(log, "8e9e05c52164694d"));
        assert!(!removal_logged(log, "1234"));
    }

    #[test]
    fn facts_count_dot_files_as_content() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("data")).unwrap();
        assert!(VolumeFacts::read(dir.path(), "data").data_empty);
        std::fs::write(dir.path().join("data/.keep"), "").unwrap();
        assert!(!VolumeFacts::read(dir.path(), "data").data_empty);
    }
}
