//! GGUF (version 2 and 3) reader: metadata and tensor directory parsed from a memory map,
//! every offset and length checked against the file before use.

use super::mmap::MappedFile;
use instinfer_kernels::GgmlType;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;

/// Errors while reading a GGUF file.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// The file could not be opened or memory-mapped.
    #[error("cannot open model file {path}: {source}")]
    Open {
        /// The file that failed to open.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// The file does not start with the `GGUF` magic bytes.
    #[error("{path} is not a GGUF file (magic bytes {found:02x?}, expected \"GGUF\")")]
    NotGguf {
        /// The file being read.
        path: PathBuf,
        /// The first (up to four) bytes of the file.
        found: Vec<u8>,
    },
    /// The file's GGUF version is not 2 or 3.
    #[error("{path}: GGUF version {version} is not supported (expected 2 or 3)")]
    Version {
        /// The file being read.
        path: PathBuf,
        /// The version the header declares.
        version: u32,
    },
    /// A header field, metadata value or tensor lies (partly) past the end of the file.
    #[error("{path} is truncated: {what} needs bytes {start}..{end} but the file has {len}")]
    Truncated {
        /// The file being read.
        path: PathBuf,
        /// What was being read (a header field, a metadata key or a tensor).
        what: String,
        /// First byte offset needed.
        start: u64,
        /// One past the last byte offset needed.
        end: u64,
        /// The file's length in bytes.
        len: u64,
    },
    /// The header or metadata is structurally invalid (bad value type, dimension count,
    /// alignment, or overflowing tensor dimensions).
    #[error("{path}: malformed metadata: {msg}")]
    Malformed {
        /// The file being read.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// A tensor's ggml type is unknown, or known but not dequantizable by this build.
    #[error("{path}: tensor '{tensor}' has unsupported type {ty}")]
    UnsupportedType {
        /// The file being read.
        path: PathBuf,
        /// The tensor's name.
        tensor: String,
        /// The type, as its name or as `id N` when the id is unknown.
        ty: String,
    },
    /// A required metadata key is absent.
    #[error("{path}: metadata key '{key}' is missing")]
    MissingKey {
        /// The file being read.
        path: PathBuf,
        /// The missing key.
        key: String,
    },
    /// A metadata key holds a value of a different type than the one asked for.
    #[error("{path}: metadata key '{key}' has the wrong type (expected {expected})")]
    KeyType {
        /// The file being read.
        path: PathBuf,
        /// The key asked for.
        key: String,
        /// The type that was expected, in words.
        expected: &'static str,
    },
}

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// An unsigned 8-bit integer (GGUF value type 0).
    U8(u8),
    /// A signed 8-bit integer (GGUF value type 1).
    I8(i8),
    /// An unsigned 16-bit integer (GGUF value type 2).
    U16(u16),
    /// A signed 16-bit integer (GGUF value type 3).
    I16(i16),
    /// An unsigned 32-bit integer (GGUF value type 4).
    U32(u32),
    /// A signed 32-bit integer (GGUF value type 5).
    I32(i32),
    /// An unsigned 64-bit integer (GGUF value type 10).
    U64(u64),
    /// A signed 64-bit integer (GGUF value type 11).
    I64(i64),
    /// A 32-bit float (GGUF value type 6).
    F32(f32),
    /// A 64-bit float (GGUF value type 12).
    F64(f64),
    /// A boolean (GGUF value type 7; any non-zero byte reads as `true`).
    Bool(bool),
    /// A string (GGUF value type 8); invalid UTF-8 is replaced with U+FFFD.
    String(String),
    /// An array of values of one type (GGUF value type 9); nested arrays are rejected as
    /// malformed.
    Array(Vec<Value>),
}

impl Value {
    /// Any integer type as u64, if non-negative.
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
    /// Any numeric type as f64.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }
    /// The string, if this is a `String`.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
    /// The boolean, if this is a `Bool`.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }
    /// The elements, if this is an `Array`.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// One entry of the tensor directory.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    /// The tensor's name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// ggml order: `dims[0]` is the row length (fastest-varying).
    pub dims: Vec<u64>,
    /// The element (storage) type.
    pub ty: GgmlType,
    /// Absolute byte range in the file.
    pub start: usize,
    /// Length of the byte range in the file.
    pub len: usize,
}

impl TensorInfo {
    /// Total number of elements (product of `dims`).
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
    /// Rows for a 2-D view: everything but `dims[0]`.
    pub fn rows(&self) -> usize {
        self.dims.iter().skip(1).product::<u64>() as usize
    }
    /// Row length for a 2-D view: `dims[0]` (1 if there are no dimensions).
    pub fn cols(&self) -> usize {
        self.dims.first().copied().unwrap_or(1) as usize
    }
}

