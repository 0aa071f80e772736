//! `bench --sirius`: the sweep of `engine::bench_sirius` over every point of the swept options
//! (threads, keep, offloading budget; the windows are rows of each point), as a markdown
//! table, CSV, JSON (with the commit and the machine) and an SVG plot.

use std::path::{Path, PathBuf};

use crate::backend::offload::OffloadBackend;
use crate::backend::CpuBackend;
use crate::cli::args::{check_gbps, default_period};
use crate::cli::bench::{check_threads_for_device, BenchArgs};
use crate::cli::bench_plot::{plot, PlotAxis};
use crate::cli::bench_report::{commit_id, csv, machine, markdown, SweepReport};
use crate::cli::input::read_text;
use crate::cli::output::{check_output_dir, print_stdout, write_json};
use crate::cli::run_args::{budget_option, Device};
use crate::engine::bench_sirius::{sweep, SweepLane, SweepPoint, SweepRow, SweepRuns};
use crate::engine::{Decoding, Engine, EngineConfig};
use crate::error::{Error, Result};
use crate::offload::runtime::OffloadConfig;
use crate::progress::progress_bar;
use crate::sirius::{Period, SiriusConfig};
use crate::sparsity::{SparsityConfig, SparsityMode};
use crate::units::{format_bytes, parse_size};

/// The prompt without `--prompt-file`: plain expository text, which a model continues in
/// kind (Sirius's acceptance depends on the text; random ids would measure nothing real).
const DEFAULT_PROMPT: &str = "The water cycle describes how water moves between the \
oceans, the air and the land. Heat from the sun evaporates water from the surface of seas and \
lakes; the vapour rises, cools and condenses into the droplets that form clouds. When the \
droplets grow heavy enough they fall as rain or snow. Some of that water runs off into rivers \
that carry it back to the sea, some soaks into the ground and feeds springs and wells, and \
some is taken up by plants, which release it again through their leaves. Over a year,";

/// The options as typed settings, checked before the (slow) model load.
struct SweepPlan {
    threads: Vec<usize>,
    keeps: Vec<f32>,
    /// Offloading budgets in bytes (empty: the model in memory).
    budgets: Vec<u64>,
    /// The offloading settings every budget shares (its `budget` replaced per point).
    offload: OffloadConfig,
    /// The drafts' sparsity (its `keep` replaced per point).
    sparsity: SparsityConfig,
    periods: Vec<Period>,
    base: SiriusConfig,
    runs: SweepRuns,
    axis: PlotAxis,
}

impl SweepPlan {
    fn new(args: &BenchArgs) -> Result<SweepPlan> {
        for (option, path) in [("--json", &args.json), ("--csv", &args.csv)] {
            check_output_dir(option, path.as_deref())?;
        }
        check_output_dir("--plot", args.plot.as_deref())?;
        let mut drafts = args.sparsity.clone();
        if drafts.mode() == SparsityMode::None {
            // Sirius drafts with a sparse model: Griffin unless told otherwise.
            drafts.sparsity = Some(SparsityMode::Griffin);
        }
        let keeps = drafts.keep.clone();
        let first = keeps
            .first()
            .ok_or_else(|| Error::InvalidArgument("--keep needs a value".into()))?;
        let sparsity = drafts.config_at(*first)?;
        for &keep in &keeps[1..] {
            drafts.config_at(keep)?;
        }
        let base = SiriusConfig {
            threshold: args.threshold.unwrap_or(SiriusConfig::default().threshold),
            width: args.width,
            ..SiriusConfig::default()
        };
        let periods = match args.period.is_empty() {
            true => vec![default_period(base.width)],
            false => args.period.clone(),
        };
        for period in &periods {
            period.apply(base).validate()?;
        }
        if args.gen < 2 {
            return Err(Error::InvalidArgument(
                "bench --sirius needs --gen 2 or more (the first token comes from the prompt)"
                    .into(),
            ));
        }
        let budgets = budgets(args, &sparsity)?;
        let threads = resolve_threads(args)?;
        distinct("--keep", &keeps, f32::to_string)?;
        distinct("--threads", &threads, usize::to_string)?;
        distinct("--resident-mem/--gpu-mem", &budgets, |b| format_bytes(*b))?;
        let axis = match args.plot {
            Some(_) => PlotAxis::choose(threads.len(), keeps.len(), budgets.len())?,
            None => PlotAxis::Period,
        };
        Ok(SweepPlan {
            offload: OffloadConfig {
                budget: 0,
                auto_budget: false,
                link_gbps: args.link_gbps,
                mem_gbps: args.mem_gbps,
                compute_gflops: args.compute_gflops,
                trace: false,
                delay: None,
                griffin_down: sparsity.griffin_down,
                bundle_cache: None,
            },
            threads,
            keeps,
            budgets,
            sparsity,
            periods,
            base,
            runs: SweepRuns {
                gen: args.gen,
                reps: args.reps,
            },
            axis,
        })
    }

