//! The copy engine's pure decisions, testable without a GPU: where each piece of a job lands
//! (packed back to back, in job order, as callers expect), which path moves it (a DMA from
//! registered host memory, the gather kernel, or a host gather into pinned staging), the
//! gather kernel's table, and the page-aligned ranges host mappings are registered over.

use std::ops::Range;

pub(super) use crate::backend::offload::{gather_table_rows as table_rows, GATHER_ROW_BYTES};

/// Jobs with at most this many direct copies (after merging contiguous pieces) issue one
/// cuMemcpyHtoDAsync each; more go through the gather kernel, since each DMA call costs
/// microseconds of CPU on the launching thread and a Griffin complement has thousands.
pub(super) const MAX_DMA_COPIES: usize = 32;

/// Threads per block of the gather kernel.
pub(super) const GATHER_BLOCK: u32 = 256;

/// Where a piece's bytes come from, as the engine's registry sees them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Source {
    /// Not in a registered span: the copy thread gathers them from host address `host` into
    /// pinned staging.
    Staged { host: usize },
    /// In a registered (page-locked) span: `host` is the first byte, `device` its address for
    /// kernels when the span is also device-mapped, `region` names the registration (bytes
    /// merge only within one).
    Registered {
        region: usize,
        host: usize,
        device: Option<u64>,
    },
}

/// A part of a job's bytes with one source: a job's pieces, back to back, are cut into
/// segments where their source changes (a piece may cross from one registration into the
/// next, or out of the registered spans).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Segment {
    pub source: Source,
    pub len: usize,
}

/// A DMA straight from registered host memory: `len` bytes from host address `host` to byte
/// `dst` of the device buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct DirectCopy {
    pub host: usize,
    pub dst: usize,
    pub len: usize,
}

/// One row of the gather kernel's table (`kernels/gather.cu`): `len` bytes from device
/// address `src` (device-mapped host memory) to byte `dst` of the staging buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct GatherRow {
    pub src: u64,
    pub dst: u64,
    pub len: u64,
}

/// How one job is moved.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct JobPlan {
    /// Where each piece lands in the device buffer (packed back to back, in job order).
    pub landed: Vec<Range<usize>>,
    /// Host bytes the copy thread copies into pinned staging at the offsets they land at
    /// (contiguous ones merged; `host` is an address, `dst` the offset).
    pub staged: Vec<DirectCopy>,
    /// Byte ranges then uploaded from staging to the same offsets of the device buffer
    /// (adjacent staged bytes merged).
    pub staged_runs: Vec<Range<usize>>,
    /// DMAs from registered memory.
    pub direct: Vec<DirectCopy>,
    /// Rows for the gather kernel (empty: no launch).
    pub gather: Vec<GatherRow>,
    /// Bytes the job moves.
    pub bytes: usize,
}

/// The path a job takes, for traces.
impl JobPlan {
    pub fn path(&self) -> &'static str {
        match (
            self.staged.is_empty(),
            self.gather.is_empty(),
            self.direct.is_empty(),
        ) {
            (true, true, true) => "empty",
            (true, true, false) => "dma",
            (true, false, _) => "gather kernel",
            (false, true, true) => "staged",
            (false, _, _) => "mixed",
        }
    }
}

/// A registered run before the path is chosen.
struct Run {
    region: usize,
    host: usize,
    device: Option<u64>,
    dst: usize,
    len: usize,
}

/// Plans a job of pieces of `lens` bytes whose bytes, back to back, are `segments`: pieces
/// land packed in order; staged segments go through the copy thread; registered ones,
/// contiguous runs merged, are DMA'd one call each if there are at most `max_dma` runs,
/// else read by the gather kernel (runs without a device address stay DMAs).
pub(super) fn plan_job(lens: &[usize], segments: &[Segment], max_dma: usize) -> JobPlan {
    let mut plan = JobPlan {
        landed: Vec::with_capacity(lens.len()),
        ..JobPlan::default()
    };
    let mut at = 0;
    for len in lens {
        plan.landed.push(at..at + len);
        at += len;
    }
    plan.bytes = at;
    let mut runs: Vec<Run> = Vec::new();
    let mut at = 0;
    for s in segments.iter().filter(|s| s.len > 0) {
        match s.source {
            Source::Staged { host } => {
                match plan.staged.last_mut() {
                    Some(c) if c.dst + c.len == at && c.host + c.len == host => c.len += s.len,
                    _ => plan.staged.push(DirectCopy {
                        host,
                        dst: at,
                        len: s.len,
                    }),
                }
                match plan.staged_runs.last_mut() {
                    Some(r) if r.end == at => r.end += s.len,
                    _ => plan.staged_runs.push(at..at + s.len),
                }
            }
            Source::Registered {
                region,
                host,
                device,
            } => push_run(&mut runs, region, host, device, at, s.len),
        }
        at += s.len;
    }
    let use_kernel = runs.len() > max_dma;
    for r in runs {
        match (use_kernel, r.device) {
            (true, Some(src)) => split_row(&mut plan.gather, src, r.dst, r.len),
            _ => plan.direct.push(DirectCopy {
                host: r.host,
                dst: r.dst,
                len: r.len,
            }),
        }
    }
    plan
}

