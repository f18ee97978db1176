//! ggml tensor types and their dequantisers: F32, F16, BF16, the 32-element legacy quants
//! (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) and the 256-element K-quants (Q2_K … Q6_K) of `Q4_K_M`-style
//! files. Each follows the `gguf` Python package's `gguf/quants.py` dequantiser (itself
//! ggml-quants.c's `dequantize_row_*`) in its f32 operation order, so the results agree bit for
//! bit (fixtures/gguf-kquants).

/// A ggml tensor type this reader dequantises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum GgmlType {
    F32,
    F16,
    Bf16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
}

/// Elements of a K-quant super-block.
const QK_K: usize = 256;

/// The names of every supported type, for errors.
pub(super) const SUPPORTED: &str = "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, \
                                    Q4_K, Q5_K, Q6_K";

impl GgmlType {
    /// The type of ggml id `id` (`enum ggml_type`), or `None` if it is not supported.
    pub(super) fn from_id(id: u32) -> Option<GgmlType> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            6 => GgmlType::Q5_0,
            7 => GgmlType::Q5_1,
            8 => GgmlType::Q8_0,
            10 => GgmlType::Q2K,
            11 => GgmlType::Q3K,
            12 => GgmlType::Q4K,
            13 => GgmlType::Q5K,
            14 => GgmlType::Q6K,
            30 => GgmlType::Bf16,
            _ => return None,
        })
    }

    /// The name llama.cpp gives the type.
    pub(super) fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::Bf16 => "BF16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q5_1 => "Q5_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q2K => "Q2_K",
            GgmlType::Q3K => "Q3_K",
            GgmlType::Q4K => "Q4_K",
            GgmlType::Q5K => "Q5_K",
            GgmlType::Q6K => "Q6_K",
        }
    }

    /// (bytes per block, elements per block).
    pub(super) fn block_layout(self) -> (usize, usize) {
        match self {
            GgmlType::F32 => (4, 1),
            GgmlType::F16 | GgmlType::Bf16 => (2, 1),
            GgmlType::Q4_0 => (18, 32),
            GgmlType::Q4_1 => (20, 32),
            GgmlType::Q5_0 => (22, 32),
            GgmlType::Q5_1 => (24, 32),
            GgmlType::Q8_0 => (34, 32),
            GgmlType::Q2K => (84, QK_K),
            GgmlType::Q3K => (110, QK_K),
            GgmlType::Q4K => (144, QK_K),
            GgmlType::Q5K => (176, QK_K),
            GgmlType::Q6K => (210, QK_K),
        }
    }

    /// Dequantises `raw`, a whole number of blocks, to f32 (`out` grows by the blocks'
    /// elements).
    pub(super) fn dequantise(self, raw: &[u8], out: &mut Vec<f32>) {
        let (block_bytes, block_elems) = self.block_layout();
        out.reserve(raw.len() / block_bytes * block_elems);
        for block in raw.chunks_exact(block_bytes) {
            match self {
                GgmlType::F32 => out.push(f32::from_le_bytes(
                    block.try_into().expect("a 4-byte block"),
                )),
                GgmlType::F16 => out.push(f16_at(block, 0)),
                GgmlType::Bf16 => {
                    out.push(half::bf16::from_le_bytes([block[0], block[1]]).to_f32())
                }
                GgmlType::Q4_0 => q4_0(block, out),
                GgmlType::Q4_1 => q4_1(block, out),
                GgmlType::Q5_0 => q5_0(block, out),
                GgmlType::Q5_1 => q5_1(block, out),
                GgmlType::Q8_0 => q8_0(block, out),
                GgmlType::Q2K => q2_k(block, out),
                GgmlType::Q3K => q3_k(block, out),
                GgmlType::Q4K => q4_k(block, out),
                GgmlType::Q5K => q5_k(block, out),
                GgmlType::Q6K => q6_k(block, out),
            }
        }
    }
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    half::f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Q8_0: f16 scale d, 32 × i8; x = d·q.
fn q8_0(block: &[u8], out: &mut Vec<f32>) {
    let d = f16_at(block, 0);
    out.extend(block[2..].iter().map(|&q| d * (q as i8) as f32));
}

/// Q4_0: f16 scale d, 16 bytes of nibbles; x = d·(q − 8); low nibbles are elements 0..16, high
/// nibbles 16..32.
fn q4_0(block: &[u8], out: &mut Vec<f32>) {
    let d = f16_at(block, 0);
    let qs = &block[2..];
    out.extend(qs.iter().map(|&q| d * ((q & 0x0f) as f32 - 8.0)));
    out.extend(qs.iter().map(|&q| d * ((q >> 4) as f32 - 8.0)));
}

