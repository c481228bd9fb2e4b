#!/usr/bin/env python3
"""Helpers of bench/run (cold start over a shaped link); each subcommand prints its answer.

  oci-layout LAYOUT TAG LAYER.tar.gz DIFF_ID        write an OCI image layout around one layer
  trace-from-strace STRACE_OUT ROOT OUT             regular files the traced workload opened
  reglog LOG FROM_LINE                              "requests bytes" the registry served since
  fan-stats STATS_JSON                              "requests bytes data_requests data_bytes"
  fuse-stats RUN_DIR MOUNTPOINT                     "requests bytes" (fetch counters)
  image-bytes IMAGE_DIR                             metadata and blob bytes of a lode image
  needed IMAGE_DIR                                  compressed bytes of the chunks its prefetch
                                                    list touches
  report RESULTS_JSON OUT_DIR RECORD                table, plots, docs/benchmarks.md section
"""
import hashlib
import json
import os
import re
import socket
import struct
import sys

CHUNK_ENTRY = struct.Struct("<IIQII32s")  # lode_format::blob::ChunkEntry (56 bytes)
TRAILER = 64


def oci_layout(layout, tag, layer, diff_id):
    blobs = os.path.join(layout, "blobs", "sha256")
    os.makedirs(blobs, exist_ok=True)

    def put(b):
        d = hashlib.sha256(b).hexdigest()
        with open(os.path.join(blobs, d), "wb") as f:
            f.write(b)
        return "sha256:" + d

    h = hashlib.sha256()
    with open(layer, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    digest = h.hexdigest()
    os.replace(layer, os.path.join(blobs, digest))
    config = json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                   "Cmd": ["/usr/bin/python3"]},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    }).encode()
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": put(config), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": "sha256:" + digest,
                    "size": os.path.getsize(os.path.join(blobs, digest))}],
    }).encode()
    index = {"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": put(manifest), "size": len(manifest),
        "platform": {"os": "linux", "architecture": "amd64"},
        "annotations": {"org.opencontainers.image.ref.name": tag}}]}
    with open(os.path.join(layout, "index.json"), "w") as f:
        json.dump(index, f)
    with open(os.path.join(layout, "oci-layout"), "w") as f:
        f.write('{"imageLayoutVersion":"1.0.0"}')


def resolve_in_root(root, path, depth=0):
    """`path` (absolute, as seen inside a chroot at `root`) with every symlink followed the
    way the chrooted process sees it; None if it does not exist."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    cur = []
    while parts:
        p = parts.pop(0)
        if p == "..":
            if cur:
                cur.pop()
            continue
        host = os.path.join(root, *cur, p)
        if os.path.islink(host):
            if depth > 40:
                return None
            target = os.readlink(host)
            rest = target.split("/") + parts
            if target.startswith("/"):
                cur = []
            parts = [x for x in rest if x not in ("", ".")]
            depth += 1
            continue
        if not os.path.lexists(host):
            return None
        cur.append(p)
    return "/" + "/".join(cur)


def trace_from_strace(strace_out, root, out):
    """strace -f -e trace=chroot,openat,execve output -> the regular files opened after the
    chroot, in first-open order, as absolute paths of the image (symlinks resolved)."""
    seen, order = set(), []
    chrooted = set()
    pat = re.compile(r'^(\d+)\s+(openat|execve|chroot)\((?:AT_FDCWD, )?"([^"]+)".*\)\s+=\s+(-?\d+)')
    for line in open(strace_out, errors="replace"):
        m = pat.match(line)
        if not m:
            continue
        pid, call, path, ret = m.group(1), m.group(2), m.group(3), int(m.group(4))
        if call == "chroot":
            if ret == 0:
                chrooted.add(pid)
            continue
        if ret < 0 or not chrooted:
            continue
        if not path.startswith("/"):
            continue  # relative opens: the workload does none that matter (cwd is /)
        real = resolve_in_root(root, path)
        if real is None:
            continue
        host = os.path.join(root, real.lstrip("/"))
        if not os.path.isfile(host) or os.path.islink(host):
            continue
        if real not in seen:
            seen.add(real)
            order.append(real)
    with open(out, "w") as f:
        f.write("# regular files the cold-start workload opened (strace openat/execve, in order)\n")
        for p in order:
            f.write(p + "\n")
    print(len(order))


ACCESS = re.compile(r'"(GET|HEAD|PUT|POST|PATCH|DELETE) (\S+) HTTP/[\d.]+" (\d{3}) (\d+|-)')


def reglog(log, from_line):
    """Requests and response bytes in the registry's access log after line FROM_LINE."""
    n = b = 0
    with open(log, errors="replace") as f:
        for i, line in enumerate(f):
            if i < from_line:
                continue
            m = ACCESS.search(line)
            if not m:
                continue
            n += 1
            if m.group(4) != "-":
                b += int(m.group(4))
    print(n, b)


