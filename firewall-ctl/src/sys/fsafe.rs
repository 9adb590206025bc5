//! Paths another local user could squat or redirect.
//!
//! bpffs is mounted mode 1777, like /tmp and /run's subdirectories can be: a
//! user who creates our pin directory first owns it, and can later unlink the
//! pinned link, which detaches the firewall (it would fail open). So every
//! directory we create is made 0700, and every directory we use must be owned
//! by us (or root) and writable by nobody else, the same rule as OpenSSH's
//! StrictModes. Files we write in the state directory are created under
//! unpredictable names with `O_EXCL | O_NOFOLLOW` and renamed into place;
//! files we read from outside are opened without blocking and read through a
//! bound, whatever their metadata says.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Read as _, Write as _},
    os::unix::fs::{DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _},
    path::{Component, Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum UnsafePath {
    #[error(
        "{path} is owned by uid {owner}, not by this user (uid {euid}) or root: another user may have created it to control the firewall; remove it (`rm -rf {path}`) and run again, or run as its owner"
    )]
    NotOwned {
        path: PathBuf,
        owner: u32,
        euid: u32,
    },
    #[error(
        "{path} is writable by group or others (mode {mode:o}): anyone who can write it can remove our pins or replace our files; run `chmod go-w {path}`"
    )]
    Writable { path: PathBuf, mode: u32 },
    #[error(
        "{path} is not a directory (a symlink or a file is in the way): remove it and run again"
    )]
    NotDir { path: PathBuf },
    // The source follows in the error chain (`{:#}`), not in this message.
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl UnsafePath {
    /// Where it happened, for callers that turn it into their own error.
    pub fn path(&self) -> &Path {
        match self {
            UnsafePath::NotOwned { path, .. }
            | UnsafePath::Writable { path, .. }
            | UnsafePath::NotDir { path }
            | UnsafePath::Io { path, .. } => path,
        }
    }
}

pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// One spelling per directory: `/sys/fs/bpf//p/`, `/sys/fs/bpf/./p` and a
/// symlink to it all become `/sys/fs/bpf/p`, so every process that locks or
/// names the directory agrees on it. The existing part is resolved by the
/// kernel (symlinks included); the rest is normalised lexically.
pub fn canonical(path: &Path) -> PathBuf {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(path)
    };
    let mut rest = Vec::new();
    let mut base = abs.clone();
    loop {
        if let Ok(c) = fs::canonicalize(&base) {
            let mut out = c;
            for r in rest.iter().rev() {
                out.push(r);
            }
            return lexical(&out);
        }
        match (base.file_name().map(|f| f.to_os_string()), base.parent()) {
            (Some(f), Some(p)) => {
                rest.push(f);
                base = p.to_path_buf();
            }
            _ => return lexical(&abs),
        }
    }
}

