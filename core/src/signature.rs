//! Crash signatures: what the crashed etcd container's last lines say, and what may be done
//! about it. The agent reads the lines on its node (the container's log files, then the
//! termination message), the controller reads them through the API server; both decide here.
//!
//! A line matches a signature by fixed phrases that etcd (3.4 capnslog, 3.5/3.6 zap JSON),
//! etcdctl and the Bitnami scripts print; in a zap JSON line only its `msg` and `error` are
//! looked at (other fields carry keys and values that clients chose). Refusals are looked
//! for first: a tail (the last [`MAX_LINES`] lines read) that shows a split brain or a lost
//! quorum is never healed unforced, whatever else it shows.

use serde::{Deserialize, Serialize};

use crate::Code;
use crate::generation::Generation;

/// The failure a crash log shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
pub enum Signature {
    /// `etcdserver: member not found`: the image's `member update` with a stale `member_id`
    /// (chart ≤ 10, after its preStop hook removed the member).
    MemberNotFound,
    /// `the member has been permanently removed from the cluster`: a removed member's data.
    MemberRemoved,
    /// `bad member ID arg`: the image ran `member update` with an empty `member_id`.
    BadMemberId,
    /// The member's own data is corrupt or behind what the cluster holds for it (a damaged
    /// WAL or snapshot, a lost log): replace the member.
    CorruptData,
    /// Peers disagree on the cluster's id: a split brain.
    ClusterIdMismatch,
    /// The image found too few healthy peers: quorum is lost.
    QuorumLost,
    /// None of the above, or no log at all.
    Unknown,
}

impl Signature {
    pub const ALL: [Signature; 7] = [
        Signature::MemberNotFound,
        Signature::MemberRemoved,
        Signature::BadMemberId,
        Signature::CorruptData,
        Signature::ClusterIdMismatch,
        Signature::QuorumLost,
        Signature::Unknown,
    ];

    /// The failure can only repeat: every start meets the same files and the same cluster and
    /// fails the same way, so waiting for more restarts buys nothing (the first-crash rule of
    /// `detect::first_crash`). The Bitnami start-up script runs the same `member update` with
    /// the same stale (or empty) id on every start; a WAL or snapshot that etcd cannot read is
    /// read again, unchanged. Not so for a removed member (an image of chart 11 or later wipes
    /// and re-adds it on its next start), a split brain or a lost quorum (peers may come
    /// back), or an unknown crash (a single OOM, a node blip): those wait for the thresholds.
    pub fn repeats(self) -> bool {
        matches!(self, Signature::MemberNotFound | Signature::BadMemberId | Signature::CorruptData)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Signature::MemberNotFound => "MemberNotFound",
            Signature::MemberRemoved => "MemberRemoved",
            Signature::BadMemberId => "BadMemberId",
            Signature::CorruptData => "CorruptData",
            Signature::ClusterIdMismatch => "ClusterIdMismatch",
            Signature::QuorumLost => "QuorumLost",
            Signature::Unknown => "Unknown",
        }
    }
}

/// What the agent does about a signature.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Quarantine the member's files, clear its stale entry, restart: it rejoins.
    Heal,
    /// The member is still listed with data that cannot serve: remove it (quorum proven
    /// before and after), quarantine, restart so that it is added back (a learner where the
    /// cluster allows).
    Replace,
    /// Do nothing; `code` says why.
    Refuse,
}

/// Where the lines came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub enum Source {
    /// The crashed container's log file on the node (`/var/log/pods/…`).
    ContainerLog,
    /// `lastState.terminated.message` of the pod's status.
    TerminationMessage,
    /// The member's own files, read offline: the lines said nothing known (a goroutine
    /// dump, a rotated log), the WAL's or db's checksums did.
    Data,
    /// Nothing to read.
    None,
}

