//! The `qwen2-edge` command line: parse, validate, call the library. Errors are one line
//! on stderr and a non-zero exit.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::{Args, Parser, Subcommand};

use qwen2_edge::backend::{BackendKind, KvCacheType, LmHead};
use qwen2_edge::bench::{self, BenchOptions};
use qwen2_edge::bundle::{Bundle, Verify};
use qwen2_edge::chat::ChatMessage;
use qwen2_edge::config::environment::{self, layered};
use qwen2_edge::engine::{Engine, EngineOptions};
use qwen2_edge::generate::{CancelHandle, GenerateOptions, Generation, Generator};
use qwen2_edge::guide::{Constraint, Guide};
use qwen2_edge::service::metrics;
use qwen2_edge::signature::TrustedKey;

/// `println!` that fails the command (quietly, when the reader went away: `info | head`)
/// instead of panicking when stdout cannot be written.
macro_rules! out {
    ($($arg:tt)*) => {
        std::io::Write::write_fmt(&mut std::io::stdout(), format_args!("{}\n", format_args!($($arg)*)))
            .map_err(crate::StdoutClosed)?
    };
}

mod args;
mod store_cmd;
use args::{verify, DraftArgs, ModelArgs, OrtArgs, SamplingArgs, SamplingFlags};

#[derive(Parser)]
#[command(
    name = "qwen2-edge",
    version,
    about = "Small Qwen2 models on edge boxes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a reply to one prompt, streamed to stdout.
    Generate(GenerateArgs),
    /// Interactive chat over stdin; the conversation is kept between turns.
    Chat(ChatArgs),
    /// Describe what a bundle holds.
    Info(InfoArgs),
    /// Time to first token, prefill and decode speed, peak memory.
    Bench(BenchArgs),
    /// Perplexity of a variant on a text file (the first --tokens tokens).
    Perplexity(PerplexityArgs),
    /// Run the daemon: prompts over a Unix socket and MQTT (config: systemd/qwen2-edge.toml).
    Serve(ServeArgs),
    /// Send one prompt to a running daemon and stream the answer to stdout.
    Ask(AskArgs),
    /// The model store: install a verified bundle version, roll back, list versions.
    Bundle(store_cmd::BundleArgs),
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    chat: ChatArgs,
    /// Send the prompt as is, without the chat template.
    #[arg(long)]
    raw: bool,
    /// Constrain the reply to JSON valid against the JSON schema in FILE.
    #[arg(long, value_name = "FILE", conflicts_with = "grammar")]
    json_schema: Option<PathBuf>,
    /// Constrain the reply to the grammar in FILE (llguidance's Lark dialect; a
    /// `start: /regex/` rule for a regular expression).
    #[arg(long, value_name = "FILE")]
    grammar: Option<PathBuf>,
    /// The prompt, or `-` to read it from standard input (long documents: an argument holds
    /// at most 128 KiB on Linux).
    prompt: String,
}

impl GenerateArgs {
    /// The constraint the flags ask for, read before the model loads (a bad file fails fast).
    fn constraint(&self) -> Result<Option<Constraint>> {
        if let Some(path) = &self.json_schema {
            return json_schema(path).map(Some);
        }
        self.grammar
            .as_ref()
            .map(|path| Ok(Constraint::Lark(read_text(path)?)))
            .transpose()
    }
}

/// A prompt argument: the text itself, or with `-` standard input's (UTF-8).
fn prompt_text(arg: &str) -> Result<String> {
    if arg != "-" {
        return Ok(arg.to_string());
    }
    let mut text = String::new();
    std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
        .map_err(|e| anyhow::anyhow!("cannot read the prompt from standard input: {e}"))?;
    Ok(text)
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))
}

/// The JSON schema in a file, as a constraint (compiled once the model is loaded).
fn json_schema(path: &Path) -> Result<Constraint> {
    let schema = serde_json::from_str(&read_text(path)?)
        .map_err(|e| anyhow::anyhow!("{}: invalid JSON: {e}", path.display()))?;
    Ok(Constraint::JsonSchema(schema))
}

// `chat`'s settings, which `generate` shares (a plain comment: clap would take a doc
// comment here for the help text).
#[derive(Args)]
struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    #[command(flatten)]
    draft: DraftArgs,
    /// System prompt (default: the chat template's own).
    #[arg(long)]
    system: Option<String>,
}

