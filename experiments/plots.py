"""Plots of the studies: PNG figures of the runs and their statistics.

Every function draws one figure on a :class:`matplotlib.figure.Figure` of
its own (not pyplot's global figures, so no backend is chosen and nothing
is shown) and writes it to ``path``. How each algorithm is drawn (its
colour and marker, the same in every figure) is :data:`STYLES`, keyed by
the registry's names (:mod:`experiments.algorithms`).
"""

from __future__ import annotations

from collections.abc import Sequence
import os
from typing import Any, NamedTuple

import matplotlib.figure
import matplotlib.ticker
import numpy as np

from experiments import algorithms
from experiments import statistics


class Style(NamedTuple):
  """How an algorithm is drawn: its matplotlib colour, marker, line style."""

  color: str
  marker: str
  linestyle: str = "-"


STYLES: dict[str, Style] = {
    "sequential": Style("k", "None", "--"),  # the reference: dashed
    "ssgd": Style("C0", "s"),
    "asgd": Style("C1", "o"),
    "sa-asgd": Style("C2", "v"),
    "sqrt-asgd": Style("C8", "<"),
    "da-asgd": Style("C9", ">"),
    "dc-asgd-c": Style("C4", "^"),
    "dc-asgd-a": Style("C3", "D"),
    "dc-asgd-a-bc": Style("C6", "d"),
    "dc-asgd-a-warmup": Style("gold", "d"),
    "dc-asgd-a-clip": Style("brown", "s"),
    "dc-asgd-a-tuned": Style("C5", "P"),
    "dc-asgd-a-clip-tuned": Style("pink", "P"),
    "gap-aware": Style("C7", "X"),
    "delayed-nesterov": Style("olive", "h"),
    "delayed-nesterov-dc": Style("darkgreen", "H"),
    "dana": Style("teal", "*"),
    "dana-dc": Style("navy", "p"),
    "exact-dc": Style("gray", "*"),
    "fisher-dc-a": Style("crimson", "D"),
    "secant-dc": Style("darkorange", "X"),
    "delayed-nesterov-secant": Style("red", "H"),
    "wp-nesterov": Style("purple", "h"),
    "wp-nadam": Style("orchid", "p"),
    "pipemare": Style("sienna", "v"),
}
"""Every algorithm of :data:`experiments.algorithms.REGISTRY`'s style."""


def style(algorithm: algorithms.Algorithm) -> Style:
  """The :class:`Style` of ``algorithm``; raises naming one without."""
  if algorithm.name not in STYLES:
    raise ValueError(
        f"No plot style for algorithm {algorithm.name!r}; add one to "
        "experiments.plots.STYLES."
    )
  return STYLES[algorithm.name]


def _subplots(*args, figsize: tuple[float, float], **kwargs):
  """``plt.subplots`` without pyplot: a new figure and its axes."""
  fig = matplotlib.figure.Figure(figsize=figsize)
  return fig, fig.subplots(*args, **kwargs)


def plot_error_vs_epoch(
    histories: dict[tuple[str, int], list[list[dict]]],
    path: str,
    *,
    title: str = "",
) -> None:
  """Test error by epoch, one panel per worker count, one line per algorithm.

  Args:
    histories: ``(algorithm, workers) -> [per-seed list of epoch records]``.
    path: the PNG to write.
    title: a figure title.
  """
  workers = sorted({
      m for a, m in histories if not algorithms.get(a).single_worker
  }) or [1]
  fig, axes = _subplots(1, len(workers), figsize=(4.2 * len(workers), 4.0),
                           sharey=True, squeeze=False)
  for ax, m in zip(axes[0], workers):
    for a in algorithms.ordered(a for a, _ in histories):
      runs = histories.get((a.name, a.effective_workers(m)))
      if not runs:
        continue
      x, mean, std = statistics.mean_curve(runs)
      st = style(a)
      ax.plot(x, 100 * mean, color=st.color, label=a.label, ls=st.linestyle)
      ax.fill_between(x, 100 * np.maximum(mean - std, 1e-3), 100 * (mean + std),
                      color=st.color, alpha=0.15)
    ax.set_title(f"M = {m}")
    ax.set_xlabel("epoch")
    _log_percent_axis(ax)
  axes[0][0].set_ylabel("test error (%), mean ± std over seeds")
  handles, labels = axes[0][0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8,
             bbox_to_anchor=(0.5, 0.0))
  _finish(fig, path, title, bottom=0.08)


