//! The node binary. Everything it does is in the library: see `cli` and `commands`.

fn main() -> std::process::ExitCode {
    etcd_medic::commands::parse_and_run()
}