impl ChatArgs {
    /// Checks the flags that need no model (so they fail before a slow load), then loads it:
    /// the engine, the generation options and a generator.
    fn start(&self) -> Result<(Engine, GenerateOptions, Generator)> {
        self.sampling.flags.precheck()?;
        let engine = Engine::load(&self.model.engine_options()?)?;
        let mut options = self.sampling.flags.options(&engine)?;
        options.prompt_lookup = usize::from(self.sampling.prompt_lookup);
        let mut generator = engine.generator(self.sampling.context)?;
        let capacity = generator.context_len();
        if let Some(draft) = self.draft.load(&self.model, &engine, capacity)? {
            generator = generator.with_draft_model(draft);
        }
        Ok((engine, options, generator))
    }
}

#[derive(Args)]
struct InfoArgs {
    /// Model bundle directory.
    #[arg(long)]
    bundle: PathBuf,
    /// Skip the sha256 check of the bundle's files (sizes are still checked).
    #[arg(long)]
    no_verify: bool,
    /// Require a signature by this Ed25519 public key (`ed25519:…` or a .pub file); repeat for
    /// several. Without it a signature is shown, not checked.
    #[arg(long = "trusted-key", value_name = "KEY")]
    trusted_keys: Vec<String>,
    /// Also load the model on this backend and report what computes (for ort: the execution
    /// providers actually used).
    #[arg(long)]
    backend: Option<BackendKind>,
    /// Variant to load with --backend.
    #[arg(long, default_value = "fp32")]
    variant: String,
    /// Worker threads for --backend (0 = one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    #[command(flatten)]
    ort: OrtArgs,
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    #[arg(long, default_value_t = 128)]
    gen_tokens: usize,
    /// Prompt length of the prefill-only runs (0 = skip them).
    #[arg(long, default_value_t = 512)]
    long_prompt_tokens: usize,
    /// Runs of each kind; the report gives medians.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Also decode this many sequences together (comma-separated sizes, e.g. 1,4,16): the
    /// service's batched decoding, aggregate tokens/s.
    #[arg(long, value_delimiter = ',')]
    batch: Vec<usize>,
    /// Also time decode with and without the JSON schema in FILE (the same tokens either
    /// way), and the time per token mask.
    #[arg(long, value_name = "FILE")]
    json_schema: Option<PathBuf>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// The static (musl) build's allocator: see Cargo.toml's musl dependencies for why.
#[cfg(target_env = "musl")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    if let Some(why) = qwen2_edge::backend::native::kernels::missing_cpu_feature() {
        eprintln!("error: {why}");
        return ExitCode::from(2);
    }
    let cli = Cli::parse();
    // The daemon sets up its own logging from its config file.
    if !matches!(cli.command, Command::Serve(_)) {
        tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
            )
            .init();
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        // The reader stopped reading (`| head`): what it wanted it has.
        Err(e)
            if e.downcast_ref::<StdoutClosed>()
                .is_some_and(|c| c.0.kind() == std::io::ErrorKind::BrokenPipe) =>
        {
            ExitCode::SUCCESS
        }
        Err(e) => {
            let message = format!("{e:#}").replace('\n', " ");
            eprintln!("error: {message}");
            if e.downcast_ref::<UsageError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// Writing to stdout failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot write to stdout: {0}")]
struct StdoutClosed(std::io::Error);

/// A bad config or bad arguments found before anything started: exit code 2 (as for clap's
/// own usage errors), so that systemd can tell it from a runtime failure.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct UsageError(String);

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Generate(args) => generate(args),
        Command::Chat(args) => chat(args),
        Command::Info(args) => info(args),
        Command::Bench(args) => run_bench(args),
        Command::Perplexity(args) => run_perplexity(args),
        Command::Serve(args) => serve(args),
        Command::Ask(args) => ask(args),
        Command::Bundle(args) => store_cmd::run(args),
    }
}

fn generate(args: GenerateArgs) -> Result<()> {
    let constraint = args.constraint()?;
    let text = prompt_text(&args.prompt)?;
    let (engine, options, mut generator) = args.chat.start()?;
    let guide = constraint
        .map(|c| engine.guides()?.compile(&c))
        .transpose()?;
    let prompt = if args.raw {
        engine.raw_prompt(&text)?
    } else {
        let system = args.chat.system.as_deref();
        engine.chat_prompt(&Engine::single_turn(system, &text))?
    };
    let result = stream(&mut generator, &engine, &prompt, &options, guide)?;
    if args.chat.sampling.stats {
        print_stats(&result);
    }
    if result.constraint.as_ref().is_some_and(|c| !c.complete) {
        bail!(
            "the reply is incomplete ({}): it does not match the schema or grammar yet",
            result.finish_reason.as_str()
        );
    }
    Ok(())
}

