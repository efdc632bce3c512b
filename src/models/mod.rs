//! Models on disk: the manifests compiled into the binary (`models/*.toml`), the model
//! directory and what is installed in it, names resolved to files, checksums verified, and
//! ([`fetch`]) downloads from a Python package index by its plain HTTP API.

pub mod fetch;
pub mod zip;

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::gguf::Gguf;

/// The model `ask`, `serve` and `chat` load when none is named.
pub const DEFAULT_MODEL: &str = "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf";
/// The small one: 135M parameters, 98 MB, fast; the tests that need speed use it.
pub const SMALL_MODEL: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// Where the Debian package keeps models.
pub const SYSTEM_MODEL_DIR: &str = "/var/lib/edgellm/models";

/// The manifests of `models/`, compiled in: (id, TOML).
const MANIFESTS: &[(&str, &str)] = &[
    (
        "qwen2.5-coder-0.5b-instruct",
        include_str!("../../models/qwen2.5-coder-0.5b-instruct.toml"),
    ),
    (
        "smollm2-135m-instruct",
        include_str!("../../models/smollm2-135m-instruct.toml"),
    ),
];

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("manifest {what}: {source}")]
    Manifest {
        what: String,
        source: Box<toml::de::Error>,
    },
    #[error("manifest {0}: [source] needs package, version, wheel, wheel_sha256 and path_in_wheel, or [[source.parts]] with them")]
    NoParts(String),
    #[error("no model manifest is named \"{name}\"; there are: {known}")]
    UnknownManifest { name: String, known: String },
    #[error("\"{name}\" names more than one model manifest: {matches}")]
    AmbiguousManifest { name: String, matches: String },
    #[error("no model \"{name}\" in {dir}; installed: {installed}. `edgellm models fetch NAME` downloads one")]
    NotInstalled {
        name: String,
        dir: String,
        installed: String,
    },
    #[error("\"{name}\" matches more than one model in {dir}: {matches}")]
    AmbiguousModel {
        name: String,
        dir: String,
        matches: String,
    },
    #[error("reading {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// One wheel of a model's source: the file in it that is the model, or one part of it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Part {
    pub package: String,
    pub version: String,
    pub wheel: String,
    pub wheel_sha256: String,
    pub path_in_wheel: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Source {
    registry: String,
    package: Option<String>,
    version: Option<String>,
    wheel: Option<String>,
    wheel_sha256: Option<String>,
    path_in_wheel: Option<String>,
    parts: Option<Vec<Part>>,
}

/// The file a manifest makes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSpec {
    pub name: String,
    pub bytes: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestToml {
    name: String,
    licence: String,
    architecture: String,
    source: Source,
    file: FileSpec,
}

/// A model manifest: where its wheels are and what they make.
#[derive(Debug, Clone)]
pub struct Manifest {
    /// The manifest's file stem, e.g. "smollm2-135m-instruct".
    pub id: String,
    pub name: String,
    pub licence: String,
    pub architecture: String,
    /// The registry named by the manifest ("pypi").
    pub registry: String,
    /// The wheels, in order; the model is their files concatenated.
    pub parts: Vec<Part>,
    pub file: FileSpec,
}

impl Manifest {
    /// Parses a manifest; `id` names it in errors and listings.
    pub fn parse(id: &str, text: &str) -> Result<Manifest, ModelError> {
        let m: ManifestToml = toml::from_str(text).map_err(|e| ModelError::Manifest {
            what: id.to_string(),
            source: Box::new(e),
        })?;
        let s = m.source;
        let parts = match (
            s.parts,
            s.package,
            s.version,
            s.wheel,
            s.wheel_sha256,
            s.path_in_wheel,
        ) {
            (Some(parts), None, None, None, None, None) if !parts.is_empty() => parts,
            (
                None,
                Some(package),
                Some(version),
                Some(wheel),
                Some(wheel_sha256),
                Some(path_in_wheel),
            ) => {
                vec![Part {
                    package,
                    version,
                    wheel,
                    wheel_sha256,
                    path_in_wheel,
                }]
            }
            _ => return Err(ModelError::NoParts(id.to_string())),
        };
        Ok(Manifest {
            id: id.to_string(),
            name: m.name,
            licence: m.licence,
            architecture: m.architecture,
            registry: s.registry,
            parts,
            file: m.file,
        })
    }

