//! Finding the kubelet's root dir: given, read from the kubelet's command line, or the
//! first distribution default that holds the pod.

use std::path::{Path, PathBuf};

use super::volume::under_host_root;
use crate::error::{Code, Error, Result};

/// Where distributions put the kubelet root (FIELD-NOTES.md), most common first.
pub const DISTRIBUTION_ROOTS: &[&str] = &[
    "/var/lib/kubelet",                          // kubeadm, k3s, AKS, EKS, GKE, kind
    "/var/snap/microk8s/common/var/lib/kubelet", // microk8s
    "/var/lib/k0s/kubelet",                      // k0s
    "/opt/rke/var/lib/kubelet",                  // RKE1
    "/var/vcap/data/kubelet",                    // TKGI
];

/// `--root-dir=X` or `--root-dir X` in a kubelet command line.
pub fn root_dir_from_cmdline(args: &[String]) -> Option<String> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if let Some(v) = a.strip_prefix("--root-dir=") {
            return Some(v.to_string());
        }
        if a == "--root-dir" {
            return it.next().cloned();
        }
    }
    None
}

/// The `--root-dir` of a running kubelet, read from `<proc>/<pid>/cmdline` (the host's
/// `/proc` when the agent runs with `hostPID`). Only a process in the host's root (the
/// same root as pid 1) counts: a container naming itself `kubelet` does not.
pub fn from_processes(proc_root: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let root_id = |pid: &str| std::fs::metadata(proc_root.join(pid).join("root")).ok().map(|m| (m.dev(), m.ino()));
    let host_root = root_id("1");
    let entries = std::fs::read_dir(proc_root).ok()?;
    for e in entries.flatten() {
        if !e.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(raw) = std::fs::read(e.path().join("cmdline")) else { continue };
        let args: Vec<String> = raw.split(|b| *b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        let is_kubelet =
            args.first().is_some_and(|a| a.rsplit('/').next() == Some("kubelet")) || args.iter().take(2).any(|a| a == "kubelet");
        let in_host_root = host_root.is_some() && root_id(&e.file_name().to_string_lossy()) == host_root;
        if is_kubelet
            && in_host_root
            && let Some(root) = root_dir_from_cmdline(&args)
        {
            return Some(root);
        }
    }
    None
}

/// The kubelet root as the agent reaches it, and how it was found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    pub path: PathBuf,
    pub how: &'static str,
}

/// `explicit`, else the running kubelet's `--root-dir`, else the first distribution default
/// that holds `pods/<pod_uid>`.
pub fn discover(explicit: Option<&Path>, host_root: &Path, proc_root: &Path, pod_uid: &str) -> Option<Found> {
    if let Some(p) = explicit {
        return Some(Found { path: under_host_root(host_root, p), how: "given" });
    }
    if let Some(root) = from_processes(proc_root) {
        let path = under_host_root(host_root, Path::new(&root));
        if path.join("pods").join(pod_uid).is_dir() {
            return Some(Found { path, how: "the kubelet's --root-dir" });
        }
    }
    DISTRIBUTION_ROOTS
        .iter()
        .map(|r| under_host_root(host_root, Path::new(r)))
        .find(|p| p.join("pods").join(pod_uid).is_dir())
        .map(|path| Found { path, how: "a distribution default holding the pod" })
}

/// The kubelet's own files beside a volume (never on it): `vol_data.json` beside a CSI
/// `mount` names the driver and handle the kubelet mounted. The kubelet writes it for every
/// CSI volume; its absence means this is not the kubelet's mount of that volume. Migrated
/// in-tree volumes carry a translated handle, so only the driver and the PV name are
/// compared for them.
pub fn cross_check_vol_data(mount: &Path, pv: &str, driver: &str, handle: &str, migrated: bool) -> Result<()> {
    let dir = mount.parent().unwrap_or(mount);
    let file = dir.join("vol_data.json");
    let text = std::fs::read_to_string(&file).map_err(|e| {
        Error::new(Code::UnsafePath, format!("{} cannot be read ({e}): not the kubelet's CSI mount of {pv}", file.display()))
    })?;
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    let field = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or_default().to_string();
    if field("driverName") != driver || field("specVolID") != pv || (!migrated && field("volumeHandle") != handle) {
        return Err(Error::new(
            Code::UnsafePath,
            format!(
                "{} names volume {:?}, driver {:?} and handle {:?}, but the PersistentVolume is {pv:?} with {driver:?} and {handle:?}",
                file.display(),
                field("specVolID"),
                field("driverName"),
                field("volumeHandle")
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn reads_root_dir_in_both_forms() {
        assert_eq!(root_dir_from_cmdline(&s(&["/usr/bin/kubelet", "--root-dir=/data/kubelet"])).as_deref(), Some("/data/kubelet"));
        assert_eq!(root_dir_from_cmdline(&s(&["kubelet", "--v=2", "--root-dir", "/k"])).as_deref(), Some("/k"));
        assert_eq!(root_dir_from_cmdline(&s(&["kubelet", "--v=2"])), None);
    }

    #[test]
    fn finds_the_kubelet_among_processes() {
        let proc = tempfile::tempdir().unwrap();
        let host = tempfile::tempdir().unwrap();
        let container_root = tempfile::tempdir().unwrap();
        let process = |pid: &str, cmdline: &[u8], root: &Path| {
            std::fs::create_dir_all(proc.path().join(pid)).unwrap();
            std::fs::write(proc.path().join(pid).join("cmdline"), cmdline).unwrap();
            std::os::unix::fs::symlink(root, proc.path().join(pid).join("root")).unwrap();
        };
        process("1", b"/sbin/init\0", Path::new("/"));
        // A container process calling itself kubelet, in another root: ignored.
        process("7", b"kubelet\0--root-dir=/evil\0", container_root.path());
        process("42", b"/usr/bin/kubelet\0--config=/c\0--root-dir=/var/lib/k0s/kubelet\0", Path::new("/"));
        std::fs::create_dir_all(proc.path().join("self")).unwrap();
        assert_eq!(from_processes(proc.path()).as_deref(), Some("/var/lib/k0s/kubelet"));
        std::fs::create_dir_all(host.path().join("var/lib/k0s/kubelet/pods/u")).unwrap();
        let found = discover(None, host.path(), proc.path(), "u").unwrap();
        assert_eq!(found.path, host.path().join("var/lib/k0s/kubelet"));
        // A root that does not hold the pod is not trusted.
        assert!(discover(None, host.path(), proc.path(), "other").is_none());
    }

    #[test]
    fn falls_back_to_the_default_that_holds_the_pod() {
        let host = tempfile::tempdir().unwrap();
        let empty_proc = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(host.path().join("var/lib/kubelet/pods/other")).unwrap();
        std::fs::create_dir_all(host.path().join("var/snap/microk8s/common/var/lib/kubelet/pods/u")).unwrap();
        let found = discover(None, host.path(), empty_proc.path(), "u").unwrap();
        assert_eq!(found.path, host.path().join("var/snap/microk8s/common/var/lib/kubelet"));
        assert!(discover(None, host.path(), empty_proc.path(), "missing").is_none());
        let given = discover(Some(Path::new("/opt/rke/var/lib/kubelet")), host.path(), empty_proc.path(), "u").unwrap();
        assert_eq!((given.path, given.how), (host.path().join("opt/rke/var/lib/kubelet"), "given"));
    }
}
