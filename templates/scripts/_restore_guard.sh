# A restore is for good: a member that runs a restored cluster never goes back to an older one
# (its data is older than what the applications wrote since) because a setting was removed.
installed_scope=$(sed -n 's/^scope: //p' {{ conf_dir | shquote }}/patroni.yml 2>/dev/null || true)
case $installed_scope in dstack-vpn-r*) installed_generation=${installed_scope##*-r} ;; *) installed_generation=0 ;; esac
if [ "$installed_generation" -gt {{ restore_generation | default(0) }} ] 2>/dev/null; then
	say "this member runs the restored cluster $installed_scope: postgres.restore.generation must stay $installed_generation or more (was the restore setting removed or lowered? put it back)" >&2
	exit 1
fi