/// The failure seen, what is done about it, and the lines that show it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Diagnosis {
    pub signature: Signature,
    pub action: Action,
    /// Why it refuses (`Refuse` only): `SplitBrain`, `QuorumAtRisk`, `SelfHealing`,
    /// `UnknownFailure`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<Code>,
    /// One sentence for a person: what the signature means and why this action.
    pub why: String,
    /// The lines that matched (at most [`MAX_EVIDENCE`], each cut to [`MAX_LINE`] bytes),
    /// or the last lines read when nothing matched.
    pub evidence: Vec<String>,
    pub source: Source,
    /// The log file read, on the node (`source: containerLog`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_file: Option<String>,
    /// The pod's start-up rules, which change what some signatures call for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<Generation>,
    /// The signal that decided the generation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation_by: Option<String>,
    /// `ClusterIdMismatch` only: what the rest of the lines say. Anyone who reaches the
    /// member's peer port can make it print `cluster ID mismatch`, so the line raises the
    /// question and the member's WAL answers it (`crate::data::answer_split`); when the data
    /// is the live cluster's own, this is the diagnosis. Never serialized.
    #[serde(skip)]
    #[schema(ignore)]
    pub unless_split: Option<Box<Diagnosis>>,
}

/// Evidence kept per diagnosis, and the length of each line.
pub const MAX_EVIDENCE: usize = 5;
pub const MAX_LINE: usize = 400;

/// Lines a diagnosis reads at most (the tail of the last attempt).
pub const MAX_LINES: usize = 200;

struct Rule {
    signature: Signature,
    /// Any of these phrases on one line.
    any: &'static [&'static str],
    /// …and, if not empty, one of these on the same line too.
    with: &'static [&'static str],
}

/// In order of precedence: the refusals first, then the data faults, then membership.
const RULES: &[Rule] = &[
    // Only the *cluster* id: etcd's "ignored streaming request; ID mismatch" is about a
    // member id (a member still running on an id that was replaced) and is healable.
    Rule { signature: Signature::ClusterIdMismatch, any: &["cluster ID mismatch"], with: &[] },
    Rule { signature: Signature::QuorumLost, any: &["Cluster not responding"], with: &[] },
    Rule {
        signature: Signature::CorruptData,
        any: &[
            "crc mismatch",
            "failed to find database snapshot file",
            "snapshot file doesn't exist",
            "failed to recover v3 backend from snapshot",
            "is out of range [lastIndex(",
            "failed to read WAL",
            "failed to repair WAL",
            "read wal error",
        ],
        with: &[],
    },
    // A WAL whose framing is damaged fails to decode at start-up (etcdmain's "discovery
    // failed" wraps it); an EOF counts only where the WAL is named.
    Rule { signature: Signature::CorruptData, any: &["wireType"], with: &["discovery failed"] },
    Rule { signature: Signature::CorruptData, any: &["unexpected EOF"], with: &["wal", "WAL"] },
    Rule { signature: Signature::MemberRemoved, any: &["the member has been permanently removed from the cluster"], with: &[] },
    Rule { signature: Signature::MemberNotFound, any: &["etcdserver: member not found"], with: &[] },
    Rule { signature: Signature::BadMemberId, any: &["bad member ID arg"], with: &[] },
];

/// The text of a line the rules look at: a zap JSON line's `msg` and `error` (and `level`);
/// an etcd 3.4 plain-text (capnslog) line without its quoted parts, where etcd puts what
/// clients chose (a key in "apply request took too long"); any other line whole.
fn searched(line: &str) -> std::borrow::Cow<'_, str> {
    let t = line.trim();
    if t.starts_with('{')
        && let Ok(serde_json::Value::Object(m)) = serde_json::from_str::<serde_json::Value>(t)
    {
        let field = |k: &str| m.get(k).and_then(|v| v.as_str()).unwrap_or("").to_string();
        return format!("{} {} {}", field("level"), field("msg"), field("error")).into();
    }
    if capnslog(t) {
        return unquoted(t).into();
    }
    line.into()
}

/// `2026-12-01 12:00:00.123456 W | etcdserver: …`: etcd 3.4's plain-text log line.
fn capnslog(t: &str) -> bool {
    let b = t.as_bytes();
    let digits = |r: std::ops::Range<usize>| b.get(r).is_some_and(|s| s.iter().all(u8::is_ascii_digit));
    digits(0..4)
        && b.get(4) == Some(&b'-')
        && digits(5..7)
        && b.get(7) == Some(&b'-')
        && digits(8..10)
        && b.get(10) == Some(&b' ')
        && t.get(11..).and_then(|rest| rest.split_once(' ')).is_some_and(|(_, after)| {
            let mut c = after.chars();
            matches!(c.next(), Some('C' | 'E' | 'W' | 'N' | 'I' | 'D' | 'T')) && c.as_str().starts_with(" | ")
        })
}

