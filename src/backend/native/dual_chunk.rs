//! Dual Chunk Attention (An et al. 2024, "Training-Free Long-Context Scaling of Large Language
//! Models"; config.json's `dual_chunk_attention_config`, as Qwen2.5-1M ships it): positions for
//! inputs longer than the trained window, with no relative distance larger than it.
//!
//! The sequence is cut into chunks of `chunk_len = chunk_size - local_size` positions. A key is
//! rotated at its position within its chunk. A query is rotated three ways, one for each kind of
//! key it meets: keys of its own chunk (intra) at its position within the chunk, so distances
//! there are exact; keys of the chunk just before (successive) at that position plus
//! `chunk_len`, capped at `chunk_size`, so nearby keys keep their distance; keys of every
//! earlier chunk (inter) at one fixed position, `min(2 · chunk_len - 1, chunk_size)`. One softmax
//! runs over all the scores. These are the indices of the authors' public implementation
//! (ChunkLlama's Qwen attention, the reference of `tests/fixtures/tiny-dca`). Within the first
//! chunk every rotation is the plain one, so a sequence that fits a chunk attends as without DCA.

use std::ops::Range;

use anyhow::{bail, Result};

use crate::bundle::DualChunkConfig;

/// Which rotation of a query scores a span of keys: the index of its copy in a row's queries.
pub const INTRA: usize = 0;
pub const SUCCESSIVE: usize = 1;
pub const INTER: usize = 2;
/// The rotated copies of each query row.
pub const QUERY_COPIES: usize = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DualChunk {
    chunk_len: usize,
    chunk_size: usize,
}

impl DualChunk {
    pub fn from_config(cfg: &DualChunkConfig) -> Result<Self> {
        if cfg.chunk_len() == 0 {
            bail!(
                "config.json: dual_chunk_attention_config needs local_size ({}) below chunk_size ({})",
                cfg.local_size,
                cfg.chunk_size
            );
        }
        Ok(Self {
            chunk_len: cfg.chunk_len(),
            chunk_size: cfg.chunk_size,
        })
    }

    /// Positions of one chunk: a sequence this long attends exactly as without DCA.
    pub fn chunk_len(&self) -> usize {
        self.chunk_len
    }

    /// The position a key at `pos` is rotated at.
    pub fn key_position(&self, pos: usize) -> usize {
        pos % self.chunk_len
    }

    /// The positions a query at `pos` is rotated at, indexed by `INTRA`, `SUCCESSIVE`, `INTER`.
    pub fn query_positions(&self, pos: usize) -> [usize; QUERY_COPIES] {
        let within = pos % self.chunk_len;
        [
            within,
            (within + self.chunk_len).min(self.chunk_size),
            (2 * self.chunk_len - 1).min(self.chunk_size),
        ]
    }

    /// The keys `first..=pos` a query at `pos` attends to, cut where its rotation changes:
    /// `(keys, copy)` in key order, empty spans left out.
    pub fn spans(&self, first: usize, pos: usize) -> impl Iterator<Item = (Range<usize>, usize)> {
        let own = pos / self.chunk_len * self.chunk_len;
        let previous = own.saturating_sub(self.chunk_len);
        [
            (0..previous, INTER),
            (previous..own, SUCCESSIVE),
            (own..pos + 1, INTRA),
        ]
        .into_iter()
        .map(move |(keys, copy)| (keys.start.max(first)..keys.end, copy))
        .filter(|(keys, _)| !keys.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dca(chunk_size: usize, local_size: usize) -> DualChunk {
        DualChunk::from_config(&DualChunkConfig {
            chunk_size,
            local_size,
        })
        .unwrap()
    }

    #[test]
    fn positions_follow_the_chunks() {
        // chunk_len 6, chunk_size 8.
        let d = dca(8, 2);
        assert_eq!(d.chunk_len(), 6);
        assert_eq!(
            (0..14).map(|p| d.key_position(p)).collect::<Vec<_>>(),
            [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 0, 1]
        );
        // In the first chunk every copy sits at the query's own position but the capped ones.
        assert_eq!(d.query_positions(3), [3, 8, 8]);
        assert_eq!(d.query_positions(7), [1, 7, 8]);
        assert_eq!(d.query_positions(13), [1, 7, 8]);
        // A wide local window: 2·chunk_len - 1 below chunk_size.
        assert_eq!(dca(10, 6).query_positions(5), [1, 5, 7]);
    }

    #[test]
    fn spans_cover_the_visible_keys_once_in_order() {
        let d = dca(8, 2);
        let spans = |first, pos| d.spans(first, pos).collect::<Vec<_>>();
        assert_eq!(spans(0, 4), [(0..5, INTRA)]);
        assert_eq!(spans(0, 7), [(0..6, SUCCESSIVE), (6..8, INTRA)]);
        assert_eq!(
            spans(0, 19),
            [(0..12, INTER), (12..18, SUCCESSIVE), (18..20, INTRA)]
        );
        // A sliding window's first visible key cuts the spans.
        assert_eq!(spans(14, 19), [(14..18, SUCCESSIVE), (18..20, INTRA)]);
        assert_eq!(spans(19, 19), [(19..20, INTRA)]);
    }

    #[test]
    fn a_local_window_as_wide_as_the_chunk_is_refused() {
        let cfg = DualChunkConfig {
            chunk_size: 8,
            local_size: 8,
        };
        assert!(DualChunk::from_config(&cfg).is_err());
    }
}