fn chat(args: ChatArgs) -> Result<()> {
    let (engine, options, mut generator) = args.start()?;
    let mut messages = Vec::new();
    if let Some(system) = &args.system {
        messages.push(ChatMessage::system(system.as_str()));
    }
    let interactive = std::io::stdin().is_terminal();
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        if interactive {
            eprint!("> ");
        }
        let Some(line) = lines.next() else { break };
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        messages.push(ChatMessage::user(line));
        let prompt = engine.chat_prompt(&messages)?;
        let result = stream(&mut generator, &engine, &prompt, &options, None)?;
        if args.sampling.stats {
            print_stats(&result);
        }
        messages.push(ChatMessage::assistant(result.text));
    }
    Ok(())
}

/// Generates with text streamed to stdout as it comes, then a newline.
fn stream(
    generator: &mut Generator,
    engine: &Engine,
    prompt: &[u32],
    options: &GenerateOptions,
    guide: Option<Guide>,
) -> Result<Generation> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut write_error = None;
    let result = generator.generate_guided(
        &engine.tokenizer,
        prompt,
        options,
        guide,
        &CancelHandle::new(),
        &mut |piece| {
            if write_error.is_none() {
                if let Err(e) = out.write_all(piece.as_bytes()).and_then(|()| out.flush()) {
                    write_error = Some(e);
                }
            }
        },
    )?;
    if let Some(e) = write_error {
        bail!("cannot write to stdout: {e}");
    }
    writeln!(out)?;
    Ok(result)
}

fn print_stats(g: &Generation) {
    eprintln!(
        "[{}] prompt {} tokens ({} cached), completion {} tokens, ttft {:.1} ms, prefill {:.1} tok/s, decode {:.2} tok/s",
        g.finish_reason.as_str(),
        g.usage.prompt_tokens,
        g.usage.cached_prompt_tokens,
        g.usage.completion_tokens,
        g.timings.ttft.as_secs_f64() * 1000.0,
        g.timings.prefill_tokens_per_s,
        g.timings.decode_tokens_per_s
    );
    let s = &g.speculation;
    if s.steps > 0 {
        eprintln!(
            "[speculative] {} drafted, {} accepted ({:.0}%), {} forward passes for {} tokens; drafting {:.2} s, verifying {:.2} s",
            s.drafted,
            s.accepted,
            100.0 * s.accepted as f64 / s.drafted.max(1) as f64,
            s.steps,
            g.usage.completion_tokens.saturating_sub(1),
            s.drafting.as_secs_f64(),
            s.verifying.as_secs_f64()
        );
        if s.lookup_drafted > 0 && s.lookup_drafted < s.drafted {
            eprintln!(
                "[speculative] prompt lookup {} drafted, {} accepted; draft model {} drafted, {} accepted",
                s.lookup_drafted,
                s.lookup_accepted,
                s.drafted - s.lookup_drafted,
                s.accepted - s.lookup_accepted
            );
        }
    }
    if let Some(c) = &g.constraint {
        let times: Vec<f64> = c.mask_times.iter().map(|t| t.as_secs_f64() * 1e6).collect();
        let p = metrics::percentiles(&times, &[50.0, 99.0]).unwrap_or(vec![0.0; 2]);
        eprintln!(
            "[constraint] {}, {} masks, median {:.0} us, p99 {:.0} us",
            if c.complete { "complete" } else { "incomplete" },
            times.len(),
            p[0],
            p[1]
        );
    }
}

