//! The in-memory index shared by the handles and the writer thread: the segments
//! in use, the head (oldest pending record) and the tail counters.

use std::collections::BTreeMap;

use super::SpoolDepth;
use super::segment::SEGMENT_HEADER_LEN;

/// Where the oldest pending record starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Head {
    /// Segment holding it (or, once everything is removed, the active segment).
    pub(super) seg: u64,
    /// Byte offset of its frame in that segment.
    pub(super) off: u64,
    /// Ordinal of the first pending record.
    pub(super) index: u64,
    /// Logical byte position (sum of frame sizes since open) of `off`.
    pub(super) byte: u64,
}

/// One segment in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct SegInfo {
    /// Durable, valid length of the file.
    pub(super) len: u64,
    /// Ordinal after the segment's last durable record.
    pub(super) end_index: u64,
    /// Logical byte position after it.
    pub(super) end_byte: u64,
    /// No more appends go to this segment.
    pub(super) sealed: bool,
}

/// Segments, head and tail, under the `Core` mutex.
pub(super) struct State {
    pub(super) segments: BTreeMap<u64, SegInfo>,
    pub(super) head: Head,
    /// Ordinal after the last durable record.
    pub(super) tail_index: u64,
    /// Logical byte position after the last durable record.
    pub(super) tail_byte: u64,
    /// Bytes of appends in flight, counted against `max_bytes`.
    pub(super) reserved: u64,
}

impl State {
    pub(super) fn depth(&self) -> SpoolDepth {
        SpoolDepth {
            events: self.tail_index.saturating_sub(self.head.index),
            bytes: self.tail_byte.saturating_sub(self.head.byte),
        }
    }
}

/// Moves a head that sits at the end of sealed segments to the start of the
/// next segment.
pub(super) fn normalize_head(mut head: Head, segments: &BTreeMap<u64, SegInfo>) -> Head {
    loop {
        let Some(info) = segments.get(&head.seg) else {
            return head;
        };
        if !info.sealed || head.off < info.len {
            return head;
        }
        let Some((next, _)) = segments.range(head.seg + 1..).next() else {
            return head;
        };
        head = Head { seg: *next, off: SEGMENT_HEADER_LEN, index: info.end_index, byte: info.end_byte };
    }
}
