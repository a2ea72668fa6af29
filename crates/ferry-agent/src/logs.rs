//! CRIU's own logs outlive the migration's scratch directory: an operator asking why a
//! migration was slow or failed finds them under `<state-dir>/logs/<migration-id>/`.

use std::path::Path;

/// How many migrations' logs are kept; older ones are removed.
pub const KEEP_MIGRATIONS: usize = 20;

/// Copies every `*.log` of `work` into `<state_dir>/logs/<id>/<side>-<name>`, then prunes.
/// Returns what went wrong, as cleanup warnings (the migration's outcome does not depend on it).
pub fn keep(state_dir: &Path, id: &str, side: &str, work: &Path) -> Vec<String> {
    let mut problems = Vec::new();
    let Ok(entries) = std::fs::read_dir(work) else {
        return problems;
    };
    let dest = state_dir.join("logs").join(id);
    let mut made = false;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.ends_with(".log") || !e.file_type().map(|t| t.is_file()).unwrap_or(false) {
            continue;
        }
        if !made {
            if let Err(err) = std::fs::create_dir_all(&dest) {
                problems.push(format!("{}: {err}", dest.display()));
                return problems;
            }
            made = true;
        }
        let to = dest.join(format!("{side}-{name}"));
        if let Err(err) = std::fs::copy(e.path(), &to) {
            problems.push(format!("keeping {}: {err}", e.path().display()));
        }
    }
    problems.extend(prune(&state_dir.join("logs"), KEEP_MIGRATIONS));
    problems
}

/// Removes all but the `keep` most recently modified directories under `dir`.
fn prune(dir: &Path, keep: usize) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut dirs: Vec<(std::time::SystemTime, std::path::PathBuf)> = entries
        .flatten()
        .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    dirs.sort_by_key(|d| std::cmp::Reverse(d.0));
    dirs.into_iter()
        .skip(keep)
        .filter_map(|(_, p)| {
            std::fs::remove_dir_all(&p)
                .err()
                .map(|e| format!("pruning {}: {e}", p.display()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_are_copied_by_side_and_old_migrations_pruned() {
        let state = tempfile::tempdir().unwrap();
        let work = tempfile::tempdir().unwrap();
        std::fs::write(work.path().join("restore.log"), "criu says").unwrap();
        std::fs::write(work.path().join("inventory.img"), "x").unwrap();
        for i in 0..KEEP_MIGRATIONS + 3 {
            let p = keep(state.path(), &format!("m{i:02}"), "target", work.path());
            assert!(p.is_empty(), "{p:?}");
            // Distinct modification times, oldest first.
            let d = state.path().join("logs").join(format!("m{i:02}"));
            let t =
                std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1000 + i as u64);
            std::fs::File::open(&d).unwrap().set_modified(t).unwrap();
        }
        let newest = state
            .path()
            .join("logs")
            .join(format!("m{:02}", KEEP_MIGRATIONS + 2));
        assert_eq!(
            std::fs::read_to_string(newest.join("target-restore.log")).unwrap(),
            "criu says"
        );
        assert!(!newest.join("target-inventory.img").exists());
        let left = std::fs::read_dir(state.path().join("logs"))
            .unwrap()
            .count();
        assert!(left <= KEEP_MIGRATIONS + 1, "{left} kept");
        assert!(!state.path().join("logs").join("m00").exists());
    }

    #[test]
    fn a_missing_work_dir_is_not_a_problem() {
        let state = tempfile::tempdir().unwrap();
        assert!(keep(state.path(), "m", "source", &state.path().join("nope")).is_empty());
    }
}
