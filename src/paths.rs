//! Paths stored inside images (backing files, parents, extents, data files): how they resolve
//! against the image that names them. Shared by the chain opener and the format drivers.

use std::path::{Path, PathBuf};

/// Resolves a path stored in `child_path`'s image: absolute paths stay, relative ones are
/// relative to the child's directory (not the working directory).
pub fn resolve_relative(child_path: &Path, stored: &str) -> PathBuf {
    let p = Path::new(stored);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        child_path.parent().unwrap_or(Path::new(".")).join(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_backing_paths_follow_the_child() {
        assert_eq!(
            resolve_relative(Path::new("/a/b/top.qcow2"), "base.qcow2"),
            PathBuf::from("/a/b/base.qcow2")
        );
        assert_eq!(
            resolve_relative(Path::new("/a/b/top.qcow2"), "/x/base"),
            PathBuf::from("/x/base")
        );
        assert_eq!(
            resolve_relative(Path::new("top.qcow2"), "base"),
            PathBuf::from("base")
        );
    }
}
