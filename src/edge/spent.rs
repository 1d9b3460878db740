//! The nonces of links already exchanged for a session, so that each link works once, also
//! across a restart: kept in memory for the check and appended to `STATE_DIR/spent-links`
//! (a line per link: nonce and expiry, both hex) before the link's session is handed out.
//! At start the file is read back and rewritten with the links not yet expired; while
//! running it is rewritten the same way every [`COMPACT_EVERY`] lines. Links live minutes,
//! so the file stays small.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

/// Lines appended before the file is rewritten without the expired ones.
const COMPACT_EVERY: usize = 65_536;

pub(super) struct SpentLinks {
    /// Nonce to the link's expiry (ms since the epoch).
    memory: moka::sync::Cache<u64, u64>,
    file: Option<Mutex<Journal>>,
}

struct Journal {
    path: PathBuf,
    file: File,
    lines: usize,
}

impl SpentLinks {
    /// Reads what an earlier run spent from `dir` (none: memory only), keeping what has not
    /// expired by `now_ms`.
    pub fn open(dir: Option<&Path>, link_ttl: Duration, now_ms: u64) -> Self {
        let memory = moka::sync::Cache::builder()
            .max_capacity(10_000_000)
            .time_to_live(link_ttl)
            .build();
        let file = dir.and_then(|dir| match Journal::open(dir, &memory, now_ms) {
            Ok(journal) => Some(Mutex::new(journal)),
            Err(e) => {
                log::error!(
                    "cannot keep spent links in {}: {e}; a restart will make links opened \
                     before it usable again until they expire",
                    dir.display()
                );
                None
            }
        });
        Self { memory, file }
    }

    /// Marks the link `nonce` (valid until `expires_ms`) spent: `false` when it was already.
    pub fn spend(&self, nonce: u64, expires_ms: u64, now_ms: u64) -> bool {
        if !self.memory.entry(nonce).or_insert(expires_ms).is_fresh() {
            return false;
        }
        if let Some(journal) = &self.file {
            let mut journal = journal.lock().unwrap_or_else(|e| e.into_inner());
            if let Err(e) = journal.append(nonce, expires_ms, &self.memory, now_ms) {
                log::error!(
                    "cannot record a spent link in {}: {e}",
                    journal.path.display()
                );
            }
        }
        true
    }
}

impl Journal {
    fn open(
        dir: &Path,
        memory: &moka::sync::Cache<u64, u64>,
        now_ms: u64,
    ) -> std::io::Result<Self> {
        fs::create_dir_all(dir)?;
        let path = dir.join("spent-links");
        match File::open(&path) {
            Ok(file) => {
                for line in BufReader::new(file).lines() {
                    let line = line?;
                    let parsed = line.split_once(' ').and_then(|(nonce, expires)| {
                        Some((
                            u64::from_str_radix(nonce, 16).ok()?,
                            u64::from_str_radix(expires, 16).ok()?,
                        ))
                    });
                    // A torn last line (a crash mid-write) is skipped.
                    if let Some((nonce, expires)) = parsed.filter(|&(_, e)| e > now_ms) {
                        memory.insert(nonce, expires);
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let (file, lines) = rewrite(&path, memory, now_ms)?;
        Ok(Self { path, file, lines })
    }

    fn append(
        &mut self,
        nonce: u64,
        expires_ms: u64,
        memory: &moka::sync::Cache<u64, u64>,
        now_ms: u64,
    ) -> std::io::Result<()> {
        if self.lines >= COMPACT_EVERY {
            (self.file, self.lines) = rewrite(&self.path, memory, now_ms)?;
        }
        self.file
            .write_all(format!("{nonce:x} {expires_ms:x}\n").as_bytes())?;
        self.lines += 1;
        Ok(())
    }
}

/// Writes the links not yet expired beside the journal at `path`, syncs and renames it over:
/// the journal opened for appending, and its lines.
fn rewrite(
    path: &Path,
    memory: &moka::sync::Cache<u64, u64>,
    now_ms: u64,
) -> std::io::Result<(File, usize)> {
    let fresh = path.with_extension("new");
    let mut text = String::new();
    let mut lines = 0;
    for (nonce, expires) in memory.iter() {
        if expires > now_ms {
            text.push_str(&format!("{:x} {expires:x}\n", *nonce));
            lines += 1;
        }
    }
    let mut file = File::create(&fresh)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    fs::rename(&fresh, path)?;
    Ok((OpenOptions::new().append(true).open(path)?, lines))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spent_links_stay_spent_across_a_restart() {
        let dir = std::env::temp_dir().join(format!("spent-{}", rand::random::<u64>()));
        let ttl = Duration::from_secs(300);
        let links = SpentLinks::open(Some(&dir), ttl, 1_000);
        assert!(links.spend(7, 10_000, 1_000));
        assert!(!links.spend(7, 10_000, 1_001));
        assert!(links.spend(8, 2_000, 1_002));
        drop(links);
        // A torn line from a crash is skipped.
        let mut file = OpenOptions::new()
            .append(true)
            .open(dir.join("spent-links"))
            .unwrap();
        file.write_all(b"9").unwrap();
        let links = SpentLinks::open(Some(&dir), ttl, 3_000);
        assert!(!links.spend(7, 10_000, 3_000), "spent before the restart");
        // Expired links are forgotten (their own expiry refuses them anyway).
        assert!(links.spend(8, 2_000, 3_000));
        let text = fs::read_to_string(dir.join("spent-links")).unwrap();
        assert_eq!(text.lines().count(), 2, "{text}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
