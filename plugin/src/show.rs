//! What a person reads: tables, the progress of a heal, verdicts. Pure, over the records as
//! the API server returned them. Every string from a record is shown with its control
//! characters escaped: a status is writable by whoever may write it, and a terminal must not
//! take its bytes as commands.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::time::Duration;

use kube::ResourceExt;

use etcd_medic_client::crd::{DETECTED_AT, DataStatus, EtcdRemediation, EtcdRemediationStatus, FAILING_SINCE, RestoreStatus, StepStatus};
use etcd_medic_core::{Code, Error};

/// `s` with what could change how a terminal shows it escaped: control characters, every
/// bidi mark and override (U+061C, U+200E/F, U+202A–E, U+2066–9) and zero-width or
/// invisible ones (U+200B–D, U+2060–4, U+FEFF, U+00AD, U+180E).
pub fn safe(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            let hidden = matches!(
                c,
                '\u{061c}'
                    | '\u{200b}'..='\u{200f}'
                    | '\u{202a}'..='\u{202e}'
                    | '\u{2060}'..='\u{2064}'
                    | '\u{2066}'..='\u{2069}'
                    | '\u{feff}'
                    | '\u{00ad}'
                    | '\u{180e}'
            );
            if c.is_control() || hidden { c.escape_unicode().collect::<Vec<_>>() } else { vec![c] }
        })
        .collect()
}

/// The annotation with the instant the plugin asked (RFC 3339, microseconds): records made
/// within one second (`creationTimestamp` has seconds) keep their order.
pub const ASKED_AT: &str = "etcd-medic.io/asked-at";

/// Newest first: by creation, then by when the plugin asked, then by name.
pub fn newest_first(items: &mut [EtcdRemediation]) {
    items.sort_by(|a, b| {
        let t = |r: &EtcdRemediation| r.metadata.creation_timestamp.as_ref().map(|t| t.0);
        let asked = |r: &EtcdRemediation| r.annotations().get(ASKED_AT).and_then(|a| a.parse::<jiff::Timestamp>().ok());
        t(b).cmp(&t(a)).then_with(|| asked(b).cmp(&asked(a))).then_with(|| b.name_any().cmp(&a.name_any()))
    });
}

/// Of records sorted newest first, the newest of each pod.
pub fn latest_per_pod(items: Vec<EtcdRemediation>) -> Vec<EtcdRemediation> {
    let mut seen = HashSet::new();
    items.into_iter().filter(|r| seen.insert((r.namespace(), r.spec.pod.clone()))).collect()
}

/// `generateName` of a record the plugin makes: the pod's name and what was asked.
pub fn generate_name(pod: &str, verb: &str) -> String {
    let mut base: String = pod.chars().take(200).collect();
    base = base.trim_end_matches(['-', '.']).to_string();
    format!("{base}-{verb}-")
}

pub fn code_of(s: &str) -> Option<Code> {
    serde_json::from_value(serde_json::Value::String(s.to_string())).ok()
}

fn phase(cr: &EtcdRemediation) -> &str {
    cr.status.as_ref().and_then(|s| s.phase.as_deref()).unwrap_or("New")
}

/// What an ended record that did not reach its aim failed with.
pub fn error_of(cr: &EtcdRemediation) -> Error {
    match cr.status.as_ref().and_then(|s| s.error.as_ref()) {
        Some(e) => Error::new(code_of(&e.code).unwrap_or(Code::Internal), safe(&e.message)),
        None => Error::new(Code::Internal, format!("EtcdRemediation {} ended {} without an error", cr.name_any(), phase(cr))),
    }
}

