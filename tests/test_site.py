"""The documentation site: the method chooser, the generators of the build,
and (slow) the build itself with every internal link resolving."""

from __future__ import annotations

import dataclasses
import html.parser
import importlib
import pathlib
import subprocess
import sys
import types
import urllib.parse

import pytest

import dcasgd_optax
from experiments import algorithms
from experiments import choose

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docs" / "ext"))
import coverage_check  # noqa: E402  # docs/ext is on sys.path only now
import generate  # noqa: E402

# --- Choose a method ------------------------------------------------------


def _stat(opt, sch, m, alg, mean, share):
  return dict(optimizer=opt, schedule=sch, num_workers=m, algorithm=alg,
              mean=mean, std=0.001, seeds=3, gap_closed=share)


def _grid(shares: dict[str, tuple[float | None, float | None]]):
  """A one-cell grid (sgd, M=8): sequential 0.05, ASGD 0.10, and methods
  whose error follows from their share of the gap in each order."""
  stats = [_stat("sgd", "cyclic", 1, "sequential", 0.05, None)]
  for sch in ORDERS:
    stats.append(_stat("sgd", sch, 8, "asgd", 0.10, 0.0))
  for alg, pair in shares.items():
    for sch, share in zip(ORDERS, pair):
      mean = 0.10 - 0.05 * (share or 0.0)
      stats.append(_stat("sgd", sch, 8, alg, mean, share))
  tuned = {f"sgd-{sch}-M8-{alg}": {"setting": {"learning_rate": 0.1}}
           for sch in ORDERS for alg in shares}
  return stats, tuned


ORDERS = ("cyclic", "gamma")


def test_recommend_takes_the_largest_share_closed_in_both_orders():
  # gap-aware closes the most in one order, but dc-asgd-a the most in both.
  stats, tuned = _grid({"gap-aware": (0.9, 0.26), "dc-asgd-a": (0.5, 0.4),
                        "sa-asgd": (0.6, None)})
  (rec,) = choose.recommend(stats, tuned)
  assert rec.algorithm == "dc-asgd-a"
  assert rec.shares == {"cyclic": 0.5, "gamma": 0.4}
  assert rec.errors["cyclic"][0] == pytest.approx(7.5)
  assert rec.asgd["gamma"][0] == pytest.approx(10.0)
  assert rec.sequential[0] == pytest.approx(5.0)


def test_recommend_falls_back_to_asgd_below_the_threshold():
  stats, tuned = _grid({"gap-aware": (0.9, 0.24), "dc-asgd-a": (0.1, 0.1)})
  (rec,) = choose.recommend(stats, tuned)
  assert rec.algorithm == "asgd"
  assert "nothing closes" in choose.table([rec])
  (rec,) = choose.recommend(stats, tuned, min_share=0.2)
  assert rec.algorithm == "gap-aware"


def test_use_names_the_chain_with_the_tuned_lambda():
  stats, tuned = _grid({"delayed-nesterov-dc": (0.5, 0.5)})
  for sch in ORDERS:
    tuned[f"sgd-{sch}-M8-delayed-nesterov-dc"]["setting"]["dc_lambda"] = 4.0
  (rec,) = choose.recommend(stats, tuned)
  assert choose.use(rec) == ("`delay_compensation(8, lambda_=4, "
                             "adaptive=True)`, then "
                             "`delayed_nesterov(8 * lr, period=8)`")
  # The secant row's λ is its own field, secant_lambda.
  stats, tuned = _grid({"secant-dc": (0.5, 0.5)})
  for sch in ORDERS:
    tuned[f"sgd-{sch}-M8-secant-dc"]["setting"]["secant_lambda"] = 0.5
  (rec,) = choose.recommend(stats, tuned)
  assert choose.use(rec) == ("`secant_compensation(8, lambda_=0.5, "
                             "correction_clip=1.0)`")
  # Before delayed Nesterov, whose rate is per period: M times the grid's.
  stats, tuned = _grid({"delayed-nesterov-secant": (0.5, 0.5)})
  for sch in ORDERS:
    tuned[f"sgd-{sch}-M8-delayed-nesterov-secant"]["setting"][
        "secant_lambda"] = 1.0
  (rec,) = choose.recommend(stats, tuned)
  assert choose.use(rec) == ("`secant_compensation(8, lambda_=1, "
                             "correction_clip=1.0)`, then "
                             "`delayed_nesterov(8 * lr, period=8)`")


