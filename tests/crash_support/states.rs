//! Crash states of one image file from a hostfs recording. A crash at host instant `tc` keeps
//! every write that a completed flush covers (the base), and of the writes begun since, each
//! 4 KiB page of the file at any one of its versions (the page before them, or after the
//! first, second, ... of them): the page cache writes pages back in any order.

use super::layout::{Layout, Role};
use crate::hostfs::{Event, Op};
use std::collections::{BTreeMap, BTreeSet};

pub const PAGE: u64 = 4096;

/// A pending write's bytes within one page: (file offset, bytes, event index).
type Piece<'a> = (u64, &'a [u8], usize);

/// How a state picks page versions among the writes since the last flush.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pick {
    /// The first `n` of them in completion order, whole (no reordering: what a write-through
    /// writer that orders its writes survives).
    Prefix(usize),
    /// Each page at a random version (seeded).
    Pages(u64),
}

/// The host history of one file: its bytes before recording and the events on it.
pub struct Recording {
    pub pre: Vec<u8>,
    pub events: Vec<Event>,
    /// The metadata role of each write event's bytes (empty: data).
    pub roles: Vec<BTreeSet<Role>>,
    /// Whether the metadata an event writes was already reachable when it was written
    /// (false: a fresh table or block, written before anything points to it).
    pub linked: Vec<bool>,
    /// Metadata maps as the file went: (first event index they hold after, layout).
    pub layouts: Vec<(usize, Layout)>,
}

fn apply(buf: &mut Vec<u8>, off: u64, data: &[u8]) {
    let (o, end) = (off as usize, off as usize + data.len());
    if buf.len() < end {
        buf.resize(end, 0);
    }
    buf[o..end].copy_from_slice(data);
}

/// A write, truncate or fallocate as bytes written (None: no content change).
fn as_bytes(e: &Event) -> Option<(u64, Vec<u8>)> {
    if !e.ok() {
        return None;
    }
    match &e.op {
        Op::Write { off, data } => Some((*off, data.clone())),
        Op::Fallocate { mode, off, len } if mode & libc::FALLOC_FL_PUNCH_HOLE != 0 => {
            Some((*off, vec![0; *len as usize]))
        }
        Op::Fallocate { mode, off, len } if mode & libc::FALLOC_FL_ZERO_RANGE != 0 => {
            Some((*off, vec![0; *len as usize]))
        }
        _ => None,
    }
}

pub fn apply_event(buf: &mut Vec<u8>, e: &Event) {
    if let Some((off, data)) = as_bytes(e) {
        apply(buf, off, &data);
    } else if let (true, Op::SetLen(n)) = (e.ok(), &e.op) {
        buf.resize(*n as usize, 0);
    }
}

