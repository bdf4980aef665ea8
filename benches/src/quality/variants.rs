//! The sparse policies under test: the base policy from the engine flags, and one more per
//! `--variant` of "key=value" overrides. A key names an engine flag (`max_blocks` is
//! `--max-blocks`), read by the one flag set [`EngineArgs`]; the two settings it has no flag
//! for, `head_top_blocks` and `dense_layers`, are read here.

use super::options::Options;
use anyhow::{anyhow, Context, Result};
use clap::{error::ErrorKind, Args, Command, FromArgMatches};
use csd_engine::EngineConfig;
use instinfer_runtime::kv::EngineArgs;

/// A sparse policy under test.
pub struct Variant {
    /// "base", or the --variant text.
    pub name: String,
    /// The engine settings of the policy.
    pub cfg: EngineConfig,
}

/// The base policy (the engine's defaults with the engine flags applied; recall measured
/// unless --no-recall), then one policy per --variant, in order.
pub fn variants(opts: &Options) -> Result<Vec<Variant>> {
    let base = opts.engine.apply(EngineConfig {
        measure_recall: !opts.no_recall,
        ..EngineConfig::default()
    });
    let mut out = vec![Variant {
        name: "base".into(),
        cfg: base,
    }];
    for spec in &opts.variant {
        out.push(parse_variant(spec, &base)?);
    }
    Ok(out)
}

/// Applies "key=value,key=value" overrides to `base`, from left to right.
pub fn parse_variant(spec: &str, base: &EngineConfig) -> Result<Variant> {
    let mut cfg = *base;
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (key, value) = item
            .split_once('=')
            .with_context(|| format!("variant {spec:?}: {item:?} is not key=value"))?;
        let key = key.trim().replace('-', "_");
        let value = value.trim();
        let bad = || format!("variant {spec:?}: bad value {value:?} for {key}");
        match key.as_str() {
            "head_top_blocks" => cfg.head_top_blocks = value.parse().with_context(bad)?,
            "dense_layers" => cfg.dense_layers = value.parse().with_context(bad)?,
            _ => {
                cfg = engine_flag(&key, value)
                    .map_err(|e| match e.kind() {
                        ErrorKind::UnknownArgument => {
                            anyhow!("variant {spec:?}: unknown setting {key:?}")
                        }
                        _ => anyhow!("{}: {}", bad(), flag_error(&e)),
                    })?
                    .apply(cfg)
            }
        }
    }
    Ok(Variant {
        name: spec.trim().to_string(),
        cfg,
    })
}

/// The engine flag named by `key` (underscores for dashes) set to `value`, alone.
fn engine_flag(key: &str, value: &str) -> Result<EngineArgs, clap::Error> {
    let cmd = Command::new("variant")
        .no_binary_name(true)
        .disable_help_flag(true)
        .disable_version_flag(true);
    let flag = format!("--{}={value}", key.replace('_', "-"));
    EngineArgs::from_arg_matches(&EngineArgs::augment_args(cmd).try_get_matches_from([flag])?)
}

/// Why clap refused a value: the value parser's own error where there is one.
fn flag_error(e: &clap::Error) -> String {
    std::error::Error::source(e).map_or_else(|| e.kind().to_string(), ToString::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;
    use csd_engine::PageScore;

    fn parse(spec: &str) -> Result<EngineConfig> {
        parse_variant(spec, &EngineConfig::default()).map(|v| v.cfg)
    }

    #[test]
    fn every_key_sets_its_engine_setting() {
        let c = parse(
            "target_mass=0.5, min_blocks=3,max_blocks=40,step_budget_blocks=960,sink_blocks=1,\
             recent_blocks=5,probe_blend=-0.25,score=quest,page_cache_bytes=4096,\
             estimate_skipped=false,head_top_blocks=7,quest_runs=4,dense_layers=2",
        )
        .unwrap();
        let want = EngineConfig {
            target_mass: 0.5,
            min_blocks: 3,
            max_blocks: 40,
            step_budget_blocks: 960,
            sink_blocks: 1,
            recent_blocks: 5,
            probe_blend: -0.25,
            score: PageScore::Quest,
            cache_bytes: 4096,
            estimate_skipped: false,
            head_top_blocks: 7,
            quest_runs: 4,
            dense_layers: 2,
            ..EngineConfig::default()
        };
        assert_eq!(c, want);
    }

    #[test]
    fn dashes_work_the_last_override_wins_and_the_rest_stays() {
        let base = EngineConfig {
            measure_recall: false,
            ..EngineConfig::default()
        };
        let v = parse_variant(" max-blocks=5,max_blocks=6,score=mean-key ", &base).unwrap();
        assert_eq!(v.name, "max-blocks=5,max_blocks=6,score=mean-key");
        assert_eq!(
            v.cfg,
            EngineConfig {
                max_blocks: 6,
                score: PageScore::MeanKey,
                ..base
            }
        );
        assert_eq!(parse("").unwrap(), EngineConfig::default());
    }

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        options: Options,
    }

    #[test]
    fn the_flags_set_the_base_policy_and_the_variants_build_on_it() {
        use clap::Parser;
        let cli = Cli::try_parse_from([
            "quality-bench",
            "--page-cache-bytes",
            "4096",
            "--target-mass",
            "0.9",
            "--min-blocks",
            "1",
            "--max-blocks",
            "8",
            "--step-budget-blocks",
            "100",
            "--sink-blocks",
            "3",
            "--recent-blocks",
            "4",
            "--probe-blend",
            "0.5",
            "--score",
            "mean-key",
            "--estimate-skipped",
            "false",
            "--no-recall",
            "--variant",
            "score=quest,dense_layers=1",
        ])
        .unwrap();
        let base = EngineConfig {
            cache_bytes: 4096,
            target_mass: 0.9,
            min_blocks: 1,
            max_blocks: 8,
            step_budget_blocks: 100,
            sink_blocks: 3,
            recent_blocks: 4,
            probe_blend: 0.5,
            score: PageScore::MeanKey,
            estimate_skipped: false,
            measure_recall: false,
            ..EngineConfig::default()
        };
        let v = variants(&cli.options).unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!((v[0].name.as_str(), v[0].cfg), ("base", base));
        assert_eq!(v[1].name, "score=quest,dense_layers=1");
        assert_eq!(
            v[1].cfg,
            EngineConfig {
                score: PageScore::Quest,
                dense_layers: 1,
                ..base
            }
        );
        let none = Cli::try_parse_from(["quality-bench"]).unwrap();
        let v = variants(&none.options).unwrap();
        assert_eq!(v.len(), 1);
        assert_eq!(
            v[0].cfg,
            EngineConfig {
                measure_recall: true,
                ..EngineConfig::default()
            }
        );
    }

    #[test]
    fn bad_specs_are_refused_with_the_key() {
        let msg = |spec: &str| format!("{:#}", parse(spec).unwrap_err());
        assert!(msg("max_blocks").contains("is not key=value"));
        assert!(msg("foo=1").contains("unknown setting \"foo\""));
        assert!(msg("help=1").contains("unknown setting \"help\""));
        assert!(msg("max_blocks=x").contains("bad value \"x\" for max_blocks"));
        assert!(msg("score=best").contains("bad value \"best\" for score"));
        assert!(msg("dense_layers=-1").contains("bad value \"-1\" for dense_layers"));
        assert!(msg("estimate_skipped=yes").contains("for estimate_skipped"));
    }
}
