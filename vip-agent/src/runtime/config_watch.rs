//! `run --watch-config`: a config file whose content changes is reloaded as on SIGHUP.
//! Kubernetes updates a mounted ConfigMap by swapping a symlink in the directory above the
//! file, which no watch on the file itself sees; comparing the content every few seconds sees
//! every kind of update (in place, rename, symlink swap) at the cost of a small read.

use std::{path::PathBuf, time::Duration};

pub(super) struct ConfigWatch {
    path: PathBuf,
    /// The content last loaded or looked at; `None` while unreadable.
    seen: Option<Vec<u8>>,
}

impl ConfigWatch {
    /// How often the file is read.
    pub(super) const INTERVAL: Duration = Duration::from_secs(2);

    pub(super) fn new(path: PathBuf) -> Self {
        let seen = std::fs::read(&path).ok();
        Self { path, seen }
    }

    /// Whether the content differs from what was last seen (and takes it as seen). A file
    /// that cannot be read (in the middle of a swap) is no change.
    pub(super) fn changed(&mut self) -> bool {
        match std::fs::read(&self.path) {
            Ok(now) if self.seen.as_ref() != Some(&now) => {
                self.seen = Some(now);
                true
            }
            _ => false,
        }
    }

    /// Takes the file as it is now as seen (a reload by signal is about to read it).
    pub(super) fn sync(&mut self) {
        self.changed();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sees_in_place_writes_and_symlink_swaps_once() {
        let dir = std::env::temp_dir().join(format!("vip-watch-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("a")).unwrap();
        std::fs::create_dir_all(dir.join("b")).unwrap();
        std::fs::write(dir.join("a/vip.toml"), "one").unwrap();
        std::fs::write(dir.join("b/vip.toml"), "two").unwrap();
        // As a ConfigMap volume: vip.toml -> ..data/vip.toml, ..data -> a timestamped dir.
        std::os::unix::fs::symlink("a", dir.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/vip.toml", dir.join("vip.toml")).unwrap();
        let mut w = ConfigWatch::new(dir.join("vip.toml"));
        assert!(!w.changed());
        std::os::unix::fs::symlink("b", dir.join("..data_tmp")).unwrap();
        std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
        assert!(w.changed(), "the swap is a change");
        assert!(!w.changed(), "seen once");
        std::fs::write(dir.join("b/vip.toml"), "three").unwrap();
        w.sync();
        assert!(!w.changed(), "a reload by signal took it");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
