//! Tensors as the layers below the model see them: element types ([`DType`]), views of
//! checkpoint tensors in their mapping ([`TensorRef`]) and the attention layout of a token
//! tree ([`TreeMask`]), and ggml's quantized block formats (`quant`). Nothing here knows a model, a backend or a request.

mod dtype;
pub mod quant;
pub mod quantize;
mod tensor_ref;
mod tree_mask;

pub use dtype::{DType, KvDType};
pub use tensor_ref::TensorRef;
pub use tree_mask::TreeMask;
