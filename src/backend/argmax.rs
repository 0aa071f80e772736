//! Greedy token choice: the one argmax rule every backend's `argmax_rows` and the sampler
//! follow, so a greedy token is the same whichever side of the PCIe link picks it; and the
//! one probability rule Sirius's acceptance test follows (`row_verdicts`), for the same
//! reason.

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

/// `softmax(z / t)[token]`, computed stably in f64: NaN logits are left out, a row whose
/// largest value is not finite (nothing above -inf, or +inf) gives 0, as does a token past
/// the row or on a NaN.
pub fn token_probability(z: &[f32], t: f32, token: u32) -> f64 {
    let max = z
        .iter()
        .copied()
        .filter(|v| !v.is_nan())
        .fold(f32::NEG_INFINITY, f32::max) as f64;
    if !max.is_finite() {
        return 0.0;
    }
    let t = t as f64;
    let sum: f64 = z
        .iter()
        .filter(|v| !v.is_nan())
        .map(|&v| ((v as f64 - max) / t).exp())
        .sum();
    match z.get(token as usize) {
        Some(&v) if !v.is_nan() => ((v as f64 - max) / t).exp() / sum,
        _ => 0.0,
    }
}

/// What an acceptance test needs of one row of logits: its greedy token, and the
/// probability of the token that followed it (absent for a row nothing followed).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowVerdict {
    pub argmax: u32,
    pub probability: Option<f64>,
}

/// The verdicts of the first `rows` rows of `cols` logits in `x`: row `i`'s argmax and, for
/// `i < next.len()`, [`token_probability`] of `next[i]` at `temperature`. An error when `x`
/// is short or `next` names more rows than asked for.
pub fn row_verdicts_of(
    x: &[f32],
    rows: usize,
    cols: usize,
    next: &[u32],
    temperature: f32,
) -> Result<Vec<RowVerdict>> {
    if next.len() > rows {
        return Err(Error::InvalidArgument(format!(
            "row_verdicts: {} following tokens for {rows} rows",
            next.len()
        )));
    }
    let ids = argmax_of_rows(x, rows, cols)?;
    Ok(ids
        .into_iter()
        .enumerate()
        .map(|(i, argmax)| RowVerdict {
            argmax,
            probability: next
                .get(i)
                .map(|&t| token_probability(&x[i * cols..(i + 1) * cols], temperature, t)),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_pair_each_rows_argmax_with_the_next_tokens_probability() {
        // Row 0: [0, ln 3] -> p(1) = 0.75; row 1: a NaN and -inf; row 2: no next token.
        let x = [0.0, 3f32.ln(), f32::NAN, f32::NEG_INFINITY, 2.0, 1.0];
        let v = row_verdicts_of(&x, 3, 2, &[1, 0], 1.0).unwrap();
        assert_eq!(v[0].argmax, 1);
        assert!((v[0].probability.unwrap() - 0.75).abs() < 1e-6);
        assert_eq!((v[1].argmax, v[1].probability), (0, Some(0.0)));
        assert_eq!((v[2].argmax, v[2].probability), (0, None));
        // A lower temperature sharpens: p(1) = 3^2 / (1 + 3^2).
        let v = row_verdicts_of(&x, 1, 2, &[1], 0.5).unwrap();
        assert!((v[0].probability.unwrap() - 0.9).abs() < 1e-6);
        assert!(row_verdicts_of(&x, 1, 2, &[1, 1], 1.0).is_err());
        assert!(row_verdicts_of(&x, 4, 2, &[], 1.0).is_err());
    }

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
