"""``vdiff eval --sweep``: a grid of checkpoints x guidance x steps x seeds x prompts.

Each cell (checkpoint, cfg, steps, sampler, seed, prompt) generates one clip, starting
from noise keyed by (seed, prompt index) only (:func:`vdiff.sampling.noise_key`), so
cells that differ in checkpoint, guidance or steps start from the same noise. Cells
are dealt round-robin to processes; each process appends one row per metric to its own
shard as its cells finish, and a rerun skips every cell whose rows are there. Process 0
then adds the per-group metrics, merges the shards into ``results.jsonl`` /
``results.csv`` (long format, :data:`COLUMNS`) and writes the plots and ``index.html``.

Rows and where their values come from (``None`` = the column does not apply):

- per cell: the oracle's ``colour_acc`` ``shape_acc`` ``direction_acc``
  ``background_acc``, with audio ``sync_f1`` ``sync_precision`` ``sync_recall``, and
  ``flicker`` (written last: a cell counts as done once its ``flicker`` row exists);
- per checkpoint: ``flow_loss_val[_video|_audio]`` on the fixed (t, noise) grid;
- per (checkpoint, cfg, steps, sampler): ``fd_vae_features`` against the val clips;
- once per sweep: ``vae_psnr``, ``vae_ssim`` (the VAE is not swept) and ``fvd`` (null:
  not computed, vdiff has no I3D network).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from vdiff.errors import UserError
from vdiff.eval import plots
from vdiff.eval.metrics import (
    fixed_grid_flow_loss,
    flow_inputs,
    frechet_distance,
    nfe,
    temporal_flicker,
    vae_features,
)
from vdiff.eval.report import ATTRS, EVAL_CLIPS, clip_scores, vae_recon_scores
from vdiff.eval.sweep_grid import (  # noqa: F401  (parse_spec, COLUMNS re-exported)
    COLUMNS,
    DONE_METRIC,
    SHOWN_PROMPTS,
    SYNC_METRICS,
    Cell,
    ResultsStore,
    SweepSpec,
    assign,
    grid_cells,
    parse_spec,
    row,
    row_key,
    sort_key,
)
from vdiff.manifest import atomic_write_text
from vdiff.parallel.mesh import make_mesh
from vdiff.sampling import Generator, dit_checkpoint_steps, restore_dit, workdir_config, write_clip
from vdiff.train import stages
from vdiff.train.data import prepare_data

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- running
def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _agreed_steps(workdir: Path) -> list[int]:
    """The workdir's DiT checkpoint steps as process 0 sees them (one view for all)."""

    steps = dit_checkpoint_steps(workdir)[-1024:]
    if jax.process_count() == 1:
        return steps

    buf = np.full(1024, -1, np.int32)
    buf[: len(steps)] = steps
    return [int(x) for x in np.asarray(multihost_utils.broadcast_one_to_all(buf)) if x >= 0]


def _agreed(flag: bool) -> bool:
    """Process 0's ``flag``, on every process (decisions that steer collective calls)."""

    if jax.process_count() == 1:
        return bool(flag)

    return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))


def _local(module):
    """A replicated module's copy on this process's first device, so each process samples
    its own cells without the others (and one device does a batch-of-few job)."""

    graphdef, state = nnx.split(module)
    device = jax.local_devices()[0]

    def one(x):
        if not isinstance(x, jax.Array):
            return x
        if not x.is_fully_replicated:
            raise RuntimeError("sweep models must be replicated (data-parallel sampling mesh)")
        return jax.device_put(x.addressable_data(0), device)

    return nnx.merge(graphdef, jax.tree.map(one, state))


class _Models:
    """The workdir's generator on this process's first device, built on first use; the
    transformer is swapped per checkpoint, the rest is loaded once."""

    def __init__(self, workdir: Path, use_ema: bool):
        self.workdir, self.use_ema = workdir, use_ema
        self.gen, self.engine, self.step = None, None, None

    def get(self, step: int | None = None):
        if self.gen is None:
            gen = Generator.from_workdir(self.workdir, use_ema=self.use_ema, dit_step=step)
            for name in ("vae", "audio_ae", "dit"):
                if getattr(gen, name) is not None:
                    setattr(gen, name, _local(getattr(gen, name)))
            self.engine = stages.dit_engine(gen.config, make_mesh(gen.config))
            self.gen, self.step = gen, step
        elif step is not None and step != self.step:
            dit = restore_dit(
                self.workdir, self.gen.config, step=step, use_ema=self.use_ema, engine=self.engine
            )
            self.gen.dit, self.step = _local(dit), step
        return self.gen


