# kernel_wireguard: true where this kernel has WireGuard (an interface of its type can be
# made); elsewhere (containers, some VMs) wg-quick runs the userspace wireguard-go by itself.
kernel_wireguard() {
	if ip link add dev dvpn-probe0 type wireguard 2>/dev/null; then
		ip link del dev dvpn-probe0
		return 0
	fi
	return 1
}
