//! File access confined to a directory, with no window between a check and the use.
//!
//! Every access goes through a directory handle ([`cap_std::fs::Dir`]) and is resolved
//! one component at a time relative to it: each directory on the way is opened with
//! `O_NOFOLLOW`, and the last component is opened, created or inspected without
//! following a symlink. A name cannot be swapped for a symlink between a check and an
//! open, because there is no separate check: the open is the check. Paths are also
//! refused lexically (absolute, `..`, empty, NUL) so the error says why.
//!
//! Files are opened non-blocking and anything but a regular file is refused, so a FIFO
//! planted where a file is expected cannot stall the reader.
//!
//! Used by the connectors (file tools, gates) and the dispatcher (a run's report).
//!
//! Writes are atomic and race-free: the content goes to a fresh temporary file created
//! with `O_CREAT | O_EXCL` (which never follows a symlink) under a random name in the
//! same directory handle, then is renamed over the target (a rename replaces a planted
//! symlink; it never writes through it).

use std::ffi::OsString;
use std::io::{Read, Write};
use std::path::{Component, Path};

use cap_fs_ext::{DirExt, FollowSymlinks, OpenOptionsFollowExt};
use cap_std::fs::{Dir, File, Metadata, OpenOptions, OpenOptionsExt};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("path {0:?} is outside {1}")]
    Outside(String, &'static str),
    #[error("path {0:?} goes through a symlink, which tools do not follow")]
    Symlink(String),
    #[error("path {0:?} does not exist")]
    Missing(String),
    #[error("path {0:?} names a directory, not a file")]
    IsDirectory(String),
    #[error("path {0:?} is not a regular file")]
    NotAFile(String),
    #[error("{path} is {size} bytes; tools handle files up to {max} bytes")]
    TooLarge { path: String, size: u64, max: u64 },
    #[error("path {0:?}: {1}")]
    Io(String, String),
}

/// A directory that confined paths are resolved under.
pub struct Root {
    dir: Dir,
    name: &'static str,
}

impl Root {
    /// Opens the trusted directory `path` (Dispatch's own, e.g. a run's directory);
    /// `name` is how messages call it.
    pub fn open(path: &Path, name: &'static str) -> Result<Self, Error> {
        let dir = Dir::open_ambient_dir(path, cap_std::ambient_authority())
            .map_err(|e| Error::Io(name.to_owned(), e.to_string()))?;
        Ok(Self { dir, name })
    }

    /// The directory `path` below this one, as a root of its own.
    pub fn subdir(&self, path: &str, name: &'static str) -> Result<Self, Error> {
        let dir = match self.walk(path, false)? {
            (parent, Some(last)) => parent
                .open_dir_nofollow(&last)
                .map_err(|e| self.io_error(&parent, &last, path, e))?,
            (root, None) => root,
        };
        Ok(Self { dir, name })
    }

