"""experiments.reporting: the results table in the paper's form."""

from experiments import reporting


def test_markdown_table_has_the_papers_form():
  rows = [
      {"algorithm": "sequential", "workers": 1, "seed": 0, "final_test_error": 0.08},
      {"algorithm": "sequential", "workers": 1, "seed": 1, "final_test_error": 0.10},
      {"algorithm": "asgd", "workers": 4, "seed": 0, "final_test_error": 0.2},
      {"algorithm": "asgd", "workers": 4, "seed": 1, "final_test_error": 0.3},
      {"algorithm": "dc-asgd-a", "workers": 4, "seed": 0, "final_test_error": 0.1},
  ]
  lines = reporting.markdown_table(rows).splitlines()
  assert lines[0] == "| M | sequential SGD | ASGD | DC-ASGD-a |"
  assert lines[2] == "| 4 | 9.00 ± 1.41 | 25.00 ± 7.07 | 10.00 |"
