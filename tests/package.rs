//! The Debian packages `scripts/package.sh` builds: their contents, lintian, `dpkg -i`, `-r`
//! and `--purge` on this machine, and the amd64 one installed into a Debian bookworm root
//! booted under real systemd with `systemd-nspawn`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::common::temp_dir;
use crate::qwen::qwen_model;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn run(cmd: &mut Command) -> Output {
    let shown = format!("{cmd:?}");
    cmd.output()
        .unwrap_or_else(|e| panic!("{shown}: {e} (scripts/setup.sh --test installs it)"))
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The amd64 package, built once per test run by `scripts/package.sh amd64` from the binary
/// under test.
fn amd64_deb() -> PathBuf {
    static DEB: OnceLock<PathBuf> = OnceLock::new();
    DEB.get_or_init(|| {
        // The binary these tests run, packaged as it is (no second build).
        let o = run(Command::new("bash")
            .arg(root().join("scripts/package.sh"))
            .arg("amd64")
            .env("EDGELLM_BIN", env!("CARGO_BIN_EXE_edgellm")));
        assert!(o.status.success(), "package.sh: {}", text(&o));
        let path = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        let version = env!("CARGO_PKG_VERSION");
        assert_eq!(name, Some(format!("edgellm_{version}-1_amd64.deb")));
        path
    })
    .clone()
}

/// dpkg on this machine is one at a time: the install test and nothing else uses it.
pub(crate) static DPKG: Mutex<()> = Mutex::new(());

#[test]
fn the_packages_hold_what_they_should_and_lintian_finds_no_error() {
    let deb = amd64_deb();
    let listing = text(&run(Command::new("dpkg-deb").arg("-c").arg(&deb)));
    for path in [
        "./usr/bin/edgellm",
        "./lib/systemd/system/edgellm.service",
        "./lib/systemd/system/edgellm.socket",
        "./etc/edgellm/edgellm.toml",
        "./usr/lib/sysusers.d/edgellm.conf",
        "./usr/lib/tmpfiles.d/edgellm.conf",
        "./usr/share/doc/edgellm/README.md",
        "./usr/share/doc/edgellm/copyright",
        "./usr/share/man/man1/edgellm.1.gz",
        "./usr/share/man/man1/edgellm-serve.1.gz",
        "./usr/share/man/man1/edgellm-models.1.gz",
        "./usr/share/bash-completion/completions/edgellm",
        "./usr/share/zsh/vendor-completions/_edgellm",
        "./usr/share/fish/vendor_completions.d/edgellm.fish",
    ] {
        assert!(
            listing.lines().any(|l| l.ends_with(&format!(" {path}"))),
            "{path} is not in the package:\n{listing}"
        );
    }
    let conffiles = text(&run(Command::new("dpkg-deb")
        .arg("-I")
        .arg(&deb)
        .arg("conffiles")));
    assert_eq!(conffiles.trim(), "/etc/edgellm/edgellm.toml");
    let depends = text(&run(Command::new("dpkg-deb")
        .args(["-f"])
        .arg(&deb)
        .arg("Depends")));
    assert!(
        depends.contains("libc6 (>= 2.") && depends.contains("systemd"),
        "{depends}"
    );

    // Unpacked: the binary is stripped and runs; the config is the documented one and checks.
    let dir = temp_dir("deb_unpacked");
    let o = run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&dir));
    assert!(o.status.success(), "{}", text(&o));
    let bin = dir.join("usr/bin/edgellm");
    let sections = text(&run(Command::new("readelf").arg("-S").arg(&bin)));
    // (.debug_gdb_scripts is loaded data, not debug information: strip keeps it.)
    for gone in [".debug_info", ".debug_line", ".symtab"] {
        assert!(
            !sections.contains(gone),
            "not stripped ({gone}):\n{sections}"
        );
    }
    let size = std::fs::metadata(&bin).expect("binary").len();
    let unstripped = std::fs::metadata(env!("CARGO_BIN_EXE_edgellm"))
        .expect("binary")
        .len();
    assert!(
        size * 2 < unstripped,
        "stripped {size} bytes vs {unstripped}"
    );
    let v = text(&run(Command::new(&bin).arg("--version")));
    assert!(v.contains(env!("CARGO_PKG_VERSION")), "{v}");
    let conf = dir.join("etc/edgellm/edgellm.toml");
    assert_eq!(
        std::fs::read_to_string(&conf).expect("config"),
        std::fs::read_to_string(root().join("configs/edgellm.toml")).expect("config")
    );
    let o = run(Command::new(&bin).args(["config", "--check"]).arg(&conf));
    assert!(o.status.success(), "{}", text(&o));
    let man = text(&run(Command::new("man")
        .arg("-l")
        .arg(dir.join("usr/share/man/man1/edgellm-models.1.gz"))
        .env("MANWIDTH", "100")));
    assert!(man.contains("fetch") && man.contains("verify"), "{man}");
    // The units name what the package installs.
    let service =
        std::fs::read_to_string(dir.join("lib/systemd/system/edgellm.service")).expect("unit");
    assert!(service.contains("ExecStart=/usr/bin/edgellm serve --config /etc/edgellm/edgellm.toml"));
    assert!(
        service.contains("Documentation=man:edgellm(1)"),
        "{service}"
    );
    assert!(
        service.contains("file:///usr/share/doc/edgellm/README.md"),
        "{service}"
    );

    // lintian: no error (warnings are printed for the reader).
    let mut debs = vec![deb.clone()];
    let arm = deb.with_file_name(format!("edgellm_{}-1_arm64.deb", env!("CARGO_PKG_VERSION")));
    assert!(
        arm.is_file(),
        "{} is missing: scripts/test.sh builds both packages (scripts/package.sh)",
        arm.display()
    );
    debs.push(arm.clone());
    for d in &debs {
        let o = run(Command::new("lintian")
            .args(["--fail-on", "error", "--tag-display-limit", "0"])
            .arg(d));
        let out = text(&o);
        eprintln!("lintian {}:\n{out}", d.display());
        assert!(
            o.status.success(),
            "lintian finds errors in {}:\n{out}",
            d.display()
        );
        assert!(!out.lines().any(|l| l.starts_with("E:")), "{out}");
    }
    // The arm64 one holds an aarch64 binary (ELF machine 183).
    let adir = temp_dir("deb_unpacked_arm64");
    let o = run(Command::new("dpkg-deb").arg("-x").arg(&arm).arg(&adir));
    assert!(o.status.success(), "{}", text(&o));
    let elf = std::fs::read(adir.join("usr/bin/edgellm")).expect("arm64 binary");
    assert_eq!(&elf[..4], b"\x7fELF");
    assert_eq!(
        u16::from_le_bytes([elf[18], elf[19]]),
        183,
        "not an aarch64 binary"
    );
    let arch = text(&run(Command::new("dpkg-deb")
        .args(["-f"])
        .arg(&arm)
        .arg("Architecture")));
    assert_eq!(arch.trim(), "arm64");
}

