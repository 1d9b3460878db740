//! The `process` provider: each instance is a local child process (the demo workspace,
//! JupyterLab, ...) on a free loopback port. For laptops, demos and tests.
//!
//! Its "tags" are a small JSON record per instance in `STATE_DIR/instances/` (the tags set at
//! launch) and, for tags set later, one journal for the folder, `STATE_DIR/tags.log`. Each process
//! runs in its own process group with its working directory in `STATE_DIR/work/<id>/`. The
//! working directory is what makes a process findable when its record is missing (a crash
//! between spawning and writing the record), the way EC2 tags are set from the first moment.
//! After a restart of rstudio-pool, [`Provider::list`] re-adopts the processes that still run
//! and forgets the dead ones.
//!
//! Every workspace runs as the pool's own OS user, so this provider is a convenience for one
//! person or a demo, not a boundary between users (EC2 instances are). It does keep the pool's
//! secrets out of a workspace's environment ([`WORKSPACE_ENV`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use log::{info, warn};
use serde::{Deserialize, Serialize};

use super::{
    InstanceRecord, LaunchSpec, Provider, ProviderError, ProviderState, TAG_NAME, TAG_POOL,
    TAG_PURPOSE,
};
use crate::core::ids::InstanceId;
use crate::core::redact;

/// How long a workspace gets to exit after SIGTERM before its group is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// The variables a workspace takes from the pool's environment, when the pool has them; a
/// trailing `*` takes every variable with that prefix (`LC_*`: the locale). Every workspace
/// starts from an empty environment with these, then the variables the provider sets
/// ([`INSTANCE_ID_VAR`]). Nothing else is passed on, because the pool's environment holds what
/// a workspace must not see:
/// - its secrets: `AUTH_SECRETS` signs every user's link and `API_TOKEN` opens the command API,
///   and code a user runs in a workspace reads its own environment (`/proc/self/environ`), so
///   with them it could forge any user's link and assign or delete workspaces;
/// - settings meant for the pool alone, such as `PORT` (the proxy's port, which code-server
///   reads and then binds itself) or `RUST_LOG`.
///
/// A workspace that needs more is given it explicitly rather than by widening this list.
/// JupyterLab from a virtualenv needs only `PATH` (with the virtualenv's `bin` in it): its
/// scripts name the virtualenv's interpreter, and kernels start with that interpreter.
pub const WORKSPACE_ENV: &[&str] = &[
    "PATH", "HOME", "LANG", "LANGUAGE", "LC_ALL", "LC_*", "TZ", "TMPDIR", "USER", "LOGNAME",
    "SHELL", "TERM",
];

/// The variable that tells a workspace its instance id.
pub const INSTANCE_ID_VAR: &str = "RSTUDIO_POOL_INSTANCE_ID";

/// Whether [`WORKSPACE_ENV`] passes the variable `name` on to workspaces.
fn passed_to_workspaces(name: &OsStr) -> bool {
    let Some(name) = name.to_str() else {
        return false;
    };
    WORKSPACE_ENV
        .iter()
        .any(|allowed| match allowed.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix),
            None => name == *allowed,
        })
}

/// The part of an environment (the pool's) that workspaces inherit: [`WORKSPACE_ENV`].
pub fn workspace_env(
    inherited: impl IntoIterator<Item = (OsString, OsString)>,
) -> Vec<(OsString, OsString)> {
    inherited
        .into_iter()
        .filter(|(name, _)| passed_to_workspaces(name))
        .collect()
}

/// The command line of one purpose: the program and its arguments, with the placeholders
/// `{port}`, `{instance_id}`, `{base_path}` and `{exe}` (this binary).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandTemplate(pub Vec<String>);

impl CommandTemplate {
    pub fn render(&self, exe: &str, port: u16, id: &InstanceId) -> Vec<String> {
        let base_path = format!("/{id}/");
        self.0
            .iter()
            .map(|arg| {
                arg.replace("{exe}", exe)
                    .replace("{port}", &port.to_string())
                    .replace("{instance_id}", id.as_str())
                    .replace("{base_path}", &base_path)
            })
            .collect()
    }
}

/// What the provider keeps on disk about one instance.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    id: String,
    pid: u32,
    /// The process's start time in clock ticks since boot, so a reused pid is not mistaken
    /// for our process.
    start_ticks: u64,
    port: u16,
    launched_at_ms: u64,
    tags: BTreeMap<String, String>,
    /// Paused: its processes ended, its working folder and record kept for a resume.
    #[serde(default)]
    stopped: bool,
}

/// One instance as the state folder holds it: its record, and the tags appended since.
#[derive(Debug, Clone)]
struct Entry {
    record: Record,
    later: BTreeMap<String, String>,
}

impl Entry {
    /// The record with every tag, later ones winning, as a reader of the files sees it.
    fn merged(&self) -> Record {
        let mut record = self.record.clone();
        record
            .tags
            .extend(self.later.iter().map(|(k, v)| (k.clone(), v.clone())));
        record
    }
}

/// The state folder's instances as this process last wrote them, read once at start: only
/// this process writes the folder while it runs, so a listing reads memory, not a file per
/// instance (a round over 600 instances read 1,200 files). Updated after each write succeeds.
type Mirror = Arc<Mutex<HashMap<String, Entry>>>;

fn lock_mirror(
    mirror: &Mutex<HashMap<String, Entry>>,
) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
    mirror.lock().unwrap_or_else(|e| e.into_inner())
}

/// The provider; cheap to clone, so that its blocking parts can run on tokio's blocking pool.
#[derive(Clone)]
pub struct ProcessProvider {
    inner: Arc<Inner>,
}

impl std::ops::Deref for ProcessProvider {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.inner
    }
}

