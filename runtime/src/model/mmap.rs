//! Read-only memory maps of model files: the only unsafe code of the model runtime.

use memmap2::Mmap;
use std::fs::File;
use std::path::Path;

/// A file mapped read-only for the lifetime of this value, or bytes already in memory.
pub struct MappedFile {
    map: Option<Mmap>,
    owned: Vec<u8>,
}

impl MappedFile {
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = File::open(path)?;
        let meta = file.metadata()?;
        if meta.is_dir() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "is a directory",
            ));
        }
        if meta.len() == 0 {
            // mmap of an empty file fails on Linux; an empty slice says the same thing.
            return Ok(Self {
                map: None,
                owned: Vec::new(),
            });
        }
        // SAFETY: the map is read-only and private to this process. Model files are treated as
        // immutable while loaded (the same contract llama.cpp and candle rely on); a file
        // truncated underneath a running process would fault, which is why the daemon keeps
        // its models in a directory it owns.
        let map = unsafe { Mmap::map(&file)? };
        Ok(Self {
            map: Some(map),
            owned: Vec::new(),
        })
    }

    /// Bytes that are already in memory (a file read whole, or one built by a test or a
    /// fuzz target), served as if they were mapped.
    pub fn from_vec(bytes: Vec<u8>) -> Self {
        Self {
            map: None,
            owned: bytes,
        }
    }

    pub fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&self.owned)
    }
}
