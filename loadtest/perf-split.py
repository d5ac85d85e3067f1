#!/usr/bin/env python3
"""Splits a `perf record` profile of `voicegate serve` into decode / VAD / resample / websocket+actor+runtime.

    perf-split.py perf.data /path/to/voicegate

Symbolises the leaf of every sample itself (perf 6.1 mis-resolves this binary: its text segment's
virtual addresses sit 0x1000 above their file offsets) with addr2line, then classifies by function name.
"""
import collections
import re
import subprocess
import sys

data, binary = sys.argv[1], sys.argv[2]
mm = subprocess.run(["perf", "script", "-i", data, "--show-mmap-events"], capture_output=True, text=True).stdout
base = pgoff = None
for line in mm.splitlines():
    m = re.search(r"MMAP2? \d+/\d+: \[(0x[0-9a-f]+)\((0x[0-9a-f]+)\) @ (0x[0-9a-f]+|0) .*r-xp " + re.escape(binary), line)
    if m:
        base, pgoff = int(m.group(1), 16), int(m.group(3), 16)
        break
ph = subprocess.run(["readelf", "-lW", binary], capture_output=True, text=True).stdout
delta = 0
for line in ph.splitlines():
    f = line.split()
    if f and f[0] == "LOAD" and "E" in f[6:8]:
        delta = int(f[2], 16) - int(f[1], 16)
samples = subprocess.run(["perf", "script", "-i", data, "-F", "comm,tid,ip,sym,dso", "-G"],
                         capture_output=True, text=True).stdout
rows = []
for line in samples.splitlines():
    m = re.match(r"\s*(\S+)\s+(\d+)\s+([0-9a-f]+)\s+(.*?)\s*\((.*)\)\s*$", line)
    if m:
        rows.append((m.group(2), int(m.group(3), 16), m.group(4), m.group(5)))
ips = sorted({ip for _, ip, _, dso in rows if dso == binary})
names = {}
if ips and base is not None:
    addrs = [hex(ip - base + pgoff + delta) for ip in ips]
    out = subprocess.run(["addr2line", "-f", "-C", "-e", binary] + addrs, capture_output=True, text=True).stdout.splitlines()
    for ip, fn, loc in zip(ips, out[0::2], out[1::2]):
        names[ip] = f"{fn} @ {loc.rsplit(':', 1)[0]}"
RULES = [
    ("VAD (Silero: gemm, LSTM, conv, activations)",
     # ndarray: only tract uses it in this binary (Cargo.lock), for the shapes and strides of every call.
     r"audio/(gemm|silero_net|vad)\.rs|gemm::|SileroNet|silero|^block<|_mm512|_mm256|^__(expm1f|tanhf|expf|expf_fma|ieee754_expf?|exp_fma)\b|tract|ndarray"),
    ("decode (libopus)",
     r"\.c$|^(silk_|celt_|opus_|quant_|ec_|clt_|kf_|deemphasis|comb_filter|unquant|tf_decode|alg_unquant|exp_rotation"
     r"|denormalise|anti_collapse|renormalise|spreading|decode_|haar1|interp_bits|compute_allocation|op_pvq|cwrsi"
     r"|interleave|deinterleave|_celt|dred|lpcnet|nnet|compute_)|audio/codec\.rs"),
    ("resample (rubato)", r"rubato|audio/resample\.rs"),
]
cats = collections.Counter()
funcs = collections.Counter()
for _, ip, sym, dso in rows:
    fn = names.get(ip, sym if sym and sym != "[unknown]" else dso)
    fn = fn.replace(" @ ??", "")
    funcs[fn] += 1
    cat = None
    if "kernel" in dso:
        cat = "kernel (sockets, scheduler, timers)"
    else:
        for c, rx in RULES:
            if re.search(rx, fn):
                cat = c
                break
    cats[cat or "websocket, actors, runtime, allocator, other"] += 1
total = sum(cats.values()) or 1
print(f"samples: {total}")
for c, n in cats.most_common():
    print(f"  {c:<48} {100 * n / total:5.1f}%")
print("top functions:")
for f, n in funcs.most_common(25):
    print(f"  {100 * n / total:5.1f}%  {f[:110]}")
