r"""A secant curvature for delay compensation, estimated at the server: a trial.

Example::

  python -m experiments.secant_trial \
      --config=experiments/configs/secant_trial.py \
      --workdir=runs/secant_trial

DC-ASGD corrects a gradient :math:`g = \nabla L(w_m, b)` computed at the
model :math:`w_m` worker :math:`m` pulled by :math:`g + \lambda \hat h \odot
(w - w_m)`, with a diagonal curvature :math:`\hat h`: :math:`g \odot g`
(DC-ASGD), the per-example Fisher diagonal the worker pushes
(:func:`dcasgd_optax.fisher_compensation`). The curvature diagnostic
(``Simulator(diagnose_curvature=True)``) found both far too small along
:math:`d = w - w_m`. This trial estimates the curvature from what the
server already sees, by secants. Worker :math:`m`'s two consecutive pushes
were computed at two models it pulled, one round of the server apart:

.. math::
  \Delta w = w_m - w_m^{prev}, \qquad \Delta g = g - g_m^{prev},

so :math:`\Delta g \approx H \Delta w`, over the same distance as the
displacement the correction must bridge. Per coordinate, least squares
over the recent pushes of every worker (running means with decay
:math:`\beta`):

.. math::
  \hat h = \max(0, \overline{\Delta g \odot \Delta w})
           \,/\, \overline{\Delta w \odot \Delta w},
  \qquad
  c = g + \mathrm{clip}\big(\lambda\, \hat h \odot d,\;
                            -\kappa |g|,\; \kappa |g|\big),

with :math:`\hat h = 0` before a worker's second push and where
:math:`\overline{\Delta w \odot \Delta w} = 0`. The clip (``trial.clip``,
:math:`\kappa`) is DC-ASGD-a-clip's bound on the term. The server keeps, per
worker, its previous gradient and previous model (two more copies of the
model per worker beside DC's backups) and two params-sized running means;
the worker computes and pushes nothing new. Also measured: the scalar
secant :math:`\hat h = \overline{\Delta g^\top \Delta w} /
\overline{\Delta w^\top \Delta w}` (the Barzilai-Borwein step's curvature,
Barzilai and Borwein 1988, isotropic) and the diagonal without the clip.

The trial replays the quick tier's plain-SGD cell (cyclic arrivals, M = 32)
in a plain JAX loop (``lax.scan`` over the arrivals), not through the
harness: its ASGD is checked against the harness's, run for run
(tests/test_experiments_secant_trial.py; the committed table's ASGD row is
the grid's, digit for digit). Not a library transformation: a trial that
says whether one is worth building.

Stages (all in one go): ``measure`` (at ASGD's tuned rate on the first
tuning seed: the ratio :math:`k = d^\top (c - g) / d^\top H d` of each
estimate's curvature to the true one along :math:`d`, by a
Hessian-vector product at :math:`w_m`, and the cosine of each corrected
gradient with the fresh :math:`\nabla L(w, b)`), ``tune`` (the grid's
learning rates times ``trial.lambdas`` on the tuning seeds) and
``report`` (the chosen setting, and ASGD at its tuned rate, on the reported
seeds, paired). Writes ``results.json`` and ``table.md`` to ``--workdir``.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, NamedTuple

from absl import app
from absl import flags
from absl import logging
import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments import input_pipeline
from experiments import models
from experiments import programs
from experiments import startup
from experiments import statistics

METHODS = (
    "asgd",
    "secant",
    "secant-unclipped",
    "secant-scalar",
    "exact-clipped",
)
"""``asgd``: the stale gradient; ``secant``: the clipped diagonal secant;
``secant-unclipped``: the same without the clip; ``secant-scalar``: the
isotropic (Barzilai-Borwein) secant; ``exact-clipped``: the control, the
exact Hessian-vector product in place of the secant, with the same λ and
clip (is it the estimate, or the clip and a damped λ?)."""

COMPARED = ("asgd", "secant", "exact-clipped")
"""The methods tuned and reported (the others are only measured)."""

MEASURED = ("secant", "secant-unclipped", "secant-scalar")


class Problem:
  """The cell's model, data stream and evaluation, on flat parameters.

  Attributes:
    w0: the initial model (flat float32), from ``config.seed``'s init.
    loss: ``loss(w, idx) -> scalar``, the mean loss on examples ``idx``.
    evaluate: ``evaluate(w) -> test error``.
    idx: int32 ``[T, B]``, the examples of gradient ``t`` (the grid's
      stream, :func:`experiments.input_pipeline.gradient_indices`).
  """

  def __init__(self, config: ml_collections.ConfigDict, ds: Any, seed: int):
    c = ml_collections.ConfigDict(config.to_dict())
    c.seed = seed
    apply, params, _ = models.functional(programs.create_model(c, ds))
    loss3 = programs.make_loss(apply, ds)
    self.w0, unravel = ravel_pytree(params)
    self.loss = lambda w, idx: loss3(unravel(w), {}, {"idx": idx})[0]
    ev = programs.make_evaluate(apply, ds, c.eval_batch_size)
    self.evaluate = lambda w: float(ev(unravel(w), {})[0])
    steps = input_pipeline.steps_per_epoch(len(ds.train_labels), c.batch_size)
    self.idx = jnp.asarray(
        input_pipeline.gradient_indices(
            seed, len(ds.train_labels), c.batch_size, 0, c.num_epochs * steps
        )
    )


def secant_curvature(num: jax.Array, den: jax.Array) -> jax.Array:
  r""":math:`\max(0, num) / den`, and 0 where ``den`` is 0."""
  safe = jnp.where(den > 0, den, 1.0)
  return jnp.where(den > 0, jnp.maximum(num, 0.0) / safe, 0.0)


def correction(method: str, g, d, state, *, lam: float, clip: float, hd=None):
  """``method``'s term added to ``g`` (``d = w - w_m``), from the running
  means in ``state`` (``exact-clipped``: from ``hd``, H(w_m) d)."""
  if method == "asgd":
    return jnp.zeros_like(g)
  if method == "exact-clipped":
    bound = clip * jnp.abs(g)
    return jnp.clip(lam * hd, -bound, bound)
  if method == "secant-scalar":
    return lam * secant_curvature(state["num_s"], state["den_s"]) * d
  term = lam * secant_curvature(state["num"], state["den"]) * d
  if method == "secant-unclipped":
    return term
  bound = clip * jnp.abs(g)
  return jnp.clip(term, -bound, bound)


def init_state(w0: jax.Array, num_workers: int) -> dict[str, Any]:
  """Every worker holds ``w0``; no secant yet."""
  rows = jnp.tile(w0, (num_workers, 1))
  zeros = jnp.zeros_like(w0)
  return dict(
      w=w0,
      held=rows,
      prev_held=rows,
      prev_g=jnp.zeros_like(rows),
      seen=jnp.zeros(num_workers, bool),
      num=zeros,
      den=zeros,
      num_s=jnp.zeros(()),
      den_s=jnp.zeros(()),
  )


def fold_secant(state, m, g, *, decay: float) -> dict[str, Any]:
  """Folds worker ``m``'s secant (its gradient ``g`` at its model against
  its previous push) into the running means; unchanged at its first push."""
  dw = state["held"][m] - state["prev_held"][m]
  dg = g - state["prev_g"][m]
  seen = state["seen"][m]

  def mix(old, new):
    return jnp.where(seen, decay * old + (1 - decay) * new, old)

  return dict(
      state,
      num=mix(state["num"], dg * dw),
      den=mix(state["den"], dw * dw),
      num_s=mix(state["num_s"], jnp.vdot(dg, dw)),
      den_s=mix(state["den_s"], jnp.vdot(dw, dw)),
  )


def replay(
    problem: Problem,
    *,
    num_workers: int,
    learning_rate: float,
    method: str,
    lam: float = 1.0,
    decay: float = 0.99,
    clip: float = 1.0,
    momentum: float = 0.0,
    measure: bool = False,
) -> tuple[float, dict[str, np.ndarray], np.ndarray]:
  """Cyclic asynchronous SGD (with heavy-ball ``momentum`` at the server,
  as ``optax.sgd``'s: v <- mu v + c, w <- w - eta v) with ``method``'s
  correction; returns the final test error, with ``measure`` the per-arrival
  measurements (else ``{}``), and the final model (flat)."""
  if method not in METHODS:
    raise ValueError(
        f"Unknown method {method!r}; valid choices: {', '.join(METHODS)}."
    )
  grad = jax.grad(problem.loss)

  def step(state, t):
    m = t % num_workers  # cyclic arrivals: staleness num_workers - 1
    held, batch = state["held"][m], problem.idx[t]
    g = grad(held, batch)
    d = state["w"] - held
    state = fold_secant(state, m, g, decay=decay)
    hd = None
    if measure or method == "exact-clipped":
      _, hd = jax.jvp(lambda x: grad(x, batch), (held,), (d,))
    terms = {
        name: correction(name, g, d, state, lam=lam, clip=clip, hd=hd)
        for name in ((method, *MEASURED) if measure else (method,))
    }
    out = {}
    if measure:
      out = _measure(grad, state["w"], batch, g, d, hd, terms)
    v = g + terms[method]
    if momentum:  # the buffer is carried only when there is one
      v = momentum * state["v"] + v
      state = dict(state, v=v)
    w = state["w"] - learning_rate * v
    state = dict(
        state,
        w=w,
        held=state["held"].at[m].set(w),
        prev_held=state["prev_held"].at[m].set(held),
        prev_g=state["prev_g"].at[m].set(g),
        seen=state["seen"].at[m].set(True),
    )
    return state, out

  @jax.jit
  def run(w0):
    # The arrivals' iota and the state built here, inside the program: with
    # either passed in, XLA:CPU ran plain ASGD's loop 50 s against 0.3-0.9 s
    # (one measurement, on the idle machine).
    steps = jnp.arange(problem.idx.shape[0])
    state = init_state(w0, num_workers)
    if momentum:
      state["v"] = jnp.zeros_like(w0)
    return jax.lax.scan(step, state, steps)

  state, out = run(problem.w0)
  return (
      problem.evaluate(state["w"]),
      jax.tree.map(np.asarray, out),
      np.asarray(state["w"]),
  )


def _measure(grad, w, batch, g, d, hd, terms) -> dict[str, jax.Array]:
  """K along d and cos(c, f) of each estimate, the exact one's and the
  stale gradient's (``hd``: H(w_m) d)."""
  f = grad(w, batch)
  dhd = jnp.vdot(d, hd)

  def cos(a, b):
    return jnp.vdot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b))

  out = {
      "d_rel": jnp.linalg.norm(d) / jnp.linalg.norm(w),
      "cos_stale": cos(g, f),
      "cos_exact": cos(g + hd, f),
  }
  for name in MEASURED:
    out[f"k_{name}"] = jnp.vdot(d, terms[name]) / dhd
    out[f"cos_{name}"] = cos(g + terms[name], f)
  return out


