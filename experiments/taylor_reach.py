r"""Why the exact Taylor correction breaks with momentum: its reach, measured.

Example::

  python -m experiments.taylor_reach \
      --config=experiments/configs/taylor_reach.py \
      --workdir=runs/taylor_reach

The harness's exact correction (``Simulator(exact_compensation=1.0)``, the
grid's ``exact-dc`` row) pushes :math:`c = g + H d` with
:math:`g = \nabla L(w_{bak}, b)`, :math:`H = \nabla^2 L(w_{bak}, b)` and
:math:`d = w - w_{bak}`, in place of the fresh gradient
:math:`f = \nabla L(w, b)` on the same batch. Each run of the study is a run
of the methods grid (:func:`experiments.methods.cell_config`, replayed by
its :class:`experiments.programs.Program`'s simulator with the harness's
diagnostics), cut into segments of ``study.every`` arrivals; before each
segment the study reads the server's model :math:`w` and the arriving
worker's :math:`w_{bak}` (its backup, :func:`dcasgd_optax.worker_params`)
and measures, on that arrival's batch:

* ``d_rel`` :math:`\|d\| / \|w\|`; ``steps`` the server updates in it;
* ``stale_cos`` :math:`\cos(g, f)` and ``exact_cos`` :math:`\cos(c, f)`
  (the harness's ``stale_cosine`` / ``applied_cosine`` for ``exact-dc``);
* ``residual`` :math:`\|f - g - H d\| / \|f - g\|`, the Taylor remainder
  relative to the change it corrects (1: no better than not correcting;
  the harness's ``applied_error / stale_error`` for ``exact-dc``);
* ``secant`` :math:`d^\top (f - g) / d^\top H d`: the curvature along
  :math:`d` that the gradient really met over the delay over the one the
  expansion assumes (below 1: the expansion over-corrects);
* ``correction`` :math:`\|H d\| / \|g\|`, the size of the correction;
* ``hvp_noise`` :math:`\|H_b d - H_B d\| / \|H_B d\|`, the mini-batch
  product against one on ``study.big_batch`` training examples;
* ``flips``: the share of hidden ReLU units (over the batch) whose sign
  differs between :math:`w_{bak}` and :math:`w`.

Along an ASGD run the same quantities say what the exact correction *would*
do on ASGD's (stable) trajectory. The oracle (``sequential``) pushes the
fresh gradient itself: a server that receives :math:`f = \nabla L(w, b)`
for arrival :math:`k`'s batch makes exactly sequential SGD's step on the
same batch stream, so the oracle run is sequential SGD at the same rate
(the harness's one-worker replay, which its tests check against a
one-arrival-at-a-time loop).

Writes ``samples.csv`` (one row per measured arrival), ``curves.csv`` (test
error every ``study.eval_every`` arrivals), ``table.md`` and
``taylor_reach.png`` to ``--workdir``.
"""

from __future__ import annotations

import csv
import functools
import math
import os
import time
from typing import Any

from absl import app
from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import dcasgd_optax
from experiments import input_pipeline
from experiments import methods
from experiments import models
from experiments import programs
from experiments import startup
from experiments import train

SAMPLE_KEYS = (
    "d_rel",
    "stale_cos",
    "exact_cos",
    "residual",
    "secant",
    "correction",
    "hvp_noise",
    "flips",
)
HARNESS_KEYS = (
    "stale_cosine",
    "applied_cosine",
    "stale_error",
    "applied_error",
)
D_BINS = (0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, math.inf)


def _flat(tree: Any) -> jax.Array:
  return jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(tree)])


def _cos(a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.vdot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b))


def _hidden_signs(params: Any, images: jax.Array) -> jax.Array:
  """The signs of the MLP's hidden pre-activations, ``[B, units]``."""
  h = images.reshape(images.shape[0], -1)
  signs = []
  layers = params["hidden"]
  for i in sorted(layers):
    z = h @ layers[i]["kernel"] + layers[i]["bias"][None]
    signs.append(z > 0)
    h = jax.nn.relu(z)
  return jnp.concatenate(signs, axis=-1)


