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