fn lexical(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// A directory we trust: a real directory (not a symlink), owned by us or by
/// root, and not writable by group or others unless it is sticky and owned by
/// root (like /tmp and bpffs' root, where others cannot remove what we made).
fn check_one(path: &Path, must_be_ours: bool) -> Result<(), UnsafePath> {
    let md = fs::symlink_metadata(path).map_err(|source| UnsafePath::Io {
        path: path.into(),
        source,
    })?;
    if !md.file_type().is_dir() {
        return Err(UnsafePath::NotDir { path: path.into() });
    }
    let me = euid();
    let ok_owner = if must_be_ours {
        md.uid() == me
    } else {
        md.uid() == me || md.uid() == 0
    };
    if !ok_owner {
        return Err(UnsafePath::NotOwned {
            path: path.into(),
            owner: md.uid(),
            euid: me,
        });
    }
    let mode = md.mode() & 0o7777;
    // A sticky root-owned ancestor (/tmp, bpffs' root) may be world-writable:
    // others cannot remove or rename what we made in it. Ours never may.
    let sticky_root = mode & libc::S_ISVTX != 0 && md.uid() == 0;
    if mode & 0o022 != 0 && (must_be_ours || !sticky_root) {
        return Err(UnsafePath::Writable {
            path: path.into(),
            mode,
        });
    }
    Ok(())
}

/// Check a directory we are about to use but must not create: it and every
/// ancestor pass `check_one`; the directory itself must be ours. A missing
/// directory is `Io` with `NotFound`, which callers map to "not attached".
pub fn check_private_dir(path: &Path) -> Result<(), UnsafePath> {
    check_one(path, true)?;
    for a in path.ancestors().skip(1) {
        if a.as_os_str().is_empty() {
            break;
        }
        check_one(a, false)?;
    }
    Ok(())
}

/// Create `path` and any missing parents mode 0700 (existing parents are
/// checked, not changed), then check the whole chain. A directory that
/// appears between our check and our mkdir is caught by the final check.
pub fn ensure_private_dir(path: &Path) -> Result<(), UnsafePath> {
    let mut missing = Vec::new();
    for a in path.ancestors() {
        match fs::symlink_metadata(a) {
            Ok(_) => break,
            Err(e) if e.kind() == io::ErrorKind::NotFound => missing.push(a.to_path_buf()),
            Err(source) => {
                return Err(UnsafePath::Io {
                    path: a.into(),
                    source,
                });
            }
        }
    }
    for d in missing.iter().rev() {
        match fs::DirBuilder::new().mode(0o700).create(d) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(source) => {
                return Err(UnsafePath::Io {
                    path: d.clone(),
                    source,
                });
            }
        }
    }
    check_private_dir(path)
}

/// A temporary name nobody can predict, next to `path`.
fn temp_name(path: &Path) -> PathBuf {
    let dir = path.parent().unwrap_or(Path::new("."));
    dir.join(format!(
        ".{}.{:016x}.tmp",
        path.file_name().unwrap_or_default().to_string_lossy(),
        rand::random::<u64>()
    ))
}

/// Write `bytes` to `path` by way of an exclusively created temporary file
/// (`O_EXCL | O_NOFOLLOW`, mode 0600), renamed over `path`: a reader sees the
/// old file or the new one, and a symlink planted at either name is never
/// followed (rename replaces the link itself). With `durable`, the file and
/// the directory are fsync'd, so a crash leaves one of the two versions.
pub fn replace(path: &Path, bytes: &[u8], durable: bool, mode: u32) -> io::Result<()> {
    let tmp = temp_name(path);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)?;
    let r = (|| {
        f.write_all(bytes)?;
        if durable {
            f.sync_all()?;
        }
        fs::rename(&tmp, path)
    })();
    if r.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    r?;
    if durable {
        File::open(path.parent().unwrap_or(Path::new(".")))?.sync_all()?;
    }
    Ok(())
}

/// Open for appending without following a symlink (the audit log).
pub fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("cannot open {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is a {kind}, not a regular file: point the setting at a regular file")]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error("{path} is larger than {max_bytes} bytes")]
    TooLarge { path: PathBuf, max_bytes: u64 },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl ReadError {
    pub fn not_found(&self) -> bool {
        matches!(self, ReadError::Open { source, .. } if source.kind() == io::ErrorKind::NotFound)
    }
}

fn kind_of(ft: fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt as _;
    if ft.is_dir() {
        "directory"
    } else if ft.is_fifo() {
        "FIFO"
    } else if ft.is_socket() {
        "socket"
    } else if ft.is_char_device() {
        "character device"
    } else if ft.is_block_device() {
        "block device"
    } else {
        "special file"
    }
}

