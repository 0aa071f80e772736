//! Greedy token choice: the one argmax rule every backend's `argmax_rows` and the sampler
//! follow, so a greedy token is the same whichever side of the PCIe link picks it.

use crate::error::{Error, Result};

/// Index of the largest logit (first one on ties); NaN never wins, and a row with nothing
/// above -inf (or no values) gives 0.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_value = f32::NEG_INFINITY;
    for (i, &l) in logits.iter().enumerate() {
        if l > best_value {
            best = i;
            best_value = l;
        }
    }
    best as u32
}

/// [`argmax`] of each of the first `rows` rows of `cols` values in `x` (`[rows, cols]`
/// row-major); an error when `x` holds fewer than `rows * cols`.
pub fn argmax_of_rows(x: &[f32], rows: usize, cols: usize) -> Result<Vec<u32>> {
    let len = rows.checked_mul(cols).filter(|&len| len <= x.len());
    let Some(len) = len else {
        return Err(Error::InvalidArgument(format!(
            "argmax_rows: {rows} rows of {cols} values need more than the {} given",
            x.len()
        )));
    };
    if cols == 0 {
        // Empty rows: nothing beats -inf (and chunks_exact refuses a size of 0).
        return Ok(vec![0; rows]);
    }
    Ok(x[..len].chunks_exact(cols).map(argmax).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_maximum_wins_and_nan_never_does() {
        assert_eq!(argmax(&[0.1, 3.0, -1.0, 3.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 1.0, 2.0]), 2);
        assert_eq!(argmax(&[f32::NAN, f32::NAN]), 0);
        assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NEG_INFINITY]), 0);
        assert_eq!(argmax(&[f32::NEG_INFINITY, -1e30]), 1);
        assert_eq!(argmax(&[1.0, f32::INFINITY, f32::INFINITY]), 1);
        assert_eq!(argmax(&[-0.0, 0.0]), 0);
        assert_eq!(argmax(&[]), 0);
    }

    #[test]
    fn rows_are_taken_one_by_one_and_short_buffers_refused() {
        let x = [1.0, 5.0, 5.0, f32::NAN, 0.0, -2.0, 9.0, 9.0, 9.0];
        assert_eq!(argmax_of_rows(&x, 3, 3).unwrap(), vec![1, 1, 0]);
        // Rows past `rows` are not read.
        assert_eq!(argmax_of_rows(&x, 1, 3).unwrap(), vec![1]);
        assert_eq!(argmax_of_rows(&x, 2, 0).unwrap(), vec![0, 0]);
        assert!(argmax_of_rows(&x, 4, 3).is_err());
        assert!(argmax_of_rows(&x, usize::MAX, 2).is_err());
    }
}
