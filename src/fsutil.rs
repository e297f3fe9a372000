//! Files written so that a crash never leaves a half-written one behind, and content digests
//! (cache keys over model folders).

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};

/// Write `bytes` to `path` atomically: a temporary file in the same folder, fsync, rename.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create folder {}", dir.display()))?;
    let name = path
        .file_name()
        .with_context(|| format!("{} has no file name", path.display()))?
        .to_string_lossy();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| -> Result<()> {
        let mut f = std::fs::File::create(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        f.write_all(bytes)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
            .with_context(|| format!("cannot move {} to {}", tmp.display(), path.display()))?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Hex SHA-256 over the contents of `paths`: files, or folders walked in sorted order (each
/// file's path relative to its root and its bytes enter the hash; hidden files are skipped, so
/// temporaries of `atomic_write` do not change it).
pub fn content_digest(paths: &[&Path]) -> Result<String> {
    use sha2::{Digest, Sha256};
    fn walk(root: &Path, path: &Path, hasher: &mut Sha256) -> Result<()> {
        if path.is_dir() {
            let mut entries = std::fs::read_dir(path)
                .with_context(|| format!("cannot list {}", path.display()))?
                .map(|e| e.map(|e| e.path()))
                .collect::<std::io::Result<Vec<_>>>()
                .with_context(|| format!("cannot list {}", path.display()))?;
            entries.sort();
            for entry in entries {
                let hidden = entry
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'));
                if !hidden {
                    walk(root, &entry, hasher)?;
                }
            }
            return Ok(());
        }
        let bytes =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let rel = path.strip_prefix(root).unwrap_or(path);
        hasher.update(rel.to_string_lossy().as_bytes());
        hasher.update((bytes.len() as u64).to_le_bytes());
        hasher.update(&bytes);
        Ok(())
    }
    let mut hasher = Sha256::new();
    for path in paths {
        if !path.exists() {
            anyhow::bail!("cannot digest {}: no such file or folder", path.display());
        }
        walk(path, path, &mut hasher)?;
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_and_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/file.bin");
        atomic_write(&p, b"one").unwrap();
        atomic_write(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(p.parent().unwrap()).unwrap().count(), 1);
    }

    #[test]
    fn digest_follows_content_not_hidden_files() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("model");
        atomic_write(&model.join("a/w.bin"), b"weights").unwrap();
        atomic_write(&model.join("config.json"), b"{}").unwrap();
        let first = content_digest(&[&model]).unwrap();
        assert_eq!(first.len(), 64);
        atomic_write(&model.join(".tmp"), b"scratch").unwrap();
        assert_eq!(content_digest(&[&model]).unwrap(), first);
        atomic_write(&model.join("a/w.bin"), b"weightz").unwrap();
        assert_ne!(content_digest(&[&model]).unwrap(), first);
        let err = content_digest(&[&dir.path().join("missing")]).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
    }
}
