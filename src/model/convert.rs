//! Writing matrices in another format at load: a GGUF's blocks de-quantized (or re-quantized),
//! a float checkpoint quantized (`--weights q8_0|q4_0`), llama.cpp's Q/K row interleave
//! undone. Every converted tensor lands in one fresh anonymous mapping, written on all cores
//! with a progress bar, then made read-only: the weight store serves it like a file.

use crate::error::{Error, Result};
use crate::progress::progress_bar;
use crate::tensor::quant::dequantize;
use crate::tensor::quantize::quantize;
use crate::tensor::DType;

/// One tensor to write: where it comes from and how it lands.
pub(crate) struct ConvertJob<'a> {
    /// Named in errors.
    pub name: &'a str,
    pub bytes: &'a [u8],
    pub from: DType,
    pub to: DType,
    pub rows: usize,
    pub cols: usize,
    /// Heads whose Q/K rows are interleaved (llama GGUF files), or 0.
    pub unpermute_heads: usize,
}

impl ConvertJob<'_> {
    /// Bytes the converted tensor takes.
    pub(crate) fn out_len(&self) -> usize {
        self.to.bytes_for(self.rows * self.cols)
    }
}

/// Where each job's bytes go in [`convert_all`]'s mapping, and its total length: every
/// tensor starts 64-byte aligned.
fn layout(jobs: &[ConvertJob<'_>]) -> (Vec<std::ops::Range<usize>>, usize) {
    let mut offset = 0;
    let ranges = jobs
        .iter()
        .map(|j| {
            let r = offset..offset + j.out_len();
            offset = (offset + j.out_len()).next_multiple_of(64);
            r
        })
        .collect();
    (ranges, offset)
}

/// The converted tensors of [`convert_all`]: one read-only mapping, and each job's byte
/// range in it (in job order).
pub(crate) type Converted = (memmap2::Mmap, Vec<std::ops::Range<usize>>);

/// Writes every job into one fresh read-only mapping.
pub(crate) fn convert_all(jobs: &[ConvertJob<'_>], what: &str) -> Result<Converted> {
    let (ranges, total) = layout(jobs);
    let io = |e: std::io::Error| Error::io(format!("anonymous memory for the {what} weights"), e);
    let mut map = memmap2::MmapOptions::new()
        .len(total.max(1))
        .map_anon()
        .map_err(io)?;
    let elements: u64 = jobs.iter().map(|j| (j.rows * j.cols) as u64).sum();
    let bar = progress_bar(elements, what);
    let mut slices = Vec::with_capacity(jobs.len());
    let mut rest: &mut [u8] = &mut map[..];
    let mut at = 0;
    for (job, range) in jobs.iter().zip(&ranges) {
        let (_, tail) = rest.split_at_mut(range.start - at);
        let (mine, tail) = tail.split_at_mut(range.len());
        slices.push((job, mine));
        rest = tail;
        at = range.end;
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    // Largest first, dealt round-robin: the embedding table does not end up last on one core.
    slices.sort_by_key(|(job, _)| std::cmp::Reverse(job.rows * job.cols));
    let mut lanes: Vec<Vec<(&ConvertJob<'_>, &mut [u8])>> =
        (0..threads).map(|_| Vec::new()).collect();
    for (i, slice) in slices.into_iter().enumerate() {
        lanes[i % threads].push(slice);
    }
    let failed = std::thread::scope(|s| {
        let handles: Vec<_> = lanes
            .into_iter()
            .map(|lane| {
                let bar = &bar;
                s.spawn(move || {
                    lane.into_iter()
                        .map(|(job, out)| {
                            let ok = convert(job, out);
                            bar.inc((job.rows * job.cols) as u64);
                            (!ok).then(|| job.name.to_string())
                        })
                        .find_map(|bad| bad)
                })
            })
            .collect();
        handles.into_iter().find_map(|h| {
            h.join()
                .unwrap_or_else(|_| Some("(a worker panicked)".into()))
        })
    });
    bar.finish_and_clear();
    if let Some(name) = failed {
        return Err(Error::InvalidArgument(format!(
            "tensor `{name}`: its bytes are not whole blocks of its type"
        )));
    }
    Ok((map.make_read_only().map_err(io)?, ranges))
}

/// Converts one tensor row by row into `out` (HF row order); `false` if a row's bytes are
/// not whole blocks of its type, or its length is not whole blocks of the target.
fn convert(job: &ConvertJob<'_>, out: &mut [u8]) -> bool {
    if !job.to.fits_row(job.cols) {
        return false;
    }
    let src_row_bytes = job.bytes.len() / job.rows.max(1);
    let out_row_bytes = job.to.bytes_for(job.cols);
    let mut row = vec![0f32; job.cols];
    for (r, dst) in out.chunks_exact_mut(out_row_bytes).enumerate() {
        let from = source_row(r, job.rows, job.unpermute_heads);
        let src = &job.bytes[from * src_row_bytes..(from + 1) * src_row_bytes];
        if job.to == job.from {
            // A row moves whole, blocks and all.
            dst.copy_from_slice(src);
        } else if !dequantize(job.from, src, &mut row) || !quantize(job.to, &row, dst) {
            return false;
        }
    }
    true
}

/// The GGUF row holding HF row `r`: within a head of `2 * half` rows, llama.cpp stored HF
/// row `j * half + i` at row `2 * i + j`.
pub(crate) fn source_row(r: usize, rows: usize, heads: usize) -> usize {
    if heads == 0 {
        return r;
    }
    let half = rows / heads / 2;
    let (head, within) = (r / (2 * half), r % (2 * half));
    let (j, i) = (within / half, within % half);
    head * 2 * half + 2 * i + j
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_rows_undo_the_interleave_per_head() {
        // 2 heads of 4 rows: GGUF order per head [a0, b0, a1, b1] with a = HF 0..2, b = 2..4.
        let rows: Vec<usize> = (0..8).map(|r| source_row(r, 8, 2)).collect();
        assert_eq!(rows, vec![0, 2, 1, 3, 4, 6, 5, 7]);
        assert_eq!(source_row(5, 8, 0), 5);
    }

    /// bf16 rows to Q8_0 and back stay within Q8_0's step; a target whose blocks the rows
    /// cannot hold is an error naming the tensor.
    #[test]
    fn converts_float_rows_to_blocks_and_names_what_cannot() {
        let values: Vec<f32> = (0..128).map(|i| (i as f32 - 60.0) / 7.0).collect();
        let bytes: Vec<u8> = values
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect();
        let job = |to, cols| ConvertJob {
            name: "w",
            bytes: &bytes,
            from: DType::BF16,
            to,
            rows: 128 / cols,
            cols,
            unpermute_heads: 0,
        };
        let (map, _) = convert_all(&[job(DType::Q8_0, 64)], "test").unwrap();
        let mut back = vec![0f32; 128];
        assert!(dequantize(
            DType::Q8_0,
            &map[..DType::Q8_0.bytes_for(128)],
            &mut back
        ));
        for (a, b) in values.iter().zip(&back) {
            let bf = half::bf16::from_f32(*a).to_f32();
            assert!((bf - b).abs() <= 60.0 / 7.0 / 127.0 * 0.6, "{bf} -> {b}");
        }
        let err = convert_all(&[job(DType::Q8_0, 16)], "test")
            .unwrap_err()
            .to_string();
        assert!(err.contains("`w`"), "{err}");
    }
}