fn info(args: InfoArgs) -> Result<()> {
    let trusted = args
        .trusted_keys
        .iter()
        .map(|k| TrustedKey::parse(k))
        .collect::<Result<Vec<_>>>()?;
    if !trusted.is_empty() && args.no_verify {
        // A signature vouches for the files only through their hashes.
        bail!("trusted keys need the bundle's files hashed (no --no-verify)");
    }
    let bundle = Bundle::open_trusted(&args.bundle, verify(args.no_verify), &trusted)?;
    if !args.no_verify {
        for name in bundle.variant_names() {
            bundle.verify_variant(name)?;
        }
    }
    let m = &bundle.manifest;
    let c = &bundle.config;
    out!("bundle      {}", bundle.dir.display());
    out!("signature   {}", bundle.signature);
    out!(
        "format      {} v{} ({})",
        m.format,
        m.format_version,
        m.exporter.as_deref().unwrap_or("unknown exporter")
    );
    if let Some(source) = &m.source {
        out!(
            "source      {} {}",
            source.kind,
            source.name.as_deref().unwrap_or("")
        );
    }
    out!(
        "model       {} layers, hidden {}, heads {} (kv {}), head_dim {}, intermediate {}, vocab {}",
        c.num_hidden_layers,
        c.hidden_size,
        c.num_attention_heads,
        c.kv_heads(),
        c.head_dim(),
        c.intermediate_size,
        c.vocab_size
    );
    if let Some(moe) = c.moe() {
        let sparse = (0..c.num_hidden_layers)
            .filter(|&i| moe.is_sparse(i))
            .count();
        out!(
            "experts     {} per sparse layer ({sparse} of {}), {} per token, width {}; shared expert width {}",
            moe.experts,
            c.num_hidden_layers,
            moe.top_k,
            moe.intermediate,
            moe.shared_intermediate
        );
    }
    out!("context     {} positions", c.max_position_embeddings);
    if let Some(dca) = &c.dual_chunk_attention_config {
        out!(
            "dual chunks {} positions a chunk ({} local); native backend only, others run one chunk",
            dca.chunk_len(),
            dca.local_size
        );
    }
    print_kernel_tiers()?;
    out!("eos ids     {:?}", bundle.generation.eos_token_ids);
    out!("variants");
    for v in &m.variants {
        let size = m.files.get(&v.data).map_or(0, |f| f.size);
        out!(
            "  {:<10} precision {:<5} profile {:<9} {:>8.1} MiB  {} weights",
            v.name,
            v.precision,
            v.profile,
            size as f64 / (1024.0 * 1024.0),
            v.weights.len()
        );
    }
    if let Some(backend) = args.backend {
        let engine = Engine::load(&EngineOptions {
            bundle: args.bundle.clone(),
            verify: Verify::SizesOnly,
            backend,
            variant: args.variant.clone(),
            threads: args.threads,
            kernels: layered(None, environment::KERNELS, "auto".into())?,
            kv_cache: layered(None, environment::KV_CACHE, KvCacheType::F32)?,
            lm_head: LmHead::Bundle,
            prefix_cache_mib: 0,
            prefix_cache_file: None,
            no_mmap: false,
            ort: args.ort.options()?,
            trusted_keys: Vec::new(),
        })?;
        out!(
            "backend     {backend} on variant {}: {}",
            args.variant,
            engine.backend.device()
        );
    }
    Ok(())
}

/// The native kernel tiers this CPU runs, best first, each with the kernels it would take
/// from the portable set (none for a complete tier).
fn print_kernel_tiers() -> Result<()> {
    let tiers = qwen2_edge::backend::native::kernels::available();
    let names: Vec<&str> = tiers.iter().map(|k| k.name).collect();
    out!(
        "native      kernels {} on this CPU (available: {}; {}=generic forces the portable set)",
        names[0],
        names.join(", "),
        environment::KERNELS
    );
    for k in &tiers {
        let fallbacks = k.fallbacks();
        let fallbacks = match fallbacks.is_empty() {
            true => "none".to_string(),
            false => fallbacks.join(", "),
        };
        out!("  {:<12} generic fallbacks: {fallbacks}", k.name);
    }
    Ok(())
}

fn run_bench(args: BenchArgs) -> Result<()> {
    let report = bench::run(&BenchOptions {
        engine: args.model.engine_options()?,
        prompt_tokens: args.prompt_tokens,
        gen_tokens: args.gen_tokens,
        long_prompt_tokens: args.long_prompt_tokens,
        runs: args.runs,
        batches: args.batch,
        constraint: args.json_schema.as_deref().map(json_schema).transpose()?,
    })?;
    print_report(args.json, &report, report.to_text())
}

/// A report as one JSON object (`--json`) or as its text.
fn print_report(json: bool, report: &impl serde::Serialize, text: String) -> Result<()> {
    if json {
        out!("{}", serde_json::to_string(report)?);
    } else {
        out!("{text}");
    }
    Ok(())
}

#[derive(Args)]
struct ServeArgs {
    /// The service config (TOML; every key is documented in systemd/qwen2-edge.toml).
    #[arg(long)]
    config: PathBuf,
    /// Check the config (and the files it names) and exit: 0 when the service would start.
    #[arg(long)]
    check: bool,
}