/// `t` with every double-quoted part (escapes included) left out.
fn unquoted(t: &str) -> String {
    let (mut out, mut quoted, mut escaped) = (String::with_capacity(t.len()), false, false);
    for c in t.chars() {
        match (quoted, escaped, c) {
            (true, true, _) => escaped = false,
            (true, false, '\\') => escaped = true,
            (_, _, '"') => quoted = !quoted,
            (false, _, c) => out.push(c),
            (true, false, _) => {}
        }
    }
    out
}

/// The signature of a crash log's lines (oldest first) and the lines that show it.
pub fn classify<'a>(lines: &[&'a str]) -> (Signature, Vec<&'a str>) {
    classify_but(lines, None)
}

/// [`classify`] with the rules of `but` left out.
fn classify_but<'a>(lines: &[&'a str], but: Option<Signature>) -> (Signature, Vec<&'a str>) {
    let texts: Vec<std::borrow::Cow<'_, str>> = lines.iter().map(|l| searched(l)).collect();
    for rule in RULES.iter().filter(|r| Some(r.signature) != but) {
        let hits: Vec<&str> = lines
            .iter()
            .zip(&texts)
            .filter(|(_, t)| rule.any.iter().any(|p| t.contains(p)) && (rule.with.is_empty() || rule.with.iter().any(|p| t.contains(p))))
            .map(|(l, _)| *l)
            .collect();
        if !hits.is_empty() {
            return (rule.signature, hits);
        }
    }
    (Signature::Unknown, Vec::new())
}

/// What to do about `signature` for pods of `generation`, and why.
pub fn decide(signature: Signature, generation: Option<Generation>) -> (Action, Option<Code>, String) {
    let heals_itself = generation.is_some_and(Generation::heals_removed_member_itself);
    let (action, code, why): (Action, Option<Code>, &str) = match signature {
        Signature::ClusterIdMismatch => (
            Action::Refuse,
            Some(Code::SplitBrain),
            "peers disagree on the cluster's id: a split brain, or a member started on another cluster's data; a person must decide which data is right",
        ),
        Signature::QuorumLost => (
            Action::Refuse,
            Some(Code::QuorumAtRisk),
            "the image found too few healthy peers when this attempt started: with quorum lost no membership change can be made; restore quorum (or a backup) first; the next attempt, once the peers are back, shows what the member itself fails on",
        ),
        Signature::CorruptData => (
            Action::Replace,
            None,
            "this member's own data is corrupt or behind the cluster's log: it is removed, its data quarantined, and it is added back empty, only while the others keep quorum",
        ),
        Signature::MemberRemoved if heals_itself => (
            Action::Refuse,
            Some(Code::SelfHealing),
            "the image of this chart generation wipes and re-adds a removed member itself on its next start; the agent stands down",
        ),
        Signature::MemberRemoved => (
            Action::Heal,
            None,
            "the member was removed from the cluster but kept its data: the data is quarantined and the member added back",
        ),
        Signature::MemberNotFound => (
            Action::Heal,
            None,
            "the image updates a member id that was removed (its preStop hook removed it): the stale id and data are quarantined and the image re-adds the member",
        ),
        Signature::BadMemberId => {
            (Action::Heal, None, "the image stored an empty member id: it and the data are quarantined and the image re-adds the member")
        }
        Signature::Unknown => (
            Action::Refuse,
            Some(Code::UnknownFailure),
            "the crash matches no failure the agent knows how to heal; nothing is done unless forced",
        ),
    };
    (action, code, why.to_string())
}