def plot_error_vs_workers(
    rows: Sequence[dict[str, Any]], path: str, *, title: str = ""
) -> None:
  """Final test error (mean ± std over seeds) against the number of workers."""
  workers = statistics.parallel_workers(rows)
  fig, ax = _subplots(figsize=(5.5, 4))
  for a in algorithms.ordered(r["algorithm"] for r in rows):
    st = style(a)
    if a.single_worker:
      e = statistics.errors(rows, a, 1, "final_test_error")
      ax.axhline(100 * e.mean(), color=st.color, ls=st.linestyle, label=a.label)
      continue
    stats = [statistics.errors(rows, a, m, "final_test_error") for m in workers]
    ms = [m for m, e in zip(workers, stats) if e.size]
    mean = [100 * e.mean() for e in stats if e.size]
    std = [100 * statistics.std(e) for e in stats if e.size]
    ax.errorbar(ms, mean, yerr=std, color=st.color, marker=st.marker,
                capsize=3, label=a.label)
  ax.set_xscale("log", base=2)
  _log_percent_axis(ax)
  ax.set_xticks(workers, [str(m) for m in workers])
  ax.set_xlabel("workers M")
  ax.set_ylabel("final test error (%), mean ± std over seeds")
  ax.legend(fontsize=8)
  _finish(fig, path, title)


def plot_staleness(
    staleness: dict[int, np.ndarray], path: str, *, title: str = ""
) -> None:
  """Histogram of the schedule's staleness, one panel per worker count."""
  ms = sorted(staleness)
  fig, axes = _subplots(1, len(ms), figsize=(3.6 * len(ms), 3), squeeze=False)
  for ax, m in zip(axes[0], ms):
    s = staleness[m]
    ax.hist(s, bins=np.arange(s.max() + 2) - 0.5, color="C0")
    ax.set_title(f"M = {m} (mean {s.mean():.1f})")
    ax.set_xlabel("staleness τ")
  axes[0][0].set_ylabel("arrivals")
  _finish(fig, path, title)


def _log_percent_axis(ax) -> None:
  """A log y-axis for errors in %, labelled in plain numbers."""
  ax.set_yscale("log")
  lo, hi = ax.get_ylim()
  ticks = [t for t in (1, 2, 5, 10, 20, 50, 100) if lo <= t <= hi]
  ax.set_yticks(ticks, [str(t) for t in ticks])
  ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
  ax.grid(alpha=0.3, which="both")


def _finish(fig, path: str, title: str, bottom: float = 0.0) -> None:
  if title:
    fig.suptitle(title)
  fig.tight_layout(rect=(0, bottom, 1, 1))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=120)


