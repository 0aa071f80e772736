//! Argument types of the neuron-level (contextual sparsity) backend ops.

/// What a neuron bundle holds, in order. Griffin (and offloading) move whole neurons:
/// gate row, up row, down column. CATS computes the gate densely from the checkpoint matrix
/// and skips only up and down, so its bundles hold just those two: a kept neuron is then one
/// contiguous read with no gate bytes between neighbours (measured ~13% more useful bytes/s
/// on scattered neurons, ~40% on runs, than reading around the gate parts), and the layout
/// costs 2/3 of the memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BundleLayout {
    /// `[gate row | up row | down column]`, 3h elements.
    GateUpDown,
    /// `[up row | down column]`, 2h elements.
    UpDown,
}

impl BundleLayout {
    /// Rows of `hidden` elements per bundle.
    pub fn parts(self) -> usize {
        match self {
            BundleLayout::GateUpDown => 3,
            BundleLayout::UpDown => 2,
        }
    }

    /// Element offset of the up row within a bundle of `hidden`-wide rows.
    pub fn up_offset(self, hidden: usize) -> usize {
        (self.parts() - 2) * hidden
    }
}

/// Which FFN neurons a CATS step keeps, by |SiLU(gate)|.
#[derive(Debug, Clone, Copy)]
pub enum NeuronRule {
    /// The `k` largest per token (ties: lower index first).
    TopK(usize),
    /// Those at or above the threshold (the caller passes its layer's).
    Threshold(f32),
}

/// Kept neurons per token: token t's ascending neuron ids are
/// `ids[offsets[t]..offsets[t + 1]]`. Host memory, reused across calls.
#[derive(Debug, Clone, Default)]
pub struct NeuronLists {
    pub ids: Vec<u32>,
    pub offsets: Vec<usize>,
}

impl NeuronLists {
    /// Empties the lists (keeping their memory) for `n_tokens` new ones.
    pub fn clear(&mut self) {
        self.ids.clear();
        self.offsets.clear();
        self.offsets.push(0);
    }

    /// Appends one token's list.
    pub fn push_token(&mut self, ids: impl IntoIterator<Item = u32>) {
        if self.offsets.is_empty() {
            self.offsets.push(0);
        }
        self.ids.extend(ids);
        self.offsets.push(self.ids.len());
    }

    pub fn n_tokens(&self) -> usize {
        self.offsets.len().saturating_sub(1)
    }

    /// Token t's kept neurons.
    pub fn token(&self, t: usize) -> &[u32] {
        &self.ids[self.offsets[t]..self.offsets[t + 1]]
    }

    /// Kept neurons over all tokens (for density statistics).
    pub fn total(&self) -> usize {
        self.ids.len()
    }
}

/// How [`super::Backend::bundle_ffn`] computes each neuron's activation.
pub enum BundleSelection<'a, Buf> {
    /// Every bundle of a gate|up|down matrix (the dense FFN in bundle form; Griffin now
    /// gathers its neurons into checkpoint-layout matrices instead, this stays for running a
    /// resident bundle subset directly, as offloading will):
    /// `act = silu(gate_i . x + gate_bias_i) * (up_i . x + up_bias_i)`. Bias vectors are
    /// indexed like the bundle rows.
    All {
        gate_bias: Option<&'a Buf>,
        up_bias: Option<&'a Buf>,
    },
    /// CATS: token t uses only `kept.token(t)`, with `act = coeff[t, i] * (up_i . x + up_bias_i)`,
    /// `coeff` being SiLU(gate) from a dense gate pass (`[n, neurons]`).
    PerToken {
        coeff: &'a Buf,
        kept: &'a NeuronLists,
        up_bias: Option<&'a Buf>,
    },
}

/// Checks a Griffin gather out of a gate|up|down bundle matrix of `rows x cols` (every id a
/// row, 3 parts per row) and returns the hidden size.
pub fn gather_hidden(rows: usize, cols: usize, ids: &[u32]) -> crate::error::Result<usize> {
    use crate::error::Error;
    if !cols.is_multiple_of(3) {
        return Err(Error::InvalidArgument(format!(
            "bundle matrix has {cols} columns, not 3 x hidden"
        )));
    }
    if let Some(&bad) = ids.iter().find(|&&r| r as usize >= rows) {
        return Err(Error::InvalidArgument(format!(
            "neuron {bad} gathered from {rows} bundles"
        )));
    }
    Ok(cols / 3)
}
