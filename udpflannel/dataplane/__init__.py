"""The datapath engine: worker processes that move packets between the TUN and UDP sockets, per batch.

Control plane side: process.Dataplane (opens TUN + sockets, starts workers, sends peer tables, reads counters)
and tunnel.TunnelBackend (what the vxlan/udp backends share). Worker side: worker.py (poll loop), engine.py
(TX/RX pipelines; rowpath.py its per-row paths for a few small packets), peers.py (longest-prefix match),
txprep.py, icmp.py; counters.py is shared memory read by both. `python -m udpflannel.dataplane` runs one
backend for tests and benchmarks. wg_engine.py and wg_worker.py are the WireGuard datapath, built the same
way.
"""
