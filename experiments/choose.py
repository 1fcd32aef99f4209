"""Choose a method: the methods grid's results as a recommendation table.

The evidence grids write ``stats.json`` (final test error per optimizer,
arrival order, worker count and method, with the share of ASGD's gap to
sequential training each method closes) and ``tuned.json`` (the learning
rate and λ0 the tuning chose). Six are committed: the full grid of issue
10 (``results/methods``: every optimizer at M = 8, 16, 32, cyclic and Gamma
arrivals, 3 reported seeds), the quick tier of issue 18
(``results/methods-quick``: the target cells with the new methods, 5
reported seeds), its Muon tier (``results/methods-muon``: Muon's M = 16
cells, tuned and reported the same way), its momentum tier
(``results/methods-momentum``: momentum at M = 8 and 32 with the delayed
Nesterov rows, the same way) and its 20-seed tier
(``results/methods-seeds``: the momentum cells at the quick tier's settings
on 20 reported seeds), which replace the full grid's recommendation in the
cells they cover (:data:`TIERS`, a later one over an earlier one), and the
second model (``results/methods-cnn``: the small CNN in two of those
cells), which confirms or contradicts the picks.

:func:`recommend` turns one grid into one recommendation per optimizer and
staleness regime (the worker count M: staleness is about M − 1),
:func:`choices` them into the table's rows, and :func:`table` into the
Markdown the docs' "Choose a method" page and the README show.

The rule, stated once: a method is recommended over plain ASGD (at its own
tuned rate) when it closes at least :data:`MIN_SHARE` of ASGD's gap in
*every* arrival order of the cell (cyclic and Gamma in the full grid;
cyclic, Gamma or the straggler scenario in the quick tier); among those, the
one whose smallest share is largest. Otherwise the answer is ASGD, and the
evidence says why. The second model applies the same rule to its own cell
(cyclic arrivals only).
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import json
import pathlib

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "methods"
QUICK = RESULTS.with_name("methods-quick")
MUON = RESULTS.with_name("methods-muon")
SEEDS = RESULTS.with_name("methods-seeds")
MOMENTUM = RESULTS.with_name("methods-momentum")
SECOND = RESULTS.with_name("methods-cnn")
# The tiers that replace the full grid's recommendation in their cells, a
# later one over an earlier one.
TIERS = (QUICK, MUON, MOMENTUM, SEEDS)
SECOND_MODEL = "small CNN"
MIN_SHARE = 0.25
# The arrival orders a cell may have, in the order the table shows them.
SCHEDULES = ("cyclic", "gamma", "straggler")
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
    "delayed-nesterov": ("{delayed_nesterov}({M} * lr, period={M})",
                         ("delayed_nesterov",)),
    "delayed-nesterov-dc": (
        "{delay_compensation}({M}, {lam}adaptive=True), then "
        "{delayed_nesterov}({M} * lr, period={M})",
        ("delay_compensation", "delayed_nesterov")),
    "dana": ("{look_ahead_momentum}(lr, 0.9, horizon={H})",
             ("look_ahead_momentum",)),
    "dana-dc": ("{delay_compensation}({M}, adaptive=True), then "
                "{look_ahead_momentum}(lr, 0.9, horizon={H})",
                ("delay_compensation", "look_ahead_momentum")),
    "fisher-dc-a": ("{fisher_compensation}({M}, {lam}adaptive=True) with "
                    "Simulator(push_grad_sq=True)",
                    ("fisher_compensation",)),
    "secant-dc": ("{secant_compensation}({M}, {lam}correction_clip=1.0)",
                  ("secant_compensation",)),
    "delayed-nesterov-secant": (
        "{secant_compensation}({M}, {lam}correction_clip=1.0), then "
        "{delayed_nesterov}({M} * lr, period={M})",
        ("secant_compensation", "delayed_nesterov")),
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
    "secant-dc": "secant DC, λ tuned",
    "delayed-nesterov-secant": "delayed Nesterov + secant, λ tuned",
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
  seeds: int = 3  # reported seeds behind each mean
  second: Second | None = None  # the second model's verdict (see confirm)


@dataclasses.dataclass(frozen=True)
class Second:
  """What the second model says of a :class:`Recommendation`'s cell."""

  algorithm: str  # its own pick by the same rule ("asgd": none)
  share: float | None  # the share the first model's pick closes there
  pick_share: float | None  # the share its own pick closes there

  def agrees(self, algorithm: str) -> bool:
    return self.algorithm == algorithm