pub struct Inner {
    state_dir: PathBuf,
    pool_name: String,
    commands: HashMap<String, CommandTemplate>,
    exe: String,
    /// What every workspace inherits of the pool's environment ([`WORKSPACE_ENV`]), read once.
    inherited_env: Vec<(OsString, OsString)>,
    /// Processes this run spawned, kept so that their exit is reaped (no zombies).
    children: Mutex<HashMap<String, Child>>,
    /// Ports handed to live workspaces. A port is free to the kernel from the moment we probe
    /// it until the workspace binds it; this set keeps two launches from getting the same one.
    ports: Mutex<HashSet<u16>>,
    /// Tags set after launch ([`Journal`]).
    journal: Journal,
    /// When the last listing looked through /proc for workspaces that lost their record.
    orphans_scanned: Mutex<Option<std::time::Instant>>,
    mirror: Mirror,
    /// How workspaces that died ended (`exited with status 1`), until asked
    /// ([`Provider::diagnose`]); at most [`EXITS_KEPT`].
    exits: Mutex<HashMap<String, String>>,
    /// Values of the pool's own environment that look secret, never shown from a log.
    secret_values: Vec<String>,
}

/// Endings of dead workspaces kept for [`Provider::diagnose`], at most.
const EXITS_KEPT: usize = 1024;
/// Lines of a workspace's log shown when its start failed.
const LOG_TAIL_LINES: usize = 12;

/// How often a listing also looks for workspaces without a record. A record is written before
/// its process starts, so such a process is the remains of a lost state folder or a crash:
/// found at the first listing after a start, and within this long otherwise. Scanning every
/// process's working directory at every reconcile round took a core's worth of time from a
/// burst of assignments (perf, BENCHMARKS.md).
const ORPHAN_SCAN_EVERY: Duration = Duration::from_secs(60);

/// Tags to append for an instance, and who waits for them to be written.
struct Tagging {
    id: InstanceId,
    tags: Vec<(String, String)>,
    done: tokio::sync::oneshot::Sender<Result<(), ProviderError>>,
}

/// A journal with more lines than this, and more than [`COMPACT_RATIO`] lines per instance
/// in the folder, is rewritten with one line per instance (about 8 MB of lines; the rewrite
/// syncs the new file, which a writer waits for, so it is rare).
const COMPACT_AFTER: usize = 65_536;
const COMPACT_RATIO: usize = 4;

impl ProcessProvider {
    /// Creates the provider over `state_dir`, creating its folders.
    pub fn new(
        state_dir: &Path,
        pool_name: &str,
        commands: HashMap<String, CommandTemplate>,
    ) -> io::Result<Self> {
        std::fs::create_dir_all(state_dir.join("instances"))?;
        std::fs::create_dir_all(state_dir.join("work"))?;
        std::fs::create_dir_all(state_dir.join("logs"))?;
        std::fs::create_dir_all(state_dir.join("tmp"))?;
        let state_dir = state_dir.canonicalize()?;
        let exe = std::env::current_exe()?.to_string_lossy().into_owned();
        let mirror: Mirror = Arc::new(Mutex::new(read_state(&state_dir)));
        let journal = Journal::open(&state_dir, Arc::clone(&mirror))?;
        Ok(Self {
            inner: Arc::new(Inner {
                state_dir,
                pool_name: pool_name.to_owned(),
                commands,
                exe,
                inherited_env: workspace_env(std::env::vars_os()),
                children: Mutex::new(HashMap::new()),
                ports: Mutex::new(HashSet::new()),
                journal,
                orphans_scanned: Mutex::new(None),
                mirror,
                exits: Mutex::new(HashMap::new()),
                secret_values: secret_values(std::env::vars_os()),
            }),
        })
    }
}

/// The tags set after launch, for every instance of the folder: `STATE_DIR/tags.log`, one
/// JSON line per tagging, `{"id": "i-...", "tags": {...}}`, later lines winning. A line is on
/// disk before its tagging is reported done, so an owner is recorded before the caller hears
/// of the assignment.
///
/// Written by group commit: the first caller to find nobody writing becomes the writer and
/// appends, in one `write`, everything queued by then, and again until the queue is empty;
/// the others wait for their outcome. The write is a small append to an open file, done in
/// place like a log line. Why: a file per instance cost a `write` each, and a writer thread of
/// its own was not scheduled for 1.3 ms while a burst of assignments kept both cores busy
/// (BENCHMARKS.md).
///
/// Lines of instances that are gone stay until the journal is compacted: at start, and when
/// it grows past [`COMPACT_AFTER`] lines, it is rewritten beside and renamed in, with each
/// live instance's tags on one line.
struct Journal {
    /// Taggings waiting to be written, and whether a caller is writing now.
    queue: Mutex<(Vec<Tagging>, bool)>,
    /// Locked by the one caller writing (and at start).
    file: Mutex<JournalFile>,
}

struct JournalFile {
    path: PathBuf,
    file: std::fs::File,
    /// Lines in the file.
    lines: usize,
    /// A write failed part-way: the file may end in a torn line, so it is rewritten before
    /// the next append.
    torn: bool,
    mirror: Mirror,
}

/// One line of the journal.
#[derive(Serialize, Deserialize)]
struct JournalLine<'a> {
    #[serde(borrow)]
    id: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    tags: BTreeMap<std::borrow::Cow<'a, str>, std::borrow::Cow<'a, str>>,
}

/// Appends one journal line for `id` to `buf`.
fn encode_line<'a>(
    buf: &mut Vec<u8>,
    id: &str,
    tags: impl Iterator<Item = (&'a String, &'a String)>,
) -> serde_json::Result<()> {
    let line = JournalLine {
        id: id.into(),
        tags: tags
            .map(|(k, v)| (k.as_str().into(), v.as_str().into()))
            .collect(),
    };
    serde_json::to_writer(&mut *buf, &line)?;
    buf.push(b'\n');
    Ok(())
}

fn journal_path(state_dir: &Path) -> PathBuf {
    state_dir.join("tags.log")
}

impl Journal {
    /// Opens the folder's journal (whose lines [`read_state`] has put in the mirror) and
    /// compacts it.
    fn open(state_dir: &Path, mirror: Mirror) -> io::Result<Self> {
        let path = journal_path(state_dir);
        let file = JournalFile::append_to(&path)?;
        let mut file = JournalFile {
            path,
            file,
            lines: 0,
            torn: false,
            mirror,
        };
        file.compact()?;
        Ok(Self {
            queue: Mutex::new((Vec::new(), false)),
            file: Mutex::new(file),
        })
    }

