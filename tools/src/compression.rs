//! `lazyctl convert --compression`: which chunks are zstd-compressed and which are stored raw
//! (flag `UNCOMPRESSED`, no compression work at conversion and none on any read).
//!
//! - `zstd`: every chunk is compressed, and kept raw only when that saves less than 1/64.
//! - `none`: every chunk is stored raw.
//! - `auto` (the default): chunks of files whose name says they are model weights or already
//!   compressed ([`INCOMPRESSIBLE_EXTENSIONS`]) are stored raw; everything else, and every
//!   shared chunk of small files, is compressed as with `zstd`. Measured on 64 MiB of
//!   normal(0, 0.02) weights in 1 MiB chunks (`measure_zstd_on_model_weights` below): zstd
//!   level 3 saves 22 % on bf16, 8 % on f16 and 7 % on f32, compressing at ~240 MB/s and
//!   decoding at ~500 MB/s per core. Decoding would cost every read of the weights (which read
//!   everything, at link speed: 2-3 cores busy for a 10 Gbit/s link) to save a fifth of the
//!   bytes at best, so weights are stored raw.

use std::fmt;
use std::str::FromStr;

/// What `--compression` selects (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    #[default]
    Auto,
    Zstd,
    None,
}

/// File name extensions (lower case) `auto` stores raw: model weights and tensors, which zstd
/// barely shrinks, and formats that are compressed already.
pub const INCOMPRESSIBLE_EXTENSIONS: &[&str] = &[
    // Weights and tensors.
    "safetensors",
    "bin",
    "pt",
    "pth",
    "ckpt",
    "gguf",
    "ggml",
    "onnx",
    "h5",
    "msgpack",
    "npy",
    "npz",
    "tflite",
    "mlmodel",
    "params",
    // Compressed archives and streams.
    "gz",
    "tgz",
    "zst",
    "xz",
    "bz2",
    "lz4",
    "zip",
    "7z",
    // Compressed media.
    "jpg",
    "jpeg",
    "png",
    "webp",
    "gif",
    "mp4",
    "mkv",
    "webm",
    "mp3",
    "ogg",
    "flac",
];

impl Compression {
    /// Whether the chunks of a large file named `name` (its last path component) are
    /// compressed.
    pub fn compresses_file(self, name: &[u8]) -> bool {
        match self {
            Compression::Zstd => true,
            Compression::None => false,
            Compression::Auto => !is_incompressible(name),
        }
    }

    /// Whether shared chunks of small files are compressed.
    pub fn compresses_packs(self) -> bool {
        self != Compression::None
    }
}

/// Whether `name`'s extension is in [`INCOMPRESSIBLE_EXTENSIONS`] (case-insensitive).
pub fn is_incompressible(name: &[u8]) -> bool {
    let Some(dot) = name.iter().rposition(|b| *b == b'.') else {
        return false;
    };
    let ext = &name[dot + 1..];
    INCOMPRESSIBLE_EXTENSIONS
        .iter()
        .any(|e| e.as_bytes().eq_ignore_ascii_case(ext))
}

