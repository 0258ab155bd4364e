//! The MQTT front end's journal of accepted requests (`[mqtt] journal_dir`): a request is
//! written here, durably, before the broker gets its acknowledgement, and removed once the
//! broker has acknowledged its terminal event. A daemon killed in between (SIGKILL, power loss,
//! a panic that aborts) finds the request here at its next start and runs it again, so every
//! accepted request gets its terminal event; requests not yet acknowledged the broker delivers
//! again itself (persistent session), and the front end recognises those it already holds.
//!
//! One file a request, `<sequence>.json`, written to a temporary name, synced, renamed and the
//! directory synced: a file is either whole or absent. A file that cannot be read back (edited
//! by hand, a disk error) is renamed `<name>.bad` and reported, never deleted.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// One accepted request as it arrived: where its replies go and its payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub reply_topic: String,
    /// MQTT 5 correlation data, echoed on every reply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation: Option<Vec<u8>>,
    /// The request's JSON (it parsed, so it is UTF-8).
    pub request: String,
}

pub struct Journal {
    dir: PathBuf,
    next: u64,
}

impl Journal {
    /// Opens (creating it, mode 0700: requests may hold private text) the journal in `dir`, and
    /// returns the entries a previous run left, oldest first, with their sequence numbers.
    pub fn open(dir: &Path) -> Result<(Self, Vec<(u64, Entry)>)> {
        let key = "mqtt.journal_dir";
        fs::create_dir_all(dir)
            .with_context(|| format!("{key}: cannot create {}", dir.display()))?;
        set_private(dir).with_context(|| format!("{key}: cannot restrict {}", dir.display()))?;
        let mut left = Vec::new();
        let listing =
            fs::read_dir(dir).with_context(|| format!("{key}: cannot read {}", dir.display()))?;
        for item in listing {
            let path = item
                .with_context(|| format!("{key}: cannot read {}", dir.display()))?
                .path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.starts_with('.') && name.ends_with(".tmp") {
                // A write that never reached its rename: the request was not acknowledged, so
                // the broker still has it.
                let _ = fs::remove_file(&path);
                continue;
            }
            let Some(seq) = name
                .strip_suffix(".json")
                .and_then(|s| s.parse::<u64>().ok())
            else {
                continue;
            };
            match read_entry(&path) {
                Ok(entry) => left.push((seq, entry)),
                Err(e) => {
                    let bad = path.with_extension("json.bad");
                    tracing::error!(
                        "mqtt journal: {} cannot be read ({e:#}); kept as {}",
                        path.display(),
                        bad.display()
                    );
                    let _ = fs::rename(&path, &bad);
                }
            }
        }
        left.sort_by_key(|(seq, _)| *seq);
        let next = left.last().map_or(0, |(seq, _)| seq + 1);
        let journal = Self {
            dir: dir.to_path_buf(),
            next,
        };
        // Proves the directory is writable now, not at the first request.
        let probe = journal.dir.join(".probe.tmp");
        File::create(&probe)
            .and_then(|_| fs::remove_file(&probe))
            .with_context(|| format!("{key}: cannot write in {}", dir.display()))?;
        Ok((journal, left))
    }

    /// Writes `entry` durably; its sequence number releases it.
    pub fn record(&mut self, entry: &Entry) -> Result<u64> {
        let seq = self.next;
        self.next += 1;
        let tmp = self.dir.join(format!(".{seq:016}.tmp"));
        let path = self.path(seq);
        let json = serde_json::to_vec(entry)?;
        let write = || -> std::io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(&json)?;
            f.sync_all()?;
            fs::rename(&tmp, &path)?;
            File::open(&self.dir)?.sync_all()
        };
        write().with_context(|| format!("mqtt journal: cannot write {}", path.display()))?;
        Ok(seq)
    }

    /// Forgets an entry whose terminal event the broker has acknowledged.
    pub fn release(&mut self, seq: u64) {
        let path = self.path(seq);
        if let Err(e) = fs::remove_file(&path) {
            tracing::warn!("mqtt journal: cannot remove {}: {e}", path.display());
        }
    }

    fn path(&self, seq: u64) -> PathBuf {
        self.dir.join(format!("{seq:016}.json"))
    }
}

fn read_entry(path: &Path) -> Result<Entry> {
    Ok(serde_json::from_slice(&fs::read(path)?)?)
}

fn set_private(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory for one test, removed when dropped.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(tag: &str) -> Self {
            let dir = std::env::temp_dir()
                .join(format!("qwen2-edge-journal-{tag}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }

        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn entry(i: u8) -> Entry {
        Entry {
            reply_topic: format!("devices/{i}/answer"),
            correlation: i.is_multiple_of(2).then(|| vec![i, 0, 255]),
            request: format!(r#"{{"op":"generate","id":"r{i}","prompt":"x"}}"#),
        }
    }

    #[test]
    fn what_is_not_released_is_found_again_in_order() {
        let dir = Scratch::new("order");
        let (mut j, left) = Journal::open(dir.path()).unwrap();
        assert!(left.is_empty());
        let seqs: Vec<u64> = (0..5).map(|i| j.record(&entry(i)).unwrap()).collect();
        j.release(seqs[1]);
        j.release(seqs[3]);
        drop(j);
        let (mut j, left) = Journal::open(dir.path()).unwrap();
        let found: Vec<Entry> = left.iter().map(|(_, e)| e.clone()).collect();
        assert_eq!(found, vec![entry(0), entry(2), entry(4)]);
        // New entries sort after the old ones.
        let seq = j.record(&entry(9)).unwrap();
        assert!(seq > left.last().unwrap().0);
    }

    #[test]
    fn a_damaged_entry_is_kept_aside_and_a_half_write_is_dropped() {
        let dir = Scratch::new("damaged");
        let (mut j, _) = Journal::open(dir.path()).unwrap();
        let good = j.record(&entry(1)).unwrap();
        let bad = j.record(&entry(2)).unwrap();
        fs::write(j.path(bad), b"{\"reply_topic\": 3").unwrap();
        fs::write(dir.path().join(".0000000000000099.tmp"), b"{").unwrap();
        drop(j);
        let (_, left) = Journal::open(dir.path()).unwrap();
        assert_eq!(left, vec![(good, entry(1))]);
        let names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.contains(&format!("{bad:016}.json.bad")), "{names:?}");
        assert!(!names.iter().any(|n| n.ends_with(".tmp")), "{names:?}");
    }

    #[test]
    fn an_unwritable_directory_is_an_error_naming_the_key() {
        let dir = Scratch::new("unwritable");
        let file = dir.path().join("not-a-dir");
        fs::write(&file, b"").unwrap();
        let e = Journal::open(&file.join("journal")).err().unwrap();
        assert!(format!("{e:#}").contains("mqtt.journal_dir"), "{e:#}");
    }
}
