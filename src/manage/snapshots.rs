//! Internal snapshots of a writable qcow2 top, taken, renamed and deleted while mounted.
//! The table work is the writer's (`format::qcow2::write::snapshot_ops`); this makes the
//! view a new snapshot shows (the snapshot over the top's backing chain) and the changes of
//! the live disk since it.

use crate::cache::ByteCache;
use crate::changes::Changes;
use crate::changes::file::ChangesFile;
use crate::error::{Error, Kind, Result};
use crate::format::Layer;
use crate::format::qcow2::Qcow2Layer;
use crate::format::qcow2::write::Qcow2Writer;
use crate::view::View;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// Resolved-extent cache entries of a snapshot view.
const CHUNK_ENTRIES: usize = 4096;

pub struct SnapshotSet {
    /// The chain, top first; the top is a writable qcow2 layer.
    layers: Vec<Arc<dyn Layer>>,
    /// The live disk over `layers`.
    live: Arc<View>,
    clusters: Arc<ByteCache>,
}

/// A snapshot just taken, with the view of its disk.
pub struct TakenSnapshot {
    pub id: String,
    pub name: String,
    pub view: Arc<View>,
    /// The live disk's bytes where they may differ from the snapshot (changes/NAME.raw);
    /// computed from the live tables at each read, so it follows later writes.
    pub changes: Arc<ChangesFile>,
    pub mtime: SystemTime,
}

impl SnapshotSet {
    /// None unless the top of `layers` is a qcow2 image written in place. `live` is the live
    /// disk over `layers`.
    pub fn new(
        layers: &[Arc<dyn Layer>],
        live: &Arc<View>,
        clusters: &Arc<ByteCache>,
    ) -> Option<SnapshotSet> {
        let top: &dyn Layer = &**layers.first()?;
        let q = (top as &dyn std::any::Any).downcast_ref::<Qcow2Layer>()?;
        q.writer.as_ref()?;
        Some(SnapshotSet {
            layers: layers.to_vec(),
            live: live.clone(),
            clusters: clusters.clone(),
        })
    }

    fn top(&self) -> Result<(&Qcow2Layer, &Arc<Qcow2Writer>)> {
        let top: &dyn Layer = &*self.layers[0];
        let q = (top as &dyn std::any::Any)
            .downcast_ref::<Qcow2Layer>()
            .ok_or_else(|| Error::invalid("internal: the top is not qcow2"))?;
        let w = q
            .writer
            .as_ref()
            .ok_or_else(|| Error::new(Kind::ReadOnly, "the top image is read-only"))?;
        Ok((q, w))
    }

    /// Takes snapshot `name` of the live disk now.
    pub fn create(&self, name: &str) -> Result<TakenSnapshot> {
        let (q, w) = self.top()?;
        let made = w.create_snapshot(name)?;
        let mut layers = vec![Qcow2Layer::made_snapshot(&q.image, &made)];
        layers.extend(self.layers[1..].iter().cloned());
        let changes = Changes::between(&layers, made.size, &self.layers, self.live.size());
        let view = View::new(layers, made.size, self.clusters.clone(), CHUNK_ENTRIES);
        let mtime = UNIX_EPOCH + made.date;
        Ok(TakenSnapshot {
            id: made.id,
            name: made.name,
            view: Arc::new(view),
            changes: Arc::new(ChangesFile::new(self.live.clone(), changes, mtime)),
            mtime,
        })
    }

    /// Deletes the snapshot with id `id` (its views must no longer be read).
    pub fn delete(&self, id: &str) -> Result<()> {
        self.top()?.1.delete_snapshot(id)
    }

    pub fn rename(&self, id: &str, name: &str) -> Result<()> {
        self.top()?.1.rename_snapshot(id, name)
    }
}
