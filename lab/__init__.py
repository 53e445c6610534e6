"""The lab: the program run against real local hosts (see hosts.py)."""
from .hosts import Host, Lab, default_lab_dir
from .packages import ensure_machine_packages

__all__ = ["Host", "Lab", "default_lab_dir", "ensure_machine_packages"]