/// Q4_1: f16 scale d, f16 minimum m, 16 bytes of nibbles; x = d·q + m.
fn q4_1(block: &[u8], out: &mut Vec<f32>) {
    let (d, m) = (f16_at(block, 0), f16_at(block, 2));
    let qs = &block[4..];
    out.extend(qs.iter().map(|&q| d * (q & 0x0f) as f32 + m));
    out.extend(qs.iter().map(|&q| d * (q >> 4) as f32 + m));
}

/// The 5-bit values of a Q5_0/Q5_1 block: nibbles as Q4 (low: elements 0..16, high: 16..32),
/// bit e of the little-endian u32 `qh` the fifth bit of element e.
fn five_bit<'a>(qh: &[u8], qs: &'a [u8]) -> impl Iterator<Item = u8> + 'a {
    let high = u32::from_le_bytes(qh.try_into().expect("4 bytes of high bits"));
    (0..32).map(move |e| {
        let nibble = (qs[e % 16] >> (4 * (e / 16))) & 0x0f;
        nibble | ((((high >> e) & 1) as u8) << 4)
    })
}

/// Q5_0: f16 scale d, 32 high bits, 16 bytes of nibbles; x = d·(q − 16).
fn q5_0(block: &[u8], out: &mut Vec<f32>) {
    let d = f16_at(block, 0);
    out.extend(five_bit(&block[2..6], &block[6..]).map(|q| d * (q as i8 - 16) as f32));
}

/// Q5_1: f16 scale d, f16 minimum m, 32 high bits, 16 bytes of nibbles; x = d·q + m.
fn q5_1(block: &[u8], out: &mut Vec<f32>) {
    let (d, m) = (f16_at(block, 0), f16_at(block, 2));
    out.extend(five_bit(&block[4..8], &block[8..]).map(|q| d * q as f32 + m));
}

/// Q2_K: 16 scale bytes (low nibble: scale, high: minimum, per 16 elements), 64 bytes of 2-bit
/// values, f16 d, f16 dmin; x = (d·sc)·q − dmin·m. Element e = 128·h + 32·j + l is bits 2j..2j+2
/// of byte 32·h + l.
fn q2_k(block: &[u8], out: &mut Vec<f32>) {
    let (scales, qs) = (&block[..16], &block[16..80]);
    let (d, dmin) = (f16_at(block, 80), f16_at(block, 82));
    for e in 0..QK_K {
        let (h, j, l) = (e / 128, (e % 128) / 32, e % 32);
        let q = (qs[32 * h + l] >> (2 * j)) & 3;
        let sc = scales[e / 16];
        let dl = d * (sc & 0x0f) as f32;
        let ml = dmin * (sc >> 4) as f32;
        out.push(dl * q as f32 - ml);
    }
}

/// Q3_K: 32 bytes of high bits, 64 bytes of low 2-bit values, 12 bytes of 16 packed 6-bit
/// scales (offset 32), f16 d; x = (d·sc)·(q_low − 4·!q_high). Element e = 128·h + 32·j + l:
/// low bits 2j..2j+2 of byte 32·h + l, high bit 4h + j of byte l.
fn q3_k(block: &[u8], out: &mut Vec<f32>) {
    let (hmask, qs, packed) = (&block[..32], &block[32..96], &block[96..108]);
    let d = f16_at(block, 108);
    let scale = |k: usize| {
        let low = (packed[k % 8] >> (4 * (k / 8))) & 0x0f;
        let high = (packed[8 + k % 4] >> (2 * (k / 4))) & 0x03;
        ((low | (high << 4)) as i8 - 32) as f32
    };
    for e in 0..QK_K {
        let (h, j, l) = (e / 128, (e % 128) / 32, e % 32);
        let low = ((qs[32 * h + l] >> (2 * j)) & 3) as i8;
        let high = ((hmask[l] >> (4 * h + j)) & 1) ^ 1;
        let q = low - (high << 2) as i8;
        out.push((d * scale(e / 16)) * q as f32);
    }
}

/// The eight 6-bit (scale, minimum) pairs of a Q4_K/Q5_K block, packed in 12 bytes.
fn k_scale_min(packed: &[u8], s: usize) -> (u8, u8) {
    if s < 4 {
        (packed[s] & 0x3f, packed[4 + s] & 0x3f)
    } else {
        let (m_d, d, m) = (packed[8 + s - 4], packed[s - 4], packed[s]);
        (
            (m_d & 0x0f) | ((d >> 2) & 0x30),
            (m_d >> 4) | ((m >> 2) & 0x30),
        )
    }
}

/// Q4_K: f16 d, f16 dmin, 12 bytes of scales/minima, 128 bytes of nibbles; sub-block s (32
/// elements) = nibble s % 2 of bytes 32·(s / 2) .. +32; x = (d·sc)·q − dmin·m.
fn q4_k(block: &[u8], out: &mut Vec<f32>) {
    let (d, dmin) = (f16_at(block, 0), f16_at(block, 2));
    let (packed, qs) = (&block[4..16], &block[16..144]);
    for s in 0..8 {
        let (sc, m) = k_scale_min(packed, s);
        let (scale, min) = (d * sc as f32, dmin * m as f32);
        let bytes = &qs[32 * (s / 2)..32 * (s / 2) + 32];
        out.extend(
            bytes
                .iter()
                .map(|&q| scale * ((q >> (4 * (s % 2))) & 0x0f) as f32 - min),
        );
    }
}

