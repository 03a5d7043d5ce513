"""Scale-out on ``torch.distributed``: data-parallel calibration, module-parallel quantization,
failure detection and block checkpoints.

Launch every rank with torchrun (or any launcher that sets RANK / WORLD_SIZE / MASTER_ADDR /
MASTER_PORT) and call :func:`quantize_model_distributed` on every rank with the same model and the
same calibration tensor::

    torchrun --nproc_per_node 2 my_script.py      # gloo on CPU, NCCL on GPUs

What each rank does, per block (ARCHITECTURE.md §4, split over ranks):

- **data parallel**: rank r runs the calibration forwards of its own contiguous shard of the
  samples; the raw accumulators X̃ᵀX̃, X̃ᵀX (and the float-pass XᵀX of the report) and the token
  counts are summed across ranks with ``all_reduce`` (``HessianCollector.all_reduce_``), then
  normalized by the global T — the same H = X̃ᵀX̃/T as one process, up to float32 summation order;
- **module parallel**: the modules of a group (q,k,v → o → gate,up → down) are assigned to ranks by
  :func:`assign_modules` (greedy longest-processing-time on :func:`module_cost`); each owner
  quantizes its modules, then every module's int8 codes and scales are broadcast from its owner,
  so every rank holds the same quantized block and propagates its own shard through it.

Failures: every collective runs inside :meth:`DistContext.step`, which turns a backend error or
timeout into a :class:`DistributedQuantizationError` naming the block, the step and the rank(s) that
stopped responding (from heartbeats and progress marks each rank keeps in the rendezvous store).

Checkpoints: with ``checkpoint_dir`` each finished block's codes and scales are written atomically
(safetensors + a manifest renamed into place) by rank 0; a rerun with the same model, calibration
and recipe (any world size) replays the finished blocks instead of recomputing them.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = [
    "DistributedQuantizationError", "DistContext", "BlockCheckpoint", "CheckpointMismatchError",
    "module_cost", "assign_modules", "init_distributed", "finish_distributed",
    "quantize_model_distributed",
]


class DistributedQuantizationError(RuntimeError):
    """A rank died, timed out or failed; the message names the rank(s), the block and the step."""


class CheckpointMismatchError(RuntimeError):
    """A checkpoint directory belongs to another model, calibration set or recipe."""


# ---------------------------------------------------------------------------------------------
# cost model and assignment
# ---------------------------------------------------------------------------------------------
def module_cost(out_features: int, in_features: int, cfg, mode: str = "final") -> float:
    """Relative flop estimate of quantizing one [N, D] linear with recipe ``cfg``:
    PiSO scales ~ N·D²·2^(b−1) (dense H: a breakpoint sweep of 2^(b−1) steps per row, each touching
    a D-row of H), data-free PiSO ~ N·D·2^(b−1), RTN ~ N·D, GPTQ ~ D³ + N·D² (Cholesky + sweep),
    Qronos ~ 2·D³ + N·D² (an extra solve against G)."""
    N, D = int(out_features), int(in_features)
    q = 2 ** (cfg.bits - 1)
    piso = N * D * D * q
    cost = float(N * D)
    ec = cfg.error_correction if mode == "final" else "none"
    scales = "piso" if mode == "scales" else cfg.scales
    if ec == "none" or mode == "scales":
        if scales == "piso":
            cost += piso
        elif scales == "data-free":
            cost += N * D * q
        return cost
    cost += (D ** 3 if ec == "gptq" else 2 * D ** 3) + N * D * D
    if cfg.scales == "piso" and cfg.uses_interleaved_piso:
        cost += piso
    elif cfg.scales == "data-free":
        cost += N * D * q
    return cost


def assign_modules(costs: Dict[str, float], world_size: int) -> Dict[str, int]:
    """Greedy LPT: modules by decreasing cost (ties: name) each go to the least-loaded rank (ties:
    lowest rank). Deterministic, so every rank computes the same map without communicating; the
    makespan is at most 4/3 of the optimum."""
    if world_size < 1:
        raise ValueError(f"assign_modules: world_size must be >= 1, got {world_size}")
    load = [0.0] * world_size
    out: Dict[str, int] = {}
    for name, c in sorted(costs.items(), key=lambda kv: (-kv[1], kv[0])):
        r = min(range(world_size), key=lambda k: (load[k], k))
        out[name] = r
        load[r] += c
    return out


# ---------------------------------------------------------------------------------------------
# process group, heartbeats and failure reports
# ---------------------------------------------------------------------------------------------
def init_distributed(backend: Optional[str] = None, timeout_s: float = 600.0) -> "DistContext":
    """``init_process_group`` from the launcher's environment (torchrun) when not yet initialized;
    backend None: NCCL when CUDA is available, else gloo. Returns a :class:`DistContext`."""
    import torch.distributed as dist

    if not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        kw = {}
        if backend == "nccl":
            lr = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(lr)
            kw["device_id"] = torch.device("cuda", lr)
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s), **kw)
    return DistContext(timeout_s=timeout_s, heartbeat=False)


def finish_distributed() -> None:
    """Tears the default process group down on every rank together: a barrier, then
    ``destroy_process_group``. Call it on all ranks once no collective is left (e.g. right after
    :func:`quantize_model_distributed`; evaluating or saving on rank 0 needs no group). A rank that
    destroys its gloo group while a peer is still using the connection can abort at exit
    ("terminate called without an active exception"), and PyTorch asks for a collective teardown."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class DistContext:
    """The process group the pipeline runs on, plus a liveness channel in the rendezvous store.

    Each rank writes a heartbeat (every ``heartbeat_s``) and a progress mark (block, step) before
    every collective; when a collective fails, :meth:`step` reads them to say which rank stopped
    (heartbeat stale: died) or lagged (progress behind: hung or slow)."""

    def __init__(self, group=None, timeout_s: float = 600.0, heartbeat_s: float = 1.0,
                 heartbeat: bool = True):
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError("DistContext: torch.distributed is not initialized (run under torchrun "
                               "and call init_distributed() first)")
        self.dist = dist
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        # group rank -> global rank: collectives name their source by global rank, and the
        # heartbeat keys must not collide with ranks outside a subgroup
        self._global = ([dist.get_global_rank(group, r) for r in range(self.world_size)]
                        if group is not None else list(range(self.world_size)))
        self.backend = dist.get_backend(group)
        self.timeout_s = float(timeout_s)
        self.heartbeat_s = float(heartbeat_s)
        self.block: Optional[int] = None
        self.collective_s = 0.0  # time inside collectives: transfers + waiting for slower ranks
        self._store = None
        self._stop = threading.Event()
        self._thread = None
        if heartbeat:
            self._start_heartbeat()

    # device the collectives need (NCCL: the rank's GPU)
    @property
    def comm_device(self) -> torch.device:
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _start_heartbeat(self):
        host = os.environ.get("MASTER_ADDR")
        port = os.environ.get("MASTER_PORT")
        if not host or not port:
            return
        try:
            store = self.dist.TCPStore(host, int(port), is_master=False,
                                       timeout=timedelta(seconds=10), use_libuv=True)
            self._store = self.dist.PrefixStore("torch_piso/", store)
        except Exception:  # noqa: BLE001 - liveness reports are best effort
            self._store = None
            return
        self._store.set(f"hb/{self._global[self.rank]}", repr(time.time()))

        store = self._store

        def beat():
            while not self._stop.wait(self.heartbeat_s):
                try:
                    store.set(f"hb/{self._global[self.rank]}", repr(time.time()))
                except Exception:  # noqa: BLE001
                    return

        self._thread = threading.Thread(target=beat, name="torch_piso-heartbeat", daemon=True)
        self._thread.start()

    def begin_block(self, index: int, mode: str = "final") -> None:
        """The pipeline enters block ``index`` of pass ``mode`` (named in failure reports)."""
        self.block = index if mode == "final" else f"{index} of the decoupled scales pass"
        self._mark(self.block, "start")
        _fault_hook(index, "start", self.rank)

    def close(self):
        """Stops the heartbeat and waits for it: a daemon thread caught inside a store call at
        interpreter exit aborts the process ("terminate called without an active exception")."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        self._store = None

    def _mark(self, block, what):
        if self._store is not None:
            try:
                self._store.set(f"progress/{self._global[self.rank]}",
                                json.dumps([block, what, time.time()]))
            except Exception:  # noqa: BLE001
                pass

    def _diagnose(self, what: str = "") -> Tuple[List[int], List[str]]:
        """(ranks believed at fault, one line per rank)."""
        if self._store is None:
            return [], ["(no rendezvous store to query for heartbeats)"]
        bad, lines, behind = [], [], []
        others = [r for r in range(self.world_size) if r != self.rank]

        def beats():
            return {r: float(self._store.get(f"hb/{self._global[r]}"))
                    if self._store.check([f"hb/{self._global[r]}"]) else None for r in others}

        def progress(r):
            key = f"progress/{self._global[r]}"
            return json.loads(self._store.get(key)) if self._store.check([key]) else None

        try:
            first = beats()
            # first word, before waiting: a launcher (torchrun) may stop this rank any moment now
            marks = {r: progress(r) for r in others}
            off = {r: m for r, m in marks.items() if not m or m[0] != self.block or m[1] != what}
            print(f"torch_piso [rank {self.rank}]: collective '{what}' failed in block {self.block}; "
                  f"ranks not at this step: " + (", ".join(
                      f"rank {r} (last at block {m[0]} ({m[1]}))" if m else f"rank {r} (no progress)"
                      for r, m in off.items()) or "none") + "; checking heartbeats",
                  file=sys.stderr, flush=True)
            # a live rank's heartbeat moves within heartbeat_s; watch for 2.5 periods
            time.sleep(2.5 * self.heartbeat_s)
            second = beats()
            now = time.time()
            for r in others:
                hb = second[r] if second[r] != first[r] else None
                pr = progress(r)
                where = f"last at block {pr[0]} ({pr[1]})" if pr else "no progress recorded"
                if hb is None:
                    bad.append(r)
                    age = "ever" if first[r] is None else f"{now - first[r]:.1f} s"
                    lines.append(f"rank {r}: dead (no heartbeat for {age}), {where}")
                else:
                    lines.append(f"rank {r}: alive, {where}")
                    if not pr or pr[0] != self.block or pr[1] != what:
                        behind.append(r)
        except Exception as exc:  # noqa: BLE001 - the store host (rank 0 / launcher) is gone
            bad = [r for r in range(self.world_size) if r != self.rank and r == 0] or bad
            lines.append(f"rendezvous store unreachable ({type(exc).__name__}); the store host "
                         "(rank 0 or the launcher) died")
        if not bad:
            bad = behind  # nobody died: blame the ranks not at our step (hung / too slow)
        return bad, lines

    @contextmanager
    def step(self, what: str, block: Optional[int] = None):
        """Run collectives for ``what`` in ``block``; a failure becomes a
        DistributedQuantizationError that names the rank(s) and the block."""
        if block is not None:
            self.block = block
        self._mark(self.block, what)
        t0 = time.perf_counter()
        try:
            yield
            self.collective_s += time.perf_counter() - t0
        except DistributedQuantizationError:
            raise
        except Exception as exc:  # noqa: BLE001 - backend errors have several types
            waited = time.perf_counter() - t0
            bad, lines = self._diagnose(what)
            who = f"rank(s) {bad}" if bad else "a peer rank"
            timed_out = waited >= 0.9 * self.timeout_s or "timeout" in str(exc).lower() or \
                "timed out" in str(exc).lower()
            raise DistributedQuantizationError(
                f"torch_piso distributed quantization stopped: {who} "
                f"{'died' if any(': dead' in l for l in lines) else 'timed out' if timed_out else 'failed'} "
                f"in block {self.block} ({what}); seen from rank {self.rank} after {waited:.1f} s. "
                + " | ".join(lines) + f". Backend error: {type(exc).__name__}: "
                + str(exc).strip().splitlines()[0][:300]) from exc

    # ---- collectives used by the pipeline ------------------------------------------------
    def all_reduce_(self, t: Tensor) -> Tensor:
        dev = t.device
        x = t if dev == self.comm_device else t.to(self.comm_device)
        self.dist.all_reduce(x, group=self.group)
        if x is not t:
            t.copy_(x)
        return t

    def global_rank(self, r: int) -> int:
        """The global rank of this group's rank ``r`` (what ``src=`` of a collective means)."""
        return self._global[r]

    def broadcast_(self, t: Tensor, src: int) -> Tensor:
        dev = t.device
        x = t if dev == self.comm_device else t.to(self.comm_device)
        self.dist.broadcast(x, src=self.global_rank(src), group=self.group)
        if x is not t:
            t.copy_(x)
        return t

    def all_gather_object(self, obj) -> list:
        out = [None] * self.world_size
        self.dist.all_gather_object(out, obj, group=self.group)
        return out

    def barrier(self):
        if self.backend == "gloo":
            # names the rank that does not arrive (on rank 0) instead of hanging
            self.dist.monitored_barrier(group=self.group, timeout=timedelta(seconds=self.timeout_s))
        else:
            self.dist.barrier(group=self.group)

    def shard(self, samples: Sequence) -> list:
        """This rank's contiguous share of the samples (sizes differ by at most one)."""
        n, w = len(samples), self.world_size
        if n < w:
            raise ValueError(f"quantize_model_distributed: {n} calibration samples for {w} ranks; every "
                             "rank needs at least one sample")
        lo = self.rank * n // w
        hi = (self.rank + 1) * n // w
        return list(samples[lo:hi])