fn age(cr: &EtcdRemediation, now: jiff::Timestamp) -> String {
    let Some(t) = cr.metadata.creation_timestamp.as_ref() else { return "-".into() };
    let s = now.duration_since(t.0).as_secs().max(0);
    match s {
        0..120 => format!("{s}s"),
        120..7200 => format!("{}m", s / 60),
        7200..172800 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

/// A step's own duration, from the record's step times (`None` while it runs, or for a
/// record written before steps carried times).
pub fn step_took(st: &StepStatus) -> Option<Duration> {
    let t = |s: &Option<String>| s.as_deref().and_then(|s| s.parse::<jiff::Timestamp>().ok());
    let ms = t(&st.end)?.as_millisecond() - t(&st.start)?.as_millisecond();
    Some(Duration::from_millis(ms.max(0) as u64))
}

/// A duration as a person reads it: `12 ms`, `1.52 s`, `3m04s`.
pub fn took(d: Duration) -> String {
    match d.as_millis() {
        ms @ 0..1000 => format!("{ms} ms"),
        ms @ 1000..120_000 => format!("{:.2} s", ms as f64 / 1000.0),
        ms => format!("{}m{:02}s", ms / 60_000, ms / 1000 % 60),
    }
}

/// When the record's remediation ended: its last step's end.
fn ended_at(s: &EtcdRemediationStatus) -> Option<jiff::Timestamp> {
    let ended = s.conditions.iter().any(|c| c.r#type == "Processing" && c.status == "False");
    ended.then(|| s.steps.iter().filter_map(|st| st.end.as_deref()?.parse().ok()).max()).flatten()
}

/// The times of a record the controller made: since when the pod had been failing (its
/// first crash, for a member that served before), when it was detected, and, once ended,
/// how long each took to the end. A person's record has none.
pub fn times(cr: &EtcdRemediation) -> Vec<(&'static str, String)> {
    let at = |k: &str| cr.annotations().get(k).and_then(|v| v.parse::<jiff::Timestamp>().ok());
    let (since, detected) = (at(FAILING_SINCE), at(DETECTED_AT));
    let end = cr.status.as_ref().and_then(ended_at);
    let span = |from: jiff::Timestamp, to: jiff::Timestamp| {
        took(Duration::from_millis((to.as_millisecond() - from.as_millisecond()).max(0) as u64))
    };
    let mut rows = vec![];
    if let Some(t) = since {
        rows.push(("Failing since", t.to_string()));
    }
    if let Some(t) = detected {
        rows.push(("Detected", t.to_string() + &since.map(|s| format!(" ({} after)", span(s, t))).unwrap_or_default()));
    }
    if let Some(e) = end {
        let mut said = vec![];
        if let Some(s) = since {
            said.push(format!("{} from the first crash", span(s, e)));
        }
        if let Some(d) = detected {
            said.push(format!("{} from detection", span(d, e)));
        }
        if !said.is_empty() {
            rows.push(("Ended", format!("{e} ({})", said.join(", "))));
        }
    }
    rows
}

fn signature(s: Option<&EtcdRemediationStatus>) -> String {
    s.and_then(|s| s.diagnosis.as_ref()).map_or("-".into(), |d| safe(&d.signature))
}

/// Rows aligned in columns.
fn columns(rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> =
        (0..rows.first().map_or(0, Vec::len)).map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str(line.join("   ").trim_end());
        out.push('\n');
    }
    out
}

/// `list` and `status` without a pod.
pub fn table(items: &[EtcdRemediation], with_namespace: bool) -> String {
    if items.is_empty() {
        return "No EtcdRemediations found.\n".into();
    }
    let now = jiff::Timestamp::now();
    let mut rows = vec![];
    let mut head = vec!["NAME", "POD", "PHASE", "SIGNATURE", "NODE", "AGE"];
    if with_namespace {
        head.insert(0, "NAMESPACE");
    }
    rows.push(head.into_iter().map(String::from).collect::<Vec<_>>());
    for r in items {
        let s = r.status.as_ref();
        let mut row = vec![
            safe(&r.name_any()),
            safe(&r.spec.pod),
            safe(phase(r)) + if r.spec.dry_run { " (dry run)" } else { "" },
            signature(s),
            s.and_then(|s| s.node.as_deref()).map_or("-".into(), safe),
            age(r, now),
        ];
        if with_namespace {
            row.insert(0, r.namespace().unwrap_or_default());
        }
        rows.push(row);
    }
    columns(&rows)
}

/// `status POD`: one record in full.
pub fn detail(cr: &EtcdRemediation) -> String {
    let s = cr.status.clone().unwrap_or_default();
    let mut out = String::new();
    let mut row = |k: &str, v: String| {
        let _ = writeln!(out, "{k:<14} {v}");
    };
    row("Name", format!("{}/{}", cr.namespace().unwrap_or_default(), safe(&cr.name_any())));
    row("Pod", safe(&cr.spec.pod) + &cr.spec.pod_uid.as_deref().map(|u| format!(" (uid {})", safe(u))).unwrap_or_default());
    row("Phase", safe(phase(cr)) + if cr.spec.dry_run { " (dry run)" } else { "" });
    if let Some(n) = &s.node {
        row("Node", safe(n));
    }
    if let Some(id) = &s.remediation_id {
        row("Remediation", safe(id));
    }
    if let Some(r) = &cr.spec.reason {
        row("Reason", safe(r));
    }
    if let Some(d) = &s.diagnosis {
        row("Signature", format!("{} (action: {})", safe(&d.signature), safe(&d.action)));
    }
    if let Some(e) = &s.error {
        row("Error", format!("{}: {}", safe(&e.code), safe(&e.message)));
    }
    if let Some(r) = &s.restore {
        row("Restore", restore_line(&cr.name_any(), r).trim_end().to_string());
    }
    for (k, v) in times(cr) {
        row(k, v);
    }
    if !s.steps.is_empty() {
        out.push_str("Steps:\n");
        for st in &s.steps {
            let outcome = st.outcome.as_deref().map_or("running".into(), safe);
            let d = step_took(st).map_or("-".into(), took);
            let _ = writeln!(out, "  {:<10} {:<12} {:>9}  {}", safe(&st.name), outcome, d, safe(&st.message));
        }
    }
    out
}

/// `diagnose`: the signature, the action and the evidence.
pub fn diagnosis(cr: &EtcdRemediation) -> String {
    let s = cr.status.clone().unwrap_or_default();
    let mut out = String::new();
    let _ = writeln!(out, "Pod          {}/{}", cr.namespace().unwrap_or_default(), safe(&cr.spec.pod));
    match &s.diagnosis {
        Some(d) => {
            let _ = writeln!(out, "Signature    {}", safe(&d.signature));
            let _ = writeln!(out, "Action       {}", safe(&d.action));
            if !d.evidence.is_empty() {
                out.push_str("Evidence:\n");
                for l in &d.evidence {
                    let _ = writeln!(out, "  {}", safe(l));
                }
            }
        }
        None => out.push_str("Signature    (none: the agent stopped before reading the pod's log)\n"),
    }
    if let Some(d) = &s.data {
        let _ = writeln!(out, "Files        {}", safe(&d.summary));
    }
    let verdict = match &s.error {
        Some(e) => format!("{} ({}: {})", safe(phase(cr)), safe(&e.code), safe(&e.message)),
        None => format!("{}: a heal would go ahead", safe(phase(cr))),
    };
    let _ = writeln!(out, "Dry run      {verdict}");
    out
}

/// `inspect`: what the member's files say, then the diagnosis.
pub fn inspect(cr: &EtcdRemediation, d: &DataStatus) -> String {
    let opt = |v: Option<i64>| v.map_or("-".into(), |v| v.to_string());
    let id = |v: &Option<String>| v.as_deref().map_or("-".into(), safe);
    let mut out = String::new();
    let _ = writeln!(out, "Member       {} of cluster {}", id(&d.member_id), id(&d.cluster_id));
    let _ =
        writeln!(out, "WAL          {}: term {}, commit {}, last index {}", safe(&d.wal), opt(d.term), opt(d.commit), opt(d.last_index));
    let _ = writeln!(out, "db           {}: revision {}, consistent index {}", safe(&d.db), opt(d.revision), opt(d.consistent_index));
    let _ = writeln!(out, "Summary      {}", safe(&d.summary));
    out.push_str(&diagnosis(cr));
    out
}

/// What `recover` shows: the record's plan, where it stands, and who approved it.
#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Proposal {
    pub stateful_set: String,
    pub namespace: String,
    pub phase: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approval: Option<etcd_medic_client::recovery::Approval>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// What the controller's rebuild made, once made.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rebuilt: Option<etcd_medic_client::recovery::RebuiltState>,
    /// Whether the controller carries the recovery past the fence (no manual steps to show).
    #[serde(skip)]
    pub by_controller: bool,
    #[serde(flatten)]
    pub plan: etcd_medic_client::recovery::Plan,
}

impl Proposal {
    pub fn of(name: &str, namespace: &str, r: &etcd_medic_client::recovery::EtcdRecovery) -> Proposal {
        let s = r.status.clone().unwrap_or_default();
        Proposal {
            stateful_set: name.into(),
            namespace: namespace.into(),
            phase: s.phase.unwrap_or_else(|| "Proposed".into()),
            approval: r.spec.approval.clone(),
            message: s.message,
            by_controller: s.fence.as_ref().is_some_and(|f| f.rebuild) || s.rebuilt.is_some(),
            rebuilt: s.rebuilt,
            plan: s.plan.unwrap_or_default(),
        }
    }
}

/// `recover`: the survivor and why, every member's facts, what is lost, what comes next.
pub fn recovery(p: &Proposal) -> String {
    let (c, plan) = (&p.plan.choice, &p.plan);
    let mut out = String::new();
    let _ = writeln!(out, "StatefulSet  {}/{} ({} of {} pods Ready)", safe(&p.namespace), safe(&p.stateful_set), plan.ready, plan.replicas);
    if plan.ready > plan.replicas / 2 {
        out.push_str(
            "Warning      a majority of the pods is Ready: the cluster may well have quorum; recover only a cluster that lost it
",
        );
    }
    let _ = writeln!(out, "Phase        {}", safe(&p.phase));
    if let Some(a) = &p.approval {
        let _ = writeln!(out, "Approved     by {} for facts {}", safe(&a.by), safe(&a.facts));
    }
    let _ = writeln!(out, "Survivor     {}: {}", safe(&c.survivor), safe(&c.why));
    let _ = writeln!(out, "Facts        {}", c.facts);
    let opt = |v: Option<u64>| v.map_or("-".into(), |v| v.to_string());
    let mut rows = vec![["POD", "STATE", "CLUSTER", "COMMIT", "CONSISTENT", "TERM", "REVISION", "DATA"].map(String::from).to_vec()];
    for m in &c.ranked {
        let seen = plan.members.iter().find(|s| s.pod == m.pod);
        let state = seen.map_or("-".into(), |s| match &s.signature {
            Some(sig) => format!("{} ({sig}, {} restarts)", safe(&s.state), s.restarts),
            None => safe(&s.state),
        });
        rows.push(vec![
            safe(&m.pod),
            state,
            m.cluster_id.as_deref().map_or("-".into(), safe),
            m.commit.to_string(),
            opt(m.consistent_index),
            m.term.to_string(),
            opt(m.revision),
            m.unusable.as_deref().map_or("whole".into(), |u| format!("unusable: {}", safe(u))),
        ]);
    }
    out.push_str(&columns(&rows));
    if c.lost.is_empty() {
        out.push_str(
            "Lost         nothing, as far as the members' data tells
",
        );
    } else {
        for l in &c.lost {
            let _ = writeln!(out, "Lost         {}", safe(&l.describe()));
        }
    }
    for n in &plan.notes {
        let _ = writeln!(out, "Note         {}", safe(n));
    }
    if let Some(b) = &p.rebuilt {
        let _ = writeln!(
            out,
            "Rebuilt      member {} of cluster {} at revision {} (it held {}); old data in quarantine {} on every member's volume",
            safe(&b.member_id),
            safe(&b.cluster_id),
            b.revision,
            b.revision_before,
            safe(&b.quarantine)
        );
    }
    if p.by_controller {
        if let Some(m) = &p.message {
            let _ = writeln!(out, "Then         {}", safe(m));
        }
        return out;
    }
    let node = plan.survivor_node.as_deref().map_or("<its node>".into(), safe);
    let urls = if plan.survivor_client_urls.is_empty() { "<its client URL>".into() } else { safe(&plan.survivor_client_urls.join(",")) };
    let survivor = safe(&c.survivor);
    let _ =
        writeln!(out, "Next         1. note where its data is: the agent on {node}: etcd-medic locate {}/{survivor}", safe(&p.namespace));
    let _ = writeln!(
        out,
        "             2. stop every member, keep every volume: kubectl -n {} scale statefulset {} --replicas 0",
        safe(&p.namespace),
        safe(&p.stateful_set)
    );
    let _ = writeln!(
        out,
        "             3. the agent on {node}: etcd-medic rebuild --data-dir <the host path> --name {survivor} --client-url {urls} --held-revision {}",
        plan.held_revision
    );
    let _ = writeln!(
        out,
        "             4. scale to 1, then the others back one at a time, each healed on empty data (README: \"Quorum lost\")"
    );
    if let Some(m) = &p.message {
        let _ = writeln!(out, "Then         {}", safe(m));
    }
    out
}

/// `members`: the list as the agent's check saw it.
pub fn members(s: &EtcdRemediationStatus) -> String {
    let mut rows = vec![["ID", "NAME", "PEER URLS", "CLIENT URLS", "LEARNER", "HEALTHY", "STALE"].map(String::from).to_vec()];
    for m in &s.members {
        let yes = |b: bool| if b { "yes" } else { "no" }.to_string();
        rows.push(vec![
            safe(&m.id),
            if m.name.is_empty() { "(unstarted)".into() } else { safe(&m.name) },
            safe(&m.peer_urls.join(",")),
            safe(&m.client_urls.join(",")),
            yes(m.is_learner),
            yes(m.healthy),
            if m.stale { "yes: this pod's entry".into() } else { "no".into() },
        ]);
    }
    format!("Cluster {}\n{}", s.cluster_id.as_deref().map_or("-".into(), safe), columns(&rows))
}

/// The last line of `heal --wait`.
pub fn verdict_line(cr: &EtcdRemediation) -> String {
    let s = cr.status.clone().unwrap_or_default();
    let id = s.remediation_id.as_deref().map(|i| format!(" (remediation {} on {})", safe(i), s.node.as_deref().map_or("?".into(), safe)));
    match &s.error {
        Some(e) => format!("{}: {} {}{}\n", safe(phase(cr)), safe(&e.code), safe(&e.message), id.unwrap_or_default()),
        None => format!("{}{}\n", safe(phase(cr)), id.unwrap_or_default()),
    }
}

pub fn restore_line(name: &str, r: &RestoreStatus) -> String {
    match &r.code {
        Some(c) => format!("{}: restore {} ({}: {})\n", safe(name), safe(&r.phase), safe(c), safe(&r.message)),
        None => format!("{}: {} ({})\n", safe(name), safe(&r.phase), safe(&r.message)),
    }
}

/// What `heal --wait` has told so far: each step once when it starts and once when it ends,
/// and each phase once.
#[derive(Default)]
pub struct Follow {
    told: HashSet<String>,
}

impl Follow {
    pub fn lines(&mut self, cr: &EtcdRemediation, elapsed: Duration) -> Vec<String> {
        let at = format!("[{:>6.1}s]", elapsed.as_secs_f64());
        let s = cr.status.clone().unwrap_or_default();
        let mut out = vec![];
        let mut tell = |key: String, line: String| {
            if self.told.insert(key) {
                out.push(format!("{at} {line}"));
            }
        };
        let phase = s.phase.as_ref().map(|p| {
            let why = s.conditions.iter().find(|c| c.r#type == "Processing" && c.status == "True" && c.reason != "InProgress");
            let said = why.map(|c| format!(": {}", safe(&c.message))).unwrap_or_default();
            (format!("phase/{p}/{said}"), format!("{}{said}", safe(p)))
        });
        // An ended phase is told after the steps that led to it, a running one before them.
        let ended = s.conditions.iter().any(|c| c.r#type == "Processing" && c.status == "False");
        if !ended && let Some((k, l)) = phase.clone() {
            tell(k, l);
        }
        for (i, st) in s.steps.iter().enumerate() {
            tell(format!("step/{i}/start"), format!("{} …", safe(&st.name)));
            if let Some(o) = &st.outcome {
                let d = step_took(st).map(|d| format!(" in {}", took(d))).unwrap_or_default();
                tell(format!("step/{i}/end"), format!("{} {}{d}: {}", safe(&st.name), safe(o), safe(&st.message)));
            }
        }
        if ended && let Some((k, l)) = phase {
            tell(k, l);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_a_tenant_writes_can_hide_or_reorder_what_the_terminal_shows() {
        for c in ['\u{061c}', '\u{200b}', '\u{200d}', '\u{202e}', '\u{2066}', '\u{2060}', '\u{feff}', '\u{00ad}', '\u{1b}', '\n'] {
            let shown = safe(&format!("a{c}b"));
            assert!(!shown.contains(c) && shown.starts_with('a') && shown.ends_with('b'), "{:?} -> {shown}", c);
        }
        assert_eq!(safe("apisix-etcd-1 ü 漢"), "apisix-etcd-1 ü 漢");
    }
    use etcd_medic_client::crd::{ErrorStatus, EtcdRemediationSpec, StepStatus};

    fn record(name: &str, pod: &str, secs_ago: i64, phase: Option<&str>) -> EtcdRemediation {
        let mut r = EtcdRemediation::new(name, EtcdRemediationSpec { pod: pod.into(), ..Default::default() });
        r.metadata.namespace = Some("apisix".into());
        let t = jiff::Timestamp::now() - jiff::SignedDuration::from_secs(secs_ago);
        r.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(t));
        r.status = phase.map(|p| EtcdRemediationStatus { phase: Some(p.into()), ..Default::default() });
        r
    }

    #[test]
    fn newest_first_and_the_latest_of_each_pod() {
        let mut items = vec![record("a", "etcd-0", 300, None), record("b", "etcd-1", 10, None), record("c", "etcd-0", 20, None)];
        newest_first(&mut items);
        assert_eq!(items.iter().map(|r| r.name_any()).collect::<Vec<_>>(), ["b", "c", "a"]);
        // Within one second, the instant asked decides.
        let mut same = vec![record("z", "etcd-0", 5, None), record("y", "etcd-0", 5, None)];
        same[0].metadata.creation_timestamp = same[1].metadata.creation_timestamp.clone();
        same[0].annotations_mut().insert(ASKED_AT.into(), "2026-12-04T10:00:00.000001Z".into());
        same[1].annotations_mut().insert(ASKED_AT.into(), "2026-12-04T10:00:00.000002Z".into());
        newest_first(&mut same);
        assert_eq!(same.iter().map(|r| r.name_any()).collect::<Vec<_>>(), ["y", "z"]);
        let latest = latest_per_pod(items);
        assert_eq!(latest.iter().map(|r| r.name_any()).collect::<Vec<_>>(), ["b", "c"]);
        let t = table(&latest, true);
        assert!(t.starts_with("NAMESPACE   NAME   POD      PHASE"), "{t}");
        assert!(t.contains("apisix      b      etcd-1   New"), "{t}");
    }

    #[test]
    fn a_heal_is_told_step_by_step_once_each() {
        let mut r = record("x", "etcd-1", 1, Some("Running"));
        let mut f = Follow::default();
        let st = |name: &str, outcome: Option<&str>| StepStatus {
            name: name.into(),
            start: Some("2026-12-07T10:00:00.100Z".into()),
            end: outcome.map(|_| "2026-12-07T10:00:00.112Z".into()),
            outcome: outcome.map(String::from),
            message: "m".into(),
        };
        r.status.as_mut().unwrap().steps = vec![st("Check", None)];
        assert_eq!(f.lines(&r, Duration::from_millis(1200)), ["[   1.2s] Running", "[   1.2s] Check …"]);
        assert!(f.lines(&r, Duration::from_secs(2)).is_empty(), "nothing new, nothing told");
        r.status.as_mut().unwrap().steps = vec![st("Check", Some("Done")), st("Lock", None)];
        assert_eq!(f.lines(&r, Duration::from_secs(3)), ["[   3.0s] Check Done in 12 ms: m", "[   3.0s] Lock …"], "each step its own time");
        let old = StepStatus { start: None, ..st("Lock", Some("Done")) };
        assert_eq!(step_took(&old), None, "a record written before steps carried times");
    }

    #[test]
    fn status_shows_the_time_from_the_first_crash_and_from_detection() {
        let mut r = record("x", "etcd-1", 1, Some("Succeeded"));
        r.metadata.annotations = Some(
            [
                (FAILING_SINCE.to_string(), "2026-12-07T10:00:00Z".to_string()),
                (DETECTED_AT.to_string(), "2026-12-07T10:00:00.250Z".to_string()),
            ]
            .into(),
        );
        let s = r.status.as_mut().unwrap();
        s.conditions = vec![etcd_medic_client::crd::Condition {
            r#type: "Processing".into(),
            status: "False".into(),
            reason: "Succeeded".into(),
            message: String::new(),
            last_transition_time: "2026-12-07T10:00:04Z".into(),
            observed_generation: None,
        }];
        s.steps = vec![StepStatus {
            name: "Verify".into(),
            start: Some("2026-12-07T10:00:02Z".into()),
            end: Some("2026-12-07T10:00:03.500Z".into()),
            outcome: Some("Done".into()),
            message: String::new(),
        }];
        let t = times(&r);
        assert_eq!(t[1], ("Detected", "2026-12-07T10:00:00.25Z (250 ms after)".to_string()));
        assert_eq!(t[2].1, "2026-12-07T10:00:03.5Z (3.50 s from the first crash, 3.25 s from detection)");
        let d = detail(&r);
        assert!(d.contains("Verify     Done            1.50 s"), "{d}");
        assert_eq!(took(Duration::from_secs(184)), "3m04s");
    }

    #[test]
    fn an_ended_record_exits_with_its_codes_class_and_terminal_bytes_are_escaped() {
        let mut r = record("x", "etcd-1", 1, Some("Refused"));
        r.status.as_mut().unwrap().error = Some(ErrorStatus { code: "SplitBrain".into(), message: "ids \u{1b}[2Jdiffer".into() });
        let e = error_of(&r);
        assert_eq!((e.code, e.exit_code()), (Code::SplitBrain, 6));
        assert!(!e.message.contains('\u{1b}') && e.message.contains("\\u{1b}"), "{}", e.message);
        r.status.as_mut().unwrap().error = Some(ErrorStatus { code: "NoSuchCode".into(), message: String::new() });
        assert_eq!(error_of(&r).code, Code::Internal);
        assert!(verdict_line(&r).starts_with("Refused: NoSuchCode"));
        assert_eq!(generate_name("etcd-0.", "heal"), "etcd-0-heal-");
    }
}
