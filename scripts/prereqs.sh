# Sourced by the other scripts: what a fresh machine lacks to build etcd-medic.
# etcd-client compiles etcd's protos at build time and needs protoc.
if ! command -v protoc >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing protobuf-compiler (protoc), needed to build etcd-client" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq protobuf-compiler >/dev/null
  else
    echo "protoc is missing: install it (Debian/Ubuntu: sudo apt-get install protobuf-compiler)" >&2
    exit 1
  fi
fi
command -v cargo >/dev/null 2>&1 || { echo "cargo is missing: install Rust (rustup)" >&2; exit 1; }