    /// Queues a tagging and, when nobody is writing, writes until the queue is empty. Never
    /// awaits: a caller that begins writing finishes.
    fn tag(&self, tagging: Tagging) {
        let lead = {
            let mut queue = self.lock_queue();
            queue.0.push(tagging);
            !std::mem::replace(&mut queue.1, true)
        };
        if !lead {
            return;
        }
        // Should a write panic, the flag must not stay set: every later tagging would wait
        // for a writer that never comes. The next caller writes instead.
        let _turn = Turn(self);
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let batch = {
                let mut queue = self.lock_queue();
                // Emptiness and the flag are settled under the lock that callers queue
                // under, so nothing queued is left without a writer.
                if queue.0.is_empty() {
                    queue.1 = false;
                    return;
                }
                std::mem::take(&mut queue.0)
            };
            file.commit(batch);
        }
    }

    fn lock_queue(&self) -> std::sync::MutexGuard<'_, (Vec<Tagging>, bool)> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A writer's turn; hands the turn back if the writer panics.
struct Turn<'a>(&'a Journal);

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.lock_queue().1 = false;
        }
    }
}

impl JournalFile {
    fn append_to(path: &Path) -> io::Result<std::fs::File> {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
    }

    /// Writes a batch of taggings in one `write` and reports each one's outcome; tags of an
    /// instance not in the folder are refused.
    fn commit(&mut self, batch: Vec<Tagging>) {
        let mut buf = Vec::with_capacity(batch.len() * 128);
        let mut taken = Vec::with_capacity(batch.len());
        {
            let mirror = lock_mirror(&self.mirror);
            for tagging in batch {
                if !mirror.contains_key(tagging.id.as_str()) {
                    let _ = tagging
                        .done
                        .send(Err(ProviderError::NotFound(tagging.id.clone())));
                    continue;
                }
                // Strings and a map of strings: encoding cannot fail.
                if encode_line(
                    &mut buf,
                    tagging.id.as_str(),
                    tagging.tags.iter().map(|(k, v)| (k, v)),
                )
                .is_ok()
                {
                    taken.push(tagging);
                }
            }
        }
        if taken.is_empty() {
            return;
        }
        let written = self.write(&buf);
        if written.is_ok() {
            let mut mirror = lock_mirror(&self.mirror);
            for tagging in &taken {
                if let Some(entry) = mirror.get_mut(tagging.id.as_str()) {
                    entry.later.extend(tagging.tags.iter().cloned());
                }
            }
            self.lines += taken.len();
        }
        for tagging in taken {
            let outcome = match &written {
                Ok(()) => Ok(()),
                Err(e) => Err(ProviderError::Other(format!(
                    "cannot tag {}: {}: {e}",
                    tagging.id,
                    self.path.display()
                ))),
            };
            let _ = tagging.done.send(outcome);
        }
        let instances = lock_mirror(&self.mirror).len();
        if self.lines > COMPACT_AFTER.max(COMPACT_RATIO * instances) {
            if let Err(e) = self.compact() {
                warn!("cannot compact {}: {e}", self.path.display());
            }
        }
    }

    fn write(&mut self, buf: &[u8]) -> io::Result<()> {
        use std::io::Write;
        if self.torn {
            self.compact()?;
        }
        let written = self.file.write_all(buf);
        if written.is_err() {
            self.torn = true;
        }
        written
    }

    /// Rewrites the journal with one line per instance of the folder that has tags, beside
    /// it, and renames it in: lines of forgotten instances, and a torn line, are dropped.
    fn compact(&mut self) -> io::Result<()> {
        use std::io::Write;
        let mut buf = Vec::new();
        let mut lines = 0;
        for (id, entry) in lock_mirror(&self.mirror).iter() {
            if entry.later.is_empty() {
                continue;
            }
            encode_line(&mut buf, id, entry.later.iter())?;
            lines += 1;
        }
        let tmp = self.path.with_extension("log.tmp");
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(&buf)?;
        // On disk before it replaces the old journal: a crash leaves one or the other.
        file.sync_data()?;
        std::fs::rename(&tmp, &self.path)?;
        self.file = Self::append_to(&self.path)?;
        self.lines = lines;
        self.torn = false;
        Ok(())
    }
}

/// Every instance in the state folder: each record with the tags set since, from the journal
/// (and from the tags file per instance that versions before the journal kept). An unreadable
/// record is skipped (its process, if any, is found without one and stopped); a torn line of
/// tags after a crash is skipped, and lines of instances without a record are ignored.
fn read_state(state_dir: &Path) -> HashMap<String, Entry> {
    let mut state = HashMap::new();
    let Ok(entries) = std::fs::read_dir(state_dir.join("instances")) else {
        return state;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(id) = name.strip_suffix(".json") else {
            continue;
        };
        let record = std::fs::read(entry.path())
            .map_err(|e| e.to_string())
            .and_then(|bytes| serde_json::from_slice::<Record>(&bytes).map_err(|e| e.to_string()));
        let record = match record {
            Ok(record) => record,
            Err(e) => {
                warn!("ignoring unreadable instance record {name}: {e}");
                continue;
            }
        };
        let mut later = BTreeMap::new();
        if let Ok(lines) = std::fs::read_to_string(legacy_tags_path(state_dir, id)) {
            for line in lines.lines() {
                if let Ok(tags) = serde_json::from_str::<BTreeMap<String, String>>(line) {
                    later.extend(tags);
                }
            }
        }
        state.insert(record.id.clone(), Entry { record, later });
    }
    if let Ok(journal) = std::fs::read(journal_path(state_dir)) {
        for line in journal.split(|&b| b == b'\n') {
            let Ok(line) = serde_json::from_slice::<JournalLine>(line) else {
                continue;
            };
            if let Some(entry) = state.get_mut(line.id.as_ref()) {
                entry
                    .later
                    .extend(line.tags.into_iter().map(|(k, v)| (k.into(), v.into())));
            }
        }
    }
    state
}

fn record_path(state_dir: &Path, id: &str) -> PathBuf {
    state_dir.join("instances").join(format!("{id}.json"))
}