def test_baselines_and_the_exact_ceiling_are_never_recommended():
  stats, tuned = _grid({"ssgd": (1.0, 1.0), "exact-dc": (1.0, 1.0),
                        "gap-aware": (0.5, 0.4)})
  (rec,) = choose.recommend(stats, tuned)
  assert rec.algorithm == "gap-aware"


def test_the_rule_reads_the_orders_each_cell_has():
  # A straggler column instead of Gamma: the rule takes the cell's own
  # orders, and a method missing one of them is not a candidate.
  stats, tuned = _grid({"gap-aware": (0.5, 0.4), "dc-asgd-a": (0.6, 0.6)})
  stats = [dict(s, schedule="straggler") if s["schedule"] == "gamma" else s
           for s in stats]
  stats = [s for s in stats if not (s["algorithm"] == "dc-asgd-a"
                                    and s["schedule"] == "straggler")]
  (rec,) = choose.recommend(stats, tuned)
  assert rec.algorithm == "gap-aware"
  assert rec.shares == {"cyclic": 0.5, "straggler": 0.4}
  assert "straggler: " in choose.evidence(rec)


def test_the_second_model_confirms_or_names_its_own_pick():
  stats, tuned = _grid({"gap-aware": (0.5, 0.4), "dc-asgd-a": (0.3, 0.3)})
  (rec,) = choose.recommend(stats, tuned)
  # The second model ran cyclic arrivals only.
  cyclic = lambda st: [s for s in st if s["schedule"] == "cyclic"]
  two, tuned2 = _grid({"gap-aware": (0.2, None), "dc-asgd-a": (0.7, None)})
  (got,) = choose.confirm([rec], cyclic(two), tuned2)
  assert got.second == choose.Second("dc-asgd-a", share=0.2, pick_share=0.7)
  assert "differs: it picks DC-ASGD-a, closing 70%; this pick closes 20%" \
      in choose.table([got])
  assert "(the small CNN picks DC-ASGD-a)" in choose.table([got], short=True)
  two, tuned2 = _grid({"gap-aware": (0.6, None), "dc-asgd-a": (0.3, None)})
  (got,) = choose.confirm([rec], cyclic(two), tuned2)
  assert got.second.agrees("gap-aware")
  assert "confirmed: closes 60%" in choose.table([got])
  # A cell the second model does not have is left as it is.
  other = [dict(s, num_workers=16) if s["num_workers"] == 8 else s
           for s in cyclic(two)]
  assert choose.confirm([rec], other, tuned2) == [rec]


def test_no_gap_and_a_second_model_that_beats_asgd_are_worded_as_such():
  stats, tuned = _grid({"gap-aware": (None, None)})
  stats = [dict(s, gap_closed=None) for s in stats]  # ASGD ~ sequential
  (rec,) = choose.recommend(stats, tuned)
  assert rec.algorithm == "asgd" and rec.no_gap
  assert "no gap to close" in choose.table([rec])
  stats, tuned = _grid({"gap-aware": (0.1, 0.1)})
  (rec,) = choose.recommend(stats, tuned)
  two, tuned2 = _grid({"gap-aware": (0.4, None)})
  two = [s for s in two if s["schedule"] == "cyclic"]
  (got,) = choose.confirm([rec], two, tuned2)
  assert "| differs: it picks Gap-Aware, closing 40% |" in choose.table([got])


