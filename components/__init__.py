"""dstack-vpn: a WireGuard hub-and-spoke network as a Pulumi program."""
