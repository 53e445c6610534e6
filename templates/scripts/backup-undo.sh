{% include "scripts/_lib.sh" %}
# Nothing to undo: the backups stay in the repository (README, Backups: deleting them).
say "the backups stay in the repository"