/// Q5_K: Q4_K plus 32 bytes of fifth bits (bit s of byte l for element l of sub-block s).
fn q5_k(block: &[u8], out: &mut Vec<f32>) {
    let (d, dmin) = (f16_at(block, 0), f16_at(block, 2));
    let (packed, qh, qs) = (&block[4..16], &block[16..48], &block[48..176]);
    for s in 0..8 {
        let (sc, m) = k_scale_min(packed, s);
        let (scale, min) = (d * sc as f32, dmin * m as f32);
        for l in 0..32 {
            let low = (qs[32 * (s / 2) + l] >> (4 * (s % 2))) & 0x0f;
            let q = low | (((qh[l] >> s) & 1) << 4);
            out.push(scale * q as f32 - min);
        }
    }
}

/// Q6_K: 128 bytes of low nibbles, 64 bytes of high 2-bit pairs, 16 i8 scales, f16 d;
/// x = (d·sc)·(q − 32). Element e = 128·h + r: low nibble r / 64 of byte 64·h + r % 64, high
/// bits 2·(r / 32).. of byte 32·h + r % 32.
fn q6_k(block: &[u8], out: &mut Vec<f32>) {
    let (ql, qh, scales) = (&block[..128], &block[128..192], &block[192..208]);
    let d = f16_at(block, 208);
    for e in 0..QK_K {
        let (h, r) = (e / 128, e % 128);
        let low = (ql[64 * h + r % 64] >> (4 * (r / 64))) & 0x0f;
        let high = (qh[32 * h + r % 32] >> (2 * (r / 32))) & 0x03;
        let q = (low | (high << 4)) as i8 - 32;
        out.push((d * scales[e / 16] as i8 as f32) * q as f32);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f16_bytes(x: f32) -> [u8; 2] {
        half::f16::from_f32(x).to_le_bytes()
    }

    fn dequantise(t: GgmlType, raw: &[u8]) -> Vec<f32> {
        let mut out = Vec::new();
        t.dequantise(raw, &mut out);
        out
    }

    #[test]
    fn q4_1_and_q8_0_blocks_dequantise_by_the_reference_formulas() {
        // Q4_1: d = 0.5, m = -1; nibble j (low) = j % 16, high = 15 - j % 16.
        let mut block = Vec::new();
        block.extend(f16_bytes(0.5));
        block.extend(f16_bytes(-1.0));
        block.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let x = dequantise(GgmlType::Q4_1, &block);
        for j in 0..16 {
            assert_eq!(x[j], 0.5 * j as f32 - 1.0);
            assert_eq!(x[16 + j], 0.5 * (15 - j) as f32 - 1.0);
        }
        let mut block = Vec::new();
        block.extend(f16_bytes(0.25));
        block.extend((0..32).map(|j| (j as i8 - 16) as u8));
        let x = dequantise(GgmlType::Q8_0, &block);
        for (j, v) in x.iter().enumerate() {
            assert_eq!(*v, 0.25 * (j as f32 - 16.0));
        }
    }

    #[test]
    fn dequantises_like_the_gguf_package() {
        // fixtures/gguf-kquants/make.py: random blocks dequantised by gguf-py 0.19.0.
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/gguf-kquants");
        for id in [2, 3, 6, 7, 8, 10, 11, 12, 13, 14] {
            let t = GgmlType::from_id(id).unwrap();
            let read = |ext: &str| std::fs::read(dir.join(format!("{}.{ext}", t.name()))).unwrap();
            let expected: Vec<f32> = read("f32")
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            let got = dequantise(t, &read("blocks"));
            assert_eq!(got.len(), expected.len(), "{}", t.name());
            for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
                assert_eq!(
                    g.to_bits(),
                    e.to_bits(),
                    "{} element {i}: {g} vs {e}",
                    t.name()
                );
            }
        }
    }

    #[test]
    fn every_id_round_trips_and_layouts_match_ggml() {
        for id in 0..40 {
            if let Some(t) = GgmlType::from_id(id) {
                assert!(SUPPORTED.contains(t.name()), "{}", t.name());
                let (bytes, elems) = t.block_layout();
                assert!(bytes > 0 && elems > 0);
            }
        }
        // ggml's sizeof(block_q*_K): scales + quants + f16s.
        assert_eq!(GgmlType::Q4K.block_layout().0, 2 + 2 + 12 + 128);
        assert_eq!(GgmlType::Q6K.block_layout().0, 128 + 64 + 16 + 2);
    }
}