    /// Metadata of `path` itself; `None` if it does not exist. A symlink is an error.
    pub fn metadata(&self, path: &str) -> Result<Option<Metadata>, Error> {
        let (parent, last) = match self.walk(path, false) {
            Ok(found) => found,
            Err(Error::Missing(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        let Some(last) = last else {
            return Ok(Some(self.dir.dir_metadata().map_err(io(path))?));
        };
        match parent.symlink_metadata(&last) {
            Ok(meta) if meta.file_type().is_symlink() => Err(Error::Symlink(path.to_owned())),
            Ok(meta) => Ok(Some(meta)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(path)(e)),
        }
    }

    /// Reads the regular file `path`, refusing directories and files over `max` bytes.
    pub fn read(&self, path: &str, max: u64) -> Result<Vec<u8>, Error> {
        let file = self.open_file(path)?;
        let size = file.metadata().map_err(io(path))?.len();
        if size > max {
            return Err(Error::TooLarge {
                path: path.to_owned(),
                size,
                max,
            });
        }
        let mut bytes = Vec::with_capacity(size as usize);
        // A file that grows after the size check is still read only up to the limit.
        file.take(max + 1)
            .read_to_end(&mut bytes)
            .map_err(io(path))?;
        if bytes.len() as u64 > max {
            return Err(Error::TooLarge {
                path: path.to_owned(),
                size: bytes.len() as u64,
                max,
            });
        }
        Ok(bytes)
    }

    /// Opens the regular file `path` for reading (not a directory, not a symlink, not
    /// a FIFO or device: it is opened non-blocking, so none of those can stall it).
    pub fn open_file(&self, path: &str) -> Result<File, Error> {
        let (parent, Some(last)) = self.walk(path, false)? else {
            return Err(Error::IsDirectory(path.to_owned()));
        };
        let mut options = OpenOptions::new();
        options
            .read(true)
            .follow(FollowSymlinks::No)
            .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32);
        let file = parent
            .open_with(&last, &options)
            .map_err(|e| self.io_error(&parent, &last, path, e))?;
        let kind = file.metadata().map_err(io(path))?.file_type();
        if kind.is_dir() {
            return Err(Error::IsDirectory(path.to_owned()));
        }
        if !kind.is_file() {
            return Err(Error::NotAFile(path.to_owned()));
        }
        Ok(file)
    }

    /// Replaces the file `path` with `content`, creating the directories on the way.
    pub fn write(&self, path: &str, content: &[u8]) -> Result<(), Error> {
        let (parent, Some(last)) = self.walk(path, true)? else {
            return Err(Error::IsDirectory(path.to_owned()));
        };
        let mut temp = OsString::from(".");
        temp.push(&last);
        temp.push(format!(".{}.tmp", uuid::Uuid::now_v7().simple()));
        let mut options = OpenOptions::new();
        options
            .write(true)
            .create_new(true)
            .follow(FollowSymlinks::No);
        let mut file = parent.open_with(&temp, &options).map_err(io(path))?;
        let written = file
            .write_all(content)
            .and_then(|()| file.sync_all())
            .and_then(|()| parent.rename(&temp, &parent, &last));
        if let Err(e) = written {
            let _ = parent.remove_file(&temp);
            return Err(self.io_error(&parent, &last, path, e));
        }
        Ok(())
    }

    /// The names in directory `path`, sorted, directories with a trailing `/`.
    pub fn list(&self, path: &str) -> Result<Vec<String>, Error> {
        let dir = self.subdir(path, self.name)?.dir;
        let mut names = Vec::new();
        for entry in dir.entries().map_err(io(path))? {
            let entry = entry.map_err(io(path))?;
            let mut name = entry.file_name().to_string_lossy().into_owned();
            if entry.file_type().map_err(io(path))?.is_dir() {
                name.push('/');
            }
            names.push(name);
        }
        names.sort();
        Ok(names)
    }

    /// Opens every directory of `path` but the last component, without following
    /// symlinks (creating missing ones when `create`). Returns the parent's handle and
    /// the last component, or `None` when `path` is this root itself.
    fn walk(&self, path: &str, create: bool) -> Result<(Dir, Option<OsString>), Error> {
        let parts = self.lexical(path)?;
        let mut dir = self.dir.try_clone().map_err(io(path))?;
        let Some((last, on_the_way)) = parts.split_last() else {
            return Ok((dir, None));
        };
        for part in on_the_way {
            if create {
                match dir.create_dir(part) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(io(path)(e)),
                }
            }
            dir = dir
                .open_dir_nofollow(part)
                .map_err(|e| self.io_error(&dir, part, path, e))?;
        }
        Ok((dir, Some(last.clone())))
    }

    /// The components of a relative path with no way out of the root.
    fn lexical(&self, path: &str) -> Result<Vec<OsString>, Error> {
        let outside = || Error::Outside(path.to_owned(), self.name);
        if path.is_empty() || path.contains('\0') {
            return Err(outside());
        }
        let mut parts = Vec::new();
        for component in Path::new(path).components() {
            match component {
                Component::Normal(part) => parts.push(part.to_owned()),
                Component::CurDir => {}
                Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                    return Err(outside());
                }
            }
        }
        Ok(parts)
    }

