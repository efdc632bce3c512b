//! GGUF: the weight format of the int4 CPU engine.
//!
//! The file is memory-mapped ([`map`]) and parsed in place: the header, the metadata and the
//! tensor infos are read with bounds checks into small owned structures, while tensor data stays
//! in the mapping and is handed out as byte slices. Every malformed input is a [`GgufError`] that
//! says what is wrong; nothing here panics on file contents.
//!
//! Layout (version 2 and 3, little-endian): magic `GGUF`, version u32, tensor count u64,
//! metadata count u64, metadata key/values, tensor infos (name, n_dims u32, dims u64 × n_dims,
//! type u32, offset u64), padding to `general.alignment` (default 32), tensor data.

mod map;

use std::collections::HashMap;
use std::path::Path;

pub use map::Bytes;

use crate::kernels::quant::GgmlType;

/// Largest string accepted anywhere in the header (a chat template is a few KiB; 16 MiB is absurd).
const MAX_STRING: u64 = 16 << 20;
/// Largest number of dimensions of a tensor (ggml's GGML_MAX_DIMS).
const MAX_DIMS: u32 = 4;
/// Deepest nesting of arrays inside arrays.
const MAX_ARRAY_DEPTH: u32 = 2;
/// The metadata may take in memory at most this many times the bytes it takes in the file, plus
/// [`METADATA_SLACK`]: a real tokenizer (strings, i32 types, f32 scores) stays under 8x, and a
/// crafted array of a billion one-byte values fails after a few MiB instead of growing 32x
/// the file. Checked as the values are read, before anything is allocated for the next one.
const METADATA_FACTOR: u64 = 8;
const METADATA_SLACK: u64 = 1 << 20;
/// Initial capacity of a list read from a count in the file; it grows as elements are read, so
/// a count that lies costs nothing up front.
const PREALLOC: usize = 4096;

/// What is wrong with a GGUF file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GgufError {
    #[error("cannot open {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("not a GGUF file: magic is {found:02x?}, expected \"GGUF\"")]
    BadMagic { found: [u8; 4] },
    #[error("unsupported GGUF version {0} (supported: 2, 3)")]
    BadVersion(u32),
    #[error("file truncated: {what} needs {need} bytes at offset {offset}, file has {len}")]
    Truncated {
        what: String,
        offset: u64,
        need: u64,
        len: u64,
    },
    #[error("absurd {what}: {value} (limit {limit})")]
    Absurd {
        what: String,
        value: u64,
        limit: u64,
    },
    #[error("metadata key {key:?}: unknown value type {ty}")]
    BadValueType { key: String, ty: u32 },
    #[error("{what} is not valid UTF-8")]
    BadUtf8 { what: String },
    #[error("tensor {name:?}: unknown tensor type {ty}")]
    UnknownTensorType { name: String, ty: u32 },
    #[error("tensor {name:?}: {msg}")]
    BadTensor { name: String, msg: String },
    #[error("tensor {name:?}: data [{start}, {end}) lies past the end of the file ({len} bytes)")]
    TensorOutOfBounds {
        name: String,
        start: u64,
        end: u64,
        len: u64,
    },
    #[error("tensor {name:?}: offset {offset} is not a multiple of the alignment {align}")]
    Misaligned {
        name: String,
        offset: u64,
        align: u64,
    },
    #[error("general.alignment {0} is not a power of two between 1 and 65536")]
    BadAlignment(u64),
    #[error("duplicate {what} {name:?}")]
    Duplicate { what: &'static str, name: String },
    #[error("metadata key {key:?} is missing")]
    MissingKey { key: String },
    #[error("metadata key {key:?} has type {found}, expected {expected}")]
    WrongType {
        key: String,
        found: &'static str,
        expected: &'static str,
    },
    #[error("tensor {name:?} is missing")]
    MissingTensor { name: String },
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "u8",
            Value::I8(_) => "i8",
            Value::U16(_) => "u16",
            Value::I16(_) => "i16",
            Value::U32(_) => "u32",
            Value::I32(_) => "i32",
            Value::F32(_) => "f32",
            Value::Bool(_) => "bool",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::U64(_) => "u64",
            Value::I64(_) => "i64",
            Value::F64(_) => "f64",
        }
    }

    /// Any integer type that fits in u64 (negative values do not).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(v as i64),
            Value::I16(v) => Some(v as i64),
            Value::I32(v) => Some(v as i64),
            Value::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }
}

/// Where one tensor lies and what it holds.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the contiguous (row) dimension.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Absolute offset of the data in the file.
    pub offset: u64,
    pub n_bytes: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// A parsed GGUF file: metadata and tensor infos owned, tensor data borrowed from the mapping.