/// Read a file from outside: opened `O_NONBLOCK` (a FIFO cannot hang the
/// open), refused unless `fstat` of the opened file says regular (a device,
/// FIFO or socket, even behind a symlink), and read through a `take` of
/// `max_bytes + 1`, so a file that grows, or whose size the metadata misstates
/// (procfs, a device), never costs more than the bound.
pub fn read_bounded(path: &Path, max_bytes: u64) -> Result<Vec<u8>, ReadError> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|source| ReadError::Open {
            path: path.into(),
            source,
        })?;
    let md = f.metadata().map_err(|source| ReadError::Read {
        path: path.into(),
        source,
    })?;
    if !md.file_type().is_file() {
        return Err(ReadError::NotRegular {
            path: path.into(),
            kind: kind_of(md.file_type()),
        });
    }
    let mut buf = Vec::with_capacity(md.len().min(max_bytes) as usize);
    f.take(max_bytes.saturating_add(1))
        .read_to_end(&mut buf)
        .map_err(|source| ReadError::Read {
            path: path.into(),
            source,
        })?;
    if buf.len() as u64 > max_bytes {
        return Err(ReadError::TooLarge {
            path: path.into(),
            max_bytes,
        });
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("fw-fsafe-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn canonical_spellings_agree() {
        let d = scratch("canon");
        ensure_private_dir(&d).unwrap();
        let a = canonical(&d.join("x"));
        let b = canonical(Path::new(&format!("{}//./x/", d.display())));
        assert_eq!(a, b);
        std::os::unix::fs::symlink(&d, d.with_extension("link")).unwrap();
        assert_eq!(canonical(&d.with_extension("link").join("x")), a);
        fs::remove_file(d.with_extension("link")).unwrap();
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn new_dirs_are_private_and_loose_ones_refused() {
        let d = scratch("mode");
        ensure_private_dir(&d.join("a/b")).unwrap();
        for p in [d.join("a"), d.join("a/b")] {
            assert_eq!(fs::metadata(&p).unwrap().mode() & 0o777, 0o700);
        }
        fs::set_permissions(d.join("a/b"), fs::Permissions::from_mode(0o777)).unwrap();
        assert!(matches!(
            check_private_dir(&d.join("a/b")),
            Err(UnsafePath::Writable { .. })
        ));
        fs::set_permissions(d.join("a/b"), fs::Permissions::from_mode(0o700)).unwrap();
        fs::set_permissions(d.join("a"), fs::Permissions::from_mode(0o777)).unwrap();
        assert!(
            matches!(check_private_dir(&d.join("a/b")), Err(UnsafePath::Writable { ref path, .. }) if path == &d.join("a")),
            "a loose parent lets others rename our directory away"
        );
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn replace_never_follows_a_planted_symlink() {
        let d = scratch("sym");
        ensure_private_dir(&d).unwrap();
        let victim = d.join("victim");
        fs::write(&victim, b"precious").unwrap();
        std::os::unix::fs::symlink(&victim, d.join("status.json")).unwrap();
        replace(&d.join("status.json"), b"new", false, 0o600).unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        assert_eq!(fs::read(d.join("status.json")).unwrap(), b"new");
        assert!(
            !fs::symlink_metadata(d.join("status.json"))
                .unwrap()
                .file_type()
                .is_symlink()
        );
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn bounded_reads_refuse_specials_and_stop_at_the_bound() {
        assert!(matches!(
            read_bounded(Path::new("/dev/zero"), 1 << 20),
            Err(ReadError::NotRegular {
                kind: "character device",
                ..
            })
        ));
        let d = scratch("read");
        ensure_private_dir(&d).unwrap();
        let fifo = d.join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // Opening a FIFO with no writer would block for ever without O_NONBLOCK.
        assert!(matches!(
            read_bounded(&fifo, 10),
            Err(ReadError::NotRegular { kind: "FIFO", .. })
        ));
        fs::write(d.join("f"), b"0123456789").unwrap();
        assert_eq!(read_bounded(&d.join("f"), 10).unwrap(), b"0123456789");
        assert!(matches!(
            read_bounded(&d.join("f"), 9),
            Err(ReadError::TooLarge { .. })
        ));
        assert!(read_bounded(&d.join("none"), 9).unwrap_err().not_found());
        fs::remove_dir_all(&d).unwrap();
    }
}