def test_the_issue_18_tiers_replace_the_full_grid_in_their_cells():
  full = {(r.optimizer, r.num_workers): r
          for r in choose.recommend(*choose.load(choose.RESULTS))}
  quick = {(r.optimizer, r.num_workers): r
           for d in choose.TIERS
           for r in choose.recommend(*choose.load(d))}
  assert ("muon", 16) in quick and ("sgd", 32) in quick
  assert ("momentum", 8) in quick and ("momentum", 32) in quick
  # The 20-seed tier's momentum cell, not the quick tier's 5 seeds.
  assert quick[("momentum", 16)].seeds == 20
  got = {(r.optimizer, r.num_workers): r for r in choose.choices()}
  assert set(got) == set(full) | set(quick)
  for cell, r in got.items():
    want = quick.get(cell, full.get(cell))
    assert dataclasses.replace(r, second=None) == want
  assert any(r.second is not None for r in got.values())


def test_every_method_of_the_grid_has_a_use_with_library_names():
  stats = [s for d in (choose.RESULTS, *choose.TIERS, choose.SECOND)
           for s in choose.load(d)[0]]
  grid = {s["algorithm"] for s in stats} | {
      a.name for a in algorithms.REGISTRY.values()}
  assert grid - choose.NOT_RECOMMENDED <= set(choose.USE)
  for alg, (template, names) in choose.USE.items():
    for name in names:
      assert name in dcasgd_optax.__all__, (alg, name)
      assert "{" + name + "}" in template, (alg, name)
    assert alg in choose.LABELS


def test_readme_shows_the_committed_grid_s_choice():
  """The README's short table is what the generator makes of the committed
  results: rerun `python -m experiments.choose` style generation and paste
  ``choose.table(..., short=True)`` when the grid changes."""
  short = choose.table(choose.choices(), short=True)
  assert short in (ROOT / "README.md").read_text()


def test_readme_is_a_short_front_door():
  assert len((ROOT / "README.md").read_text().splitlines()) <= 150


# --- the build's generators -----------------------------------------------


def test_api_page_lists_exactly_all_and_links_submodules():
  page = generate.api_page("dcasgd_optax.harness")
  listed = [line.strip() for line in page.split(":nosignatures:")[1]
            .split("\n\n")[1].splitlines()]
  assert listed == [n for n in dcasgd_optax.harness.__all__
                    if n != "schedules"]
  assert ":mod:`dcasgd_optax.harness.schedules`" in page


def test_rewrite_links():
  pages = {"benchmarks/a.md": "_generated/performance/a",
           "docs/ray.md": "ray"}
  text = ("[a](../benchmarks/a.md#x) [t](../tests/t.py) [r](ray.md) "
          "[w](https://x.org/y.md) [h](#here) ![p](../experiments/p.png)")
  out = generate.rewrite_links(text, origin="docs/ray.md", pages=pages,
                               docname="ray", repo_url="https://g/r")
  assert out == ("[a](_generated/performance/a.md#x) "
                 "[t](https://g/r/blob/main/tests/t.py) [r](ray.md) "
                 "[w](https://x.org/y.md) [h](#here) "
                 "![p](../experiments/p.png)")
  out = generate.rewrite_links("[r](../docs/ray.md) ![p](results/p.png)",
                               origin="experiments/README.md", pages=pages,
                               docname="_generated/experiments",
                               repo_url="https://g/r")
  assert out == "[r](../ray.md) ![p](../../experiments/results/p.png)"


def test_coverage_check_names_what_has_no_page():
  module = types.ModuleType("fake_pkg")
  module.__all__ = ("f", "C")
  module.f = lambda: None
  module.C = type("C", (), {})
  module.g = lambda: None  # public but forgotten in __all__
  module._private = 1
  module.annotations = importlib.import_module("__future__").annotations
  sys.modules["fake_pkg"] = module
  try:
    env = types.SimpleNamespace(domaindata={"py": {
        "objects": {"fake_pkg.f": None}, "modules": {}}})
    assert coverage_check.missing(env, ["fake_pkg"]) == [
        "fake_pkg.C", "fake_pkg.g"]
    env.domaindata["py"]["objects"].update({"fake_pkg.C": 0, "fake_pkg.g": 0})
    assert coverage_check.missing(env, ["fake_pkg"]) == []
  finally:
    del sys.modules["fake_pkg"]


