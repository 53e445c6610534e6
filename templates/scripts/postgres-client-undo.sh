{% include "scripts/_lib.sh" %}
rm -f {{ ca_path | shquote }}
rmdir {{ ca_path.rsplit("/", 1)[0] | shquote }} 2>/dev/null || true