def plot_gap_closed(stats: Sequence[dict], path: str, *, title: str = "",
                    optimizers: Sequence[str] = ()) -> None:
  """Share of ASGD's gap closed against M: a panel per optimizer (in
  ``optimizers``' order, default the stats'), a line per method (cyclic
  arrivals solid, Gamma dashed)."""
  optimizers = list(optimizers) or list(
      dict.fromkeys(s["optimizer"] for s in stats)
  )
  fig, axes = _subplots(1, len(optimizers), figsize=(4.6 * len(optimizers), 4),
                           sharey=True, squeeze=False)
  for ax, opt in zip(axes[0], optimizers):
    mine = [
        s
        for s in stats
        if s["optimizer"] == opt and s["gap_closed"] is not None
    ]
    for a in algorithms.ordered(s["algorithm"] for s in mine):
      for schedule, ls in (("cyclic", "-"), ("gamma", "--")):
        pts = sorted((s["num_workers"], 100 * s["gap_closed"]) for s in mine
                     if s["algorithm"] == a.name and s["schedule"] == schedule)
        if pts and a.name != algorithms.ASGD.name:
          ax.plot(*zip(*pts), color=style(a).color, marker=style(a).marker,
                  ls=ls,
                  label=a.label if schedule == "cyclic" else None)
    ax.axhline(100, color="k", lw=0.8)
    ax.axhline(0, color=style(algorithms.ASGD).color, lw=0.8)
    ax.set_xscale("log", base=2)
    workers = sorted({s["num_workers"] for s in mine})
    ax.set_xticks(workers, [str(m) for m in workers])
    ax.set_title(opt)
    ax.set_xlabel("workers M (solid: cyclic, dashed: Gamma)")
    ax.set_ylim(-100, 150)
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel("share of ASGD's gap to sequential closed (%)")
  handles, labels = axes[0][0].get_legend_handles_labels()
  for ax in axes[0][1:]:
    for h, label in zip(*ax.get_legend_handles_labels()):
      if label not in labels:
        handles.append(h)
        labels.append(label)
  if labels:
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6),
               fontsize=8, bbox_to_anchor=(0.5, 0.0))
  _finish(fig, path, title, bottom=0.14)


def _binned(x: np.ndarray, y: np.ndarray, edges: np.ndarray):
  """Mean of ``y`` per bin of ``x`` (bins with no sample dropped)."""
  which = np.digitize(x, edges) - 1
  keep = [b for b in range(len(edges) - 1) if np.any(which == b)]
  centers = np.array([(edges[b] + edges[b + 1]) / 2 for b in keep])
  return centers, np.array([y[which == b].mean() for b in keep])