def load(results: pathlib.Path = RESULTS) -> tuple[list[dict], dict]:
  """``stats.json`` and ``tuned.json`` of the grid in ``results``."""
  stats = json.loads((results / "stats.json").read_text())
  tuned = json.loads((results / "tuned.json").read_text())
  return stats, tuned


def choices(*, min_share: float = MIN_SHARE) -> list[Recommendation]:
  """The table's rows from the committed grids: the full grid's, replaced
  by the quick tier's (and its Muon and momentum tiers') where they cover
  the cell, and those by the 20-seed tier's, checked on the second model
  where it has the cell (:func:`confirm`)."""
  recs = recommend(*load(RESULTS), min_share=min_share)
  quick = {(r.optimizer, r.num_workers): r
           for tier in TIERS
           for r in recommend(*load(tier), min_share=min_share)}
  recs = [quick.pop((r.optimizer, r.num_workers), r) for r in recs]
  recs += quick.values()  # cells the full grid does not have
  return confirm(recs, *load(SECOND), min_share=min_share)


def confirm(recs: Sequence[Recommendation], stats: Sequence[dict],
            tuned: dict, *, min_share: float = MIN_SHARE
            ) -> list[Recommendation]:
  """``recs`` with :attr:`Recommendation.second` set where the second
  model's grid (``stats``, ``tuned``) has the cell: its own pick by the
  same rule, over its arrival orders, and the share the first pick closes
  there (its smallest over those orders; ``None`` if it was not run)."""
  theirs = {(r.optimizer, r.num_workers): r
            for r in recommend(stats, tuned, min_share=min_share)}
  index = _index(stats)
  out = []
  for r in recs:
    other = theirs.get((r.optimizer, r.num_workers))
    if other is None:
      out.append(r)
      continue
    shares = [index.get((r.optimizer, sch, r.num_workers, r.algorithm),
                        {}).get("gap_closed") for sch in other.shares]
    share = None if None in shares or not shares else min(shares)
    picks = [v for v in other.shares.values() if v is not None]
    pick_share = (min(picks) if other.algorithm != "asgd" and picks
                  else None)
    out.append(dataclasses.replace(r, second=Second(
        algorithm=other.algorithm, share=share, pick_share=pick_share)))
  return out


def _index(stats: Sequence[dict]) -> dict[tuple, dict]:
  return {(s["optimizer"], s["schedule"], s["num_workers"], s["algorithm"]):
          s for s in stats}


def recommend(
    stats: Sequence[dict], tuned: dict, *, min_share: float = MIN_SHARE
) -> list[Recommendation]:
  """One :class:`Recommendation` per (optimizer, worker count) of the grid,
  over the arrival orders the grid ran it in."""
  index = _index(stats)
  cells = sorted({(s["optimizer"], s["num_workers"]) for s in stats
                  if s["num_workers"] > 1},
                 key=lambda c: (list(OPTIMIZERS).index(c[0]), c[1]))
  out = []
  for opt, m in cells:
    seq = next(s for s in stats
               if s["optimizer"] == opt and s["algorithm"] == "sequential")
    algs = sorted({a for (o, _, w, a) in index if o == opt and w == m}
                  - NOT_RECOMMENDED)
    orders = [sch for sch in SCHEDULES if (opt, sch, m, "asgd") in index]
    best, best_min = "asgd", None
    for a in algs:
      shares = [index.get((opt, sch, m, a), {}).get("gap_closed")
                for sch in orders]
      if any(s is None for s in shares):
        continue
      if min(shares) >= min_share and (best_min is None
                                       or min(shares) > best_min):
        best, best_min = a, min(shares)
    pick = {sch: index[(opt, sch, m, best)] for sch in orders}
    asgd = {sch: index[(opt, sch, m, "asgd")] for sch in orders}
    out.append(Recommendation(
        optimizer=opt, num_workers=m, algorithm=best,
        shares={sch: pick[sch]["gap_closed"] for sch in orders},
        errors={sch: (100 * pick[sch]["mean"], 100 * pick[sch]["std"])
                for sch in orders},
        asgd={sch: (100 * asgd[sch]["mean"], 100 * asgd[sch]["std"])
              for sch in orders},
        sequential=(100 * seq["mean"], 100 * seq["std"]),
        settings={sch: tuned.get(f"{opt}-{sch}-M{m}-{best}", {})
                  .get("setting", {}) for sch in orders},
        no_gap=any(asgd[sch]["gap_closed"] is None for sch in orders),
        seeds=min(pick[sch].get("seeds", 3) for sch in orders),
    ))
  return out


