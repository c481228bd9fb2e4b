#!/usr/bin/env python3
"""A shaped point-to-point link between this network namespace and another, in userspace:
what `tc qdisc ... netem delay D rate R` would do where the kernel has no sch_netem.

  delayline.py NETNS HOST_IF HOST_IP NS_IF NS_IP SETTINGS_FILE

Creates a TUN device in each namespace (HOST_IF here with HOST_IP, NS_IF in /run/netns/NETNS
with NS_IP; point-to-point, MTU 1500, with GSO offloads through the virtio-net header, so TCP
keeps MSS-sized segments and its real congestion control while the forwarder handles ~64 KiB
per packet) and forwards packets between them. Each direction is a FIFO link: a packet leaves
the serializer len·8/rate after the previous one (or after it arrived, whichever is later)
and is delivered one-way-delay later; a direction drops packets (tail drop) only when its
queue holds more than the limit. SETTINGS_FILE holds "ONE_WAY_DELAY_MS RATE_BPS LIMIT_BYTES";
SIGUSR1 re-reads it (and logs the drop counters so far). Prints "ready" once both ends are up.
Stopped by SIGTERM (the TUN devices go with the process).
"""
import collections
import ctypes
import fcntl
import os
import select
import signal
import struct
import subprocess
import sys
import time

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
IFF_TUN, IFF_NO_PI, IFF_VNET_HDR = 0x0001, 0x1000, 0x4000
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6 = 0x01, 0x02, 0x04
VNET_HDR = 10  # struct virtio_net_hdr
CLONE_NEWNET = 0x40000000


def tun(name):
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI | IFF_VNET_HDR))
    fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
    return fd


def ip(*args):
    subprocess.run(["ip", *args], check=True)


class Direction:
    def __init__(self, src, dst):
        self.src, self.dst = src, dst
        self.q = collections.deque()  # (deliver_at, packet)
        self.free_at = 0.0  # when the serializer is idle again
        self.queued = 0  # bytes waiting (not yet delivered)
        self.drops = self.packets = 0


def main():
    netns, host_if, host_ip, ns_if, ns_ip, settings = sys.argv[1:7]
    cfg = {}

    def load(*_):
        d, r, lim = open(settings).read().split()
        cfg.update(delay=float(d) / 1000, rate=float(r), limit=int(lim))

    load()
    a = tun(host_if)
    ip("addr", "add", host_ip, "peer", ns_ip, "dev", host_if)
    ip("link", "set", host_if, "up")
    libc = ctypes.CDLL(None, use_errno=True)
    nsfd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    if libc.setns(nsfd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns")
    b = tun(ns_if)
    ip("addr", "add", ns_ip, "peer", host_ip, "dev", ns_if)
    ip("link", "set", ns_if, "up")
    ip("link", "set", "lo", "up")
    dirs = {a: Direction(a, b), b: Direction(b, a)}
    reload = []
    signal.signal(signal.SIGUSR1, lambda *_: reload.append(1))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print("ready", flush=True)
    poll = select.poll()
    poll.register(a, select.POLLIN)
    poll.register(b, select.POLLIN)
    while True:
        if reload:
            reload.clear()
            load()
            print(f"settings {cfg}; drops host->ns {dirs[a].drops}/{dirs[a].packets}, "
                  f"ns->host {dirs[b].drops}/{dirs[b].packets}", flush=True)
        now = time.monotonic()
        nxt = min((d.q[0][0] for d in dirs.values() if d.q), default=None)
        timeout = None if nxt is None else max(0.0, nxt - now) * 1000
        try:
            ready = poll.poll(timeout)
        except InterruptedError:
            continue
        now = time.monotonic()
        for fd, _ in ready:
            d = dirs[fd]
            for _ in range(64):
                try:
                    pkt = os.read(fd, 65536 + VNET_HDR)
                except BlockingIOError:
                    break
                d.packets += 1
                size = len(pkt) - VNET_HDR
                if d.queued + size > cfg["limit"]:
                    d.drops += 1
                    continue
                start = max(now, d.free_at)
                d.free_at = start + size * 8 / cfg["rate"]
                d.q.append((d.free_at + cfg["delay"], pkt))
                d.queued += size
        now = time.monotonic()
        for d in dirs.values():
            while d.q and d.q[0][0] <= now:
                _, pkt = d.q.popleft()
                d.queued -= len(pkt) - VNET_HDR
                try:
                    os.write(d.dst, pkt)
                except OSError:
                    d.drops += 1


if __name__ == "__main__":
    main()
