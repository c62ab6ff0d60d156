//! Running helper commands (`ip`, `sysctl`, ...) with errors that say which
//! command failed and what it printed.

use std::fmt::Write as _;
use std::io;
use std::process::{Command, ExitStatus, Output, Stdio};

/// A helper command could not be started or exited unsuccessfully.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("could not start `{command}`")]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: ExitStatus,
        stderr: String,
    },
}

/// The command line of `cmd`, for error messages.
pub fn describe(cmd: &Command) -> String {
    let mut line = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        let _ = write!(line, " {}", arg.to_string_lossy());
    }
    line
}

/// Runs `cmd` to completion with no stdin, capturing its output; an exit
/// status other than 0 is an error carrying the command line and stderr.
pub fn run_checked(cmd: &mut Command) -> Result<Output, CommandError> {
    let command = describe(cmd);
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| CommandError::Spawn {
            command: command.clone(),
            source,
        })?;
    if !output.status.success() {
        return Err(CommandError::Failed {
            command,
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(output)
}

/// Runs `program args...` and returns its stdout as text.
pub fn run<I, S>(program: &str, args: I) -> Result<String, CommandError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let output = run_checked(Command::new(program).args(args))?;
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Writes an executable file (a script, a copied binary) so that this
/// process never holds it open for writing. Tests run on parallel threads:
/// one that forks while another writes a file hands the write descriptor
/// to its child until that child execs, and running the file in that window
/// fails with ETXTBSY ("Text file busy"). A short-lived `sh` writes the file
/// instead, so the only writer has exited before anyone runs it.
pub fn write_executable(path: &std::path::Path, contents: &[u8], mode: u32) -> io::Result<()> {
    use std::io::Write as _;
    let mut child = Command::new("sh")
        .args(["-c", "cat > \"$1\" && chmod \"$2\" \"$1\"", "sh"])
        .arg(path)
        .arg(format!("{mode:o}"))
        .stdin(Stdio::piped())
        .spawn()?;
    let written = match child.stdin.take() {
        Some(mut stdin) => stdin.write_all(contents),
        None => Err(io::Error::other("sh has no stdin pipe")),
    };
    let status = child.wait()?;
    written?;
    if !status.success() {
        return Err(io::Error::other(format!(
            "writing {} failed ({status})",
            path.display()
        )));
    }
    Ok(())
}