/// Where versions before the journal kept an instance's later tags.
fn legacy_tags_path(state_dir: &Path, id: &str) -> PathBuf {
    state_dir.join("instances").join(format!("{id}.tags"))
}

impl Inner {
    fn record_path(&self, id: &str) -> PathBuf {
        record_path(&self.state_dir, id)
    }

    fn log_path(&self, id: &str) -> PathBuf {
        self.state_dir.join("logs").join(format!("{id}.log"))
    }

    fn lock_ports(&self) -> std::sync::MutexGuard<'_, HashSet<u16>> {
        self.ports.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn reserve_port(&self) -> io::Result<u16> {
        for _ in 0..32 {
            let port = free_port()?;
            if self.lock_ports().insert(port) {
                return Ok(port);
            }
        }
        Err(io::Error::other(
            "every port the kernel offered is reserved by another workspace",
        ))
    }

    fn work_dir(&self) -> PathBuf {
        self.state_dir.join("work")
    }

    fn write_record(&self, record: &Record) -> io::Result<()> {
        let path = self.record_path(&record.id);
        // Written beside, then renamed in: a reader sees the old record or the new one, and
        // the listed folder never holds half-written files.
        let tmp = self
            .state_dir
            .join("tmp")
            .join(format!("{}.json", record.id));
        std::fs::write(&tmp, serde_json::to_vec_pretty(record)?)?;
        std::fs::rename(tmp, path)?;
        lock_mirror(&self.mirror)
            .entry(record.id.clone())
            .and_modify(|e| e.record = record.clone())
            .or_insert_with(|| Entry {
                record: record.clone(),
                later: BTreeMap::new(),
            });
        Ok(())
    }

    /// An instance's record with every tag, from the mirror of the state folder.
    fn read_record(&self, id: &str) -> io::Result<Record> {
        lock_mirror(&self.mirror)
            .get(id)
            .map(Entry::merged)
            .ok_or_else(|| io::ErrorKind::NotFound.into())
    }

    fn spawn(&self, spec: &LaunchSpec) -> Result<InstanceRecord, ProviderError> {
        let fail = |reason: String| ProviderError::Launch {
            purpose: spec.purpose.clone(),
            reason,
            in_doubt: false,
        };
        let template = self.commands.get(&spec.purpose).ok_or_else(|| {
            fail(format!(
                "no command is configured for purpose `{}` of the process provider",
                spec.purpose
            ))
        })?;
        if template.0.is_empty() {
            return Err(fail("the command is empty".into()));
        }
        let id = InstanceId::from_bits(rand::random());
        let work = self.work_dir().join(id.as_str());
        std::fs::create_dir_all(&work).map_err(|e| fail(format!("{}: {e}", work.display())))?;
        // The log outlives the instance, so that a workspace that died can be diagnosed.
        let log = std::fs::File::create(self.log_path(id.as_str()))
            .map_err(|e| fail(format!("cannot create the workspace log: {e}")))?;
        let log_err = log
            .try_clone()
            .map_err(|e| fail(format!("cannot create the workspace log: {e}")))?;
        let port = self
            .reserve_port()
            .map_err(|e| fail(format!("no free loopback port: {e}")))?;

        let mut tags = BTreeMap::new();
        tags.insert(TAG_PURPOSE.to_owned(), spec.purpose.clone());
        tags.insert(TAG_POOL.to_owned(), self.pool_name.clone());
        tags.insert(
            TAG_NAME.to_owned(),
            format!("{}-{}", self.pool_name, spec.purpose),
        );
        for (k, v) in &spec.tags {
            tags.insert(k.clone(), v.clone());
        }

        // The record exists before the process does, so that a listing never finds the
        // process without it; pid 0 marks a launch in progress.
        let mut record = Record {
            id: id.as_str().to_owned(),
            pid: 0,
            start_ticks: 0,
            port,
            launched_at_ms: now_ms(),
            tags,
            stopped: false,
        };
        if let Err(e) = self.write_record(&record) {
            // Nothing of the instance is kept: files, mirror entry, port.
            self.lock_ports().remove(&port);
            self.forget(id.as_str());
            return Err(fail(format!("cannot write the instance record: {e}")));
        }
        if let Err(e) = self.run(&mut record, template, log, log_err) {
            self.forget(id.as_str());
            return Err(fail(e));
        }
        info!(
            "launched {id} ({}) as pid {} on port {port}",
            spec.purpose, record.pid
        );
        Ok(to_instance(&record))
    }

    /// Starts the workspace of `record` in its working folder on `record.port`, and records
    /// its process.
    fn run(
        &self,
        record: &mut Record,
        template: &CommandTemplate,
        log: std::fs::File,
        log_err: std::fs::File,
    ) -> Result<(), String> {
        let id = InstanceId::parse(&record.id).map_err(|e| e.to_string())?;
        let argv = template.render(&self.exe, record.port, &id);
        let (program, args) = argv.split_first().ok_or("the command is empty")?;
        let spawned = {
            use std::os::unix::process::CommandExt;
            Command::new(program)
                .args(args)
                .current_dir(self.work_dir().join(id.as_str()))
                // Only what WORKSPACE_ENV allows of the pool's environment: not its secrets.
                .env_clear()
                .envs(self.inherited_env.iter().map(|(k, v)| (k, v)))
                .env(INSTANCE_ID_VAR, id.as_str())
                .stdin(Stdio::null())
                .stdout(log)
                .stderr(log_err)
                // Its own process group, so that stopping it stops everything it started, and
                // so that it outlives a crash of rstudio-pool.
                .process_group(0)
                .spawn()
        };
        let child = spawned.map_err(|e| format!("cannot start `{program}`: {e}"))?;
        record.pid = child.id();
        record.start_ticks = read_stat(record.pid).map(|s| s.start_ticks).unwrap_or(0);
        record.stopped = false;
        if let Err(e) = self.write_record(record) {
            kill_group(record.pid, libc::SIGKILL);
            return Err(format!("cannot write the instance record: {e}"));
        }
        self.lock_children().insert(record.id.clone(), child);
        Ok(())
    }