#[test]
fn dpkg_installs_verifies_removes_and_purges() {
    let _one = DPKG.lock().unwrap_or_else(|e| e.into_inner());
    assert!(
        nix::unistd::geteuid().is_root(),
        "dpkg -i needs root (CI runs as root)"
    );
    let deb = amd64_deb();
    let dpkg = |args: &[&str]| {
        let o = run(Command::new("dpkg").args(args));
        assert!(o.status.success(), "dpkg {args:?}: {}", text(&o));
        text(&o)
    };
    let _ = Command::new("dpkg").args(["--purge", "edgellm"]).output();
    dpkg(&["-i", deb.to_str().expect("utf-8")]);
    let passwd = text(&run(Command::new("getent").args(["passwd", "edgellm"])));
    assert!(passwd.contains(":/var/lib/edgellm:"), "{passwd}");
    assert!(Path::new("/usr/bin/edgellm").is_file());
    let models = std::fs::metadata("/var/lib/edgellm/models").expect("the model directory");
    use std::os::unix::fs::MetadataExt;
    let uid = text(&run(Command::new("id").args(["-u", "edgellm"])));
    assert_eq!(models.uid().to_string(), uid.trim());
    // The installed units, with the installed binary in place.
    let o = run(Command::new("systemd-analyze").args([
        "verify",
        "--man=no",
        "/lib/systemd/system/edgellm.service",
        "/lib/systemd/system/edgellm.socket",
    ]));
    assert!(o.status.success(), "systemd-analyze verify: {}", text(&o));
    // The installed binary looks for models where the package put the directory.
    let o = run(Command::new("/usr/bin/edgellm")
        .args(["models", "list", "--json"])
        .env_remove("EDGELLM_MODEL_DIR"));
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON");
    assert_eq!(v["dir"], "/var/lib/edgellm/models");
    // The board example config names the group the package made, and checks.
    let pi = root().join("configs/raspberry-pi-5.toml");
    let o = run(Command::new("/usr/bin/edgellm")
        .args(["config", "--check"])
        .arg(&pi));
    assert!(o.status.success(), "{}", text(&o));
    let gid = text(&run(Command::new("getent").args(["group", "edgellm"])));
    let gid = gid.split(':').nth(2).expect("gid").trim().to_string();
    assert!(
        String::from_utf8_lossy(&o.stdout).contains(&format!("allowed_gids = [{gid}]")),
        "{}",
        text(&o)
    );
    // Remove: the files go, the edited config stays (it is a conffile).
    std::fs::write("/etc/edgellm/edgellm.toml", "[model]\nn_ctx = 1024\n").expect("edit config");
    dpkg(&["-r", "edgellm"]);
    assert!(!Path::new("/usr/bin/edgellm").exists());
    assert!(!Path::new("/lib/systemd/system/edgellm.service").exists());
    assert!(Path::new("/etc/edgellm/edgellm.toml").exists());
    // Purge: everything it added, the user and group included.
    dpkg(&["--purge", "edgellm"]);
    for gone in [
        "/etc/edgellm",
        "/var/lib/edgellm",
        "/usr/lib/sysusers.d/edgellm.conf",
    ] {
        assert!(!Path::new(gone).exists(), "{gone} is left after purge");
    }
    let o = run(Command::new("getent").args(["passwd", "edgellm"]));
    assert!(!o.status.success(), "the user is left after purge");
    let o = run(Command::new("getent").args(["group", "edgellm"]));
    assert!(!o.status.success(), "the group is left after purge");
}