def _fault_hook(block: int, where: str, rank: int) -> None:
    """Test-only fault injection: TORCH_PISO_FAULT="rank:block:exit|hang|raise" kills or hangs that
    rank at the start of that block, or makes its first module quantization there raise (used by
    tests/test_distributed.py)."""
    spec = os.environ.get("TORCH_PISO_FAULT")
    if not spec:
        return
    r, b, kind = spec.split(":")
    if int(r) == rank and int(b) == block:
        if kind == "raise" and where == "quantize":
            raise RuntimeError("injected failure (TORCH_PISO_FAULT)")
        if where != "start":
            return
        if kind == "exit":
            os._exit(17)
        if kind == "hang":
            time.sleep(3600)


# ---------------------------------------------------------------------------------------------
# block checkpoints
# ---------------------------------------------------------------------------------------------
def _sha256_bytes(*chunks: bytes) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()


def model_fingerprint(model: torch.nn.Module, samples_per_tensor: int = 4096) -> str:
    """Cheap identity of a model's float weights: every parameter's name, shape, dtype, a strided
    sample of its values, and its sums along every dimension in float64 (for a matrix, its row and
    column sums: an edit of whole rows or columns the sample misses still shows). Reductions, no
    copies; hashing 70B parameters in full would take minutes."""
    h = hashlib.sha256()
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "to_dict"):
        d = {k: v for k, v in cfg.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
        h.update(json.dumps(d, sort_keys=True, default=str).encode())
    for name, p in model.state_dict().items():
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        flat = p.detach().reshape(-1)
        if flat.numel():
            step = max(1, flat.numel() // samples_per_tensor)
            h.update(flat[::step].to("cpu", torch.float64).numpy().tobytes())
            t = p.detach()
            for dim in range(t.dim()):
                if t.dim() > 1 or dim > 0 or step > 1:
                    sums = t.sum(dim=dim, dtype=torch.float64)
                    h.update(sums.to("cpu").reshape(-1).numpy().tobytes())
    return h.hexdigest()


def calibration_fingerprint(samples: Sequence[Tensor]) -> str:
    h = hashlib.sha256()
    for s in samples:
        h.update(str(tuple(s.shape)).encode())
        h.update(s.to(torch.int64).cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class BlockCheckpoint:
    """Finished blocks of one quantization run, in ``directory``:

    ``manifest.json``            identity (recipe, model and calibration fingerprints) and, per
                                 finished (pass, block), its file, sha256 and report rows;
    ``<pass>-block<i>.safetensors``  ``<module>.codes`` (int8) and ``<module>.scales`` (float32).

    Writes are atomic: the tensor file is written to a temporary name, fsynced and renamed, then the
    manifest is rewritten the same way — a block counts as finished only once it is in the manifest
    with a matching hash. The identity is world-size independent, so a rerun on another number of
    ranks resumes too. Only one process writes (rank 0)."""

    MANIFEST = "manifest.json"
    VERSION = 1

    def __init__(self, directory, identity: dict, writer: bool = True):
        self.dir = Path(directory)
        self.identity = identity
        self.writer = writer
        self.key = _sha256_bytes(json.dumps(identity, sort_keys=True, default=str).encode())
        self.blocks: Dict[str, dict] = {}
        path = self.dir / self.MANIFEST
        if path.exists():
            try:
                m = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise CheckpointMismatchError(f"checkpoint {path}: unreadable manifest ({exc})") from exc
            if m.get("version") != self.VERSION or m.get("key") != self.key:
                diff = sorted(k for k in set(identity) | set(m.get("identity", {}))
                              if identity.get(k) != m.get("identity", {}).get(k))
                raise CheckpointMismatchError(
                    f"checkpoint {self.dir} belongs to another run (differs in: {diff}); use another "
                    "checkpoint_dir or delete it to start over")
            self.blocks = m.get("blocks", {})
            if writer:  # temporaries of a writer killed mid-save (their names hold its pid)
                for f in self.dir.glob(".*.tmp-*"):
                    f.unlink(missing_ok=True)
        elif writer:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._write_manifest()

    @staticmethod
    def _tag(mode: str, block: int) -> str:
        return f"{mode}/{block}"

    def _write_manifest(self):
        data = {"format": "torch_piso.block_checkpoint", "version": self.VERSION, "key": self.key,
                "identity": self.identity, "blocks": self.blocks}
        path = self.dir / self.MANIFEST
        tmp = self.dir / f".{self.MANIFEST}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        self._fsync_dir()

    def _fsync_dir(self):
        try:
            fd = os.open(self.dir, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:  # pragma: no cover - platforms without directory fsync
            pass

    def visible(self) -> bool:
        """Whether this process sees this run's manifest and every finished block's file."""
        try:
            m = json.loads((self.dir / self.MANIFEST).read_text())
        except (OSError, json.JSONDecodeError):
            return False
        return m.get("key") == self.key and all((self.dir / e["file"]).is_file()
                                                for e in self.blocks.values())

    def has(self, mode: str, block: int) -> bool:
        e = self.blocks.get(self._tag(mode, block))
        return e is not None and (self.dir / e["file"]).exists()

    def save(self, mode: str, block: int, quantized: Dict[str, Tuple[Tensor, Tensor]], rows: list):
        if not self.writer:
            return
        from safetensors.torch import save_file

        tensors = {}
        for name, (codes, scales) in quantized.items():
            tensors[f"{name}.codes"] = codes.detach().to("cpu", torch.int8).contiguous()
            tensors[f"{name}.scales"] = scales.detach().to("cpu", torch.float32).contiguous()
        fname = f"{mode}-block{block}.safetensors"
        tmp = self.dir / f".{fname}.tmp-{os.getpid()}"
        save_file(tensors, str(tmp))
        with open(tmp, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
            os.fsync(f.fileno())
        os.replace(tmp, self.dir / fname)
        self._fsync_dir()
        self.blocks[self._tag(mode, block)] = {"file": fname, "sha256": digest, "rows": rows}
        self._write_manifest()

    def load(self, mode: str, block: int) -> Tuple[Dict[str, Tuple[Tensor, Tensor]], list]:
        from safetensors.torch import load_file

        e = self.blocks[self._tag(mode, block)]
        path = self.dir / e["file"]
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != e["sha256"]:
            raise CheckpointMismatchError(f"checkpoint {path}: sha256 mismatch (corrupt or tampered); "
                                          "delete it to recompute that block")
        t = load_file(str(path))
        names = sorted({k.rsplit(".", 1)[0] for k in t})
        return {n: (t[f"{n}.codes"], t[f"{n}.scales"]) for n in names}, e["rows"]


# ---------------------------------------------------------------------------------------------
# the pipeline's distributed steps (called from torch_piso.pipeline._Runner)
# ---------------------------------------------------------------------------------------------
def reduce_statistics(ctx: DistContext, hc, Hfp: Optional[dict], names: Sequence[str]) -> None:
    """Data parallel: sum the group's raw accumulators (and the float-pass XᵀX of the report) over
    ranks before they are normalized by the global token count."""
    with ctx.step(f"all-reduce H/G of {','.join(names)}"):
        hc.all_reduce_(ctx.group)
        if Hfp is not None:
            ctx.all_reduce_(Hfp["H"])
            t = torch.tensor([Hfp["T"]], dtype=torch.int64, device=ctx.comm_device)
            ctx.all_reduce_(t)
            Hfp["T"] = int(t.item())


def quantize_group_parallel(runner, mods: dict, names: Sequence[str], res: dict, H_fp, mode: str,
                            obj: str, block: int, prefix: str):
    """Module parallel: each rank quantizes the modules :func:`assign_modules` gives it, then every
    module's codes (int8) and scales are broadcast from its owner; returns the QuantLinears (same on
    every rank) and the report rows (each from its owner, with the owner's rank)."""
    from .nn import QuantLinear

    ctx: DistContext = runner.dist
    cfg = runner.cfg
    costs = {n: module_cost(mods[n].out_features, mods[n].in_features, cfg, mode) for n in names}
    owner = assign_modules(costs, ctx.world_size)
    local = {}
    error = None
    for n in names:
        if owner[n] == ctx.rank:
            try:
                _fault_hook(block, "quantize", ctx.rank)
                H, G, _T = res[n]
                q, row = runner._quantize_one(prefix + n, mods[n], H, G, H_fp, mode, obj, block)
            except Exception as exc:  # noqa: BLE001 - reported to every rank below
                error = f"{prefix + n}: {type(exc).__name__}: {exc}"
                break
            row["rank"] = ctx.rank
            local[n] = (q, row)
    # rows (and errors) first: a failing owner must not leave the others waiting in a broadcast
    with ctx.step(f"gather results of {','.join(names)}"):
        gathered = ctx.all_gather_object({"rows": {n: r for n, (_q, r) in local.items()}, "error": error})
    failed = {r: g["error"] for r, g in enumerate(gathered) if g["error"]}
    if failed:
        raise DistributedQuantizationError(
            f"torch_piso distributed quantization stopped: rank(s) {sorted(failed)} failed in block "
            f"{ctx.block}: " + "; ".join(f"rank {r}: {e}" for r, e in failed.items()))
    new = {}
    gs = cfg.group_size
    with ctx.step(f"broadcast codes/scales of {','.join(names)}"):
        for n in names:
            lin = mods[n]
            N, D = lin.out_features, lin.in_features
            if owner[n] == ctx.rank:
                q = local[n][0]
                codes = q.codes().contiguous()
                scales = q.scales.detach().to(torch.float32).contiguous()
            else:
                codes = torch.empty(N, D, dtype=torch.int8, device=lin.weight.device)
                scales = torch.empty((N,) if gs == -1 else (N, D // gs), dtype=torch.float32,
                                     device=lin.weight.device)
            ctx.broadcast_(codes, owner[n])
            ctx.broadcast_(scales, owner[n])
            if owner[n] == ctx.rank:
                new[n] = local[n][0]
            else:
                new[n] = QuantLinear.from_linear(lin, codes, scales, cfg.bits, gs)
                if mode == "scales":
                    runner.fixed_scales[prefix + n] = scales.cpu()
    rows_by = {}
    for d in gathered:
        rows_by.update(d["rows"])
    rows = [rows_by[n] for n in names]
    if mode == "scales":
        for n in names:
            runner.scale_times.setdefault(prefix + n, rows_by[n]["scale_time_s"])
    return new, rows


def replay_block(runner, block, mode: str, index: int, prefix: str, originals: dict) -> list:
    """Resume: rebuild a finished block from its checkpoint (QuantLinears from the stored codes and
    scales; the decoupled pass's fixed scales) instead of recomputing it. Returns its report rows."""
    from .nn import QuantLinear, replace_linear

    cfg = runner.cfg
    data, rows = runner.ckpt.load(mode, index)
    rows_by = {r["module"]: r for r in rows}
    mods = dict(block.named_modules())
    new = {}
    for n, (codes, scales) in data.items():
        if n not in mods:
            raise CheckpointMismatchError(f"checkpoint block {index}: no module {n!r} in the model")
        originals[n] = mods[n]
        new[n] = QuantLinear.from_linear(mods[n], codes, scales, cfg.bits, cfg.group_size)
        if mode == "scales":
            runner.fixed_scales[prefix + n] = scales
            runner.scale_times[prefix + n] = rows_by.get(prefix + n, {}).get("scale_time_s", 0.0)
    replace_linear(block, new)
    return [dict(r, resumed=True) for r in rows]


def _identity(model, samples, cfg) -> dict:
    from . import __version__

    conf = cfg.to_dict()
    conf.pop("device", None)  # where it ran does not change which result is wanted
    return {"torch_piso": __version__, "config": conf, "model": model_fingerprint(model),
            "calibration": calibration_fingerprint(samples)}


def setup_run(model, samples, cfg, checkpoint_dir, ctx: Optional[DistContext]):
    """Checks that every rank has the same model, calibration and recipe, picks this rank's shard
    and opens the checkpoint (rank 0 writes; every rank reads the same manifest)."""
    ident = _identity(model, samples, cfg)
    local = samples
    if ctx is not None:
        with ctx.step("check model/calibration/recipe agree", "setup"):
            ids = ctx.all_gather_object(ident)
        bad = [r for r, x in enumerate(ids) if x != ids[0]]
        if bad:
            diff = sorted(k for k in ident if any(ids[r][k] != ids[0][k] for r in bad))
            raise DistributedQuantizationError(
                f"rank(s) {bad} have another {', '.join(diff)} than rank 0; every rank must load the "
                "same model, calibration samples and recipe")
        local = ctx.shard(samples)
    ckpt = None
    if checkpoint_dir is not None:
        err = None
        if ctx is None or ctx.rank == 0:
            try:
                ckpt = BlockCheckpoint(checkpoint_dir, ident, writer=True)
            except CheckpointMismatchError as exc:
                err = str(exc)
        if ctx is not None:
            with ctx.step("open checkpoint", "setup"):
                state = [err, ckpt.blocks if ckpt is not None else None]
                ctx.dist.broadcast_object_list(state, src=ctx.global_rank(0), group=ctx.group)
            err, blocks = state
            if err is None and ctx.rank != 0:
                ckpt = BlockCheckpoint.__new__(BlockCheckpoint)
                ckpt.dir, ckpt.identity, ckpt.writer = Path(checkpoint_dir), ident, False
                ckpt.key = _sha256_bytes(json.dumps(ident, sort_keys=True, default=str).encode())
                ckpt.blocks = blocks  # rank 0's view (files on a shared filesystem)
            if err is None:
                # Every rank must see what rank 0 wrote: with rank-local directories the ranks would
                # replay and recompute different blocks and their collectives would pair up wrongly.
                with ctx.step("check every rank sees the checkpoint", "setup"):
                    seen = ctx.all_gather_object(ckpt.visible())
                blind = [r for r, ok in enumerate(seen) if not ok]
                if blind:
                    err = (f"checkpoint_dir {checkpoint_dir}: rank(s) {blind} do not see the manifest "
                           "and block files rank 0 wrote there; it must be one directory every rank "
                           "shares (the same filesystem), not a rank-local path")
        if err is not None:
            raise CheckpointMismatchError(err)
    return local, ckpt


def quantized_state_digest(model) -> str:
    """sha256 over every QuantLinear's packed codes and scales (name order): equal on every rank."""
    from .nn import QuantLinear

    h = hashlib.sha256()
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            h.update(name.encode())
            h.update(m.packed.detach().cpu().numpy().tobytes())
            h.update(m.scales.detach().cpu().numpy().tobytes())
    return h.hexdigest()


def quantize_model_distributed(model, calibration, config, *, checkpoint_dir=None, group=None,
                               timeout_s: float = 600.0, progress: Optional[bool] = None,
                               output_dir=None, log=print):
    """:func:`torch_piso.quantize_model` on every rank of an initialized process group (torchrun +
    :func:`init_distributed`): data-parallel calibration over contiguous shards of ``calibration``
    (every rank passes the same full set), module-parallel quantization, and every rank returns the
    same quantized model (checked: a digest of all codes and scales is compared at the end).
    ``checkpoint_dir``: finished blocks are saved there (by rank 0; on a filesystem every rank sees)
    and a rerun resumes after the last one. Returns ``(model, report)``; only rank 0 logs and
    writes ``output_dir``."""
    from .pipeline import quantize_model_with_report

    ctx = DistContext(group=group, timeout_s=timeout_s)
    if ctx.rank != 0:
        log, output_dir = None, None
        progress = False if progress is None else progress
    try:
        model, report = quantize_model_with_report(
            model, calibration, config, progress=True if progress is None else progress,
            output_dir=output_dir, log=log, checkpoint_dir=checkpoint_dir, _dist=ctx)
        digest = quantized_state_digest(model)
        with ctx.step("compare results", None):
            digests = ctx.all_gather_object(digest)
        if any(d != digest for d in digests):
            raise DistributedQuantizationError(
                f"ranks ended with different quantized models (digests {digests})")
        report["distributed"]["result_sha256"] = digest
        report["distributed"]["collective_s"] = ctx.collective_s
    finally:
        ctx.close()
    return model, report
