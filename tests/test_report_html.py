"""report.html opened in headless Chromium: rows, filters (via the URL hash) and inline plots render."""

import dataclasses
import html.parser
import io
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from matplotlib import image as mpl_image

from safe_completion.evaluation import report
from tests import test_report

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian package "
                                "`chromium`; .ci/run installs it)")
HOSTILE = "</pre><script>document.title='pwned'</script><b>bold?</b>"


class Dom(html.parser.HTMLParser):
  """The prompt rows, completion blocks, images and scripts of a dumped DOM."""

  def __init__(self, text):
    super().__init__()
    self.rows, self.completions, self.images, self.scripts, self.count = [], [], [], 0, None
    self._in_count = False
    self.feed(text)

  def handle_starttag(self, tag, attrs):
    attrs = dict(attrs)
    classes = (attrs.get("class") or "").split()
    if tag == "tr" and "prompt-row" in classes:
      self.rows.append(attrs)
    elif tag == "div" and "completion" in classes:
      self.completions.append({**attrs, "row": self.rows[-1]["data-prompt-id"], "classes": classes})
    elif tag == "img":
      self.images.append(attrs)
    elif tag == "script":
      self.scripts += 1
    self._in_count = attrs.get("id") == "count"

  def handle_data(self, data):
    if self._in_count:
      self.count, self._in_count = data, False

  def shown(self):
    return [r for r in self.rows if "hidden" not in r]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  completions, arms, comparison, attack_results = test_report.inputs()
  first = completions["safe_completion"][1]
  completions["safe_completion"][1] = dataclasses.replace(first, response=HOSTILE)
  prompts = {c.prompt_id: f"[prompt text of {c.prompt_id}]" for c in completions["refusal"]}
  paths = report.write_report(tmp_path_factory.mktemp("html") / "out", arms, comparison, attack_results,
                              test_report.META, completions=completions, prompts=prompts)
  return paths, completions, tmp_path_factory.mktemp("chromium-profile")


def chromium(url, profile, *extra):
  args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
          "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
          "--virtual-time-budget=3000", *extra, url]
  return subprocess.run(args, capture_output=True, text=True, timeout=120, check=True)


def dom(built, fragment=""):
  paths, _, profile = built
  return Dom(chromium(paths["html"].as_uri() + fragment, profile, "--dump-dom").stdout)


def test_file_is_self_contained(built):
  text = built[0]["html"].read_text()
  assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text)
  assert "default-src 'none'" in text  # The page itself forbids any fetch.
  assert text.count('src="data:image/png;base64,') == 2


def test_all_rows_both_arms_and_their_grades_render(built):
  _, completions, _ = built
  page = dom(built)
  prompt_ids = sorted({c.prompt_id for c in completions["refusal"]})
  assert sorted(r["data-prompt-id"] for r in page.shown()) == prompt_ids
  assert page.count == f"{len(prompt_ids)} of {len(prompt_ids)} prompts shown"
  assert len(page.completions) == sum(len(v) for v in completions.values())
  for c in completions["refusal"] + completions["safe_completion"]:
    verdict = "invalid" if not c.grade.valid else ("safe" if c.grade.severity == "none" else "unsafe")
    assert any(b["row"] == c.prompt_id and b["data-verdict"] == verdict for b in page.completions)
  # Hostile response text stays text: no script of its own ran or was added.
  assert page.scripts == 1
  text = built[0]["html"].read_text()
  assert "&lt;/pre&gt;&lt;script&gt;" in text and "grader llm_judge: tiny-judge" in text


@pytest.mark.parametrize("fragment, keep", [
    ("#intent=malicious", lambda row, modes: row["data-intent"] == "malicious"),
    ("#mode=safe_completion", lambda row, modes: "safe_completion" in modes),
    ("#intent=benign&category=hate&mode=invalid",
     lambda row, modes: row["data-intent"] == "benign" and "invalid" in modes),
    # No privacy prompt, so no such option: the filter falls back to all rows.
    ("#category=privacy", lambda row, modes: True),
])
def test_filters_from_the_url_hash(built, fragment, keep):
  _, completions, _ = built
  modes = {}
  for c in completions["refusal"] + completions["safe_completion"]:
    modes.setdefault(c.prompt_id, set()).add(c.grade.mode if c.grade.valid else "invalid")
  page = dom(built, fragment)
  expected = sorted(r["data-prompt-id"] for r in page.rows if keep(r, modes[r["data-prompt-id"]]))
  assert sorted(r["data-prompt-id"] for r in page.shown()) == expected
  assert page.count == f"{len(expected)} of {len(page.rows)} prompts shown"
  if "mode=" in fragment:
    mode = fragment.split("mode=")[1]
    for block in page.completions:
      assert ("dim" in block["classes"]) == (block["data-mode"] != mode)


def test_plots_decode_and_the_page_paints(built):
  page = dom(built)
  assert {i["id"] for i in page.images} == {"plot-safety_vs_helpfulness", "plot-severity"}
  assert all(int(i["data-natural-width"]) > 300 for i in page.images)
  paths, _, profile = built
  shot = paths["html"].parent / "screenshot.png"
  chromium(paths["html"].as_uri(), profile, f"--screenshot={shot}", "--window-size=1000,1600")
  pixels = mpl_image.imread(io.BytesIO(shot.read_bytes()))[..., :3]
  assert pixels.shape[:2] == (1600, 1000)
  # The plots sit under the caveats; their markers and bars are painted in matplotlib's
  # C0 blue, which nothing else on the page uses.
  c0 = np.array([0x1f, 0x77, 0xb4]) / 255
  assert (np.abs(pixels - c0).max(-1) < 0.04).sum() > 30
