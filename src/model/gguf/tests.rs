use super::*;

/// Writes GGUF files for the tests (version 3, little-endian).
#[derive(Default)]
pub(super) struct Writer {
    kv: Vec<u8>,
    n_kv: u64,
    infos: Vec<u8>,
    n_tensors: u64,
    data: Vec<u8>,
}

pub(super) fn string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

impl Writer {
    pub(super) fn kv(&mut self, key: &str, kind: u32, value: &[u8]) -> &mut Self {
        string(&mut self.kv, key);
        self.kv.extend(kind.to_le_bytes());
        self.kv.extend(value);
        self.n_kv += 1;
        self
    }

    /// A tensor of `dims` and ggml type id `kind` whose data is `data` (padded to 32).
    pub(super) fn tensor(&mut self, name: &str, dims: &[u64], kind: u32, data: &[u8]) -> &mut Self {
        string(&mut self.infos, name);
        self.infos.extend((dims.len() as u32).to_le_bytes());
        dims.iter().for_each(|d| self.infos.extend(d.to_le_bytes()));
        self.infos.extend(kind.to_le_bytes());
        self.infos.extend((self.data.len() as u64).to_le_bytes());
        self.data.extend(data);
        self.data.resize(self.data.len().next_multiple_of(32), 0);
        self.n_tensors += 1;
        self
    }

    pub(super) fn bytes(&self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend(self.n_tensors.to_le_bytes());
        out.extend(self.n_kv.to_le_bytes());
        out.extend(&self.kv);
        out.extend(&self.infos);
        out.resize(out.len().next_multiple_of(32), 0);
        out.extend(&self.data);
        out
    }
}

pub(super) fn sample() -> Vec<u8> {
    let mut strings = 8u32.to_le_bytes().to_vec();
    strings.extend(2u64.to_le_bytes());
    string(&mut strings, "<s>");
    string(&mut strings, "</s>");
    let mut arch = Vec::new();
    string(&mut arch, "llama");
    let f32_data: Vec<u8> = (0..8).flat_map(|i| (i as f32).to_le_bytes()).collect();
    let q4_data: Vec<u8> = (0..2 * 18).map(|i| i as u8).collect();
    Writer::default()
        .kv("general.architecture", 8, &arch)
        .kv("llama.context_length", 4, &2048u32.to_le_bytes())
        .kv("tokenizer.ggml.tokens", 9, &strings)
        .tensor("output_norm.weight", &[4, 2], 0, &f32_data)
        .tensor("blk.0.ffn_up.weight", &[64, 1], 2, &q4_data)
        .bytes()
}

fn parse(bytes: &[u8]) -> Result<GgufFile> {
    GgufFile::parse(Path::new("test.gguf"), bytes)
}

#[test]
fn a_written_file_reads_back() {
    let bytes = sample();
    let f = parse(&bytes).unwrap();
    assert_eq!(f.version, 3);
    assert_eq!(f.string("general.architecture"), Some("llama"));
    assert_eq!(f.uint("llama.context_length"), Some(2048));
    let tokens = Value::Array(vec![
        Value::String("<s>".into()),
        Value::String("</s>".into()),
    ]);
    assert_eq!(f.metadata.get("tokenizer.ggml.tokens"), Some(&tokens));
    assert_eq!(f.tensors.len(), 2);
    let (norm, up) = (&f.tensors[0], &f.tensors[1]);
    assert_eq!((norm.kind, norm.elements(), norm.len), (DType::F32, 8, 32));
    assert_eq!((up.kind, up.elements(), up.len), (DType::Q4_0, 64, 36));
    assert_eq!(norm.start % 32, 0);
    let data = norm.bytes(&bytes).unwrap();
    assert_eq!(&data[4..8], &1f32.to_le_bytes());
    let q4 = up.bytes(&bytes).unwrap();
    assert_eq!(q4, &(0..36).map(|i| i as u8).collect::<Vec<_>>()[..]);
}

#[test]
fn bad_headers_are_errors_that_say_why() {
    let mut bytes = sample();
    bytes[0] = b'X';
    assert!(parse(&bytes).unwrap_err().to_string().contains("magic"));
    let mut bytes = sample();
    bytes[4] = 1;
    assert!(parse(&bytes).unwrap_err().to_string().contains("version 1"));
    // A tensor count no file of this size can hold.
    let mut bytes = sample();
    bytes[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(parse(&bytes)
        .unwrap_err()
        .to_string()
        .contains("cannot fit"));
}

#[test]
fn tensors_must_be_whole_blocks_aligned_and_inside_the_file() {
    let q4 = vec![0u8; 18];
    let w = |dims: &[u64], kind: u32| Writer::default().tensor("t", dims, kind, &q4).bytes();
    let err = parse(&w(&[33, 1], 2)).unwrap_err().to_string();
    assert!(err.contains("whole"), "{err}");
    let err = parse(&w(&[64, 1], 2)).unwrap_err().to_string();
    assert!(err.contains("past the end"), "{err}");
    assert!(parse(&w(&[32, 1], 2)).is_ok());
    let err = parse(&w(&[1 << 40, 1 << 40, 1 << 40], 0))
        .unwrap_err()
        .to_string();
    assert!(err.contains("overflow"), "{err}");
    let err = parse(&w(&[32, 1], 99)).unwrap_err().to_string();
    assert!(err.contains("ggml type 99"), "{err}");
    let odd_alignment = Writer::default()
        .kv("general.alignment", 4, &3u32.to_le_bytes())
        .bytes();
    let err = parse(&odd_alignment).unwrap_err().to_string();
    assert!(err.contains("power of two"), "{err}");
    // A tensor 16 bytes into the data section, where 64 is the alignment.
    let mut misaligned = Writer::default();
    misaligned
        .kv("general.alignment", 4, &64u32.to_le_bytes())
        .tensor("a", &[32, 1], 2, &q4)
        .tensor("b", &[32, 1], 2, &q4);
    let err = parse(&misaligned.bytes()).unwrap_err().to_string();
    assert!(err.contains("not aligned"), "{err}");
}

/// Every truncation of a valid file is an error, and random byte flips never panic.
#[test]
fn truncations_and_flipped_bytes_never_panic() {
    let bytes = sample();
    for len in 0..bytes.len() {
        // Cutting only trailing data padding can still leave a valid file.
        let cut = &bytes[..len];
        if len < bytes.len() - 28 {
            assert!(parse(cut).is_err(), "truncated to {len} bytes");
        }
    }
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..20_000 {
        let mut b = bytes.clone();
        for _ in 0..1 + next() % 4 {
            let at = (next() % b.len() as u64) as usize;
            b[at] = next() as u8;
        }
        let _ = parse(&b);
    }
}
