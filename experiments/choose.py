"""Choose a method: the methods grid's results as a recommendation table.

The evidence grid (``make methods``) writes ``stats.json`` (final test error
per optimizer, arrival order, worker count and method, with the share of
ASGD's gap to sequential training each method closes) and ``tuned.json``
(the learning rate and λ0 the tuning chose). :func:`recommend` turns them
into one recommendation per optimizer and staleness regime (the worker
count M: staleness is about M − 1), and :func:`table` into the Markdown the
docs' "Choose a method" page and the README show.

The rule, stated once: a method is recommended over plain ASGD (at its own
tuned rate) when it closes at least :data:`MIN_SHARE` of ASGD's gap in
*both* arrival orders (cyclic and Gamma); among those, the one whose smaller
share is largest. Otherwise the answer is ASGD, and the evidence says why.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import json
import pathlib

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "methods"
MIN_SHARE = 0.25
SCHEDULES = ("cyclic", "gamma")
OPTIMIZERS = {"sgd": "SGD", "momentum": "SGD, momentum 0.9", "adam": "Adam",
              "muon": "Muon"}
# Methods of the grid that are baselines or bounds, never a recommendation:
# the synchronous baseline changes the training (it waits for every worker)
# and the exact Taylor correction needs the loss at the server (the ceiling).
NOT_RECOMMENDED = frozenset({"asgd", "sequential", "ssgd", "exact-dc"})

# What to write for each method of the grid: a format string ({M} the worker
# count, {H} the look-ahead horizon M - 1, {lam} the tuned λ0) of what goes
# first in the chain, before the optimizer, and the ``dcasgd_optax`` names it
# uses (the test looks them up, so a renamed function breaks it, loudly).
USE = {
    "asgd": ("the optimizer alone", ()),
    "sa-asgd": ('{scale_by_staleness}("inverse")', ("scale_by_staleness",)),
    "sqrt-asgd": ('{scale_by_staleness}("sqrt")', ("scale_by_staleness",)),
    "da-asgd": ('{scale_by_staleness}("delay_adaptive", num_workers={M})',
                ("scale_by_staleness",)),
    "dc-asgd-c": ("{delay_compensation}({M}, {lam}adaptive=False)",
                  ("delay_compensation",)),
    "dc-asgd-a": ("{delay_compensation}({M}, adaptive=True)",
                  ("delay_compensation",)),
    "dc-asgd-a-bc": (
        "{delay_compensation}({M}, adaptive=True, bias_correction=True)",
        ("delay_compensation",)),
    "dc-asgd-a-warmup": (
        "{delay_compensation}({M}, adaptive=True, lambda_warmup=100)",
        ("delay_compensation",)),
    "dc-asgd-a-clip": (
        "{delay_compensation}({M}, adaptive=True, correction_clip=1.0)",
        ("delay_compensation",)),
    "dc-asgd-a-tuned": (
        "{delay_compensation}({M}, {lam}adaptive=True)",
        ("delay_compensation",)),
    "dc-asgd-a-clip-tuned": (
        "{delay_compensation}({M}, {lam}adaptive=True, correction_clip=1.0)",
        ("delay_compensation",)),
    "gap-aware": ("{gap_aware}({M}, step_size)", ("gap_aware",)),
    "delayed-nesterov": ("{delayed_nesterov}(lr, period={M})",
                         ("delayed_nesterov",)),
    "delayed-nesterov-dc": (
        "{delay_compensation}({M}, {lam}adaptive=True), then "
        "{delayed_nesterov}(lr, period={M})",
        ("delay_compensation", "delayed_nesterov")),
    "dana": ("{look_ahead_momentum}(lr, 0.9, horizon={H})",
             ("look_ahead_momentum",)),
    "dana-dc": ("{delay_compensation}({M}, adaptive=True), then "
                "{look_ahead_momentum}(lr, 0.9, horizon={H})",
                ("delay_compensation", "look_ahead_momentum")),
    "fisher-dc-a": ("{fisher_compensation}({M}, {lam}adaptive=True) with "
                    "Simulator(push_grad_sq=True)",
                    ("fisher_compensation",)),
    "wp-nesterov": (
        "{look_ahead_momentum}(lr, 0.9, horizon={H}, nesterov=True)",
        ("look_ahead_momentum",)),
    "wp-nadam": ("{look_ahead_adam}(lr, horizon={H})", ("look_ahead_adam",)),
    "pipemare": ("{scale_by_pipemare}(250)", ("scale_by_pipemare",)),
}
LABELS = {
    "sequential": "sequential", "asgd": "ASGD", "sa-asgd": "SA-ASGD",
    "sqrt-asgd": "ASGD 1/√(1+τ)", "da-asgd": "delay-adaptive",
    "dc-asgd-c": "DC-ASGD-c, λ tuned",
    "dc-asgd-a": "DC-ASGD-a", "dc-asgd-a-bc": "DC-ASGD-a, bias-corr.",
    "dc-asgd-a-warmup": "DC-ASGD-a, λ warm-up",
    "dc-asgd-a-clip": "DC-ASGD-a, clip",
    "dc-asgd-a-tuned": "DC-ASGD-a, λ0 tuned",
    "dc-asgd-a-clip-tuned": "DC-ASGD-a, clip, λ0 tuned",
    "gap-aware": "Gap-Aware", "delayed-nesterov": "delayed Nesterov",
    "delayed-nesterov-dc": "delayed Nesterov + DC, λ0 tuned",
    "dana": "look-ahead (DANA)", "dana-dc": "DANA-DC",
    "fisher-dc-a": "Fisher DC-ASGD-a, λ0 tuned",
    "wp-nesterov": "weight prediction, Nesterov",
    "wp-nadam": "weight prediction, NAdam β1 0.99", "pipemare": "PipeMare",
}


@dataclasses.dataclass(frozen=True)
class Recommendation:
  """What to use for one optimizer at one worker count, and why."""

  optimizer: str
  num_workers: int
  algorithm: str  # a name of the grid; "asgd" when nothing is recommended
  shares: dict[str, float | None]  # schedule -> share of ASGD's gap closed
  errors: dict[str, tuple[float, float]]  # schedule -> (mean, std), in %
  asgd: dict[str, tuple[float, float]]
  sequential: tuple[float, float]
  settings: dict[str, dict]  # schedule -> tuned setting
  no_gap: bool  # ASGD is within the grid's min gap of sequential somewhere


def load(results: pathlib.Path = RESULTS) -> tuple[list[dict], dict]:
  stats = json.loads((results / "stats.json").read_text())
  tuned = json.loads((results / "tuned.json").read_text())
  return stats, tuned


def recommend(
    stats: Sequence[dict], tuned: dict, *, min_share: float = MIN_SHARE
) -> list[Recommendation]:
  """One :class:`Recommendation` per (optimizer, worker count) of the grid."""
  index = {
      (s["optimizer"], s["schedule"], s["num_workers"], s["algorithm"]): s
      for s in stats
  }
  cells = sorted({(s["optimizer"], s["num_workers"]) for s in stats
                  if s["num_workers"] > 1},
                 key=lambda c: (list(OPTIMIZERS).index(c[0]), c[1]))
  out = []
  for opt, m in cells:
    seq = next(s for s in stats
               if s["optimizer"] == opt and s["algorithm"] == "sequential")
    algs = sorted({a for (o, _, w, a) in index if o == opt and w == m}
                  - NOT_RECOMMENDED)
    best, best_min = "asgd", None
    for a in algs:
      shares = [index.get((opt, sch, m, a), {}).get("gap_closed")
                for sch in SCHEDULES]
      if any(s is None for s in shares):
        continue
      if min(shares) >= min_share and (best_min is None
                                       or min(shares) > best_min):
        best, best_min = a, min(shares)
    pick = {sch: index[(opt, sch, m, best)] for sch in SCHEDULES}
    asgd = {sch: index[(opt, sch, m, "asgd")] for sch in SCHEDULES}
    out.append(Recommendation(
        optimizer=opt, num_workers=m, algorithm=best,
        shares={sch: pick[sch]["gap_closed"] for sch in SCHEDULES},
        errors={sch: (100 * pick[sch]["mean"], 100 * pick[sch]["std"])
                for sch in SCHEDULES},
        asgd={sch: (100 * asgd[sch]["mean"], 100 * asgd[sch]["std"])
              for sch in SCHEDULES},
        sequential=(100 * seq["mean"], 100 * seq["std"]),
        settings={sch: tuned.get(f"{opt}-{sch}-M{m}-{best}", {})
                  .get("setting", {}) for sch in SCHEDULES},
        no_gap=any(asgd[sch]["gap_closed"] is None for sch in SCHEDULES),
    ))
  return out


def use(rec: Recommendation) -> str:
  """The code to put first in the chain for ``rec``, as Markdown."""
  template, names = USE[rec.algorithm]
  if not names:
    return template
  lams = {s.get("dc_lambda") for s in rec.settings.values()} - {None}
  lam = (f"lambda_={lams.pop():g}, " if len(lams) == 1 else
         "lambda_=λ0, " if lams else "")
  text = template.format(M=rec.num_workers, H=rec.num_workers - 1, lam=lam,
                         **{n: n for n in names})
  return ", then ".join(f"`{part}`" for part in text.split(", then "))


def _fmt(mean_std: tuple[float, float]) -> str:
  return f"{mean_std[0]:.2f} ± {mean_std[1]:.2f}"


def evidence(rec: Recommendation) -> str:
  """The numbers behind ``rec``: errors and shares per arrival order."""
  parts = []
  for sch in SCHEDULES:
    share = rec.shares[sch]
    lr = rec.settings[sch].get("learning_rate")
    closed = "no gap" if share is None else f"{100 * share:.0f}% closed"
    if rec.algorithm == "asgd":
      parts.append(f"{sch}: ASGD {_fmt(rec.asgd[sch])}"
                   + (f" (lr {lr:g})" if lr else ""))
    else:
      parts.append(f"{sch}: {_fmt(rec.errors[sch])} vs ASGD "
                   f"{_fmt(rec.asgd[sch])}, {closed}"
                   + (f" (lr {lr:g})" if lr else ""))
  return "; ".join(parts) + f"; sequential {_fmt(rec.sequential)}"


def table(recs: Sequence[Recommendation], *, short: bool = False) -> str:
  """The Markdown table: optimizer × workers → what to use (and evidence)."""
  if short:
    head = ["| optimizer | M | use |", "|---|---|---|"]
  else:
    head = ["| optimizer | M | use | first in the chain | evidence: test "
            "error % (mean ± std, 3 seeds), share of ASGD's gap closed |",
            "|---|---|---|---|---|"]
  rows = []
  for r in recs:
    label = LABELS[r.algorithm]
    if r.algorithm == "asgd":
      label = ("ASGD (nothing closes ≥ "
               f"{100 * MIN_SHARE:.0f}% of its gap in both orders)")
    if short:
      what = label if r.algorithm == "asgd" else (
          f"{label}: {use(r)}")
      rows.append(f"| {OPTIMIZERS[r.optimizer]} | {r.num_workers} | {what} |")
    else:
      rows.append(f"| {OPTIMIZERS[r.optimizer]} | {r.num_workers} | {label} "
                  f"| {use(r)} | {evidence(r)} |")
  return "\n".join(head + rows) + "\n"


def main() -> None:
  stats, tuned = load()
  print(table(recommend(stats, tuned)))


if __name__ == "__main__":
  main()