    /// The record of `id`, or what the provider says when it has none.
    fn instance_record(&self, id: &InstanceId) -> Result<Record, ProviderError> {
        self.read_record(id.as_str()).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                ProviderError::NotFound(id.clone())
            } else {
                ProviderError::Other(format!("record of {id}: {e}"))
            }
        })
    }

    /// Starts a paused instance again in its working folder, on a new port.
    fn resume(&self, id: &InstanceId) -> Result<InstanceRecord, ProviderError> {
        let mut record = self.instance_record(id)?;
        if !record.stopped {
            return Ok(to_instance(&record));
        }
        let fail = |reason: String| ProviderError::Other(format!("cannot resume {id}: {reason}"));
        let purpose = record.tags.get(TAG_PURPOSE).cloned().unwrap_or_default();
        let template = self
            .commands
            .get(&purpose)
            .ok_or_else(|| fail(format!("no command is configured for purpose `{purpose}`")))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(id.as_str()))
            .map_err(|e| fail(format!("cannot open the workspace log: {e}")))?;
        let log_err = log
            .try_clone()
            .map_err(|e| fail(format!("cannot open the workspace log: {e}")))?;
        record.port = self
            .reserve_port()
            .map_err(|e| fail(format!("no free loopback port: {e}")))?;
        let port = record.port;
        self.run(&mut record, template, log, log_err).map_err(|e| {
            self.lock_ports().remove(&port);
            fail(e)
        })?;
        info!("resumed {id} as pid {} on port {port}", record.pid);
        Ok(to_instance(&record))
    }

    fn lock_children(&self) -> std::sync::MutexGuard<'_, HashMap<String, Child>> {
        // A panic while holding this lock cannot leave the map inconsistent: take it anyway.
        self.children.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the process of `record` still runs (and is the same process).
    fn is_alive(&self, record: &Record) -> bool {
        !record.stopped && self.process_alive(record)
    }

    /// Whether the process `record` names still runs, stopped or not (a stop writes the
    /// record first, then ends the process).
    fn process_alive(&self, record: &Record) -> bool {
        if record.pid == 0 {
            // A launch in progress (or one that died between its two record writes).
            return now_ms().saturating_sub(record.launched_at_ms) < 60_000;
        }
        if let Some(child) = self.lock_children().get_mut(&record.id) {
            // Our own child: running until reaped, and its pid cannot be reused before.
            return matches!(child.try_wait(), Ok(None));
        }
        match read_stat(record.pid) {
            Some(stat) => {
                stat.state != 'Z'
                    && stat.state != 'X'
                    && (record.start_ticks == 0 || stat.start_ticks == record.start_ticks)
            }
            None => false,
        }
    }

    fn list_blocking(&self) -> Result<Vec<InstanceRecord>, ProviderError> {
        // Processes first, records second: a record is written before its process starts, so
        // every process seen here has its record by the time the records are read.
        let scan = {
            let mut last = self
                .orphans_scanned
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let due = last.is_none_or(|at| at.elapsed() >= ORPHAN_SCAN_EVERY);
            if due {
                *last = Some(std::time::Instant::now());
            }
            due
        };
        let leaders = if scan {
            group_leaders_under(&self.work_dir())
        } else {
            Vec::new()
        };
        let records: Vec<Record> = lock_mirror(&self.mirror)
            .values()
            .map(Entry::merged)
            .collect();
        let mut live = Vec::new();
        let mut known = std::collections::HashSet::new();
        for record in records {
            known.insert(record.id.clone());
            if record.stopped {
                // Paused: nothing runs, everything is kept.
                live.push(to_instance(&record));
            } else if self.is_alive(&record) {
                self.lock_ports().insert(record.port);
                live.push(to_instance(&record));
            } else {
                let ended = self
                    .lock_children()
                    .get_mut(&record.id)
                    .and_then(|c| c.try_wait().ok().flatten())
                    .map(|status| describe_exit(&status))
                    .unwrap_or_else(|| "is no longer running".to_owned());
                info!(
                    "instance {} (pid {}) {ended}; forgetting it",
                    record.id, record.pid
                );
                {
                    let mut exits = self.exits.lock().unwrap_or_else(|e| e.into_inner());
                    if exits.len() >= EXITS_KEPT {
                        exits.clear();
                    }
                    exits.insert(record.id.clone(), ended);
                }
                self.forget(&record.id);
            }
        }
        // Processes without a record: report them with no tags, so the pool terminates them.
        for (pid, id) in leaders {
            if known.contains(&id) {
                continue;
            }
            if let Ok(id) = InstanceId::parse(&id) {
                warn!("found process {pid} of {id} without a record");
                live.push(InstanceRecord {
                    id,
                    state: ProviderState::Running,
                    tags: BTreeMap::new(),
                    address: None,
                    launched_at_ms: 0,
                    key_name: None,
                    client_token: None,
                });
            }
        }
        Ok(live)
    }

    fn forget(&self, id: &str) {
        if let Ok(record) = self.read_record(id) {
            self.lock_ports().remove(&record.port);
        }
        self.lock_children().remove(id);
        let _ = std::fs::remove_file(self.record_path(id));
        let _ = std::fs::remove_file(legacy_tags_path(&self.state_dir, id));
        lock_mirror(&self.mirror).remove(id);
        let _ = std::fs::remove_dir_all(self.work_dir().join(id));
    }

    /// The process group leader of `id`, if it still runs: from its record, or, without one,
    /// found by its working directory.
    fn pid_to_stop(&self, id: &InstanceId) -> Result<Option<u32>, ProviderError> {
        match self.read_record(id.as_str()) {
            Ok(record) if record.pid != 0 && self.process_alive(&record) => Ok(Some(record.pid)),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Ok(group_leaders_under(&self.work_dir())
                    .into_iter()
                    .find(|(_, found)| found == id.as_str())
                    .map(|(pid, _)| pid))
            }
            Err(e) => Err(ProviderError::Other(format!("record of {id}: {e}"))),
        }
    }

    fn reap(&self, id: &InstanceId) {
        if let Some(child) = self.lock_children().get_mut(id.as_str()) {
            let _ = child.try_wait();
        }
    }
}