    /// Runs of the whole sweep (the warm-up rounds included), for the progress bar.
    fn run_count(&self) -> usize {
        let lanes = self.periods.len() + if self.budgets.is_empty() { 2 } else { 1 };
        let points = self.threads.len() * self.keeps.len() * self.budgets.len().max(1);
        points * lanes * (self.runs.reps + 1)
    }
}

/// The thread counts as the CPU backend will run them (0: one per core); on a GPU none.
fn resolve_threads(args: &BenchArgs) -> Result<Vec<usize>> {
    check_threads_for_device(args)?;
    args.model.check_threads()?;
    if args.device() != Device::Cpu {
        return Ok(vec![0]);
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let resolved = args.model.threads.iter();
    Ok(resolved.map(|&t| if t == 0 { cores } else { t }).collect())
}

/// A swept list names each value once (`--threads 0` is one per core: the same as the
/// core count).
fn distinct<T: PartialEq>(option: &str, values: &[T], show: impl Fn(&T) -> String) -> Result<()> {
    for (i, v) in values.iter().enumerate() {
        if values[..i].contains(v) {
            return Err(Error::InvalidArgument(format!(
                "{option} lists {} twice: give each value once{}",
                show(v),
                match option {
                    "--threads" => " (0 is one per core)",
                    _ => "",
                }
            )));
        }
    }
    Ok(())
}

/// `--resident-mem` (CPU) or `--gpu-mem` (CUDA) as bytes, and the options only an offloaded
/// sweep takes.
fn budgets(args: &BenchArgs, sparsity: &SparsityConfig) -> Result<Vec<u64>> {
    let (resident, gpu) = (&args.resident_mem, &args.gpu_mem);
    let Some(option) = budget_option(args.device(), !resident.is_empty(), !gpu.is_empty())? else {
        for (option, given) in [
            ("--link-gbps", args.link_gbps),
            ("--mem-gbps", args.mem_gbps),
            ("--compute-gflops", args.compute_gflops),
        ] {
            if given.is_some() {
                return Err(Error::InvalidArgument(format!(
                    "{option} describes an offloaded run: add --resident-mem SIZE (CPU) or \
                     --gpu-mem SIZE (--device cuda)"
                )));
            }
        }
        return Ok(Vec::new());
    };
    let sizes = if resident.is_empty() { gpu } else { resident };
    if sparsity.mode != SparsityMode::Griffin || sparsity.cats_thresholds.is_some() {
        return Err(Error::InvalidArgument(format!(
            "{option}: an offloaded sweep drafts with Griffin (--sparsity griffin, the default)"
        )));
    }
    check_gbps("--link-gbps", args.link_gbps)?;
    check_gbps("--mem-gbps", args.mem_gbps)?;
    check_gbps("--compute-gflops", args.compute_gflops)?;
    sizes
        .iter()
        .map(|size| {
            parse_size(size).map_err(|e| Error::InvalidArgument(format!("{option} {size}: {e}")))
        })
        .collect()
}

pub fn bench_sirius(args: &BenchArgs) -> Result<()> {
    let plan = SweepPlan::new(args)?;
    let text = match &args.prompt_file {
        Some(path) => read_text("--prompt-file", path)?,
        None => DEFAULT_PROMPT.to_string(),
    };
    let dir = args.model.path()?;
    let (measured, outcome) = match args.device() {
        Device::Cpu => measure(args, &plan, &dir, &text, &|threads, _| {
            Ok(CpuBackend::new(threads))
        }),
        #[cfg(feature = "cuda")]
        Device::Cuda(ordinal) => measure(args, &plan, &dir, &text, &|_, offloaded| {
            let backend = crate::backend::cuda::CudaBackend::new(ordinal)?;
            // Offloaded: only what the plan keeps resident goes to the GPU.
            Ok(if offloaded {
                backend.with_host_weights()
            } else {
                backend
            })
        }),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => return Err(crate::cli::run_args::built_without_cuda("bench")),
    };
    if measured.rows.is_empty() {
        // Nothing measured: the error alone.
        return outcome;
    }
    let report = SweepReport {
        model: args.model.model.clone(),
        commit: commit_id(),
        machine: machine(),
        backend: measured.backend,
        dtype: measured.dtype,
        kv_dtype: args.model.kv_dtype.to_string(),
        sparsity: plan.sparsity.mode,
        threads: plan.threads.clone(),
        keeps: plan.keeps.clone(),
        budgets: plan.budgets.clone(),
        link_gbps: plan.offload.link_gbps,
        mem_gbps: plan.offload.mem_gbps,
        compute_gflops: plan.offload.compute_gflops,
        threshold: plan.base.threshold,
        width: plan.base.width,
        prompt_tokens: measured.prompt_tokens,
        rows: measured.rows,
    };
    if outcome.is_err() {
        print_stdout(
            "The sweep stopped early: the rows below were measured before the error.\n\n",
        )?;
    }
    print_stdout(&markdown(&report))?;
    if let Some(path) = &args.json {
        write_json(path, &report)?;
    }
    if let Some(path) = &args.csv {
        write_file(path, &csv(&report))?;
    }
    if let Some(path) = &args.plot {
        write_file(path, &plot(&report, plan.axis)?)?;
    }
    outcome
}

/// What the sweep measured, with what the report says of the engines.
#[derive(Default)]
struct Measured {
    rows: Vec<SweepRow>,
    prompt_tokens: usize,
    backend: String,
    dtype: String,
}

/// A backend with `threads` compute threads (ignored on a GPU), for an offloaded engine or
/// not.
type MakeBackend<'a, B> = dyn Fn(usize, bool) -> Result<B> + 'a;

/// Every point of the sweep, one after the other; within a point, the rows alternate. The
/// rows measured before an error are kept beside it.
fn measure<B: OffloadBackend>(
    args: &BenchArgs,
    plan: &SweepPlan,
    dir: &Path,
    text: &str,
    make: &MakeBackend<'_, B>,
) -> (Measured, Result<()>) {
    let bar = progress_bar(plan.run_count() as u64, "bench");
    let mut measured = Measured::default();
    let outcome = plan.threads.iter().try_for_each(|&threads| {
        let mut point = Point {
            args,
            plan,
            dir,
            text,
            make,
            threads,
            on_run: &mut || bar.inc(1),
        };
        match plan.budgets.is_empty() {
            true => point.in_memory(&mut measured),
            false => point.offloaded(&mut measured),
        }
    });
    bar.finish_and_clear();
    (measured, outcome)
}

/// The sweep at one thread count.
struct Point<'a, B: OffloadBackend> {
    args: &'a BenchArgs,
    plan: &'a SweepPlan,
    dir: &'a Path,
    text: &'a str,
    make: &'a MakeBackend<'a, B>,
    threads: usize,
    on_run: &'a mut dyn FnMut(),
}

