//! The sandbox keeper ([`mayfly_tools::keeper`]) as a binary of its own, for runtimes built
//! on this crate and its tests (the `mayfly` binary runs the same code as `mayfly __keeper`).

fn main() -> std::process::ExitCode {
    let code = mayfly_tools::keeper::main(std::env::args_os().skip(1));
    std::process::ExitCode::from(u8::try_from(code).unwrap_or(1))
}
