//! What `run` and `serve` share: the engine options resolved into typed configurations
//! (with the defaults that make the card's `--model M --gpu-mem 24G` work as written), the
//! device's backend, and the model load.

use std::path::PathBuf;

use crate::backend::offload::OffloadBackend;
use crate::backend::CpuBackend;
use crate::cli::args::check_gbps;
use crate::cli::run_args::{budget_option, Device, EngineArgs};
use crate::engine::{Decoding, Engine, EngineConfig};
use crate::error::{Error, Result};
use crate::model::ModelFiles;
use crate::offload::runtime::OffloadConfig;
use crate::sparsity::{SparsityConfig, SparsityMode};
use crate::units::parse_size;

/// The engine options, checked and resolved before any load.
pub struct EngineSetup<'a> {
    pub args: &'a EngineArgs,
    pub device: Device,
    pub sparsity: SparsityConfig,
    pub decoding: Decoding,
    /// The offloading budget (--resident-mem on CPU, --gpu-mem on CUDA) and its option.
    pub offload: Option<(OffloadConfig, &'static str)>,
    /// The sampling temperature: the user's, else greedy where Sirius or offloading need it.
    pub temperature: f32,
}

/// Sampling temperature when none is given and nothing needs greedy decoding.
const DEFAULT_TEMPERATURE: f32 = 0.7;

impl<'a> EngineSetup<'a> {
    /// Resolves `args` (and the user's `temperature`, if given). An offloaded run (a budget
    /// given) defaults to Sirius with Griffin and greedy decoding; `--gpu-mem` implies
    /// `--device cuda`. Options given still decide.
    pub fn new(args: &'a EngineArgs, temperature: Option<f32>) -> Result<Self> {
        let o = &args.offload;
        let offloaded = o.resident_mem.is_some() || o.gpu_mem.is_some();
        let device = args.device.unwrap_or(match o.gpu_mem {
            Some(_) => Device::Cuda(0),
            None => Device::Cpu,
        });
        let mode = (args.sparsity.sparsity).unwrap_or(match offloaded {
            true => SparsityMode::Griffin,
            false => SparsityMode::None,
        });
        let sirius = args.sirius || (offloaded && mode == SparsityMode::Griffin);
        let temperature = temperature.unwrap_or(match sirius || offloaded {
            true => 0.0,
            false => DEFAULT_TEMPERATURE,
        });
        if offloaded && temperature != 0.0 {
            let option = match o.gpu_mem {
                Some(_) => "--gpu-mem",
                None => "--resident-mem",
            };
            return Err(Error::InvalidArgument(format!(
                "{option}: an offloaded run decodes greedily for now: leave out --temperature \
                 or give 0"
            )));
        }
        if args.ctx_size == Some(0) {
            return Err(Error::InvalidArgument("--ctx-size must be positive".into()));
        }
        let sparsity = args.sparsity.config_as(mode, args.sparsity.keep()?)?;
        let decoding = match (sirius, args.corrector.first_given()) {
            (true, _) => {
                let config = args.corrector.config()?;
                crate::engine::sirius::check_greedy(temperature)?;
                Decoding::Sirius(config)
            }
            (false, Some(option)) => {
                return Err(Error::InvalidArgument(format!(
                    "{option} sets up Sirius correction: add --sirius"
                )))
            }
            (false, None) if mode == SparsityMode::None => Decoding::Dense,
            (false, None) => Decoding::Sparse,
        };
        let mut setup = EngineSetup {
            args,
            device,
            sparsity,
            decoding,
            offload: None,
            temperature,
        };
        setup.offload = setup.offload_config()?;
        Ok(setup)
    }