def use(rec: Recommendation) -> str:
  """The code to put first in the chain for ``rec``, as Markdown."""
  template, names = USE[rec.algorithm]
  if not names:
    return template
  lams = {s.get("dc_lambda", s.get("secant_lambda"))
          for s in rec.settings.values()} - {None}
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
  for sch in rec.shares:
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
  return ("; ".join(parts) + f"; sequential {_fmt(rec.sequential)}; "
          f"{rec.seeds} seeds")


def second_opinion(rec: Recommendation, *, short: bool = False) -> str:
  """The second model's verdict on ``rec``, as Markdown ("" if none)."""
  sec = rec.second
  if sec is None:
    return "" if short else "not run"
  share = "not run" if sec.share is None else f"{100 * sec.share:.0f}%"
  if sec.agrees(rec.algorithm):
    if short:
      return f" (confirmed on the {SECOND_MODEL})"
    if rec.algorithm == "asgd":
      return "confirmed: nothing closes ≥ 25% there either"
    return f"confirmed: closes {share}"
  theirs = LABELS[sec.algorithm] if sec.algorithm != "asgd" else "ASGD"
  if short:
    return f" (the {SECOND_MODEL} picks {theirs})"
  pick = ("" if sec.pick_share is None
          else f", closing {100 * sec.pick_share:.0f}%")
  if rec.algorithm == "asgd":
    return f"differs: it picks {theirs}{pick}"
  return f"differs: it picks {theirs}{pick}; this pick closes {share} there"


def table(recs: Sequence[Recommendation], *, short: bool = False) -> str:
  """The Markdown table: optimizer × workers → what to use (and evidence)."""
  if short:
    head = ["| optimizer | M | use |", "|---|---|---|"]
  else:
    head = ["| optimizer | M | use | first in the chain | evidence (MLP): "
            "test error % (mean ± std), share of ASGD's gap closed | "
            f"second model ({SECOND_MODEL}, cyclic) |",
            "|---|---|---|---|---|---|"]
  rows = []
  for r in recs:
    label = LABELS[r.algorithm]
    if r.algorithm == "asgd":
      label = ("ASGD (nothing closes ≥ "
               f"{100 * MIN_SHARE:.0f}% of its gap in every order)")
      if all(v is None for v in r.shares.values()) and r.no_gap:
        label = "ASGD (as good as sequential here: no gap to close)"
    if short:
      what = label if r.algorithm == "asgd" else (
          f"{label}: {use(r)}")
      what += second_opinion(r, short=True)
      rows.append(f"| {OPTIMIZERS[r.optimizer]} | {r.num_workers} | {what} |")
    else:
      rows.append(f"| {OPTIMIZERS[r.optimizer]} | {r.num_workers} | {label} "
                  f"| {use(r)} | {evidence(r)} | {second_opinion(r)} |")
  return "\n".join(head + rows) + "\n"


def main() -> None:
  print(table(choices()))


if __name__ == "__main__":
  main()