    /// Names a failure to open `name` in `parent`: a symlink in the way is said so.
    fn io_error(&self, parent: &Dir, name: &OsString, path: &str, e: std::io::Error) -> Error {
        let is_link = parent
            .symlink_metadata(name)
            .is_ok_and(|m| m.file_type().is_symlink());
        if is_link {
            Error::Symlink(path.to_owned())
        } else if e.kind() == std::io::ErrorKind::IsADirectory {
            Error::IsDirectory(path.to_owned())
        } else {
            io(path)(e)
        }
    }
}

fn io(path: &str) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::Missing(path.to_owned()),
        _ => Error::Io(path.to_owned(), e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> (tempfile::TempDir, Root) {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::open(dir.path(), "scratch/").unwrap();
        (dir, root)
    }

    #[test]
    fn refuses_every_way_out() {
        let (dir, root) = root();
        let path = dir.path();
        std::fs::create_dir_all(path.join("sub")).unwrap();
        std::os::unix::fs::symlink("/etc", path.join("sub/escape")).unwrap();
        std::os::unix::fs::symlink(path.join("sub"), path.join("loop")).unwrap();
        for bad in ["", "/etc/passwd", "../x", "sub/../../x", "a\0b"] {
            assert!(
                matches!(root.read(bad, 10), Err(Error::Outside(..))),
                "{bad:?}"
            );
        }
        for link in ["sub/escape/passwd", "loop/x", "sub/escape"] {
            assert!(
                matches!(root.read(link, 10), Err(Error::Symlink(_))),
                "{link:?}: {:?}",
                root.read(link, 10)
            );
        }
        for through in ["sub/escape/passwd", "loop/x"] {
            assert!(
                matches!(root.write(through, b"x"), Err(Error::Symlink(_))),
                "{through:?}"
            );
        }
        // Writing at a symlink's own name replaces the link, never what it points to.
        root.write("sub/escape", b"x").unwrap();
        assert!(
            !path
                .join("sub/escape")
                .symlink_metadata()
                .unwrap()
                .is_symlink()
        );
        root.write("./sub/new.org", b"hi").unwrap();
        assert_eq!(std::fs::read(path.join("sub/new.org")).unwrap(), b"hi");
    }

    #[test]
    fn a_planted_symlink_is_replaced_never_written_through() {
        let (dir, root) = root();
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("victim");
        std::fs::write(&victim, "keep").unwrap();
        // At the target name, and at the name the old temp file had.
        std::os::unix::fs::symlink(&victim, dir.path().join("notes.org")).unwrap();
        std::os::unix::fs::symlink(&victim, dir.path().join(".notes.org.tmp")).unwrap();
        root.write("notes.org", b"new").unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
        let target = dir.path().join("notes.org");
        assert!(!target.symlink_metadata().unwrap().is_symlink());
        assert_eq!(std::fs::read_to_string(target).unwrap(), "new");
    }

    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let (dir, root) = root();
        let status = std::process::Command::new("mkfifo")
            .arg(dir.path().join("pipe"))
            .status()
            .unwrap();
        assert!(status.success());
        // Opening a FIFO for reading with no writer would block; here it is refused.
        assert!(
            matches!(root.read("pipe", 10), Err(Error::NotAFile(_))),
            "{:?}",
            root.read("pipe", 10)
        );
    }

    #[test]
    fn the_root_and_directories_are_not_files() {
        let (dir, root) = root();
        std::fs::create_dir(dir.path().join("d")).unwrap();
        for path in [".", "./", "d", "d/."] {
            assert!(
                matches!(root.write(path, b"x"), Err(Error::IsDirectory(_))),
                "{path:?}: {:?}",
                root.write(path, b"x")
            );
            assert!(
                matches!(root.read(path, 10), Err(Error::IsDirectory(_))),
                "{path:?}"
            );
        }
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "nothing but d/ was written");
    }

    #[test]
    fn reads_are_bounded() {
        let (dir, root) = root();
        std::fs::write(dir.path().join("big"), vec![b'x'; 11]).unwrap();
        assert!(matches!(
            root.read("big", 10),
            Err(Error::TooLarge { size: 11, .. })
        ));
        assert_eq!(root.read("big", 11).unwrap().len(), 11);
        assert!(root.metadata("missing/deeper").unwrap().is_none());
        assert!(root.metadata("missing").unwrap().is_none());
    }
}