impl FromStr for Compression {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Compression::Auto),
            "zstd" => Ok(Compression::Zstd),
            "none" => Ok(Compression::None),
            other => Err(format!(
                "unknown compression {other:?}: expected auto, zstd or none"
            )),
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Compression::Auto => "auto",
            Compression::Zstd => "zstd",
            Compression::None => "none",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_stores_weights_and_compressed_files_raw() {
        let auto = Compression::Auto;
        for raw in [
            &b"model-00001-of-00004.safetensors"[..],
            b"pytorch_model.bin",
            b"W.GGUF",
            b"x.tar.gz",
            b"photo.JPEG",
        ] {
            assert!(
                !auto.compresses_file(raw),
                "{}",
                String::from_utf8_lossy(raw)
            );
        }
        for compressed in [
            &b"config.json"[..],
            b"tokenizer.json",
            b"vocab.txt",
            b"README",
            b"libc.so.6",
            b"safetensors",
            b"x.safetensors.json",
        ] {
            assert!(
                auto.compresses_file(compressed),
                "{}",
                String::from_utf8_lossy(compressed)
            );
        }
        assert!(auto.compresses_packs());
        assert!(Compression::Zstd.compresses_file(b"a.safetensors"));
        assert!(!Compression::None.compresses_file(b"a.txt"));
        assert!(!Compression::None.compresses_packs());
    }

    #[test]
    fn parses_and_prints_the_three_modes() {
        for mode in [Compression::Auto, Compression::Zstd, Compression::None] {
            assert_eq!(mode.to_string().parse::<Compression>().unwrap(), mode);
        }
        let e = "lz4".parse::<Compression>().unwrap_err();
        assert!(e.contains("auto, zstd or none"), "{e}");
        assert_eq!(Compression::default(), Compression::Auto);
    }

    /// xorshift64*: reproducible pseudo-random numbers without a dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn uniform(&mut self) -> f64 {
            ((self.next() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        }

        /// Normal(0, std) by Box-Muller.
        fn normal(&mut self, std: f64) -> f32 {
            let (u, v) = (self.uniform(), self.uniform());
            ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos() * std) as f32
        }
    }

    /// f32 -> bf16, rounding to nearest even (what torch's `.to(torch.bfloat16)` does).
    fn bf16(x: f32) -> u16 {
        let b = x.to_bits();
        let round = 0x7fff + ((b >> 16) & 1);
        (b.wrapping_add(round) >> 16) as u16
    }

    /// f32 -> f16, rounding to nearest (normals and subnormals; weights never overflow).
    fn f16(x: f32) -> u16 {
        let b = x.to_bits();
        let sign = ((b >> 16) & 0x8000) as u16;
        let exp = ((b >> 23) & 0xff) as i32 - 127 + 15;
        let man = b & 0x7f_ffff;
        if exp <= 0 {
            if exp < -10 {
                return sign;
            }
            let man = man | 0x80_0000;
            let shift = (14 - exp) as u32;
            let half = ((man + (1 << (shift - 1))) >> shift) as u16;
            return sign | half;
        }
        let half = ((exp as u32) << 10) | (man >> 13);
        let half = half + ((man >> 12) & 1);
        sign | half as u16
    }

    /// `bytes` of weights in `dtype` (`bf16`, `f16` or `f32`).
    fn weights(bytes: usize, dtype: &str, seed: u64) -> Vec<u8> {
        let mut rng = Rng(seed);
        let mut out = Vec::with_capacity(bytes);
        while out.len() < bytes {
            let w = rng.normal(0.02);
            match dtype {
                "bf16" => out.extend_from_slice(&bf16(w).to_le_bytes()),
                "f16" => out.extend_from_slice(&f16(w).to_le_bytes()),
                _ => out.extend_from_slice(&w.to_le_bytes()),
            }
        }
        out
    }

    /// The measurement behind `auto`'s rule: zstd level 3 (the converter's default) on 64 MiB
    /// of realistic weights (normal, std 0.02) per 1 MiB chunk, as the packer cuts them, on one
    /// core. Run with
    /// `cargo test --release -p tools --lib measure_zstd_on_model_weights -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement, not a check: prints ratios and speeds"]
    fn measure_zstd_on_model_weights() {
        const TOTAL: usize = 64 << 20;
        const CHUNK: usize = 1 << 20;
        for (name, seed) in [("bf16", 2), ("f16", 3), ("f32", 4)] {
            let data = weights(TOTAL, name, seed);
            let started = std::time::Instant::now();
            let compressed: Vec<Vec<u8>> = data
                .chunks(CHUNK)
                .map(|c| zstd::bulk::compress(c, fusefs::chunk::DEFAULT_ZSTD_LEVEL).unwrap())
                .collect();
            let compress_s = started.elapsed().as_secs_f64();
            let started = std::time::Instant::now();
            for c in &compressed {
                let raw = zstd::bulk::decompress(c, CHUNK).unwrap();
                assert_eq!(raw.len(), CHUNK);
            }
            let decompress_s = started.elapsed().as_secs_f64();
            let stored: usize = compressed.iter().map(Vec::len).sum();
            println!(
                "{name}: {:.1} % of raw ({:.1} % saved); compress {:.0} MB/s, decompress {:.0} MB/s (one core)",
                100.0 * stored as f64 / TOTAL as f64,
                100.0 - 100.0 * stored as f64 / TOTAL as f64,
                TOTAL as f64 / 1e6 / compress_s,
                TOTAL as f64 / 1e6 / decompress_s,
            );
        }
    }
}
