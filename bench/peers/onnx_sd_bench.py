"""The ONNX Runtime peer, timed on this machine: the PyTorch peer's own SD 1.5 or SDXL base 1.0 UNet and VAE decoder
(../shared/peers/torch_sd_bench.py, imported as a module by path, not copied), random weights, fp32, exported once
with torch.onnx.export and run with onnxruntime's CPU execution provider on the same work as `npm run bench`:
  sd15 (default): one UNet CFG step (batch 2, 64x64 latent, context [2,77,768]) and one VAE decode of a 64x64 latent.
  sdxl: batch 2, 128x128 latent (--size 768 / 512: 96x96 / 64x64), context [2,77,2048], pooled text [2,1280],
        time ids [2,6]; VAE decode of a latent of the same size.

The export is TorchScript-based (dynamo=False: the torch.export-based exporter needs onnxscript, which the peers'
install line does not have), opset 17, constants folded, the weights as external data (every model here but the
VAE is over protobuf's 2 GB). It is cached in --cache (default .cache/bench/onnx), one folder per model, part and
latent size (e.g. sd15-unet-b2-64/), and reused while the peer's source and torch's version are the ones it was made
from. The session: CPUExecutionProvider, intra-op threads = --threads (default: the CPUs this process may run on),
sequential execution, every graph optimisation (ORT_ENABLE_ALL).

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
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

HERE = Path(__file__).resolve().parent
DEFAULT_PEER = HERE.parent.parent.parent / "shared" / "peers" / "torch_sd_bench.py"
OPSET = 17
EXPORT_RSS, RUN_RSS = 2.2, 2.2  # peak RSS / fp32 weight bytes, see main()


def load_peer(path):
    """The torch peer as a module (its main() only runs under __main__)."""
    spec = importlib.util.spec_from_file_location("torch_sd_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def peak_rss_mb():
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

    def __init__(self, name, key, build, inputs, gflop, params, extra=None):
        self.name, self.key, self.build, self.inputs = name, key, build, inputs
        self.gflop, self.params, self.extra = gflop, params, extra or {}


def parts(peer, model, size, what):
    rng = np.random.default_rng(0)
    randn = lambda *s: rng.standard_normal(s, dtype=np.float32)  # noqa: E731
    out = []
    if model == "sd15":
        if what in ("unet", "both"):
            out.append(Part("unet_cfg_step_b2_64", "sd15-unet-b2-64", peer.UNet,
                            {"x": randn(2, 4, 64, 64), "t": np.array([500, 500], np.int64), "ctx": randn(2, 77, 768)},
                            1610.0, 859_520_964))
        if what in ("vae", "both"):
            out.append(Part("vae_decode_64", "sd15-vae-64", peer.Decoder, {"z": randn(1, 4, 64, 64)}, 2520.0, 49_490_179))
        return out
    lat = size // 8
    if what in ("unet", "both"):
        shapes = ((2, 4, lat, lat), [500, 500], (2, 77, 2048), (2, 1280), [[size, size, 0, 0, size, size]] * 2)
        gflop = peer.count_gflop(lambda: peer.UNet(**peer.SDXL), *shapes)
        inputs = {"x": randn(*shapes[0]), "t": np.array(shapes[1], np.int64), "ctx": randn(*shapes[2]),
                  "pooled": randn(*shapes[3]), "time_ids": np.array(shapes[4], np.float32)}
        out.append(Part(f"sdxl_unet_cfg_step_b2_{lat}", f"sdxl-unet-b2-{lat}", lambda: peer.UNet(**peer.SDXL), inputs,
                        gflop, 2_567_463_684, {"gflop": round(gflop, 1)}))
    if what in ("vae", "both"):
        gflop = peer.count_gflop(peer.Decoder, (1, 4, lat, lat))
        out.append(Part(f"sdxl_vae_decode_{lat}", f"sdxl-vae-{lat}", peer.Decoder, {"z": randn(1, 4, lat, lat)},
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


def export(part, folder, stamp):
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
        torch.onnx.export(module, args, str(onnx_path), dynamo=False, opset_version=OPSET,
                          input_names=list(part.inputs), output_names=["out"], do_constant_folding=True)
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


def timed(part, sess, runs, threads, export_s, export_rss, session_s):
    feed = part.inputs

    def fn():
        sess.run(None, feed)

    t0 = time.perf_counter()
    fn()
    warm = time.perf_counter() - t0
    times = []
    for i in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(round(time.perf_counter() - t0, 3))
        log(f"{part.name}: run {i + 1}/{runs} {times[-1]:.2f} s")
    med = statistics.median(times)
    print(json.dumps({"model": part.name, "peer": "onnxruntime", "onnxruntime": ort.__version__,
                      "torch": torch.__version__, "opset": OPSET, "threads": threads, "warmup_s": round(warm, 2),
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
    ap.add_argument("--export-only", action="store_true", help=argparse.SUPPRESS)  # the child that exports
    ap.add_argument("--peer", default=os.environ.get("SD_TORCH_PEER", str(DEFAULT_PEER)),
                    help=f"the torch peer's script (default $SD_TORCH_PEER or {DEFAULT_PEER})")
    a = ap.parse_intermixed_args()
    if a.model == "sd15" and a.size not in (None, 512):
        ap.error("--model sd15 is timed at 512 only")
    size = a.size or (1024 if a.model == "sdxl" else 512)
    peer_src = Path(a.peer).read_bytes()
    peer = load_peer(a.peer)
    stamp = f"{hashlib.sha256(peer_src).hexdigest()[:16]} torch {torch.__version__} opset {OPSET}"
    torch.set_num_threads(a.threads)
    for part in parts(peer, a.model, size, a.what):
        folder = Path(a.cache) / part.key
        if a.export_only:
            export(part, folder, stamp)
            continue
        weights = 4 * part.params
        avail = mem_available_bytes()
        done = cached_export(folder, stamp)
        # RSS measured on SD 1.5's UNet (3.4 GB of weights): the export's process peaks at about EXPORT_RSS x the
        # weights (module, traced graph and folded constants at once), the session at about RUN_RSS x
        need = (EXPORT_RSS if done is None else RUN_RSS) * weights
        if avail is not None and avail < need:
            skipped(part, f"needs about {need / 1e9:.1f} GB of free memory to {'run' if done else 'export'} it "
                          f"({weights / 1e9:.1f} GB of fp32 weights), {avail / 1e9:.1f} GB available")
            continue
        try:
            export_s = None
            if done is None:  # in a child process, so that all of the export's memory is returned before the run
                cmd = [sys.executable, __file__, part.key.split("-")[1], "--model", a.model, "--size", str(size),
                       "--cache", a.cache, "--peer", a.peer, "--export-only"]
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
            timed(part, sess, a.runs, a.threads, export_s, export_rss, session_s)
            del sess
            gc.collect()
        except Exception as e:  # noqa: BLE001  one part failing must not hide the others'
            skipped(part, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500])


if __name__ == "__main__":
    main()