def measure(
    loss: Any,
    images: jax.Array,
    big_batch: Any,
    held: Any,
    params: Any,
    batch: Any,
) -> dict[str, jax.Array]:
  """The figures of one arrival (module docstring): the worker holds
  ``held``, the server ``params``; ``loss(params, batch)`` is the run's."""
  grad = jax.grad(loss)
  d = jax.tree.map(jnp.subtract, params, held)
  g, f = grad(held, batch), grad(params, batch)
  _, hd = jax.jvp(lambda p: grad(p, batch), (held,), (d,))
  _, hd_big = jax.jvp(lambda p: grad(p, big_batch), (held,), (d,))
  d, g, f, hd, hd_big = map(_flat, (d, g, f, hd, hd_big))
  c = g + hd
  x = images[batch["idx"]]
  flips = jnp.mean(_hidden_signs(held, x) != _hidden_signs(params, x))
  return dict(
      d_rel=jnp.linalg.norm(d) / jnp.linalg.norm(_flat(params)),
      stale_cos=_cos(g, f),
      exact_cos=_cos(c, f),
      residual=jnp.linalg.norm(f - c) / jnp.linalg.norm(f - g),
      secant=jnp.vdot(d, f - g) / jnp.vdot(d, hd),
      correction=jnp.linalg.norm(hd) / jnp.linalg.norm(g),
      hvp_noise=jnp.linalg.norm(hd - hd_big) / jnp.linalg.norm(hd_big),
      flips=flips.astype(jnp.float32),
  )


def _finite(tree: Any) -> bool:
  return bool(all(jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)))


def trace(
    config: ml_collections.ConfigDict,
    cache: programs.ProgramCache | None = None,
) -> dict[str, list]:
  """Runs one configuration of the grid (``config.algorithm``, rate ...)
  segment by segment and measures every ``config.study.every``-th arrival.

  Returns:
    ``samples``: one dict per measured arrival (``step``, ``staleness``,
    :data:`SAMPLE_KEYS` and the harness's :data:`HARNESS_KEYS`; none for a
    single worker, whose gradients are fresh); ``curve``: ``(step,
    test_error)`` every ``study.eval_every`` arrivals (and at the end);
    ``params``: the server's final model. A run whose params stop being
    finite ends there (test error NaN).
  """
  s = config.study
  for name in ("every", "eval_every", "big_batch"):
    if isinstance(s[name], bool) or not isinstance(s[name], int) or s[name] < 1:
      raise ValueError(
          f"config.study.{name} must be an int >= 1, got " f"{s[name]!r}."
      )
  if s.eval_every % s.every:
    raise ValueError(
        f"config.study.eval_every ({s.eval_every}) must be a multiple of "
        f"config.study.every ({s.every})."
    )
  if config.model != "mlp":
    raise ValueError(
        f"config.model must be 'mlp' (ReLU flips read its layers), got "
        f"{config.model!r}."
    )
  config = ml_collections.ConfigDict(config.to_dict())
  config.diagnostics_every = s.every
  cache = programs.ProgramCache() if cache is None else cache
  program = cache.program(config)
  run = train._Run(config, program)  # pylint: disable=protected-access
  ds = program.ds
  apply, _, _ = models.functional(programs.create_model(config, ds))
  stateful_loss = programs.make_loss(apply, ds)
  loss = lambda p, b: stateful_loss(p, {}, b)[0]
  images = jnp.asarray(ds.train_images)
  big = {
      "idx": jnp.arange(min(s.big_batch, len(ds.train_labels)), dtype=jnp.int32)
  }
  measured = jax.jit(functools.partial(measure, loss, images, big))
  total = config.num_epochs * run.steps_per_epoch
  batches = input_pipeline.batches(
      ds, config.seed, config.batch_size, run.rng, 0, total
  )
  arrivals = run.arrivals[:total]
  state = run.init()
  samples, curve = [], []
  single = program.num_workers == 1
  for start in range(0, total, s.every):
    stop = min(start + s.every, total)
    batch = jax.tree.map(lambda x, i=start: x[i], batches)
    row = None
    if not single:
      worker = int(arrivals[start])
      held = dcasgd_optax.worker_params(state.opt_state, worker)
      row = {
          k: float(v) for k, v in measured(held, state.params, batch).items()
      }
    state, metrics = program.sim.replay(
        state,
        jax.tree.map(lambda x, a=start, b=stop: x[a:b], batches),
        arrivals[start:stop],
    )
    if row is not None:
      row.update(step=start, staleness=int(metrics["staleness"][0]))
      row.update({k: float(metrics[k][0]) for k in HARNESS_KEYS})
      samples.append(row)
    finite = _finite(state.params)
    if stop % s.eval_every == 0 or stop == total or not finite:
      error = (
          float(program.evaluate(state.params, {})[0]) if finite else math.nan
      )
      curve.append((stop, error))
    if not finite:
      break
  return {"samples": samples, "curve": curve, "params": state.params}