    /// Reads a manifest file.
    pub fn load(path: &Path) -> Result<Manifest, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let id = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        Manifest::parse(&id, &text)
    }
}

/// The manifests compiled into the binary.
pub fn manifests() -> Vec<Manifest> {
    MANIFESTS
        .iter()
        // The compiled-in manifests are parsed by a test; one that did not parse is left out.
        .filter_map(|(id, text)| Manifest::parse(id, text).ok())
        .collect()
}

/// The compiled-in manifest `name` names: its id, its model name, or its file name (any
/// case), or the one id that starts with it.
pub fn find_manifest(name: &str) -> Result<Manifest, ModelError> {
    let all = manifests();
    let lower = name.to_ascii_lowercase();
    let stem = lower.strip_suffix(".gguf").unwrap_or(&lower);
    if let Some(m) = all.iter().find(|m| {
        m.id == lower
            || m.name.to_ascii_lowercase() == lower
            || m.file.name.to_ascii_lowercase() == lower
            || m.file.name.to_ascii_lowercase().strip_suffix(".gguf") == Some(stem)
    }) {
        return Ok(m.clone());
    }
    let found: Vec<&Manifest> = all.iter().filter(|m| m.id.starts_with(&lower)).collect();
    match found.as_slice() {
        [one] => Ok((*one).clone()),
        [] => Err(ModelError::UnknownManifest {
            name: name.to_string(),
            known: all
                .iter()
                .map(|m| m.id.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        }),
        many => Err(ModelError::AmbiguousManifest {
            name: name.to_string(),
            matches: many
                .iter()
                .map(|m| m.id.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

/// The model directory: `$EDGELLM_MODEL_DIR`, else `models/cache` of the checkout the binary
/// was built in (`target/{release,debug}/edgellm`), else [`SYSTEM_MODEL_DIR`].
pub fn default_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("EDGELLM_MODEL_DIR") {
        return PathBuf::from(d);
    }
    if let Some(root) = checkout_root() {
        return root.join("models/cache");
    }
    PathBuf::from(SYSTEM_MODEL_DIR)
}

/// The source checkout the running binary was built in, if it was.
pub fn checkout_root() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let root = exe.parent()?.parent()?.parent()?;
    (root.join("Cargo.toml").is_file() && root.join("models").is_dir()).then(|| root.to_path_buf())
}

/// One model found in the model directory.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Installed {
    /// The file (or ONNX folder) name.
    pub name: String,
    pub path: PathBuf,
    pub bytes: u64,
    /// "Q4_K_M", "Q4_1", … (llama.cpp's file type), "onnx" for an ONNX folder.
    pub kind: String,
    /// `general.architecture`, or the ONNX folder's model type.
    pub architecture: String,
    /// The compiled-in manifest that makes this file, when one does.
    pub manifest: Option<String>,
    /// Why the file could not be read as a model, when it could not.
    pub error: Option<String>,
}

/// The models in `dir`: every `*.gguf` file and every ONNX model folder, by name.
pub fn installed(dir: &Path) -> Result<Vec<Installed>, ModelError> {
    let io = |source| ModelError::Io {
        path: dir.display().to_string(),
        source,
    };
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(e)),
    };
    let manifests = manifests();
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io)?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let onnx = path.is_dir()
            && (path.join("genai_config.json").is_file() || path.join(NPU_CONFIG).is_file());
        let gguf = path.is_file() && name.to_ascii_lowercase().ends_with(".gguf");
        if onnx || gguf {
            out.push(describe(&path, &manifests));
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// A model as [`installed`] lists it: a GGUF file (size, type, architecture, the manifest among
/// `manifests` that makes it, or why it does not parse), or an ONNX model folder.
pub fn describe(path: &Path, manifests: &[Manifest]) -> Installed {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if path.is_dir() {
        return Installed {
            name,
            path: path.to_path_buf(),
            bytes: dir_bytes(path),
            kind: "onnx".into(),
            architecture: onnx_model_type(path).unwrap_or_default(),
            manifest: None,
            error: None,
        };
    }
    let bytes = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    let manifest = manifests
        .iter()
        .find(|m| m.file.name == name)
        .map(|m| m.id.clone());
    let (kind, architecture, error) = match Gguf::open(path) {
        Ok(g) => (
            file_type(&g)
                .map(str::to_string)
                .unwrap_or_else(|| main_tensor_type(&g)),
            g.get_str("general.architecture").unwrap_or("").to_string(),
            None,
        ),
        Err(e) => (String::new(), String::new(), Some(e.to_string())),
    };
    Installed {
        name,
        path: path.to_path_buf(),
        bytes,
        kind,
        architecture,
        manifest,
        error,
    }
}

/// The bytes of the files in a folder (an ONNX model's).
pub fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// The file `edgellm export-onnx --target qnn` describes its folder with.
const NPU_CONFIG: &str = "edgellm_npu.json";

/// genai's `model.type`, or an NPU export's architecture and target ("llama, qnn").
fn onnx_model_type(dir: &Path) -> Option<String> {
    if let Ok(text) = std::fs::read_to_string(dir.join(NPU_CONFIG)) {
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        let arch = v.get("architecture")?.as_str()?;
        let target = v.get("target")?.as_str()?;
        return Some(format!("{arch}, {target}"));
    }
    let text = std::fs::read_to_string(dir.join("genai_config.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.pointer("/model/type")?.as_str().map(str::to_string)
}

/// The type holding most of a file's tensor bytes, for a GGUF without `general.file_type`.
fn main_tensor_type(g: &Gguf) -> String {
    let mut by_type: Vec<(String, u64)> = Vec::new();
    for t in &g.tensors {
        let name = format!("{:?}", t.ty).to_uppercase();
        match by_type.iter_mut().find(|(n, _)| *n == name) {
            Some((_, b)) => *b += t.n_bytes,
            None => by_type.push((name, t.n_bytes)),
        }
    }
    by_type
        .into_iter()
        .max_by_key(|(_, b)| *b)
        .map(|(n, _)| n)
        .unwrap_or_default()
}

/// A GGUF's `general.file_type` by llama.cpp's name for it ("Q4_K_M"), when it has one.
pub fn file_type(g: &Gguf) -> Option<&'static str> {
    g.get("general.file_type")
        .and_then(|t| t.as_u64())
        .and_then(file_type_name)
}

/// llama.cpp's `general.file_type` values.
pub fn file_type_name(t: u64) -> Option<&'static str> {
    Some(match t {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        32 => "BF16",
        _ => return None,
    })
}

/// The model `name` names in `dir`: a file or folder of that name, or with `.gguf` added, or
/// the file of the compiled-in manifest it names, or the one installed model whose name starts
/// with it (any case).
pub fn resolve(name: &str, dir: &Path) -> Result<PathBuf, ModelError> {
    for candidate in [name.to_string(), format!("{name}.gguf")] {
        let p = dir.join(&candidate);
        if p.exists() {
            return Ok(p);
        }
    }
    if let Ok(m) = find_manifest(name) {
        let p = dir.join(&m.file.name);
        if p.is_file() {
            return Ok(p);
        }
    }
    let all = installed(dir)?;
    let lower = name.to_ascii_lowercase();
    let found: Vec<&Installed> = all
        .iter()
        .filter(|i| i.name.to_ascii_lowercase().starts_with(&lower))
        .collect();
    match found.as_slice() {
        [one] => Ok(one.path.clone()),
        [] => Err(ModelError::NotInstalled {
            name: name.to_string(),
            dir: dir.display().to_string(),
            installed: if all.is_empty() {
                "none".into()
            } else {
                all.iter()
                    .map(|i| i.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        }),
        many => Err(ModelError::AmbiguousModel {
            name: name.to_string(),
            dir: dir.display().to_string(),
            matches: many
                .iter()
                .map(|i| i.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

/// SHA-256 of a file, as lowercase hex; `progress` is called with the bytes read so far.
pub fn sha256_file(path: &Path, mut progress: impl FnMut(u64)) -> std::io::Result<String> {
    let mut f = File::open(path)?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
        done += n as u64;
        progress(done);
    }
    Ok(hex(ctx.finish().as_ref()))
}

/// SHA-256 of bytes in memory, as lowercase hex (a calibration text's, recorded in what it made).
pub fn sha256_bytes(bytes: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

/// Lowercase hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_compiled_in_manifests_parse_and_resolve_by_any_of_their_names() {
        assert_eq!(manifests().len(), MANIFESTS.len());
        for (id, text) in MANIFESTS {
            let m = Manifest::parse(id, text).expect(id);
            assert!(!m.parts.is_empty());
            assert_eq!(m.file.sha256.len(), 64);
            for key in [m.id.clone(), m.name.to_uppercase(), m.file.name.clone()] {
                assert_eq!(find_manifest(&key).expect(&key).id, m.id);
            }
        }
        assert_eq!(find_manifest("smol").unwrap().id, "smollm2-135m-instruct");
        assert_eq!(find_manifest("qwen").unwrap().parts.len(), 6);
        let e = find_manifest("llama").unwrap_err().to_string();
        assert!(
            e.contains("smollm2-135m-instruct") && e.contains("qwen2.5"),
            "{e}"
        );
    }

    #[test]
    fn a_manifest_with_half_a_source_is_refused_by_name() {
        let text = "name = \"x\"\nlicence = \"MIT\"\narchitecture = \"llama\"\n[source]\nregistry = \"pypi\"\npackage = \"x\"\n[file]\nname = \"x.gguf\"\nbytes = 1\nsha256 = \"00\"\n";
        let e = Manifest::parse("half", text).unwrap_err().to_string();
        assert!(e.contains("half") && e.contains("wheel_sha256"), "{e}");
        let e = Manifest::parse("typo", &text.replace("bytes", "byte"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("typo") && e.contains("byte"), "{e}");
    }

    #[test]
    fn names_resolve_in_a_directory() {
        let dir = std::env::temp_dir().join(format!("edgellm-resolve-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for f in [
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            "SmolLM2-135M-Instruct.Q4_0.gguf",
            "mine.gguf",
        ] {
            std::fs::write(dir.join(f), b"not a gguf").unwrap();
        }
        assert_eq!(resolve("mine", &dir).unwrap(), dir.join("mine.gguf"));
        assert_eq!(resolve("mine.gguf", &dir).unwrap(), dir.join("mine.gguf"));
        // The manifest's id names its file.
        assert_eq!(
            resolve("smollm2-135m-instruct", &dir).unwrap(),
            dir.join("SmolLM2-135M-Instruct.Q4_1.gguf")
        );
        // Else the one installed model whose name starts with it, in any case.
        assert_eq!(
            resolve("smollm2-135m-instruct.q4_0", &dir).unwrap(),
            dir.join("SmolLM2-135M-Instruct.Q4_0.gguf")
        );
        let e = resolve("smollm2-135m-instruct.Q", &dir)
            .unwrap_err()
            .to_string();
        assert!(e.contains("more than one"), "{e}");
        let e = resolve("qwen", &dir).unwrap_err().to_string();
        assert!(e.contains("mine.gguf") && e.contains("models fetch"), "{e}");
        // A file that is not a GGUF is listed with the reason.
        let listed = installed(&dir).unwrap();
        assert_eq!(listed.len(), 3);
        assert!(listed.iter().all(|i| i.error.is_some()));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