class Cell(NamedTuple):
  """A cell of the trial: a grid optimizer preset at ``num_workers``."""

  optimizer: str  # "sgd" or "momentum" (the grid's presets)
  num_workers: int
  momentum: float
  learning_rates: tuple[float, ...]  # the grid's
  measure_learning_rate: float  # ASGD's tuned rate in the grid


def cells(config: ml_collections.ConfigDict) -> list[Cell]:
  """``config.trial.cells`` with the grid's rates and momentum."""
  return [
      Cell(
          opt,
          m,
          float(config.optimizer_presets[opt].momentum),
          tuple(config.tuning.learning_rates[opt]),
          config.trial.measure_learning_rates[opt],
      )
      for opt, m in config.trial.cells
  ]


def _replay(config, ds, cell: Cell, seed: int, **kwargs):
  t = config.trial
  return replay(
      Problem(config, ds, seed),
      num_workers=cell.num_workers,
      momentum=cell.momentum,
      decay=t.decay,
      clip=t.clip,
      **kwargs,
  )


def measure(config, ds, cell: Cell) -> list[dict[str, Any]]:
  """Medians of the measurements over three phases of one ASGD run at its
  tuned rate on the first tuning seed (the corrections are computed, not
  applied)."""
  _, out, _ = _replay(
      config,
      ds,
      cell,
      config.tuning.seeds[0],
      learning_rate=cell.measure_learning_rate,
      method="asgd",
      lam=1.0,
      measure=True,
  )
  total = len(out["d_rel"])
  rows = []
  for lo, hi in (
      (cell.num_workers, total // 5),
      (total // 5, total // 2),
      (total // 2, total),
  ):
    rows.append(
        {
            "arrivals": [lo, hi],
            **{k: float(np.nanmedian(v[lo:hi])) for k, v in out.items()},
        }
    )
  return rows


def _errors(config, ds, cell: Cell, seeds, **kwargs) -> list[float]:
  return [_replay(config, ds, cell, s, **kwargs)[0] for s in seeds]


def tune(config, ds, cell: Cell) -> list[dict[str, Any]]:
  """Every (learning rate, λ) of the trial for ``secant`` and its control
  on the tuning seeds, and ASGD's rates (its tuned choice must be the
  grid's)."""
  seeds = tuple(config.tuning.seeds)
  rows = []
  for method in COMPARED:
    lams = (0.0,) if method == "asgd" else config.trial.lambdas
    for lr in cell.learning_rates:
      for lam in lams:
        errs = _errors(
            config, ds, cell, seeds, learning_rate=lr, method=method, lam=lam
        )
        rows.append(
            dict(
                method=method,
                learning_rate=lr,
                lam=lam,
                errors=errs,
                mean=float(np.mean(errs)),
            )
        )
        logging.warning(
            "tune %s M=%d %s lr=%g lam=%g: %.4f",
            cell.optimizer,
            cell.num_workers,
            method,
            lr,
            lam,
            rows[-1]["mean"],
        )
  return rows


def best(rows: list[dict[str, Any]], method: str) -> dict[str, Any]:
  """The lowest mean tuning error of ``method`` (the first on ties)."""
  return min(
      (r for r in rows if r["method"] == method), key=lambda r: r["mean"]
  )


def report(
    config, ds, cell: Cell, tuned: list[dict[str, Any]]
) -> list[dict[str, Any]]:
  """Each method's chosen setting on the reported seeds."""
  rows = []
  for method in COMPARED:
    b = best(tuned, method)
    errs = _errors(
        config,
        ds,
        cell,
        tuple(config.grid.seeds),
        learning_rate=b["learning_rate"],
        method=method,
        lam=b["lam"],
    )
    rows.append(
        dict(
            method=method,
            learning_rate=b["learning_rate"],
            lam=b["lam"],
            errors=errs,
        )
    )
  return rows


NAMES = {"sgd": "Plain SGD", "momentum": "SGD with momentum 0.9"}


def write_table(results: dict[str, Any], references: dict[str, float]) -> str:
  """One cell's Markdown: its reported errors against the grid's references
  (``references``: sequential SGD's and the exact correction's mean error
  there), the paired difference, the curvature measurements and the
  tuning."""
  by = {r["method"]: r for r in results["report"]}
  a = np.asarray(by["asgd"]["errors"])
  seq = references["sequential"]
  share = lambda e: (a.mean() - e) / (a.mean() - seq)
  rates = results["learning_rates"]
  lines = [
      f"**{NAMES[results['optimizer']]}, cyclic arrivals, M = "
      f"{results['num_workers']}: final test error (%), mean ± std over the "
      "reported seeds (share of ASGD's gap to sequential SGD closed), and "
      "the paired difference from ASGD on the same seeds (points, 95% "
      "t-interval; n.s.: not resolved)**",
      "",
      "| method | learning rate | λ | error | share closed | minus ASGD |",
      "|---|---|---|---|---|---|",
      f"| sequential SGD (the grid's) | | | {100 * seq:.2f} | | |",
      "| exact Taylor, the grid's `exact-dc` (λ = 1, no clip) | | | "
      f"{100 * references['exact-dc']:.2f} | "
      f"{share(references['exact-dc']):.0%} | |",
  ]
  labels = {
      "asgd": "ASGD",
      "secant": "secant, clipped",
      "exact-clipped": "exact Taylor, clipped (control)",
  }
  for method in COMPARED:
    r = by[method]
    e = np.asarray(r["errors"])
    diff = "" if method == "asgd" else _interval(e - a)
    lam = "" if method == "asgd" else f"{r['lam']:g}"
    lines.append(
        f"| {labels[method]} | {r['learning_rate']:g} | {lam} | "
        f"{100 * e.mean():.2f} ± {100 * e.std(ddof=1):.2f} | "
        f"{share(e.mean()):.0%} | {diff} |"
    )
  lines += [
      "",
      "Curvature along d = w − w_m, k = dᵀ(c − g) / dᵀHd (λ = 1), and "
      "cos(c, f) with the fresh gradient: medians over an ASGD run at its "
      "tuned rate, first tuning seed:",
      "",
      "| arrivals | ‖d‖/‖w‖ | cos(g, f) | exact: cos | "
      + " | ".join(f"{n}: k | {n}: cos" for n in MEASURED)
      + " |",
      "|---|---|---|---|" + "---|---|" * len(MEASURED),
  ]
  for r in results["measure"]:
    lo, hi = r["arrivals"]
    lines.append(
        f"| {lo}–{hi} | {r['d_rel']:.3f} | {r['cos_stale']:.2f} | "
        f"{r['cos_exact']:.2f} | "
        + " | ".join(
            f"{r['k_' + n]:.2f} | {r['cos_' + n]:.2f}" for n in MEASURED
        )
        + " |"
    )
  lines += [
      "",
      "Tuning (mean final error over the tuning seeds, %; one column per "
      "learning rate):",
      "",
      "| method | λ | " + " | ".join(f"{lr:g}" for lr in rates) + " |",
      "|---|---|" + "---|" * len(rates),
  ]
  keys = dict.fromkeys((r["method"], r["lam"]) for r in results["tune"])
  for method, lam in keys:
    row = [
        f"{100 * r['mean']:.2f}"
        for r in results["tune"]
        if (r["method"], r["lam"]) == (method, lam)
    ]
    lines.append(f"| {method} | {lam:g} | " + " | ".join(row) + " |")
  return "\n".join(lines) + "\n"


def _interval(differences: np.ndarray) -> str:
  d = statistics.paired_interval(differences)
  if d is None:
    return "n/a (a diverged run)"
  text = (
      f"{100 * d['mean']:+.2f} [{100 * d['low']:+.2f}, {100 * d['high']:+.2f}]"
  )
  return text if d["resolved"] else text + " n.s."


def grid_references(
    stats: list[dict[str, Any]], optimizer: str, num_workers: int
) -> dict[str, float]:
  """Sequential SGD's and the exact correction's mean final error in the
  quick tier's cyclic cell of ``optimizer`` at ``num_workers`` (its
  ``stats.json``, loaded)."""
  out = {}
  for s in stats:
    if s["optimizer"] != optimizer:
      continue
    if s["algorithm"] == "sequential":
      out["sequential"] = s["mean"]
    if (
        s["algorithm"] == "exact-dc"
        and s["schedule"] == "cyclic"
        and s["num_workers"] == num_workers
    ):
      out["exact-dc"] = s["mean"]
  return out


def main(argv):
  # One core for the whole program, set before JAX makes its CPU client (its
  # threads inherit it): the loop's thousands of small ops ran 5-6x slower
  # when XLA:CPU's threads could spread over both cores of the 2-core
  # machine (measured, one ASGD replay at M = 32, idle machine: 39 s
  # unpinned, with or without --xla_cpu_multi_thread_eigen=false, against
  # 7 s pinned to one core).
  if hasattr(os, "sched_setaffinity"):  # Linux; elsewhere left as it is
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
  config, workdir = startup.setup(argv, compilation_cache=True)
  if config.schedule != "cyclic":
    raise ValueError(
        f"config.schedule={config.schedule!r}: the trial replays cyclic "
        "arrivals only."
    )
  os.makedirs(workdir, exist_ok=True)
  ds = input_pipeline.load(config)
  with open(flags.FLAGS.stats) as f:
    stats = json.load(f)
  start = time.time()
  results, parts = [], []
  for cell in cells(config):
    r = dict(
        optimizer=cell.optimizer,
        num_workers=cell.num_workers,
        learning_rates=list(cell.learning_rates),
        measure=measure(config, ds, cell),
    )
    r["tune"] = tune(config, ds, cell)
    r["report"] = report(config, ds, cell, r["tune"])
    results.append(r)
    parts.append(
        write_table(r, grid_references(stats, cell.optimizer, cell.num_workers))
    )
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump({"cells": results, "seconds": time.time() - start}, f, indent=1)
  text = "\n".join(parts)
  with open(os.path.join(workdir, "table.md"), "w") as f:
    f.write(text)
  print(text)


if __name__ == "__main__":
  startup.define_flags(workdir_help="Directory for the trial's outputs.")
  flags.DEFINE_string(
      "stats",
      os.path.join(
          os.path.dirname(__file__), "results", "methods-quick", "stats.json"
      ),
      "The quick tier's stats.json (sequential SGD's and the exact "
      "correction's errors).",
  )
  app.run(main)
