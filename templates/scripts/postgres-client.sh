{% include "scripts/_lib.sh" %}
# stdin: the PostgreSQL cluster's CA certificate (public): clients check the server's against it.
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
receive "$stage/ca.crt"
grep -q 'BEGIN CERTIFICATE' "$stage/ca.crt" || { say "not a certificate; nothing changed" >&2; exit 1; }
umask 022
install -D -m 0644 "$stage/ca.crt" {{ ca_path | shquote }}
say "the PostgreSQL cluster's CA certificate: {{ ca_path }} (sslrootcert)"
