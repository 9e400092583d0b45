"""Offloaded I/O: the TUN device (tun.py: virtio header, TSO/USO superpackets) and UDP sockets (udp.py:
UDP_SEGMENT sends, UDP_GRO receives, recvmmsg/sendmmsg in mmsg.py), each probed with a per-packet fallback."""
