//! Which files a script may read and write: the one gate every host function that opens a path
//! goes through (`Host::readable` / `Host::writable`).
//!
//! `lpo run` confines a script to
//! - writes: its run folder and each `--allow-write DIR`;
//! - reads: those, the script's folder, the stdlib folder and the project (the working folder
//!   when it holds `stdlib/`: recipes, `checkpoints/`, `tests/fixtures/`), every param value
//!   that names an existing path (a folder, or a file and the folder holding it: a manifest's
//!   images sit beside it), and each `--allow-read DIR`.
//!
//! A path is checked after resolving `..` and symbolic links (for a path not created yet, its
//! deepest existing ancestor is resolved), so neither `run/../../x` nor a link out of an allowed
//! folder gets through. Files a loader opens inside an allowed model folder are not checked again.

use std::path::{Component, Path, PathBuf};

/// An allowed folder, resolved, with what granted it (for error messages).
#[derive(Debug, Clone)]
struct Grant {
    path: PathBuf,
    why: String,
}

/// The folders a session may read and write. `unconfined()` allows everything (the REPL
/// without `--allow-*` flags, and engines built by library users and tests).
#[derive(Debug, Clone, Default)]
pub struct Confinement {
    confined: bool,
    read: Vec<Grant>,
    write: Vec<Grant>,
}

/// A refused path: the message names it and the flag that allows it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct AccessDenied(pub String);

impl Confinement {
    pub fn unconfined() -> Self {
        Self::default()
    }

    /// Nothing allowed yet; add grants with [`Self::allow_read`] / [`Self::allow_write`].
    pub fn confined() -> Self {
        Self {
            confined: true,
            ..Self::default()
        }
    }

    /// Allow reading under `path` (`why` says what granted it, e.g. "--allow-read").
    pub fn allow_read(&mut self, path: &Path, why: &str) {
        if let Ok(path) = resolve(path) {
            self.read.push(Grant {
                path,
                why: why.to_string(),
            });
        }
    }

    /// Allow writing (and reading) under `path`.
    pub fn allow_write(&mut self, path: &Path, why: &str) {
        if let Ok(path) = resolve(path) {
            self.write.push(Grant {
                path,
                why: why.to_string(),
            });
        }
    }

    /// Allow reading every existing path among the strings of `value` (params, recursively):
    /// a folder is granted whole, a file with the folder holding it.
    pub fn allow_given_paths(&mut self, value: &rhai::Dynamic) {
        if let Some(s) = value.read_lock::<rhai::ImmutableString>() {
            let p = Path::new(s.as_str());
            if !s.is_empty() && p.exists() {
                let folder = if p.is_dir() {
                    p
                } else {
                    p.parent()
                        .filter(|d| !d.as_os_str().is_empty())
                        .unwrap_or(Path::new("."))
                };
                self.allow_read(folder, "a path given in params");
            }
        } else if let Some(arr) = value.read_lock::<rhai::Array>() {
            for v in arr.iter() {
                self.allow_given_paths(v);
            }
        } else if let Some(map) = value.read_lock::<rhai::Map>() {
            for v in map.values() {
                self.allow_given_paths(v);
            }
        }
    }

    /// Ok when the session may read `path`; else an error naming it and `--allow-read`.
    pub fn check_read(&self, path: &Path) -> Result<(), AccessDenied> {
        if !self.confined {
            return Ok(());
        }
        let resolved = self.resolved(path, "read")?;
        if self
            .read
            .iter()
            .chain(&self.write)
            .any(|g| resolved.starts_with(&g.path))
        {
            return Ok(());
        }
        Err(AccessDenied(format!(
            "cannot read {}{}: outside the folders this script may read (its own folder, the project, the run folder, paths given in params, {ALLOW_READ} and {ALLOW_WRITE} folders); allow it with {ALLOW_READ} DIR",
            path.display(),
            shown_if_different(path, &resolved),
        )))
    }

    /// Ok when the session may write `path`; else an error naming it and `--allow-write`.
    pub fn check_write(&self, path: &Path) -> Result<(), AccessDenied> {
        if !self.confined {
            return Ok(());
        }
        let resolved = self.resolved(path, "write")?;
        if self.write.iter().any(|g| resolved.starts_with(&g.path)) {
            return Ok(());
        }
        let allowed: Vec<String> = self
            .write
            .iter()
            .map(|g| format!("{} ({})", g.path.display(), g.why))
            .collect();
        Err(AccessDenied(format!(
            "cannot write {}{}: scripts write only under {}; allow it with {ALLOW_WRITE} DIR",
            path.display(),
            shown_if_different(path, &resolved),
            if allowed.is_empty() {
                "folders given with --allow-write (none given)".to_string()
            } else {
                allowed.join(", ")
            }
        )))
    }

    fn resolved(&self, path: &Path, what: &str) -> Result<PathBuf, AccessDenied> {
        resolve(path).map_err(|e| {
            AccessDenied(format!(
                "cannot {what} {}: cannot resolve the path: {e}",
                path.display()
            ))
        })
    }
}

/// The folders given with `--allow-read` and `--allow-write`; stored in a run's `params.json`
/// so that `--resume` confines the script the same way.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Grants {
    #[serde(default)]
    pub read: Vec<PathBuf>,
    #[serde(default)]
    pub write: Vec<PathBuf>,
}