/// Appends a registered piece, merged into the last run when it continues it on both sides
/// (same registration, next host byte, next device byte).
fn push_run(
    runs: &mut Vec<Run>,
    region: usize,
    host: usize,
    device: Option<u64>,
    dst: usize,
    len: usize,
) {
    if let Some(r) = runs.last_mut() {
        let device_follows = match (r.device, device) {
            (Some(a), Some(b)) => a + r.len as u64 == b,
            (None, None) => true,
            _ => false,
        };
        if r.region == region && r.host + r.len == host && r.dst + r.len == dst && device_follows {
            r.len += len;
            return;
        }
    }
    runs.push(Run {
        region,
        host,
        device,
        dst,
        len,
    });
}

/// Appends rows for `len` bytes from `src` to `dst`, each at most [`GATHER_ROW_BYTES`].
fn split_row(rows: &mut Vec<GatherRow>, src: u64, dst: usize, len: usize) {
    let mut done = 0;
    while done < len {
        let n = (len - done).min(GATHER_ROW_BYTES);
        rows.push(GatherRow {
            src: src + done as u64,
            dst: (dst + done) as u64,
            len: n as u64,
        });
        done += n;
    }
}

/// The table as the kernel reads it: three u64 per row.
pub(super) fn table_words(rows: &[GatherRow]) -> Vec<u64> {
    rows.iter().flat_map(|r| [r.src, r.dst, r.len]).collect()
}

/// Blocks for a gather of `rows` rows on a device of `sms` multiprocessors: about a quarter
/// of the SMs (4 to 32 blocks; the bus, not the SMs, bounds the speed, and compute keeps the
/// rest), never more than the rows.
pub(super) fn gather_grid(rows: usize, sms: u32) -> u32 {
    let cap = (sms / 4).clamp(4, 32) as usize;
    rows.min(cap) as u32
}

/// The page-aligned range `[start, end)` covering `len` bytes at `addr` (pages of `page`
/// bytes, a power of two), which the driver page-locks; None for an empty range.
pub(super) fn page_span(addr: usize, len: usize, page: usize) -> Option<Range<usize>> {
    if len == 0 || page == 0 || !page.is_power_of_two() {
        return None;
    }
    let end = addr.checked_add(len)?.checked_add(page - 1)? & !(page - 1);
    Some(addr & !(page - 1)..end)
}

/// The page-aligned spans that registering `ranges` (mapping, address, length) locks: each
/// range rounded out to whole pages, then spans of one mapping that overlap or touch
/// merged into one. Sorted by mapping, then address; empty ranges are left out.
pub(super) fn merge_spans(
    ranges: &[(usize, usize, usize)],
    page: usize,
) -> Vec<(usize, Range<usize>)> {
    let mut spans: Vec<(usize, Range<usize>)> = (ranges.iter())
        .filter_map(|&(map, addr, len)| Some((map, page_span(addr, len, page)?)))
        .collect();
    spans.sort_by_key(|(map, s)| (*map, s.start));
    let mut out: Vec<(usize, Range<usize>)> = Vec::with_capacity(spans.len());
    for (map, s) in spans {
        match out.last_mut() {
            Some((m, last)) if *m == map && s.start <= last.end => last.end = last.end.max(s.end),
            _ => out.push((map, s)),
        }
    }
    out
}