pub struct Gguf {
    bytes: Bytes,
    pub version: u32,
    pub alignment: u64,
    pub metadata: HashMap<String, Value>,
    /// Metadata keys in file order (for `edgellm info`).
    pub keys: Vec<String>,
    pub tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
}

impl std::fmt::Debug for Gguf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gguf")
            .field("version", &self.version)
            .field("tensors", &self.tensors.len())
            .field("metadata", &self.metadata.len())
            .finish()
    }
}

impl Gguf {
    /// Maps the file and parses it. The weights are not read, only mapped.
    pub fn open(path: &Path) -> Result<Gguf, GgufError> {
        let bytes = Bytes::map_file(path).map_err(|source| GgufError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Gguf::parse(bytes)
    }

    /// Parses a GGUF image held in `bytes` (a mapping or an owned buffer).
    pub fn parse(bytes: Bytes) -> Result<Gguf, GgufError> {
        let (version, alignment, metadata, keys, tensors) = {
            let mut r = Reader {
                buf: &bytes,
                pos: 0,
                mem: 0,
            };
            let magic = r.take(4, "magic")?;
            if magic != b"GGUF" {
                let mut found = [0u8; 4];
                found.copy_from_slice(magic);
                return Err(GgufError::BadMagic { found });
            }
            let version = r.u32("version")?;
            if !(2..=3).contains(&version) {
                return Err(GgufError::BadVersion(version));
            }
            let n_tensors = r.u64("tensor count")?;
            let n_kv = r.u64("metadata count")?;
            // Each metadata entry needs at least 8 (key length) + 4 (type) + 1 bytes, each tensor
            // info at least 8 + 4 + 8 + 4 + 8: a count that cannot fit in the file is absurd.
            let len = bytes.len() as u64;
            if n_kv > len / 13 {
                return Err(GgufError::Absurd {
                    what: "metadata count".into(),
                    value: n_kv,
                    limit: len / 13,
                });
            }
            if n_tensors > len / 32 {
                return Err(GgufError::Absurd {
                    what: "tensor count".into(),
                    value: n_tensors,
                    limit: len / 32,
                });
            }
            let mut metadata = HashMap::new();
            let mut keys = Vec::with_capacity((n_kv as usize).min(PREALLOC));
            for _ in 0..n_kv {
                let key = r.string("metadata key")?;
                r.charge(key.len() as u64 + 64)?;
                let ty = r.u32("metadata value type")?;
                let value = r.value(&key, ty, 0)?;
                if metadata.insert(key.clone(), value).is_some() {
                    return Err(GgufError::Duplicate {
                        what: "metadata key",
                        name: key,
                    });
                }
                keys.push(key);
            }
            let alignment = match metadata.get("general.alignment") {
                None => 32,
                Some(v) => {
                    let a = v.as_u64().ok_or(GgufError::WrongType {
                        key: "general.alignment".into(),
                        found: v.type_name(),
                        expected: "u32",
                    })?;
                    if a == 0 || !a.is_power_of_two() || a > 65536 {
                        return Err(GgufError::BadAlignment(a));
                    }
                    a
                }
            };
            let mut infos = Vec::with_capacity((n_tensors as usize).min(PREALLOC));
            for _ in 0..n_tensors {
                let name = r.string("tensor name")?;
                let n_dims = r.u32("tensor dimension count")?;
                if n_dims == 0 || n_dims > MAX_DIMS {
                    return Err(GgufError::BadTensor {
                        name,
                        msg: format!("{n_dims} dimensions (allowed 1..={MAX_DIMS})"),
                    });
                }
                let mut dims = Vec::with_capacity(n_dims as usize);
                for _ in 0..n_dims {
                    dims.push(r.u64("tensor dimension")?);
                }
                let raw_ty = r.u32("tensor type")?;
                let offset = r.u64("tensor offset")?;
                let ty =
                    GgmlType::from_u32(raw_ty).ok_or_else(|| GgufError::UnknownTensorType {
                        name: name.clone(),
                        ty: raw_ty,
                    })?;
                infos.push((name, dims, ty, offset));
            }
            let data_start = align_up(r.pos as u64, alignment);
            let mut tensors = Vec::with_capacity(infos.len().min(PREALLOC));
            for (name, dims, ty, rel) in infos {
                let n_bytes = tensor_bytes(&name, &dims, ty)?;
                if rel % alignment != 0 {
                    return Err(GgufError::Misaligned {
                        name,
                        offset: rel,
                        align: alignment,
                    });
                }
                let start = data_start.checked_add(rel);
                let end = start.and_then(|s| s.checked_add(n_bytes));
                match (start, end) {
                    (Some(start), Some(end)) if end <= len => tensors.push(TensorInfo {
                        name,
                        dims,
                        ty,
                        offset: start,
                        n_bytes,
                    }),
                    _ => {
                        return Err(GgufError::TensorOutOfBounds {
                            name,
                            start: data_start.saturating_add(rel),
                            end: data_start.saturating_add(rel).saturating_add(n_bytes),
                            len,
                        })
                    }
                }
            }
            (version, alignment, metadata, keys, tensors)
        };
        let mut by_name = HashMap::with_capacity(tensors.len());
        for (i, t) in tensors.iter().enumerate() {
            if by_name.insert(t.name.clone(), i).is_some() {
                return Err(GgufError::Duplicate {
                    what: "tensor",
                    name: t.name.clone(),
                });
            }
        }
        Ok(Gguf {
            bytes,
            version,
            alignment,
            metadata,
            keys,
            tensors,
            by_name,
        })
    }

    /// The whole file image.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Gives the resident pages of bytes `offset..offset + len` of a mapped image back to the
    /// system (whole pages inside the range only); they are read from the file again if used.
    /// For tensors whose data now lives elsewhere (repacked at load). Owned images keep theirs.
    pub fn release_range(&self, offset: usize, len: usize) {
        self.bytes.release_range(offset, len);
    }

    /// Whether the image is a memory mapping of the file (weights used in place, not copied).
    pub fn is_mapped(&self) -> bool {
        matches!(self.bytes, Bytes::Mapped(_))
    }

    /// Where the file is mapped in this process (start address, length), when it is.
    pub fn mapped_range(&self) -> Option<(usize, usize)> {
        match &self.bytes {
            Bytes::Mapped(m) => Some((m.as_ptr() as usize, m.len())),
            _ => None,
        }
    }

    /// Number of bytes of the file (mapped, not resident).
    pub fn file_len(&self) -> u64 {
        self.bytes.len() as u64
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    pub fn require_tensor(&self, name: &str) -> Result<&TensorInfo, GgufError> {
        self.tensor(name).ok_or_else(|| GgufError::MissingTensor {
            name: name.to_string(),
        })
    }

    /// The bytes of a tensor, in place in the mapping.
    pub fn tensor_data(&self, t: &TensorInfo) -> &[u8] {
        // Bounds were checked at parse time.
        &self.bytes[t.offset as usize..(t.offset + t.n_bytes) as usize]
    }

    /// Drops the tokenizer's arrays (tokens, their types and scores, merges) from the metadata,
    /// once a tokenizer is built from them: as parsed values they take several times their
    /// bytes in the file. `keys` still lists them.
    pub fn release_vocabulary(&mut self) {
        for key in [
            "tokenizer.ggml.tokens",
            "tokenizer.ggml.token_type",
            "tokenizer.ggml.scores",
            "tokenizer.ggml.merges",
        ] {
            self.metadata.remove(key);
        }
        self.metadata.shrink_to_fit();
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    fn require(&self, key: &str) -> Result<&Value, GgufError> {
        self.get(key)
            .ok_or_else(|| GgufError::MissingKey { key: key.into() })
    }

    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        match self.require(key)? {
            Value::String(s) => Ok(s),
            v => Err(wrong(key, v, "string")),
        }
    }

    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        let v = self.require(key)?;
        v.as_u64().ok_or_else(|| wrong(key, v, "unsigned integer"))
    }

    pub fn get_f64(&self, key: &str) -> Result<f64, GgufError> {
        let v = self.require(key)?;
        v.as_f64().ok_or_else(|| wrong(key, v, "number"))
    }

    pub fn get_bool(&self, key: &str) -> Result<bool, GgufError> {
        match self.require(key)? {
            Value::Bool(b) => Ok(*b),
            v => Err(wrong(key, v, "bool")),
        }
    }

    pub fn get_array(&self, key: &str) -> Result<&[Value], GgufError> {
        match self.require(key)? {
            Value::Array(a) => Ok(a),
            v => Err(wrong(key, v, "array")),
        }
    }
}

fn wrong(key: &str, v: &Value, expected: &'static str) -> GgufError {
    GgufError::WrongType {
        key: key.into(),
        found: v.type_name(),
        expected,
    }
}

pub fn align_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

/// Bytes of a tensor of type `ty` and shape `dims`, with the shape checked against the type.
fn tensor_bytes(name: &str, dims: &[u64], ty: GgmlType) -> Result<u64, GgufError> {
    let bad = |msg: String| GgufError::BadTensor {
        name: name.to_string(),
        msg,
    };
    if dims.contains(&0) {
        return Err(bad(format!("zero-sized dimension in {dims:?}")));
    }
    let mut n: u64 = 1;
    for &d in dims {
        n = n
            .checked_mul(d)
            .filter(|&n| n <= 1 << 40)
            .ok_or_else(|| bad(format!("element count of {dims:?} overflows")))?;
    }
    let block = ty.block_size() as u64;
    if !dims[0].is_multiple_of(block) {
        return Err(bad(format!(
            "row length {} is not a multiple of the {} block size {}",
            dims[0],
            ty.name(),
            block
        )));
    }
    Ok(n / block * ty.type_size() as u64)
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    /// Bytes the metadata read so far takes in memory.
    mem: u64,
}

impl<'a> Reader<'a> {
    /// Counts `bytes` more of metadata in memory, refusing to pass the cap.
    fn charge(&mut self, bytes: u64) -> Result<(), GgufError> {
        self.mem += bytes;
        let limit = METADATA_FACTOR * self.pos as u64 + METADATA_SLACK;
        if self.mem > limit {
            return Err(GgufError::Absurd {
                what: format!(
                    "metadata memory (bytes; at most {METADATA_FACTOR}x the {} bytes of metadata read so far, + 1 MiB)",
                    self.pos
                ),
                value: self.mem,
                limit,
            });
        }
        Ok(())
    }

    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8], GgufError> {
        let len = self.buf.len() as u64;
        let end = (self.pos as u64).checked_add(n).filter(|&e| e <= len);
        match end {
            Some(end) => {
                let s = &self.buf[self.pos..end as usize];
                self.pos = end as usize;
                Ok(s)
            }
            None => Err(GgufError::Truncated {
                what: what.to_string(),
                offset: self.pos as u64,
                need: n,
                len,
            }),
        }
    }

