//! `tcpgate completions <shell>`: a shell completion script generated from
//! the clap definitions, so packagers regenerate it from the binary they
//! ship instead of keeping a copy that drifts.

use clap::CommandFactory as _;
use clap_complete::Shell;

#[derive(Debug, clap::Args)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub shell: Shell,
}

/// Prints the script to stdout, e.g. `tcpgate completions bash >
/// /usr/share/bash-completion/completions/tcpgate`.
pub fn run(args: &CompletionsArgs) -> i32 {
    let mut command = super::Cli::command();
    let mut out = Vec::new();
    clap_complete::generate(args.shell, &mut command, "tcpgate", &mut out);
    write_stdout(&out)
}

/// Writes generated text to stdout; a closed pipe (`| head`) is not an error.
pub(super) fn write_stdout(bytes: &[u8]) -> i32 {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        Ok(()) => 0,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => 0,
        Err(e) => {
            eprintln!("tcpgate: cannot write to stdout: {e}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn script(shell: Shell) -> String {
        let mut command = super::super::Cli::command();
        let mut out = Vec::new();
        clap_complete::generate(shell, &mut command, "tcpgate", &mut out);
        String::from_utf8(out).expect("completion scripts are UTF-8")
    }

    #[test]
    fn every_shell_script_completes_the_verbs_and_their_options() {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let text = script(shell);
            for verb in ["run", "check-config", "connect", "grant", "revoke"] {
                assert!(text.contains(verb), "{shell}: no `{verb}` in\n{text}");
            }
            // Options of a subcommand are completed too.
            assert!(text.contains("token-file"), "{shell}: no --token-file");
        }
        assert!(script(Shell::Bash).contains("complete -F _tcpgate"));
        assert!(script(Shell::Zsh).starts_with("#compdef tcpgate"));
        assert!(script(Shell::Fish).contains("complete -c tcpgate"));
    }
}
