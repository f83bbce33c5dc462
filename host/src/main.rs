//! The `oxtune` command line.

use std::process::ExitCode;

fn main() -> ExitCode {
    oxtune::cli::main()
}
