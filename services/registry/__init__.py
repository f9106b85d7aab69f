"""The registry service: agent membership, leases, health and capability lookup."""