def fan_stats(path):
    s = json.load(open(path))
    f = s.get("fetch", {})
    print(s.get("open_requests", 0) + f.get("requests", 0),
          s.get("open_bytes", 0) + f.get("bytes_fetched", 0),
          f.get("requests", 0), f.get("bytes_fetched", 0))


def fuse_stats(run_dir, mountpoint):
    mnt = os.path.realpath(mountpoint)
    for name in os.listdir(run_dir):
        if not name.endswith(".json"):
            continue
        try:
            rec = json.load(open(os.path.join(run_dir, name)))
        except (OSError, ValueError):
            continue
        if rec.get("mountpoint") == mnt and rec.get("control"):
            s = socket.socket(socket.AF_UNIX)
            s.connect(rec["control"])
            buf = b""
            while True:
                d = s.recv(65536)
                if not d:
                    break
                buf += d
            v = json.loads(buf)
            print(v.get("fetch_requests", 0), v.get("fetch_bytes", 0))
            return
    print("- -")


def chunk_tables(img):
    m = json.load(open(os.path.join(img, "image.json")))
    tables = []
    for b in m["blobs"]:
        path = os.path.join(img, "blobs", b["digest"].split(":")[-1])
        with open(path, "rb") as f:
            f.seek(b["table_offset"])
            raw = f.read(b["chunk_count"] * CHUNK_ENTRY.size)
        tables.append([CHUNK_ENTRY.unpack_from(raw, i * CHUNK_ENTRY.size)
                       for i in range(b["chunk_count"])])
    return m, tables


def image_bytes(img):
    m = json.load(open(os.path.join(img, "image.json")))
    meta = os.path.getsize(os.path.join(img, "image.json")) + m["bootstrap"]["size"]
    tables = sum(b["chunk_count"] * CHUNK_ENTRY.size + TRAILER for b in m["blobs"])
    blobs = sum(b["size"] for b in m["blobs"])
    unc = sum(b.get("uncompressed_size", 0) for b in m["blobs"])
    print(json.dumps({"bootstrap": m["bootstrap"]["size"], "metadata": meta + tables,
                      "tables": tables, "blobs": blobs, "uncompressed": unc,
                      "chunks": sum(b["chunk_count"] for b in m["blobs"])}))


def needed(img):
    m, tables = chunk_tables(img)
    total = chunks = unc = 0
    for ext in m.get("prefetch", []):
        lo, hi = ext["offset"], ext["offset"] + ext["len"]
        for blk, ulen, _coff, clen, _flags, _d in tables[ext["blob"]]:
            s = blk * 4096
            if s < hi and s + max(ulen, 1) > lo:
                total += clen
                unc += ulen
                chunks += 1
    print(total, chunks, unc)


# ------------------------------------------------------------------------------------------
def median(xs):
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def fmt_mb(b):
    return "—" if b is None else f"{b / 1e6:.1f}"


SHAPERS = {
    "netem": "Shaping: `tc qdisc replace dev X root netem delay RTT/2 rate R limit 1000000` on both "
             "ends of a veth pair.",
    "delayline": "This kernel has no sch_netem (CONFIG_NET_SCH_NETEM is not set), so the link is "
                 "`bench/delayline.py`: a TUN device in each namespace and a userspace FIFO link per "
                 "direction (serialization at the rate, then the one-way delay; tail drop only past "
                 "4 bandwidth-delay products, ≥ 1 MB), with GSO offloads kept so TCP runs its real "
                 "congestion control over MSS-sized segments.",
}