impl ProcessProvider {
    /// Ends the processes of `id` (its group, then any that left it but still work in its
    /// folder, such as kernels started in sessions of their own). Returns whether it ran.
    async fn end_processes(&self, id: &InstanceId) -> Result<(), ProviderError> {
        // Reading the record, and scanning /proc without one: off the async workers.
        let (this, wanted) = (self.clone(), id.clone());
        let pid = tokio::task::spawn_blocking(move || this.pid_to_stop(&wanted))
            .await
            .map_err(|e| ProviderError::Other(format!("stop task failed: {e}")))??;
        if let Some(pid) = pid {
            kill_group(pid, libc::SIGTERM);
            let deadline = tokio::time::Instant::now() + STOP_GRACE;
            while group_alive(pid) && tokio::time::Instant::now() < deadline {
                self.reap(id);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if group_alive(pid) {
                warn!("{id} ignored SIGTERM for {STOP_GRACE:?}; killing its process group");
                kill_group(pid, libc::SIGKILL);
            }
            self.reap(id);
        }
        let folder = self.work_dir().join(id.as_str());
        let strays = tokio::task::spawn_blocking(move || processes_under(&folder))
            .await
            .unwrap_or_default();
        for stray in strays {
            warn!("{id}: ending process {stray}, which left the workspace's process group");
            // SAFETY: kill(2) on a pid; no memory is involved.
            unsafe {
                libc::kill(stray as i32, libc::SIGKILL);
            }
        }
        Ok(())
    }
}

#[async_trait]
impl Provider for ProcessProvider {
    fn kind(&self) -> &'static str {
        "process"
    }

    /// A fork and an exec, queued behind other blocking work at worst.
    fn launch_deadline(&self) -> Duration {
        Duration::from_secs(30)
    }

    async fn launch(&self, spec: &LaunchSpec) -> Result<InstanceRecord, ProviderError> {
        // fork/exec and a few small file writes: done off the async workers.
        let this = self.clone();
        let spec = spec.clone();
        tokio::task::spawn_blocking(move || this.spawn(&spec))
            .await
            .map_err(|e| ProviderError::Other(format!("launch task failed: {e}")))?
    }

    async fn list(&self) -> Result<Vec<InstanceRecord>, ProviderError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.list_blocking())
            .await
            .map_err(|e| ProviderError::Other(format!("list task failed: {e}")))?
    }

    async fn set_tags(
        &self,
        id: &InstanceId,
        tags: &[(String, String)],
    ) -> Result<(), ProviderError> {
        let stopped = || ProviderError::Other(format!("the tags of {id} were not written"));
        let (done, reply) = tokio::sync::oneshot::channel();
        self.journal.tag(Tagging {
            id: id.clone(),
            tags: tags.to_vec(),
            done,
        });
        reply.await.map_err(|_| stopped())?
    }

    /// Ends every process of the workspace (paused means no compute) and keeps its folder
    /// and record. There is no memory to keep: `hibernate` stops it the same way.
    async fn stop(&self, id: &InstanceId, _hibernate: bool) -> Result<(), ProviderError> {
        let mut record = self.instance_record(id)?;
        if record.stopped {
            // Stopped already; a crash may have come between the record and the processes.
            return self.end_processes(id).await;
        }
        // The record says stopped before any process ends: a crash in between must not
        // leave a record of a running workspace whose process is gone (that folder would be
        // taken for a dead instance's, and deleted).
        record.stopped = true;
        let port = record.port;
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.write_record(&record))
            .await
            .map_err(|e| ProviderError::Other(format!("stop task failed: {e}")))?
            .map_err(|e| ProviderError::Other(format!("cannot write the record of {id}: {e}")))?;
        self.end_processes(id).await?;
        self.lock_ports().remove(&port);
        self.lock_children().remove(id.as_str());
        info!("stopped {id}; its folder is kept");
        Ok(())
    }

    async fn start(&self, id: &InstanceId) -> Result<Option<InstanceRecord>, ProviderError> {
        // Whatever a stop cut short by a crash left running in the folder ends first.
        if self
            .read_record(id.as_str())
            .is_ok_and(|record| record.stopped)
        {
            self.end_processes(id).await?;
        }
        let (this, id) = (self.clone(), id.clone());
        tokio::task::spawn_blocking(move || this.resume(&id))
            .await
            .map_err(|e| ProviderError::Other(format!("start task failed: {e}")))?
            .map(Some)
    }

    async fn diagnose(&self, id: &InstanceId) -> Option<String> {
        let ended = self
            .exits
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id.as_str());
        let log = self.log_path(id.as_str());
        let secrets: Vec<&str> = self.secret_values.iter().map(String::as_str).collect();
        let tail = tokio::fs::read(&log)
            .await
            .map(|bytes| {
                // The end of a long log is enough.
                let from = bytes.len().saturating_sub(64 * 1024);
                redact::log_tail(
                    &String::from_utf8_lossy(&bytes[from..]),
                    LOG_TAIL_LINES,
                    &secrets,
                )
            })
            .unwrap_or_default();
        let mut words = match ended {
            Some(ended) => format!("its process {ended}"),
            None if tail.is_empty() => return None,
            None => String::new(),
        };
        if !tail.is_empty() {
            if !words.is_empty() {
                words.push_str("; ");
            }
            words.push_str("the last lines of its log:\n");
            words.push_str(&tail.join("\n"));
        }
        Some(words)
    }

    /// Stops the instance's process group: SIGTERM, then SIGKILL after a grace period.
    async fn terminate(&self, id: &InstanceId) -> Result<(), ProviderError> {
        self.end_processes(id).await?;
        let (this, gone) = (self.clone(), id.clone());
        tokio::task::spawn_blocking(move || this.forget(gone.as_str()))
            .await
            .map_err(|e| ProviderError::Other(format!("forget task failed: {e}")))?;
        info!("terminated {id}");
        Ok(())
    }
}

fn to_instance(record: &Record) -> InstanceRecord {
    InstanceRecord {
        // Records are written by us with valid ids; a hand-edited one falls back to a fresh
        // id, which makes the pool terminate it as unknown.
        id: InstanceId::parse(&record.id).unwrap_or_else(|_| InstanceId::from_bits(0)),
        state: if record.stopped {
            ProviderState::Stopped
        } else if record.pid == 0 {
            ProviderState::Pending
        } else {
            ProviderState::Running
        },
        tags: record.tags.clone(),
        address: Some(format!("127.0.0.1:{}", record.port)),
        launched_at_ms: record.launched_at_ms,
        key_name: None,
        client_token: None,
    }
}

