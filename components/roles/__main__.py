"""`python3 -m components.roles`: the Debian packages the roles declare, as JSON, for what builds
hosts and images outside the program (the lab's apt repository, the spoke image)."""
import json

from . import declared, hub_roles, spoke_roles

roles = hub_roles() + spoke_roles()
print(json.dumps({"hosts": list(dict.fromkeys(declared(roles) + declared(roles, "userspace")))}))