def report(results_path, out_dir, record):
    import datetime
    r = json.load(open(results_path))
    rows = []
    plots = []
    for link in r["links"]:
        name = link["name"]
        bound = link["bound_s"]
        cells = link["cells"]
        full = median(cells.get("full pull", {}).get("times", []))
        for label in r["rows"]:
            c = cells.get(label)
            if not c or not c.get("times"):
                continue
            t = median(c["times"])
            lazy = label != "full pull"
            ratio = t / bound if lazy else None
            rows.append({
                "link": name, "mode": label, "time_s": t, "runs": c["times"],
                "vs_full_pull": (full / t) if (full and lazy) else None,
                "bytes": median(c.get("bytes", [])), "requests": median(c.get("requests", [])),
                "mode_bytes": median(c.get("mode_bytes", [])),
                "bound_s": bound if lazy else None, "time_over_bound": ratio,
                "target": None if ratio is None else ("MET" if ratio <= 1.3 else "MISSED"),
                "note": c.get("note", ""),
            })
        plots.append(name)
    r["table"] = rows
    json.dump(r, open(results_path, "w"), indent=1)

    head = ("| link | mode | time s | faster than full pull | fetched MB (registry) | requests | "
            "bound s | time / bound | target ≤ 1.3× |")
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    def num(v, f):
        return "—" if v is None else f.format(v)

    for x in rows:
        lines.append(
            f"| {x['link']} | {x['mode']} | {x['time_s']:.2f} | {num(x['vs_full_pull'], '{:.1f}×')} | "
            f"{fmt_mb(x['bytes'])} | {num(x['requests'], '{:.0f}')} | {num(x['bound_s'], '{:.2f}')} | "
            f"{num(x['time_over_bound'], '{:.2f}×')} | {x['target'] or '—'} |")
    table = "\n".join(lines)

    # Plots: time per mode and link against the bound; bytes per mode.
    pngs = []
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        modes = [m for m in r["rows"] if any(x["mode"] == m for x in rows)]
        links = [l["name"] for l in r["links"]]
        fig, axes = plt.subplots(1, len(links), figsize=(5.2 * len(links), 4.6), squeeze=False)
        for ax, link in zip(axes[0], r["links"]):
            xs = [x for x in rows if x["link"] == link["name"]]
            names = [x["mode"] for x in xs]
            times = [x["time_s"] for x in xs]
            colors = ["#888888" if n == "full pull" else "#3b75af" for n in names]
            ax.bar(range(len(xs)), times, color=colors)
            ax.axhline(link["bound_s"], color="#2a9d2a", ls="--", label=f"bound {link['bound_s']:.2f} s")
            ax.axhline(1.3 * link["bound_s"], color="#d62728", ls=":", label="target 1.3× bound")
            ax.set_xticks(range(len(xs)))
            ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
            ax.set_ylabel("time to done, s (median)")
            ax.set_title(link["name"])
            ax.legend(fontsize=8)
        fig.suptitle("Cold start: mount + python3 importing 10 stdlib modules")
        fig.tight_layout()
        p = os.path.join(out_dir, "coldstart-time.png")
        fig.savefig(p, dpi=110)
        pngs.append(p)
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(7, 4.2))
        l0 = [x for x in rows if x["link"] == links[0]]
        ax.bar(range(len(l0)), [(x["bytes"] or 0) / 1e6 for x in l0], color="#3b75af")
        ax.axhline(r["needed_bytes"] / 1e6, color="#2a9d2a", ls="--",
                   label=f"needed {r['needed_bytes'] / 1e6:.1f} MB (+ metadata)")
        ax.set_xticks(range(len(l0)))
        ax.set_xticklabels([x["mode"] for x in l0], rotation=35, ha="right", fontsize=8)
        ax.set_ylabel("MB served by the registry")
        ax.set_yscale("log")
        ax.set_title(f"Bytes moved ({links[0]})")
        ax.legend(fontsize=8)
        fig.tight_layout()
        p = os.path.join(out_dir, "coldstart-bytes.png")
        fig.savefig(p, dpi=110)
        pngs.append(p)
        plt.close(fig)
    except ImportError:
        print("(matplotlib missing: no plots; scripts/setup.sh installs it)", file=sys.stderr)

    m = r["machine"]
    out = ["## Cold start (issue 9)\n", f"    {r['command']}\n"]
    out.append(
        f"A real image — Debian bookworm `debootstrap --variant=minbase --include=python3` "
        f"({r['fixture']['files']:,} files, {r['fixture']['rootfs_bytes'] / 1e6:.0f} MB) — as an "
        f"ordinary OCI image (one gzip layer, {r['fixture']['oci_layer_bytes'] / 1e6:.1f} MB) and "
        f"`lode convert`ed (zstd, {r['fixture']['lode_blob_bytes'] / 1e6:.1f} MB of blobs, "
        f"bootstrap {r['fixture']['bootstrap_bytes'] / 1e6:.2f} MB), both in a `docker-registry` "
        f"inside a network namespace, reached over a shaped link (both directions: one-way delay "
        f"RTT/2 + rate cap). " + SHAPERS.get(r.get("shaper"), "") + " Workload: "
        f"`chroot MNT /usr/bin/python3 -c 'import {r['imports']}'`. Timer: from `lode mount` "
        f"(empty cache on ext4, page cache dropped) until the workload exits. Median of "
        f"{r['runs']} runs per cell, modes alternating. Measured {datetime.date.today()} on "
        f"{m['nproc']} cores, {m['mem_gib']} GiB, Linux {m['kernel']}, shared with other work "
        f"(load average at start {m['load']}).\n")
    out.append("| link (RTT / rate) | shaping | measured ping RTT ms | measured 10 MB curl Mbit/s (incl. connect, slow start) |")
    out.append("|---|---|---:|---:|")
    for l in r["links"]:
        out.append(f"| {l['name']} | {l.get('shaping', '')} | {l['ping_ms']:.1f} | {l['curl_mbit']:.0f} |")
    out.append("")
    out.append(table + "\n")
    out.append(
        f"Bound = k·RTT + bytes/bandwidth with k = {r['k']} sequential round trips (TCP "
        f"connect; manifest; image.json ∥ bootstrap; chunk tables; one data request) and bytes = "
        f"metadata ({r['metadata_bytes'] / 1e6:.2f} MB: bootstrap, image.json, chunk tables) + "
        f"the compressed chunks the workload needs ({r['needed_bytes'] / 1e6:.2f} MB: "
        f"{r['needed_how']}). fetched MB / requests: what the registry's access log recorded for "
        f"the run (every request, manifest to data). Trace for the prefetch image: "
        f"{r['trace_method']} ({r['trace_files']} files). The workload alone on a local unpack "
        f"(page cache dropped) takes {r['local_s']:.2f} s — part of every row, not of the bound. "
        f"fscache mode cannot run on this kernel (no CACHEFILES_ONDEMAND): bench/fscache.sh "
        f"measures it in the Linux 6.12 VM.\n")
    if r.get("notes"):
        out.append("Notes: " + " ".join(r["notes"]) + "\n")
    if record:
        out.append("![cold start time](img/coldstart-time.png)\n")
        out.append("![bytes moved](img/coldstart-bytes.png)\n")
    text = "\n".join(out)
    print(text)
    if record:
        import shutil
        os.makedirs("docs/img", exist_ok=True)
        for p in pngs:
            shutil.copy(p, os.path.join("docs/img", os.path.basename(p)))
        shutil.copy(results_path, "docs/img/coldstart-results.json")
        path = "docs/benchmarks.md"
        doc = open(path).read()
        mm = re.search(r"^## Cold start \(issue 9\).*?(?=^## |\Z)", doc, flags=re.S | re.M)
        if mm:
            doc = doc[:mm.start()] + text + "\n" + doc[mm.end():]
        else:
            doc = doc.rstrip("\n") + "\n\n" + text
        open(path, "w").write(doc)
        print(f"(recorded in {path}, docs/img/coldstart-*.png, docs/img/coldstart-results.json)")


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "oci-layout":
        oci_layout(*args)
    elif cmd == "trace-from-strace":
        trace_from_strace(*args)
    elif cmd == "reglog":
        reglog(args[0], int(args[1]))
    elif cmd == "fan-stats":
        fan_stats(args[0])
    elif cmd == "fuse-stats":
        fuse_stats(*args)
    elif cmd == "image-bytes":
        image_bytes(args[0])
    elif cmd == "needed":
        needed(args[0])
    elif cmd == "report":
        report(args[0], args[1], args[2] == "1")
    else:
        sys.exit(f"unknown subcommand {cmd}")


if __name__ == "__main__":
    main()
