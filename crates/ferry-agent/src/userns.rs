//! Docker's `userns-remap`: container root is an unprivileged uid range on the host.
//!
//! Root here lacks CAP_SYS_RESOURCE, so CRIU can read the rlimits of another uid's processes
//! only inside a user namespace that host root owns; a remapped daemon gives every container
//! one. Its restore then reads the checkpoint images as the remapped root (CRIU enters the
//! container's user namespace before it opens some of them), so those files must belong to
//! that uid rather than be opened up to every local user: they hold the process's memory.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

pub use ferry_proto::remapped_root;

/// Hands `dir` and everything in it to `owner`, and lets that uid pass through the directories
/// between `base` and `dir` (search only, no listing).
pub fn grant(base: &Path, dir: &Path, owner: (u32, u32)) -> Result<(), String> {
    let mut p = dir.to_path_buf();
    while let Some(parent) = p.parent() {
        if !parent.starts_with(base) {
            break;
        }
        let meta = std::fs::metadata(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
        let mode = meta.permissions().mode();
        if mode & 0o001 == 0 {
            std::fs::set_permissions(
                parent,
                std::fs::Permissions::from_mode((mode | 0o001) & 0o7777),
            )
            .map_err(|e| format!("{}: {e}", parent.display()))?;
        }
        p = parent.to_path_buf();
    }
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        std::os::unix::fs::lchown(&d, Some(owner.0), Some(owner.1))
            .map_err(|e| format!("chown {}: {e}", d.display()))?;
        let meta = std::fs::symlink_metadata(&d).map_err(|e| format!("{}: {e}", d.display()))?;
        if meta.is_dir() {
            for e in std::fs::read_dir(&d).map_err(|e| format!("{}: {e}", d.display()))? {
                let e = e.map_err(|e| format!("{}: {e}", d.display()))?;
                stack.push(e.path());
            }
        }
    }
    Ok(())
}

/// Ancestors above `base` that the remapped root could not pass through: named in the error so
/// the operator knows which directory's mode stops the restore.
pub fn unreachable_ancestors(base: &Path) -> Vec<String> {
    base.ancestors()
        .skip(1)
        .filter(|a| {
            std::fs::metadata(a)
                .map(|m| m.permissions().mode() & 0o001 == 0)
                .unwrap_or(true)
        })
        .map(|a| a.display().to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grant_chowns_the_tree_and_opens_only_search_on_ancestors() {
        let base = std::env::temp_dir().join(format!("ferry-userns-{}", std::process::id()));
        let dir = base.join("incoming").join("m1");
        std::fs::create_dir_all(dir.join("images")).unwrap();
        std::fs::write(dir.join("images").join("pages-1.img"), b"x").unwrap();
        std::fs::set_permissions(
            base.join("incoming"),
            std::fs::Permissions::from_mode(0o700),
        )
        .unwrap();
        let me = (
            nix::unistd::getuid().as_raw(),
            nix::unistd::getgid().as_raw(),
        );
        grant(&base, &dir, me).unwrap();
        let mode = std::fs::metadata(base.join("incoming"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o701);
        std::fs::remove_dir_all(&base).unwrap();
    }
}
