"""The ONNX Runtime peer, timed on this machine: the PyTorch peer's own SD 1.5 or SDXL base 1.0 UNet and VAE decoder
(../shared/peers/torch_sd_bench.py, imported as a module by path, not copied), random weights, fp32, exported once
with torch.onnx.export and run with onnxruntime's CPU execution provider on the same work as `npm run bench`:
  sd15 (default): one UNet CFG step (batch 2, 64x64 latent, context [2,77,768]) and one VAE decode of a 64x64 latent.
  sdxl: batch 2, 128x128 latent (--size 768 / 512: 96x96 / 64x64), context [2,77,2048], pooled text [2,1280],
        time ids [2,6]; VAE decode of a latent of the same size.

The export is TorchScript-based (dynamo=False: the torch.export-based exporter needs onnxscript, which the peers'
install line does not have), opset 17, constants folded, the weights as external data (protobuf stops at 2 GB; one
file per tensor beside model.onnx). scaled_dot_product_attention is exported as onnxruntime's fused
com.microsoft.MultiHeadAttention (--attention plain: as the exporter writes it, MatMul-Softmax-MatMul, ~20% slower
on a 4096-token self-attention here), which is what an ONNX Runtime user's SD graph holds after onnxruntime's own
attention fusion (whose patterns do not match this exporter's SDPA). The export runs in a child process (all its
memory is returned before the session is made), is cached in --cache (default .cache/bench/onnx), one folder per
model, part, latent size and attention (e.g. sd15-unet-b2-64-mha/), and is reused while the peer's source, torch's
version and EXPORT_VERSION are the ones it was made with. The session: CPUExecutionProvider, intra-op threads =
--threads (default: the CPUs this process may run on), sequential execution, every graph optimisation
(ORT_ENABLE_ALL). --check compares the output with the torch module's on the same inputs.

Memory, measured on SD 1.5's UNet (3.4 GB of fp32 weights): the export's process peaks at 4.6 GB (1.33x the
weights), the session and its runs at 4.8 GB (1.4x; 7.2 GB with --attention plain, whose score matrices are
materialised). A part whose estimate (1.5x the weights to export, 1.6x to run) exceeds MemAvailable is skipped, and
its line says so ("needs about 16.4 GB of free memory to export and run it (10.3 GB of fp32 weights), ... GB
available" for SDXL's UNet).

usage: /tmp/peer/bin/pip install torch==2.13.0+cpu onnxruntime numpy onnx
       /tmp/peer/bin/python bench/peers/onnx_sd_bench.py [unet|vae|both] [runs] [--model sd15|sdxl] [--size N]
prints one JSON line per model in the torch peer's format (model, warmup_s, runs_s, median_s, gflop_per_s; sdxl
also gflop), with "peer": "onnxruntime", the versions, export_s (null when the cached export was used), session_s
(loading and optimising the graph) and peak_rss_mb of this process so far. A part that cannot run prints
{"model": ..., "peer": "onnxruntime", "skipped": "<why>"} instead, and the script still exits 0."""
import argparse
import gc
import hashlib
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
DEFAULT_PEER = HERE.parent.parent.parent / "shared" / "peers" / "torch_sd_bench.py"
OPSET = 17
EXPORT_VERSION = 2  # bump when export() changes what it writes: the cached exports are then redone
EXPORT_RSS, RUN_RSS = 1.5, 1.6  # peak RSS / fp32 weight bytes, see main()