    fn arr<const N: usize>(&mut self, what: &str) -> Result<[u8; N], GgufError> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.arr(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.arr(what)?))
    }

    fn string(&mut self, what: &str) -> Result<String, GgufError> {
        let n = self.u64(what)?;
        if n > MAX_STRING {
            return Err(GgufError::Absurd {
                what: format!("{what} length"),
                value: n,
                limit: MAX_STRING,
            });
        }
        let s = self.take(n, what)?;
        match std::str::from_utf8(s) {
            Ok(s) => Ok(s.to_string()),
            // Some converters wrote tokens with invalid UTF-8; keep them readable rather than
            // refusing the model, but never for names that must match.
            Err(_) if what == "metadata string" => Ok(String::from_utf8_lossy(s).into_owned()),
            Err(_) => Err(GgufError::BadUtf8 {
                what: what.to_string(),
            }),
        }
    }

    fn value(&mut self, key: &str, ty: u32, depth: u32) -> Result<Value, GgufError> {
        self.charge(std::mem::size_of::<Value>() as u64)?;
        Ok(match ty {
            0 => Value::U8(u8::from_le_bytes(self.arr(key)?)),
            1 => Value::I8(i8::from_le_bytes(self.arr(key)?)),
            2 => Value::U16(u16::from_le_bytes(self.arr(key)?)),
            3 => Value::I16(i16::from_le_bytes(self.arr(key)?)),
            4 => Value::U32(self.u32(key)?),
            5 => Value::I32(i32::from_le_bytes(self.arr(key)?)),
            6 => Value::F32(f32::from_le_bytes(self.arr(key)?)),
            7 => {
                let b = u8::from_le_bytes(self.arr(key)?);
                if b > 1 {
                    return Err(GgufError::BadTensor {
                        name: key.into(),
                        msg: format!("bool value {b}"),
                    });
                }
                Value::Bool(b == 1)
            }
            8 => {
                let v = self.string("metadata string")?;
                self.charge(v.len() as u64)?;
                Value::String(v)
            }
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(GgufError::Absurd {
                        what: format!("array nesting of {key:?}"),
                        value: depth as u64 + 1,
                        limit: MAX_ARRAY_DEPTH as u64,
                    });
                }
                let ety = self.u32(key)?;
                let n = self.u64(key)?;
                let min_size = match ety {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8..=12 => 8,
                    _ => {
                        return Err(GgufError::BadValueType {
                            key: key.into(),
                            ty: ety,
                        })
                    }
                };
                let left = (self.buf.len() - self.pos) as u64;
                if n > left / min_size {
                    return Err(GgufError::Absurd {
                        what: format!("array length of {key:?}"),
                        value: n,
                        limit: left / min_size,
                    });
                }
                let mut v = Vec::with_capacity((n as usize).min(PREALLOC));
                for _ in 0..n {
                    v.push(self.value(key, ety, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64(key)?),
            11 => Value::I64(i64::from_le_bytes(self.arr(key)?)),
            12 => Value::F64(f64::from_le_bytes(self.arr(key)?)),
            _ => {
                return Err(GgufError::BadValueType {
                    key: key.into(),
                    ty,
                })
            }
        })
    }
}