class _Sweep:
    """One ``vdiff eval`` run over one sweep folder: its grid, store and models."""

    def __init__(self, workdir: Path, spec: SweepSpec, batch_size: int, progress: bool):
        self.workdir, self.spec, self.batch, self.progress = workdir, spec, batch_size, progress
        self.config = c = workdir_config(workdir)
        self.cfgs = spec.cfg or (float(c.sample.cfg),)
        self.steps = spec.steps or (int(c.sample.steps),)
        self.seeds = spec.seeds or (int(c.sample.seed),)
        self.samplers = spec.sampler or (str(c.sample.sampler),)
        self.fps, self.sr = float(c.data.fps), int(c.data.sample_rate)
        data = prepare_data(c, workdir)
        if not data.counts.get("val"):
            raise UserError(f"{workdir} has no val clips; the sweep scores against the val split")
        self.val = data.head("val", EVAL_CLIPS)
        self.prompts = _resolve_prompts(spec.prompts or int(c.sample.num_prompts), self.val)
        self.pid, self.pcount = jax.process_index(), jax.process_count()
        self.out = workdir / "eval" / spec.name
        self.store = ResultsStore(self.out, self.pid)
        self.models = _Models(workdir, bool(c.sample.use_ema))
        rows = self.store.read_rows()
        self.done = {row_key(r) for r in rows}
        # A cell is done once its last row is written: key order as in Cell.key.
        self.done_cells = {row_key(r)[:6] for r in rows if r["metric"] == DONE_METRIC}
        self.evaluated: list[int] = []
        self.computed = 0
        self._flow_arrays = None
        self._real_features = None

    def cells(self, steps) -> list[Cell]:
        return grid_cells(steps, self.cfgs, self.steps, self.samplers, self.seeds, self.prompts)

    def evaluate(self, step: int, *, explicit: bool) -> None:
        """This process's pending cells of checkpoint ``step``; on process 0 also the
        checkpoint's held-out loss. Every process calls this for the same steps (the
        restore is collective)."""

        pending = [c for c in self.cells([step]) if c.key not in self.done_cells]
        need_flow = row_key(row("flow_loss_val", None, checkpoint=step)) not in self.done
        self.evaluated.append(step)
        if not pending and not need_flow:
            return
        try:
            gen = self.models.get(step)
        except UserError:
            # A training run's retention (train.keep) may delete a listed step before it
            # is read; that step is skipped. Any other failure is the user's to see.
            if explicit or (self.workdir / "checkpoints" / "dit" / str(step)).is_dir():
                raise
            log.warning("checkpoint %d was deleted before it could be read; skipped", step)
            return
        mine = assign(pending, self.pid, self.pcount)
        groups: dict[tuple, list[Cell]] = {}
        for cell in mine:  # one generate() call per (cfg, steps, sampler, seed) batch
            groups.setdefault((cell.cfg, cell.steps, cell.sampler, cell.seed), []).append(cell)
        with tqdm(
            total=len(mine), desc=f"eval ckpt {step}", unit="clip", disable=not self.progress
        ) as bar:
            for group in groups.values():
                for i in range(0, len(group), self.batch):
                    self._run_batch(gen, group[i : i + self.batch])
                    bar.update(len(group[i : i + self.batch]))
        if self.pid == 0 and need_flow:
            t = time.time()
            losses = fixed_grid_flow_loss(
                gen.dit,
                self._flow_inputs(gen),
                audio_weight=float(self.config.diffusion.audio_loss_weight),
                batch=self.batch,
            )
            secs = time.time() - t
            rows = [row(k, v, checkpoint=step, seconds=secs) for k, v in sorted(losses.items())]
            self.store.append_rows(rows)

    def _run_batch(self, gen, cells: list[Cell]) -> None:
        """Generates, scores and records a batch of cells that share (cfg, steps, sampler, seed)."""

        c0 = cells[0]
        t = time.time()
        out = gen.generate(
            [c.prompt for c in cells],
            cfg=c0.cfg,
            steps=c0.steps,
            sampler=c0.sampler,
            seed=c0.seed,
            prompt_ids=[c.prompt_index for c in cells],
            batch_size=len(cells),
            height=self.val.bucket.height,  # the val clips' shape, which the features compare to
            width=self.val.bucket.width,
            num_frames=self.val.bucket.frames,
        )
        seconds = (time.time() - t) / len(cells)
        n = nfe(c0.steps, c0.sampler, c0.cfg)
        features = vae_features(gen.vae, out["video"], batch=self.batch)
        for j, cell in enumerate(cells):
            video = out["video"][j]
            audio = out["audio"][j] if "audio" in out else None
            scores = clip_scores(video, cell.prompt, self.fps, audio, self.sr)
            if cell.seed == self.seeds[0] and cell.prompt_index < SHOWN_PROMPTS:
                write_clip(self.out / "clips" / cell.clip_name, video, self.fps, audio, self.sr)
            self.store.append_features(cell, features[j])
            metrics = [m for m in (*ATTRS, *SYNC_METRICS) if m in scores]
            rows = [row(m, scores[m], cell=cell, nfe=n, seconds=seconds) for m in metrics]
            rows.append(
                row(DONE_METRIC, temporal_flicker(video), cell=cell, nfe=n, seconds=seconds)
            )
            self.store.append_rows(rows)
            self.computed += 1

    def _flow_inputs(self, gen) -> dict:
        """Val latents (normalised like the transformer's training data), tokens, masks."""
        if self._flow_arrays is None:
            self._flow_arrays = flow_inputs(gen, self.val, self.batch)
        return self._flow_arrays

    def _fd_groups(self) -> tuple[dict, dict[tuple, list[np.ndarray]]]:
        """(FD state: clips per group when last computed, groups with new clips)."""
        path = self.store.shards / "fd_state.json"
        state = json.loads(path.read_text()) if path.exists() else {}
        by_group: dict[tuple, list[np.ndarray]] = {}
        for key, feats in self.store.read_features().items():
            by_group.setdefault(tuple(key[:4]), []).append(feats)
        stale = {g: f for g, f in by_group.items() if state.get(json.dumps(list(g))) != len(f)}
        return state, stale

    def _need_vae_rows(self) -> bool:
        # Needs a checkpoint to load the generator; a follow run that saw none has no rows.
        return row_key(row("vae_psnr", None)) not in self.done and bool(self.evaluated)

    def finish_needs_models(self) -> bool:
        return self.models.gen is None and (self._need_vae_rows() or bool(self._fd_groups()[1]))

    def finish(self) -> list[dict]:
        """Process 0: sweep-level and per-group rows, then the merged table."""

        rows = []
        if self._need_vae_rows():
            t = time.time()
            psnr, ssim = vae_recon_scores(self.models.get().vae, self.val.video)
            secs = time.time() - t
            rows += [row("vae_psnr", psnr, seconds=secs), row("vae_ssim", ssim, seconds=secs)]
        if row_key(row("fvd", None)) not in self.done:
            rows.append(row("fvd", None))
        # Fréchet distance per group, recomputed only when the group has new clips.
        state, stale = self._fd_groups()
        for group, feats in sorted(stale.items(), key=lambda kv: sort_key(row("", 0, group=kv[0]))):
            if self._real_features is None:
                self._real_features = vae_features(
                    self.models.get().vae, self.val.video, self.batch
                )
            fd = frechet_distance(self._real_features, np.stack(feats))
            rows.append(
                row("fd_vae_features", fd, group=group, nfe=nfe(group[2], group[3], group[1]))
            )
            state[json.dumps(list(group))] = len(feats)
        self.store.append_rows(rows)
        atomic_write_text(self.store.shards / "fd_state.json", json.dumps(state))
        return self.store.merge()