def load_peer(path):
    """The torch peer as a module (its main() only runs under __main__)."""
    spec = importlib.util.spec_from_file_location("torch_sd_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def peak_rss_mb():
    """This process's peak RSS: VmHWM (ru_maxrss would count the RSS of the process that started it, the bench's)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def mem_available_bytes():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def log(s):
    print(f"[onnx peer {time.strftime('%H:%M:%S')}] {s}", file=sys.stderr, flush=True)


class Part:
    """One timed model: how to build it, its example inputs (numpy, by input name) and its GFLOP."""

    def __init__(self, peer, name, key, build, inputs, gflop, params, extra=None):
        self.peer, self.name, self.key, self.build, self.inputs = peer, name, key, build, inputs
        self.gflop, self.params, self.extra = gflop, params, extra or {}


def parts(peer, model, size, what):
    rng = np.random.default_rng(0)
    randn = lambda *s: rng.standard_normal(s, dtype=np.float32)  # noqa: E731
    out = []
    if model == "sd15":
        if what in ("unet", "both"):
            out.append(Part(peer, "unet_cfg_step_b2_64", "sd15-unet-b2-64", peer.UNet,
                            {"x": randn(2, 4, 64, 64), "t": np.array([500, 500], np.int64), "ctx": randn(2, 77, 768)},
                            1610.0, 859_520_964))
        if what in ("vae", "both"):
            out.append(Part(peer, "vae_decode_64", "sd15-vae-64", peer.Decoder, {"z": randn(1, 4, 64, 64)}, 2520.0, 49_490_179))
        return out
    lat = size // 8
    if what in ("unet", "both"):
        shapes = ((2, 4, lat, lat), [500, 500], (2, 77, 2048), (2, 1280), [[size, size, 0, 0, size, size]] * 2)
        gflop = peer.count_gflop(lambda: peer.UNet(**peer.SDXL), *shapes)
        inputs = {"x": randn(*shapes[0]), "t": np.array(shapes[1], np.int64), "ctx": randn(*shapes[2]),
                  "pooled": randn(*shapes[3]), "time_ids": np.array(shapes[4], np.float32)}
        out.append(Part(peer, f"sdxl_unet_cfg_step_b2_{lat}", f"sdxl-unet-b2-{lat}", lambda: peer.UNet(**peer.SDXL), inputs,
                        gflop, 2_567_463_684, {"gflop": round(gflop, 1)}))
    if what in ("vae", "both"):
        gflop = peer.count_gflop(peer.Decoder, (1, 4, lat, lat))
        out.append(Part(peer, f"sdxl_vae_decode_{lat}", f"sdxl-vae-{lat}", peer.Decoder, {"z": randn(1, 4, lat, lat)},
                        gflop, 49_490_179, {"gflop": round(gflop, 1)}))
    return out


def cached_export(folder, stamp):
    """done.json of a complete export made for this stamp, or None."""
    if (folder / "model.onnx").exists():
        try:
            done = json.loads((folder / "done.json").read_text())
            if done.get("stamp") == stamp:
                return done
        except (OSError, ValueError):
            pass
    return None


class FusedAttention(torch.autograd.Function):
    """scaled_dot_product_attention (q, k, v [B, H, S, D], no mask, default scale: all the peer uses), exported as
    onnxruntime's fused com.microsoft.MultiHeadAttention, which takes [B, S, H*D]: what an ORT user's graph has after
    onnxruntime.transformers' attention fusion (whose patterns do not match this exporter's SDPA). The head count comes
    in as a Python int: the traced shapes of q are not static in the peer's UNet."""

    @staticmethod
    def forward(ctx, q, k, v, heads):  # noqa: ARG004  (the same values as SDPA: only the export differs)
        return F.scaled_dot_product_attention(q, k, v)

    @staticmethod
    def symbolic(g, q, k, v, heads):
        to_bsd = g.op("Constant", value_t=torch.tensor([0, 0, -1], dtype=torch.int64))

        def bsd(t):
            return g.op("Reshape", g.op("Transpose", t, perm_i=[0, 2, 1, 3]), to_bsd)

        o = g.op("com.microsoft::MultiHeadAttention", bsd(q), bsd(k), bsd(v), num_heads_i=heads)
        o = g.op("Reshape", o, g.op("Constant", value_t=torch.tensor([0, 0, heads, -1], dtype=torch.int64)))
        return g.op("Transpose", o, perm_i=[0, 2, 1, 3])


