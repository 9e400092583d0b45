"""udpflannel: a Flannel-compatible Layer-3 pod network whose datapath runs in userspace."""

__version__ = "0.1.0"
