//! `tcpgate manpage`: roff man pages generated from the clap definitions.
//!
//! Without `--out-dir`, prints `tcpgate(1)` to stdout. With it, writes
//! `tcpgate.1` plus one `tcpgate-<verb>.1` per visible verb and prints the
//! names of the files written, one per line.

use std::path::{Path, PathBuf};

use clap::CommandFactory as _;

#[derive(Debug, clap::Args)]
pub struct ManpageArgs {
    /// Write every page into this directory instead of printing tcpgate(1).
    #[arg(long, value_name = "DIR")]
    pub out_dir: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ManpageError {
    #[error("cannot create {}", path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the man pages into {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot render the man page")]
    Render(#[source] std::io::Error),
}

pub fn run(args: &ManpageArgs) -> i32 {
    let result = match &args.out_dir {
        None => main_page().map(|page| super::completions::write_stdout(&page)),
        Some(dir) => write_pages(dir).map(|files| {
            let names: String = files.iter().map(|f| format!("{}\n", f.display())).collect();
            super::completions::write_stdout(names.as_bytes())
        }),
    };
    result.unwrap_or_else(|e| {
        eprintln!("tcpgate: {}", crate::error_chain(&e));
        1
    })
}

/// `tcpgate(1)`: synopsis, options, and the list of verbs.
pub fn main_page() -> Result<Vec<u8>, ManpageError> {
    let mut out = Vec::new();
    clap_mangen::Man::new(super::Cli::command())
        .render(&mut out)
        .map_err(ManpageError::Render)?;
    Ok(out)
}

/// Writes every page into `dir`; returns the files written, sorted.
pub fn write_pages(dir: &Path) -> Result<Vec<PathBuf>, ManpageError> {
    std::fs::create_dir_all(dir).map_err(|source| ManpageError::CreateDir {
        path: dir.to_owned(),
        source,
    })?;
    let write_error = |source| ManpageError::Write {
        path: dir.to_owned(),
        source,
    };
    // Skips hidden verbs (these generators) and names pages after the full
    // command, `tcpgate-check-config.1`, as man(1) expects.
    clap_mangen::generate_to(super::Cli::command(), dir).map_err(write_error)?;
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(write_error)? {
        let path = entry.map_err(write_error)?.path();
        let is_page = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("tcpgate") && n.ends_with(".1"));
        if is_page {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn main_page_has_the_sections_man_expects() {
        let page = String::from_utf8(main_page().expect("renders")).expect("roff is UTF-8");
        assert!(page.starts_with(".ie \\n(.g .ds Aq"), "{page}");
        assert!(page.contains(".TH tcpgate 1"), "{page}");
        for section in ["NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "SUBCOMMANDS"] {
            assert!(page.contains(&format!(".SH {section}")), "no {section}");
        }
        assert!(page.contains("check\\-config"), "verbs listed");
    }

    #[test]
    fn out_dir_gets_one_page_per_visible_verb() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = write_pages(dir.path()).expect("writes");
        let names: Vec<String> = files
            .iter()
            .filter_map(|f| f.file_name()?.to_str().map(str::to_owned))
            .collect();
        for expected in ["tcpgate.1", "tcpgate-run.1", "tcpgate-check-config.1"] {
            assert!(names.iter().any(|n| n == expected), "{names:?}");
        }
        assert!(
            !names
                .iter()
                .any(|n| n.contains("manpage") || n.contains("completions")),
            "hidden verbs get no page: {names:?}"
        );
        let run = std::fs::read_to_string(dir.path().join("tcpgate-run.1")).expect("read");
        assert!(run.contains("\\-\\-datapath"), "run's own options: {run}");
    }
}
