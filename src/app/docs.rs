//! `edgellm completions SHELL` and `edgellm manpages DIR`: the command line's own description,
//! as shell completions (clap_complete) and man pages (clap_mangen), for the Debian package.

use std::path::Path;

use anyhow::{Context, Result};

/// Prints the completion script for `shell`.
pub fn completions(mut cmd: clap::Command, shell: clap_complete::Shell) -> Result<()> {
    clap_complete::generate(shell, &mut cmd, "edgellm", &mut std::io::stdout());
    Ok(())
}

/// Writes edgellm.1 and edgellm-COMMAND.1 for each command into `dir`.
pub fn manpages(cmd: clap::Command, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let write = |name: &str, c: clap::Command| -> Result<()> {
        let path = dir.join(format!("{name}.1"));
        let mut out = Vec::new();
        clap_mangen::Man::new(c).render(&mut out)?;
        std::fs::write(&path, out).with_context(|| format!("writing {}", path.display()))
    };
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("edgellm-{}", sub.get_name());
        write(&name, sub.clone().name(name.clone()))?;
    }
    write("edgellm", cmd)
}