    /// Why requests must decode greedily, when they must.
    pub fn greedy_only(&self) -> Option<&'static str> {
        match (self.decoding, &self.offload) {
            (Decoding::Sirius(_), _) => {
                Some("this server runs Sirius correction, which decodes greedily")
            }
            (_, Some(_)) => Some("this server runs an offloaded model, which decodes greedily"),
            _ => None,
        }
    }

    /// The engine's configuration.
    pub fn engine_config(&self) -> EngineConfig {
        EngineConfig {
            sparsity: self.sparsity.clone(),
            offload: self.offload.as_ref().map(|(o, _)| o.clone()),
            weights: self.args.model.weights(),
            kv_dtype: self.args.model.kv_dtype,
        }
    }

    /// Finds (or fetches) the model, checks --ctx-size against its config, and loads it on
    /// `backend`.
    pub fn load<B: OffloadBackend>(&self, backend: B) -> Result<Engine<B>> {
        let dir = self.model_dir()?;
        Engine::load(&dir, backend, &self.engine_config())
    }

    /// The model's directory or file (fetched first if it is a missing preset), its config
    /// checked against --ctx-size before the (long) load.
    pub fn model_dir(&self) -> Result<PathBuf> {
        let args = self.args;
        let dir = args.model.path()?;
        let max_pos = ModelFiles::read_config(&dir)?.max_position_embeddings;
        if let Some(ctx) = args.ctx_size.filter(|&c| c > max_pos) {
            return Err(Error::InvalidArgument(format!(
                "--ctx-size {ctx} is larger than the model's max_position_embeddings ({max_pos})"
            )));
        }
        Ok(dir)
    }

    /// Runs `job` with the backend of the device: the device comes first (before the prompt
    /// and the model), so a machine without a usable GPU fails at once with the probe's
    /// reason and how to run the same on the CPU.
    pub fn on_device<J: OnDevice>(&self, job: J) -> Result<J::Output> {
        match self.device {
            Device::Cpu => {
                let backend = CpuBackend::new(self.args.model.threads()?);
                let threads = backend.threads();
                job.run(backend, threads)
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(ordinal) => {
                let mut backend =
                    crate::backend::cuda::CudaBackend::new(ordinal).map_err(|e| match e {
                        Error::Cuda(m) if self.args.offload.gpu_mem.is_some() => {
                            Error::Cuda(format!("{m}; {}", self.cpu_alternative()))
                        }
                        other => other,
                    })?;
                if self.offload.is_some() {
                    // Only what the plan keeps resident goes to the GPU.
                    backend = backend.with_host_weights();
                }
                // No CPU compute threads: every op runs on the GPU.
                job.run(backend, 0)
            }
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => Err(match self.args.offload.gpu_mem {
                Some(_) => Error::Cuda(format!(
                    "this binary was built without CUDA support: rebuild with `cargo build \
                     --release --features cuda`, or {}",
                    self.cpu_alternative()
                )),
                None => crate::cli::run_args::built_without_cuda("run"),
            }),
        }
    }

    /// How to run an offloaded GPU run on the CPU instead.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    fn cpu_alternative(&self) -> String {
        // `auto` reads a GPU's free memory: the CPU needs a size.
        let size = (self.args.offload.gpu_mem.as_deref())
            .filter(|s| !s.eq_ignore_ascii_case("auto"))
            .unwrap_or("SIZE");
        let given = self.args.offload.gpu_mem.as_deref().unwrap_or(size);
        format!("run the same offloaded on the CPU with --resident-mem {size} in place of --gpu-mem {given}")
    }

    /// The offloading configuration: `--resident-mem` on the CPU, `--gpu-mem` on CUDA, each
    /// refused on the other device with the option to use instead; options that only mean
    /// something for an offloaded run are refused without one.
    fn offload_config(&self) -> Result<Option<(OffloadConfig, &'static str)>> {
        let o = &self.args.offload;
        let option = budget_option(self.device, o.resident_mem.is_some(), o.gpu_mem.is_some())?;
        let (Some(option), Some(size)) = (option, o.resident_mem.as_ref().or(o.gpu_mem.as_ref()))
        else {
            let needs = [
                ("--trace", o.trace.is_some()),
                ("--link-gbps", o.link_gbps.is_some()),
                ("--mem-gbps", o.mem_gbps.is_some()),
                ("--compute-gflops", o.compute_gflops.is_some()),
            ];
            if let Some((name, _)) = needs.iter().find(|(_, given)| *given) {
                return Err(Error::InvalidArgument(format!(
                    "{name} describes an offloaded run: add --resident-mem SIZE (CPU) or \
                     --gpu-mem SIZE (GPU)"
                )));
            }
            return Ok(None);
        };
        // `--gpu-mem auto`: the device's free memory, read once the backend exists.
        let auto_budget = size.eq_ignore_ascii_case("auto");
        let budget = match (auto_budget, option) {
            (true, "--gpu-mem") => 0,
            (true, _) => {
                return Err(Error::InvalidArgument(format!(
                    "{option} auto: an automatic budget reads a GPU's free memory (--gpu-mem \
                     auto); give {option} a size, e.g. 4G"
                )))
            }
            (false, _) => parse_size(size)
                .map_err(|e| Error::InvalidArgument(format!("{option} {size}: {e}")))?,
        };
        let s = &self.sparsity;
        // Sirius drafting with Griffin (the default), or the dense model (every token a full
        // pass).
        let sirius = matches!(self.decoding, Decoding::Sirius(_));
        let dense = !sirius && s.mode == SparsityMode::None;
        if !dense && (!sirius || s.mode != SparsityMode::Griffin || s.cats_thresholds.is_some()) {
            return Err(Error::InvalidArgument(format!(
                "{option} offloads Sirius with Griffin sparsity (the default) or the dense \
                 model (--sparsity none, without --sirius)"
            )));
        }
        // A temperature other than 0 was refused in `new`, before the decoding was chosen.
        check_gbps("--link-gbps", o.link_gbps)?;
        check_gbps("--mem-gbps", o.mem_gbps)?;
        check_gbps("--compute-gflops", o.compute_gflops)?;
        if option == "--resident-mem" && o.link_gbps.is_none() {
            for (name, given) in [
                ("--mem-gbps", o.mem_gbps),
                ("--compute-gflops", o.compute_gflops),
            ] {
                if given.is_some() {
                    tracing::warn!("{name} shapes the planner's prediction, which an uncapped CPU run does not make (its copies are memcpy): add --link-gbps G to predict");
                }
            }
        }
        let config = OffloadConfig {
            budget,
            auto_budget,
            link_gbps: o.link_gbps,
            mem_gbps: o.mem_gbps,
            compute_gflops: o.compute_gflops,
            trace: o.trace.is_some(),
            delay: None,
            griffin_down: s.griffin_down,
            bundle_cache: None,
        };
        Ok(Some((config, option)))
    }
}

/// Work that needs the device's backend (generic over it; `EngineSetup::on_device` picks).
pub trait OnDevice {
    type Output;
    /// `threads`: the CPU compute threads (0 on a GPU), for statistics.
    fn run<B: OffloadBackend>(self, backend: B, threads: usize) -> Result<Self::Output>;
}
