//! Quarantine names and retention: which of a member's quarantines may go. Pure.

/// `<timestamp>-<id>`: sorts by time, names the remediation.
pub fn dir_name(created_at: &jiff::Timestamp, id: &str) -> String {
    format!("{}-{id}", created_at.strftime("%Y%m%dT%H%M%SZ"))
}

/// A quarantine name exactly as [`dir_name`] makes it for remediation `id`.
pub fn is_dir_name(name: &str, id: &str) -> bool {
    let Some(ts) = name.strip_suffix(id).and_then(|s| s.strip_suffix('-')) else { return false };
    let b = ts.as_bytes();
    b.len() == 16 && b[8] == b'T' && b[15] == b'Z' && b.iter().enumerate().all(|(i, c)| i == 8 || i == 15 || c.is_ascii_digit())
}

/// Which of a member's quarantines (oldest first, as the journal names them) retention
/// removes: keeps the newest `keep`, never the newest one, and only those older than the
/// quarantine `succeeded` of a later remediation that succeeded. Pure.
pub fn to_prune(all: &[String], succeeded: &str, keep: usize) -> Vec<String> {
    let Some(pos) = all.iter().position(|n| n == succeeded) else { return Vec::new() };
    let keep = keep.max(1);
    let cut = all.len().saturating_sub(keep);
    all[..pos.min(cut)].to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_exactly_what_dir_name_makes() {
        let name = dir_name(&"2026-12-03T21:19:56Z".parse().unwrap(), "r1");
        assert_eq!(name, "20261203T211956Z-r1");
        assert!(is_dir_name(&name, "r1") && !is_dir_name(&name, "r2") && !is_dir_name("x-r1", "r1"));
        assert!(!is_dir_name("20261203T21195xZ-r1", "r1") && !is_dir_name("../20261203T211956Z-r1", "r1"));
    }

    #[test]
    fn retention_keeps_the_newest_and_prunes_only_before_a_success() {
        let all: Vec<String> = ["a", "b", "c", "d", "e"].iter().map(|s| s.to_string()).collect();
        assert_eq!(to_prune(&all, "e", 3), vec!["a", "b"]);
        assert_eq!(to_prune(&all, "c", 3), vec!["a", "b"]);
        assert_eq!(to_prune(&all, "b", 1), vec!["a"]);
        assert!(to_prune(&all, "zzz", 1).is_empty(), "no success, nothing pruned");
        assert_eq!(to_prune(&all, "e", 0).len(), 4, "the newest always stays");
    }
}
