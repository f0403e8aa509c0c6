fn main() {
    println!("{}", etcd_bin_vendored_linux_amd64::etcd_bin_path().unwrap().display());
}