/// A parsed GGUF file.
pub struct GgufFile {
    path: PathBuf,
    map: MappedFile,
    /// GGUF format version (2 or 3).
    pub version: u32,
    /// Every metadata key-value pair, keyed by its full name (e.g. `general.architecture`).
    pub metadata: HashMap<String, Value>,
    /// The tensor directory, in file order.
    pub tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

struct Cursor<'a> {
    path: &'a Path,
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], GgufError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let Some(end) = end else {
            return Err(GgufError::Truncated {
                path: self.path.into(),
                what: what.into(),
                start: self.pos as u64,
                end: (self.pos as u64).saturating_add(n as u64),
                len: self.buf.len() as u64,
            });
        };
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], GgufError> {
        Ok(self
            .take(N, what)?
            .try_into()
            .expect("take returned N bytes"))
    }
    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }
    fn len(&mut self, what: &str) -> Result<usize, GgufError> {
        let n = self.u64(what)?;
        // A count can never exceed the bytes left; this also rejects absurd lengths early.
        if n > (self.buf.len() - self.pos) as u64 {
            return Err(GgufError::Truncated {
                path: self.path.into(),
                what: format!("{what} (declared length {n})"),
                start: self.pos as u64,
                end: (self.pos as u64).saturating_add(n),
                len: self.buf.len() as u64,
            });
        }
        Ok(n as usize)
    }
    fn string(&mut self, what: &str) -> Result<String, GgufError> {
        let n = self.len(what)?;
        let b = self.take(n, what)?;
        // Vocabularies occasionally carry invalid UTF-8; keep what can be kept.
        Ok(String::from_utf8_lossy(b).into_owned())
    }
    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<Value, GgufError> {
        Ok(match ty {
            0 => Value::U8(self.array::<1>(key)?[0]),
            1 => Value::I8(self.array::<1>(key)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(key)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(key)?)),
            4 => Value::U32(self.u32(key)?),
            5 => Value::I32(i32::from_le_bytes(self.array(key)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(key)?)),
            7 => Value::Bool(self.array::<1>(key)?[0] != 0),
            8 => Value::String(self.string(key)?),
            9 if depth == 0 => {
                let elem_ty = self.u32(key)?;
                let n = self.len(key)?;
                let mut v = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    v.push(self.value(elem_ty, key, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64(key)?),
            11 => Value::I64(i64::from_le_bytes(self.array(key)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(key)?)),
            other => {
                return Err(GgufError::Malformed {
                    path: self.path.into(),
                    msg: format!("key '{key}' has unknown value type {other}"),
                })
            }
        })
    }
}

