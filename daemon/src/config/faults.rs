//! The `[fault_injection]` table: faults drawn at random into the KV store's reads (EIO,
//! silent bit flips), through the storage engine's seeded fault injector, and panics planted
//! in the scheduler. For chaos testing (`chaosbench`), the daemon's own fault tests and
//! drills only: it is off unless a key is set, and a daemon that runs with it logs a warning
//! at start and reports it in `--check-config`.

use super::{invalid, ConfigError};
use csd_engine::device::FaultConfig;
use serde::Deserialize;

/// One layer of the `[fault_injection]` table: every key optional.
#[derive(Clone, Debug, Default, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct FaultArgs {
    /// Testing only: probability that a KV store read fails with EIO [default: 0].
    #[arg(long, env = "INSTINFER_FAULT_READ_ERROR_PROBABILITY")]
    pub read_error_probability: Option<f64>,
    /// Testing only: probability that a KV store read returns with one bit flipped
    /// [default: 0].
    #[arg(long, env = "INSTINFER_FAULT_BIT_FLIP_PROBABILITY")]
    pub bit_flip_probability: Option<f64>,
    /// Testing only: seed of the fault generator [default: 1].
    #[arg(long, env = "INSTINFER_FAULT_SEED")]
    pub fault_seed: Option<u64>,
    /// Testing only: panic inside the batched forward pass of this scheduler step (counted
    /// from 1); the step's sequences fail with INTERNAL and the daemon goes on.
    #[arg(long, env = "INSTINFER_FAULT_FORWARD_PANIC_AT_STEP")]
    pub forward_panic_at_step: Option<u64>,
    /// Testing only: panic in the scheduler itself, outside any request's work, at this step;
    /// the daemon reports NOT_SERVING and exits with an error.
    #[arg(long, env = "INSTINFER_FAULT_SCHEDULER_PANIC_AT_STEP")]
    pub scheduler_panic_at_step: Option<u64>,
}

/// Faults to inject, checked.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct FaultInjection {
    /// Probability that a read fails with EIO.
    pub read_error_probability: f64,
    /// Probability that a read returns with one bit flipped.
    pub bit_flip_probability: f64,
    /// Seed of the fault generator.
    pub fault_seed: u64,
    /// Scheduler step whose forward pass panics.
    pub forward_panic_at_step: Option<u64>,
    /// Scheduler step at which the scheduler panics.
    pub scheduler_panic_at_step: Option<u64>,
}

impl FaultInjection {
    /// The storage engine's fault configuration; `None` when no read fault is asked for.
    pub fn device_faults(&self) -> Option<FaultConfig> {
        (self.read_error_probability > 0.0 || self.bit_flip_probability > 0.0).then(|| {
            FaultConfig {
                seed: self.fault_seed,
                read_error: self.read_error_probability,
                bit_flip: self.bit_flip_probability,
                ..FaultConfig::default()
            }
        })
    }
}

impl FaultArgs {
    /// This layer's values where set, `below`'s elsewhere.
    pub fn over(self, below: FaultArgs) -> FaultArgs {
        FaultArgs {
            read_error_probability: self.read_error_probability.or(below.read_error_probability),
            bit_flip_probability: self.bit_flip_probability.or(below.bit_flip_probability),
            fault_seed: self.fault_seed.or(below.fault_seed),
            forward_panic_at_step: self.forward_panic_at_step.or(below.forward_panic_at_step),
            scheduler_panic_at_step: self
                .scheduler_panic_at_step
                .or(below.scheduler_panic_at_step),
        }
    }

    /// `None` unless a probability is set above zero or a panic is planted; each
    /// probability must be within 0..=1.
    pub fn resolve(self) -> Result<Option<FaultInjection>, ConfigError> {
        let probability = |key, v: Option<f64>| match v.unwrap_or(0.0) {
            p if (0.0..=1.0).contains(&p) => Ok(p),
            p => Err(invalid(key, format!("{p} is not a probability (0 to 1)"))),
        };
        let read_error_probability = probability(
            "fault_injection.read_error_probability",
            self.read_error_probability,
        )?;
        let bit_flip_probability = probability(
            "fault_injection.bit_flip_probability",
            self.bit_flip_probability,
        )?;
        if read_error_probability == 0.0
            && bit_flip_probability == 0.0
            && self.forward_panic_at_step.is_none()
            && self.scheduler_panic_at_step.is_none()
        {
            return Ok(None);
        }
        Ok(Some(FaultInjection {
            read_error_probability,
            bit_flip_probability,
            fault_seed: self.fault_seed.unwrap_or(1),
            forward_panic_at_step: self.forward_panic_at_step,
            scheduler_panic_at_step: self.scheduler_panic_at_step,
        }))
    }
}
