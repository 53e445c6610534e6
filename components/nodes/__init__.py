"""Node kinds: how a node is reached and configured. A kind knows nothing of WireGuard or of
any other role; it runs the roles it is given its own way.

- droplet.py: a DigitalOcean droplet the program makes (and its cloud firewall, from the
  node's openings); reached over SSH with a host key the program made.
- ssh.py: an existing host, reached over SSH with the host key the config pins.
- remote.py: what both do with roles: an install step of the roles' packages, then each role's
  steps as remote commands, in the order their `after` names give.
- dstack.py: a dstack CVM, never logged in to: the roles' parts become one compose app that runs
  the spoke image.
"""
