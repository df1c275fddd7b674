"""Free loopback ports for the test servers (Ray, SLURM, S3, torch.distributed, HTTP)."""

from __future__ import annotations

import socket


def free_port(low: int = 0, high: int = 0) -> int:
    """A loopback port nobody holds now: any (the kernel's pick), or the first free one in [low, high)."""
    for port in range(low, high) if high else (0,):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise OSError(f"no free loopback port in [{low}, {high})")