impl GgufFile {
    /// Open and parse `path`. Tensor types are checked here: a tensor of a type this build
    /// cannot use is an error naming the tensor and the type.
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        let map = MappedFile::open(path).map_err(|source| GgufError::Open {
            path: path.into(),
            source,
        })?;
        Self::parse(path, map)
    }

    /// Parse a GGUF file that is already in memory; `name` stands for its path in errors.
    pub fn from_bytes(name: &Path, bytes: Vec<u8>) -> Result<Self, GgufError> {
        Self::parse(name, MappedFile::from_vec(bytes))
    }

    fn parse(path: &Path, map: MappedFile) -> Result<Self, GgufError> {
        let buf = map.bytes();
        let mut c = Cursor { path, buf, pos: 0 };
        let magic = c.take(4, "magic").map_err(|_| GgufError::NotGguf {
            path: path.into(),
            found: buf[..buf.len().min(4)].to_vec(),
        })?;
        if magic != MAGIC {
            return Err(GgufError::NotGguf {
                path: path.into(),
                found: magic.to_vec(),
            });
        }
        let version = c.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::Version {
                path: path.into(),
                version,
            });
        }
        let n_tensors = c.u64("tensor count")?;
        let n_kv = c.u64("metadata count")?;
        let mut metadata = HashMap::new();
        for i in 0..n_kv {
            let key = c.string(&format!("metadata key #{i}"))?;
            let ty = c.u32(&key)?;
            let v = c.value(ty, &key, 0)?;
            metadata.insert(key, v);
        }
        let mut raw = Vec::new();
        for i in 0..n_tensors {
            let name = c.string(&format!("tensor name #{i}"))?;
            let n_dims = c.u32(&name)?;
            if n_dims == 0 || n_dims > 4 {
                return Err(GgufError::Malformed {
                    path: path.into(),
                    msg: format!("tensor '{name}' has {n_dims} dimensions"),
                });
            }
            let dims = (0..n_dims)
                .map(|_| c.u64(&name))
                .collect::<Result<Vec<_>, _>>()?;
            let ty_id = c.u32(&name)?;
            let offset = c.u64(&name)?;
            raw.push((name, dims, ty_id, offset));
        }
        let alignment = metadata
            .get("general.alignment")
            .and_then(Value::as_u64)
            .unwrap_or(DEFAULT_ALIGNMENT);
        if alignment == 0 || !alignment.is_power_of_two() {
            return Err(GgufError::Malformed {
                path: path.into(),
                msg: format!("general.alignment {alignment}"),
            });
        }
        let data_start = (c.pos as u64).div_ceil(alignment) * alignment;
        let mut tensors = Vec::with_capacity(raw.len());
        let mut by_name = HashMap::new();
        for (name, dims, ty_id, offset) in raw {
            let ty = GgmlType::from_id(ty_id).map_err(|_| GgufError::UnsupportedType {
                path: path.into(),
                tensor: name.clone(),
                ty: format!("id {ty_id}"),
            })?;
            let unsupported = || GgufError::UnsupportedType {
                path: path.into(),
                tensor: name.clone(),
                ty: ty.to_string(),
            };
            if !ty.can_dequantize() {
                return Err(unsupported());
            }
            let n: u64 = dims
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .ok_or_else(|| GgufError::Malformed {
                    path: path.into(),
                    msg: format!("tensor '{name}' dimensions {dims:?} overflow"),
                })?;
            let cols = dims[0] as usize;
            let row_bytes = ty.row_bytes(cols).map_err(|e| GgufError::Malformed {
                path: path.into(),
                msg: format!("tensor '{name}': {e}"),
            })? as u64;
            // Both can overflow in a hostile file; saturated, they fail the bounds check below.
            let len = row_bytes.saturating_mul(n / dims[0].max(1));
            let start = data_start.saturating_add(offset);
            if start.checked_add(len).is_none_or(|e| e > buf.len() as u64) {
                return Err(GgufError::Truncated {
                    path: path.into(),
                    what: format!("tensor '{name}' ({ty}, {dims:?})"),
                    start,
                    end: start.saturating_add(len),
                    len: buf.len() as u64,
                });
            }
            by_name.insert(name.clone(), tensors.len());
            tensors.push(TensorInfo {
                name,
                dims,
                ty,
                start: start as usize,
                len: len as usize,
            });
        }
        Ok(Self {
            path: path.into(),
            map,
            version,
            metadata,
            tensors,
            by_name,
        })
    }

    /// The path the file was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The whole file.
    pub fn file_bytes(&self) -> &[u8] {
        self.map.bytes()
    }

    /// The tensor named `name`, if present.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// The bytes of a tensor (range checked at open).
    pub fn tensor_data(&self, t: &TensorInfo) -> &[u8] {
        &self.map.bytes()[t.start..t.start + t.len]
    }

    /// The metadata value under `key`, if present.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    fn missing(&self, key: &str) -> GgufError {
        GgufError::MissingKey {
            path: self.path.clone(),
            key: key.into(),
        }
    }

    fn wrong(&self, key: &str, expected: &'static str) -> GgufError {
        GgufError::KeyType {
            path: self.path.clone(),
            key: key.into(),
            expected,
        }
    }

    /// A required string value; errors if `key` is missing or not a string.
    pub fn req_str(&self, key: &str) -> Result<&str, GgufError> {
        self.get(key)
            .ok_or_else(|| self.missing(key))?
            .as_str()
            .ok_or_else(|| self.wrong(key, "string"))
    }

    /// A required non-negative integer value (any integer type); errors if `key` is missing
    /// or not a non-negative integer.
    pub fn req_u64(&self, key: &str) -> Result<u64, GgufError> {
        self.get(key)
            .ok_or_else(|| self.missing(key))?
            .as_u64()
            .ok_or_else(|| self.wrong(key, "integer"))
    }

    /// An optional non-negative integer value: `Ok(None)` if `key` is absent, an error if it
    /// holds anything else.
    pub fn opt_u64(&self, key: &str) -> Result<Option<u64>, GgufError> {
        self.get(key)
            .map(|v| v.as_u64().ok_or_else(|| self.wrong(key, "integer")))
            .transpose()
    }

    /// An optional numeric value (float or non-negative integer) as f64: `Ok(None)` if `key`
    /// is absent, an error if it holds anything else.
    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>, GgufError> {
        self.get(key)
            .map(|v| v.as_f64().ok_or_else(|| self.wrong(key, "number")))
            .transpose()
    }

    /// An optional boolean value: `Ok(None)` if `key` is absent, an error if it holds
    /// anything else.
    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>, GgufError> {
        self.get(key)
            .map(|v| v.as_bool().ok_or_else(|| self.wrong(key, "bool")))
            .transpose()
    }

    /// A required array of strings.
    pub fn req_strings(&self, key: &str) -> Result<Vec<&str>, GgufError> {
        let arr = self
            .get(key)
            .ok_or_else(|| self.missing(key))?
            .as_array()
            .ok_or_else(|| self.wrong(key, "array"))?;
        arr.iter()
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| self.wrong(key, "array of strings"))
            })
            .collect()
    }

    /// An optional array of integers.
    pub fn opt_ints(&self, key: &str) -> Result<Option<Vec<i64>>, GgufError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let arr = v.as_array().ok_or_else(|| self.wrong(key, "array"))?;
        arr.iter()
            .map(|v| match *v {
                Value::I32(x) => Ok(x as i64),
                Value::I64(x) => Ok(x),
                _ => v
                    .as_u64()
                    .map(|x| x as i64)
                    .ok_or_else(|| self.wrong(key, "array of integers")),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }
}
