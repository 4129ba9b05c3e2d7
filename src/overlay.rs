//! `--overlay FILE`: a qcow2 overlay over the image, created or validated before the mount.