fn serve(args: ServeArgs) -> Result<()> {
    use qwen2_edge::config::ServiceConfig;
    use qwen2_edge::service;
    let usage = |e: &dyn std::fmt::Display| UsageError(format!("{}: {e:#}", args.config.display()));
    let config = ServiceConfig::load(&args.config).map_err(|e| usage(&e))?;
    service::init_logging(&config.log);
    let prepared = service::prepare(config, &args.config).map_err(|e| usage(&format!("{e:#}")))?;
    if args.check {
        out!("{}: OK", args.config.display());
        return Ok(());
    }
    service::run(prepared)
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["socket", "mqtt"])))]
struct AskArgs {
    /// The service's Unix socket.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// The MQTT broker: mqtt://host:port or mqtts://host:port.
    #[arg(long)]
    mqtt: Option<String>,
    /// The service's MQTT topic prefix.
    #[arg(long, default_value = "qwen2-edge")]
    topic_prefix: String,
    /// MQTT user name.
    #[arg(long)]
    username: Option<String>,
    /// File holding the MQTT password (first line).
    #[arg(long)]
    password_file: Option<PathBuf>,
    /// CA certificate of the broker (mqtts://).
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// The service's status topic (default: <topic-prefix>/status).
    #[arg(long)]
    status_topic: Option<String>,
    /// MQTT: wait up to this many seconds for the service's retained status to say "online"
    /// before sending (fails if it does not). 0: send at once; a service that was online
    /// before gets the request from the broker when it comes back.
    #[arg(long, default_value_t = 0.0)]
    wait_online: f64,
    #[command(flatten)]
    sampling: SamplingFlags,
    /// System prompt (default: the chat template's own).
    #[arg(long)]
    system: Option<String>,
    /// Send the prompt as is, without the chat template.
    #[arg(long)]
    raw: bool,
    /// Which of the service's models answers (`[[model]] name`; default: its first).
    #[arg(long)]
    model: Option<String>,
    /// Seconds the service may spend on the request (default: its configured limit).
    #[arg(long)]
    timeout: Option<f64>,
    /// Print usage and timings to stderr when done.
    #[arg(long)]
    stats: bool,
    /// The prompt, or `-` to read it from standard input.
    prompt: String,
}

fn ask(args: AskArgs) -> Result<()> {
    use qwen2_edge::config::MqttSection;
    use qwen2_edge::service::client::{self, AskRequest, Target};
    let target = match (&args.socket, &args.mqtt) {
        (Some(path), _) => Target::Socket(path.clone()),
        (None, Some(url)) => {
            let section = MqttSection {
                url: url.clone(),
                topic_prefix: args.topic_prefix.clone(),
                username: args.username.clone().unwrap_or_default(),
                password_file: args.password_file.clone().unwrap_or_default(),
                ca_file: args.ca_file.clone().unwrap_or_default(),
                status_topic: args.status_topic.clone().unwrap_or_default(),
                ..MqttSection::default()
            };
            section
                .broker()
                .map_err(|e| UsageError(format!("--mqtt: {e}")))?;
            Target::Mqtt(Box::new(section))
        }
        (None, None) => bail!(UsageError("give --socket or --mqtt".into())),
    };
    let request = AskRequest {
        prompt: prompt_text(&args.prompt)?,
        raw: args.raw,
        system: args.system,
        model: args.model,
        max_tokens: args.sampling.max_tokens,
        sampling: args.sampling.overrides(),
        stop: args.sampling.stop,
        timeout_s: args.timeout,
    };
    if !(args.wait_online.is_finite() && args.wait_online >= 0.0) {
        bail!(UsageError(format!(
            "--wait-online must be a number of seconds ≥ 0, got {}",
            args.wait_online
        )));
    }
    let wait_online =
        (args.wait_online > 0.0).then(|| std::time::Duration::from_secs_f64(args.wait_online));
    client::ask(&target, &request, wait_online, args.stats)
}

#[derive(Args)]
struct PerplexityArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Text file to score.
    #[arg(long)]
    file: PathBuf,
    /// Tokens of the file to score (from its start).
    #[arg(long, default_value_t = 4096)]
    tokens: usize,
    /// Window length (0 = one window over all tokens).
    #[arg(long, default_value_t = 0)]
    context: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

fn run_perplexity(args: PerplexityArgs) -> Result<()> {
    let report = qwen2_edge::perplexity::run(&qwen2_edge::perplexity::PerplexityOptions {
        engine: args.model.engine_options()?,
        file: args.file,
        tokens: args.tokens,
        context: args.context,
    })?;
    print_report(args.json, &report, report.to_text())
}
