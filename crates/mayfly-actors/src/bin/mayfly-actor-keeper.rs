//! The keeper of a contained `process` actor as a binary of its own, for providers built on
//! this crate (the `mayfly` binary runs the same code as `mayfly __keeper`).

fn main() -> std::process::ExitCode {
    let code = mayfly_actors::keeper::main(std::env::args_os().skip(1));
    std::process::ExitCode::from(u8::try_from(code).unwrap_or(1))
}
