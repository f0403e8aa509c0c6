//! Prints the path of the etcd binary the lab runs (`$ETCD_MEDIC_LAB_ETCD_BIN`, else the
//! vendored 3.5): what `scripts/build-image` puts in the image.
fn main() {
    println!("{}", etcd_medic_lab::etcd::etcd_binary().display());
}