def runs(config: ml_collections.ConfigDict) -> list[dict]:
  """Every run of the study: ``case`` (optimizer, M), rate, algorithm, seed."""
  out = []
  for seed in config.study.seeds:
    for optimizer, m, rates in config.study.cases:
      for lr in rates:
        for algorithm in config.study.algorithms:
          out.append(
              dict(
                  optimizer=optimizer,
                  num_workers=int(m),
                  learning_rate=float(lr),
                  algorithm=algorithm,
                  seed=int(seed),
              )
          )
  return out


def run_config(
    config: ml_collections.ConfigDict, r: dict
) -> ml_collections.ConfigDict:
  """The grid's config of run ``r``
  (:func:`experiments.methods.cell_config`)."""
  cell = methods.Cell(
      r["optimizer"], "cyclic", r["num_workers"], r["algorithm"]
  )
  c = methods.cell_config(
      config, cell, r["seed"], {"learning_rate": r["learning_rate"]}
  )
  c.study = config.study
  return c


def diverged_at(curve: list, threshold: float, settle: int) -> float:
  """Where a run diverged: the first step whose test error is NaN, or, for a
  run that ends at ``threshold`` or above, the first step from ``settle`` on
  (before it every run's error is high) at or above it. NaN: it did not
  (a run that comes back below ``threshold`` did not diverge)."""
  for step, error in curve:
    if math.isnan(error):
      return step
  if curve and curve[-1][1] >= threshold:
    for step, error in curve:
      if step >= settle and error >= threshold:
        return step
  return math.nan


