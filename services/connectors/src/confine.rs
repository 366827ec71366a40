//! Keeping paths inside a directory: no absolute paths, no `..`, no symlinks.
//!
//! Every component below the root is checked with `symlink_metadata`, so neither a
//! symlink planted inside the run nor a `..` can lead a tool or a gate outside it.

use std::path::{Component, Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("path {0:?} is outside {1}")]
    Outside(String, &'static str),
    #[error("path {0:?} goes through a symlink, which tools do not follow")]
    Symlink(String),
    #[error("path {0:?}: {1}")]
    Io(String, String),
}

/// Resolves the relative `path` under `root` (whose own name is `root_name`, for
/// messages) after checking it cannot escape. The target itself need not exist.
pub fn resolve(root: &Path, root_name: &'static str, path: &str) -> Result<PathBuf, Error> {
    let outside = || Error::Outside(path.to_owned(), root_name);
    if path.is_empty() || path.contains('\0') {
        return Err(outside());
    }
    let mut resolved = root.to_path_buf();
    for component in Path::new(path).components() {
        match component {
            Component::Normal(part) => {
                resolved.push(part);
                match std::fs::symlink_metadata(&resolved) {
                    Ok(meta) if meta.file_type().is_symlink() => {
                        return Err(Error::Symlink(path.to_owned()));
                    }
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(Error::Io(path.to_owned(), e.to_string())),
                }
            }
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                return Err(outside());
            }
        }
    }
    Ok(resolved)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_every_way_out() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("sub/escape")).unwrap();
        std::os::unix::fs::symlink(root.join("sub"), root.join("loop")).unwrap();
        for bad in ["", "/etc/passwd", "../x", "sub/../../x", "a\0b"] {
            assert!(
                matches!(resolve(root, "scratch/", bad), Err(Error::Outside(..))),
                "{bad:?}"
            );
        }
        for link in ["sub/escape/passwd", "loop/x", "sub/escape"] {
            assert!(
                matches!(resolve(root, "scratch/", link), Err(Error::Symlink(_))),
                "{link:?}"
            );
        }
        assert_eq!(
            resolve(root, "scratch/", "./sub/new.org").unwrap(),
            root.join("sub/new.org")
        );
    }
}
