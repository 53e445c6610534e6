# receive_bundle DIR: the step's files (JSON: name -> text, components/render.bundle) from
# stdin, whole or not at all, each written 0600 into DIR (the step's own temporary folder).
receive_bundle() {
	receive "$1/.bundle.json"
	python3 -I - "$1" <<'PY'
import json, os, sys
folder = sys.argv[1]
path = os.path.join(folder, ".bundle.json")
with open(path) as f:
    files = json.load(f)
os.unlink(path)
for name, text in files.items():
    if "/" in name or name.startswith("."):
        sys.exit("dstack-vpn: a bundled file's name is not plain: %r" % name)
    fd = os.open(os.path.join(folder, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
PY
}

# install_changed MODE USER SRC DEST: SRC to DEST (owned by USER) where it differs; true when it did.
install_changed() {
	cmp -s "$3" "$4" && return 1
	install -m "$1" -o "$2" -g "$2" "$3" "$4"
}