/// A booted container: `systemd-nspawn --boot`, stopped (SIGTERM, then SIGKILL) when dropped.
struct Container {
    nspawn: Child,
    leader: u32,
    dir: PathBuf,
}

impl Container {
    fn boot(dir: &Path, console: &Path) -> Container {
        let log = std::fs::File::create(console).expect("console log");
        let nspawn = Command::new("systemd-nspawn")
            .args([
                "--quiet",
                "--boot",
                "--register=no",
                "--keep-unit",
                "--console=passive",
                "-D",
            ])
            .arg(dir)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().expect("dup"))
            .stderr(log)
            .spawn()
            .expect("systemd-nspawn (package systemd-container)");
        // The container's init is the nspawn process's child named systemd.
        let end = Instant::now() + Duration::from_secs(30);
        let leader = loop {
            let children =
                std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", nspawn.id()))
                    .unwrap_or_default();
            let found = children.split_whitespace().find_map(|p| {
                let comm = std::fs::read_to_string(format!("/proc/{p}/comm")).ok()?;
                (comm.trim() == "systemd")
                    .then(|| p.parse::<u32>().ok())
                    .flatten()
            });
            if let Some(pid) = found {
                break pid;
            }
            assert!(
                Instant::now() < end,
                "the container's systemd did not start"
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        Container {
            nspawn,
            leader,
            dir: dir.to_path_buf(),
        }
    }

    /// A command inside the container (all its namespaces, its root).
    fn exec(&self, args: &[&str]) -> Output {
        run(Command::new("nsenter")
            .args(["-t", &self.leader.to_string(), "-a"])
            .args(args))
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.exec(args);
        assert!(
            o.status.success(),
            "{args:?} in the container: {}",
            text(&o)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn show(&self, unit: &str, prop: &str) -> String {
        self.ok(&["systemctl", "show", unit, "-p", prop, "--value"])
            .trim()
            .to_string()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.nspawn.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let end = Instant::now() + Duration::from_secs(30);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.nspawn.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.nspawn.kill();
        let _ = self.nspawn.wait();
        eprintln!("the container in {} had to be killed", self.dir.display());
    }
}

#[test]
fn the_package_runs_under_systemd_in_a_booted_debian() {
    let tar = PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
        .join(".cache/edgellm/rootfs/bookworm-systemd.tar");
    assert!(
        tar.is_file(),
        "{} is missing: scripts/setup.sh --test makes it with debootstrap",
        tar.display()
    );
    let deb = amd64_deb();
    let dir = temp_dir("nspawn");
    let rootfs = dir.join("root");
    std::fs::create_dir_all(&rootfs).expect("mkdir");
    let o = run(Command::new("tar")
        .arg("-xf")
        .arg(&tar)
        .arg("-C")
        .arg(&rootfs));
    assert!(o.status.success(), "{}", text(&o));
    // (/tmp in the container is its own tmpfs: the package goes in /root.)
    std::fs::copy(&deb, rootfs.join("root/edgellm.deb")).expect("copy the package in");
    // Installed as an administrator would, in the container (not booted yet).
    let o = run(Command::new("systemd-nspawn")
        .args([
            "--quiet",
            "--register=no",
            "--keep-unit",
            "--pipe",
            "--machine=edgellm-test",
            "-D",
        ])
        .arg(&rootfs)
        .args(["dpkg", "-i", "/root/edgellm.deb"]));
    assert!(o.status.success(), "dpkg -i in the container: {}", text(&o));
    // The default model, where the package's daemon looks for it.
    let model = qwen_model();
    let dest = rootfs
        .join("var/lib/edgellm/models")
        .join(model.file_name().expect("name"));
    std::fs::hard_link(&model, &dest)
        .or_else(|_| std::fs::copy(&model, &dest).map(|_| ()))
        .expect("put the model in");

    let console = dir.join("console.log");
    let t0 = Instant::now();
    let c = Container::boot(&rootfs, &console);
    // Booted: is-system-running --wait answers once the manager is up and the boot is done.
    let end = Instant::now() + Duration::from_secs(90);
    let state = loop {
        let o = c.exec(&["systemctl", "is-system-running", "--wait"]);
        let state = String::from_utf8_lossy(&o.stdout).trim().to_string();
        if state == "running" || state == "degraded" {
            break state;
        }
        assert!(
            Instant::now() < end,
            "the container did not boot: {state} {}\nconsole:\n{}",
            text(&o),
            std::fs::read_to_string(&console).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    eprintln!("container booted ({state}) in {:?}", t0.elapsed());
    // Socket activation: the socket listens, the service waits for a connection.
    c.ok(&["systemctl", "start", "edgellm.socket"]);
    assert_eq!(c.show("edgellm.service", "ActiveState"), "inactive");
    let answer = c.exec(&[
        "edgellm",
        "ask",
        "--socket",
        "/run/edgellm/edgellm.sock",
        "--max-tokens",
        "16",
        "--temperature",
        "0",
        "What is the capital of France?",
    ]);
    let err = String::from_utf8_lossy(&answer.stderr);
    assert!(answer.status.success(), "{}", text(&answer));
    assert!(
        err.contains("(daemon at /run/edgellm/edgellm.sock)"),
        "answered in-process: {err}"
    );
    assert!(
        String::from_utf8_lossy(&answer.stdout).contains("Paris"),
        "{}",
        text(&answer)
    );
    eprintln!("answered through socket activation at {:?}", t0.elapsed());
    // Type=notify: active means READY=1 came; STATUS= says what it serves.
    assert_eq!(c.show("edgellm.service", "ActiveState"), "active");
    assert_eq!(c.show("edgellm.service", "SubState"), "running");
    let status = c.show("edgellm.service", "StatusText");
    assert!(status.starts_with("cpu-int4 ("), "STATUS= {status}");
    // The journal holds the request line, its syslog priority and its queue priority.
    let journal = c.ok(&[
        "journalctl",
        "-u",
        "edgellm.service",
        "-o",
        "json",
        "--no-pager",
    ]);
    let done: Vec<serde_json::Value> = journal
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| {
            e["MESSAGE"]
                .as_str()
                .is_some_and(|m| m.contains("request done"))
        })
        .collect();
    assert_eq!(done.len(), 1, "{journal}");
    // tracing's INFO is journald's 5 (notice; tracing-journald maps DEBUG to 6, WARN to 4); the
    // request's own fields carry tracing-journald's F_ prefix, its queue priority among them.
    let e = &done[0];
    assert_eq!(e["PRIORITY"], "5", "{e}");
    assert_eq!(e["F_FRONTEND"], "unix", "{e}");
    assert!(
        e["F_PRIORITY"]
            .as_str()
            .is_some_and(|p| p.parse::<i32>().is_ok()),
        "{e}"
    );
    assert!(e["F_FINISH"] == "stop" || e["F_FINISH"] == "length", "{e}");
    // Stopped cleanly: exit 0, result success.
    c.ok(&["systemctl", "stop", "edgellm.service"]);
    assert_eq!(c.show("edgellm.service", "ActiveState"), "inactive");
    assert_eq!(c.show("edgellm.service", "Result"), "success");
    assert_eq!(c.show("edgellm.service", "ExecMainStatus"), "0");
    let journal = c.ok(&[
        "journalctl",
        "-u",
        "edgellm.service",
        "--no-pager",
        "-o",
        "cat",
    ]);
    eprintln!("the daemon's journal:\n{journal}");
}
