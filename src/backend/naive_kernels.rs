//! TEMPORARY scalar stand-ins with the CPU kernel API, used until backend::cpu lands.
use crate::dtype::DType;
use half::{bf16, f16};

pub struct ThreadPool(usize);
impl ThreadPool {
    pub fn new(n: usize) -> Self { ThreadPool(n) }
    pub fn n_threads(&self) -> usize { self.0 }
    pub fn run(&self, n: usize, f: &(dyn Fn(usize) + Sync)) { for i in 0..n { f(i) } }
}
pub fn isa_name() -> &'static str { "naive" }
fn get(w: &[u8], dtype: DType, i: usize) -> f32 {
    match dtype {
        DType::F32 => f32::from_le_bytes([w[4*i], w[4*i+1], w[4*i+2], w[4*i+3]]),
        DType::F16 => f16::from_le_bytes([w[2*i], w[2*i+1]]).to_f32(),
        DType::BF16 => bf16::from_le_bytes([w[2*i], w[2*i+1]]).to_f32(),
    }
}
#[allow(clippy::too_many_arguments)]
pub fn matmul(_p: &ThreadPool, w: &[u8], dtype: DType, rows: usize, cols: usize, x: &[f32], n: usize, y: &mut [f32]) {
    for t in 0..n { for r in 0..rows { let mut s = 0.0; for c in 0..cols { s += get(w, dtype, r*cols+c) * x[t*cols+c]; } y[t*rows+r] = s; } }
}
pub fn row_to_f32(w: &[u8], dtype: DType, cols: usize, row: usize, out: &mut [f32]) { for c in 0..cols { out[c] = get(w, dtype, row*cols+c); } }
pub fn to_f32_vec(w: &[u8], dtype: DType) -> Vec<f32> { (0..w.len()/dtype.size()).map(|i| get(w, dtype, i)).collect() }
pub fn rmsnorm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let d = weight.len();
    for (xr, orow) in x.chunks(d).zip(out.chunks_mut(d)) { let ms = xr.iter().map(|v| v*v).sum::<f32>() / d as f32; let s = 1.0 / (ms + eps).sqrt(); for i in 0..d { orow[i] = xr[i] * s * weight[i]; } }
}
pub fn silu_mul(g: &mut [f32], u: &[f32]) { for i in 0..g.len() { g[i] = g[i] / (1.0 + (-g[i]).exp()) * u[i]; } }
pub fn add_inplace(x: &mut [f32], y: &[f32]) { for i in 0..x.len() { x[i] += y[i]; } }
#[allow(clippy::too_many_arguments)]
pub fn attention(_p: &ThreadPool, q: &[f32], k: &[f32], v: &[f32], nh: usize, nkv: usize, hd: usize, start: usize, n: usize, out: &mut [f32]) {
    let kvw = nkv * hd; let group = nh / nkv; let scale = 1.0 / (hd as f32).sqrt();
    for t in 0..n { for h in 0..nh { let kh = h / group; let len = start + t + 1;
        let qv = &q[t*nh*hd + h*hd..][..hd];
        let mut s: Vec<f32> = (0..len).map(|p| (0..hd).map(|i| qv[i]*k[p*kvw+kh*hd+i]).sum::<f32>() * scale).collect();
        let m = s.iter().cloned().fold(f32::NEG_INFINITY, f32::max); let mut z = 0.0; for x in &mut s { *x = (*x - m).exp(); z += *x; }
        let o = &mut out[t*nh*hd + h*hd..][..hd]; o.fill(0.0);
        for p in 0..len { for i in 0..hd { o[i] += s[p] / z * v[p*kvw+kh*hd+i]; } } } }
}