class FusedF:
    """torch.nn.functional with scaled_dot_product_attention as FusedAttention: put in the peer module's `F` while
    exporting (its code calls F.scaled_dot_product_attention), and taken out again after."""

    def __getattr__(self, name):
        return getattr(F, name)

    @staticmethod
    def scaled_dot_product_attention(q, k, v, *args, **kwargs):
        assert not args and not kwargs, "the fused export covers the peer's plain SDPA only"
        return FusedAttention.apply(q, k, v, int(q.shape[1]))


def export(part, folder, stamp, attention):
    """torch.onnx.export of the peer's module into folder/model.onnx (+ external data files); done.json, written
    last, marks it complete and records the seconds and this process's peak RSS."""
    onnx_path, done = folder / "model.onnx", folder / "done.json"
    folder.mkdir(parents=True, exist_ok=True)
    for f in folder.iterdir():  # a stale or partial export
        f.unlink()
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.no_grad():
        module = part.build().eval()
        n = sum(p.numel() for p in module.parameters())
        assert n == part.params, (part.name, n)
        args = tuple(torch.from_numpy(v) for v in part.inputs.values())
        log(f"{part.name}: exporting {n:,} parameters to {onnx_path}")
        peer_f = part.peer.F
        if attention == "mha":
            part.peer.F = FusedF()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the legacy exporter's deprecation, and the tracer's on int(q.shape[1])
                torch.onnx.export(module, args, str(onnx_path), dynamo=False, opset_version=OPSET,
                                  input_names=list(part.inputs), output_names=["out"], do_constant_folding=True,
                                  custom_opsets={"com.microsoft": 1} if attention == "mha" else None)
        finally:
            part.peer.F = peer_f
    del module, args
    gc.collect()
    seconds = time.perf_counter() - t0
    done.write_text(json.dumps({"stamp": stamp, "export_s": round(seconds, 1), "export_peak_rss_mb": peak_rss_mb()}))


def session(onnx_path, threads):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])


def check(part, out):
    """max |onnx - torch| / max |torch| of the output, the torch module built as export() built it (same seed)."""
    torch.manual_seed(0)
    with torch.inference_mode():
        ref = part.build().eval()(*(torch.from_numpy(v) for v in part.inputs.values())).numpy()
    return float(np.abs(out - ref).max() / np.abs(ref).max())


def timed(part, sess, runs, threads, export_s, export_rss, session_s, attention, with_check):
    feed = part.inputs

    def fn():
        return sess.run(None, feed)[0]

    t0 = time.perf_counter()
    first = fn()
    warm = time.perf_counter() - t0
    times = []
    for i in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(round(time.perf_counter() - t0, 3))
        log(f"{part.name}: run {i + 1}/{runs} {times[-1]:.2f} s")
    med = statistics.median(times)
    extra = {"check_rel_err": check(part, first)} if with_check else {}
    print(json.dumps({"model": part.name, "peer": "onnxruntime", "onnxruntime": ort.__version__,
                      "torch": torch.__version__, "opset": OPSET, "attention": attention, **extra,
                      "threads": threads, "warmup_s": round(warm, 2),
                      "runs_s": times, "median_s": med, **part.extra, "gflop_per_s": round(part.gflop / med, 1),
                      "export_s": export_s, "export_peak_rss_mb": export_rss, "session_s": round(session_s, 1),
                      "peak_rss_mb": peak_rss_mb()}), flush=True)


def skipped(part, why):
    log(f"{part.name}: skipped: {why}")
    print(json.dumps({"model": part.name, "peer": "onnxruntime", "skipped": why}), flush=True)


