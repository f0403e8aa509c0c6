fn main() -> std::process::ExitCode {
    kubectl_etcd_medic::main()
}