impl Recording {
    /// `events`: those of this file only, in completion order.
    pub fn new(pre: Vec<u8>, events: Vec<Event>) -> Recording {
        let mut img = pre.clone();
        let mut layouts = vec![(0, Layout::parse(&img))];
        for (i, e) in events.iter().enumerate() {
            let moves = match as_bytes(e) {
                Some((off, ref d)) => layouts.last().unwrap().1.touches_root(off, d.len() as u64),
                None => false,
            };
            apply_event(&mut img, e);
            if moves {
                let l = Layout::parse(&img);
                if l != layouts.last().unwrap().1 {
                    layouts.push((i + 1, l));
                }
            }
        }
        // A fresh table or block is written before anything points to it: a range no map
        // knows yet takes the role a later map gives it.
        let (roles, linked) = events
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let Some((off, d)) = as_bytes(e) else {
                    return (BTreeSet::new(), false);
                };
                // The map before this event: a table it links itself is not linked yet.
                let from = layouts.iter().rposition(|(at, _)| *at <= i).unwrap_or(0);
                let now = layouts[from].1.roles_of(off, d.len() as u64);
                if !now.is_empty() {
                    return (now, true);
                }
                let later = layouts[from..]
                    .iter()
                    .map(|(_, l)| l.roles_of(off, d.len() as u64))
                    .find(|r| !r.is_empty())
                    .unwrap_or_default();
                (later, false)
            })
            .unzip();
        Recording {
            pre,
            events,
            roles,
            linked,
            layouts,
        }
    }

    pub fn final_image(&self) -> Vec<u8> {
        let mut img = self.pre.clone();
        for e in &self.events {
            apply_event(&mut img, e);
        }
        img
    }

    fn is_flush(e: &Event) -> bool {
        e.is_fsync() && e.ok()
    }

    /// Index of the events a crash at `tc` keeps whole: those that completed before the last
    /// flush completed by `tc` started (a prefix, as events are in completion order).
    pub fn durable_len(&self, tc: u64) -> usize {
        let flush_start = self
            .events
            .iter()
            .filter(|e| Self::is_flush(e) && e.completed <= tc)
            .map(|e| e.started)
            .max();
        match flush_start {
            Some(s) => self.events.partition_point(|e| e.completed < s),
            None => 0,
        }
    }

    /// Events begun by `tc` that no flush covers: (index, offset, bytes).
    fn pending(&self, tc: u64) -> Vec<(usize, u64, Vec<u8>)> {
        let d = self.durable_len(tc);
        self.events[d..]
            .iter()
            .enumerate()
            .filter(|(_, e)| e.started <= tc)
            .filter_map(|(i, e)| as_bytes(e).map(|(o, b)| (d + i, o, b)))
            .collect()
    }

    /// The file after a crash at `tc`, given the base (`durable_len(tc)` events applied).
    /// Returns it and a line describing what was kept of the pending writes.
    pub fn state(&self, base: &[u8], tc: u64, pick: Pick) -> (Vec<u8>, String) {
        let pending = self.pending(tc);
        let mut img = base.to_vec();
        match pick {
            Pick::Prefix(n) => {
                let n = n.min(pending.len());
                for (_, off, data) in &pending[..n] {
                    apply(&mut img, *off, data);
                }
                (
                    img,
                    format!("the first {n} of {} pending writes", pending.len()),
                )
            }
            Pick::Pages(seed) => {
                // Per page, the pieces of the pending writes in order.
                let mut pages: BTreeMap<u64, Vec<Piece>> = BTreeMap::new();
                for (i, off, data) in &pending {
                    let mut at = *off;
                    while at < off + data.len() as u64 {
                        let page_end = (at / PAGE + 1) * PAGE;
                        let end = page_end.min(off + data.len() as u64);
                        let piece = &data[(at - off) as usize..(end - off) as usize];
                        pages.entry(at / PAGE).or_default().push((at, piece, *i));
                        at = end;
                    }
                }
                let mut rng = crate::common::Rng::new(seed);
                // Some states keep or drop whole pages only, others pick any version.
                let style = rng.below(3);
                let mut kept = Vec::new();
                for (page, pieces) in &pages {
                    let n = pieces.len() as u64;
                    let k = match style {
                        0 => rng.below(n + 1),
                        1 => n * rng.below(2),
                        _ => {
                            if rng.below(4) == 0 {
                                0
                            } else {
                                n
                            }
                        }
                    } as usize;
                    for (at, piece, _) in &pieces[..k] {
                        apply(&mut img, *at, piece);
                    }
                    if k < pieces.len() {
                        kept.push(format!("p{page:#x}:{k}/{n}"));
                    }
                }
                let line = format!(
                    "{} pending writes over {} pages; pages not at their last version: {}",
                    pending.len(),
                    pages.len(),
                    if kept.is_empty() {
                        "none".to_string()
                    } else {
                        kept.join(" ")
                    }
                );
                (img, line)
            }
        }
    }

    /// The number of pending writes at `tc`.
    pub fn pending_count(&self, tc: u64) -> usize {
        self.pending(tc).len()
    }

    /// Describes the pending writes at `tc` (index, range, role) for a failure message.
    pub fn describe_pending(&self, tc: u64) -> String {
        self.pending(tc)
            .iter()
            .map(|(i, off, d)| {
                let roles: Vec<String> = self.roles[*i].iter().map(|r| format!("{r:?}")).collect();
                let what = if roles.is_empty() {
                    "data".to_string()
                } else {
                    roles.join("+")
                };
                format!("#{i} {what} {off:#x}+{}", d.len())
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Ordering of metadata writes against flushes.
    pub fn order(&self) -> Order {
        let mut o = Order::default();
        let flushes: Vec<&Event> = self.events.iter().filter(|e| Self::is_flush(e)).collect();
        o.flushes = flushes.len();
        let refcount: Vec<&Event> = self
            .events
            .iter()
            .zip(&self.roles)
            .filter(|(e, r)| e.ok() && r.iter().any(|r| r.is_refcount()))
            .map(|(e, _)| e)
            .collect();
        o.refcount_writes = refcount.len();
        for (i, (e, roles)) in self.events.iter().zip(&self.roles).enumerate() {
            if !e.ok() || !roles.iter().any(|r| r.is_table()) {
                if e.ok() && roles.is_empty() && as_bytes(e).is_some() {
                    o.data_writes += 1;
                }
                continue;
            }
            o.table_writes += 1;
            // The content of a fresh table nothing points to yet cannot expose anything.
            if !self.linked[i] {
                continue;
            }
            // The start of the last flush that had completed when this write began.
            let barrier = flushes
                .iter()
                .filter(|f| f.completed < e.started)
                .map(|f| f.started)
                .max()
                .unwrap_or(0);
            let unflushed = refcount
                .iter()
                .filter(|r| r.started < e.started && r.completed >= barrier)
                .count();
            if unflushed > 0 {
                o.table_after_unflushed_refcount += 1;
                if o.first.is_none() {
                    o.first = Some(format!(
                        "event #{i} ({:?} {:?}) follows {unflushed} unflushed refcount write(s)",
                        roles, e.op
                    ));
                }
            }
        }
        o
    }
}

/// Counts of one recording: how metadata writes were ordered against flushes.
#[derive(Default, Debug)]
pub struct Order {
    pub flushes: usize,
    pub refcount_writes: usize,
    pub table_writes: usize,
    pub data_writes: usize,
    /// Writes to reachable L1/L2/header/snapshot tables begun while a refcount write was not
    /// yet flushed (fresh tables, written before they are linked, do not count).
    pub table_after_unflushed_refcount: usize,
    pub first: Option<String>,
}
