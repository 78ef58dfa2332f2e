//! The `conch` binary: everything lives in the library; this only hands over to the CLI, or
//! to the tree supervisor when conch re-executes itself as one (before clap, logging or
//! tokio exist).

fn main() -> std::process::ExitCode {
    if let Some(code) = conch::child::supervisor::run_if_requested() {
        return code;
    }
    conch::cli::main()
}