/// The diagnosis of a crash log's lines (oldest first), read from `source`.
pub fn diagnose(lines: &[&str], source: Source, generation: Option<(Generation, String)>) -> Diagnosis {
    let tail = &lines[lines.len().saturating_sub(MAX_LINES)..];
    let mut d = diagnosis_of(tail, classify(tail), source, generation.clone());
    if d.signature == Signature::ClusterIdMismatch {
        let rest = classify_but(tail, Some(Signature::ClusterIdMismatch));
        d.unless_split = Some(Box::new(diagnosis_of(tail, rest, source, generation)));
    }
    if lines.is_empty() {
        d.source = Source::None;
    }
    d
}

fn diagnosis_of(
    tail: &[&str],
    (signature, hits): (Signature, Vec<&str>),
    source: Source,
    generation: Option<(Generation, String)>,
) -> Diagnosis {
    let (action, code, why) = decide(signature, generation.as_ref().map(|(g, _)| *g));
    // What matched, the latest last; with no match, the last lines read (what a person would
    // look at first).
    let shown: Vec<&str> = if hits.is_empty() {
        tail.iter().copied().filter(|l| !l.trim().is_empty() && !l.starts_with(char::is_whitespace)).collect()
    } else {
        hits
    };
    let mut evidence: Vec<String> = Vec::new();
    for l in shown.iter().rev() {
        let s = cut(&compact(l), MAX_LINE);
        if !evidence.contains(&s) {
            evidence.push(s);
        }
        if evidence.len() == MAX_EVIDENCE {
            break;
        }
    }
    evidence.reverse();
    let (generation, generation_by) = generation.map_or((None, None), |(g, by)| (Some(g), Some(printable(&by))));
    Diagnosis { signature, action, code, why, evidence, source, log_file: None, generation, generation_by, unless_split: None }
}

/// Rows for a person: the generation, the diagnosis and each evidence line.
pub fn render_table(d: &Diagnosis) -> String {
    let mut s = String::new();
    let mut row = |k: &str, v: String| s.push_str(&format!("{k:<14} {v}\n"));
    let generation = match (d.generation, &d.generation_by) {
        (Some(g), Some(by)) => format!("{} (by {by})", g.as_str()),
        (Some(g), None) => g.as_str().to_string(),
        _ => "-".into(),
    };
    row("generation", generation);
    let code = d.code.map(|c| format!(" ({c})")).unwrap_or_default();
    row("diagnosis", format!("{} -> {:?}{code}: {}", d.signature.as_str(), d.action, d.why));
    let source = match d.source {
        Source::ContainerLog => "the container's last log",
        Source::TerminationMessage => "the termination message",
        Source::Data => "the member's files",
        Source::None => "nothing to read",
    };
    row("read from", source.to_string());
    if let Some(f) = &d.log_file {
        row("log file", printable(f));
    }
    for line in &d.evidence {
        row("  evidence", line.clone());
    }
    s
}

/// A zap JSON line as `level msg: error` (its stack trace and fields dropped); any other
/// line as it is, trimmed.
pub fn compact(line: &str) -> String {
    let t = line.trim();
    if t.starts_with('{')
        && let Ok(serde_json::Value::Object(m)) = serde_json::from_str::<serde_json::Value>(t)
        && let Some(msg) = m.get("msg").and_then(|v| v.as_str())
    {
        let level = m.get("level").and_then(|v| v.as_str()).unwrap_or("");
        return match m.get("error").and_then(|v| v.as_str()) {
            Some(e) => format!("{level} {msg}: {e}"),
            None => format!("{level} {msg}"),
        };
    }
    t.to_string()
}

/// Text from a tenant made safe to print: control characters (C0, C1, DEL) and the bidi
/// overrides are shown escaped, never sent to a terminal.
pub fn printable(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() || matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}') {
            out.push_str(&c.escape_unicode().to_string());
        } else {
            out.push(c);
        }
    }
    out
}

fn cut(s: &str, max: usize) -> String {
    truncate(&printable(s), max)
}

/// `s` cut to at most `max` bytes on a character boundary, with `…` when it was cut.
pub fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// The signature of a crash's lines (a termination message or a log tail, CRI-framed or
/// plain) and its first line of evidence, compacted and printable.
pub fn of_text(text: &str) -> (Signature, Option<String>) {
    let lines = cri_lines(text);
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    let tail = &refs[refs.len().saturating_sub(MAX_LINES)..];
    let (sig, hits) = classify(tail);
    (sig, hits.last().map(|l| truncate(&printable(&compact(l)), 200)))
}