def summarize(r: dict, result: dict, threshold: float, settle: int) -> dict:
  """One row of the table: the run's end and its medians over arrivals
  before it diverged (all of them when it did not)."""
  curve = result["curve"]
  stop = diverged_at(curve, threshold, settle)
  samples = [
      x for x in result["samples"] if math.isnan(stop) or x["step"] < stop
  ]
  row = dict(
      r, final_error=curve[-1][1] if curve else math.nan, diverged_at=stop
  )
  for k in SAMPLE_KEYS:
    values = np.array([x[k] for x in samples], np.float64)
    values = values[np.isfinite(values)]
    row[k] = float(np.median(values)) if values.size else math.nan
  # The last quarter of the sampled arrivals before it diverged (or ended).
  tail = samples[-max(len(samples) // 4, 1) :] if samples else []
  for k in ("d_rel", "residual", "exact_cos"):
    values = np.array([x[k] for x in tail], np.float64)
    values = values[np.isfinite(values)]
    row[k + "_late"] = float(np.median(values)) if values.size else math.nan
  return row


def binned(all_samples: list[dict]) -> list[dict]:
  """Median residual, exact cosine, secant ratio and flips per bin of
  ``d_rel``, per optimizer (the case's label), over every multi-worker run."""
  out = []
  labels = sorted({x["case"] for x in all_samples})
  for label in labels:
    xs = [
        x
        for x in all_samples
        if x["case"] == label
        and all(math.isfinite(x[k]) for k in ("d_rel", "residual"))
    ]
    for lo, hi in zip(D_BINS[:-1], D_BINS[1:]):
      b = [x for x in xs if lo <= x["d_rel"] < hi]
      if not b:
        continue
      row = dict(case=label, d_low=lo, d_high=hi, n=len(b))
      for k in (
          "residual",
          "exact_cos",
          "stale_cos",
          "secant",
          "flips",
          "hvp_noise",
      ):
        v = np.array([x[k] for x in b], np.float64)
        v = v[np.isfinite(v)]
        row[k] = float(np.median(v)) if v.size else math.nan
      out.append(row)
  return out


def reach_table(rows: list[dict]) -> str:
  """Per case and rate: each algorithm's final test error (%) per seed,
  ``NaN`` where it diverged to non-finite params, and (``†``) where it
  ended at or above the threshold (:func:`diverged_at`)."""
  algos = list(dict.fromkeys(r["algorithm"] for r in rows))
  keys = list(
      dict.fromkeys(
          (r["optimizer"], r["num_workers"], r["learning_rate"]) for r in rows
      )
  )
  head = ("case", "lr") + tuple(algos)
  lines = [
      "**Reach** (final test error (%) per seed; NaN: the params became "
      "non-finite; †: diverged, ended at or above the threshold)\n",
      "| " + " | ".join(head) + " |",
      "|" + "---|" * len(head),
  ]
  for opt, m, lr in keys:
    cells = [f"{opt} M={m}", f"{lr:g}"]
    for a in algos:
      out = []
      for r in rows:
        if (
            r["optimizer"],
            r["num_workers"],
            r["learning_rate"],
            r["algorithm"],
        ) != (opt, m, lr, a):
          continue
        e = r["final_error"]
        mark = "†" if math.isfinite(r["diverged_at"]) else ""
        out.append("NaN" if math.isnan(e) else f"{100 * e:.1f}{mark}")
      cells.append(" / ".join(out))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def _fmt(x: Any, digits: int = 3) -> str:
  if isinstance(x, float):
    return "—" if math.isnan(x) else f"{x:.{digits}g}"
  return str(x)


def write_report(
    config: ml_collections.ConfigDict,
    rows: list[dict],
    bins: list[dict],
    workdir: str,
) -> str:
  """Writes table.md (returns it)."""
  text = reach_table(rows) + "\n"
  head = (
      "case",
      "lr",
      "algorithm",
      "seed",
      "final error",
      "diverged at",
      "‖d‖/‖w‖",
      "late ‖d‖/‖w‖",
      "residual",
      "late residual",
      "cos(g,f)",
      "cos(c,f)",
      "late cos(c,f)",
      "secant",
      "‖Hd‖/‖g‖",
      "HVP noise",
      "ReLU flips",
  )
  lines = [
      text,
      "**Each run** (medians over the measured arrivals before it "
      "diverged; *late*: the last quarter of them. For ASGD the exact "
      "quantities are what the correction would do on ASGD's own "
      "trajectory; sequential is the oracle, nothing to measure)\n",
      "| " + " | ".join(head) + " |",
      "|" + "---|" * len(head),
  ]
  for r in rows:
    cells = (
        f"{r['optimizer']} M={r['num_workers']}",
        _fmt(r["learning_rate"]),
        r["algorithm"],
        str(r["seed"]),
        _fmt(100 * r["final_error"]),
        _fmt(r["diverged_at"]),
        _fmt(r["d_rel"]),
        _fmt(r["d_rel_late"]),
        _fmt(r["residual"]),
        _fmt(r["residual_late"]),
        _fmt(r["stale_cos"]),
        _fmt(r["exact_cos"]),
        _fmt(r["exact_cos_late"]),
        _fmt(r["secant"]),
        _fmt(r["correction"]),
        _fmt(r["hvp_noise"]),
        _fmt(r["flips"]),
    )
    lines.append("| " + " | ".join(cells) + " |")
  bhead = (
      "case",
      "‖d‖/‖w‖",
      "arrivals",
      "residual",
      "cos(c,f)",
      "cos(g,f)",
      "secant",
      "ReLU flips",
      "HVP noise",
  )
  lines += [
      "",
      "**The Taylor residual against the displacement** (every "
      "measured arrival of every ASGD and exact-dc run, medians per "
      "bin of ‖d‖/‖w‖)\n",
      "| " + " | ".join(bhead) + " |",
      "|" + "---|" * len(bhead),
  ]
  for b in bins:
    cells = (
        b["case"],
        f"[{b['d_low']:g}, {b['d_high']:g})",
        str(b["n"]),
        _fmt(b["residual"]),
        _fmt(b["exact_cos"]),
        _fmt(b["stale_cos"]),
        _fmt(b["secant"]),
        _fmt(b["flips"]),
        _fmt(b["hvp_noise"]),
    )
    lines.append("| " + " | ".join(cells) + " |")
  text = "\n".join(lines) + "\n"
  with open(os.path.join(workdir, "table.md"), "w") as f:
    f.write(text)
  return text


def _write_csv(path: str, rows: list[dict]) -> None:
  if not rows:
    return
  keys = list(rows[0])
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, keys)
    w.writeheader()
    w.writerows(rows)


def plot(results: list[tuple[dict, dict]], path: str) -> None:
  """Test error against arrivals per case, and the residual against
  ``d_rel`` over every measured arrival."""
  import matplotlib.figure  # pylint: disable=g-import-not-at-top

  cases = sorted(
      {(r["optimizer"], r["num_workers"]) for r, _ in results},
      key=lambda x: (x[0] != "momentum", -x[1]),
  )
  fig = matplotlib.figure.Figure(
      figsize=(4.2 * (len(cases) + 1), 3.8), layout="constrained"
  )
  axes = fig.subplots(1, len(cases) + 1)
  styles = {"asgd": "-", "exact-dc": "--", "sequential": ":"}
  for ax, (opt, m) in zip(axes, cases):
    rates = sorted(
        {
            r["learning_rate"]
            for r, _ in results
            if (r["optimizer"], r["num_workers"]) == (opt, m)
        }
    )
    colors = dict(
        zip(
            rates,
            (
                "tab:blue",
                "tab:green",
                "tab:orange",
                "tab:red",
                "tab:purple",
                "tab:brown",
            ),
        )
    )
    for r, res in results:
      if (
          (r["optimizer"], r["num_workers"]) != (opt, m)
          or not res["curve"]
          or r["seed"] != results[0][0]["seed"]
      ):
        continue
      steps, errors = zip(*res["curve"])
      errors = [1.0 if math.isnan(e) else e for e in errors]
      ax.plot(
          steps,
          100 * np.array(errors),
          styles[r["algorithm"]],
          color=colors[r["learning_rate"]],
          label=f"{r['algorithm']} {r['learning_rate']:g}",
      )
    ax.set(
        title=f"{opt}, cyclic M = {m}, seed {results[0][0]['seed']}",
        xlabel="arrivals",
        ylabel="test error (%)",
        ylim=(0, 100),
    )
    ax.legend(fontsize=5, ncol=3, loc="upper right")
  ax = axes[-1]
  samples = [
      dict(x, case=f"{r['optimizer']} M={r['num_workers']}")
      for r, res in results
      if r["algorithm"] != "sequential"
      for x in res["samples"]
  ]
  bins = binned(samples)
  for (opt, m), color in zip(cases, ("tab:red", "tab:blue", "tab:green")):
    rows = [
        b
        for b in bins
        if b["case"] == f"{opt} M={m}"
        and math.isfinite(b["d_high"])
        and b["d_low"] > 0
    ]
    x = [math.sqrt(b["d_low"] * b["d_high"]) for b in rows]
    ax.plot(
        x,
        [b["residual"] for b in rows],
        "-o",
        color=color,
        ms=4,
        label=f"{opt} M={m}: residual",
    )
    ax.plot(
        x,
        [b["secant"] for b in rows],
        "--s",
        color=color,
        ms=3,
        label=f"{opt} M={m}: secant / tangent",
    )
  ax.axhline(1.0, color="gray", lw=0.8)
  ax.set(
      xscale="log",
      yscale="log",
      xlabel="‖w − w_bak‖ / ‖w‖ (bin)",
      ylabel="median per bin",
      title="‖f − g − Hd‖ / ‖f − g‖ and dᵀ(f − g) / dᵀHd",
  )
  ax.legend(fontsize=6)
  fig.savefig(path, dpi=110)


def study(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Every run of :func:`runs`; writes the outputs; returns table.md."""
  os.makedirs(workdir, exist_ok=True)
  cache = programs.ProgramCache()
  results, rows, all_samples, curves = [], [], [], []
  t0 = time.perf_counter()
  for r in runs(config):
    t = time.perf_counter()
    res = trace(run_config(config, r), cache)
    results.append((r, res))
    rows.append(
        summarize(r, res, config.study.diverged_error, config.study.settle)
    )
    case = f"{r['optimizer']} M={r['num_workers']}"
    all_samples += [dict(case=case, **r, **x) for x in res["samples"]]
    curves += [dict(**r, step=s, test_error=e) for s, e in res["curve"]]
    logging.warning(
        "%s: %.1f%% in %.0f s",
        r,
        100 * rows[-1]["final_error"],
        time.perf_counter() - t,
    )
  _write_csv(os.path.join(workdir, "samples.csv"), all_samples)
  _write_csv(os.path.join(workdir, "curves.csv"), curves)
  _write_csv(os.path.join(workdir, "runs.csv"), rows)
  text = write_report(config, rows, binned(all_samples), workdir)
  plot(results, os.path.join(workdir, "taylor_reach.png"))
  logging.warning("study: %.0f s", time.perf_counter() - t0)
  return text


def main(argv):
  config, workdir = startup.setup(argv, compilation_cache=True)
  print(study(config, workdir))


if __name__ == "__main__":
  startup.define_flags(workdir_help="Directory for the study's outputs.")
  app.run(main)