/// How a workspace's process ended, in words.
fn describe_exit(status: &std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(signal)) => format!("was killed by signal {signal}"),
        _ => "ended".to_owned(),
    }
}

/// The values of variables in the pool's environment whose names say they are secret.
fn secret_values(env: impl IntoIterator<Item = (OsString, OsString)>) -> Vec<String> {
    env.into_iter()
        .filter_map(|(name, value)| Some((name.into_string().ok()?, value.into_string().ok()?)))
        .filter(|(name, value)| {
            let name = name.to_ascii_uppercase();
            value.len() >= 4
                && ["TOKEN", "SECRET", "PASSWORD", "KEY", "CREDENTIAL"]
                    .iter()
                    .any(|w| name.contains(w))
        })
        .map(|(_, value)| value)
        .collect()
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A loopback port nobody listens on right now, below the kernel's ephemeral range. The
/// workspace binds it a moment later. A port the kernel picks (`bind(0)`) comes from the range
/// it also gives every outgoing connection, so under load one of those took the port in
/// between and the workspace died with "Address already in use" (seen in the tests, with 200
/// clients connecting at once); below the range only a listener can take it.
fn free_port() -> io::Result<u16> {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    if low > FIRST_WORKSPACE_PORT + 1000 {
        for _ in 0..64 {
            let port = FIRST_WORKSPACE_PORT + rand::random::<u16>() % (low - FIRST_WORKSPACE_PORT);
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return Ok(port);
            }
        }
    }
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The lowest port a workspace is given (well above the well-known and registered services
/// a developer's machine tends to run).
const FIRST_WORKSPACE_PORT: u16 = 20_000;

struct Stat {
    state: char,
    pgid: i32,
    start_ticks: u64,
}

/// Reads the fields we need from `/proc/<pid>/stat`.
fn read_stat(pid: u32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain anything: parse after the last `)`.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(Stat {
        state: fields.first()?.chars().next()?,
        pgid: fields.get(2)?.parse().ok()?,
        start_ticks: fields.get(19)?.parse().ok()?,
    })
}

/// Process-group leaders whose working directory is `work/<id>`, with that id.
fn group_leaders_under(work: &Path) -> Vec<(u32, String)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cwd) = std::fs::read_link(format!("/proc/{pid}/cwd")) else {
            continue;
        };
        let Ok(rest) = cwd.strip_prefix(work) else {
            continue;
        };
        let Some(id) = rest.iter().next() else {
            continue;
        };
        match read_stat(pid) {
            Some(stat) if stat.pgid == pid as i32 && stat.state != 'Z' => {
                found.push((pid, id.to_string_lossy().into_owned()));
            }
            _ => {}
        }
    }
    found
}

/// Every process (not only group leaders) working in `dir` or below it.
fn processes_under(dir: &Path) -> Vec<u32> {
    let Ok(dir) = dir.canonicalize() else {
        return Vec::new();
    };
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_string_lossy().parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd.starts_with(&dir))
        })
        .filter(|&pid| read_stat(pid).is_some_and(|s| s.state != 'Z'))
        .collect()
}

fn kill_group(pid: u32, signal: i32) {
    // SAFETY: kill(2) with a negative pid signals a process group; no memory is involved.
    unsafe {
        libc::kill(-(pid as i32), signal);
    }
}

