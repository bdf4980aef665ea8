//! The CUDA path. The real implementation arrives with the GPU issue behind the `cuda`
//! feature; without it every entry point returns [`CudaError::NotBuilt`] (with it, until then,
//! [`CudaError::NotImplemented`]), so callers never need `#[cfg]`.

/// Errors from the CUDA path.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// The binary was built without the `cuda` feature.
    #[error("this build of instinfer has no CUDA support; rebuild with `--features cuda`")]
    NotBuilt,
    /// Built with the feature, but the GPU path is not implemented yet.
    #[error("the CUDA path is not implemented in this version")]
    NotImplemented,
}

/// A handle on one GPU.
#[derive(Debug)]
pub struct Device {
    _private: (),
}

impl Device {
    /// Open GPU `ordinal`.
    pub fn new(_ordinal: usize) -> Result<Self, CudaError> {
        if cfg!(feature = "cuda") {
            Err(CudaError::NotImplemented)
        } else {
            Err(CudaError::NotBuilt)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{CudaError, Device};

    /// Without the feature the error names the feature to build with; with it (until the GPU
    /// path exists) the error says the path is not implemented.
    #[test]
    fn without_the_feature_the_error_says_how_to_get_it() {
        let err = Device::new(0).unwrap_err();
        if cfg!(feature = "cuda") {
            assert!(matches!(err, CudaError::NotImplemented), "{err:?}");
        } else {
            assert!(matches!(err, CudaError::NotBuilt), "{err:?}");
            assert!(err.to_string().contains("--features cuda"), "{err}");
        }
    }
}
