{% include "scripts/_lib.sh" %}
{% include "scripts/_transport-off.sh" %}
