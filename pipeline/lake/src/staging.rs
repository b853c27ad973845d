//! Local staging files. Artifacts are written to a file in the system's
//! temporary directory, then committed to the lake, and the file is deleted.
//! A process killed in between (kill -9, the OOM killer, a job past its
//! time) cannot delete its own, so their names carry the writer
//! (`pipeline-staging-PID@HOST-XXXXXX.ext`) and the first staging file a
//! process creates sweeps those of processes of this host that no longer
//! run. Where /proc does not show processes (macOS), nothing is swept.

use std::path::Path;
use std::sync::Once;

use crate::error::{Context, Result};

const PREFIX: &str = "pipeline-staging-";

/// A new staging file (deleted when dropped) whose name ends in `suffix`.
pub fn file(suffix: &str) -> Result<tempfile::NamedTempFile> {
    static SWEPT: Once = Once::new();
    let dir = std::env::temp_dir();
    SWEPT.call_once(|| {
        let (files, bytes) = sweep(&dir);
        if files > 0 {
            tracing::info!(
                files,
                bytes,
                dir = %dir.display(),
                "removed the staging files of processes that no longer run"
            );
        }
    });
    tempfile::Builder::new()
        .prefix(&format!(
            "{PREFIX}{}@{}-",
            std::process::id(),
            crate::host::hostname()
        ))
        .suffix(suffix)
        .tempfile_in(&dir)
        .ctx(format!("creating a staging file in {}", dir.display()))
}

/// Removes the staging files in `dir` of processes of this host that no
/// longer run; (files, bytes) removed. Files of live processes, of other
/// hosts (a shared temporary directory) and of unknown form are kept.
pub fn sweep(dir: &Path) -> (usize, u64) {
    if !Path::new("/proc/self").exists() {
        return (0, 0);
    }
    let (host, me) = (crate::host::hostname(), std::process::id());
    let (mut files, mut bytes) = (0, 0);
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = entry.file_name();
        let Some((pid, rest)) = name
            .to_str()
            .and_then(|n| n.strip_prefix(PREFIX))
            .and_then(|r| r.split_once('@'))
        else {
            continue;
        };
        let (Ok(pid), Some((writer_host, _))) = (pid.parse::<u32>(), rest.rsplit_once('-')) else {
            continue;
        };
        if writer_host != host || pid == me || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
        if std::fs::remove_file(entry.path()).is_ok() {
            files += 1;
            bytes += size;
        }
    }
    (files, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only the file of a process that has exited goes: those of this
    /// process, of a live one, of another host and of unknown form stay.
    #[test]
    fn sweeps_only_the_files_of_exited_processes() {
        let dir = tempfile::tempdir().unwrap();
        let host = crate::host::hostname();
        let mut exited = std::process::Command::new("true").spawn().unwrap();
        exited.wait().unwrap();
        let mut live = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let name = |pid: u32, host: &str| format!("{PREFIX}{pid}@{host}-a1B2c3.parquet");
        let gone = name(exited.id(), &host);
        let kept = [
            name(std::process::id(), &host),
            name(live.id(), &host),
            name(exited.id(), "another-host"),
            "pipeline-staging-Xy12ab.parquet".to_string(),
            "unrelated.parquet".to_string(),
        ];
        for f in kept.iter().chain([&gone]) {
            std::fs::write(dir.path().join(f), b"12345").unwrap();
        }
        assert_eq!(sweep(dir.path()), (1, 5));
        live.kill().unwrap();
        live.wait().unwrap();
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        let mut want = kept.to_vec();
        want.sort();
        assert_eq!(left, want);
    }

    /// A staging file names its writer, so a later sweep can tell.
    #[test]
    fn a_staging_file_names_its_writer() {
        let f = file(".parquet").unwrap();
        let name = f.path().file_name().unwrap().to_string_lossy().into_owned();
        let want = format!("{PREFIX}{}@{}-", std::process::id(), crate::host::hostname());
        assert!(name.starts_with(&want) && name.ends_with(".parquet"), "{name}");
    }
}
