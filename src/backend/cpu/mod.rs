//! CPU backend kernels (being written).