def _resolve_prompts(prompts: int | tuple[str, ...], val) -> list[str]:
    """The sweep's prompts: given strings, or the first N distinct val captions (a duplicate
    caption would give two cells the same row key)."""
    if isinstance(prompts, tuple):
        return list(prompts)
    distinct = list(dict.fromkeys(val.captions))
    if prompts > len(distinct):
        log.warning(
            "prompts=%d but val has %d distinct captions; using those", prompts, len(distinct)
        )
    return distinct[:prompts]


def run_sweep(
    workdir: Path,
    spec: SweepSpec,
    *,
    follow_timeout: float = 3600.0,
    poll_seconds: float = 30.0,
    batch_size: int = 8,
    progress: bool = True,
) -> Path:
    """Runs (or resumes) a sweep; returns its folder ``WORKDIR/eval/NAME``.

    Every process must call this (restores are collective); process 0 writes the
    merged table, plots and ``index.html``.

    Args:
        workdir: a workdir written by ``vdiff train``.
        spec: what to sweep (:func:`parse_spec`).
        follow_timeout: with ``checkpoints="follow"``, stop waiting for new checkpoints
            after this many seconds (the run also stops once ``train.steps`` is saved).
        poll_seconds: how often ``follow`` looks for new checkpoints.
        batch_size: clips generated per sampler call.
        progress: tqdm bars.
    """

    t0 = time.time()
    workdir = Path(workdir)
    if batch_size < 1:
        raise UserError(f"--batch-size={batch_size} must be >= 1")
    available = _agreed_steps(workdir)
    if isinstance(spec.checkpoints, tuple):
        missing = [s for s in spec.checkpoints if s not in available]
        if missing:
            raise UserError(
                f"sweep spec checkpoints {missing} are not in {workdir}/checkpoints/dit "
                f"(it has {available or 'none'}); pick from those or use checkpoints=all"
            )
    elif spec.checkpoints == "all" and not available:
        raise UserError(
            f"{workdir}/checkpoints/dit has no checkpoint; train first, or use "
            "checkpoints=follow to wait for a running 'vdiff train'"
        )
    sweep = _Sweep(workdir, spec, batch_size, progress)
    _barrier("vdiff_eval_read_done")  # every process has read the done cells before any write
    if spec.checkpoints == "follow":
        final, deadline = int(sweep.config.train.steps), time.time() + follow_timeout
        while True:
            for step in available:
                if step not in sweep.evaluated:
                    sweep.evaluate(step, explicit=False)
            if _agreed(final in sweep.evaluated or time.time() >= deadline):
                break
            log.info("waiting for new checkpoints (final step %d)...", final)
            time.sleep(max(0.0, min(poll_seconds, deadline - time.time())))
            available = _agreed_steps(workdir)
    else:
        steps = available if spec.checkpoints == "all" else sorted(spec.checkpoints)
        for step in steps:
            sweep.evaluate(step, explicit=spec.checkpoints != "all")
    computed = sweep.computed
    if jax.process_count() > 1:  # also waits for every shard to be complete
        computed = int(np.sum(multihost_utils.process_allgather(np.int32(computed))))
    # Loading models is collective: every process joins when process 0 needs them.
    if _agreed(sweep.pid == 0 and sweep.finish_needs_models()):
        sweep.models.get()
    if sweep.pid == 0:
        rows = sweep.finish()
        info = {
            "spec": dataclasses.asdict(spec),
            "checkpoints": sweep.evaluated,
            "cfg": list(sweep.cfgs),
            "steps": list(sweep.steps),
            "sampler": list(sweep.samplers),
            "seeds": list(sweep.seeds),
            "prompts": sweep.prompts,
            "cells": len(sweep.cells(sweep.evaluated)),
            "cells_computed": computed,
            "processes": sweep.pcount,
            "seconds": time.time() - t0,
            "notes": plots.NOTES,
        }
        atomic_write_text(sweep.out / "sweep.json", json.dumps(info, indent=2))
        shown = [
            c
            for c in sweep.cells(sweep.evaluated)
            if (sweep.out / "clips" / f"{c.clip_name}.mp4").exists()
        ]
        plots.write_plots(rows, sweep.out / "plots")
        plots.write_html(sweep.out, rows, info, shown)
        log.info(
            "sweep %s: %d cells (%d computed now) in %.1f s -> %s",
            spec.name, info["cells"], computed, info["seconds"], sweep.out / "index.html",
        )  # fmt: skip
    return sweep.out