impl Grants {
    /// The same folders as absolute paths (a resumed run may start elsewhere).
    pub fn absolute(&self) -> Grants {
        let abs = |ps: &[PathBuf]| {
            ps.iter()
                .map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone()))
                .collect()
        };
        Grants {
            read: abs(&self.read),
            write: abs(&self.write),
        }
    }

    /// These folders and `other`'s.
    pub fn union(mut self, other: &Grants) -> Grants {
        self.read.extend(other.read.iter().cloned());
        self.write.extend(other.write.iter().cloned());
        self
    }

    /// `lpo run`'s confinement of `script` (its folder is readable) writing into `run_dir`,
    /// with `params` (existing paths among them are readable).
    pub fn for_run(&self, script: &Path, run_dir: &Path, params: &rhai::Map) -> Confinement {
        let mut c = self.flags_only();
        c.allow_write(run_dir, "the run folder");
        let script_dir = script
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        c.allow_read(script_dir, "the script's folder");
        if Path::new(STDLIB).is_dir() {
            c.allow_read(
                Path::new("."),
                "the project (the working folder holds stdlib/)",
            );
        }
        for v in params.values() {
            c.allow_given_paths(v);
        }
        c
    }

    /// The REPL's confinement when an `--allow-*` flag is given: the project and the flags.
    pub fn repl_confinement(&self) -> Confinement {
        let mut c = self.flags_only();
        if Path::new(STDLIB).is_dir() {
            c.allow_read(
                Path::new("."),
                "the project (the working folder holds stdlib/)",
            );
        }
        c
    }

    fn flags_only(&self) -> Confinement {
        let mut c = Confinement::confined();
        for p in &self.read {
            c.allow_read(p, ALLOW_READ);
        }
        for p in &self.write {
            c.allow_write(p, ALLOW_WRITE);
        }
        c
    }
}

/// The stdlib folder searched first by imports (relative to the working folder).
const STDLIB: &str = "stdlib";

pub const ALLOW_READ: &str = "--allow-read";
pub const ALLOW_WRITE: &str = "--allow-write";

fn shown_if_different(path: &Path, resolved: &Path) -> String {
    match std::path::absolute(path) {
        Ok(abs) if abs == resolved => String::new(),
        _ => format!(" (resolved: {})", resolved.display()),
    }
}

/// `path` made absolute with `..` and symbolic links resolved. Components that do not exist yet
/// are appended as written (they cannot be links); a link whose target is missing is an error,
/// since writing through it would create a file wherever it points.
pub fn resolve(path: &Path) -> std::io::Result<PathBuf> {
    let absolute = std::path::absolute(path)?;
    let mut out = PathBuf::new();
    let mut exists = true;
    for component in absolute.components() {
        match component {
            Component::Prefix(_) | Component::RootDir => out.push(component.as_os_str()),
            Component::CurDir => {}
            // `out` has no links left in it, so its parent is the real parent.
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(name) => {
                out.push(name);
                if !exists {
                    continue;
                }
                match std::fs::symlink_metadata(&out) {
                    Ok(meta) if meta.file_type().is_symlink() => {
                        out = std::fs::canonicalize(&out).map_err(|e| {
                            std::io::Error::new(
                                e.kind(),
                                format!("{} is a link to a missing target", out.display()),
                            )
                        })?;
                    }
                    Ok(_) => {}
                    Err(_) => exists = false,
                }
            }
        }
    }
    Ok(out)
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    #[test]
    fn resolve_handles_dots_links_and_missing_tails() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        std::fs::create_dir(root.join("a")).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("a/link")).unwrap();
        assert_eq!(resolve(&root.join("a/../b/c")).unwrap(), root.join("b/c"));
        assert_eq!(
            resolve(&root.join("a/new/../../x")).unwrap(),
            root.join("x")
        );
        assert_eq!(
            resolve(&root.join("a/link/passwd")).unwrap(),
            std::fs::canonicalize("/etc").unwrap().join("passwd")
        );
        std::os::unix::fs::symlink(root.join("missing"), root.join("a/dangling")).unwrap();
        assert!(resolve(&root.join("a/dangling/x")).is_err());
    }

    #[test]
    fn confined_session_reads_and_writes_only_its_grants() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("run")).unwrap();
        std::fs::create_dir_all(root.join("data")).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("run/etc")).unwrap();
        let mut c = Confinement::confined();
        c.allow_write(&root.join("run"), "the run folder");
        c.allow_read(&root.join("data"), ALLOW_READ);
        assert!(c.check_write(&root.join("run/new/file.json")).is_ok());
        assert!(
            c.check_read(&root.join("run/x")).is_ok(),
            "writable is readable"
        );
        assert!(c.check_read(&root.join("data/x")).is_ok());
        let err = c.check_write(&root.join("data/x")).unwrap_err().0;
        assert!(err.contains("--allow-write DIR"), "{err}");
        let err = c.check_write(&root.join("run/../../x")).unwrap_err().0;
        assert!(err.contains("cannot write"), "{err}");
        let err = c.check_read(&root.join("run/etc/passwd")).unwrap_err().0;
        assert!(
            err.contains("--allow-read DIR") && err.contains("/etc/passwd"),
            "{err}"
        );
        assert!(Confinement::unconfined()
            .check_write(Path::new("/x"))
            .is_ok());
    }
}