/// The container's output from a CRI log file (`<time> <stream> <P|F> <text>`, partial
/// lines joined; kubelet's format for every runtime), or from a Docker `json-file` log
/// (`{"log": …}`). Lines in neither format are kept as they are.
pub fn cri_lines(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut partial = String::new();
    for raw in text.lines() {
        let mut f = raw.splitn(4, ' ');
        match (f.next(), f.next(), f.next(), f.next()) {
            (Some(ts), Some("stdout" | "stderr"), Some(tag @ ("P" | "F")), rest) if ts.contains('T') => {
                partial.push_str(rest.unwrap_or(""));
                if tag == "F" {
                    out.push(std::mem::take(&mut partial));
                }
            }
            _ => {
                if let Ok(serde_json::Value::Object(m)) = serde_json::from_str::<serde_json::Value>(raw)
                    && let Some(log) = m.get("log").and_then(|v| v.as_str())
                {
                    out.extend(log.lines().map(String::from));
                } else {
                    out.push(raw.to_string());
                }
            }
        }
    }
    if !partial.is_empty() {
        out.push(partial);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_a_client_chose_never_makes_a_signature() {
        // etcd 3.4 quotes the key of a slow request: a client can write any phrase there.
        let slow = r#"2026-12-01 12:00:00.123456 W | etcdserver: read-only range request "key:\"/apisix/etcdserver: member not found\" " with result "range_response_count:0" took too long (1.2s) to execute"#;
        assert_eq!(classify(&[slow]).0, Signature::Unknown);
        let crc = r#"2026-12-01 12:00:00.123456 W | etcdserver: apply request "key:\"crc mismatch\"" took too long"#;
        assert_eq!(classify(&[crc]).0, Signature::Unknown);
        // What etcd itself says, unquoted, still counts; so do lines of other shapes.
        let fatal = "2026-12-01 12:00:00.123456 C | etcdserver: read wal error (walpb: crc mismatch) and cannot be repaired";
        assert_eq!(classify(&[fatal]).0, Signature::CorruptData);
        assert_eq!(classify(&["Error: etcdserver: member not found"]).0, Signature::MemberNotFound);
    }

    fn lines(text: &str) -> Vec<&str> {
        text.lines().collect()
    }

    fn sig(text: &str) -> Signature {
        classify(&lines(text)).0
    }

    macro_rules! fixture {
        ($name:literal) => {
            include_str!(concat!("../fixtures/logs/", $name))
        };
    }

    #[test]
    fn real_etcd_3_5_crashes() {
        assert_eq!(sig(fixture!("etcd-3.5-removed.log")), Signature::MemberRemoved);
        assert_eq!(sig(fixture!("etcd-3.5-wal-crc.log")), Signature::CorruptData);
        assert_eq!(sig(fixture!("etcd-3.5-wal-wiretype.log")), Signature::CorruptData);
        assert_eq!(sig(fixture!("etcd-3.5-snap-missing.log")), Signature::CorruptData);
        assert_eq!(sig(fixture!("etcd-3.5-tocommit.log")), Signature::CorruptData);
        assert_eq!(sig(fixture!("etcd-3.5-cluster-id-mismatch.log")), Signature::ClusterIdMismatch);
    }

    #[test]
    fn real_etcd_3_6_crashes() {
        assert_eq!(sig(fixture!("etcd-3.6-removed.log")), Signature::MemberRemoved);
        assert_eq!(sig(fixture!("etcd-3.6-wal-crc.log")), Signature::CorruptData);
        assert_eq!(sig(fixture!("etcd-3.6-wal-wiretype.log")), Signature::CorruptData);
        assert_eq!(sig(fixture!("etcd-3.6-snap-missing.log")), Signature::CorruptData);
        assert_eq!(sig(fixture!("etcd-3.6-tocommit.log")), Signature::CorruptData);
        assert_eq!(sig(fixture!("etcd-3.6-cluster-id-mismatch.log")), Signature::ClusterIdMismatch);
    }

    #[test]
    fn recorded_etcd_3_4_and_bitnami_lines() {
        assert_eq!(sig(fixture!("etcd-3.4-removed.log")), Signature::MemberRemoved);
        assert_eq!(sig(fixture!("etcd-3.4-wal-crc.log")), Signature::CorruptData);
        assert_eq!(sig(fixture!("bitnami-9-member-not-found.log")), Signature::MemberNotFound);
        assert_eq!(sig(fixture!("bitnami-6-bad-member-id.log")), Signature::BadMemberId);
        assert_eq!(sig(fixture!("bitnami-9-cluster-not-responding.log")), Signature::QuorumLost);
    }

    #[test]
    fn a_panic_is_found_above_its_goroutine_dump() {
        let d = diagnose(&lines(fixture!("etcd-3.5-tocommit.log")), Source::ContainerLog, None);
        assert_eq!((d.signature, d.action), (Signature::CorruptData, Action::Replace));
        assert!(d.evidence.iter().any(|e| e.contains("tocommit(28) is out of range")), "{:?}", d.evidence);
        assert!(d.evidence.iter().all(|e| e.len() <= MAX_LINE + '…'.len_utf8()));
        assert!(!d.evidence.iter().any(|e| e.contains("stacktrace")), "JSON lines are compacted: {:?}", d.evidence);
    }

    #[test]
    fn refusals_win_over_heals_in_one_log() {
        let mixed = "Error: etcdserver: member not found\n{\"level\":\"warn\",\"msg\":\"request cluster ID mismatch\"}\n";
        assert_eq!(sig(mixed), Signature::ClusterIdMismatch);
        let d = diagnose(&lines(mixed), Source::TerminationMessage, None);
        assert_eq!((d.action, d.code), (Action::Refuse, Some(Code::SplitBrain)));
        let quorum = format!("{}\n{}", fixture!("bitnami-9-cluster-not-responding.log"), fixture!("etcd-3.5-wal-crc.log"));
        assert_eq!(decide(sig(&quorum), None).1, Some(Code::QuorumAtRisk));
    }

    #[test]
    fn only_what_etcd_says_counts_not_what_clients_wrote() {
        // A key named like a signature, in a slow-request warning: not a split brain.
        let slow = r#"{"level":"warn","msg":"apply request took too long","request":"key:\"cluster ID mismatch\" "}"#;
        assert_eq!(sig(slow), Signature::Unknown);
        // A member id mismatch is not a cluster id mismatch.
        let member = r#"{"level":"warn","msg":"ignored streaming request; ID mismatch","remote-peer-id-stream-handler":"a","remote-peer-id-header":"b"}"#;
        assert_eq!(sig(&format!("{member}\n{}", fixture!("etcd-3.5-removed.log"))), Signature::MemberRemoved);
    }

    #[test]
    fn evidence_is_printable() {
        let evil = "{\"level\":\"fatal\",\"msg\":\"discovery failed\",\"error\":\"walpb: crc mismatch\\u001b[2J\\u202e\"}";
        let d = diagnose(&[evil, "Error: etcdserver: member not found\r\u{9b}31m"], Source::ContainerLog, None);
        assert!(d.evidence.iter().all(|e| !e.chars().any(|c| c.is_control() || c == '\u{202e}')), "{:?}", d.evidence);
        assert!(d.evidence[0].contains("\\u{1b}[2J"), "{:?}", d.evidence);
    }

    #[test]
    fn unexpected_eof_alone_is_not_corruption() {
        assert_eq!(sig("{\"level\":\"warn\",\"msg\":\"lost TCP streaming connection\",\"error\":\"unexpected EOF\"}"), Signature::Unknown);
        assert_eq!(
            sig("{\"level\":\"fatal\",\"msg\":\"discovery failed\",\"error\":\"unexpected EOF\"}"),
            Signature::Unknown,
            "v2 discovery over the network"
        );
        assert_eq!(sig("{\"level\":\"fatal\",\"msg\":\"failed to read WAL\",\"error\":\"unexpected EOF\"}"), Signature::CorruptData);
        assert_eq!(
            sig("2019-10-09 09:02:16.175301 C | etcdserver: read wal error (unexpected EOF) and cannot be repaired"),
            Signature::CorruptData
        );
    }

    #[test]
    fn actions_by_generation() {
        assert_eq!(decide(Signature::MemberRemoved, Some(Generation::Bitnami10)).0, Action::Heal);
        assert_eq!(decide(Signature::MemberRemoved, Some(Generation::Plain)).0, Action::Heal);
        let (a, c, _) = decide(Signature::MemberRemoved, Some(Generation::Bitnami12));
        assert_eq!((a, c), (Action::Refuse, Some(Code::SelfHealing)));
        assert_eq!(decide(Signature::CorruptData, Some(Generation::Bitnami11)).0, Action::Replace, "the image cannot heal corrupt data");
        assert_eq!(decide(Signature::Unknown, None).1, Some(Code::UnknownFailure));
        assert_eq!(decide(Signature::MemberNotFound, None).0, Action::Heal);
    }

    #[test]
    fn only_failures_that_meet_the_same_state_on_every_start_repeat() {
        let repeating: Vec<Signature> = Signature::ALL.into_iter().filter(|s| s.repeats()).collect();
        assert_eq!(repeating, [Signature::MemberNotFound, Signature::BadMemberId, Signature::CorruptData]);
        // Whatever repeats is something the agent acts on, never a refusal.
        for s in repeating {
            assert_ne!(decide(s, None).0, Action::Refuse, "{s:?}");
        }
    }

    #[test]
    fn nothing_to_read_is_unknown_and_says_so() {
        let d = diagnose(&[], Source::ContainerLog, Some((Generation::Bitnami10, "label".into())));
        assert_eq!((d.signature, d.source, d.code), (Signature::Unknown, Source::None, Some(Code::UnknownFailure)));
        let d = diagnose(
            &lines("etcd 10:00:00.00 INFO  ==> x\nError: open /bitnami/etcd/data: permission denied\n"),
            Source::ContainerLog,
            None,
        );
        assert_eq!(d.signature, Signature::Unknown);
        assert_eq!(d.evidence.last().map(String::as_str), Some("Error: open /bitnami/etcd/data: permission denied"));
        let v = serde_json::to_value(&d).unwrap();
        assert_eq!(v["signature"], "Unknown");
        assert_eq!(v["action"], "refuse");
        assert_eq!(v["code"], "UnknownFailure");
        assert_eq!(v["source"], "containerLog");
    }

    #[test]
    fn cri_and_docker_log_formats() {
        let cri = "2026-12-04T10:22:25.411641Z stderr F etcd 10:22:25.41 INFO  ==> Updating member in existing cluster\n\
                   2026-12-04T10:22:25.5Z stderr P Error: etcdserver: \n\
                   2026-12-04T10:22:25.5Z stderr F member not found\n";
        assert_eq!(
            cri_lines(cri),
            ["etcd 10:22:25.41 INFO  ==> Updating member in existing cluster", "Error: etcdserver: member not found"]
        );
        let docker = "{\"log\":\"Error: etcdserver: member not found\\n\",\"stream\":\"stderr\",\"time\":\"2026-12-04T10:22:25.5Z\"}\n";
        assert_eq!(cri_lines(docker), ["Error: etcdserver: member not found"]);
        assert_eq!(cri_lines("plain line"), ["plain line"]);
        assert_eq!(cri_lines("2026-12-04T10:22:25.5Z stdout F "), [""]);
    }

    #[test]
    fn evidence_is_bounded_and_deduplicated() {
        let many: String = (0..50).map(|i| format!("{{\"level\":\"warn\",\"msg\":\"request cluster ID mismatch\",\"n\":{i}}}\n")).collect();
        let d = diagnose(&lines(&many), Source::ContainerLog, None);
        assert_eq!(d.evidence, ["warn request cluster ID mismatch"]);
        let long = format!("Error: etcdserver: member not found {}", "é".repeat(1000));
        let d = diagnose(&[long.as_str()], Source::ContainerLog, None);
        assert!(d.evidence[0].len() <= MAX_LINE + 3);
    }
}
