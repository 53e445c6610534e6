{% include "phala/_lib.sh" %}
if [ -z "$app_compose" ] || [ -z "$app_env" ]; then fail "the app's compose (DSTACK_VPN_COMPOSE) or environment (stdin) is empty"; fi
printf '%s' "$app_compose" >docker-compose.yml
printf '%s\n' "$app_env" >app.env
# The app's compose (its public half; a new key changes it too): unchanged means nothing to deploy,
# e.g. when only the stored API key or these scripts changed.
digest=$(printf '%s' "$app_compose" | sha256sum | cut -d' ' -f1)
previous_digest=$(printf '%s\n' "${PULUMI_COMMAND_STDOUT:-}" | sed -n 's/^compose_sha256=//p' | tail -n 1)
if [ -n "$previous_id" ] && [ "$digest" = "$previous_digest" ]; then
	say "the app is unchanged; CVM $previous_id left as it is"
	printf '%s\n' "${PULUMI_COMMAND_STDOUT:-}" | grep -E '^(cvm_id|app_id)=' || true
	echo "compose_sha256=$digest"
	exit 0
fi
if [ -n "$previous_id" ]; then
	say "updating CVM $previous_id"
	set -- --cvm-id "$previous_id" --wait
else
	say "creating CVM {{ cvm_name }}"
	set -- -n {{ cvm_name | shquote }} --no-dev-os --no-public-logs --no-public-sysinfo{% for flag, value in flags %} {{ flag }} {{ value | shquote }}{% endfor %}

fi
out=$(phala deploy "$@" -c ./docker-compose.yml -e ./app.env --json) ||
	fail "phala deploy failed (its message is above)"
id=$(printf '%s' "$out" | json_field vm_uuid id app_id)
id=${id:-$previous_id}
[ -n "$id" ] || fail "phala deploy answered without a CVM id"
echo "cvm_id=$id"
echo "app_id=$(printf '%s' "$out" | json_field app_id)"
echo "compose_sha256=$digest"