def plot_diagnostics(traces: dict[tuple[str, str], dict], path: str, *,
                     title: str = "") -> None:
  """Is compensation helping? A row per optimizer: the cosine of the applied
  direction to the fresh gradient against staleness (left; ASGD's is its
  stale gradient's), and its relative error over training (right).

  Args:
    traces: ``(optimizer, algorithm) -> {"staleness", "step",
      "applied_cosine", "applied_error", ...}``, arrays of sampled arrivals.
    path: the PNG to write.
    title: a figure title.
  """
  optimizers = list(dict.fromkeys(o for o, _ in traces))
  fig, axes = _subplots(len(optimizers), 2, figsize=(11, 3.8 * len(optimizers)),
                           squeeze=False)
  for (ax_c, ax_e), opt in zip(axes, optimizers):
    for a in algorithms.ordered(n for o, n in traces if o == opt):
      t = {k: np.asarray(v) for k, v in traces[(opt, a.name)].items()}
      tau = t["staleness"]
      if tau.max() - tau.min() < 12:  # one bin per staleness
        edges = np.arange(tau.min(), tau.max() + 2) - 0.5
      else:
        edges = np.linspace(tau.min() - 0.5, tau.max() + 0.5, 12)
      st = style(a)
      ax_c.plot(*_binned(tau, t["applied_cosine"], edges), color=st.color,
                marker=st.marker, ms=4, label=a.label)
      window = max(1, len(t["step"]) // 40)
      kernel = np.ones(window) / window
      err = np.convolve(t["applied_error"], kernel, mode="valid")
      ax_e.plot(t["step"][window - 1:], err, color=st.color, label=a.label,
                lw=1)
    ax_c.set(xlabel="staleness τ", ylabel="cosine(applied, fresh gradient)",
             title=f"{opt}: direction vs staleness")
    ax_e.set(xlabel="server step", ylabel="‖applied − fresh‖ / ‖fresh‖",
             yscale="log", title=f"{opt}: error over training (moving mean)")
    for ax in (ax_c, ax_e):
      ax.grid(alpha=0.3)
    ax_e.legend(fontsize=7, ncol=2)
  _finish(fig, path, title)


def plot_methods_errors(stats: Sequence[dict], path: str, *, title: str = "",
                        optimizers: Sequence[str] = ()) -> None:
  """Final test error (mean ± std) against M: a row per optimizer (in
  ``optimizers``' order, default the stats'), a column per arrival schedule,
  a line per method; sequential SGD as a level. A panel whose optimizer
  has no column with that schedule (the quick tier's plain SGD has no Gamma
  column, momentum no straggler one) is left out."""
  optimizers = list(optimizers) or list(
      dict.fromkeys(s["optimizer"] for s in stats)
  )
  schedules = sorted({s["schedule"] for s in stats
                      if not algorithms.get(s["algorithm"]).single_worker})
  fig, axes = _subplots(
      len(optimizers),
      len(schedules),
      squeeze=False,
      figsize=(5.2 * len(schedules), 3.8 * len(optimizers)),
  )
  labels = {}
  for row, opt in zip(axes, optimizers):
    mine = [s for s in stats if s["optimizer"] == opt]
    for ax, schedule in zip(row, schedules):
      if not any(s["schedule"] == schedule
                 and not algorithms.get(s["algorithm"]).single_worker
                 for s in mine):
        ax.set_visible(False)
        continue
      for a in algorithms.ordered(s["algorithm"] for s in mine):
        st = style(a)
        if a.single_worker:
          s = [s for s in mine if s["algorithm"] == a.name][0]
          h = ax.axhline(100 * s["mean"], color=st.color, ls=st.linestyle)
        else:
          pts = sorted(
              (s["num_workers"], 100 * s["mean"], 100 * s["std"])
              for s in mine
              if s["algorithm"] == a.name and s["schedule"] == schedule
          )
          if not pts:  # a method this column does not run
            continue
          ms, mean, std = zip(*pts)
          h = ax.errorbar(ms, mean, yerr=std, color=st.color, marker=st.marker,
                          ms=4, capsize=2, lw=1)
        labels.setdefault(a.label, h)
      ax.set_xscale("log", base=2)
      workers = sorted({s["num_workers"] for s in mine} - {1})
      ax.set_xticks(workers, [str(m) for m in workers])
      ax.set_title(f"{opt}, {schedule} arrivals")
      ax.set_xlabel("workers M")
      _log_percent_axis(ax)
    row[0].set_ylabel("final test error (%)")
  fig.legend(list(labels.values()), list(labels), loc="lower center",
             ncol=min(len(labels), 6), fontsize=8, bbox_to_anchor=(0.5, 0.0))
  _finish(fig, path, title, bottom=0.07)


def _num_workers(runs: Sequence[dict]) -> int:
  return int(max(max(r["records"]["worker"]) for r in runs)) + 1


def plot_ray_staleness(runs: Sequence[dict], samples: dict[str, np.ndarray],
                       path: str) -> None:
  """The Ray study (:mod:`experiments.ray_async`): staleness distributions
  (left) and smoothed training loss (right) of ``runs``."""
  fig, (ax_s, ax_l) = _subplots(1, 2, figsize=(11, 4))
  # The last bin collects the tail, so one straggler does not squash the plot.
  top = min(max(int(v.max()) for v in samples.values()), 3 * _num_workers(runs))
  width = 0.8 / len(samples)
  for i, (label, tau) in enumerate(samples.items()):
    pmf = np.bincount(np.minimum(tau, top), minlength=top + 1) / len(tau)
    ax_s.bar(np.arange(top + 1) + (i - len(samples) / 2 + 0.5) * width, pmf,
             width, label=f"{label}: std {tau.std():.2f}, max {tau.max()}")
  ax_s.set_xticks(np.arange(top + 1),
                  [str(t) for t in range(top)] + [f"{top}+"], fontsize=7)
  ax_s.set(xlabel="staleness (updates since the worker pulled)",
           ylabel="fraction of updates",
           title=f"Staleness, mean {statistics.samples_mean(samples):.2f} "
           "in all")
  ax_s.legend(fontsize=8)
  for r in runs:
    loss = np.asarray(r["records"]["loss"])
    k = max(1, len(loss) // 50)
    smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
    ax_l.plot(np.arange(len(smooth)) + k, smooth,
              label=f"{r['algorithm']}: test acc {r['test_accuracy']:.3f}")
  ax_l.set(xlabel="server update", ylabel="minibatch loss (moving mean)",
           yscale="log", title="Training on Ray")
  ax_l.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