def main():
    ap = argparse.ArgumentParser(description="ONNX Runtime peer: the torch peer's UNet CFG step and VAE decode, "
                                             "exported to ONNX and timed on the CPU execution provider.")
    ap.add_argument("what", nargs="?", default="both", choices=("unet", "vae", "both"))
    ap.add_argument("runs", nargs="?", default=3, type=int, help="timed runs after one warm-up (default 3)")
    ap.add_argument("--model", default="sd15", choices=("sd15", "sdxl"))
    ap.add_argument("--size", type=int, choices=(512, 768, 1024),
                    help="image side in pixels: sdxl 1024 (default), 768 or 512; sd15 512 only")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                    help="onnxruntime intra-op threads (default: the CPUs this process may use)")
    ap.add_argument("--cache", default=".cache/bench/onnx", help="where the exports are kept (default .cache/bench/onnx)")
    ap.add_argument("--attention", default="mha", choices=("mha", "plain"),
                    help="mha (default): SDPA exported as onnxruntime's fused MultiHeadAttention; plain: as the "
                         "exporter writes it (MatMul, Softmax, MatMul)")
    ap.add_argument("--check", action="store_true",
                    help="also run the torch module on the same inputs and print max |onnx - torch| / max |torch|")
    ap.add_argument("--export-only", action="store_true", help=argparse.SUPPRESS)  # the child that exports
    ap.add_argument("--peer", default=os.environ.get("SD_TORCH_PEER", str(DEFAULT_PEER)),
                    help=f"the torch peer's script (default $SD_TORCH_PEER or {DEFAULT_PEER})")
    a = ap.parse_intermixed_args()
    if a.model == "sd15" and a.size not in (None, 512):
        ap.error("--model sd15 is timed at 512 only")
    size = a.size or (1024 if a.model == "sdxl" else 512)
    peer_src = Path(a.peer).read_bytes()
    peer = load_peer(a.peer)
    stamp = (f"{hashlib.sha256(peer_src).hexdigest()[:16]} export v{EXPORT_VERSION}"
             f" torch {torch.__version__} opset {OPSET} attention {a.attention}")
    torch.set_num_threads(a.threads)
    for part in parts(peer, a.model, size, a.what):
        folder = Path(a.cache) / f"{part.key}-{a.attention}"
        if a.export_only:
            export(part, folder, stamp, a.attention)
            continue
        weights = 4 * part.params
        avail = mem_available_bytes()
        done = cached_export(folder, stamp)
        # RSS measured on SD 1.5's UNet (3.4 GB of weights): the export's process peaked at 4.6 GB (1.33x the weights:
        # module, traced graph and initializers), the session and its runs at 4.8 GB (1.4x: the initializers, the
        # CPU EP's prepacked copies of some, the activations); the margin is for SDXL's larger activations
        need = (RUN_RSS if done else max(EXPORT_RSS, RUN_RSS)) * weights
        if avail is not None and avail < need:
            skipped(part, f"needs about {need / 1e9:.1f} GB of free memory to {'run' if done else 'export and run'} it "
                          f"({weights / 1e9:.1f} GB of fp32 weights), {avail / 1e9:.1f} GB available")
            continue
        try:
            export_s = None
            if done is None:  # in a child process, so that all of the export's memory is returned before the run
                cmd = [sys.executable, __file__, part.key.split("-")[1], "--model", a.model, "--size", str(size),
                       "--cache", a.cache, "--peer", a.peer, "--attention", a.attention, "--export-only"]
                if subprocess.run(cmd).returncode != 0 or (done := cached_export(folder, stamp)) is None:
                    raise RuntimeError(f"the export failed (see above): {' '.join(cmd)}")
                export_s = done.get("export_s")
                if avail is not None and RUN_RSS * weights > (mem_available_bytes() or avail):
                    skipped(part, f"exported, but running needs about {RUN_RSS * weights / 1e9:.1f} GB of free memory")
                    continue
            export_rss = done.get("export_peak_rss_mb")
            log(f"{part.name}: {'exported in %.0f s' % export_s if export_s is not None else 'cached export'}; "
                f"creating the session ({a.threads} threads)")
            t0 = time.perf_counter()
            sess = session(folder / "model.onnx", a.threads)
            session_s = time.perf_counter() - t0
            timed(part, sess, a.runs, a.threads, export_s, export_rss, session_s, a.attention, a.check)
            del sess
            gc.collect()
        except Exception as e:  # noqa: BLE001  one part failing must not hide the others'
            skipped(part, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500])


if __name__ == "__main__":
    main()