fn group_alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks for existence. A group of zombies still "exists" to kill(2),
    // so the leader's own state decides when it is our child and already dead.
    let exists = unsafe { libc::kill(-(pid as i32), 0) } == 0;
    exists && read_stat(pid).is_none_or(|s| s.state != 'Z')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_fill_every_placeholder() {
        let t = CommandTemplate(vec![
            "{exe}".into(),
            "--port={port}".into(),
            "--id".into(),
            "{instance_id}".into(),
            "--base={base_path}".into(),
        ]);
        let id = InstanceId::parse("i-0123456789abcdef0").unwrap();
        assert_eq!(
            t.render("/bin/ws", 8080, &id),
            vec![
                "/bin/ws",
                "--port=8080",
                "--id",
                "i-0123456789abcdef0",
                "--base=/i-0123456789abcdef0/"
            ]
        );
    }

    #[test]
    fn workspaces_inherit_only_the_allowed_variables() {
        let pool: Vec<(OsString, OsString)> = [
            ("PATH", "/venv/bin:/usr/bin"),
            ("HOME", "/home/ana"),
            ("LANG", "C.UTF-8"),
            ("LC_ALL", "C.UTF-8"),
            ("LC_PAPER", "en_GB.UTF-8"),
            ("TZ", "Europe/Paris"),
            ("AUTH_SECRETS", "0123456789abcdef0123"),
            ("API_TOKEN", "sesame"),
            ("PORT", "8081"),
            ("RUST_LOG", "debug"),
            ("AWS_SECRET_ACCESS_KEY", "x"),
            ("PATHS", "not PATH"),
            ("XLC_ALL", "not a locale"),
            ("lc_all", "not a locale either"),
        ]
        .into_iter()
        .map(|(k, v)| (k.into(), v.into()))
        .collect();
        let kept: Vec<String> = workspace_env(pool)
            .into_iter()
            .map(|(k, _)| k.into_string().unwrap())
            .collect();
        assert_eq!(
            kept,
            ["PATH", "HOME", "LANG", "LC_ALL", "LC_PAPER", "TZ"],
            "{kept:?}"
        );
        // A name that is not UTF-8 matches nothing.
        use std::os::unix::ffi::OsStringExt;
        let odd = OsString::from_vec(b"LC_\xff".to_vec());
        assert!(workspace_env([(odd, OsString::from("x"))]).is_empty());
    }

    /// A state folder with one record per id, as a launch writes it.
    fn folder_with(ids: &[&str]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("instances")).unwrap();
        for id in ids {
            let record = Record {
                id: (*id).to_owned(),
                pid: 0,
                start_ticks: 0,
                port: 1,
                launched_at_ms: 1,
                tags: BTreeMap::from([(TAG_PURPOSE.to_owned(), "rstudio".to_owned())]),
                stopped: false,
            };
            std::fs::write(
                record_path(dir.path(), id),
                serde_json::to_vec(&record).unwrap(),
            )
            .unwrap();
        }
        dir
    }

    fn provider(dir: &Path) -> ProcessProvider {
        ProcessProvider::new(dir, "test", HashMap::new()).unwrap()
    }

    fn tag(provider: &ProcessProvider, id: &str, key: &str) -> Option<String> {
        provider.read_record(id).ok()?.tags.get(key).cloned()
    }

    const A: &str = "i-0000000000000000a";
    const B: &str = "i-0000000000000000b";
    const GONE: &str = "i-0000000000000000c";

    #[test]
    fn the_journal_is_read_past_a_torn_line_and_compacted_at_start() {
        let dir = folder_with(&[A, B]);
        // A line of an instance that is gone, a later line that wins over an earlier one, and
        // a torn last line (a crash mid-write, before its caller heard back).
        let journal = format!(
            "{{\"id\":\"{A}\",\"tags\":{{\"userId\":\"old\"}}}}\n\
             {{\"id\":\"{GONE}\",\"tags\":{{\"userId\":\"x\"}}}}\n\
             {{\"id\":\"{A}\",\"tags\":{{\"userId\":\"ana\"}}}}\n\
             {{\"id\":\"{B}\",\"tags\":{{\"userId\":\"ca"
        );
        std::fs::write(journal_path(dir.path()), journal).unwrap();
        // A tags file per instance, as versions before the journal kept them.
        std::fs::write(legacy_tags_path(dir.path(), B), "{\"userId\":\"ben\"}\n").unwrap();
        let p = provider(dir.path());
        assert_eq!(tag(&p, A, "userId").as_deref(), Some("ana"));
        assert_eq!(tag(&p, B, "userId").as_deref(), Some("ben"));
        // Rewritten at start: a line appended now does not join the torn one.
        let compacted = std::fs::read_to_string(journal_path(dir.path())).unwrap();
        assert_eq!(compacted.lines().count(), 2, "{compacted}");
        assert!(
            compacted.ends_with('\n') && !compacted.contains(GONE),
            "{compacted}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn tags_set_are_on_disk_when_reported_and_survive_a_restart() {
        let dir = folder_with(&[A, B]);
        let p = provider(dir.path());
        let id = InstanceId::parse(A).unwrap();
        let owner = vec![("userId".to_owned(), "ana".to_owned())];
        // Many at once from four threads: whoever finds nobody writing writes for the others,
        // and each is reported.
        let all = (0..200).map(|n| {
            let (p, id) = (p.clone(), id.clone());
            let tags = vec![("n".to_owned(), n.to_string())];
            tokio::spawn(async move { p.set_tags(&id, &tags).await })
        });
        let outcomes =
            tokio::time::timeout(Duration::from_secs(10), futures_util::future::join_all(all))
                .await
                .expect("every tagging is reported");
        for outcome in outcomes {
            outcome.unwrap().unwrap();
        }
        p.set_tags(&id, &owner).await.unwrap();
        let unknown = InstanceId::parse(GONE).unwrap();
        assert!(matches!(
            p.set_tags(&unknown, &owner).await,
            Err(ProviderError::NotFound(_))
        ));
        assert_eq!(tag(&p, A, "userId").as_deref(), Some("ana"));
        // One line each, none lost or doubled.
        let journal = std::fs::read_to_string(journal_path(dir.path())).unwrap();
        assert_eq!(journal.lines().count(), 201);
        // Read back by a provider of a later run, before this one is gone.
        let again = provider(dir.path());
        assert_eq!(tag(&again, A, "userId").as_deref(), Some("ana"));
        assert_eq!(tag(&again, B, "userId"), None);
        // The next run compacted the 201 lines into one.
        let compacted = std::fs::read_to_string(journal_path(dir.path())).unwrap();
        assert_eq!(compacted.lines().count(), 1, "{compacted}");
    }

    /// A tagging queued while the writer is in the middle of a write is written by that
    /// writer before it gives up its turn.
    #[test]
    fn a_tagging_queued_during_a_write_is_written_by_the_writer() {
        let dir = folder_with(&[A]);
        let mirror: Mirror = Arc::new(Mutex::new(read_state(dir.path())));
        let journal = Arc::new(Journal::open(dir.path(), Arc::clone(&mirror)).unwrap());
        let tagging = |n: &str| {
            let (done, reply) = tokio::sync::oneshot::channel();
            let tags = vec![("n".to_owned(), n.to_owned())];
            let id = InstanceId::parse(A).unwrap();
            (Tagging { id, tags, done }, reply)
        };
        let (first, first_reply) = tagging("1");
        let (second, second_reply) = tagging("2");
        // The writer of the first will wait for the mirror after its write.
        let held = lock_mirror(&mirror);
        let writer = {
            let journal = Arc::clone(&journal);
            std::thread::spawn(move || journal.tag(first))
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let (queued, writing) = {
                let queue = journal.lock_queue();
                (queue.0.len(), queue.1)
            };
            if queued == 0 && writing {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the writer never took its batch"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        // Queued behind the write in progress: this caller does not write.
        journal.tag(second);
        drop(held);
        writer.join().unwrap();
        let outcome = |reply: tokio::sync::oneshot::Receiver<_>| {
            let waited = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .unwrap()
                .block_on(async { tokio::time::timeout(Duration::from_secs(10), reply).await });
            waited.expect("reported").expect("written")
        };
        outcome(first_reply).unwrap();
        outcome(second_reply).unwrap();
        let journal = std::fs::read_to_string(journal_path(dir.path())).unwrap();
        assert_eq!(journal.lines().count(), 2, "{journal}");
    }

    #[test]
    fn stat_of_this_process_is_readable() {
        let stat = read_stat(std::process::id()).unwrap();
        assert!(stat.start_ticks > 0);
        assert!(matches!(stat.state, 'R' | 'S'));
    }
}