impl<B: OffloadBackend> Point<'_, B> {
    /// Loads an engine with `sparsity`, offloaded within `budget` or in memory.
    fn load(&self, sparsity: SparsityConfig, budget: Option<u64>) -> Result<Engine<B>> {
        let backend = (self.make)(self.threads, budget.is_some())?;
        let config = EngineConfig {
            sparsity,
            offload: budget.map(|budget| OffloadConfig {
                budget,
                ..self.plan.offload.clone()
            }),
            weights: self.args.model.weights(),
            kv_dtype: self.args.model.kv_dtype,
        };
        Engine::load(self.dir, backend, &config)
    }

    /// The dense model (offloaded: the full row), its compact down format as the drafts'.
    fn dense(&self) -> SparsityConfig {
        SparsityConfig {
            griffin_down: self.plan.sparsity.griffin_down,
            ..SparsityConfig::dense()
        }
    }

    fn sparsity(&self, keep: f32) -> SparsityConfig {
        SparsityConfig {
            keep,
            ..self.plan.sparsity.clone()
        }
    }

    fn sirius_lanes(&self, engine: usize) -> Vec<SweepLane> {
        let base = self.plan.base;
        let lane = |p: &Period| SweepLane {
            engine,
            decoding: Decoding::Sirius(p.apply(base)),
        };
        self.plan.periods.iter().map(lane).collect()
    }

    /// In memory: one engine runs the full model, the sparse model and Sirius at each keep.
    fn in_memory(&mut self, m: &mut Measured) -> Result<()> {
        let keeps = &self.plan.keeps;
        let first = keeps.first().copied().unwrap_or(self.plan.sparsity.keep);
        let mut engine = self.load(self.sparsity(first), None)?;
        let prompt = self.describe(&engine, m)?;
        for (i, &keep) in keeps.iter().enumerate() {
            if i > 0 {
                engine.set_sparsity(&self.sparsity(keep))?;
            }
            let mut lanes = vec![
                SweepLane {
                    engine: 0,
                    decoding: Decoding::Dense,
                },
                SweepLane {
                    engine: 0,
                    decoding: Decoding::Sparse,
                },
            ];
            lanes.extend(self.sirius_lanes(0));
            let engines = std::slice::from_mut(&mut engine);
            self.sweep(engines, &lanes, &prompt, keep, None, m)?;
        }
        Ok(())
    }

    /// Offloaded: per budget, the dense model offloaded (the full row) beside Sirius drafting
    /// with Griffin's offloaded runtime at each keep (no sparse row: an offloaded Griffin
    /// engine decodes with Sirius). The engines take turns with the budget.
    fn offloaded(&mut self, m: &mut Measured) -> Result<()> {
        for &budget in &self.plan.budgets {
            let dense = self.load(self.dense(), Some(budget))?;
            let prompt = self.describe(&dense, m)?;
            let mut engines = vec![dense];
            for &keep in &self.plan.keeps {
                engines.truncate(1);
                engines.push(self.load(self.sparsity(keep), Some(budget))?);
                let mut lanes = vec![SweepLane {
                    engine: 0,
                    decoding: Decoding::Dense,
                }];
                lanes.extend(self.sirius_lanes(1));
                self.sweep(&mut engines, &lanes, &prompt, keep, Some(budget), m)?;
            }
        }
        Ok(())
    }

    /// One point's rows, added to `m`.
    fn sweep(
        &mut self,
        engines: &mut [Engine<B>],
        lanes: &[SweepLane],
        prompt: &[u32],
        keep: f32,
        budget_bytes: Option<u64>,
        m: &mut Measured,
    ) -> Result<()> {
        let point = SweepPoint {
            threads: self.threads,
            keep,
            budget_bytes,
        };
        let rows = sweep(engines, lanes, prompt, self.plan.runs, point, self.on_run)?;
        m.rows.extend(rows);
        Ok(())
    }

    /// The prompt's ids, and what the report says of the engine (the first one loaded).
    fn describe(&self, engine: &Engine<B>, m: &mut Measured) -> Result<Vec<u32>> {
        let prompt = engine.encode(self.text, None)?;
        if m.backend.is_empty() {
            m.backend = engine.model.backend_description();
            if self.plan.threads.len() > 1 {
                // The first point's count is not the sweep's: the rows say each one.
                m.backend = m
                    .backend
                    .replace(&format!("{} threads", self.threads), "threads swept");
            }
            m.dtype = engine.model.dtype.to_string();
            m.prompt_tokens = prompt.len();
        }
        Ok(prompt)
    }
}

fn write_file(path: &PathBuf, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(|source| Error::Write {
        path: path.clone(),
        source,
    })
}