# --- the build ------------------------------------------------------------


class _Links(html.parser.HTMLParser):
  """The hrefs, srcs and ids of one HTML page."""

  def __init__(self):
    super().__init__()
    self.targets: list[str] = []
    self.ids: set[str] = set()

  def handle_starttag(self, tag, attrs):
    a = dict(attrs)
    if a.get("id"):
      self.ids.add(a["id"])
    if tag == "a" and a.get("href"):
      self.targets.append(a["href"])
    if tag == "img" and a.get("src"):
      self.targets.append(a["src"])


def broken_links(site: pathlib.Path) -> list[str]:
  """Internal links of the built site whose file or anchor is missing."""
  pages = {}
  for page in site.rglob("*.html"):
    parser = _Links()
    parser.feed(page.read_text(errors="replace"))
    pages[page.resolve()] = parser
  broken = []
  for page, parser in pages.items():
    if "_modules" in page.parts:  # viewcode's source pages
      continue
    for target in parser.targets:
      url = urllib.parse.urlsplit(target)
      if url.scheme or url.netloc or target.startswith("mailto:"):
        continue
      path = (page.parent / urllib.parse.unquote(url.path)).resolve() \
          if url.path else page
      if not path.exists():
        broken.append(f"{page.relative_to(site)}: {target}")
      elif url.fragment and path in pages and url.fragment not in \
          pages[path].ids:
        broken.append(f"{page.relative_to(site)}: {target} (no anchor)")
  return broken


@pytest.mark.slow
def test_docs_build_offline_with_no_warning_and_links_resolve(tmp_path):
  """``make docs``'s command: nitpicky, warnings as errors, the coverage
  check on; then every internal link and anchor of the site resolves."""
  site = tmp_path / "html"
  proc = subprocess.run(
      [sys.executable, "-m", "sphinx", "-b", "html", "-W", "--keep-going",
       "-n", "-q", "-d", str(tmp_path / "doctrees"), str(ROOT / "docs"),
       str(site)],
      capture_output=True, text=True, check=False)
  assert proc.returncode == 0, proc.stderr[-5000:]
  assert not broken_links(site)
  for package in ("dcasgd_optax", "dcasgd_optax.harness",
                  "dcasgd_optax.harness.schedules", "dcasgd_optax.ray"):
    module = importlib.import_module(package)
    for name in module.__all__:
      if isinstance(getattr(module, name), types.ModuleType):
        continue
      page = site / "_generated" / "api" / "_autosummary" / \
          f"{package}.{name}.html"
      assert page.exists(), page
  assert (site / "_generated" / "notebooks" / "01_quickstart.html") \
      .read_text().count("<img") >= 1  # the committed plots render


def test_broken_links_finds_missing_files_and_anchors(tmp_path):
  (tmp_path / "a.html").write_text(
      '<h1 id="top">x</h1><a href="b.html#nope">b</a><a href="a.html#top">'
      '</a><a href="c.html">c</a><a href="https://x.org/d.html">d</a>'
      '<img src="img.png">')
  (tmp_path / "b.html").write_text('<p id="yes"></p>')
  assert broken_links(tmp_path) == [
      "a.html: b.html#nope (no anchor)", "a.html: c.html", "a.html: img.png"]


def test_join_shared_args_makes_one_entry_of_a_wrapped_name_list():
  lines = ["Args:", "  a, b,", "    c: as in f.", "  d: its own.",
           "  e,", "  f: not a wrapped list."]
  generate.join_shared_args(lines)
  assert lines == ["Args:", "  a, b, c: as in f.", "  d: its own.",
                   "  e,", "  f: not a wrapped list."]
