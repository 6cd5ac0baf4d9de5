//! Pinned maps: the pin directory, and the check that a pinned map reused at load has the
//! shape this program needs.

use std::path::Path;

use aya::maps::MapInfo;
use vip_common::layout::MapLayout;

use super::error::{DataplaneError, Result, map_err};

/// Creates a pin directory (under a bpffs mount).
pub(crate) fn create_pin_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| DataplaneError::PinDir {
        path: dir.to_owned(),
        source,
    })
}

/// Refuses a pinned map whose shape differs from what this program needs: aya would reuse it
/// silently, and the program would read garbage.
pub(crate) fn check_pinned(
    path: &Path,
    name: &'static str,
    layouts: &[MapLayout],
    max_entries: Option<u32>,
) -> Result<()> {
    let info = MapInfo::from_pin(path).map_err(map_err(name))?;
    let want = layouts
        .iter()
        .find(|l| l.name == name)
        .ok_or(DataplaneError::MissingMap(name))?;
    let want_entries = max_entries.unwrap_or(0);
    if info.key_size() != want.key_size
        || info.value_size() != want.value_size
        || info.max_entries() != want_entries
    {
        return Err(DataplaneError::PinnedMapMismatch {
            path: path.to_owned(),
            key: info.key_size(),
            value: info.value_size(),
            entries: info.max_entries(),
            want_key: want.key_size,
            want_value: want.value_size,
            want_entries,
        });
    }
    Ok(())
}