/// Table capacity (rows) to allocate for a job of `rows` rows when `have` are allocated:
/// unchanged if enough, else the next power of two (at least 4096, a Griffin complement's
/// order) so growth is rare.
pub(super) fn table_capacity(rows: usize, have: usize) -> usize {
    if rows <= have {
        return have;
    }
    rows.next_power_of_two().max(4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(region: usize, host: usize, len: usize) -> Segment {
        Segment {
            source: Source::Registered {
                region,
                host,
                device: Some(host as u64 + 0x1000_0000),
            },
            len,
        }
    }

    fn staged(host: usize, len: usize) -> Segment {
        Segment {
            source: Source::Staged { host },
            len,
        }
    }

    /// Plans segments that are one piece each.
    fn plan(segments: &[Segment], max: usize) -> JobPlan {
        let lens: Vec<_> = segments.iter().map(|s| s.len).collect();
        plan_job(&lens, segments, max)
    }

    #[test]
    fn pieces_land_packed_in_job_order_whatever_the_path() {
        let segments = [reg(1, 1000, 10), staged(77, 5), staged(0, 0), reg(2, 50, 7)];
        for max in [0, MAX_DMA_COPIES] {
            let plan = plan(&segments, max);
            assert_eq!(plan.landed, vec![0..10, 10..15, 15..15, 15..22]);
            assert_eq!(plan.bytes, 22);
            let want = DirectCopy {
                host: 77,
                dst: 10,
                len: 5,
            };
            assert_eq!(plan.staged, vec![want]);
            assert_eq!(plan.staged_runs, vec![10..15]);
        }
    }

    #[test]
    fn a_piece_cut_into_segments_lands_whole() {
        // One piece of 30 bytes: 10 in one registration, 12 in the next, 8 not registered.
        let segments = [reg(1, 100, 10), reg(2, 110, 12), staged(122, 8)];
        let plan = plan_job(&[30, 4], &[&segments[..], &[staged(500, 4)]].concat(), 8);
        assert_eq!(plan.landed, vec![0..30, 30..34]);
        let direct: Vec<_> = plan.direct.iter().map(|d| (d.host, d.dst, d.len)).collect();
        assert_eq!(direct, vec![(100, 0, 10), (110, 10, 12)]);
        let staged: Vec<_> = plan.staged.iter().map(|d| (d.host, d.dst, d.len)).collect();
        // Contiguous on the device but not on the host: two host copies, one upload.
        assert_eq!(staged, vec![(122, 22, 8), (500, 30, 4)]);
        assert_eq!(plan.staged_runs, vec![22..34]);
    }

    #[test]
    fn few_registered_pieces_are_one_dma_each() {
        let plan = plan(&[reg(1, 1000, 10), reg(1, 5000, 20)], MAX_DMA_COPIES);
        assert_eq!(plan.path(), "dma");
        assert!(plan.gather.is_empty() && plan.staged.is_empty());
        let want = vec![
            DirectCopy {
                host: 1000,
                dst: 0,
                len: 10,
            },
            DirectCopy {
                host: 5000,
                dst: 10,
                len: 20,
            },
        ];
        assert_eq!(plan.direct, want);
    }

    #[test]
    fn contiguous_pieces_of_one_registration_merge() {
        let plan = plan(&[reg(1, 100, 10), reg(1, 110, 6), reg(2, 116, 4)], 8);
        let got: Vec<_> = plan.direct.iter().map(|d| (d.host, d.dst, d.len)).collect();
        // The third follows in memory but is another registration: not merged.
        assert_eq!(got, vec![(100, 0, 16), (116, 16, 4)]);
    }

    #[test]
    fn many_pieces_go_to_the_gather_kernel_with_device_addresses() {
        let pieces: Vec<_> = (0..40).map(|i| reg(1, i * 100, 16)).collect();
        let p = plan(&pieces, MAX_DMA_COPIES);
        assert_eq!(p.path(), "gather kernel");
        assert!(p.direct.is_empty());
        assert_eq!(p.gather.len(), 40);
        assert_eq!(
            p.gather[3],
            GatherRow {
                src: 300 + 0x1000_0000,
                dst: 48,
                len: 16
            }
        );
        // Exactly at the threshold: still DMAs.
        let p = plan(&pieces[..MAX_DMA_COPIES], MAX_DMA_COPIES);
        assert_eq!((p.direct.len(), p.gather.len()), (MAX_DMA_COPIES, 0));
    }

    #[test]
    fn unmapped_registered_pieces_stay_dmas_on_the_kernel_path() {
        let mut pieces: Vec<_> = (0..4).map(|i| reg(1, i * 100, 8)).collect();
        pieces.push(Segment {
            source: Source::Registered {
                region: 9,
                host: 7000,
                device: None,
            },
            len: 3,
        });
        let p = plan(&pieces, 2);
        assert_eq!(p.gather.len(), 4);
        assert_eq!(
            p.direct,
            vec![DirectCopy {
                host: 7000,
                dst: 32,
                len: 3
            }]
        );
        assert_eq!(p.path(), "gather kernel");
    }

    #[test]
    fn adjacent_staged_pieces_are_one_upload() {
        let p = plan(
            &[staged(0, 4), staged(4, 6), reg(1, 0, 2), staged(50, 1)],
            8,
        );
        let staged_: Vec<_> = p.staged.iter().map(|d| (d.host, d.dst, d.len)).collect();
        assert_eq!(staged_, vec![(0, 0, 10), (50, 12, 1)]);
        assert_eq!(p.staged_runs, vec![0..10, 12..13]);
        assert_eq!(p.path(), "mixed");
        assert_eq!(plan(&[staged(0, 4)], 8).path(), "staged");
        assert_eq!(plan(&[staged(0, 0)], 8).path(), "empty");
    }

    #[test]
    fn registered_spans_are_whole_pages_merged_per_mapping() {
        let ranges = [
            (1, 8192 + 100, 50),
            (1, 4096, 10),
            (1, 8192 + 4000, 200), // reaches the next page: merged with the first
            (2, 16384, 1),         // touches mapping 1's last page: another mapping
            (1, 40960, 0),         // empty
            (1, 20480, 4096),
        ];
        let spans = merge_spans(&ranges, 4096);
        // 4096..8192 touches 8192..16384: one span.
        let want = vec![(1, 4096..16384), (1, 20480..24576), (2, 16384..20480)];
        assert_eq!(spans, want);
        let touching = merge_spans(&[(1, 0, 4096), (1, 4096, 1)], 4096);
        assert_eq!(touching, vec![(1, 0..8192)]);
    }

    #[test]
    fn the_table_holds_the_largest_job_without_growing() {
        let rows = table_rows(5000, 3 * GATHER_ROW_BYTES + 7);
        assert!(rows > 5000 + 3);
        assert_eq!(table_capacity(5000 + 3, rows), rows);
    }

    #[test]
    fn long_runs_split_into_even_rows_keeping_alignment() {
        let len = 2 * GATHER_ROW_BYTES + 48;
        let pieces: Vec<_> = [reg(1, 0, len), reg(1, len + 64, 16)].to_vec();
        let plan = plan(&pieces, 1);
        let rows: Vec<_> = plan.gather.iter().map(|r| (r.dst, r.len)).collect();
        let g = GATHER_ROW_BYTES as u64;
        assert_eq!(rows, vec![(0, g), (g, g), (2 * g, 48), (len as u64, 16)]);
        assert_eq!(plan.gather[1].src, 0x1000_0000 + g);
        assert!(plan
            .gather
            .iter()
            .all(|r| r.src % 16 == 0 && r.dst % 16 == 0));
        assert_eq!(
            table_words(&plan.gather[..1]),
            vec![0x1000_0000, 0, GATHER_ROW_BYTES as u64]
        );
    }

    #[test]
    fn the_gather_grid_is_a_few_blocks() {
        assert_eq!(gather_grid(5000, 132), 32);
        assert_eq!(gather_grid(5000, 46), 11);
        assert_eq!(gather_grid(5000, 8), 4);
        assert_eq!(gather_grid(2, 132), 2);
        assert_eq!(gather_grid(0, 132), 0);
    }

    #[test]
    fn registration_ranges_are_whole_pages() {
        assert_eq!(page_span(8192, 100, 4096), Some(8192..12288));
        assert_eq!(page_span(8200, 4096, 4096), Some(8192..16384));
        assert_eq!(page_span(8192, 4096, 4096), Some(8192..12288));
        assert_eq!(page_span(70_000, 1, 65536), Some(65536..131072));
        assert_eq!(page_span(4096, 0, 4096), None);
        assert_eq!(page_span(4096, 10, 3000), None);
        assert_eq!(page_span(usize::MAX - 10, 100, 4096), None);
    }

    #[test]
    fn table_capacity_grows_rarely() {
        assert_eq!(table_capacity(10, 0), 4096);
        assert_eq!(table_capacity(4096, 4096), 4096);
        assert_eq!(table_capacity(5000, 4096), 8192);
        assert_eq!(table_capacity(0, 0), 0);
    }
}
